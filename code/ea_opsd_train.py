"""Train a LoRA adapter by on-policy self-distillation.

    python code/ea_opsd_train.py --model_name_or_path MODEL --method pwopsd --output_dir DIR ...

The reference's entry point, kept under its name and command line. The code lives in `pwopsd.train` (installed by
`pip install -e .`; the same command is `pwopsd-train`).
"""

import sys

from pwopsd.train import main

if __name__ == "__main__":
    sys.exit(main())
