"""`python eval/math_grader.py PRED GOLD [--grader strict] [--timeout S]` (pwopsd.evaluation.grade:main).

The real command in a subprocess with the real grader: answers that start with `-` (even spelled like an option, after
`--`) are graded, and the verdict printed equals the naive reference rule; bad options and time limits are one line on
stderr with exit status 2, before any grading process starts.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from test_math_grader import naive_grade

GRADER = [sys.executable, str(REPO_ROOT / "eval" / "math_grader.py")]


def _grader(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*GRADER, *args], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


@pytest.mark.parametrize(
    ("args", "pred", "gold"),
    [
        (["--", "-5", "-5"], "-5", "-5"),  # the documented form
        (["-1/2", "-0.5"], "-1/2", "-0.5"),  # argparse alone would take both for options
        (["--zygote", "--zygote"], "--zygote", "--zygote"),  # not an option of this command: an answer
        (["--timeout", "3", "--", "--timeout", "-\\frac{1}{2}"], "--timeout", "-\\frac{1}{2}"),  # spelled as an option
        (["-5", "5", "--grader=strict"], "-5", "5"),
    ],
)
def test_answers_starting_with_a_dash_are_graded(args: list[str], pred: str, gold: str) -> None:
    proc = _grader(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(naive_grade(pred, gold))


def test_verdicts_are_the_reference_rule() -> None:
    assert naive_grade("-1/2", "-0.5") is True and naive_grade("-5", "5") is False  # both verdicts occur above
    proc = _grader("\\frac{1}{2}", "0.5", "--grader", "strict", "--timeout", "2.5")
    assert (proc.returncode, proc.stdout.strip()) == (0, "True")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["5", "5", "--timeout", "0"], "--timeout must be a number of seconds > 0 and <= 1e+06, got 0 (default 5)"),
        (["5", "5", "--timeout", "-1"], "--timeout must be a number of seconds > 0 and <= 1e+06, got -1 (default 5)"),
        (["5", "5", "--timeout=nan"], "--timeout must be a number of seconds > 0 and <= 1e+06, got nan (default 5)"),
        (["5", "5", "--timeout", "inf"], "--timeout must be a number of seconds > 0 and <= 1e+06, got inf (default 5)"),
        (["5", "5", "--timeout", "1e7"], "--timeout must be a number of seconds > 0 and <= 1e+06, got 1e+07 (default 5)"),
        (["5", "5", "--timeout", "soon"], "argument --timeout: invalid float value: 'soon' (see --help)"),
        (["5", "5", "--timeout"], "argument --timeout: expected one argument (see --help)"),
        (["5", "5", "--grader", "loose"],
         "argument --grader: invalid choice: 'loose' (choose from 'reference', 'strict') (see --help)"),
        (["5"], "expected 2 answers, PREDICTION and GOLD, got 1 ('5'); quote an answer that contains spaces, and put "
                "'--' before answers spelled like an option (math_grader.py -- --timeout 5)"),
        ([], "expected 2 answers, PREDICTION and GOLD, got 0 (none); quote an answer that contains spaces, and put "
             "'--' before answers spelled like an option (math_grader.py -- --timeout 5)"),
        (["x", "=", "5"], "expected 2 answers, PREDICTION and GOLD, got 3 ('x' '=' '5'); quote an answer that contains "
                          "spaces, and put '--' before answers spelled like an option (math_grader.py -- --timeout 5)"),
    ],
)  # fmt: skip
def test_bad_arguments_are_one_line_errors(args: list[str], message: str) -> None:
    proc = _grader(*args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"math_grader.py: error: {message}"]
    assert proc.stdout == "" and "Traceback" not in proc.stderr


def test_help_documents_the_double_dash() -> None:
    proc = _grader("--help")
    text = " ".join(proc.stdout.split())  # argparse wraps the help to the terminal's width
    assert proc.returncode == 0 and "[--] PREDICTION GOLD" in text
    assert "after '--' every argument is an answer (math_grader.py -- --timeout --timeout)" in text


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan"), float("inf"), 1e7])
def test_the_pool_refuses_a_time_limit_it_cannot_keep(seconds: float) -> None:
    """inf or 1e7 s would overflow select() at the first comparison, NaN would never expire: refused up front."""
    from pwopsd.evaluation.workers import MathGrader

    with pytest.raises(ValueError, match="the grading time limit must be > 0 and <= 1e\\+06 seconds"):
        MathGrader("reference", seconds, num_workers=1)
