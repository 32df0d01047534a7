"""Tables and charts of the evaluation results.

    python eval/summarize.py [--results_dir eval_results] [--out_dir eval_results_summary]

The reference's entry point, kept under its name and command line. The code lives in `pwopsd.evaluation.summarize` (installed by
`pip install -e .`; the same command is `pwopsd-summarize`).
"""

import sys

from pwopsd.evaluation.summarize import main

if __name__ == "__main__":
    sys.exit(main())
