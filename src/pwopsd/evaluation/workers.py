"""The grading worker pool: cached, parallel grading with a hard time limit on every comparison.

`MathGrader` is what the tools use to grade (the evaluator, `recompute_majn.py`, `eval/math_grader.py`). It exists
because the grading rule (`grade.grade_answer`) cannot be trusted to return: sympy can take minutes or all memory on
a pathological answer, and math-verify's own time limits use SIGALRM, which fails outside the main thread and cannot
interrupt sympy inside C code. So every comparison runs in a worker process with math-verify's limits off, and a
comparison past the limit has its worker killed and replaced; it counts as "not equivalent" (never INVALID), and its
problem is graded again with that verdict known (docs/evaluation.md#grading). The pool also makes grading fast:
problems are graded in parallel, verdicts are cached by `(prediction, gold)`, and each worker parses every string once.

How it works. A "zygote" process, started with `python -c` (it is not a command-line mode of any tool), imports
math-verify and warms it up once, then forks a worker for each request on its control socket and hands the worker's
socket back (SCM_RIGHTS). So N workers cost one start-up, and replacing a killed worker takes milliseconds. A worker
runs `vote.grade_problem` on each job. Worker protocol (one line per message over its socket):
parent -> worker: a JSON job, {"problem": [predictions, formatted, gold], "known": [[pred, gold, verdict], ...]} or
{"pair": [pred, gold], "known": [...]}; worker -> parent: "S <json [pred, gold]>" right before each comparison it
computes (the parent times it from there), then "D <json result>" (the outcome and the verdicts it computed).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pwopsd.evaluation.grade import GRADERS, grade_answer, install_fast_parsing, warm_up
from pwopsd.evaluation.vote import MajorityVote, ProblemGrade, grade_problem

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 1e6  # longer waits overflow select() (near 1e10 s); 11 days is "no limit" for one comparison
_WORKER_START_TIMEOUT_S = 120.0
_JOBS_PER_WORKER = 2  # jobs queued on a worker, so that it starts the next one without waiting for the parent
_QUEUED_JOB_MAX_BYTES = 32 << 10  # a larger job is sent to an idle worker only (it could fill a busy one's socket)
WORKER_MEMORY_LIMIT_BYTES = 4 << 30  # address space of one grading worker: a runaway answer fails, the machine lives

# ----------------------------------------------------------------------------------------------------------------------
# The worker side: the zygote and the workers it forks


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
    # Imports, sympy's lazily loaded modules and the parser's prediction cache, once, before any worker exists.
    warm_up(functools.partial(grade_answer, grader=grader))
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


# ----------------------------------------------------------------------------------------------------------------------
# The parent side: handles on the zygote and the workers, and the pool


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


@dataclass
class _Run:
    """The state of one `MathGrader._run` call: its jobs, their results so far and the queue of jobs to hand out."""

    jobs: list[dict[str, Any]]
    strings: list[set[str]]  # per job: the answer strings whose known verdicts go out with it
    bar: Any  # tqdm progress bar, one step per finished job
    results: list[dict[str, Any] | None] = field(init=False)
    pending: deque[int] = field(init=False)  # indices of the jobs not handed out, next first
    failures: Counter[int] = field(default_factory=Counter)  # per job: worker losses with no comparison to blame

    def __post_init__(self) -> None:
        self.results = [None] * len(self.jobs)
        self.pending = deque(range(len(self.jobs)))


def _problem_grade(result: dict[str, Any]) -> ProblemGrade:
    """A worker's JSON result of a problem job, as the `ProblemGrade` that `grade_problem` returned in the worker."""
    majority = result["majority"]
    return ProblemGrade(
        correct=tuple(result["correct"]),
        majority=MajorityVote(
            correct=majority["correct"],
            clusters=tuple(tuple(c) for c in majority["clusters"]),
            invalid_cluster=majority["invalid_cluster"],
            winner=majority["winner"],
        ),
    )


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
        if not 0 < timeout_seconds <= MAX_TIMEOUT_S:  # NaN fails this test too
            raise ValueError(
                f"the grading time limit must be > 0 and <= {MAX_TIMEOUT_S:g} seconds, got {timeout_seconds}"
            )
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
            self._fork_workers(self.num_workers)
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
        return [_problem_grade(result) for result in self._run(jobs, strings, progress=progress, desc=desc)]

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

    def _run(
        self, jobs: list[dict[str, Any]], strings: list[set[str]], progress: bool = False, desc: str = "grading"
    ) -> list[dict[str, Any]]:
        """Run `jobs` on the pool under the per-comparison limit; the workers' results in job order.

        Each round hands out work, waits for messages until the nearest deadline of a comparison in flight, reads
        them, and kills the workers whose comparison is past the limit.
        """
        from tqdm.auto import tqdm

        if self._zygote is None:
            raise RuntimeError("this MathGrader is closed")
        with self._lock, tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
            run = _Run(jobs, strings, bar)
            self._fork_workers(min(self.num_workers, len(jobs)))
            while run.pending or any(w.jobs for w in self._workers):
                self._hand_out(run)
                busy = {w.fd: w for w in self._workers if w.jobs}
                readable, _, _ = select.select(list(busy), [], [], self._time_to_next_deadline())
                now = time.monotonic()
                for fd in readable:
                    self._read_messages(run, busy[fd], now)
                self._enforce_time_limit(run, now)
        assert all(r is not None for r in run.results)
        return run.results  # type: ignore[return-value]

    def _fork_workers(self, count: int) -> None:
        """Fork workers until the pool has `count` of them."""
        assert self._zygote is not None
        while len(self._workers) < count:
            self._workers.append(self._zygote.fork())

    def _hand_out(self, run: _Run) -> None:
        """Send jobs from the front of the queue until each worker has its next job queued behind the running one."""
        for worker in list(self._workers):
            while len(worker.jobs) < _JOBS_PER_WORKER and run.pending:
                payload = self._payload(run.jobs[run.pending[0]], run.strings[run.pending[0]])
                if worker.jobs and len(payload) > _QUEUED_JOB_MAX_BYTES:
                    break  # a busy worker reads it only after its job, while its own messages may be unread
                worker.jobs.append(run.pending.popleft())
                if not worker.send(payload):  # gone (e.g. died while idle): its replacement takes the jobs
                    self._requeue(run, worker, "lost its worker")
                    worker = self._replace(worker)

    def _payload(self, job: dict[str, Any], strings: set[str]) -> bytes:
        """The job's line for a worker, with the cached verdicts between its strings."""
        known = [[a, b, self._cache[(a, b)]] for a in strings for b in strings if (a, b) in self._cache]
        return json.dumps({**job, "known": known}).encode() + b"\n"

    def _time_to_next_deadline(self) -> float | None:
        """Seconds until the earliest comparison in flight reaches the limit (0 if past it); None if none is."""
        now = time.monotonic()
        deadlines = [w.call_started + self.timeout_seconds for w in self._workers if w.call is not None]
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _read_messages(self, run: _Run, worker: _Worker, now: float) -> None:
        """Handle what a worker sent: a comparison started ("S"), a job done ("D"), or its death (end of file)."""
        lines = worker.read_lines()
        if lines is None:  # the worker died
            self._requeue(run, worker, "crashed its worker")
            self._replace(worker)
            return
        for line in lines:
            if line.startswith(b"S "):
                pred, gold = json.loads(line[2:])
                worker.call, worker.call_started = (pred, gold), now
            elif line.startswith(b"D "):
                result = json.loads(line[2:])
                worker.cpu_s = result.pop("cpu")
                for pred, gold, verdict in result.pop("new"):
                    self._cache[(pred, gold)] = verdict
                run.results[worker.jobs.popleft()] = result
                worker.call = None
                run.bar.update(1)

    def _enforce_time_limit(self, run: _Run, now: float) -> None:
        """Kill and replace every worker whose comparison in flight has run past the limit."""
        for worker in list(self._workers):
            if worker.call is not None and now - worker.call_started > self.timeout_seconds:
                self._requeue(run, worker, f"exceeded {self.timeout_seconds:g} s")
                self._replace(worker)

    def _requeue(self, run: _Run, worker: _Worker, why: str) -> None:
        """Put the worker's outstanding jobs back at the front of the queue, in order.

        The comparison in flight, if any, is the culprit: it is cached as not equivalent, so the re-run job gets past
        it. A job lost with no comparison in flight is retried twice, then the run fails.
        """
        if not worker.jobs:
            return
        job = worker.jobs[0]
        if worker.call is not None:  # the comparison in flight is the culprit: not equivalent
            self._cache[worker.call] = False
            self.timeouts += 1
            pred, gold = worker.call
            logger.warning("grading %r vs %r %s: counted as not equivalent", pred[:80], gold[:80], why)
        else:
            run.failures[job] += 1
            if run.failures[job] > 2:
                raise RuntimeError(f"grading worker keeps failing on job {job} ({why})")
        run.pending.extendleft(reversed(worker.jobs))
        worker.jobs.clear()

    def _replace(self, worker: _Worker) -> _Worker:
        """Kill `worker` and put a freshly forked one in its place."""
        worker.close(kill=True)
        self._retired_cpu_s += worker.cpu_s
        assert self._zygote is not None
        fresh = self._zygote.fork()
        self._workers[self._workers.index(worker)] = fresh
        return fresh
