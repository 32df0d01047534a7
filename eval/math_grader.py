"""Grade one prediction against one gold answer.

    python eval/math_grader.py PRED GOLD [--grader strict] [--timeout S]

The reference's entry point, kept under its name and command line. The code lives in `pwopsd.evaluation.grade` (the
rule and this command) and `pwopsd.evaluation.workers` (the time-limited worker pool it runs in), installed by
`pip install -e .`; the same command is `pwopsd-grade`.
"""

import sys

try:
    from pwopsd.evaluation.grade import main
except ModuleNotFoundError as err:  # the package (or a dependency) is not installed in this Python
    sys.exit(f"{err}: run `pip install -e .` in the repository root (or `bash launchers/setup_venv.sh`)")

if __name__ == "__main__":
    sys.exit(main())
