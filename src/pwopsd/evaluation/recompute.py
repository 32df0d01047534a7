"""Recompute Maj@N of saved evaluation files with the clustered rule (docs/evaluation.md#recomputing-majn).

    python eval/recompute_majn.py [PATTERN] [--apply] [--grader {reference,strict}]

PATTERN (default `eval_results/qwen3_4b_base_*.json`; a relative pattern is taken from the repository root) selects
result files. For each, Maj@N is recomputed from `results[*].generations[*]` with `vote.majority_vote`
(math-equivalence clusters plus an INVALID cluster, docs/evaluation.md#majn-clustering) and the old and new
percentages are printed. Nothing changes without `--apply`. With it, each file gets the new `majority_vote_at_n` /
`majority_vote_at_n_pct`, the previous values under `*_old_buggy` (kept from the first --apply, so re-running is
safe), and `majority_vote_at_n_method`; the list of {file, old_pct, new_pct} goes to
`eval_results_summary/majn_recomputed_summary.json`. A file that cannot be read gets a one-line error, the others are
still processed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pwopsd.evaluation.extract import NO_BOXED_ANSWER
from pwopsd.evaluation.grade import GRADERS
from pwopsd.evaluation.metrics import pct
from pwopsd.evaluation.workers import DEFAULT_TIMEOUT_S, MathGrader
from pwopsd.io import REPO_ROOT, atomic_write_json

DEFAULT_PATTERN = "eval_results/qwen3_4b_base_*.json"
SUMMARY_FILE = REPO_ROOT / "eval_results_summary" / "majn_recomputed_summary.json"
METHOD = "cluster-all-with-INVALID-marker (recomputed offline)"
GROUND_TRUTH_KEYS = ("ground_truth", "answer", "gt_answer")


class BadFile(Exception):
    """A file that is not a readable evaluation result."""


@dataclass
class Saved:
    """The parts of a result file that Maj@N needs."""

    path: Path
    data: dict[str, Any]
    problems: list[tuple[list[str | None], list[bool], str]]


def is_formatted(sample: dict[str, Any]) -> bool:
    """The saved `formatted` flag; without it, a non-empty prediction other than the no-box marker."""
    if "formatted" in sample:
        return bool(sample["formatted"])
    prediction = sample.get("predicted_answer")
    return bool(prediction) and prediction != NO_BOXED_ANSWER


def read_result_file(path: Path) -> Saved:
    """Load a result file and extract (predictions, formatted, ground truth) per problem; BadFile if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadFile(f"not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise BadFile("not an evaluation result (no 'results' list)")
    problems = []
    for i, result in enumerate(data["results"]):
        if not isinstance(result, dict) or not isinstance(result.get("generations"), list):
            raise BadFile(f"results[{i}] has no 'generations' list")
        key = next((k for k in GROUND_TRUTH_KEYS if k in result), None)
        if key is None:
            raise BadFile(f"results[{i}] has none of {', '.join(GROUND_TRUTH_KEYS)}")
        samples = result["generations"]
        if not all(isinstance(s, dict) for s in samples):
            raise BadFile(f"results[{i}].generations holds a non-object")
        predictions = [None if s.get("predicted_answer") is None else str(s["predicted_answer"]) for s in samples]
        problems.append((predictions, [is_formatted(s) for s in samples], str(result[key])))
    return Saved(path, data, problems)


def resolve_pattern(pattern: str) -> list[Path]:
    """Files matching `pattern`, relative patterns taken from the repository root."""
    if not Path(pattern).is_absolute():
        pattern = str(REPO_ROOT / pattern)
    return [Path(p) for p in sorted(glob.glob(pattern))]


def display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def apply(saved: Saved, new_count: int, new_pct: float) -> None:
    """Write the recomputed Maj@N into the file, keeping the first pre-recompute values under `*_old_buggy`."""
    data = saved.data
    data.setdefault("majority_vote_at_n_old_buggy", data.get("majority_vote_at_n"))
    data.setdefault("majority_vote_at_n_pct_old_buggy", data.get("majority_vote_at_n_pct"))
    data["majority_vote_at_n"] = new_count
    data["majority_vote_at_n_pct"] = new_pct
    data["majority_vote_at_n_method"] = METHOD
    atomic_write_json(saved.path, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "pattern", nargs="?", default=DEFAULT_PATTERN, help=f"glob of result files (default {DEFAULT_PATTERN})"
    )
    parser.add_argument("--apply", action="store_true", help="write the new values back (default: only print)")
    parser.add_argument("--grader", choices=GRADERS, default="reference", help="grading rule (default reference)")
    parser.add_argument(
        "--grading_timeout", type=float, default=DEFAULT_TIMEOUT_S, help="hard limit per comparison (s)"
    )
    parser.add_argument("--grading_workers", type=int, default=None, help="grading processes (default: cores, max 8)")
    parser.add_argument("--summary_file", type=Path, default=SUMMARY_FILE, help=f"default {display(SUMMARY_FILE)}")
    args = parser.parse_args(argv)
    if args.grading_timeout <= 0:
        parser.error(f"--grading_timeout must be > 0, got {args.grading_timeout}")
    if args.grading_workers is not None and args.grading_workers < 1:
        parser.error(f"--grading_workers must be >= 1, got {args.grading_workers}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    paths = resolve_pattern(args.pattern)
    if not paths:
        print(f"recompute_majn.py: error: no file matches {args.pattern}", file=sys.stderr)
        return 1
    failed = 0
    summary = []
    with MathGrader(args.grader, args.grading_timeout, args.grading_workers) as grader:
        for path in paths:
            try:
                saved = read_result_file(path)
            except BadFile as e:
                print(f"recompute_majn.py: error: {display(path)}: {e}", file=sys.stderr)
                failed += 1
                continue
            graded = grader.grade_problems(saved.problems, progress=False)
            new_count = sum(g.majority.correct for g in graded)
            new_pct = pct(new_count, len(graded))
            old_pct = saved.data.get("majority_vote_at_n_pct")
            old = "n/a" if old_pct is None else f"{old_pct:.2f}"
            print(f"{display(path)}: Maj@N {old} -> {new_pct:.2f} ({new_count}/{len(graded)})")
            summary.append({"file": display(path), "old_pct": old_pct, "new_pct": new_pct})
            if args.apply:
                apply(saved, new_count, new_pct)
    if args.apply and summary:
        atomic_write_json(args.summary_file, summary)
        print(f"wrote {display(args.summary_file)}")
    if failed:
        print(f"recompute_majn.py: {failed} of {len(paths)} file(s) could not be processed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
