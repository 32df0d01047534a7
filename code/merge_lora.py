"""Merge a LoRA adapter into its base model.

    python code/merge_lora.py BASE ADAPTER OUT [--dtype bfloat16] [--overwrite] [--strict_base]

The reference's entry point, kept under its name and command line. The code lives in `pwopsd.merge` (installed by
`pip install -e .`; the same command is `pwopsd-merge`).
"""

import sys

try:
    from pwopsd.merge import main
except ModuleNotFoundError as err:  # the package (or a dependency) is not installed in this Python
    sys.exit(f"{err}: run `pip install -e .` in the repository root (or `bash launchers/setup_venv.sh`)")

if __name__ == "__main__":
    sys.exit(main())
