#!/usr/bin/env bash
# EOPD on Qwen3-4B: train a LoRA adapter, merge checkpoint-100, mark it ready for eval
# (see docs/architecture.md#training-launchers).
# Settings and env overrides (MODEL NUM_GPUS OUTPUT_ROOT MAX_STEPS EVAL_CHECKPOINT DRY_RUN ...): launchers/common.sh
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
pw_train_and_merge qwen3_4b_base eopd
