"""Answer extraction, math-equivalence grading and the clustered majority vote (SPEC §7.5–7.7, §11.1).

Parser / grader split, as in Math-Verify:

* `extract_boxed_answer(text)`: the last `\\boxed{...}` of a generation (SPEC §7.5).
* `grade_answer(prediction, gold)`: the reference rule (SPEC §7.6), in-process and without a time limit.
* `majority_vote(...)`: the clustered Maj@N with an INVALID cluster (SPEC §7.7); the one implementation used by
  `evaluate_math.py` and `recompute_majn.py`. It takes the grading function as an argument.
* `MathGrader`: what the tools use. It caches results by `(prediction, gold)`, grades problems in parallel, and runs
  every comparison in a pool of worker processes with a hard per-call time limit. Math-Verify's own limits use
  SIGALRM, which fails outside the main thread and cannot interrupt sympy inside C code; the workers run with those
  limits off, and a call that exceeds the limit has its worker killed and counts as "not equivalent" (never INVALID).

Graders (`--grader`):

* `reference` (default): SPEC §7.6 exactly, so numbers stay comparable with the paper.
* `strict` (opt-in) fixes plain parse bugs of the reference rule before comparing (SPEC §11.1):
  `\\mathrm{e}` / `\\operatorname{e}` → `e` (the reference parses `1-\\frac{1}{\\mathrm{e}}` as 1),
  `\\sqrt(x)` → `\\sqrt{x}` (the reference parses `4\\sqrt(2)` as 4), `\\$` removed (the reference can never parse a
  dollar amount such as MATH-500's gold `\\$18.90`), and an exact comparison of two exact rational numbers that the
  reference accepts only through rounding (`2^{-99}` = `2^{-98}`, `1/2004!` = `1/2006!`).
  Rounded decimals (`0.001736111` vs `\\frac{1}{576}`), percent = fraction, units and degrees stay accepted.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import product
from typing import Any

logger = logging.getLogger(__name__)

NO_BOXED_ANSWER = "[No boxed answer found]"
GRADERS = ("reference", "strict")
DEFAULT_TIMEOUT_S = 5.0
_WORKER_START_TIMEOUT_S = 120.0
_JOBS_PER_WORKER = 2  # jobs queued on a worker, so that it starts the next one without waiting for the parent
_QUEUED_JOB_MAX_BYTES = 32 << 10  # a larger job is sent to an idle worker only (it could fill a busy one's socket)
WORKER_MEMORY_LIMIT_BYTES = 4 << 30  # address space of one grading worker: a runaway answer fails, the machine lives

# ----------------------------------------------------------------------------------------------------------------------
# Extraction (SPEC §7.5)


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


# ----------------------------------------------------------------------------------------------------------------------
# Grading rule (SPEC §7.6, §11.1)

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
    """Wrap in `$…$` unless the text already contains a `$` (SPEC §7.6 step 2)."""
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
    """Whether `prediction` is mathematically equivalent to `gold` (SPEC §7.6); no time limit, see `MathGrader`.

    reference: None → False; `str()` both; wrap each in `$…$` if it has no `$`; `parse(…, fallback_mode="no_fallback")`
    each; `verify(gold, prediction)` (gold first: verify is not symmetric). On an exception: compare the strings with
    `$` and spaces removed, lowercased. strict: `normalize_strict` both first, and an exact rational check on top.
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


# ----------------------------------------------------------------------------------------------------------------------
# Clustering and the majority vote (SPEC §7.7)

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
    """Clustered Maj@N with an INVALID cluster (SPEC §7.7).

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


# ----------------------------------------------------------------------------------------------------------------------
# Worker processes with a hard per-call time limit
#
# A "zygote" process (`python math_grader.py --zygote GRADER FD`) imports math-verify and warms it up once, then forks a
# worker for each request on its control socket and hands the worker's socket back (SCM_RIGHTS). So N workers cost one
# start-up, and replacing a killed worker takes milliseconds. Worker protocol (one line per message over its socket):
# parent -> worker: a JSON job, {"problem": [predictions, formatted, gold], "known": [[pred, gold, verdict], ...]} or
# {"pair": [pred, gold], "known": [...]}; worker -> parent: "S <json [pred, gold]>" right before each comparison it
# computes (the parent times it from there), then "D <json result>" (the outcome and the verdicts it computed).


def _serve(sock: socket.socket, grader: str) -> None:
    """Worker loop: run jobs with `grade_problem`, caching verdicts across jobs; ends when the parent closes `sock`."""
    cache: dict[tuple[str, str], bool] = {}
    new: list[tuple[str, str, bool]] = []  # verdicts computed for the current job

    def grade(pred: str | None, gold: str) -> bool:
        if pred is None:
            return False
        key = (pred, gold)
        verdict = cache.get(key)
        if verdict is None:
            sock.sendall(b"S " + json.dumps(key).encode() + b"\n")
            verdict = cache[key] = grade_answer(pred, gold, grader)
            new.append((pred, gold, verdict))
        return verdict

    for line in sock.makefile("rb"):
        job = json.loads(line)
        for pred, gold, verdict in job["known"]:
            cache[(pred, gold)] = verdict
        new.clear()
        if "pair" in job:
            result: dict[str, Any] = {"verdict": grade(*job["pair"])}
        else:
            graded = grade_problem(*job["problem"], grade=grade)
            result = {"correct": graded.correct, "majority": asdict(graded.majority)}
        result["new"] = new
        result["cpu"] = time.process_time()  # this worker's CPU seconds so far (statistics)
        sock.sendall(b"D " + json.dumps(result).encode() + b"\n")


def _limit_memory(limit: int) -> None:
    """Cap this process's address space (MemoryError inside sympy -> "not equivalent"), where the OS allows it."""
    try:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass


def _zygote(control_fd: int, grader: str) -> None:
    """Warm up once, then fork one worker per byte received on the control socket; exit when it closes."""
    control = socket.socket(fileno=control_fd)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    install_fast_parsing()
    warm_up(functools.partial(grade_answer, grader=grader))  # imports, sympy's lazy modules and the parser's prediction cache, before any worker exists
    # Workers allocate many short-lived sympy objects: collect less often, and never scan what they inherit (which
    # would also copy the zygote's memory pages into every worker).
    gc.freeze()
    gc.set_threshold(100_000, 10, 10)

    def reap(block: bool) -> None:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, 0 if block else os.WNOHANG)[0]:
                pass

    while control.recv(1):
        reap(block=False)  # killed or finished workers
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker
            control.close()
            parent_end.close()
            _limit_memory(WORKER_MEMORY_LIMIT_BYTES)
            status = 0
            try:
                _serve(child_end, grader)
            except BaseException:
                logger.exception("grading worker failed")
                status = 1
            finally:
                os._exit(status)
        child_end.close()
        socket.send_fds(control, [str(pid).encode()], [parent_end.fileno()])
        parent_end.close()
    reap(block=True)  # the workers exit when the parent closes their sockets


class _Zygote:
    """The parent's handle on the zygote process."""

    def __init__(self, grader: str) -> None:
        self.control, child = socket.socketpair()
        self.proc = subprocess.Popen(
            # Not a command-line mode: the zygote is reached only through this call, never through the grading CLI.
            [sys.executable, "-c", f"from {__name__} import _zygote; _zygote({child.fileno()}, {grader!r})"],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # nothing is printed there; errors go to stderr
        )
        child.close()
        self.control.settimeout(_WORKER_START_TIMEOUT_S)

    def fork(self) -> _Worker:
        """A fresh worker (waits for the zygote's warm-up the first time)."""
        try:
            self.control.sendall(b"F")
            message, fds, _, _ = socket.recv_fds(self.control, 32, 1)
        except (OSError, TimeoutError) as e:
            raise RuntimeError(f"the grading worker pool did not answer ({type(e).__name__})") from e
        if not fds:
            raise RuntimeError(f"the grading worker pool failed to start (exit code {self.proc.poll()}); see above")
        return _Worker(socket.socket(fileno=fds[0]), int(message))

    def close(self) -> None:
        self.control.close()  # the zygote exits at end of input
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Worker:
    """The parent's view of one forked worker."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock, self.pid, self.fd = sock, pid, sock.fileno()
        self.buffer = b""
        self.jobs: deque[int] = deque()  # indices of the jobs sent to it and not yet answered, oldest (running) first
        self.call: tuple[str, str] | None = None  # comparison in progress
        self.call_started = 0.0
        self.cpu_s = 0.0  # CPU seconds it last reported

    def send(self, payload: bytes) -> bool:
        """Send one job line; False if the worker is gone."""
        try:
            self.sock.sendall(payload)
        except OSError:
            return False
        return True

    def read_lines(self) -> list[bytes] | None:
        """The complete lines available now; None at end of file (the worker exited)."""
        try:
            data = self.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            return None
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        return lines

    def close(self, kill: bool = False) -> None:
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.sock.close()  # a live worker exits at end of input


def default_num_workers() -> int:
    """Usable CPU cores, capped at 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class MathGrader:
    """Cached, parallel, time-limited grading with the `reference` or `strict` rule.

    Problems are graded in parallel by `num_workers` worker processes; each runs `grade_problem` with its own cache, and
    the parent keeps a global cache by `(prediction, gold)` whose relevant verdicts go out with every job. Each
    comparison has a hard limit of `timeout_seconds`: past it the worker is killed and replaced, the comparison counts
    as not equivalent, and the problem is re-run with that verdict known. Use as a context manager, or call `close()`.
    """

    def __init__(
        self, grader: str = "reference", timeout_seconds: float = DEFAULT_TIMEOUT_S, num_workers: int | None = None
    ) -> None:
        if grader not in GRADERS:
            raise ValueError(f"unknown grader {grader!r}; choose one of {', '.join(GRADERS)}")
        if timeout_seconds <= 0:
            raise ValueError(f"the grading time limit must be > 0 seconds, got {timeout_seconds}")
        if num_workers is not None and num_workers < 1:  # with no worker, a run would wait forever
            raise ValueError(f"the number of grading workers must be >= 1, got {num_workers}")
        self.grader = grader
        self.timeout_seconds = float(timeout_seconds)
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.timeouts = 0  # comparisons that hit the limit (or crashed their worker)
        self._cache: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()
        self._zygote: _Zygote | None = _Zygote(grader)  # starts warming up now; workers are forked on first use
        self._workers: list[_Worker] = []
        self._retired_cpu_s = 0.0  # CPU seconds of workers replaced so far

    def start(self) -> MathGrader:
        """Fork the workers now, waiting for the pool's warm-up, so that the first grading call starts at once."""
        if self._zygote is None:
            raise RuntimeError("this MathGrader is closed")
        with self._lock:
            while len(self._workers) < self.num_workers:
                self._workers.append(self._zygote.fork())
        return self

    @property
    def worker_cpu_s(self) -> float:
        """CPU seconds the workers have used on jobs so far, as they last reported them (a killed worker's last job
        is not counted)."""
        return self._retired_cpu_s + sum(w.cpu_s for w in self._workers)

    @property
    def busiest_worker_cpu_s(self) -> float:
        """CPU seconds of the live worker that has used the most so far: with a free core per worker, the grading
        would take about this long."""
        return max((w.cpu_s for w in self._workers), default=0.0)

    @property
    def cache_size(self) -> int:
        """Distinct (prediction, gold) pairs graded so far."""
        return len(self._cache)

    # -- public API -------------------------------------------------------------------------------------------------

    def grade(self, prediction: str | None, gold: str) -> bool:
        """`grade_answer(prediction, gold, self.grader)` under the time limit, cached by the two strings."""
        if prediction is None:
            return False
        key = (str(prediction), str(gold))
        if key not in self._cache:
            self._run([{"pair": list(key)}], strings=[set(key)])
        return self._cache[key]

    def grade_problems(
        self,
        problems: Sequence[tuple[Sequence[str | None], Sequence[bool], str]],
        progress: bool = True,
        desc: str = "grading",
    ) -> list[ProblemGrade]:
        """`grade_problem` for each `(predictions, formatted, gold)`, in parallel; results in input order."""
        jobs = []
        strings = []
        for predictions, formatted, gold in problems:
            predictions = [None if p is None else str(p) for p in predictions]
            jobs.append({"problem": [predictions, [bool(f) for f in formatted], str(gold)]})
            strings.append({p for p in predictions if p is not None} | {str(gold)})
        results = self._run(jobs, strings, progress=progress, desc=desc)
        graded = []
        for result in results:
            majority = result["majority"]
            graded.append(
                ProblemGrade(
                    correct=tuple(result["correct"]),
                    majority=MajorityVote(
                        correct=majority["correct"],
                        clusters=tuple(tuple(c) for c in majority["clusters"]),
                        invalid_cluster=majority["invalid_cluster"],
                        winner=majority["winner"],
                    ),
                )
            )
        return graded

    def close(self) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.close(kill=bool(worker.jobs))  # a busy worker (an error interrupted a run) is killed
        zygote, self._zygote = self._zygote, None
        if zygote is not None:
            zygote.close()

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_zygote", None) is not None:
            self.close()

    # -- scheduling ---------------------------------------------------------------------------------------------------

    def _payload(self, job: dict[str, Any], strings: set[str]) -> bytes:
        known = [[a, b, self._cache[(a, b)]] for a in strings for b in strings if (a, b) in self._cache]
        return json.dumps({**job, "known": known}).encode() + b"\n"

    def _replace(self, worker: _Worker) -> _Worker:
        worker.close(kill=True)
        self._retired_cpu_s += worker.cpu_s
        assert self._zygote is not None
        fresh = self._zygote.fork()
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def _run(
        self, jobs: list[dict[str, Any]], strings: list[set[str]], progress: bool = False, desc: str = "grading"
    ) -> list[dict[str, Any]]:
        """Run `jobs` on the pool under the per-comparison limit; the workers' results in job order."""
        from tqdm.auto import tqdm

        if self._zygote is None:
            raise RuntimeError("this MathGrader is closed")
        with self._lock, tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
            results: list[dict[str, Any] | None] = [None] * len(jobs)
            pending = deque(range(len(jobs)))
            failures: Counter[int] = Counter()

            def requeue(worker: _Worker, why: str) -> None:
                """Put the worker's outstanding jobs back at the front of the queue, in order."""
                if not worker.jobs:
                    return
                job = worker.jobs[0]
                if worker.call is not None:  # the comparison in flight is the culprit: not equivalent
                    self._cache[worker.call] = False
                    self.timeouts += 1
                    pred, gold = worker.call
                    logger.warning("grading %r vs %r %s: counted as not equivalent", pred[:80], gold[:80], why)
                else:
                    failures[job] += 1
                    if failures[job] > 2:
                        raise RuntimeError(f"grading worker keeps failing on job {job} ({why})")
                pending.extendleft(reversed(worker.jobs))
                worker.jobs.clear()

            while len(self._workers) < min(self.num_workers, len(jobs)):
                self._workers.append(self._zygote.fork())
            while pending or any(w.jobs for w in self._workers):
                for worker in list(self._workers):  # hand out work: each worker has its next job queued
                    while len(worker.jobs) < _JOBS_PER_WORKER and pending:
                        payload = self._payload(jobs[pending[0]], strings[pending[0]])
                        if worker.jobs and len(payload) > _QUEUED_JOB_MAX_BYTES:
                            break  # a busy worker reads it only after its job, while its own messages may be unread
                        worker.jobs.append(pending.popleft())
                        if not worker.send(payload):  # gone (e.g. died while idle): its replacement takes the jobs
                            requeue(worker, "lost its worker")
                            worker = self._replace(worker)
                now = time.monotonic()
                deadlines = [w.call_started + self.timeout_seconds for w in self._workers if w.call is not None]
                wait = max(0.0, min(deadlines) - now) if deadlines else None
                busy = {w.fd: w for w in self._workers if w.jobs}
                readable, _, _ = select.select(list(busy), [], [], wait)
                now = time.monotonic()
                for fd in readable:
                    worker = busy[fd]
                    lines = worker.read_lines()
                    if lines is None:  # the worker died
                        requeue(worker, "crashed its worker")
                        self._replace(worker)
                        continue
                    for line in lines:
                        if line.startswith(b"S "):
                            pred, gold = json.loads(line[2:])
                            worker.call, worker.call_started = (pred, gold), now
                        elif line.startswith(b"D "):
                            result = json.loads(line[2:])
                            worker.cpu_s = result.pop("cpu")
                            for pred, gold, verdict in result.pop("new"):
                                self._cache[(pred, gold)] = verdict
                            results[worker.jobs.popleft()] = result
                            worker.call = None
                            bar.update(1)
                for worker in list(self._workers):  # enforce the limits
                    if worker.call is not None and now - worker.call_started > self.timeout_seconds:
                        requeue(worker, f"exceeded {self.timeout_seconds:g} s")
                        self._replace(worker)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """`python eval/math_grader.py PREDICTION GOLD [--grader strict] [--timeout S]`: print True/False."""
    import argparse

    parser = argparse.ArgumentParser(description="Grade one prediction against one gold answer.")
    parser.add_argument("prediction")
    parser.add_argument("gold")
    parser.add_argument("--grader", choices=GRADERS, default="reference")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="hard limit in seconds")
    args = parser.parse_args(argv)
    with MathGrader(args.grader, args.timeout, num_workers=1) as grader:
        print(grader.grade(args.prediction, args.gold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
