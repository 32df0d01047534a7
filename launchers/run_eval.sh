#!/usr/bin/env bash
# Evaluate one merged model on one benchmark with the reference settings (docs/architecture.md#evaluation-launcher):
# 12 samples per problem, thinking on, 38,912 new tokens, temperature 1.0, top-p 0.95. Safe to run from many workers
# at once, to re-run and to kill:
#   - the output is locked (flock -n on {OUTFILE}.lock): a busy lock means another worker has it, so this one skips;
#   - a valid existing result is kept (skip); an invalid one is moved aside to {OUTFILE}.invalid;
#   - the evaluator writes {OUTFILE}.tmp.{HOSTLABEL}.{pid}, which is validated (eval/validate_eval_result.py) and
#     renamed into place, or renamed to *.invalid when the evaluator fails or the file fails validation;
#   - the evaluator runs in its own process group. SIGTERM, SIGINT or SIGHUP to this script stops that whole group
#     (TERM, then KILL after 15 s), so no evaluator outlives the script and the lock is released. SIGKILL cannot be
#     trapped: the evaluator then finishes on its own, holding the lock (no second worker starts the same output), and
#     its finished {OUTFILE}.tmp.* file is adopted by the next run;
#   - adoption: a {OUTFILE}.tmp.{HOSTLABEL}.{pid} result left by an earlier run, newer than the model's ready-for-eval
#     sentinel, is validated and moved into place (the newest valid one; no re-evaluation); one that fails validation
#     is renamed to *.invalid;
#   - an interrupted evaluation resumes: the newest {OUTFILE}.tmp.*.partial.jsonl newer than the model's
#     ready-for-eval sentinel becomes this run's partial file (the evaluator checks its settings).
# Usage: bash launchers/run_eval.sh <method_name> <dataset> [tp=4] [seed]
#   method_name  {qwen3_4b_base|dsr1_l8b|olmo3_7b_think}_{METHOD}, METHOD from `python -m pwopsd list methods`;
#                {NAME}_ckpt{N} evaluates checkpoint N of a checkpoint sweep (EVAL_CHECKPOINTS, launchers/common.sh)
#   dataset      one of `python -m pwopsd list benchmarks` (math500 aime24 aime25 hmmt25)
#   tp           tensor-parallel size (GPUs per model), default 4
#   seed         non-negative integer; omitted = unseeded
# Output: eval_results/{NAME}[_{DATASET}]_38k[_seed{S}].json (no dataset part for math500; NAME may be {NAME}_ckpt{N});
# log: eval_results/logs/{NAME}_{DATASET}_38k[_seed{S}].{HOSTLABEL}.log (HOSTLABEL defaults to "worker").
# Environment: DRY_RUN=1 prints the commands and the output path and skips the checks that need training outputs;
# OUTPUT_ROOT (default outputs) is where the merged models are; EVAL_RESULTS_DIR (default eval_results) is where the
# results and logs go; HOSTLABEL; the WandB guard and the Python environment as in common.sh.
# Paths and names are data: they are only ever expanded inside double quotes, never pasted into code run by a trap.
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PW_EVAL_STOP_GRACE_S=15 # seconds between TERM and KILL to the evaluator's process group

pw_eval_usage() {
  echo "[pwopsd] error: $1" >&2
  echo "usage: bash launchers/run_eval.sh <method_name> <dataset> [tp=4] [seed]" >&2
  echo "  method_name: {${PW_RUN_TAGS// /|}}_{${PW_METHODS// /|}}[_ckpt{N}]; dataset: ${PW_DATASETS// /|}" >&2
  exit 2
}

# The evaluator job and its result file, for the traps (which read these variables; they are never pasted into code).
PW_EVAL_PID=""
PW_EVAL_TMP=""

# True while a process of process group $1 is alive (zombies do not count: a container's PID 1 may never reap them).
pw_group_alive() {
  local stat line fields
  for stat in /proc/[0-9]*/stat; do
    line=""
    read -r line <"$stat" 2>/dev/null || true
    [[ -n "$line" ]] || continue
    read -r -a fields <<<"${line##*) }" # state ppid pgrp ... (the command name may hold spaces and parentheses)
    [[ "${fields[2]:-}" == "$1" && "${fields[0]}" != Z && "${fields[0]}" != X ]] && return 0
  done
  return 1
}

# Stop the evaluator's whole process group (vLLM workers, grading pool, the log's tee): TERM, then KILL.
pw_eval_stop() {
  local pgid=$PW_EVAL_PID waited=0
  [[ -n "$pgid" ]] || return 0
  PW_EVAL_PID=""
  kill -TERM -- "-${pgid}" 2>/dev/null || true
  while pw_group_alive "$pgid" && ((waited < PW_EVAL_STOP_GRACE_S * 10)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  kill -KILL -- "-${pgid}" 2>/dev/null || true
  wait "$pgid" 2>/dev/null || true
}

# After the evaluator exited: let the rest of its group finish (the tee flushes the log), for at most 5 s; whatever
# is still left then (a leaked worker) is stopped, so nothing of it holds the lock afterwards.
pw_eval_reap() {
  local pgid=$PW_EVAL_PID waited=0
  while pw_group_alive "$pgid" && ((waited < 50)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  pw_eval_stop
}

# TERM/INT/HUP: stop the evaluator, then exit 128+signal. Its tmp file (if any) is left for the next run, which
# validates it before adopting it.
pw_eval_on_signal() {
  pw_log "received SIG$1: stopping the evaluator"
  pw_eval_stop
  trap - "$1"
  exit "$2"
}

# EXIT: never leave an evaluator running behind this script (an unexpected error while it runs).
pw_eval_on_exit() {
  pw_eval_stop
}

# A failed evaluation's tmp file is marked invalid, never mistaken for a result.
pw_eval_mark_invalid() {
  [[ ! -e "$PW_EVAL_TMP" ]] || mv -f -- "$PW_EVAL_TMP" "${PW_EVAL_TMP}.invalid"
}

# Adopt the newest finished result an earlier (killed) run left as {outfile}.tmp.{HOSTLABEL}.{pid}: validate it and
# move it into place. Results older than the ready sentinel belong to an earlier merge and are left alone; invalid
# ones are renamed to *.invalid. Returns 1 when nothing was adopted.
pw_eval_adopt() {
  local outfile=$1 ready=$2 cand newest
  shift 2
  while :; do
    newest=""
    for cand in "${outfile}".tmp.*; do
      [[ -f "$cand" && "${cand#"${outfile}"}" =~ ^\.tmp\.[A-Za-z0-9._-]+\.[0-9]+$ && "$cand" -nt "$ready" ]] || continue
      [[ -z "$newest" || "$cand" -nt "$newest" ]] && newest=$cand
    done
    [[ -n "$newest" ]] || return 1
    if python eval/validate_eval_result.py "$newest" "$@"; then
      mv -f -- "$newest" "$outfile"
      rm -f -- "${newest}.partial.jsonl"
      pw_log "adopted ${newest} (a finished result of an earlier run, valid): ${outfile}"
      return 0
    fi
    pw_log "${newest} is not a valid result: moving it to ${newest}.invalid"
    mv -f -- "$newest" "${newest}.invalid"
  done
}

pw_eval_main() {
  pw_load_registries # the method and benchmark names, for the checks and the usage line
  (($# >= 2 && $# <= 4)) || pw_eval_usage "expected 2 to 4 arguments, got $#"
  local name=$1 dataset=$2 tp=${3:-4} seed=${4:-}
  local names=" " tag method run=$1 ckpt=""
  for tag in $PW_RUN_TAGS; do for method in $PW_METHODS; do names+="${tag}_${method} "; done; done
  if [[ "$name" =~ ^(.+)_ckpt([0-9]+)$ && "$names" == *" ${BASH_REMATCH[1]} "* ]]; then
    run=${BASH_REMATCH[1]} ckpt=${BASH_REMATCH[2]}
    [[ "$ckpt" =~ ^[1-9][0-9]*$ ]] || pw_eval_usage "checkpoint '${ckpt}' in '${name}' is not a positive integer without leading zeros"
  fi
  [[ "$names" == *" ${run} "* ]] || pw_eval_usage "unknown method_name '${name}'"
  [[ " ${PW_DATASETS} " == *" ${dataset} "* ]] || pw_eval_usage "unknown dataset '${dataset}'"
  [[ "$tp" =~ ^[1-9][0-9]*$ ]] || pw_eval_usage "tp '${tp}' is not a positive integer"
  [[ -z "$seed" || "$seed" =~ ^[0-9]+$ ]] || pw_eval_usage "seed '${seed}' is not a non-negative integer"
  local hostlabel="${HOSTLABEL:-worker}"
  [[ "$hostlabel" =~ ^[A-Za-z0-9._-]+$ ]] || pw_die "HOSTLABEL='${hostlabel}' may only hold letters, digits, '.', '_' and '-'"
  pw_require_wandb
  pw_dry_run || true # validates DRY_RUN

  local merged="${OUTPUT_ROOT:-outputs}/${name}_merged"
  local results="${EVAL_RESULTS_DIR:-eval_results}" suffix="_38k${seed:+_seed${seed}}" outfile
  if [[ "$dataset" == math500 ]]; then
    outfile="${results}/${name}${suffix}.json"
  else
    outfile="${results}/${name}_${dataset}${suffix}.json"
  fi
  local log="${results}/logs/${name}_${dataset}${suffix}.${hostlabel}.log"
  local tmp="${outfile}.tmp.${hostlabel}.$$"
  local seed_args=()
  [[ -z "$seed" ]] || seed_args=(--seed "$seed")
  local eval_cmd=(
    python eval/evaluate_math.py --base_model "$merged" --dataset "$dataset" --val_n 12
    --temperature 1.0 --top_p 0.95 --top_k -1 --min_p 0.0 --presence_penalty 0.0
    --enable_thinking --max_new_tokens 38912 --tensor_parallel_size "$tp" "${seed_args[@]}" --output_file "$tmp"
  )
  local validate_args=(--dataset "$dataset" --base_model "$merged" "${seed_args[@]}")  # the same test for old and new
  local validate_cmd=(python eval/validate_eval_result.py "$tmp" "${validate_args[@]}")

  if pw_dry_run; then pw_print_cmd cd "$REPO_ROOT"; fi
  cd "$REPO_ROOT"
  pw_log "${name} on ${dataset} (tp ${tp}, seed ${seed:-none}) -> ${outfile} (log ${log})"
  local ready="${OUTPUT_ROOT:-outputs}/.${name}_ready_for_eval"
  if ! pw_dry_run; then
    local script redo
    script="launchers/run_${run/qwen3_4b_base/qwen4b_base}_train.sh"
    redo="bash ${script}"
    [[ -z "$ckpt" ]] || redo="EVAL_CHECKPOINTS=${ckpt} bash ${script}; the EVAL_CHECKPOINT one (default 100) is evaluated as ${run}"
    [[ -f "$ready" ]] || pw_die "${ready} is missing: ${name} is not trained and merged yet (run: ${redo})"
    [[ -f "${merged}/config.json" ]] || pw_die "${merged}/config.json is missing (re-run: ${redo})"
    pw_has_weights "$merged" || pw_die "${merged} has no non-empty *.safetensors (re-run: ${redo})"
  fi
  pw_export_defaults
  pw_activate_env

  if pw_dry_run; then
    [[ ! -e "$outfile" ]] || pw_log "${outfile} exists: a real run validates it first and skips if it is valid"
    echo "NCCL_P2P_DISABLE=1 $(pw_print_cmd "${eval_cmd[@]}")"
    pw_print_cmd "${validate_cmd[@]}"
    pw_print_cmd mv "$tmp" "$outfile"
    pw_log "dry run: nothing was run; output would be ${outfile}"
    return 0
  fi

  mkdir -p "${results}/logs"
  local lock_fd
  exec {lock_fd}>"${outfile}.lock"
  if ! flock -n "$lock_fd"; then
    pw_log "skip: ${outfile}.lock is held by another worker"
    return 0
  fi
  if [[ -e "$outfile" ]]; then
    if python eval/validate_eval_result.py "$outfile" "${validate_args[@]}"; then
      pw_log "skip: ${outfile} exists and is valid"
      return 0
    fi
    pw_log "${outfile} is not a valid result: moving it to ${outfile}.invalid"
    mv -f -- "$outfile" "${outfile}.invalid"
  fi
  if pw_eval_adopt "$outfile" "$ready" "${validate_args[@]}"; then return 0; fi

  # Resume: the evaluator continues {its --output_file}.partial.jsonl, and the tmp name holds this run's pid, so the
  # newest partial file a killed run left for this output (written after the current model's merge) is taken over.
  local partial leftover=""
  for partial in "${outfile}".tmp.*.partial.jsonl; do
    if [[ -f "$partial" && "$partial" -nt "$ready" && (-z "$leftover" || "$partial" -nt "$leftover") ]]; then
      leftover=$partial
    fi
  done
  if [[ -n "$leftover" ]]; then
    pw_log "resuming from ${leftover}"
    mv -f -- "$leftover" "${tmp}.partial.jsonl"
  fi

  {
    echo "# $(date) on $(hostname) (HOSTLABEL=${hostlabel})"
    echo "NCCL_P2P_DISABLE=1 $(pw_print_cmd "${eval_cmd[@]}")"
  } >>"$log"
  # The evaluator (and the tee that copies its output to the log) run as one background job in their own process
  # group (set -m), which the traps stop as a whole; the job keeps the lock fd, so the output stays locked while any
  # of it runs. `wait` returns as soon as a trapped signal arrives.
  PW_EVAL_TMP=$tmp
  trap pw_eval_on_exit EXIT
  trap 'pw_eval_on_signal TERM 143' TERM
  trap 'pw_eval_on_signal INT 130' INT
  trap 'pw_eval_on_signal HUP 129' HUP
  local rc=0
  set -m
  NCCL_P2P_DISABLE=1 PYTHONUNBUFFERED=1 "${eval_cmd[@]}" </dev/null > >(tee -a "$log") 2>&1 &
  PW_EVAL_PID=$!
  set +m
  wait "$PW_EVAL_PID" || rc=$?
  pw_eval_reap
  if ((rc != 0)); then
    pw_eval_mark_invalid
    pw_die "the evaluator failed with exit ${rc}; see ${log}"
  fi
  if ! "${validate_cmd[@]}" 2>&1 | tee -a "$log" >&2; then
    pw_eval_mark_invalid
    pw_die "${tmp} failed validation (reasons above and in ${log}); kept as ${tmp}.invalid"
  fi
  mv -f -- "$tmp" "$outfile"
  pw_log "done: ${outfile}"
}

pw_eval_main "$@"
