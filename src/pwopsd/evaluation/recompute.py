"""Recompute Maj@N of saved evaluation files with the clustered rule (docs/evaluation.md#recomputing-majn).

    python eval/recompute_majn.py [PATTERN] [--apply] [--grader {reference,strict}]

PATTERN (default `eval_results/qwen3_4b_base_*.json`; a relative pattern is taken from the repository root) selects
result files. Every file is checked first (readable JSON object, a non-empty `results` list, each with a ground truth
and a non-empty `generations` list of objects with `predicted_answer`, numeric old values); a bad file gets one line
`recompute_majn.py: error: FILE: what is wrong`, and the others are still processed. For each good file, Maj@N is
recomputed from `results[*].generations[*]` with `vote.majority_vote` over the strings the reference stores
(`vote.cluster_inputs`: an empty box, saved as `""` by older pwopsd files, votes as `[No boxed answer found]`, so all
empty boxes of a problem form one cluster) plus an INVALID cluster (docs/evaluation.md#majn-clustering), and the old
and new percentages are printed. Nothing changes without `--apply`. With it, once every file has been graded, each
good file gets the new `majority_vote_at_n` / `majority_vote_at_n_pct`, the previous values under `*_old_buggy` (kept
from the first --apply, so re-running is safe), and `majority_vote_at_n_method` (atomic writes); the list of
{file, old_pct, new_pct} goes to `eval_results_summary/majn_recomputed_summary.json`. Exit status 1 if a file was bad
(or none matches), 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pwopsd.evaluation.extract import NO_BOXED_ANSWER
from pwopsd.evaluation.grade import GRADERS
from pwopsd.evaluation.metrics import pct
from pwopsd.evaluation.vote import cluster_inputs
from pwopsd.evaluation.workers import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, MathGrader
from pwopsd.io import REPO_ROOT, ArgumentParser, UserError, atomic_write_json, first_line, run_main

PROG = "recompute_majn.py"
DEFAULT_PATTERN = "eval_results/qwen3_4b_base_*.json"
SUMMARY_FILE = REPO_ROOT / "eval_results_summary" / "majn_recomputed_summary.json"
METHOD = "cluster-all-with-INVALID-marker (recomputed offline)"
GROUND_TRUTH_KEYS = ("ground_truth", "answer", "gt_answer")
OLD_VALUE_KEYS = (
    "majority_vote_at_n",
    "majority_vote_at_n_pct",
    "majority_vote_at_n_old_buggy",
    "majority_vote_at_n_pct_old_buggy",
)


class BadFile(Exception):
    """A file that is not a readable evaluation result (or, with --apply, cannot be rewritten)."""


@dataclass
class Saved:
    """The parts of a result file that Maj@N needs: per problem (stored predictions, formatted flags, ground truth).

    The predictions are already the strings the vote clusters (`vote.cluster_inputs`); `empty_boxes` counts the
    formatted samples saved as `""` (older pwopsd files), which now vote as the no-box marker.
    """

    path: Path
    data: dict[str, Any]
    problems: list[tuple[list[str], list[bool], str]]
    empty_boxes: int = 0


def is_formatted(sample: dict[str, Any]) -> bool:
    """The saved `formatted` flag; without it, a non-empty prediction other than the no-box marker."""
    if "formatted" in sample:
        return bool(sample["formatted"])
    prediction = sample.get("predicted_answer")
    return bool(prediction) and prediction != NO_BOXED_ANSWER


def _is_number(value: Any) -> bool:
    """A JSON number that a percentage or count can be: not a boolean, not NaN or infinite."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _show(value: Any) -> str:
    """A stored value as JSON, cut short: error lines stay one readable line."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_generations(where: str, samples: Any) -> None:
    """BadFile unless `samples` is a non-empty list of objects, each with a string (or null) `predicted_answer`."""
    if not isinstance(samples, list):
        raise BadFile(f"{where} has no 'generations' list")
    if not samples:
        raise BadFile(f"{where}.generations is empty: no sample to vote on")
    for j, sample in enumerate(samples):
        at = f"{where}.generations[{j}]"
        if not isinstance(sample, dict):
            raise BadFile(f"{at} is {_show(sample)}, not an object")
        if "predicted_answer" not in sample:
            raise BadFile(f"{at} has no 'predicted_answer'")
        prediction = sample["predicted_answer"]
        if prediction is not None and not isinstance(prediction, str):
            raise BadFile(f"{at}.predicted_answer is {_show(prediction)}, not a string")
        if "formatted" in sample and not isinstance(sample["formatted"], bool):
            raise BadFile(f"{at}.formatted is {_show(sample['formatted'])}, not true or false")


def read_result_file(path: Path, writable: bool = False) -> Saved:
    """Load and check a whole result file before anything is graded or written; BadFile names the first problem.

    `writable`: also check that the file can be replaced (its folder takes the temporary file of the atomic write).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise BadFile(f"cannot read it ({type(e).__name__}: {first_line(e)})") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BadFile(f"not valid JSON ({type(e).__name__}: {first_line(e)})") from e
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise BadFile("not an evaluation result (no 'results' list)")
    if not data["results"]:
        raise BadFile("'results' is empty: no problem to vote on")
    for key in OLD_VALUE_KEYS:
        if data.get(key) is not None and not _is_number(data[key]):
            raise BadFile(f"{key} is {_show(data[key])}, not a number (correct it, or remove the key)")
    problems = []
    empty_boxes = 0
    for i, result in enumerate(data["results"]):
        where = f"results[{i}]"
        if not isinstance(result, dict):
            raise BadFile(f"{where} is {_show(result)}, not an object")
        key = next((k for k in GROUND_TRUTH_KEYS if k in result), None)
        if key is None:
            raise BadFile(f"{where} has none of {', '.join(GROUND_TRUTH_KEYS)}")
        gold = result[key]
        if not isinstance(gold, str) and not _is_number(gold):
            raise BadFile(f"{where}.{key} is {_show(gold)}, not a string or number")
        _check_generations(where, result.get("generations"))
        samples = result["generations"]
        formatted = [is_formatted(s) for s in samples]
        predictions = [s["predicted_answer"] for s in samples]
        empty_boxes += sum(ok and not p for p, ok in zip(predictions, formatted))
        stored, flags = cluster_inputs(predictions, formatted)
        problems.append((stored, flags, str(gold)))
    if writable and not os.access(path.parent, os.W_OK | os.X_OK):
        raise BadFile("its folder is not writable, so --apply cannot replace it (fix the permissions, or drop --apply)")
    return Saved(path, data, problems, empty_boxes)


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


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
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
    return parser


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if not (math.isfinite(args.grading_timeout) and 0 < args.grading_timeout <= MAX_TIMEOUT_S):
        raise UserError(f"--grading_timeout must be > 0 and <= {MAX_TIMEOUT_S:g} seconds, got {args.grading_timeout}")
    if args.grading_workers is not None and args.grading_workers < 1:
        raise UserError(f"--grading_workers must be >= 1, got {args.grading_workers}")
    if args.apply:  # checked before any result file is rewritten
        summary_file = args.summary_file.absolute()
        existing = next(p for p in (summary_file, *summary_file.parents) if p.exists() or p == p.parent)
        if existing == summary_file and summary_file.is_dir():
            raise UserError(f"--summary_file {args.summary_file} is a folder; give a file path (.json)")
        if existing != summary_file and not existing.is_dir():
            raise UserError(
                f"--summary_file {args.summary_file}: {existing} is a file, not a folder; give another path"
            )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    paths = resolve_pattern(args.pattern)
    if not paths:
        print(f"{PROG}: error: no file matches {args.pattern}", file=sys.stderr)
        return 1
    # 1. Check every file before grading or writing any: a bad file cannot stop the run half-way.
    good: list[Saved] = []
    failed = 0
    for path in paths:
        try:
            good.append(read_result_file(path, writable=args.apply))
        except BadFile as e:
            print(f"{PROG}: error: {display(path)}: {e}", file=sys.stderr)
            failed += 1
    # 2. Grade every good file, then 3. write (atomically) only once all are graded.
    recomputed: list[tuple[Saved, int, float]] = []
    if good:
        with MathGrader(args.grader, args.grading_timeout, args.grading_workers) as grader:
            for saved in good:
                graded = grader.grade_problems(saved.problems, progress=False)
                new_count = sum(g.majority.correct for g in graded)
                new_pct = pct(new_count, len(graded))
                old_pct = saved.data.get("majority_vote_at_n_pct")
                old = "n/a" if old_pct is None else f"{old_pct:.2f}"
                note = (
                    f'; {saved.empty_boxes} empty box(es) saved as "" voted as {NO_BOXED_ANSWER}'
                    if saved.empty_boxes
                    else ""
                )
                print(f"{display(saved.path)}: Maj@N {old} -> {new_pct:.2f} ({new_count}/{len(graded)}{note})")
                recomputed.append((saved, new_count, new_pct))
    summary = []
    for saved, new_count, new_pct in recomputed:
        old_pct = saved.data.get("majority_vote_at_n_pct")
        if args.apply:
            try:
                apply(saved, new_count, new_pct)
            except OSError as e:
                print(f"{PROG}: error: {display(saved.path)}: cannot write it ({first_line(e)})", file=sys.stderr)
                failed += 1
                continue
        summary.append({"file": display(saved.path), "old_pct": old_pct, "new_pct": new_pct})
    summary_written = True
    if args.apply and summary:
        try:
            atomic_write_json(args.summary_file, summary)
            print(f"wrote {display(args.summary_file)}")
        except OSError as e:  # the result files are written already; only the list is missing
            print(
                f"{PROG}: error: --summary_file {args.summary_file}: cannot write it ({first_line(e)})", file=sys.stderr
            )
            summary_written = False
    if failed:
        print(f"{PROG}: {failed} of {len(paths)} file(s) could not be processed", file=sys.stderr)
    return 0 if summary_written and not failed else 1


def main(argv: list[str] | None = None) -> int:
    """`python eval/recompute_majn.py [PATTERN] [--apply] ...`; a bad flag is one line and exit status 2."""
    return run_main(lambda: _run(argv), PROG)


if __name__ == "__main__":
    sys.exit(main())
