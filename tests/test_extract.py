"""Answer extraction rules (`pwopsd.evaluation.extract`): the last number, the boxed-or-last-number fallback and the
`--answer_format` registry, each against a naive scan written here (no regular expression) on fixed and random
strings."""

from __future__ import annotations

import random

import pytest

from pwopsd.evaluation.extract import (
    ANSWER_FORMATS,
    extract_answer,
    extract_boxed_answer,
    extract_boxed_or_last_number,
    extract_last_number,
)


def naive_numbers(text: str) -> list[str]:
    """Every number, left to right, without overlaps: an optional '-' glued to a digit run, then groups of ',' and
    exactly three digits while they follow, then '.' and digits if a digit follows the point (a decimal digit is any
    Unicode Nd character, as `\\d` matches)."""
    found = []
    i = 0
    while i < len(text):
        j = i
        if text[j] == "-" and j + 1 < len(text) and text[j + 1].isdecimal():
            j += 1
        if not text[j].isdecimal():
            i += 1
            continue
        while j < len(text) and text[j].isdecimal():
            j += 1
        while text[j : j + 1] == "," and len(text[j + 1 : j + 4]) == 3 and text[j + 1 : j + 4].isdecimal():
            j += 4
        if text[j : j + 1] == "." and text[j + 1 : j + 2].isdecimal():
            j += 1
            while j < len(text) and text[j].isdecimal():
                j += 1
        found.append(text[i:j])
        i = j
    return found


def naive_last_number(text: str | None) -> str | None:
    numbers = naive_numbers(text or "")
    return numbers[-1].replace(",", "") if numbers else None


def naive_boxed(text: str | None) -> str | None:
    """The last `\\boxed` must be followed by '{'; its content runs to the brace that closes that one."""
    if not text or "\\boxed" not in text:
        return None
    start = text.rindex("\\boxed") + len("\\boxed")
    if text[start : start + 1] != "{":
        return None
    depth = 0
    for k in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[start + 1 : k].strip()
    return None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("So the final answer is 14.", "14"), ("7 + 5 = 12", "12"), ("total 1,234.5 apples", "1234.5"),
     ("it is -3", "-3"), ("5-3", "-3"), ("pi is 3.14.", "3.14"), ("a.5", "5"), ("1,23", "23"), ("1,2345", "5"),
     ("12,345,678", "12345678"), ("x ٣", "٣"), ("no digits here", None), ("", None), (None, None), ("-", None)],
)  # fmt: skip
def test_last_number_cases(text: str | None, expected: str | None) -> None:
    assert extract_last_number(text) == expected == naive_last_number(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("So the answer is \\boxed{14}. Check: 7 + 7 = 14, not 15.", "14"), ("So the answer is 14.", "14"),
     ("\\boxed{} then 3", ""), ("\\boxed{1} and \\boxed{2", "2"), ("\\boxed 5", "5"), ("no answer", None)],
)  # fmt: skip
def test_boxed_or_last_number_cases(text: str, expected: str | None) -> None:
    """A box wins over any number; an empty box is an (empty) answer; an unclosed last box falls back to a number."""
    assert extract_boxed_or_last_number(text) == expected
    assert extract_answer(text, "boxed_or_last_number") == expected


ALPHABET = list("0123456789") * 3 + list(",.-- x{}\\٣") + ["\\boxed{", "\\boxed", ",000", ".5"] + ["\\boxed{", "}"] * 3


def test_random_strings_match_the_naive_rules() -> None:
    rng = random.Random(0)
    fell_back = boxed = 0
    for _ in range(5000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 30)))
        assert extract_last_number(text) == naive_last_number(text), text
        box = naive_boxed(text)
        assert extract_boxed_answer(text) == box, text
        expected = box if box is not None else naive_last_number(text)
        assert extract_boxed_or_last_number(text) == expected == extract_answer(text, "boxed_or_last_number"), text
        assert extract_answer(text, "boxed") == box == extract_answer(text), text
        fell_back += box is None and expected is not None
        boxed += box is not None
    assert fell_back > 500 and boxed > 500  # both branches are exercised


def test_answer_formats_registry() -> None:
    assert list(ANSWER_FORMATS) == ["boxed", "boxed_or_last_number"]
    with pytest.raises(ValueError, match="unknown answer format 'last'; choose one of boxed, boxed_or_last_number"):
        extract_answer("1", "last")
