# shellcheck shell=bash
# Shared logic of the launchers (docs/architecture.md#launchers): settings tables, environment defaults, WandB guard,
# skip logic and sentinels. Sourced by the 12 run_*_train.sh scripts and by run_eval.sh, never executed on its own.
# Read top to bottom: settings tables, helpers, the training job.
#
# Conventions
# - Every artefact is anchored at the repository root: the launchers `cd "$REPO_ROOT"` and run `python code/...` /
#   `python eval/...`, so `outputs/`, `eval_results/` and `wandb/` land next to README.md no matter where the
#   launcher is started from. Argument values are exactly the reference's (docs/architecture.md#training-launchers).
# - DRY_RUN=1: stdout carries every command that would run, one per line and shell-quoted (a runnable script);
#   nothing is executed or created (only the registries are read, see below). Progress and decisions go to stderr as
#   "[pwopsd] ..." lines.
# - Python environment (PWOPSD_PYTHON_ENV=auto, the default): the conda env `pwopsd` (environment.yml) when conda
#   is on PATH and has it, else the venv at ${PWOPSD_VENV:-$REPO_ROOT/.venv}. The venv is activated, never created:
#   launchers/setup_venv.sh builds the CPU-only test environment, which cannot run vLLM. PWOPSD_PYTHON_ENV=none
#   uses the environment that is already active (containers, SLURM images).
# - The methods, their extra training flags and the benchmarks are not written here: they are read once per run from
#   the Python registries (pwopsd.losses.METHODS, pwopsd.evaluation.benchmarks.BENCHMARKS) with
#   `python -m pwopsd launcher-config`; see pw_load_registries.
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
trap 'echo "[pwopsd] error: \"${BASH_COMMAND}\" failed with exit $? (${BASH_SOURCE[0]}:${LINENO})" >&2' ERR

# ---------------------------------------------------------------------------------------------------------------
# Settings (docs/architecture.md#training-launchers). One row per run tag; a launcher only names a (run tag, method)
# pair. The per-method settings and the benchmark list come from the Python registries (pw_load_registries).
# ---------------------------------------------------------------------------------------------------------------
PW_GLOBAL_BATCH=32 # prompts per optimizer step = processes × per-device batch × gradient accumulation
declare -A PW_MODEL_ID=(
  [qwen3_4b_base]=Qwen/Qwen3-4B
  [dsr1_l8b]=deepseek-ai/DeepSeek-R1-Distill-Llama-8B
  [olmo3_7b_think]=allenai/Olmo-3-7B-Think
)
declare -A PW_PER_DEVICE_BS=([qwen3_4b_base]=4 [dsr1_l8b]=2 [olmo3_7b_think]=2)
declare -A PW_VLLM_MEM=([qwen3_4b_base]=0.4 [dsr1_l8b]=0.30 [olmo3_7b_think]=0.55)
PW_RUN_TAGS="qwen3_4b_base dsr1_l8b olmo3_7b_think"
PW_SAVE_STEPS=25
# Filled by pw_load_registries: method names and benchmark names (space-separated, registry order), and per method
# its extra training flags (DistillationMethod.launcher_args), tab-separated.
PW_METHODS=""
PW_DATASETS=""
declare -A PW_METHOD_ARGS=()

# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
pw_log() { echo "[pwopsd] $*" >&2; }
pw_die() {
  echo "[pwopsd] error: $*" >&2
  exit 1
}

# DRY_RUN must be 0 or 1: a typo such as DRY_RUN=true must not start a 4-GPU job.
pw_dry_run() {
  case "${DRY_RUN:-0}" in
    1) return 0 ;;
    0 | "") return 1 ;;
    *) pw_die "DRY_RUN=${DRY_RUN} is not valid: use DRY_RUN=1 to print the commands or DRY_RUN=0 to run them" ;;
  esac
}

# Print a command as one shell-quoted line.
pw_print_cmd() {
  local out
  printf -v out '%q ' "$@"
  echo "${out% }"
}

# Run a command (echoed to stderr first), or only print it under DRY_RUN=1.
pw_run() {
  if pw_dry_run; then
    pw_print_cmd "$@"
    return 0
  fi
  pw_log "\$ $(pw_print_cmd "$@")"
  local rc=0
  "$@" || rc=$?
  ((rc == 0)) || pw_die "exit ${rc} from: $(pw_print_cmd "$@")"
}

# Write a sentinel file containing the output of `date`, or print that command under DRY_RUN=1.
pw_write_sentinel() {
  if pw_dry_run; then
    echo "date > $(printf '%q' "$1")"
  else
    date >"$1"
  fi
}

# The WandB guard: runs before anything starts, in DRY_RUN mode too.
pw_require_wandb() {
  case "${WANDB_MODE:-}" in offline | disabled) return 0 ;; esac
  [[ -n "${WANDB_API_KEY:-}" ]] && return 0
  pw_die "WandB is not configured: set WANDB_API_KEY to log online, or WANDB_MODE=offline (sync later with \`wandb sync\`) or WANDB_MODE=disabled"
}

# Require a positive (or, with "nonneg", non-negative) decimal integer in variable $1.
pw_require_int() {
  local name=$1 value=$2 kind=${3:-positive}
  if [[ ! "$value" =~ ^[0-9]+$ ]] || { [[ "$kind" == positive ]] && ((10#$value == 0)); }; then
    pw_die "${name}=${value} is not a ${kind} integer"
  fi
}

# Environment defaults of the reference launchers; a value already set by the user wins. Caches live under
# $HOME/.cache.
pw_export_defaults() {
  : "${WANDB_PROJECT:=pwopsd}" "${HF_HUB_OFFLINE:=0}" "${TRANSFORMERS_OFFLINE:=0}"
  : "${HF_HOME:=$HOME/.cache/huggingface}"
  : "${HF_DATASETS_CACHE:=$HF_HOME/datasets}"
  : "${TRITON_CACHE_DIR:=$HOME/.cache/triton}" "${VLLM_CACHE_ROOT:=$HOME/.cache/vllm}"
  : "${TORCHINDUCTOR_CACHE_DIR:=$HOME/.cache/torchinductor}"
  : "${PYTORCH_CUDA_ALLOC_CONF:=expandable_segments:True}" "${VLLM_ENFORCE_EAGER:=0}"
  local var
  for var in WANDB_PROJECT HF_HUB_OFFLINE TRANSFORMERS_OFFLINE HF_HOME HF_DATASETS_CACHE TRITON_CACHE_DIR \
    VLLM_CACHE_ROOT TORCHINDUCTOR_CACHE_DIR PYTORCH_CUDA_ALLOC_CONF VLLM_ENFORCE_EAGER; do
    export "${var?}"
    if pw_dry_run; then echo "export ${var}=$(printf '%q' "${!var}")"; fi
  done
}

# PWOPSD_PYTHON_ENV: auto (the default) or none; anything else stops the run.
pw_check_python_env() {
  case "${PWOPSD_PYTHON_ENV:-auto}" in
    auto | none) ;;
    *) pw_die "PWOPSD_PYTHON_ENV=${PWOPSD_PYTHON_ENV} is not valid: use auto or none" ;;
  esac
}

# Activate the Python environment (see the header), once: a second call does nothing. DRY_RUN=1 only prints the
# activation. conda's activation scripts are not `set -u` clean.
PW_ENV_ACTIVE=0
pw_activate_env() {
  ((PW_ENV_ACTIVE == 0)) || return 0
  pw_check_python_env
  pw_dry_run || PW_ENV_ACTIVE=1
  [[ "${PWOPSD_PYTHON_ENV:-auto}" == auto ]] || return 0
  if command -v conda >/dev/null 2>&1; then
    if pw_dry_run; then
      echo "conda activate pwopsd"
      return 0
    fi
    local hook
    hook="$(conda shell.bash hook)"
    set +u
    eval "$hook"
    if conda activate pwopsd; then
      set -u
      return 0
    fi
    set -u
    pw_log "conda has no env 'pwopsd' (create it: conda env create -f environment.yml); trying the venv"
  fi
  local venv="${PWOPSD_VENV:-$REPO_ROOT/.venv}"
  if [[ -f "$venv/bin/activate" ]]; then
    if pw_dry_run; then
      echo "source $(printf '%q' "$venv/bin/activate")"
      return 0
    fi
    set +u
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    set -u
    return 0
  fi
  if pw_dry_run; then
    pw_log "no Python environment found (conda env 'pwopsd' or $venv); the real run would stop here"
    return 0
  fi
  pw_die "no Python environment: create the conda env 'pwopsd' (conda env create -f environment.yml), or point PWOPSD_VENV at a venv with vLLM, or set PWOPSD_PYTHON_ENV=none to use the active one"
}

# Read the registries once per run (a second call does nothing) into PW_METHODS, PW_DATASETS and PW_METHOD_ARGS.
# Which python: a real run activates its environment first (pw_activate_env) and uses that environment's `python`,
# the one that then runs the job. DRY_RUN=1 activates nothing, so it uses the venv's python when the venv exists
# (PWOPSD_PYTHON_ENV=auto; conda is never called), else the `python` on PATH. Its stdout and stderr are kept quiet
# unless it fails: then one "[pwopsd] error:" line.
pw_load_registries() {
  [[ -z "$PW_METHODS" ]] || return 0
  local venv="${PWOPSD_VENV:-$REPO_ROOT/.venv}" py out record
  pw_check_python_env
  pw_dry_run || pw_activate_env
  if pw_dry_run && [[ "${PWOPSD_PYTHON_ENV:-auto}" == auto && -x "$venv/bin/python" ]]; then
    py="$venv/bin/python"
  else
    py="$(command -v python)" ||
      pw_die "no python on PATH to read the method and benchmark lists with: create the venv (bash launchers/setup_venv.sh) or the conda env 'pwopsd' (conda env create -f environment.yml)"
  fi
  # Run from the repository root: `python -m` imports from the working directory first.
  out="$(cd "$REPO_ROOT" && "$py" -m pwopsd launcher-config 2>&1)" ||
    pw_die "${py} cannot read the method and benchmark lists (${out##*$'\n'}): install the package into that environment (bash launchers/setup_venv.sh, or pip install -e . in the conda env 'pwopsd')"
  local -a fields
  while IFS=$'\t' read -r -a fields; do
    case "${fields[0]:-}" in
      methods) PW_METHODS="${fields[*]:1}" ;;
      benchmarks) PW_DATASETS="${fields[*]:1}" ;;
      method-args) printf -v record '%s\t' "${fields[@]:2}" && PW_METHOD_ARGS[${fields[1]}]="${record%$'\t'}" ;;
      *) ;; # a warning the interpreter printed: not a record
    esac
  done <<<"$out"
  [[ -n "$PW_METHODS" && -n "$PW_DATASETS" ]] || pw_die "${py} -m pwopsd launcher-config printed no method or benchmark list"
}

# True when the folder holds at least one non-empty *.safetensors file.
pw_has_weights() {
  local f
  for f in "$1"/*.safetensors; do
    if [[ -s "$f" ]]; then return 0; fi
  done
  return 1
}

# A merged model is valid with config.json, >= 1 non-empty *.safetensors and a tokenizer file (the reference's check).
# Stricter in one way: when a shard index exists, every shard it names must exist and be non-empty (a merge killed
# between shards fails).
pw_merged_is_valid() {
  local dir=$1 shard
  [[ -f "$dir/config.json" ]] || return 1
  pw_has_weights "$dir" || return 1
  [[ -f "$dir/tokenizer.json" || -f "$dir/tokenizer.model" || -f "$dir/tokenizer_config.json" ]] || return 1
  if [[ -f "$dir/model.safetensors.index.json" ]]; then
    while read -r shard; do
      [[ -s "$dir/${shard//\"/}" ]] || return 1
    done < <(grep -o '"[^"/]*\.safetensors"' "$dir/model.safetensors.index.json" | sort -u)
  fi
  return 0
}

# True when folder $1 holds a checkpoint-* entry (the folder name is matched literally, never as a pattern).
pw_has_checkpoints() {
  local f
  for f in "$1"/checkpoint-*; do
    if [[ -e "$f" ]]; then return 0; fi
  done
  return 1
}

# A PEFT adapter folder written by save_pretrained. A checkpoint whose save was interrupted (the trainer's
# .pwopsd_saving marker without .pwopsd_complete) does not count: training runs again and resumes before it.
pw_adapter_exists() {
  [[ -f "$1/adapter_config.json" && -s "$1/adapter_model.safetensors" ]] || return 1
  [[ ! -e "$1/.pwopsd_saving" || -e "$1/.pwopsd_complete" ]]
}

# Checkpoints to merge, into PW_CKPTS: EVAL_CHECKPOINTS (a sweep, e.g. "25 50 75 100 125 150"), or the single
# EVAL_CHECKPOINT when it is unset or empty. Each must be saved: a multiple of PW_SAVE_STEPS or MAX_STEPS, <= MAX_STEPS.
# The list is split with `read` (no globbing): a `*` is refused, never expanded.
PW_CKPTS=()
pw_parse_checkpoints() {
  local eval_ckpt=$1 max_steps=$2 raw="${EVAL_CHECKPOINTS:-}" token n
  local -a tokens=()
  PW_CKPTS=()
  if [[ -z "${raw//[[:space:]]/}" ]]; then
    PW_CKPTS=("$eval_ckpt")
    return 0
  fi
  read -r -a tokens <<<"$raw"
  for token in "${tokens[@]}"; do
    if [[ ! "$token" =~ ^[0-9]+$ ]] || ((10#$token == 0)); then
      pw_die "EVAL_CHECKPOINTS='${raw}': '${token}' is not a positive integer (separate the steps with spaces, e.g. EVAL_CHECKPOINTS=\"25 50 100\")"
    fi
    n=$((10#$token))
    ((n <= max_steps)) || pw_die "EVAL_CHECKPOINTS='${raw}': ${n} is beyond MAX_STEPS=${max_steps}: no such checkpoint will exist"
    ((n % PW_SAVE_STEPS == 0 || n == max_steps)) ||
      pw_die "EVAL_CHECKPOINTS='${raw}': ${n} is not saved: checkpoints are every ${PW_SAVE_STEPS} steps and at MAX_STEPS=${max_steps}"
    [[ " ${PW_CKPTS[*]} " != *" ${n} "* ]] || pw_die "EVAL_CHECKPOINTS='${raw}' lists ${n} twice"
    PW_CKPTS+=("$n")
  done
}

# The run name of checkpoint $2 of run $1: the protocol's checkpoint $3 (EVAL_CHECKPOINT) keeps the run's own name,
# the others of a sweep are {NAME}_ckpt{N} (merged into {NAME}_ckpt{N}_merged, evaluated as run_eval.sh {NAME}_ckpt{N}).
pw_ckpt_name() {
  if (($2 == $3)); then echo "$1"; else echo "$1_ckpt$2"; fi
}

# ---------------------------------------------------------------------------------------------------------------
# The training job: train → merge checkpoint-${EVAL_CHECKPOINT} (or each of EVAL_CHECKPOINTS) → validate → sentinels
# (docs/architecture.md#training-launchers).
# Environment overrides: MODEL, NUM_GPUS (total processes), OUTPUT_ROOT, MAX_STEPS, EVAL_CHECKPOINT, EVAL_CHECKPOINTS,
# RESUME; multi-node: ACCELERATE_CONFIG, NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT.
# A merge only ever writes a folder that does not exist: a valid merged folder is kept (skip), an invalid one is
# deleted first, so code/merge_lora.py never needs --overwrite here.
# ---------------------------------------------------------------------------------------------------------------
pw_train_and_merge() {
  local run_tag=$1 method=$2
  pw_require_wandb
  pw_dry_run || true # validates DRY_RUN before anything else
  [[ -n "${PW_MODEL_ID[$run_tag]+x}" ]] || pw_die "unknown run tag '${run_tag}': expected one of ${PW_RUN_TAGS}"
  pw_load_registries
  [[ -n "${PW_METHOD_ARGS[$method]+x}" ]] || pw_die "unknown method '${method}': expected one of ${PW_METHODS}"

  local name="${run_tag}_${method}"
  local model="${MODEL:-${PW_MODEL_ID[$run_tag]}}"
  local num_gpus="${NUM_GPUS:-4}" max_steps="${MAX_STEPS:-150}" eval_ckpt="${EVAL_CHECKPOINT:-100}"
  local output_root="${OUTPUT_ROOT:-outputs}"
  local accel_config="${ACCELERATE_CONFIG:-code/accelerate_4gpu.yaml}"
  local num_machines="${NUM_MACHINES:-1}" machine_rank="${MACHINE_RANK:-0}"
  pw_require_int NUM_GPUS "$num_gpus"
  pw_require_int MAX_STEPS "$max_steps"
  pw_require_int EVAL_CHECKPOINT "$eval_ckpt"
  pw_require_int NUM_MACHINES "$num_machines"
  pw_require_int MACHINE_RANK "$machine_rank" nonneg
  ((eval_ckpt <= max_steps)) || pw_die "EVAL_CHECKPOINT=${eval_ckpt} is beyond MAX_STEPS=${max_steps}: no such checkpoint will exist"
  ((eval_ckpt % PW_SAVE_STEPS == 0 || eval_ckpt == max_steps)) ||
    pw_die "EVAL_CHECKPOINT=${eval_ckpt} is not saved: checkpoints are every ${PW_SAVE_STEPS} steps and at MAX_STEPS"
  pw_parse_checkpoints "$eval_ckpt" "$max_steps"
  local resume="${RESUME:-1}"
  [[ "$resume" == 0 || "$resume" == 1 ]] || pw_die "RESUME=${resume} is not valid: use 1 (resume an interrupted run, the default) or 0 (start over)"
  ((machine_rank < num_machines)) || pw_die "MACHINE_RANK=${machine_rank} must be below NUM_MACHINES=${num_machines}"

  # Batch split: keep 32 prompts per step on any GPU count; the per-device batch only shrinks when
  # NUM_GPUS × per-device batch alone would exceed 32.
  local per_device="${PW_PER_DEVICE_BS[$run_tag]}" grad_accum
  ((PW_GLOBAL_BATCH % num_gpus == 0)) ||
    pw_die "NUM_GPUS=${num_gpus} cannot split ${PW_GLOBAL_BATCH} prompts per step evenly: use 1, 2, 4, 8, 16 or 32"
  ((per_device * num_gpus <= PW_GLOBAL_BATCH)) || per_device=$((PW_GLOBAL_BATCH / num_gpus))
  grad_accum=$((PW_GLOBAL_BATCH / (num_gpus * per_device)))

  local port="${MAIN_PROCESS_PORT:-}"
  if [[ -z "$port" ]]; then
    # Every node of a multi-node job must agree on the port, so a random one is single-node only.
    if ((num_machines > 1)); then port=29500; else port=$((29500 + RANDOM % 200)); fi
  fi
  pw_require_int MAIN_PROCESS_PORT "$port"
  local accel_args=(--config_file "$accel_config" --num_processes "$num_gpus")
  if ((num_machines > 1)); then
    [[ -n "${MAIN_PROCESS_IP:-}" ]] || pw_die "NUM_MACHINES=${num_machines} needs MAIN_PROCESS_IP (the address of machine rank 0)"
    accel_args+=(--num_machines "$num_machines" --machine_rank "$machine_rank" --main_process_ip "$MAIN_PROCESS_IP")
  fi
  accel_args+=(--gradient_accumulation_steps "$grad_accum" --main_process_port "$port")

  local ckpt_list
  printf -v ckpt_list 'checkpoint-%s ' "${PW_CKPTS[@]}"
  ckpt_list=${ckpt_list% }
  pw_log "${name}: ${model}, ${num_gpus} GPU(s) × ${per_device} per device × GA ${grad_accum} = ${PW_GLOBAL_BATCH} prompts/step, ${max_steps} steps, merge ${ckpt_list}"
  if pw_dry_run; then pw_print_cmd cd "$REPO_ROOT"; fi
  cd "$REPO_ROOT"
  pw_export_defaults
  pw_activate_env

  local method_args=()
  IFS=$'\t' read -r -a method_args <<<"${PW_METHOD_ARGS[$method]}"
  local output_dir="${output_root}/${name}"
  local train_args=(
    --model_name_or_path "$model" --method "$method"
    --per_device_train_batch_size "$per_device" --gradient_accumulation_steps "$grad_accum"
    --learning_rate 5e-6 --max_grad_norm 0.1
    --gradient_checkpointing --num_train_epochs 30 --max_steps "$max_steps" --save_steps "$PW_SAVE_STEPS" --logging_steps 2
    --max_completion_length 1024 --max_length 20000
    --attn_implementation sdpa --torch_dtype bfloat16
    --beta 0
    --use_vllm --vllm_mode colocate --vllm_tensor_parallel_size 1 --vllm_gpu_memory_utilization "${PW_VLLM_MEM[$run_tag]}"
    --use_peft --lora_r 64 --lora_alpha 128 --lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    --temperature 1.1 --top_p 0.95 --top_k 20 --lmbda 1
    --fixed_teacher --jsd_token_clip 0.05
    "${method_args[@]}"
    --wandb_project "$WANDB_PROJECT" --output_dir "$output_dir" --run_config "$name"
  )

  # Skip logic, per checkpoint: a valid merged folder is kept (only its sentinels are rewritten), an invalid one is
  # deleted. With every merged folder valid, training and merges are done.
  local n label merged ckpt
  local -a todo=()
  for n in "${PW_CKPTS[@]}"; do
    label="$(pw_ckpt_name "$name" "$n" "$eval_ckpt")"
    merged="${output_root}/${label}_merged"
    if [[ -d "$merged" ]]; then
      if pw_merged_is_valid "$merged"; then
        pw_log "skip: ${merged} is a valid merged model; only the sentinels are rewritten (delete it to redo the run)"
        continue
      fi
      pw_log "${merged} exists but is not a valid merged model: deleting it"
      pw_run rm -rf -- "$merged"
    fi
    todo+=("$n")
  done
  if ((${#todo[@]} == 0)); then
    ((machine_rank == 0)) || return 0
    for n in "${PW_CKPTS[@]}"; do
      label="$(pw_ckpt_name "$name" "$n" "$eval_ckpt")"
      pw_write_sentinel "${output_root}/${label}_merged/.complete"
      pw_write_sentinel "${output_root}/.${label}_ready_for_eval"
    done
    return 0
  fi

  # A finished training run (final adapter + every checkpoint still to merge) is not repeated: only merges are redone.
  local trained=1 todo_list
  pw_adapter_exists "$output_dir" || trained=0
  for n in "${todo[@]}"; do pw_adapter_exists "${output_dir}/checkpoint-${n}" || trained=0; done
  printf -v todo_list 'checkpoint-%s ' "${todo[@]}"
  if ((trained)); then
    pw_log "skip training: ${output_dir} holds the final adapter and ${todo_list% } (delete it to retrain)"
  else
    if ! pw_dry_run; then
      command -v accelerate >/dev/null || pw_die "accelerate is not on PATH: activate the conda env 'pwopsd' (environment.yml) or set PWOPSD_VENV"
      [[ -f "$accel_config" ]] || pw_die "accelerate config ${accel_config} not found (ACCELERATE_CONFIG is relative to ${REPO_ROOT})"
      mkdir -p "$output_root"
    fi
    # An interrupted run resumes from its last checkpoint (optimizer, scheduler and RNG state) unless RESUME=0.
    if pw_has_checkpoints "$output_dir" && [[ "$resume" == 1 ]]; then
      pw_log "resuming from the last checkpoint in ${output_dir} (RESUME=0 starts over)"
      train_args+=(--resume_from_checkpoint last)
    fi
    pw_run accelerate launch "${accel_args[@]}" code/ea_opsd_train.py "${train_args[@]}"
  fi

  if ((machine_rank != 0)); then
    pw_log "machine rank ${machine_rank}: training done; machine rank 0 merges and writes the sentinels"
    return 0
  fi
  local merged_list=""
  for n in "${PW_CKPTS[@]}"; do
    label="$(pw_ckpt_name "$name" "$n" "$eval_ckpt")"
    merged="${output_root}/${label}_merged"
    ckpt="${output_dir}/checkpoint-${n}"
    merged_list+="${merged_list:+ }${merged}"
    if [[ " ${todo[*]} " == *" ${n} "* ]]; then
      pw_dry_run || pw_adapter_exists "$ckpt" || pw_die "${ckpt} has no adapter (adapter_config.json + adapter_model.safetensors): training did not save step ${n}"
      pw_run python code/merge_lora.py "$model" "$ckpt" "$merged"
      if ! pw_dry_run; then
        pw_merged_is_valid "$merged" || pw_die "${merged} is not a valid merged model after the merge (needs config.json, non-empty *.safetensors, a tokenizer file)"
      fi
    fi
    pw_write_sentinel "${merged}/.complete"
    pw_write_sentinel "${output_root}/.${label}_ready_for_eval"
  done
  if pw_dry_run; then pw_log "dry run: nothing was run"; else pw_log "${name}: ready for eval (${merged_list})"; fi
}
