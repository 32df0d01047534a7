"""Recompute Maj@N of saved result files offline.

    python eval/recompute_majn.py ['eval_results/*.json'] [--apply]

The reference's entry point, kept under its name and command line. The code lives in `pwopsd.evaluation.recompute` (installed by
`pip install -e .`; the same command is `pwopsd-recompute-majn`).
"""

import sys

from pwopsd.evaluation.recompute import main

if __name__ == "__main__":
    sys.exit(main())
