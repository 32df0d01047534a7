#!/usr/bin/env bash
# The test command of the README: set up .venv (idempotent), lint, run the test suite.
# Extra arguments go to pytest, e.g. `bash launchers/run_tests.sh -m "not slow" -x`.
set -Eeuo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=launchers/setup_venv.sh
source "$REPO_ROOT/launchers/setup_venv.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# One OpenMP thread per process: tests start subprocesses (training, resume, gloo, grading pools), and two threads
# per process thrash on a 2-core machine as soon as two processes run.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
echo "[tests] ruff check"
ruff check .
echo "[tests] pytest"
python -m pytest "$@"
