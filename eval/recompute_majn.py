"""Recompute Maj@N of saved result files offline.

    python eval/recompute_majn.py ['eval_results/*.json'] [--apply]

The reference's entry point, kept under its name and command line. Every file is checked before any is graded or
written; a bad file gets one line `recompute_majn.py: error: FILE: what is wrong`, the others are still recomputed (and
written with --apply, atomically), and the exit status is then 1. Empty boxes vote as the reference stored them
(`[No boxed answer found]`, one cluster per problem), in old files (saved as `""`) and new ones alike. The code lives in `pwopsd.evaluation.recompute` (installed by
`pip install -e .`; the same command is `pwopsd-recompute-majn`).
"""

import sys

try:
    from pwopsd.evaluation.recompute import main
except ModuleNotFoundError as err:  # the package (or a dependency) is not installed in this Python
    sys.exit(f"{err}: run `pip install -e .` in the repository root (or `bash launchers/setup_venv.sh`)")

if __name__ == "__main__":
    sys.exit(main())
