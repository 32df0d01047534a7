"""Merge a LoRA adapter into its base model.

    python code/merge_lora.py BASE ADAPTER OUT [--dtype bfloat16]

The reference's entry point, kept under its name and command line. The code lives in `pwopsd.merge` (installed by
`pip install -e .`; the same command is `pwopsd-merge`).
"""

import sys

from pwopsd.merge import main

if __name__ == "__main__":
    sys.exit(main())
