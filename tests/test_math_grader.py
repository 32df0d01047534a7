"""Extraction, grading, the clustered vote, the worker pool and the metrics, each against a naive implementation.

The naive implementations are written from the reference's rules (docs/evaluation.md: extraction, grading, Maj@N
clustering, metrics) and its grader pitfalls (docs/deviations.md#grader-pitfalls), independently of pwopsd's code.
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import DATA_DIR, REPO_ROOT, read_data
from hypothesis import given, settings
from hypothesis import strategies as st

from pwopsd.evaluation.extract import NO_BOXED_ANSWER, extract_boxed_answer, stored_answer
from pwopsd.evaluation.grade import grade_answer
from pwopsd.evaluation.metrics import aggregate_metrics, pass_at_k, pass_at_k_table, pass_at_k_values
from pwopsd.evaluation.vote import MajorityVote, cluster_inputs, grade_problem, majority_vote
from pwopsd.evaluation.workers import MathGrader

# ----------------------------------------------------------------------------------------------------------------------
# Naive implementations written from the reference's rules


def naive_extract(text: str) -> str | None:
    """Extraction (docs/evaluation.md#extraction): last `\\boxed`, brace matching, only `\\boxed{...}`, trimmed."""
    idx = text.rfind("\\boxed")
    if idx < 0:
        return None
    i, depth, right = idx, 0, None
    while i < len(text):
        if text[i] == "{":
            depth += 1
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                right = i
                break
        i += 1
    if right is None:
        return None
    span = text[idx : right + 1]
    if not span.startswith("\\boxed{"):
        return None
    return span[len("\\boxed{") : -1].strip()


def naive_grade(pred: str | None, gt: str) -> bool:
    """The reference's grading rule (docs/evaluation.md#grading), as the reference runs it.

    With math-verify's own (signal) time limits, in the main thread.
    """
    from math_verify import parse, verify

    if pred is None:
        return False
    pred, gt = str(pred), str(gt)
    try:
        p = pred if "$" in pred else f"${pred}$"
        g = gt if "$" in gt else f"${gt}$"
        return verify(parse(g, fallback_mode="no_fallback"), parse(p, fallback_mode="no_fallback"), timeout_seconds=5)
    except Exception:
        return pred.replace("$", "").replace(" ", "").lower() == gt.replace("$", "").replace(" ", "").lower()


def naive_majority(preds, formatted, gt, grade) -> bool:
    """Clustered Maj@N (docs/evaluation.md#majn-clustering).

    With a dict of clusters in creation order (INVALID is a key like any other).
    """
    clusters: dict[object, list[int]] = {}
    for i, (p, ok) in enumerate(zip(preds, formatted)):
        if not ok:
            clusters.setdefault("INVALID", []).append(i)
            continue
        for rep_index, members in clusters.items():
            if rep_index == "INVALID":
                continue
            rep = preds[rep_index]
            if grade(p, rep) or grade(rep, p):
                members.append(i)
                break
        else:
            clusters[i] = [i]
    if not clusters:
        return False
    top = sorted(clusters.items(), key=lambda kv: len(kv[1]), reverse=True)[0][0]
    return top != "INVALID" and grade(preds[top], gt)


# ----------------------------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{5}.", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("first \\boxed{1} then \\boxed{2}", "2"),  # several boxes: the last one
        ("<think>try \\boxed{7}</think> no box after", "7"),  # inside the thinking trace
        ("\\boxed 5", None),  # no brace
        ("\\boxed 5 and later {x}", None),  # the matched span does not start with \boxed{
        ("\\boxed{5", None),  # unbalanced
        ("\\boxed{1} ... \\boxed{2", None),  # the LAST \boxed is unbalanced: None, not the earlier box
        ("\\boxed{}", ""),  # empty box: formatted, empty answer
        ("\\boxed{  42  }", "42"),  # trimmed
        ("\\boxed{\\boxed{5}}", "5"),
        ("\\boxed}{5}", None),
        ("no box here", None),
        ("", None),
        ("\\fbox{5}", None),
    ],
)
def test_extract_boxed_answer_cases(text: str, expected: str | None) -> None:
    assert extract_boxed_answer(text) == expected
    assert naive_extract(text) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["\\boxed", "{", "}", " ", "5", "x", "\\frac", "\\boxed{", "a}"]), max_size=14))
def test_extract_matches_naive_on_random_text(parts: list[str]) -> None:
    text = "".join(parts)
    assert extract_boxed_answer(text) == naive_extract(text)


# ----------------------------------------------------------------------------------------------------------------------
# Grading: the reference rule pinned case by case (math-verify 0.9.0)

REFERENCE_CASES = [
    # (prediction, gold, expected)
    ("0.5", "\\frac{1}{2}", True),  # fractions vs decimals
    ("\\frac12", "\\dfrac{1}{2}", True),
    ("4.6667", "\\frac{14}{3}", False),  # rounding is to 6 decimals
    ("0.001736111", "\\frac{1}{576}", True),  # pitfall: rounded decimals accepted
    ("[1,2]", "[1,2]", True),  # intervals
    ("[1,2)", "[1,2]", False),
    ("(2,1)", "(1,2)", False),  # pitfall: (1,2) is an open interval
    ("\\{2,1\\}", "\\{1,2\\}", True),  # sets vs lists
    ("2,1", "1,2", True),
    ("13", "\\text{13}", True),  # \text{13} = 13 since math-verify 0.8
    ("\\text{Evelyn}", "\\text{Evelyn}", True),
    ("\\text{(C)}", "\\text{(C)}", True),
    ("0.5", "50\\%", True),  # pitfall: percent = fraction
    ("50", "50\\%", True),
    ("30", "30^\\circ", True),  # degrees dropped
    ("10", "10\\text{ cm}", True),  # units dropped
    ("25", "025", True),  # zero-padded AIME gold
    ("025", "25", True),
    ("2", "x=2", True),
    ("y=3x+13", "3x-y+13=0", True),
    ("3x+4y+14=0", "3x-y+13=0", False),  # the "equations collapse" pitfall pair: not a false positive in 0.9.0
    ("0<x<12.5", "(0,12.5)", False),  # pitfall: gold/pred asymmetry ...
    ("(0,12.5)", "0<x<12.5", True),  # ... the other order is True
    ("1+\\frac{1}{\\mathrm{e}}", "1-\\frac{1}{\\mathrm{e}}", True),  # pitfall: \mathrm{e} truncates the parse (to 1)
    ("\\frac{1}{2006!}", "\\frac{1}{2004!}", True),  # pitfall: extreme magnitudes round equal
    ("2^{-98}", "2^{-99}", True),
    ("4", "4\\sqrt(2)", True),  # pitfall: \sqrt( parses as 4
    ("4\\sqrt{2}", "4\\sqrt(2)", False),
    ("18.90", "\\$18.90", False),  # a gold containing `$` is never wrapped and never parses
    ("\\$18.90", "\\$18.90", False),
    ("", "5", False),  # an empty box is never correct
    (None, "5", False),
    ("x^2+1", "1+x^2", True),
    ("3.14159265", "\\pi", True),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), REFERENCE_CASES)
def test_grade_answer_reference_cases(pred: str | None, gold: str, expected: bool) -> None:
    assert grade_answer(pred, gold) is expected
    assert naive_grade(pred, gold) is expected  # the case table agrees with the reference's rule as it runs it


STRICT_FIXES = [
    ("1+\\frac{1}{\\mathrm{e}}", "1-\\frac{1}{\\mathrm{e}}", False),
    ("1-e^{-1}", "1-\\frac{1}{\\mathrm{e}}", True),
    ("e^2", "\\mathrm{e}^2", True),
    ("\\frac{1}{2006!}", "\\frac{1}{2004!}", False),
    ("2^{-98}", "2^{-99}", False),
    ("2^{-99}", "2^{-99}", True),
    ("4", "4\\sqrt(2)", False),
    ("4\\sqrt{2}", "4\\sqrt(2)", True),
    ("18.90", "\\$18.90", True),
    ("\\$18.90", "\\$18.90", True),
    ("\\$36", "36", True),
    ("32348", "\\$32,\\!348", True),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), STRICT_FIXES)
def test_strict_grader_fixes_parse_pitfalls(pred: str, gold: str, expected: bool) -> None:
    assert grade_answer(pred, gold, grader="strict") is expected


def test_strict_grader_keeps_every_other_reference_verdict() -> None:
    fixed = {(p, g) for p, g, _ in STRICT_FIXES}
    for pred, gold, expected in REFERENCE_CASES:
        if (pred, gold) not in fixed:
            assert grade_answer(pred, gold, grader="strict") is expected, (pred, gold)


def _math500_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    golds = [r["answer"] for r in read_data("math500.jsonl")]
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        gold = rng.choice(golds)
        pred = rng.choice([gold, gold.replace(" ", ""), rng.choice(golds), f"{gold}.0", f"x = {gold}"])
        pairs.append((pred, gold))
    return pairs


def test_grade_answer_equals_naive_reference_on_math500_answers() -> None:
    for pred, gold in _math500_pairs(120, seed=1):
        assert grade_answer(pred, gold) == naive_grade(pred, gold), (pred, gold)


def test_unknown_grader_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown grader"):
        grade_answer("1", "1", grader="loose")
    with pytest.raises(ValueError, match="unknown grader"):
        MathGrader("loose")
    with pytest.raises(ValueError, match="grading workers must be >= 1, got -1"):
        MathGrader("reference", num_workers=-1)  # a pool without workers would wait forever


# ----------------------------------------------------------------------------------------------------------------------
# Clustering and Maj@N


def test_majority_vote_hand_computed() -> None:
    exact = lambda p, g: p == g  # noqa: E731
    # 11 unformatted + 1 correct: INVALID wins -> wrong (the upstream plurality-over-formatted bug said correct)
    vote = majority_vote(["5"] + [None] * 11, [True] + [False] * 11, "5", exact)
    assert vote == MajorityVote(correct=False, clusters=((0,), tuple(range(1, 12))), invalid_cluster=1, winner=1)
    # tie 2-2: the earliest created cluster wins
    assert majority_vote(["3", "5", "5", "3"], [True] * 4, "5", exact).correct is False
    assert majority_vote(["5", "3", "3", "5"], [True] * 4, "5", exact).correct is True
    # tie with INVALID created first: INVALID wins -> wrong
    vote = majority_vote([None, "5"], [False, True], "5", exact)
    assert (vote.correct, vote.winner, vote.invalid_cluster) == (False, 0, 0)
    # tie with INVALID created second: the answer wins
    assert majority_vote(["5", None], [True, False], "5", exact).correct is True
    # no samples
    assert majority_vote([], [], "5", exact) == MajorityVote(False, (), None, None)


def test_majority_vote_with_the_real_grader() -> None:
    # 0.5, 1/2 and 50% cluster together (3 votes) against "2" x2 and INVALID x2 -> correct for gold 1/2
    preds = ["2", "0.5", None, "\\frac{1}{2}", "2", None, "50\\%"]
    vote = majority_vote(preds, [p is not None for p in preds], "\\frac12", grade_answer)
    assert vote.clusters == ((0, 4), (1, 3, 6), (2, 5))
    assert vote.winner == 1 and vote.correct is True
    # asymmetry: "(0,12.5)" then "0<x<12.5" join in one direction only -> clustering checks both
    preds = ["(0,12.5)", "0<x<12.5"]
    assert majority_vote(preds, [True, True], "(0,12.5)", grade_answer).clusters == ((0, 1),)


def naive_reference_problem(texts: list[str], gold: str, grade) -> tuple[list[bool], bool]:
    """The reference's per-problem pipeline written out: extract; store the extraction, or the marker when it is None
    or empty; formatted = a box was found; a sample is graded with its extraction ("" for an empty box); Maj@N
    clusters the stored strings."""
    marker = "[No boxed answer found]"
    extracted = [naive_extract(t) for t in texts]
    stored = [e if e else marker for e in extracted]
    formatted = [e is not None for e in extracted]
    correct = [e is not None and grade(e, gold) for e in extracted]
    return correct, naive_majority(stored, formatted, gold, grade)


def test_empty_boxes_form_one_cluster_as_in_the_reference() -> None:
    # the marker is equivalent to itself under both graders, "" is not: empty boxes only cluster as stored strings
    assert grade_answer(NO_BOXED_ANSWER, NO_BOXED_ANSWER) and grade_answer(NO_BOXED_ANSWER, NO_BOXED_ANSWER, "strict")
    assert not grade_answer("", "")
    empty, right = "no idea \\boxed{ }", "so \\boxed{42}"
    cases = [([empty] * 6 + [right] * 6, False), ([right] * 6 + [empty] * 6, True), ([empty, right] * 6, False)]
    for texts, maj in cases:
        preds = [extract_boxed_answer(t) for t in texts]
        formatted = [p is not None for p in preds]
        assert all(formatted) and [stored_answer(p) for p in preds].count(NO_BOXED_ANSWER) == 6
        graded = grade_problem(preds, formatted, "42", grade_answer)
        correct, naive_maj = naive_reference_problem(texts, "42", grade_answer)
        assert list(graded.correct) == correct == [t == right for t in texts]  # an empty box is never correct
        assert graded.majority.correct is maj is naive_maj
        marker_first = texts[0] == empty
        assert graded.majority.winner == 0 and graded.majority.invalid_cluster is None
        members = [i for i, t in enumerate(texts) if t == empty]
        assert graded.majority.clusters[0 if marker_first else 1] == tuple(members)  # ONE cluster of 6 empty boxes
        # the rule before: each "" its own cluster, so the 6 right answers always won
        assert naive_majority(preds, formatted, "42", grade_answer) is True
    # an empty box is formatted (not INVALID): 5 empty + 6 without a box + 1 right -> INVALID (6) wins
    texts = [empty] * 5 + ["no box"] * 6 + [right]
    preds = [extract_boxed_answer(t) for t in texts]
    vote = majority_vote(preds, [p is not None for p in preds], "42", grade_answer)
    assert vote.clusters == ((0, 1, 2, 3, 4), tuple(range(5, 11)), (11,)) and vote.winner == vote.invalid_cluster == 1


def test_cluster_inputs_are_the_stored_strings() -> None:
    preds, formatted = ["5", "", None, NO_BOXED_ANSWER, "x"], [True, True, False, True, True]
    stored, flags = cluster_inputs(preds, formatted)
    assert stored == ["5", NO_BOXED_ANSWER, NO_BOXED_ANSWER, NO_BOXED_ANSWER, "x"] and flags == formatted
    assert cluster_inputs(stored, flags) == (stored, flags)  # idempotent: reference files and old pwopsd files alike
    assert [stored_answer(p) for p in ("7", "", None)] == ["7", NO_BOXED_ANSWER, NO_BOXED_ANSWER]
    with pytest.raises(ValueError, match="2 predictions but 1 formatted"):
        cluster_inputs(["1", "2"], [True])


def test_majority_vote_greedy_is_not_transitive() -> None:
    # a~b, b~c, not a~c: c starts its own cluster because only the first member (a) is compared
    near = lambda p, g: abs(int(p) - int(g)) <= 1  # noqa: E731
    vote = majority_vote(["1", "2", "3", "3"], [True] * 4, "3", near)
    assert vote.clusters == ((0, 1), (2, 3))
    assert vote.winner == 0 and vote.correct is False  # tie 2-2 -> first cluster, rep "1" vs gold "3"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.integers(0, 6)), min_size=0, max_size=12),
    st.integers(0, 6),
    st.sampled_from(["mod3", "asym", "exact"]),
)
def test_majority_vote_matches_naive(preds_raw: list[int | None], gold: int, relation: str) -> None:
    grades = {
        "mod3": lambda p, g: int(p) % 3 == int(g) % 3,
        "asym": lambda p, g: int(p) >= int(g),  # not symmetric, so the both-direction rule matters
        "exact": lambda p, g: p == g,
    }
    grade = grades[relation]
    preds = [None if p is None else str(p) for p in preds_raw]
    formatted = [p is not None for p in preds]
    assert majority_vote(preds, formatted, str(gold), grade).correct == naive_majority(
        preds, formatted, str(gold), grade
    )


# ----------------------------------------------------------------------------------------------------------------------
# MathGrader: worker pool, cache, hard time limit


@pytest.fixture(scope="module")
def pool() -> MathGrader:
    with MathGrader("reference", timeout_seconds=5, num_workers=2) as grader:
        yield grader


def test_pool_grades_like_grade_answer_and_caches(pool: MathGrader) -> None:
    pairs = _math500_pairs(40, seed=2) + [(p, g) for p, g, _ in REFERENCE_CASES if p is not None]
    for pred, gold in pairs:
        assert pool.grade(pred, gold) == grade_answer(pred, gold), (pred, gold)
    cached = len(pool._cache)
    for pred, gold in pairs:
        pool.grade(pred, gold)
    assert len(pool._cache) == cached  # nothing recomputed
    assert pool.grade(None, "5") is False


def test_grade_problems_equals_in_process_grading(pool: MathGrader) -> None:
    rng = random.Random(3)
    golds = [r["answer"] for r in read_data("math500.jsonl")][:40]
    problems = []
    for gold in golds:
        pool_answers = [gold, gold.replace(" ", ""), rng.choice(golds), rng.choice(golds), None]
        preds = [rng.choice(pool_answers) for _ in range(6)]
        problems.append((preds, [p is not None for p in preds], gold))
    graded = pool.grade_problems(problems, progress=False)
    for (preds, formatted, gold), got in zip(problems, graded):
        expected = grade_problem(preds, formatted, gold, grade_answer)
        assert got == expected
        assert got.majority.correct == naive_majority(preds, formatted, gold, naive_grade)
        assert list(got.correct) == [naive_grade(p, gold) for p in preds]


def test_pathological_answer_costs_at_most_the_limit() -> None:
    with MathGrader("reference", timeout_seconds=1.0, num_workers=1) as grader:
        grader.grade("1", "1")  # started and warm
        start = time.monotonic()
        assert grader.grade("10^{10^{10^{10}}}", "5") is False
        elapsed = time.monotonic() - start
        assert grader.timeouts == 1  # killed at the limit (sympy does not return by itself)
        assert elapsed < 3.0, elapsed  # the limit plus replacing the worker, never a hang
        # a timed-out comparison is "not equivalent": its own cluster, never INVALID
        preds = ["10^{10^{10^{10}}}", "5", "5"]
        (graded,) = grader.grade_problems([(preds, [True] * 3, "5")], progress=False)
        assert graded.majority.clusters == ((0,), (1, 2)) and graded.majority.invalid_cluster is None
        assert graded.correct == (False, True, True) and graded.majority.correct is True
        assert grader.grade("\\frac{1}{2}", "0.5") is True  # the replacement worker works


def test_timed_out_comparison_inside_a_problem_is_rerun_with_the_verdict_known() -> None:
    with MathGrader("reference", timeout_seconds=1.0, num_workers=1) as grader:
        preds = ["5", "10^{10^{10^{10}}}", "5", None]
        (graded,) = grader.grade_problems([(preds, [True, True, True, False], "5")], progress=False)
        assert graded.correct == (True, False, True, False)
        assert graded.majority.clusters == ((0, 2), (1,), (3,)) and graded.majority.correct is True
        assert grader.timeouts >= 1


def test_pool_keeps_verdicts_across_queued_jobs_when_a_worker_is_killed() -> None:
    # one worker with its next job queued: the timeout kills it mid-problem; both jobs are re-run, nothing is lost
    problems = [
        (["5", "6", "5"], [True] * 3, "5"),
        (["5", "10^{10^{10^{10}}}", "\\frac{10}{2}", None], [True, True, True, False], "5"),
        (["0.5", "\\frac{1}{2}", "2"], [True] * 3, "\\frac12"),
        (["x = 3", "3", "4", "4"], [True] * 4, "3"),
    ]
    with MathGrader("reference", timeout_seconds=1.0, num_workers=1) as grader:
        graded = grader.grade_problems(problems, progress=False)
        assert grader.timeouts == 2  # the pair in each direction (the clustering checks both)
        assert 0 < grader.busiest_worker_cpu_s <= grader.worker_cpu_s
    slow = ("10^{10^{10^{10}}}", "5")

    def grade(pred: str | None, gold: str) -> bool:  # the in-process rule, with the timed-out pair not equivalent
        return False if (pred, gold) in {slow, slow[::-1]} else grade_answer(pred, gold)

    for (preds, formatted, gold), got in zip(problems, graded):
        assert got == grade_problem(preds, formatted, gold, grade)
    assert [sum(g.correct) for g in graded] == [2, 2, 2, 2]


def test_large_jobs_wait_for_an_idle_worker_instead_of_filling_a_busy_ones_socket() -> None:
    # 8 distinct 40 kB answers per problem: each job and its progress messages exceed a socket buffer, so a job queued
    # behind a busy worker would block the parent's send while the worker blocks on its own unread messages
    problems = [([f"x${i}{j}" + "7" * 40_000 for j in range(8)], [True] * 8, "5") for i in range(3)]
    done: list[list] = []
    with MathGrader("reference", num_workers=1).start() as grader:
        thread = threading.Thread(target=lambda: done.append(grader.grade_problems(problems, progress=False)))
        thread.daemon = True
        thread.start()
        thread.join(timeout=120)
        if thread.is_alive():
            grader.close()  # unblocks the stuck send
        assert not thread.is_alive(), "deadlock"
    (graded,) = done
    assert [g.correct for g in graded] == [(False,) * 8] * 3
    assert [len(g.majority.clusters) for g in graded] == [8, 8, 8]  # none parses, none is equivalent to another


def test_a_worker_that_died_while_idle_is_replaced_and_its_job_handed_to_the_new_one() -> None:
    # the death of an idle worker shows only when the next job cannot be sent; with no other worker busy, the job must
    # go to the replacement at once (waiting for a busy worker's message would wait forever)
    done: list[bool] = []
    with MathGrader("reference", num_workers=1).start() as grader:
        (worker,) = grader._workers
        os.kill(worker.pid, signal.SIGKILL)
        assert select.select([worker.sock], [], [], 30)[0], "the killed worker's socket never closed"
        thread = threading.Thread(target=lambda: done.append(grader.grade("\\frac{1}{2}", "0.5")))
        thread.daemon = True
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "hang"
        assert done == [True] and grader._workers[0].pid != worker.pid and grader.timeouts == 0


def test_start_forks_the_workers_before_any_work() -> None:
    with MathGrader("reference", num_workers=2).start() as grader:
        assert len(grader._workers) == 2 and grader.worker_cpu_s == grader.busiest_worker_cpu_s == 0.0
        assert grader.grade("\\frac{1}{2}", "0.5") is True


# ----------------------------------------------------------------------------------------------------------------------
# Each string parsed once, and the workers' faster parser: the same verdicts as fresh math-verify calls


# fmt: off
LATEX_TOKENS = (
    "1", "2", "0", "3.5", "x", "a", "e", "i", " ", "{", "}", "(", ")", "[", "]", r"\{", r"\}", ",", ";", "+", "-", "/",
    "^", "_", "=", "<", "|", "!", "&", ".", r"\\", r"\,", r"\pi", r"\frac", r"\dfrac", r"\le", r"\sqrt", r"\cup",
    r"\infty", r"\text{cm}", r"\%", r"^\circ", r"\left(", r"\right)", r"\cdot", r"\in", r"\mathbb{R}", r"\sin",
    r"\log", r"\begin{pmatrix}", r"\end{pmatrix}", r"\mathrm{e}", r"\pm",
)
# fmt: on


def _mutations(strings: list[str], count: int, seed: int) -> list[str]:
    """Random token soup and golds with a token inserted: syntax errors, ambiguities, odd but valid LaTeX."""
    rng = random.Random(seed)
    soup = ["".join(rng.choice(LATEX_TOKENS) for _ in range(rng.randint(1, 10))) for _ in range(count)]
    inserted = []
    for text in rng.sample(strings, count):
        i = rng.randrange(len(text) + 1)
        inserted.append(text[:i] + rng.choice(LATEX_TOKENS) + text[i:])
    return soup + inserted


def test_fast_parsing_returns_and_raises_exactly_what_math_verify_does() -> None:
    golds = [str(r["answer"]) for r in read_data("math500.jsonl")]
    others = [
        str(json.loads(line)["answer"])
        for name in ("aime24", "aime25", "hmmt25")
        for line in (DATA_DIR / f"{name}.jsonl").open(encoding="utf-8")
    ]
    strings = sorted(set(golds + others + _mutations(golds, 150, seed=5)))
    payload = json.dumps(strings)
    script = str(REPO_ROOT / "tests" / "latex_parse_dump.py")
    runs = [
        subprocess.Popen([sys.executable, script, *flag], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for flag in ([], ["--fast"])
    ]
    plain, fast = (json.loads(run.communicate(payload, timeout=600)[0]) for run in runs)
    assert all(run.returncode == 0 for run in runs)
    assert len(plain) == len(strings) > 600
    raised = sum(v[0][0] == "raises" for v in plain.values())
    assert 150 < raised < len(strings) - 300  # both the parse and the error paths are exercised
    assert [s for s in strings if plain[s] != fast[s]] == []


def test_cached_parses_give_the_verdicts_of_fresh_parses() -> None:
    # every string parsed once and its objects reused by many verify calls == a fresh parse for every call
    from latex_parse_dump import canonical

    from pwopsd.evaluation.grade import _dollar_wrap, _parse

    rng = random.Random(11)
    golds = [r["answer"] for r in read_data("math500.jsonl")]
    extra = ["0.5", "\\frac{1}{2}", "50\\%", "x = 2", "(0,12.5)", "0<x<12.5", "\\{1,2\\}", "2,1", "\\text{(C)}"]
    strings = sorted(set(rng.sample(golds, 40) + extra))
    before = {s: canonical(_parse(_dollar_wrap(s))) for s in strings}
    pairs = [(a, b) for a in strings for b in strings]
    rng.shuffle(pairs)
    pairs = pairs[:400] + [(a, a) for a in strings] + [(p, g) for p, g, _ in REFERENCE_CASES if p is not None]
    cached = [grade_answer(pred, gold) for pred, gold in pairs]
    assert {s: canonical(_parse(_dollar_wrap(s))) for s in strings} == before  # verify mutated nothing
    assert cached == [naive_grade(pred, gold) for pred, gold in pairs]
    assert 60 < sum(cached) < len(pairs) - 300


def test_and_chains_are_parsed_afresh_for_every_comparison() -> None:
    # The reference's history dependence: sympy shares equal `And` objects and latex2sympy2 stores the written order of
    # a chain on them, so comparing 0<x<12.5 with an interval rewrites the order math-verify's cache hands out next.
    from math_verify.parser import parse_latex_cached

    chain, flipped, interval = "0<x<12.5", "12.5>x>0", "(0,12.5)"
    parse_latex_cached.cache_clear()
    assert naive_grade(flipped, chain) is False
    assert naive_grade(interval, chain) is True
    assert naive_grade(flipped, chain) is True  # the same pair, another verdict
    # ours: always the verdict of a fresh parse, in process and in the pool, whatever was compared before
    for _ in range(2):
        assert grade_answer(flipped, chain) is False
        assert grade_answer(interval, chain) is True
    problems = [([interval, flipped], [True, True], chain), ([flipped, interval], [True, True], chain)]
    with MathGrader("reference", num_workers=1) as grader:
        graded = grader.grade_problems(problems, progress=False)
    assert [g.correct for g in graded] == [(True, False), (False, True)]


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_the_binomial_formula(nck: tuple[int, int, int]) -> None:
    n, c, k = nck
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_special_values() -> None:
    assert pass_at_k(12, 0, 12) == 0.0 and pass_at_k(12, 1, 12) == 1.0  # k = N: "any correct"
    assert pass_at_k(12, 5, 1) == pytest.approx(5 / 12)  # k = 1: the mean accuracy
    assert pass_at_k_values(12) == [1, 2, 4, 8, 12]
    assert pass_at_k_values(8) == [1, 2, 4, 8]
    assert pass_at_k_values(1) == [1]
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_at_k_table_reduces_to_avg_and_pass() -> None:
    counts = [0, 1, 3, 12, 7]
    table = pass_at_k_table(counts, 12)
    assert list(table) == ["1", "2", "4", "8", "12"]
    assert table["1"] == pytest.approx(100 * sum(counts) / (5 * 12))  # Avg@N
    assert table["12"] == pytest.approx(100 * 4 / 5)  # Pass@N
    assert table["2"] == pytest.approx(100 * sum(1 - math.comb(12 - c, 2) / math.comb(12, 2) for c in counts) / 5)


def test_aggregate_metrics_hand_computed() -> None:
    metrics = aggregate_metrics([0, 2, 4], [False, True, True], [3, 4, 4], n=4)
    assert metrics == {
        "num_problems": 3,
        "total_solutions": 12,
        "pass_at_n": 2,
        "pass_at_n_pct": pytest.approx(200 / 3),
        "average_at_n": 6,
        "average_at_n_pct": pytest.approx(50.0),
        "majority_vote_at_n": 2,
        "majority_vote_at_n_pct": pytest.approx(200 / 3),
        "formatted_count": 11,
        "format_rate": pytest.approx(1100 / 12),
    }
    assert aggregate_metrics([], [], [], n=4)["pass_at_n_pct"] == 0.0


def test_equivalence_is_checked_in_both_orders_only_when_needed() -> None:
    calls: list[tuple[str, str]] = []

    def grade(p: str | None, g: str) -> bool:
        calls.append((p, g))
        return p == g

    majority_vote(["a", "b", "a"], [True] * 3, "a", grade)
    # b vs rep a: both orders; second a vs rep a: first order suffices; winner vs gold once
    assert calls == [("b", "a"), ("a", "b"), ("a", "a"), ("a", "a")]
