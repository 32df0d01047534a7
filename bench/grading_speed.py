"""Grading + Maj@N clustering speed: pwopsd's MathGrader vs a reference-style implementation, in the same run.

`python bench/grading_speed.py [--quick] [--samples 12] [--seed 0] [--workers W] [--repeat R]`

The set: every MATH-500 gold (the first 100 with --quick) with `--samples` generations each, drawn with a fixed seed
from equivalent rewrites of the gold, wrong answers and outputs without a box. Both sides extract the last box, grade
every sample against the gold and take the clustered majority vote (docs/evaluation.md: extraction, grading, Maj@N
clustering):

* baseline: serial, in the main thread, one `parse` + `parse` + `verify(..., timeout_seconds=5)` per comparison,
  exactly as the reference's `grade_answer` and clustering loop; no cache of its own.
* ours: `pwopsd.evaluation.workers.MathGrader` (worker pool with a hard per-call limit, cache by (prediction, gold),
  each string parsed once per worker, problems in parallel).

What is timed is the grading phase of an evaluation, both sides starting from the same state: math-verify imported
and the same generic warm-up done (`grade.WARM_UP_PAIRS`, no benchmark answer among them). The baseline does
both in this process before its clock; ours' pool does them at start-up (`MathGrader.start()`: interpreter, imports,
warm-up, forks), before its clock, because `evaluate_math.py` starts the pool before generating and it warms up
meanwhile. Both start-ups are measured and reported (`*_startup_s`; `speedup_incl_startup` compares start-up +
grading). Each `--repeat` uses a fresh pool, while the baseline keeps its process, so its later repetitions run with
math-verify's and sympy's caches warm (which only helps the baseline).
`*_cpu_s` count every process of a side (ours: the parent and its workers while grading); `cpu_ratio` moves less
than the wall-time `speedup` when other jobs load the machine. `ours_busiest_worker_cpu_s` is the CPU time of the
busiest worker: about what ours' wall time would be with a free core per worker.

Last line: one JSON object {"baseline_s", "ours_s", "speedup", "identical", ...}; `identical` means the same
per-problem correct counts and majority outcomes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import sys
import time

from pwopsd.evaluation.extract import extract_boxed_answer
from pwopsd.evaluation.grade import warm_up
from pwopsd.evaluation.workers import MathGrader, default_num_workers
from pwopsd.io import REPO_ROOT

# ----------------------------------------------------------------------------------------------------------------------
# The reference-style implementation of grading and voting, written from the reference's rules independently of
# pwopsd.evaluation.


BASELINE_CALLS = [0]  # grade_answer calls made by the baseline


def reference_grade_answer(pred: str | None, gt: str) -> bool:
    from math_verify import parse, verify

    BASELINE_CALLS[0] += 1
    if pred is None:
        return False
    pred, gt = str(pred), str(gt)
    try:
        pred_w = pred if "$" in pred else f"${pred}$"
        gt_w = gt if "$" in gt else f"${gt}$"
        gold = parse(gt_w, fallback_mode="no_fallback")
        answer = parse(pred_w, fallback_mode="no_fallback")
        return verify(gold, answer, timeout_seconds=5)
    except Exception:
        return pred.replace("$", "").replace(" ", "").lower() == gt.replace("$", "").replace(" ", "").lower()


def reference_problem(generations: list[str], gt: str) -> tuple[int, bool]:
    """(number correct, majority correct) for one problem, the reference way."""
    preds = [extract_boxed_answer(g) for g in generations]
    num_correct = sum(reference_grade_answer(p, gt) for p in preds)
    clusters: list[tuple[str, list[str | None]]] = []  # (rep or "INVALID", members), creation order
    invalid_index = None
    for p in preds:
        if p is None:
            if invalid_index is None:
                invalid_index = len(clusters)
                clusters.append(("INVALID", []))
            clusters[invalid_index][1].append(p)
            continue
        placed = False
        for idx, (rep, members) in enumerate(clusters):
            if idx == invalid_index:
                continue
            if reference_grade_answer(p, rep) or reference_grade_answer(rep, p):
                members.append(p)
                placed = True
                break
        if not placed:
            clusters.append((p, [p]))
    ranked = sorted(range(len(clusters)), key=lambda i: len(clusters[i][1]), reverse=True)
    top = ranked[0]
    majority = top != invalid_index and reference_grade_answer(clusters[top][0], gt)
    return num_correct, bool(majority)


# ----------------------------------------------------------------------------------------------------------------------
# The synthetic set


def equivalent_rewrites(gold: str) -> list[str]:
    """Forms a model may write for the same answer (some are not equivalent under the grader: that is realistic)."""
    forms = {gold, gold.replace("\\dfrac", "\\frac"), re.sub(r"\s+", "", gold), re.sub(r",\s*", ", ", gold)}
    if re.fullmatch(r"-?\d+", gold):
        forms |= {f"{gold}.0", f"x = {gold}", f"{gold}\\text{{ units}}"}
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(\d+)\}", gold)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        forms |= {f"{num}/{den}", f"\\dfrac{{{num}}}{{{den}}}", f"{num / den:.6f}"}
    return sorted(forms)


def near_miss(gold: str, rng: random.Random) -> str:
    """A wrong answer close to the gold: one digit changed, or a sign flipped, or a term added."""
    digits = [i for i, ch in enumerate(gold) if ch.isdigit()]
    if digits:
        i = rng.choice(digits)
        return gold[:i] + rng.choice([d for d in "0123456789" if d != gold[i]]) + gold[i + 1 :]
    return gold[1:] if gold.startswith("-") else rng.choice([f"-{gold}", f"{gold}+1", f"2{gold}"])


def build_set(golds: list[str], samples: int, seed: int) -> list[list[str]]:
    """`samples` generations per gold, drawn with a fixed seed.

    Real samples concentrate on few distinct answers, so per problem: an accuracy p ~ Beta(4, 1.5) (mean 0.73) and
    two wrong answers drawn with weights 0.7 / 0.3, each a near miss of the gold (`near_miss`) or, one time in five,
    the gold of another problem. Per sample: no box with probability 0.08 (no `\\boxed`, a bare `\\boxed 5`, or an
    unbalanced `\\boxed{1`); else right with probability p (the gold as written 70 %, else one of
    `equivalent_rewrites`); else one of the two wrong answers.
    """
    rng = random.Random(seed)
    generations = []
    for i, gold in enumerate(golds):
        accuracy = rng.betavariate(4, 1.5)
        rewrites = equivalent_rewrites(gold)
        others = golds[:i] + golds[i + 1 :]
        wrong = [rng.choice(others) if rng.random() < 0.2 else near_miss(gold, rng) for _ in range(2)]
        gens = []
        for _ in range(samples):
            if rng.random() < 0.08:
                gens.append("I ran out of tokens before the end" + rng.choice(["", " \\boxed 5", " so \\boxed{1"]))
            elif rng.random() < accuracy:
                answer = gold if rng.random() < 0.7 else rng.choice(rewrites)
                gens.append(f"Thinking... so the answer is \\boxed{{{answer}}}.")
            else:
                answer = wrong[0] if rng.random() < 0.7 else wrong[1]
                gens.append(f"Let me compute. Hence \\boxed{{{answer}}}")
        generations.append(gens)
    return generations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 problems instead of 500")
    parser.add_argument("--samples", type=int, default=12, help="generations per problem (N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="grading workers (default: usable cores, max 8)")
    parser.add_argument("--repeat", type=int, default=1, help="time each side this many times, keep the fastest")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    rows = [json.loads(line) for line in (REPO_ROOT / "data" / "math500.jsonl").open(encoding="utf-8")]
    golds = [str(r["answer"]) for r in rows][: 100 if args.quick else None]
    generations = build_set(golds, args.samples, args.seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    start = time.perf_counter()
    import math_verify  # noqa: F401  (both sides' library, imported before either clock starts)

    warm_up(grade=reference_grade_answer)  # the warm-up ours' pool does at start-up, given to the baseline too
    baseline_startup_s = time.perf_counter() - start
    workers = args.workers or default_num_workers()
    baseline_s = ours_s = math.inf
    for _ in range(args.repeat):  # alternate the two sides; keep each side's fastest run
        BASELINE_CALLS[0] = 0
        start, cpu = time.perf_counter(), time.process_time()
        baseline = [reference_problem(gens, gt) for gens, gt in zip(generations, golds)]
        elapsed = time.perf_counter() - start
        if elapsed < baseline_s:
            baseline_s, baseline_cpu_s = elapsed, time.process_time() - cpu

        start = time.perf_counter()
        with MathGrader("reference", num_workers=workers).start() as grader:  # the pool, started and warmed up
            startup_s = time.perf_counter() - start
            start, cpu, worker_cpu = time.perf_counter(), time.process_time(), grader.worker_cpu_s
            problems = []
            for gens, gt in zip(generations, golds):
                preds = [extract_boxed_answer(g) for g in gens]
                problems.append((preds, [p is not None for p in preds], gt))
            graded = grader.grade_problems(problems, progress=False)
            elapsed = time.perf_counter() - start
            if elapsed < ours_s:
                ours_s, ours_startup_s = elapsed, startup_s
                ours_cpu_s = time.process_time() - cpu + grader.worker_cpu_s - worker_cpu
                busiest_s = grader.busiest_worker_cpu_s
    ours = [(sum(g.correct), g.majority.correct) for g in graded]

    mismatches = [i for i, (a, b) in enumerate(zip(baseline, ours)) if a != b]
    for i in mismatches[:5]:
        logging.warning("problem %d differs: baseline %s, ours %s, gold %r", i, baseline[i], ours[i], golds[i])
    result = {
        "bench": "grading_speed",
        "problems": len(golds),
        "samples": args.samples,
        "workers": workers,
        "baseline_s": round(baseline_s, 3),
        "ours_s": round(ours_s, 3),
        "speedup": round(baseline_s / ours_s, 2),
        "identical": not mismatches,
        "baseline_cpu_s": round(baseline_cpu_s, 3),
        "ours_cpu_s": round(ours_cpu_s, 3),
        "cpu_ratio": round(baseline_cpu_s / ours_cpu_s, 2),
        "ours_busiest_worker_cpu_s": round(busiest_s, 3),
        "ours_startup_s": round(ours_startup_s, 3),
        "baseline_startup_s": round(baseline_startup_s, 3),
        "speedup_incl_startup": round((baseline_startup_s + baseline_s) / (ours_startup_s + ours_s), 2),
        "load_avg_1min": None if load is None else round(load, 2),
        "mismatches": len(mismatches),
        "timeouts": grader.timeouts,
        "baseline_grade_calls": BASELINE_CALLS[0],
        "ours_distinct_pairs": grader.cache_size,
        "avg_at_n_pct": round(100 * sum(c for c, _ in ours) / (len(golds) * args.samples), 2),
        "maj_at_n_pct": round(100 * sum(m for _, m in ours) / len(golds), 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
