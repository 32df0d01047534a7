"""Every GPU figure the project claims, in one run that downloads nothing: the driver behind bench/gpu_check.sh.

Parts, each in its own process group with its own time limit; a failing part never stops the next one:

  wheels             install .whl/*.whl (and a deepspeed sdist) into WORK/site, put it first on PYTHONPATH
  env                Python, torch, CUDA device, package versions
  loss_memory        bench/loss_memory.py at full size (B x T = 4 x 1024, H 2560, V 151,936): all methods and
                     variants (dense, chunked, fused; the fused one compiles cold in each process), 1 round
  model              bench/gpu_model.py: random Qwen3 with Qwen3-4B's exact dimensions, built on the GPU, saved
  accelerate_zero2   two optimizer steps of code/ea_opsd_train.py through `accelerate launch --config_file
                     code/accelerate_4gpu.yaml --num_processes 1` (DeepSpeed ZeRO-2), no vLLM, 8-row dataset
  train_loss_dense / train_loss_chunked / train_steps_dense / train_steps_chunked
                     bench/train_step.py workers on that model: one micro-batch (T = 1024) and two optimizer steps
                     (transformers rollouts of 128 tokens), each after a warm-up
  eval_hf            eval/evaluate_math.py --backend hf on that model, timed end to end
  eval_hf_tokens     bench/gpu_eval_backend.py: the same backend's generation tokens/s, exact token counts
  loss_memory_T4096  bench/loss_memory.py --methods pwopsd --seq 4096

stdout carries JSON lines only: one per measurement, each with "part", "status" (ok / skipped / failed), "device"
(the CUDA device's name, or "cpu") and "size"; a skipped part's "reason" starts with "skipped: ". The last line is
the summary (part "summary": lists ok / skipped / failed). Progress goes to stderr. The same lines go to
RESULTS/gpu_check.jsonl as they are printed, every part's whole output to RESULTS/gpu_check.log, where RESULTS is
$OUT when set (the device tool returns it), else WORK/out.

SIZE=small (or --size small): the same parts on CPU with a tiny model and tiny loss shapes, a dry run of every command
in a few minutes. The ZeRO-2 run uses DeepSpeed's CPU accelerator where deepspeed is installed (with --bf16 true, which
CUDA would default to; the first run JIT-builds a DeepSpeed op, ~2 min), else `accelerate launch --cpu`.
Stdlib only, so a broken torch still yields the JSON lines that say so.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import site
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROG = "gpu_check"
LOG_TAIL_BYTES = 400_000  # per part in gpu_check.log (the device tool returns files up to 16 MiB)
ENV_PACKAGES = (
    "torch", "transformers", "trl", "peft", "accelerate", "datasets", "math-verify", "deepspeed", "tokenizers",
    "pyarrow", "fsspec", "pydantic", "safetensors",
)  # fmt: skip


@dataclass(frozen=True)
class Size:
    """Shapes of one run size (full: the figures; small: the CPU dry run)."""

    loss_args: tuple[str, ...]
    loss_long_args: tuple[str, ...]
    loss_length: int  # train_step: completion width of the micro-batch
    completion_length: int  # train_step: rollout length of the optimizer steps
    chunk: int  # --loss_chunk_size of the chunked path
    repeats: int  # timed micro-batches
    eval_samples: int
    eval_val_n: int
    eval_new_tokens: int
    zero2_completion: int
    zero2_lora_r: int
    budget_s: int  # whole-run limit; a part gets at most what is left


SIZES = {
    "full": Size(
        loss_args=("--rounds", "1", "--repeats", "2"),
        loss_long_args=("--methods", "pwopsd", "--seq", "4096", "--rounds", "1", "--repeats", "1",
                        "--trainable-methods"),
        loss_length=1024, completion_length=128, chunk=256, repeats=2,
        eval_samples=4, eval_val_n=4, eval_new_tokens=64,
        zero2_completion=128, zero2_lora_r=64, budget_s=570,
    ),
    "small": Size(
        loss_args=("--methods", "opsd", "eopd", "pwopsd", "reopold", "--trainable-methods", "opsd", "--hidden", "64",
                   "--vocab", "2048", "--batch", "1", "--seq", "64", "--rounds", "1", "--repeats", "1"),
        loss_long_args=("--methods", "pwopsd", "--seq", "256", "--hidden", "64", "--vocab", "2048", "--batch", "1",
                        "--rounds", "1", "--repeats", "1", "--trainable-methods"),
        loss_length=64, completion_length=16, chunk=16, repeats=1,
        eval_samples=2, eval_val_n=2, eval_new_tokens=16,
        zero2_completion=16, zero2_lora_r=8, budget_s=1500,
    ),
}  # fmt: skip


@dataclass
class Ctx:
    """What the parts share: paths, interpreter, environment, and what earlier parts found."""

    size_name: str
    size: Size
    python: str
    work: Path
    results: Path
    env: dict[str, str]
    deadline: float
    device: str = "unknown"  # nvidia-smi's name until the env part reads torch's
    cuda: bool = False
    env_ok: bool = False
    part_wall_s: float = 0.0  # wall time of the part being parsed
    versions: dict[str, str | None] = field(default_factory=dict)
    ok: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def model(self) -> Path:
        return self.work / ("qwen3_4b_dims" if self.size_name == "full" else "qwen3_small")


class PartError(Exception):
    """A part ran but its output does not hold the figures it should."""


@dataclass(frozen=True)
class Part:
    name: str
    timeout_s: int
    command: Callable[[Ctx], list[str]]
    parse: Callable[[Ctx, str], list[dict]]  # stdout -> measurement lines (figures, without part/device/status)
    needs: tuple[str, ...] = ()  # importable modules
    needs_model: bool = False
    why_not: Callable[[Ctx], str | None] = lambda ctx: None  # a reason to skip, decided when the part's turn comes
    prepare: Callable[[Ctx], None] = lambda ctx: None


# ---------------------------------------------------------------------------------------------------------------------
# Output


def emit(ctx: Ctx, part: str, status: str, figures: dict) -> None:
    """One JSON line on stdout and in RESULTS/gpu_check.jsonl; the part, status, device and size keys are ours."""
    mine = {"part": part, "status": status, "device": ctx.device, "size": ctx.size_name}
    line = json.dumps({**mine, **{k: v for k, v in figures.items() if k not in mine}}, default=str)
    print(line, flush=True)
    with (ctx.results / "gpu_check.jsonl").open("a", encoding="utf-8") as f:
        f.write(line + "\n")


def progress(message: str) -> None:
    print(f"[{PROG} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def append_log(ctx: Ctx, name: str, header: str, stdout: str, stderr: str) -> None:
    with (ctx.results / "gpu_check.log").open("a", encoding="utf-8") as f:
        f.write(
            f"\n##### {name}: {header}\n--- stdout\n{stdout[-LOG_TAIL_BYTES:]}\n--- stderr\n{stderr[-LOG_TAIL_BYTES:]}\n"
        )


def last_json(stdout: str) -> dict:
    """The last stdout line that is a JSON object (the benchmarks' convention)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise PartError("no JSON object in the output")


def tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt)\b|[\w.\-]+: error: )")
LAUNCHER_ERRORS = ("CalledProcessError", "ChildFailedError")  # a launcher's own report of a failed child


def error_summary(stdout: str, stderr: str) -> str:
    """The failing process's own error line (a traceback's last line, or a one-line `PROG: error: ...`), not the
    launcher's report that a child failed; else the last lines of the output."""
    for line in reversed((stderr + "\n" + stdout).splitlines()):
        line = line.strip()
        if ERROR_LINE.match(line) and not any(name in line for name in LAUNCHER_ERRORS):
            return line[:2000]
    return tail(stderr or stdout)


# ---------------------------------------------------------------------------------------------------------------------
# Running one command


class GpuMemorySampler:
    """Largest `nvidia-smi` memory.used (MiB, all processes, CUDA contexts included) while a part runs."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuMemorySampler:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=10, check=False,
                ).stdout  # fmt: skip
                used = max(int(v) for v in out.split())
                self.peak = used if self.peak is None else max(self.peak, used)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=15)


def run_command(
    ctx: Ctx, name: str, cmd: list[str], timeout_s: float, env: dict[str, str]
) -> tuple[int | None, str, str]:
    """Run `cmd` in a new session (so a timeout ends its whole process tree); (exit code or None on timeout, stdout,
    stderr). Output goes to files, so what a killed part printed is kept."""
    out_path, err_path = ctx.work / "logs" / f"{name}.out", ctx.work / "logs" / f"{name}.err"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    read = lambda p: p.read_text(encoding="utf-8", errors="replace")  # noqa: E731
    return rc, read(out_path), read(err_path)


def run_part(ctx: Ctx, part: Part) -> None:
    """Decide whether the part can run, run it under its time limit, print its lines; never raises."""
    reason = skip_reason(ctx, part)
    if reason:
        progress(f"{part.name}: {reason}")
        ctx.skipped.append(part.name)
        emit(ctx, part.name, "skipped", {"reason": reason})
        return
    timeout_s = min(part.timeout_s, ctx.deadline - time.monotonic() - 5)
    start = time.monotonic()
    try:
        part.prepare(ctx)
        cmd = part.command(ctx)
        shown = " ".join(cmd).replace("\n", " ")
        progress(f"{part.name}: running (limit {timeout_s:.0f} s): {shown[:400]}")
        with GpuMemorySampler(ctx.cuda) as sampler:
            rc, stdout, stderr = run_command(ctx, part.name, cmd, timeout_s, ctx.env)
        wall_s = round(time.monotonic() - start, 1)
        append_log(ctx, part.name, f"exit {rc} after {wall_s} s: {' '.join(cmd)}", stdout, stderr)
        if rc is None:
            raise PartError(
                f"timed out after {timeout_s:.0f} s (its limit, or what was left of BUDGET); last output: "
                f"{tail(stderr or stdout)}"
            )
        if rc != 0:
            raise PartError(f"exit {rc}: {error_summary(stdout, stderr)}")
        ctx.part_wall_s = wall_s
        lines = part.parse(ctx, stdout)
    except Exception as e:  # a part's failure is a JSON line, never the end of the run
        wall_s = round(time.monotonic() - start, 1)
        progress(f"{part.name}: FAILED after {wall_s} s: {e}")
        ctx.failed.append(part.name)
        emit(ctx, part.name, "failed", {"wall_s": wall_s, "error": str(e) if isinstance(e, PartError) else repr(e)})
        return
    progress(f"{part.name}: ok in {wall_s} s")
    ctx.ok.append(part.name)
    for figures in lines:
        emit(ctx, part.name, "ok", {**figures, "part_wall_s": wall_s, "gpu_mem_used_max_mb": sampler.peak})


def skip_reason(ctx: Ctx, part: Part) -> str | None:
    left = ctx.deadline - time.monotonic()
    if left < 20:
        return f"skipped: the run's time budget is spent ({left:.0f} s left; raise BUDGET)"
    if part.name not in ("wheels", "env"):
        if not ctx.env_ok:
            return "skipped: the env part found no working torch (see its line)"
        if ctx.size_name == "full" and not ctx.cuda:
            return "skipped: no CUDA device (torch.cuda.is_available() is False); SIZE=small runs the CPU dry run"
    missing = [m for m in part.needs if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join(m.replace("_", "-") for m in missing)
        return f"skipped: missing package(s) {names}; carry them as wheels (bash bench/gpu_wheels.sh, carry .whl)"
    if part.needs_model and "model" not in ctx.ok:
        return "skipped: the model part did not produce the model (see its line)"
    return part.why_not(ctx)


# ---------------------------------------------------------------------------------------------------------------------
# The parts


def wheels_command(ctx: Ctx) -> list[str]:
    """One shell line: the wheels, then each sdist (deepspeed) without build isolation or compiled ops."""
    site = ctx.work / "site"
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    sdists = sorted(str(p) for p in (ROOT / ".whl").glob("*.tar.gz"))
    pip = [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site)]  # fmt: skip
    steps = []
    if wheels:
        steps.append(" ".join(map(shlex.quote, [*pip, *wheels])))
    for sdist in sdists:
        steps.append("DS_BUILD_OPS=0 " + " ".join(map(shlex.quote, [*pip, "--no-build-isolation", sdist])))
    steps.append(
        f"{shlex.quote(ctx.python)} -c 'import json, os; print(json.dumps(sorted(os.listdir({str(site)!r}))))'"
    )
    return ["bash", "-c", "set -e; " + " && ".join(steps)]


def wheels_why_not(ctx: Ctx) -> str | None:
    if ctx.size_name != "full" and os.environ.get("WHEELS") != "1":  # first: the answer must not depend on .whl/
        return "skipped: SIZE=small uses the current environment (WHEELS=1 installs .whl/ anyway)"
    if not any((ROOT / ".whl").glob("*.whl")) and not any((ROOT / ".whl").glob("*.tar.gz")):
        return "skipped: no .whl/ folder with wheels at the repository root (bash bench/gpu_wheels.sh makes one)"
    return None


def wheels_parse(ctx: Ctx, stdout: str) -> list[dict]:
    target = str(ctx.work / "site")
    ctx.env["PYTHONPATH"] = os.pathsep.join([target, *ctx.env["PYTHONPATH"].split(os.pathsep)])
    # the carried wheels' site directory, for this driver's own package checks (the parts get it via PYTHONPATH)
    site.addsitedir(target)
    importlib.invalidate_caches()
    installed = json.loads(stdout.strip().splitlines()[-1])
    return [{"site": target, "dist_info": [n for n in installed if n.endswith(".dist-info")]}]


ENV_SNIPPET = r"""
import importlib.metadata as m, json, os, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable, "cpus": os.cpu_count()}
info["packages"] = {}
for name in NAMES:
    try:
        info["packages"][name] = m.version(name)
    except m.PackageNotFoundError:
        info["packages"][name] = None
import torch
info["cuda"] = torch.cuda.is_available()
info["torch_cuda"] = torch.version.cuda
if info["cuda"]:
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gb=round(p.total_memory / 2**30, 1),
                gpus=torch.cuda.device_count())
else:
    info["device"] = "cpu"
import pwopsd
info["pwopsd"] = os.path.dirname(pwopsd.__file__)
print(json.dumps(info))
"""


def env_command(ctx: Ctx) -> list[str]:
    return [ctx.python, "-c", ENV_SNIPPET.replace("NAMES", repr(ENV_PACKAGES))]


def env_parse(ctx: Ctx, stdout: str) -> list[dict]:
    info = last_json(stdout)
    ctx.device, ctx.cuda, ctx.versions, ctx.env_ok = info["device"], bool(info["cuda"]), info["packages"], True
    if ctx.size_name == "small" and not ctx.cuda:
        ctx.env.setdefault("OMP_NUM_THREADS", "1")  # a CPU dry run on a shared machine
    return [info]


MD_NUMBER = re.compile(r"^-?[\d.]+(e[-+]?\d+)?[x×]?$")


MD_SEPARATOR = re.compile(r"^\|[-:| ]+\|$")


def markdown_rows(stdout: str) -> list[dict]:
    """The rows of every markdown table in `stdout`, keyed by its normalised header (new columns pass through)."""
    rows: list[dict] = []
    header: list[str] | None = None
    previous = ""
    for line in (line.strip() for line in stdout.splitlines()):
        if not line.startswith("|"):
            header = None
        elif MD_SEPARATOR.match(line):
            header = [re.sub(r"[^a-z0-9]+", "_", c.strip().lower()).strip("_") for c in previous.strip("|").split("|")]
        elif header:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append({k: float(c.rstrip("x×")) if MD_NUMBER.match(c) else c for k, c in zip(header, cells)})
        previous = line
    return rows


def loss_parse(ctx: Ctx, stdout: str) -> list[dict]:
    summary = last_json(stdout)
    config = next((line[2:] for line in stdout.splitlines() if line.startswith("# ")), "")
    rows = [{"kind": "row", **row} for row in markdown_rows(stdout)]
    return [*rows, {"kind": "summary", "config": config, **summary}]


def loss_command(long: bool) -> Callable[[Ctx], list[str]]:
    def command(ctx: Ctx) -> list[str]:
        args = ctx.size.loss_long_args if long else ctx.size.loss_args
        device = ["--device", "cpu"] if not ctx.cuda else []
        return [ctx.python, "bench/loss_memory.py", *args, *device]

    return command


def model_command(ctx: Ctx) -> list[str]:
    return [ctx.python, "bench/gpu_model.py", "--out", str(ctx.model), "--size", ctx.size_name]


def single_json(ctx: Ctx, stdout: str) -> list[dict]:
    return [last_json(stdout)]


def train_command(path: str, kind: str) -> Callable[[Ctx], list[str]]:
    """A bench/train_step.py worker (it takes a model folder in its JSON config) on the local model."""

    def command(ctx: Ctx) -> list[str]:
        s = ctx.size
        cfg = {
            "name": "qwen3_4b_dims" if ctx.size_name == "full" else "qwen3_small",
            "model": str(ctx.model),
            "path": path,
            "part": kind,
            "completion_length": s.completion_length,
            "loss_length": s.loss_length,
            "chunk": s.chunk,
            "steps": 2,
            "repeats": s.repeats,
        }
        return [ctx.python, "bench/train_step.py", "--worker", json.dumps(cfg)]

    return command


def eval_output(ctx: Ctx) -> Path:
    return ctx.work / "eval_hf" / "result.json"


def eval_prepare(ctx: Ctx) -> None:
    shutil.rmtree(eval_output(ctx).parent, ignore_errors=True)  # no resume from an earlier run's partial file
    eval_output(ctx).parent.mkdir(parents=True)


def eval_command(ctx: Ctx) -> list[str]:
    s = ctx.size
    return [ctx.python, "eval/evaluate_math.py", "--base_model", str(ctx.model), "--dataset", "math500",
            "--num_samples", str(s.eval_samples), "--val_n", str(s.eval_val_n), "--max_new_tokens",
            str(s.eval_new_tokens), "--backend", "hf", "--seed", "0", "--output_file", str(eval_output(ctx))]  # fmt: skip


def eval_parse(ctx: Ctx, stdout: str) -> list[dict]:
    result = json.loads(eval_output(ctx).read_text(encoding="utf-8"))
    shutil.copyfile(eval_output(ctx), ctx.results / "eval_hf.json")
    problems = len(result["results"])
    samples = sum(len(r["generations"]) for r in result["results"])
    s = ctx.size
    if result.get("backend") != "hf" or problems != s.eval_samples or samples != s.eval_samples * s.eval_val_n:
        raise PartError(f"unexpected result: backend {result.get('backend')}, {problems} problems, {samples} samples")
    metrics = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    # End to end (start-up, model load and grading included): at most samples x max_new_tokens generated tokens.
    upper = round(samples * s.eval_new_tokens / ctx.part_wall_s, 1)
    return [
        {"backend": "hf", "problems": problems, "samples": samples, "max_tokens_per_s_end_to_end": upper, **metrics}
    ]


def eval_tokens_command(ctx: Ctx) -> list[str]:
    s = ctx.size
    return [ctx.python, "bench/gpu_eval_backend.py", "--model", str(ctx.model), "--num_samples", str(s.eval_samples),
            "--val_n", str(s.eval_val_n), "--max_new_tokens", str(s.eval_new_tokens)]  # fmt: skip


def zero2_dir(ctx: Ctx) -> Path:
    return ctx.work / "zero2"


def zero2_prepare(ctx: Ctx) -> None:
    """A fresh output folder (a leftover checkpoint would be resumed) and the first 8 GSM8K training rows."""
    shutil.rmtree(zero2_dir(ctx), ignore_errors=True)
    zero2_dir(ctx).mkdir(parents=True)
    with (ROOT / "data" / "gsm8k_train.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(8))]
    (ctx.work / "train8.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero2_deepspeed(ctx: Ctx) -> bool:
    """DeepSpeed on CUDA always (else the part is skipped); on CPU when it is installed (its CPU accelerator runs
    ZeRO-2 too, after a one-time JIT build of its shared-memory op), else accelerate's CPU launcher."""
    return ctx.cuda or importlib.util.find_spec("deepspeed") is not None


def zero2_command(ctx: Ctx) -> list[str]:
    s = ctx.size
    cpu_bf16: list[str] = []
    if zero2_deepspeed(ctx):
        engine = ["--config_file", "code/accelerate_4gpu.yaml", "--num_processes", "1", "--gradient_accumulation_steps",
                  "1", "--main_process_port", str(free_port())]  # fmt: skip
        if not ctx.cuda:  # the YAML's bf16 must match the Trainer's, whose bf16 defaults to on only with CUDA
            cpu_bf16 = ["--bf16", "true"]
    else:  # the same training command through accelerate's CPU launcher
        engine = ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no"]  # fmt: skip
    dtype = "bfloat16" if ctx.cuda or cpu_bf16 else "float32"
    out = zero2_dir(ctx) / "run"
    return [
        ctx.python, "-m", "accelerate.commands.launch", *engine, "code/ea_opsd_train.py",
        "--model_name_or_path", str(ctx.model), "--dataset_name", str(ctx.work / "train8.jsonl"),
        "--method", "pwopsd", "--output_dir", str(out), "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--learning_rate", "5e-6", "--max_grad_norm", "0.1", "--gradient_checkpointing",
        "--max_completion_length", str(s.zero2_completion), "--max_length", "2048",
        "--attn_implementation", "sdpa", "--torch_dtype", dtype, *cpu_bf16, "--beta", "0",
        "--use_peft", "--lora_r", str(s.zero2_lora_r), "--lora_alpha", str(2 * s.zero2_lora_r),
        "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "--temperature", "1.1", "--top_p", "0.95", "--top_k", "20", "--lmbda", "1",
        "--fixed_teacher", "--jsd_token_clip", "0.05", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip


def zero2_why_not(ctx: Ctx) -> str | None:
    if ctx.cuda and importlib.util.find_spec("deepspeed") is None:
        return ("skipped: missing package deepspeed (an sdist: bash bench/gpu_wheels.sh puts it in .whl/, this "
                "script installs it with DS_BUILD_OPS=0 pip install --no-build-isolation --no-deps)")  # fmt: skip
    return None


def trainer_logs(stdout: str) -> list[dict]:
    """The Trainer's printed log dicts (`{'loss': ...}` lines, printed by rank 0)."""
    logs = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}") and ("'loss'" in line or "'train_runtime'" in line):
            try:
                value = ast.literal_eval(line)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, dict):
                logs.append({k: number(v) for k, v in value.items()})
    return logs


def number(value: object) -> object:
    """A float for a number or a numeric string (the Trainer prints formatted strings), else the value."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def zero2_parse(ctx: Ctx, stdout: str) -> list[dict]:
    out = zero2_dir(ctx) / "run"
    logs = trainer_logs(stdout)
    steps = [log for log in logs if "loss" in log]
    final = next((log for log in logs if "train_runtime" in log), {})
    checkpoint = out / "checkpoint-2"
    deepspeed = zero2_deepspeed(ctx)
    engine = "accelerate --cpu, 1 process (deepspeed is not installed)"
    if deepspeed:
        engine = "accelerate + DeepSpeed ZeRO-2 (code/accelerate_4gpu.yaml), 1 process" + ("" if ctx.cuda else ", CPU")
    figures = {
        "engine": engine,
        "deepspeed": ctx.versions.get("deepspeed") if deepspeed else None,
        "optimizer_steps": len(steps),
        "loss": [log["loss"] for log in steps],
        "grad_norm": [log.get("grad_norm") for log in steps],
        "train_runtime_s": final.get("train_runtime"),
        "train_steps_per_second": final.get("train_steps_per_second"),
        "checkpoint_saved": checkpoint.is_dir(),
        "deepspeed_checkpoint": any(checkpoint.glob("global_step*")),
        "adapter_saved": (out / "adapter_model.safetensors").is_file(),
    }
    if len(steps) != 2 or not figures["checkpoint_saved"] or not figures["adapter_saved"]:
        raise PartError(f"expected 2 logged steps, checkpoint-2 and the final adapter; got {figures}")
    if deepspeed and not figures["deepspeed_checkpoint"]:
        raise PartError(f"checkpoint-2 holds no DeepSpeed global_step* folder: DeepSpeed was not engaged; {figures}")
    return [figures]


def parts() -> list[Part]:
    trains = [
        Part(f"train_{kind}_{path}", 150 if kind == "steps" else 110, train_command(path, kind), single_json,
             needs=("trl", "datasets", "peft"), needs_model=True)
        for kind in ("loss", "steps")
        for path in ("dense", "chunked")
    ]  # fmt: skip
    return [
        Part("wheels", 150, wheels_command, wheels_parse, why_not=wheels_why_not),
        Part("env", 90, env_command, env_parse),
        Part("loss_memory", 270, loss_command(long=False), loss_parse, needs=("torch",)),
        Part("model", 150, model_command, single_json, needs=("transformers", "tokenizers")),
        # first of the model's users: the launchers' engine, never run by any test
        Part("accelerate_zero2", 200, zero2_command, zero2_parse, needs=("accelerate", "trl", "datasets", "peft"),
             needs_model=True, why_not=zero2_why_not, prepare=zero2_prepare),
        *trains,
        Part("eval_hf", 150, eval_command, eval_parse, needs=("datasets", "math_verify"), needs_model=True,
             prepare=eval_prepare),
        Part("eval_hf_tokens", 120, eval_tokens_command, single_json, needs=("transformers",), needs_model=True),
        Part("loss_memory_T4096", 120, loss_command(long=True), loss_parse, needs=("torch",)),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------


def child_env(work: Path) -> dict[str, str]:
    """Offline everywhere (nothing is downloaded), caches inside WORK, the project's src/ importable."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(work / "hf_home"),
        TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", DS_BUILD_OPS="0",
    )  # fmt: skip
    env.pop("HF_DATASETS_CACHE", None)
    paths = [str(ROOT / "src"), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def gpu_name() -> str:
    """The first GPU's name from nvidia-smi (before torch is asked), or "unknown"."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default=os.environ.get("SIZE", "full"), help="full (GPU) or small (CPU dry run)")
    parser.add_argument("--work", default=os.environ.get("WORK", "/tmp/pwopsd_gpu_check"), help="scratch folder")
    parser.add_argument("--budget", default=os.environ.get("BUDGET"), help="whole-run limit in seconds")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the parts")
    parser.add_argument(
        "--only", default=os.environ.get("ONLY", ""), help="comma-separated parts to run (wheels, env and model too)"
    )
    args = parser.parse_args(argv)
    all_parts = parts()
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in {p.name for p in all_parts}]
    if unknown:
        print(f"{PROG}: error: ONLY={args.only}: unknown part {unknown[0]}; use some of "
              f"{', '.join(p.name for p in all_parts)}", file=sys.stderr)  # fmt: skip
        return 2
    if args.size not in SIZES:
        print(f"{PROG}: error: SIZE={args.size} is not valid: use SIZE=full (GPU) or SIZE=small (CPU dry run)",
              file=sys.stderr)  # fmt: skip
        return 2
    size = SIZES[args.size]
    try:
        budget = float(args.budget) if args.budget else size.budget_s
        if budget <= 0:
            raise ValueError
    except ValueError:
        print(f"{PROG}: error: BUDGET={args.budget} is not a positive number of seconds", file=sys.stderr)
        return 2
    work = Path(args.work).resolve()
    results = Path(os.environ["OUT"]) if os.environ.get("OUT") else work / "out"
    try:
        work.mkdir(parents=True, exist_ok=True)
        results.mkdir(parents=True, exist_ok=True)
        for name in ("gpu_check.jsonl", "gpu_check.log"):
            (results / name).unlink(missing_ok=True)
    except OSError as e:
        print(f"{PROG}: error: cannot create {e.filename}: {e.strerror}; set WORK / OUT to writable folders",
              file=sys.stderr)  # fmt: skip
        return 2
    start = time.monotonic()
    ctx = Ctx(args.size, size, args.python, work, results, child_env(work), start + budget, device=gpu_name())
    progress(f"SIZE={args.size}, budget {budget:.0f} s, work {work}, results {results}")
    wanted = set(only)
    if only:  # what the chosen parts stand on
        wanted |= {"wheels", "env"} | (
            {"model"} if any(p.needs_model for p in all_parts if p.name in wanted) else set()
        )
    for part in all_parts:
        if only and part.name not in wanted:
            ctx.skipped.append(part.name)
            emit(ctx, part.name, "skipped", {"reason": f"skipped: not in ONLY={args.only}"})
            continue
        run_part(ctx, part)
    summary = {"ok": ctx.ok, "skipped": ctx.skipped, "failed": ctx.failed, "wall_s": round(time.monotonic() - start, 1),
               "results": str(results)}  # fmt: skip
    emit(ctx, "summary", "ok" if not ctx.failed else "failed", summary)
    progress(
        f"{len(ctx.ok)} ok, {len(ctx.skipped)} skipped, {len(ctx.failed)} failed; lines in {results}/gpu_check.jsonl"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
