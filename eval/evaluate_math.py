"""Evaluate a model on a math benchmark: N samples per problem, Pass@N / Avg@N / Maj@N.

    python eval/evaluate_math.py --base_model MODEL --dataset math500 --val_n 12 --output_file OUT.json

The reference's entry point, kept under its name and command line. The code lives in `pwopsd.evaluation.evaluate`
(installed by `pip install -e .`; the same command is `pwopsd-eval`).
"""

import sys

try:
    from pwopsd.evaluation.evaluate import main
except ModuleNotFoundError as err:  # the package (or a dependency) is not installed in this Python
    sys.exit(f"{err}: run `pip install -e .` in the repository root (or `bash launchers/setup_venv.sh`)")

if __name__ == "__main__":
    sys.exit(main())
