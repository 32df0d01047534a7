"""Seconds per optimizer step and peak memory of the training step, dense (reference) vs chunked loss path.

For each model (the tiny Qwen3 test model and SmolLM2-135M-Instruct) and each loss path, a fresh subprocess builds the
real `EAOPSDTrainer` (pwopsd, fixed teacher, LoRA r 16 on q/v, batch 2, gradient checkpointing) and measures:

* `loss_s` / `loss_peak_mb`: one training micro-batch without the rollout: teacher forward (adapter off, no grad),
  student forward, loss, backward, on a fixed batch whose completions are exactly `--loss-length` tokens (the
  reference's 1024 by default: the [B, T, V] logits grow with T, the chunked path's working set does not). Time is
  the median of `--repeats` passes after one warm-up; memory is the peak RSS above the level just before the first
  pass (VmHWM reset through /proc/self/clear_refs), or `torch.cuda.max_memory_allocated` on a GPU.
* `step_s` / `step_peak_mb`: full optimizer steps through `Trainer.train` (transformers rollouts of up to
  `--completion-length` tokens, teacher, student, loss, AdamW), median over `--steps` steps after one warm-up step.

The dense path (the baseline, measured in the same run) materialises [B, T, V] logits for student and teacher; the
chunked path projects `--chunk` positions at a time through the LM head.

    python bench/train_step.py                 # tiny + SmolLM2; loss pass T = 1024, rollouts of 128 tokens
    python bench/train_step.py --quick         # tiny only, T = 64

CPU workers run with `--threads` (default 1) OpenMP threads: on a shared 2-core machine, 2 threads per process
thrash as soon as another process runs (100x slower passes were seen), so one thread gives stable figures.

The last line printed is one JSON object with every figure and, for the largest model measured,
`loss_memory_ratio` (dense / chunked peak), `loss_time_ratio` and `step_time_ratio` (chunked / dense).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _measure import PeakMemory, run_in_subprocess

ROOT = Path(__file__).resolve().parents[1]


def run_worker(cfg: dict) -> dict:
    """One (model, path) in this process."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pwopsd.batch import distillation_batch_from_collated
    from pwopsd.config import OPSDConfig
    from pwopsd.trainer import EAOPSDTrainer

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    rows = [json.loads(line) for line in (ROOT / "data" / "gsm8k_train.jsonl").open(encoding="utf-8")][:64]
    T = cfg["completion_length"]
    loss_T = cfg["loss_length"]
    workdir = tempfile.mkdtemp(prefix="bench_train_step_")
    args = OPSDConfig(
        output_dir=workdir,
        method="pwopsd",
        fixed_teacher=True,
        dense_loss=cfg["path"] == "dense",
        loss_chunk_size=cfg["chunk"],
        max_steps=cfg["steps"] + 1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=5e-6,
        max_grad_norm=0.1,
        max_completion_length=T,
        max_length=8192,
        temperature=1.1,
        top_p=0.95,
        top_k=20,
        lmbda=1.0,
        beta=0.0,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        generations_dump_steps=0,
        bf16=cuda,
    )
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = EAOPSDTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=peft
    )

    if cfg["part"] == "steps":
        return {"model": cfg["name"], "path": cfg["path"], "vocab": vocab_size(trainer), **time_steps(trainer, cuda)}

    # --- one micro-batch without the rollout --------------------------------------------------------------------
    prompts = trainer.data_collator(rows[:2])
    vocab = vocab_size(trainer)
    special = set(tokenizer.all_special_ids)
    gen = torch.Generator().manual_seed(0)
    completions = []
    for _ in range(2):
        ids = torch.randint(0, vocab, (loss_T,), generator=gen).tolist()
        completions.append([i if i not in special else 10 for i in ids])
    batch = distillation_batch_from_collated(
        prompts, completions, max_completion_length=loss_T, pad_token_id=trainer.pad_token_id
    )
    device = trainer.accelerator.device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model = trainer.model
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)

    def micro_step(batch: dict) -> float:
        model.zero_grad(set_to_none=True)
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.item()

    memory = PeakMemory(cuda)
    memory.start()
    times = []
    for _ in range(cfg["repeats"] + 1):
        t0 = time.perf_counter()
        loss_value = micro_step(batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "model": cfg["name"],
        "path": cfg["path"],
        "vocab": vocab,
        "loss_length": loss_T,
        "loss_value": loss_value,
        "loss_s": statistics.median(times[1:]),
        "loss_peak_mb": round(memory.stop_mb(), 1),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def vocab_size(trainer) -> int:
    return trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight.size(0)


def time_steps(trainer, cuda: bool) -> dict:
    """Full optimizer steps through `Trainer.train`; the first one is a warm-up."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    trainer.add_callback(timer)
    memory = PeakMemory(cuda)
    memory.start()
    trainer.train()
    step_peak_mb = memory.stop_mb()
    step_times = [e - s for s, e in zip(timer.starts, timer.ends)][1:]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {
        "completion_length": trainer.args.max_completion_length,
        "step_s": statistics.median(step_times),
        "step_peak_mb": round(step_peak_mb, 1),
        "mean_rollout_tokens": statistics.mean(lengths) if lengths else None,
    }


def model_paths(names: list[str]) -> dict[str, str]:
    from pwopsd import models
    paths = {}
    for name in names:
        if name == "tiny":
            out = Path(tempfile.mkdtemp(prefix="bench_tiny_")) / "qwen3"
            paths[name] = str(models.build("qwen3", out, seed=0))
        elif name == "smollm2":
            paths[name] = str(models.build("smollm2", models.smollm2_cache_dir()))
        else:
            raise SystemExit(f"error: unknown model {name!r}: use tiny or smollm2")
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--completion-length", type=int, default=128, help="rollout length of the optimizer steps")
    parser.add_argument("--loss-length", type=int, default=1024, help="completion width of the loss-pass batch")
    parser.add_argument("--chunk", type=int, default=256, help="--loss_chunk_size of the chunked path")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=1, help="timed loss passes (after one warm-up pass)")
    parser.add_argument("--quick", action="store_true", help="tiny model only, T = 64")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads per worker (1: stable figures on a shared machine)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.quick:
        args.models, args.completion_length, args.loss_length = "tiny", 64, 64

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    results = []
    for name, path in model_paths(args.models.split(",")).items():
        for loss_path in ("dense", "chunked"):
            row = {}
            for part in ("loss", "steps"):  # separate processes: each peak is measured from a fresh process
                cfg = {
                    "name": name,
                    "model": path,
                    "path": loss_path,
                    "part": part,
                    "completion_length": args.completion_length,
                    "loss_length": args.loss_length,
                    "chunk": args.chunk,
                    "steps": args.steps,
                    "repeats": args.repeats,
                }
                row.update(run_in_subprocess(__file__, cfg, f"{name}/{loss_path}/{part}", env))
            results.append(row)
            print(f"# {name} {loss_path}: {row}", file=sys.stderr, flush=True)

    print(
        "| model | loss path | V | loss pass T | loss pass (s) | loss peak (MB) | rollout T | optimizer step (s) |"
        " step peak (MB) | device |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['path']} | {r['vocab']} | {r['loss_length']} | {r['loss_s']:.3f} | "
            f"{r['loss_peak_mb']:.0f} | {r['completion_length']} | {r['step_s']:.3f} | {r['step_peak_mb']:.0f} | "
            f"{r['device']} |"
        )
    by = {(r["model"], r["path"]): r for r in results}
    largest = next(m for m in ("smollm2", "tiny") if (m, "dense") in by)
    dense, chunked = by[(largest, "dense")], by[(largest, "chunked")]
    summary = {
        "bench": "train_step",
        "model": largest,
        "device": dense["device"],
        "loss_length": args.loss_length,
        "completion_length": args.completion_length,
        "threads": args.threads,
        "dense_loss_s": round(dense["loss_s"], 4),
        "chunked_loss_s": round(chunked["loss_s"], 4),
        "loss_time_ratio": round(chunked["loss_s"] / dense["loss_s"], 3),
        "dense_loss_peak_mb": dense["loss_peak_mb"],
        "chunked_loss_peak_mb": chunked["loss_peak_mb"],
        "loss_memory_ratio": round(dense["loss_peak_mb"] / max(chunked["loss_peak_mb"], 1e-9), 2),
        "dense_step_s": round(dense["step_s"], 3),
        "chunked_step_s": round(chunked["step_s"], 3),
        "step_time_ratio": round(chunked["step_s"] / dense["step_s"], 3),
        "results": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
