"""Grade one prediction against one gold answer.

    python eval/math_grader.py PRED GOLD [--grader strict]

The reference's entry point, kept under its name and command line. The code lives in `pwopsd.evaluation.grader` (installed by
`pip install -e .`; the same command is `pwopsd-grade`).
"""

import sys

from pwopsd.evaluation.grader import main

if __name__ == "__main__":
    sys.exit(main())
