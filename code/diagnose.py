"""Where are the teacher's tokens reliable? Position profile and branch viability of a self-distillation teacher.

    python code/diagnose.py profile   --model PATH --data_file FILE.jsonl --num_problems N --out_dir DIR [--seed S]
    python code/diagnose.py viability --model PATH --data_file FILE.jsonl --num_problems N --out_dir DIR [--seed S]

The code lives in `pwopsd.diagnose.cli` (installed by `pip install -e .`); `--help` lists every flag.
"""

import sys

try:
    from pwopsd.diagnose.cli import main
except ModuleNotFoundError as err:  # the package (or a dependency) is not installed in this Python
    sys.exit(f"{err}: run `pip install -e .` in the repository root (or `bash launchers/setup_venv.sh`)")

if __name__ == "__main__":
    sys.exit(main())
