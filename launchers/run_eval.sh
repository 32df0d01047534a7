#!/usr/bin/env bash
# Evaluate one merged model on one benchmark with the reference settings (docs/architecture.md#evaluation-launcher):
# 12 samples per problem, thinking on, 38,912 new tokens, temperature 1.0, top-p 0.95. Safe to run from many workers
# at once and to re-run:
#   - the output is locked (flock -n on {OUTFILE}.lock): a busy lock means another worker has it, so this one skips;
#   - a valid existing result is kept (skip); an invalid one is moved aside to {OUTFILE}.invalid;
#   - the evaluator writes {OUTFILE}.tmp.{HOSTLABEL}.{pid}, which is validated (eval/validate_eval_result.py) and
#     renamed into place, or renamed to *.invalid when it fails validation;
#   - an interrupted evaluation resumes: the newest {OUTFILE}.tmp.*.partial.jsonl newer than the model's
#     ready-for-eval sentinel becomes this run's partial file (the evaluator checks its settings).
# Usage: bash launchers/run_eval.sh <method_name> <dataset> [tp=4] [seed]
#   method_name  {qwen3_4b_base|dsr1_l8b|olmo3_7b_think}_{METHOD}, METHOD from `python -m pwopsd list methods`
#   dataset      one of `python -m pwopsd list benchmarks` (math500 aime24 aime25 hmmt25)
#   tp           tensor-parallel size (GPUs per model), default 4
#   seed         non-negative integer; omitted = unseeded
# Output: eval_results/{NAME}[_{DATASET}]_38k[_seed{S}].json (no dataset part for math500);
# log: eval_results/logs/{NAME}_{DATASET}_38k[_seed{S}].{HOSTLABEL}.log (HOSTLABEL defaults to "worker").
# Environment: DRY_RUN=1 prints the commands and the output path and skips the checks that need training outputs;
# OUTPUT_ROOT (default outputs) is where the merged models are; EVAL_RESULTS_DIR (default eval_results) is where the
# results and logs go; HOSTLABEL; the WandB guard and the Python environment as in common.sh.
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

pw_eval_usage() {
  echo "[pwopsd] error: $1" >&2
  echo "usage: bash launchers/run_eval.sh <method_name> <dataset> [tp=4] [seed]" >&2
  echo "  method_name: {${PW_RUN_TAGS// /|}}_{${PW_METHODS// /|}}; dataset: ${PW_DATASETS// /|}" >&2
  exit 2
}

pw_eval_main() {
  pw_load_registries # the method and benchmark names, for the checks and the usage line
  (($# >= 2 && $# <= 4)) || pw_eval_usage "expected 2 to 4 arguments, got $#"
  local name=$1 dataset=$2 tp=${3:-4} seed=${4:-}
  local names=" " tag method
  for tag in $PW_RUN_TAGS; do for method in $PW_METHODS; do names+="${tag}_${method} "; done; done
  [[ "$names" == *" ${name} "* ]] || pw_eval_usage "unknown method_name '${name}'"
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
    local script
    script="launchers/run_${name/qwen3_4b_base/qwen4b_base}_train.sh"
    [[ -f "$ready" ]] || pw_die "${ready} is missing: ${name} is not trained and merged yet (run: bash ${script})"
    [[ -f "${merged}/config.json" ]] || pw_die "${merged}/config.json is missing (re-run: bash ${script})"
    pw_has_weights "$merged" || pw_die "${merged} has no non-empty *.safetensors (re-run: bash ${script})"
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

  # A tmp file left behind by a failure or an interruption is marked invalid, never mistaken for a result.
  # shellcheck disable=SC2064  # expand $tmp now
  trap "[[ ! -e '${tmp}' ]] || mv -f -- '${tmp}' '${tmp}.invalid'" EXIT
  {
    echo "# $(date) on $(hostname) (HOSTLABEL=${hostlabel})"
    echo "NCCL_P2P_DISABLE=1 $(pw_print_cmd "${eval_cmd[@]}")"
  } >>"$log"
  local rc=0
  NCCL_P2P_DISABLE=1 PYTHONUNBUFFERED=1 "${eval_cmd[@]}" {lock_fd}>&- 2>&1 | tee -a "$log" || rc=$?
  ((rc == 0)) || pw_die "the evaluator failed with exit ${rc}; see ${log}"
  if ! "${validate_cmd[@]}" 2>&1 | tee -a "$log" >&2; then
    pw_die "${tmp} failed validation (reasons above and in ${log}); kept as ${tmp}.invalid"
  fi
  mv -f -- "$tmp" "$outfile"
  pw_log "done: ${outfile}"
}

pw_eval_main "$@"
