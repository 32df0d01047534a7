#!/usr/bin/env bash
# Every GPU figure this project claims, in ONE command on a CUDA machine, downloading nothing (estimated 6-7 min
# on one H100/H200; the budget stops it at 570 s): the loss benchmark at full size (all methods, and T = 4096 for
# pwopsd), the training micro-batch and two optimizer steps (dense vs chunked) on a random model with Qwen3-4B's
# exact dimensions, the transformers evaluation backend on it (timed, tokens/s), and two optimizer steps through
# accelerate + DeepSpeed ZeRO-2 (code/accelerate_4gpu.yaml, 1 process). The parts and their output: bench/gpu_check.py.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from any folder
#   SIZE=small bash bench/gpu_check.sh      # CPU dry run of every part with a tiny model (a few minutes)
#
# Output: stdout = JSON lines, one per measurement ("part", "status" ok/skipped/failed, "device", "size", figures),
# the last one the summary; the same lines in $OUT/gpu_check.jsonl and every part's output in $OUT/gpu_check.log
# ($OUT unset: $WORK/out). Missing packages (trl, datasets, math-verify, deepspeed) skip the parts that need them,
# with the reason; wheels in .whl/ at the repository root (bash bench/gpu_wheels.sh, on a machine with network) are
# installed first into $WORK/site, put first on PYTHONPATH. Each part has its own time limit and the whole run a budget
# (BUDGET, default 570 s for SIZE=full), so the summary always comes; the exit status is 0 whatever the parts did
# (2 only for a bad SIZE/BUDGET/WORK).
#
# Environment: SIZE (full | small), WORK (scratch, default /tmp/pwopsd_gpu_check: the 8 GB model is kept there and
# reused by a re-run), OUT, BUDGET, PY (interpreter; default .venv/bin/python if present, else python3), WHEELS=1
# (install .whl/ with SIZE=small too).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
rc=0
"$PY" bench/gpu_check.py --python "$PY" "$@" || rc=$?
if ((rc == 2)); then exit 2; fi
if ((rc != 0)); then
  # the driver itself broke (not a part): still one summary line, still exit 0
  printf '{"part": "summary", "status": "failed", "error": "%s", "size": "%s"}\n' \
    "bench/gpu_check.py exited ${rc} (see stderr)" "${SIZE:-full}"
fi
exit 0
