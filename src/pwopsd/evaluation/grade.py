"""The grading rule: whether a predicted answer is mathematically equivalent to the gold answer.

This is the grader half of the evaluation (as in Math-Verify's parser / grader split): `grade_answer` compares two
answer strings, as `extract.extract_boxed_answer` returns them, with math-verify, in process and without a time limit.
The time limit, the cache and the parallelism are `workers.MathGrader`'s job; the vote over a problem's samples is
`vote.majority_vote`'s. Keeping the rule alone here makes it the one thing to read to know what "correct" means.

Two rules (`--grader`):

* `reference` (default): the reference's rule exactly, so numbers stay comparable with the paper. Both strings are
  wrapped in `$…$`, parsed with math-verify (`no_fallback`) and compared with `verify(gold, pred)`, gold first; on an
  exception they are compared as lower-cased strings without spaces and `$` (docs/evaluation.md#grading).
* `strict` (opt-in) fixes plain parse bugs of the reference rule before comparing (docs/deviations.md#grader-pitfalls):
  `\\mathrm{e}` / `\\operatorname{e}` → `e` (the reference parses `1-\\frac{1}{\\mathrm{e}}` as 1),
  `\\sqrt(x)` → `\\sqrt{x}` (the reference parses `4\\sqrt(2)` as 4), `\\$` removed (the reference can never parse a
  dollar amount such as MATH-500's gold `\\$18.90`), and an exact comparison of two exact rational numbers that the
  reference accepts only through rounding (`2^{-99}` = `2^{-98}`, `1/2004!` = `1/2006!`).
  Rounded decimals (`0.001736111` vs `\\frac{1}{576}`), percent = fraction, units and degrees stay accepted.

Each distinct string is parsed once per process (`_parse`), and the grading workers install a faster LaTeX parser
that returns exactly what math-verify's does (`install_fast_parsing`). `main` is the one-comparison command line
(`python eval/math_grader.py PRED GOLD`, `pwopsd-grade`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from itertools import product
from typing import Any

GRADERS = ("reference", "strict")

# `strict` rewrites: (pattern, replacement), applied in order to both sides before the `$` wrapping.
STRICT_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\\(?:mathrm|operatorname)\s*\{\s*e\s*\}"), "e"),  # Euler's number written upright
    (re.compile(r"\\sqrt\s*\(([^()]*)\)"), r"\\sqrt{\1}"),  # \sqrt(2) -> \sqrt{2}
    (re.compile(r"\\\$"), ""),  # a currency sign is not a math delimiter
)


def normalize_strict(text: str) -> str:
    """The `strict` grader's rewrites of an answer string (see `STRICT_REWRITES`)."""
    for pattern, replacement in STRICT_REWRITES:
        text = pattern.sub(replacement, text)
    return text


def _dollar_wrap(text: str) -> str:
    """Wrap in `$…$` unless the text already contains a `$` (step 2 of the rule in docs/evaluation.md#grading)."""
    return text if "$" in text else f"${text}$"


_PARSE_CACHE_SIZE = 1 << 16
_parse_cache: dict[str, Any] = {}  # wrapped string -> parse result, exception, or _PARSE_AFRESH
_PARSE_AFRESH = object()


def _rewritable(parsed: Any) -> bool:
    """Whether a parse result contains latex2sympy2's `And` (a chain such as `0<x<12.5`, or `x=1 \\text{ and } y=2`).

    latex2sympy2 keeps the written order of an `And`'s relations on the object (`_unsorted_args`, which math-verify
    compares and unwraps by position), but sympy caches `And` objects, so every later construction of an equal `And`
    (`verify` builds some, e.g. `0<x<12.5` against an interval) rewrites that order on the shared object. Such a parse
    result is not reused: it is parsed again, as the reference does, for every comparison.
    """
    from latex2sympy2_extended.logic import And
    from sympy import Basic
    from sympy.matrices import MatrixBase

    stack = list(parsed) if isinstance(parsed, (list, tuple)) else [parsed]
    while stack:
        node = stack.pop()
        if isinstance(node, And):
            return True
        if isinstance(node, Basic):
            stack.extend(node.args)
        elif isinstance(node, MatrixBase):
            stack.extend(node)
    return False


def _parse_now(wrapped: str) -> tuple[Any, ...] | Exception:
    from math_verify import parse

    try:
        return tuple(parse(wrapped, fallback_mode="no_fallback", parsing_timeout=None))
    except Exception as e:  # math-verify catches its own errors; this is for anything it lets through
        return e


def _parse(wrapped: str) -> tuple[Any, ...]:
    """`math_verify.parse(..., fallback_mode="no_fallback")` with its signal time limit off, once per string.

    Parsing is deterministic and its results are immutable sympy objects (math-verify's own parse cache hands the same
    objects to every call as well), so each distinct string is parsed once per process; an exception is cached too and
    raised again on every later call, exactly as a fresh parse would raise it. The exception is a result with an `And`
    (see `_rewritable`): it is parsed afresh for every call, past math-verify's cache, so that its written order is
    the one a fresh parse gives, whatever was compared before.
    """
    cached = _parse_cache.get(wrapped)
    if cached is None:
        cached = _parse_now(wrapped)
        if isinstance(cached, tuple) and _rewritable(cached):
            _parse_cache[wrapped] = cached = _PARSE_AFRESH
        else:
            if len(_parse_cache) >= _PARSE_CACHE_SIZE:
                _parse_cache.clear()
            _parse_cache[wrapped] = cached
    if cached is _PARSE_AFRESH:
        from math_verify.parser import parse_latex_cached

        parse_latex_cached.cache_clear()  # math-verify's cache may hold the And with its order rewritten
        cached = _parse_now(wrapped)
    if isinstance(cached, Exception):
        raise cached
    return cached


def install_fast_parsing() -> None:
    """Speed up math-verify's LaTeX parser (latex2sympy2) without changing what it returns or raises.

    Two changes, installed only in the grading worker processes (idempotent):

    * SLL first. latex2sympy2 parses with ANTLR's default LL prediction, whose full-context predictions are never
      cached and take about half of the parse time of typical answers. This is ANTLR's documented two-stage strategy:
      SLL prediction either builds the tree that LL builds or reports a syntax error (SLL picks the smallest
      alternative of a conflict; if LL keeps that alternative it picks it too, and if LL rules it out the SLL parse
      must fail). latex2sympy2's error listener raises on the first syntax error, so a failed SLL attempt is simply
      parsed again from scratch by a fresh parser in LL mode, which returns or raises exactly what latex2sympy2 does.
    * Numbers are converted once per text: latex2sympy2's `parse_number` ends in `sympy.Number(text)`, which runs
      sympy's string parser (an `exec` of `from sympy import *`) on every call; the result depends on the text alone
      and sympy numbers are immutable. An integer is built directly (`sympy.Integer`, what the string parser builds).

    `tests/test_math_grader.py` compares both parsers on thousands of strings.
    """
    import sympy
    from antlr4.atn.PredictionMode import PredictionMode
    from latex2sympy2_extended import latex2sympy2

    base = latex2sympy2._Latex2Sympy
    if getattr(base, "fast_parsing", False):
        return
    numbers: dict[str, Any] = {}

    class FastLatex2Sympy(base):  # type: ignore[misc, valid-type]
        fast_parsing = True

        def parse_number(self, text: str) -> Any:
            number = numbers.get(text)
            if number is None:
                digits = text.replace(",", "").lstrip("0") or "0"  # what latex2sympy2 hands to sympy.Number
                if digits.isascii() and digits.isdigit() and len(digits) <= 1000:
                    number = sympy.Integer(int(digits))  # = sympy.Number(digits), without the string parser
                else:
                    number = base.parse_number(self, text)
                numbers[text] = number
            return number

        def create_parser(self, latex_str: str) -> Any:
            parser = base.create_parser(self, latex_str)
            parser._interp.predictionMode = PredictionMode.SLL
            parse_sll = parser.math

            def math() -> Any:
                try:
                    return parse_sll()
                except Exception:
                    return base.create_parser(self, latex_str).math()  # LL, as latex2sympy2 itself parses

            parser.math = math
            return parser

    latex2sympy2._Latex2Sympy = FastLatex2Sympy
    _parse_cache.clear()


def _exact_rational_mismatch(gold: Any, pred: Any) -> bool:
    """True for two exact rational numbers (no floats, no symbols) that differ yet lie within 1e-6 of each other.

    Math-verify accepts such pairs only through rounding (`evalf(chop=True)`: 2^{-99} = 2^{-98}, 1/2004! = 1/2006!).
    Pairs far apart that it accepts on purpose (50\\% = 50) are left alone.
    """
    import sympy

    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return False
    if not (gold.is_number and pred.is_number) or gold.has(sympy.Float) or pred.has(sympy.Float):
        return False
    gold_value, pred_value = gold.doit(), pred.doit()
    if not (gold_value.is_Rational and pred_value.is_Rational) or gold_value == pred_value:
        return False
    return bool(abs(gold_value - pred_value) < sympy.Rational(1, 10**6))


def grade_answer(prediction: str | None, gold: str, grader: str = "reference") -> bool:
    """Whether `prediction` is mathematically equivalent to `gold`; in process, no time limit (see `MathGrader`).

    reference (docs/evaluation.md#grading): None → False; `str()` both; wrap each in `$…$` if it has no `$`;
    `parse(…, fallback_mode="no_fallback")` each; `verify(gold, prediction)` (gold first: verify is not symmetric). On
    an exception: compare the strings with `$` and spaces removed, lowercased. strict: `normalize_strict` both first,
    and an exact rational check on top.
    """
    from math_verify import verify

    if prediction is None:
        return False
    if grader not in GRADERS:
        raise ValueError(f"unknown grader {grader!r}; choose one of {', '.join(GRADERS)}")
    pred_text, gold_text = str(prediction), str(gold)
    try:
        if grader == "strict":
            pred_text, gold_text = normalize_strict(pred_text), normalize_strict(gold_text)
        gold_parsed = _parse(_dollar_wrap(gold_text))
        pred_parsed = _parse(_dollar_wrap(pred_text))
        if grader == "reference":
            return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None))
        return any(
            verify(g, p, timeout_seconds=None) and not _exact_rational_mismatch(g, p)
            for g, p in product(gold_parsed, pred_parsed)
        )
    except Exception:

        def squash(s: str) -> str:
            return s.replace("$", "").replace(" ", "").lower()

        return squash(pred_text) == squash(gold_text)


# Generic answer shapes (not taken from any benchmark) graded once by each worker pool before it takes work: this
# imports sympy's lazily loaded modules (simplify, sets, solvers, matrices) and fills ANTLR's prediction cache (DFA)
# for common LaTeX constructs once in the zygote, instead of once in every worker. Verdicts do not depend on it.
WARM_UP_PAIRS: tuple[tuple[str, str], ...] = (
    ("0.5", "\\frac{1}{2}"),
    ("2\\sqrt{3}", "\\frac{\\sqrt{2}}{2}"),
    ("3\\pi", "\\dfrac{\\pi}{6}"),
    ("x^2+1", "(x+1)^2"),
    ("(1, 2)", "[1, 2)"),
    ("(-\\infty, 3] \\cup [5, \\infty)", "(-\\infty, 3)"),
    ("\\{1, 2\\}", "\\{2, 3\\}"),
    ("1, 2, 3", "3, 2, 1"),
    ("x = 4", "-4"),
    ("y = 2x + 1", "2x - y + 1 = 0"),
    ("x < 5", "(-\\infty, 5)"),
    ("50\\%", "0.25"),
    ("30^\\circ", "\\frac{\\pi}{6}"),
    ("10\\text{ cm}", "12"),
    ("\\text{(B)}", "\\text{yes}"),
    ("2^{10}", "1000"),
    ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("e^{2}", "7.389"),
    ("5!", "\\binom{5}{2}"),
    ("1+2i", "1-2i"),
    ("12,000", "\\log_2 8"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, 90)"),
    ("\\sqrt[3]{4}", "a^2 b"),
    ("-\\frac{5}{3}", "\\infty"),
)


def warm_up(grade: Callable[[str, str], bool]) -> None:
    """Grade `WARM_UP_PAIRS` in both orders with `grade`; results unused."""
    for a, b in WARM_UP_PAIRS:
        grade(a, b)
        grade(b, a)


def main(argv: list[str] | None = None) -> int:
    """`python eval/math_grader.py [--grader strict] [--timeout S] [--] PREDICTION GOLD`: print True/False.

    Answers often start with `-` (`-5`, `-\\frac{1}{2}`), so every argument that is not one of this command's options
    is an answer, wherever it stands; after `--` every argument is (for an answer spelled like an option, e.g.
    `-- --timeout 5`). A bad option or time limit is one line on stderr and exit status 2.
    """
    import math

    # Imported here, not at the top: the worker pool is built on this module, and the rule itself needs no pool.
    from pwopsd.evaluation.workers import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, MathGrader
    from pwopsd.io import ArgumentParser, UserError, run_main

    prog = "math_grader.py"
    valued = ("--grader", "--timeout")  # the options that take a value

    parser = ArgumentParser(
        prog=prog,
        usage="%(prog)s [-h] [--grader {reference,strict}] [--timeout S] [--] PREDICTION GOLD",
        description="Grade one prediction against one gold answer (prints True or False).",
        epilog="Arguments other than the options are the two answers, even when they start with '-' "
        "(math_grader.py -5 -5); after '--' every argument is an answer (math_grader.py -- --timeout --timeout).",
        allow_abbrev=False,  # `--time` is an answer, not an abbreviation of --timeout
    )
    parser.add_argument("--grader", choices=GRADERS, default="reference", help="grading rule (default reference)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"hard limit in seconds, > 0 and <= {MAX_TIMEOUT_S:g} (default {DEFAULT_TIMEOUT_S:g})",
    )

    def split(args: list[str]) -> tuple[list[str], list[str]]:
        """(option arguments for argparse, answers), so that argparse never sees an answer."""
        options: list[str] = []
        answers: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                answers += args[i + 1 :]
                break
            if arg in ("-h", "--help") or arg.startswith(tuple(f"{name}=" for name in valued)):
                options.append(arg)
            elif arg in valued:
                options += args[i : i + 2]  # its value, whatever it looks like (`--timeout -1`)
                i += 1
            else:
                answers.append(arg)
            i += 1
        return options, answers

    def run() -> int:
        options, answers = split(sys.argv[1:] if argv is None else list(argv))
        args = parser.parse_args(options)
        if len(answers) != 2:
            shown = " ".join(repr(a) for a in answers) or "none"
            raise UserError(
                f"expected 2 answers, PREDICTION and GOLD, got {len(answers)} ({shown}); quote an answer that "
                "contains spaces, and put '--' before answers spelled like an option (math_grader.py -- --timeout 5)"
            )
        if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT_S):
            raise UserError(
                f"--timeout must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}, got {args.timeout:g} "
                f"(default {DEFAULT_TIMEOUT_S:g})"
            )
        with MathGrader(args.grader, args.timeout, num_workers=1) as grader:
            print(grader.grade(*answers))
        return 0

    return run_main(run, prog)
