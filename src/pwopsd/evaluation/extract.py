"""Answer extraction: the final answer of a generation is the content of its last `\\boxed{...}`.

This is the parser half of the evaluation (as in Math-Verify's parser / grader split): it turns a model's free text
into the answer string that `pwopsd.evaluation.grade` compares with the gold. It is a pure string function, kept apart
from the grading rule so that the evaluator can store what a sample answered, and whether it answered at all (a
sample is "formatted" when it has a box), without importing math-verify. The rule is the reference's, described in
docs/evaluation.md#extraction.
"""

from __future__ import annotations

NO_BOXED_ANSWER = "[No boxed answer found]"  # what the result files store as `predicted_answer` without an answer


def stored_answer(extraction: str | None) -> str:
    """The `predicted_answer` a result file stores for an extraction: the extraction, or NO_BOXED_ANSWER when it is
    None *or empty* (the reference's `extraction if extraction else NO_BOXED_ANSWER`).

    An empty `\\boxed{}` is therefore stored as the marker while still counting as formatted (the flag comes from
    `extraction is not None`); the Maj@N vote clusters these stored strings (`vote.cluster_inputs`).
    """
    return extraction if extraction else NO_BOXED_ANSWER


def extract_boxed_answer(text: str | None) -> str | None:
    """Inner text of the last `\\boxed{...}` in `text`, trimmed; None if there is none.

    Finds the last `\\boxed` anywhere (thinking trace included), scans forward counting braces to the `}` that closes
    the first `{`, and accepts the span only if it starts with `\\boxed{`. So `\\boxed 5` and an unbalanced
    `\\boxed{5` give None, and an empty `\\boxed{}` gives `""` (which counts as formatted).
    """
    if not text:
        return None
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    depth = 0
    end = None
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
    if end is None:
        return None
    span = text[start : end + 1]
    prefix = "\\boxed{"
    if not span.startswith(prefix):
        return None
    return span[len(prefix) : -1].strip()
