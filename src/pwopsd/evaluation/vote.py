"""The clustered majority vote (Maj@N) of one problem's samples, and the grading of a whole problem.

The samples of a problem are clustered by mathematical equivalence, and the largest cluster decides whether the
problem counts as solved; samples without a box form one INVALID cluster that votes too, so a model that mostly fails
to answer cannot win on its few answers (docs/evaluation.md#majn-clustering). This is the one implementation of the
rule: the evaluator, `recompute_majn.py` and the grading workers all call it. It takes the grading function as an
argument, so the rule is independent of how a comparison is made: in process (`grade.grade_answer`), or in a worker
with a cache and a time limit (`workers.MathGrader`). `grade_problem` lives here because a problem's grade is its
per-sample verdicts plus its vote, both made with the same grading function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

GradeFn = Callable[[str | None, str], bool]


@dataclass(frozen=True)
class MajorityVote:
    """Outcome of the clustered vote of one problem.

    `clusters` lists the sample indices of each cluster in creation order (INVALID included, at the position where its
    first member appeared); `invalid_cluster` is INVALID's index in it (None if every sample is formatted); `winner`
    is the index of the largest cluster, the earliest created on a tie (None without samples).
    """

    correct: bool
    clusters: tuple[tuple[int, ...], ...]
    invalid_cluster: int | None
    winner: int | None


def majority_vote(
    predictions: Sequence[str | None], formatted: Sequence[bool], gold: str, grade: GradeFn
) -> MajorityVote:
    """Clustered Maj@N with an INVALID cluster.

    In generation order: an unformatted sample joins the single INVALID cluster; a formatted sample joins the first
    non-INVALID cluster whose representative r (first member) satisfies `grade(pred, r) or grade(r, pred)`, else it
    starts a new cluster. Clusters are sorted by size, descending, with a stable sort (ties → earliest created).
    If INVALID wins the problem is wrong; otherwise correct = `grade(winner_rep, gold)`.
    """
    if len(predictions) != len(formatted):
        raise ValueError(f"{len(predictions)} predictions but {len(formatted)} formatted flags")
    clusters: list[list[int]] = []
    invalid: int | None = None
    for i, (pred, ok) in enumerate(zip(predictions, formatted)):
        if not ok:
            if invalid is None:
                invalid = len(clusters)
                clusters.append([])
            clusters[invalid].append(i)
            continue
        for c, members in enumerate(clusters):
            if c == invalid:
                continue
            rep = predictions[members[0]]
            if grade(pred, rep) or grade(rep, pred):
                members.append(i)
                break
        else:
            clusters.append([i])
    frozen = tuple(tuple(members) for members in clusters)
    if not clusters:
        return MajorityVote(correct=False, clusters=frozen, invalid_cluster=None, winner=None)
    winner = sorted(range(len(clusters)), key=lambda c: -len(clusters[c]))[0]  # sorted() is stable
    correct = winner != invalid and grade(predictions[clusters[winner][0]], gold)
    return MajorityVote(correct=bool(correct), clusters=frozen, invalid_cluster=invalid, winner=winner)


@dataclass(frozen=True)
class ProblemGrade:
    """Per-sample correctness (`grade(pred, gold)` for formatted samples, False otherwise) and the majority vote."""

    correct: tuple[bool, ...]
    majority: MajorityVote


def grade_problem(
    predictions: Sequence[str | None], formatted: Sequence[bool], gold: str, grade: GradeFn
) -> ProblemGrade:
    """Grade every sample of one problem against `gold`, then take the clustered majority vote."""
    correct = tuple(bool(ok and grade(pred, gold)) for pred, ok in zip(predictions, formatted))
    return ProblemGrade(correct=correct, majority=majority_vote(predictions, formatted, gold, grade))
