"""Check that an evaluation result file is complete and was made with the protocol's settings.

    python eval/validate_eval_result.py FILE --dataset NAME --base_model PATH [--seed S]

The reference's entry point, kept under its name and command line. The code lives in `pwopsd.evaluation.validate`
(installed by `pip install -e .`; the same command is `pwopsd-validate`).
"""

import sys

try:
    from pwopsd.evaluation.validate import main
except ModuleNotFoundError as err:  # the package (or a dependency) is not installed in this Python
    sys.exit(f"{err}: run `pip install -e .` in the repository root (or `bash launchers/setup_venv.sh`)")

if __name__ == "__main__":
    sys.exit(main())
