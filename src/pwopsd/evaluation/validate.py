"""Check that an evaluator result file holds the run that `launchers/run_eval.sh` asked for.

    python eval/validate_eval_result.py FILE --dataset D --base_model PATH [--seed S]

Exit 0 when the file is valid; otherwise exit 1 and print one line per problem found. A result is valid when it is
a JSON object (the result keys of docs/evaluation.md#output-json) with:
  dataset == D; val_n 12; max_new_tokens 38912; temperature 1.0; top_p 0.95; top_k -1; min_p 0; presence_penalty 0;
  enable_thinking true; the three *_pct keys present; num_problems the benchmark's count in
  `pwopsd.evaluation.benchmarks.BENCHMARKS` (500 for math500, 30 otherwise); base_model == PATH; seed == S when S is
  given. `run_eval.sh` evaluates with 12 samples, thinking on, 38,912 new tokens, temperature 1.0 and top-p 0.95
  (docs/architecture.md#evaluation-launcher).
Two checks go beyond the reference's validation and catch truncated or corrupt files: `results` holds exactly
`num_problems` entries and every *_pct value is a number in [0, 100]. A third keeps the paper's grading: the answers
were read with the boxed rule (`answer_format` "boxed", or absent as in files written before it was recorded); a file
evaluated with `--answer_format boxed_or_last_number` counts unboxed numbers as answers and is not the paper's run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from pwopsd.evaluation.benchmarks import BENCHMARKS

EXPECTED_SETTINGS: dict[str, Any] = {
    "val_n": 12,
    "max_new_tokens": 38912,
    "temperature": 1.0,
    "top_p": 0.95,
    "top_k": -1,
    "min_p": 0.0,
    "presence_penalty": 0.0,
}
NUM_PROBLEMS = {name: benchmark.num_problems for name, benchmark in BENCHMARKS.items()}
PCT_KEYS = ("pass_at_n_pct", "average_at_n_pct", "majority_vote_at_n_pct")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same_number(value: Any, expected: float) -> bool:
    return _is_number(value) and math.isclose(value, expected, rel_tol=0.0, abs_tol=1e-9)


def eval_result_problems(result: Any, dataset: str, base_model: str, seed: int | None = None) -> list[str]:
    """Return the reasons why `result` (a parsed result JSON) is not the requested run; empty when it is."""
    if not isinstance(result, dict):
        return [f"the top level is a {type(result).__name__}, not a JSON object"]
    problems = []
    if result.get("dataset") != dataset:
        problems.append(f"dataset is {result.get('dataset')!r}, expected {dataset!r}")
    for key, expected in EXPECTED_SETTINGS.items():
        if not _same_number(result.get(key), expected):
            problems.append(f"{key} is {result.get(key)!r}, expected {expected!r}")
    if result.get("enable_thinking") is not True:
        problems.append(f"enable_thinking is {result.get('enable_thinking')!r}, expected True")
    answer_format = result.get("answer_format", "boxed")  # absent: written before the key existed, boxed rule
    if answer_format != "boxed":
        problems.append(f"answer_format is {answer_format!r}, expected 'boxed' (the reference's rule)")
    for key in PCT_KEYS:
        if key not in result:
            problems.append(f"{key} is missing")
        elif not (_is_number(result[key]) and 0.0 <= result[key] <= 100.0):
            problems.append(f"{key} is {result[key]!r}, expected a percentage in [0, 100]")
    want_problems = NUM_PROBLEMS.get(dataset)
    if want_problems is None:
        problems.append(f"unknown dataset {dataset!r}: expected one of {', '.join(NUM_PROBLEMS)}")
    elif not (_is_number(result.get("num_problems")) and result["num_problems"] == want_problems):
        problems.append(f"num_problems is {result.get('num_problems')!r}, expected {want_problems} for {dataset}")
    elif not (isinstance(result.get("results"), list) and len(result["results"]) == want_problems):
        got = len(result["results"]) if isinstance(result.get("results"), list) else result.get("results")
        problems.append(f"results holds {got!r} entries, expected {want_problems}")
    got_model = result.get("base_model")
    if not (isinstance(got_model, str) and os.path.normpath(got_model) == os.path.normpath(base_model)):
        problems.append(f"base_model is {got_model!r}, expected {base_model!r}")
    if seed is not None and not (_is_number(result.get("seed")) and result["seed"] == seed):
        problems.append(f"seed is {result.get('seed')!r}, expected {seed}")
    return problems


def eval_file_problems(path: str | os.PathLike, dataset: str, base_model: str, seed: int | None = None) -> list[str]:
    """`eval_result_problems` for a file; an unreadable or non-JSON file is one problem, never an exception."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{path} does not exist"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{path} is not readable JSON ({exc})"]
    return eval_result_problems(result, dataset, base_model, seed)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="result JSON written by eval/evaluate_math.py")
    parser.add_argument("--dataset", required=True, choices=sorted(NUM_PROBLEMS))
    parser.add_argument("--base_model", required=True, help="the --base_model path the evaluator was given")
    parser.add_argument("--seed", type=_non_negative_int, default=None, help="the --seed it was given, if any")
    args = parser.parse_args(argv)
    problems = eval_file_problems(args.file, args.dataset, args.base_model, args.seed)
    for problem in problems:
        print(f"invalid result {args.file}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
