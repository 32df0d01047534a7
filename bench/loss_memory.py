"""Peak memory and time of the distillation loss, forward + backward: dense (logits materialised) vs chunked vs fused.

Dense is the reference's way: ``student_hidden @ W.T`` and (no-grad) ``teacher_hidden @ W.T`` as [B, T, V] logits,
then :func:`pwopsd.losses.compute_distillation_loss`. Chunked is :func:`pwopsd.chunked_loss.chunked_distillation_loss`
on the same hidden states through its autograd path (``fused=False``, the fallback); fused is the same function's
default path (one product and one closed-form, by default ``torch.compile``d body per chunk), at
``--fused-chunk-size`` (default ``auto``: :func:`pwopsd.chunked_loss.auto_chunk_size` of B x T). Each (method,
variant, head) runs in its own subprocess on identical seeded inputs.

Memory is the loss's own working memory: the peak above the process's level once the model-free inputs (hidden
states, LM head, ids, mask) exist and one warm-up pass has initialised the libraries: peak RSS on CPU (VmHWM after
resetting it through /proc/self/clear_refs), ``torch.cuda.max_memory_allocated`` on a GPU. On CPU the workers run with
``MALLOC_MMAP_THRESHOLD_=1048576`` (glibc's allocator would otherwise keep some freed buffers, making the peak vary
by tens of MB between identical runs). Time is the best of ``--repeats`` forward + backward passes, best again over
``--rounds`` alternating dense/chunked subprocess rounds (the machine is shared); the process CPU time (user + sys,
all threads) is printed beside it. All tokens are valid (the chunked path skips padding, so this is its worst case)
and REOPOLD runs its phase II (entropy quantile). The LM head is frozen (LoRA training); ``--trainable-methods`` adds
rows with a trainable head (default: opsd). Compilation is excluded from the time: it happens in the warm-up pass,
and ``compile_s`` (warm-up pass minus the best timed pass, in a fresh inductor/triton cache folder, so a cold
compile) is reported separately; ``--compile off`` measures the eager fused body.

    python bench/loss_memory.py --quick          # B x T = 2 x 512, V = 151,936, hidden 512 (CPU)
    python bench/loss_memory.py                  # B x T = 4 x 1024 (hidden 2560 on a GPU)

The last line printed is one JSON object: ``dense_peak_mb``, ``chunked_peak_mb``, ``memory_ratio`` (dense /
chunked) for the method with the smallest memory ratio, ``dense_s``, ``chunked_s``, ``time_ratio`` (chunked /
dense) for the method with the largest time ratio, and ``max_abs_diff``, the largest |dense - chunked| loss value;
the fused variant adds ``fused_peak_mb``, ``fused_memory_ratio`` (smallest), ``fused_s``, ``fused_time_ratio``
(largest, with its ``fused_dense_s``), ``compile_s`` (largest), ``fused_max_abs_diff``, ``fused_chunk_size`` and
``fused_compiled``. A variant left out with ``--variants`` gives null figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

from _measure import PeakMemory, run_in_subprocess

ROOT = Path(__file__).resolve().parents[1]
QWEN3_VOCAB = 151_936
METHOD_NAMES = ("opsd", "eopd", "pwopsd", "reopold")
REOPOLD_STEP = 60  # phase II: the entropy-quantile mask, the costlier REOPOLD phase
VARIANTS = ("dense", "chunked", "fused")


def run_worker(cfg: dict) -> dict:
    """One variant in this process: build inputs, measure forward + backward, return the figures."""
    import torch

    from pwopsd.chunked_loss import auto_chunk_size, chunked_distillation_loss
    from pwopsd.losses import compute_distillation_loss

    device = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(0)
    b, t, h, v = cfg["batch"], cfg["seq"], cfg["hidden"], cfg["vocab"]
    # Logit scale ~4 gives LM-like peaked distributions (teacher entropy of a few nats).
    weight = (torch.randn(v, h, device=device) * (4.0 / h**0.5)).to(dtype).requires_grad_(cfg["trainable"])
    student_hidden = torch.randn(b, t, h, device=device).to(dtype).requires_grad_()
    teacher_hidden = (student_hidden.detach() + 0.5 * torch.randn(b, t, h, device=device)).to(dtype)
    ids = torch.randint(0, v, (b, t), device=device)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    step = REOPOLD_STEP if cfg["method"] == "reopold" else 0
    fused = cfg["variant"] == "fused"
    chunk_size = cfg["fused_chunk_size"] if fused else cfg["chunk_size"]
    if chunk_size == "auto":  # once, as the trainer does: one chunk shape, one compilation
        chunk_size = auto_chunk_size(b * t, v, h, dtype, device)

    def step_fn() -> float:
        student_hidden.grad = None
        weight.grad = None
        if cfg["variant"] == "dense":
            with torch.no_grad():
                teacher_logits = teacher_hidden @ weight.T
            loss, _ = compute_distillation_loss(
                cfg["method"], student_hidden @ weight.T, teacher_logits, ids, mask, global_step=step
            )
        else:
            loss, _ = chunked_distillation_loss(
                cfg["method"],
                student_hidden,
                teacher_hidden,
                weight,
                ids,
                mask,
                chunk_size=chunk_size,
                global_step=step,
                fused=fused,
                compiled=cfg["compile"] if fused else None,
            )
        loss.backward()
        return float(loss.detach())

    def timed_step() -> tuple[float, float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        value = step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start, value

    # warm-up: one-time library initialisation (kernels, thread pools) and compilation are not the loss's memory
    warmup_seconds = timed_step()[0]
    student_hidden.grad = weight.grad = None
    gc.collect()
    memory = PeakMemory(device.type == "cuda")
    memory.start()
    times, cpu_times, loss = [], [], 0.0
    for _ in range(cfg["repeats"]):
        seconds, cpu_seconds, loss = timed_step()
        times.append(seconds)
        cpu_times.append(cpu_seconds)
    return {
        "peak_mb": memory.stop_mb(),
        "seconds": min(times),
        "cpu_seconds": min(cpu_times),
        "loss": loss,
        "warmup_s": warmup_seconds,
        "chunk_size": chunk_size,
    }


def run_variant(args: argparse.Namespace, method: str, variant: str, trainable: bool) -> dict:
    cfg = {
        "method": method,
        "variant": variant,
        "trainable": trainable,
        "device": args.device,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "chunk_size": args.chunk_size,
        "fused_chunk_size": args.fused_chunk_size,
        "compile": args.compile == "on",
        "repeats": args.repeats,
    }
    # A fixed glibc mmap threshold: every buffer over 1 MiB is mapped on allocation and unmapped on free. With the
    # default dynamic threshold, freed [chunk, V] buffers may stay in the heap, so the peak RSS of the same pass varied
    # by +-40 MB between runs; fixed, it is reproducible to 0.1 MB (both variants run under it).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(2**20))}
    with tempfile.TemporaryDirectory(prefix="loss_memory_compile_") as cache:
        # a fresh compile cache per worker: compile_s is a cold compilation, every round
        env.update(TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor", TRITON_CACHE_DIR=f"{cache}/triton")
        return run_in_subprocess(__file__, cfg, f"{method}/{variant}", env)


def chunk_arg(value: str) -> int | str:
    """``auto`` or a positive integer (argparse type)."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 1, got {value!r}")
    return int(value)


def summarize(rows: list[dict], variant: str) -> dict:
    """The figures of one chunked variant over the frozen-head rows: worst memory ratio, worst time ratio."""
    frozen = [r for r in rows if r["head"] == "frozen"] or rows
    if any(r[f"{variant}_s"] is None for r in rows):
        return {}
    mem = min(frozen, key=lambda r: r[f"{variant}_memory_ratio"])
    tim = max(frozen, key=lambda r: r[f"{variant}_time_ratio"])
    return {"mem": mem, "tim": tim, "diff": max(r[f"{variant}_abs_diff"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B x T = 2 x 512 instead of 4 x 1024")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES)
    parser.add_argument("--trainable-methods", nargs="*", default=["opsd"], choices=METHOD_NAMES,
                        help="methods also measured with a trainable LM head (default: opsd)")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=128, help="valid tokens per chunk, chunked (default 128)")
    parser.add_argument("--fused-chunk-size", type=chunk_arg, default="auto",
                        help="valid tokens per chunk, fused: an integer or auto (default)")  # fmt: skip
    parser.add_argument("--compile", choices=("on", "off"), default="on",
                        help="torch.compile the fused body (default on; its compile time is reported apart)")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="which variants to run (default: all; dense is always run)")  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on a GPU by default")
    parser.add_argument("--hidden", type=int, default=None, help="512 on CPU, 2560 on a GPU by default")
    parser.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (best is reported)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating dense/chunked subprocess rounds (default 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.hidden = args.hidden or (2560 if gpu else 512)
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq = args.seq or (512 if args.quick else 1024)
    variants = ["dense", *(v for v in VARIANTS[1:] if v in args.variants)]
    print(
        f"# B={args.batch} T={args.seq} V={args.vocab} H={args.hidden} dtype={args.dtype} device={args.device} "
        f"chunk={args.chunk_size} tokens, fused chunk={args.fused_chunk_size}, compile={args.compile}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        "| method | LM head | dense MB | chunked MB | memory ratio | dense s | chunked s | time ratio | CPU-time ratio "
        "| abs diff | fused MB | fused memory ratio | fused s | fused time ratio | compile s | fused abs diff | loss |"
    )
    print("|---|---|" + "---:|" * 15)
    rows = []
    runs = [(m, False) for m in args.methods] + [(m, True) for m in args.trainable_methods]
    for method, trainable in runs:
        # Alternate the variants for --rounds rounds: the best time (a shared machine), the largest peak.
        results: dict[str, list[dict]] = {variant: [] for variant in variants}
        for _ in range(args.rounds):
            for variant in results:
                results[variant].append(run_variant(args, method, variant, trainable))
        best = {
            variant: {
                "peak_mb": max(x["peak_mb"] for x in r),
                "seconds": min(x["seconds"] for x in r),
                "cpu_seconds": min(x["cpu_seconds"] for x in r),
                "compile_s": max(x["warmup_s"] - x["seconds"] for x in r),
                "chunk_size": r[0]["chunk_size"],
                "loss": r[0]["loss"],
            }
            for variant, r in results.items()
        }
        dense = best["dense"]
        row = {"method": method, "head": "trainable" if trainable else "frozen", "dense_peak_mb": dense["peak_mb"],
               "dense_s": dense["seconds"], "loss": dense["loss"]}  # fmt: skip
        for variant in VARIANTS[1:]:
            got = best.get(variant)
            row.update({
                f"{variant}_peak_mb": got and got["peak_mb"],
                f"{variant}_memory_ratio": got and dense["peak_mb"] / max(got["peak_mb"], 1e-9),
                f"{variant}_s": got and got["seconds"],
                f"{variant}_time_ratio": got and got["seconds"] / dense["seconds"],
                f"{variant}_cpu_time_ratio": got and got["cpu_seconds"] / dense["cpu_seconds"],
                f"{variant}_abs_diff": got and abs(dense["loss"] - got["loss"]),
            })  # fmt: skip
        row["compile_s"] = best["fused"]["compile_s"] if "fused" in best else None
        row["fused_chunk_size"] = best["fused"]["chunk_size"] if "fused" in best else None
        rows.append(row)

        def cell(value, spec: str, suffix: str = "") -> str:
            return "-" if value is None else f"{value:{spec}}{suffix}"

        r = rows[-1]
        print(
            f"| {method:8s} | {r['head']:9s} | {r['dense_peak_mb']:9.1f} | {cell(r['chunked_peak_mb'], '8.1f')} | "
            f"{cell(r['chunked_memory_ratio'], '6.1f', 'x')} | {r['dense_s']:7.3f} | {cell(r['chunked_s'], '7.3f')} | "
            f"{cell(r['chunked_time_ratio'], '5.2f')} | {cell(r['chunked_cpu_time_ratio'], '5.2f')} | "
            f"{cell(r['chunked_abs_diff'], '.2e')} | {cell(r['fused_peak_mb'], '8.1f')} | "
            f"{cell(r['fused_memory_ratio'], '6.1f', 'x')} | {cell(r['fused_s'], '7.3f')} | "
            f"{cell(r['fused_time_ratio'], '5.2f')} | {cell(r['compile_s'], '6.1f')} | "
            f"{cell(r['fused_abs_diff'], '.2e')} | {r['loss']:.6f} |",
            flush=True,
        )
    frozen = [r for r in rows if r["head"] == "frozen"] or rows
    chunked, fused = summarize(rows, "chunked"), summarize(rows, "fused")

    def fig(group: dict, row: str, key: str, digits: int):
        return round(group[row][key], digits) if group else None

    summary = {
        "dense_peak_mb": round((chunked or fused or {"mem": frozen[0]})["mem"]["dense_peak_mb"], 1),
        "chunked_peak_mb": fig(chunked, "mem", "chunked_peak_mb", 1),
        "memory_ratio": fig(chunked, "mem", "chunked_memory_ratio", 2),
        "memory_method": chunked["mem"]["method"] if chunked else None,
        "dense_s": round((chunked or fused or {"tim": frozen[0]})["tim"]["dense_s"], 3),
        "chunked_s": fig(chunked, "tim", "chunked_s", 3),
        "time_ratio": fig(chunked, "tim", "chunked_time_ratio", 3),
        "time_method": chunked["tim"]["method"] if chunked else None,
        "cpu_time_ratio": round(max(r["chunked_cpu_time_ratio"] for r in frozen), 3) if chunked else None,
        "max_abs_diff": float(f"{chunked['diff']:.3g}") if chunked else None,
        "fused_peak_mb": fig(fused, "mem", "fused_peak_mb", 1),
        "fused_memory_ratio": fig(fused, "mem", "fused_memory_ratio", 2),
        "fused_memory_method": fused["mem"]["method"] if fused else None,
        "fused_dense_s": fig(fused, "tim", "dense_s", 3),
        "fused_s": fig(fused, "tim", "fused_s", 3),
        "fused_time_ratio": fig(fused, "tim", "fused_time_ratio", 3),
        "fused_time_method": fused["tim"]["method"] if fused else None,
        "fused_cpu_time_ratio": round(max(r["fused_cpu_time_ratio"] for r in frozen), 3) if fused else None,
        "compile_s": round(max(r["compile_s"] for r in rows), 2) if fused else None,
        "fused_max_abs_diff": float(f"{fused['diff']:.3g}") if fused else None,
        "fused_chunk_size": rows[0]["fused_chunk_size"],
        "fused_compiled": args.compile == "on" if fused else None,
        "B": args.batch,
        "T": args.seq,
        "V": args.vocab,
        "H": args.hidden,
        "chunk_size": args.chunk_size,
        "device": args.device,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
