"""Train a LoRA adapter by on-policy self-distillation.

    python code/ea_opsd_train.py --model_name_or_path MODEL --method pwopsd --output_dir DIR ...

The reference's entry point, kept under its name and command line. The code lives in `pwopsd.train` (installed by
`pip install -e .`; the same command is `pwopsd-train`).
"""

import sys

try:
    from pwopsd.train import main
except ModuleNotFoundError as err:  # the package (or a dependency) is not installed in this Python
    sys.exit(f"{err}: run `pip install -e .` in the repository root (or `bash launchers/setup_venv.sh`)")

if __name__ == "__main__":
    sys.exit(main())
