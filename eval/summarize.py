"""Tables and charts of the evaluation results.

    python eval/summarize.py [--results_dir eval_results] [--out_dir eval_results_summary] [--baseline opsd]
        [--bootstrap 10000] [--permutations 10000] [--stats_seed 0] [--protocol_checkpoint 100]
        [--select_on DATASET] [--training OUTPUT_DIR [OUTPUT_DIR ...]]

The reference's entry point, kept under its name and command line. The code lives in `pwopsd.evaluation.summarize`
(installed by `pip install -e .`; the same command is `pwopsd-summarize`).
"""

import sys

try:
    from pwopsd.evaluation.summarize import main
except ModuleNotFoundError as err:  # the package (or a dependency) is not installed in this Python
    sys.exit(f"{err}: run `pip install -e .` in the repository root (or `bash launchers/setup_venv.sh`)")

if __name__ == "__main__":
    sys.exit(main())
