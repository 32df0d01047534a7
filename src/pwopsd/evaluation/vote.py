"""The clustered majority vote (Maj@N) of one problem's samples, and the grading of a whole problem.

The samples of a problem are clustered by mathematical equivalence, and the largest cluster decides whether the
problem counts as solved; samples without a box form one INVALID cluster that votes too, so a model that mostly fails
to answer cannot win on its few answers (docs/evaluation.md#majn-clustering). This is the one implementation of the
rule: the evaluator, `recompute_majn.py` and the grading workers all call it. It takes the grading function as an
argument, so the rule is independent of how a comparison is made: in process (`grade.grade_answer`), or in a worker
with a cache and a time limit (`workers.MathGrader`). `grade_problem` lives here because a problem's grade is its
per-sample verdicts plus its vote, both made with the same grading function.

The vote runs over the strings a result file stores (`cluster_inputs`), as the reference's did: an empty `\\boxed{}` is
stored as `[No boxed answer found]` and stays formatted, so all empty boxes of a problem form one ordinary cluster (the
marker is equivalent to itself under both graders) that can win the vote and is then wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pwopsd.evaluation.extract import stored_answer

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


def cluster_inputs(predictions: Sequence[str | None], formatted: Sequence[bool]) -> tuple[list[str], list[bool]]:
    """What the Maj@N clustering sees: each prediction as stored (`extract.stored_answer`: None or "" become
    `[No boxed answer found]`), with the formatted flags unchanged.

    Takes extractions (formatted = extraction is not None) or the `predicted_answer` / `formatted` pairs of a saved
    result file; idempotent, so a file written by the reference (marker stored) or by an older pwopsd (`""` stored for
    an empty box) clusters the same way. `majority_vote` applies it itself; `recompute_majn.py` may call it to show
    the strings it clusters.
    """
    if len(predictions) != len(formatted):
        raise ValueError(f"{len(predictions)} predictions but {len(formatted)} formatted flags")
    return [stored_answer(p) for p in predictions], [bool(ok) for ok in formatted]


def majority_vote(
    predictions: Sequence[str | None], formatted: Sequence[bool], gold: str, grade: GradeFn
) -> MajorityVote:
    """Clustered Maj@N with an INVALID cluster.

    The predictions are first mapped to their stored strings (`cluster_inputs`). In generation order: an unformatted
    sample joins the single INVALID cluster; a formatted sample joins the first non-INVALID cluster whose
    representative r (first member) satisfies `grade(pred, r) or grade(r, pred)`, else it starts a new cluster.
    Clusters are sorted by size, descending, with a stable sort (ties → earliest created).
    If INVALID wins the problem is wrong; otherwise correct = `grade(winner_rep, gold)`.
    """
    stored, flags = cluster_inputs(predictions, formatted)
    clusters: list[list[int]] = []
    invalid: int | None = None
    for i, (pred, ok) in enumerate(zip(stored, flags)):
        if not ok:
            if invalid is None:
                invalid = len(clusters)
                clusters.append([])
            clusters[invalid].append(i)
            continue
        for c, members in enumerate(clusters):
            if c == invalid:
                continue
            rep = stored[members[0]]
            if grade(pred, rep) or grade(rep, pred):
                members.append(i)
                break
        else:
            clusters.append([i])
    frozen = tuple(tuple(members) for members in clusters)
    if not clusters:
        return MajorityVote(correct=False, clusters=frozen, invalid_cluster=None, winner=None)
    winner = sorted(range(len(clusters)), key=lambda c: -len(clusters[c]))[0]  # sorted() is stable
    correct = winner != invalid and grade(stored[clusters[winner][0]], gold)
    return MajorityVote(correct=bool(correct), clusters=frozen, invalid_cluster=invalid, winner=winner)


@dataclass(frozen=True)
class ProblemGrade:
    """Per-sample correctness (`grade(pred, gold)` for formatted samples, False otherwise) and the majority vote.

    The per-sample grade uses the prediction as given (an empty box is graded as `""`, never correct); the vote uses
    the stored strings (`cluster_inputs`)."""

    correct: tuple[bool, ...]
    majority: MajorityVote


def grade_problem(
    predictions: Sequence[str | None], formatted: Sequence[bool], gold: str, grade: GradeFn
) -> ProblemGrade:
    """Grade every sample of one problem against `gold`, then take the clustered majority vote."""
    correct = tuple(bool(ok and grade(pred, gold)) for pred, ok in zip(predictions, formatted))
    return ProblemGrade(correct=correct, majority=majority_vote(predictions, formatted, gold, grade))
