#!/usr/bin/env bash
# The README's main-job command: the whole pipeline offline on CPU (see README "Offline demo").
set -Eeuo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=launchers/setup_venv.sh
source "$REPO_ROOT/launchers/setup_venv.sh"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
python code/tiny_models.py --arch smollm2 --out "${PWOPSD_CACHE:-$HOME/.cache/pwopsd}/SmolLM2-135M-Instruct"
echo "[demo] model ready; training, merge and evaluation stages land with their issues"
