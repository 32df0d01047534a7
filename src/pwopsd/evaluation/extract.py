"""Answer extraction: the final answer of a generation is the content of its last `\\boxed{...}`.

That is the reference's rule and the default (`--answer_format boxed`). A second rule, `boxed_or_last_number`, falls
back to the last number of the text when there is no box (the "flexible extract" of GSM8K-style grading): small models
such as SmolLM2-135M-Instruct answer "So the answer is 14." and almost never write `\\boxed{}`, so under the boxed
rule every sample is unanswered and nothing can be measured. `ANSWER_FORMATS` is the registry both tools read.

This is the parser half of the evaluation (as in Math-Verify's parser / grader split): it turns a model's free text
into the answer string that `pwopsd.evaluation.grade` compares with the gold. It is a pure string function, kept apart
from the grading rule so that the evaluator can store what a sample answered, and whether it answered at all (a
sample is "formatted" when it has a box), without importing math-verify. The rule is the reference's, described in
docs/evaluation.md#extraction.
"""

from __future__ import annotations

import re
from collections.abc import Callable

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


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
"""An integer or decimal, optionally negative, with optional thousands commas (`1,234.5`)."""


def extract_last_number(text: str | None) -> str | None:
    """The last number in `text` (commas removed, e.g. `1,234` -> `1234`); None if the text has no digit.

    A decimal point is part of the number only when digits follow it, so a sentence-final "is 14." gives `14`.
    """
    if not text:
        return None
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_boxed_or_last_number(text: str | None) -> str | None:
    """The last `\\boxed{...}` as `extract_boxed_answer` finds it; without one, the last number of the text."""
    boxed = extract_boxed_answer(text)
    return boxed if boxed is not None else extract_last_number(text)


ANSWER_FORMATS: dict[str, Callable[[str | None], str | None]] = {
    "boxed": extract_boxed_answer,
    "boxed_or_last_number": extract_boxed_or_last_number,
}
"""`--answer_format` choices of the evaluator and of `diagnose`: name -> extraction (text -> answer or None)."""


def extract_answer(text: str | None, answer_format: str = "boxed") -> str | None:
    """The answer of `text` under the rule `answer_format` (a key of ANSWER_FORMATS)."""
    try:
        rule = ANSWER_FORMATS[answer_format]
    except KeyError:
        raise ValueError(
            f"unknown answer format {answer_format!r}; choose one of {', '.join(ANSWER_FORMATS)}"
        ) from None
    return rule(text)
