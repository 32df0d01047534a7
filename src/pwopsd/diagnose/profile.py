"""`diagnose profile`: how teacher and student disagree along a student rollout, by relative position u.

Per problem the student samples `--rollouts` completions from the student prompt; the teacher (same network, the
prompt with the reference solution) and the student each read [own prompt | completion] in one unpadded pass, and each
valid completion token (up to and including the first EOS) gets the `core.TOKEN_METRICS` at u = (k - 1/2)/L. The
summary bins u, splits rollouts by whether their final answer is correct, and gives each bin's mean with a 95%
cluster-bootstrap interval (problems are the clusters).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pwopsd.diagnose import core, stats
from pwopsd.evaluation.extract import extract_answer
from pwopsd.prompts import student_prompt_text, teacher_prompt_text

SPLITS = ("all", "correct", "incorrect")


def run_problem(
    lm: core.LoadedModel,
    backend: core.GenerationBackend,
    grader: Any,
    problem: core.DiagProblem,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """The rollout records of one problem: ids, correctness (answer read by `--answer_format`) and the per-token
    metrics. `backend` samples the rollouts; the logits come from the transformers model `lm`."""
    tok = lm.tokenizer
    s_prompt = core.prompt_ids(tok, student_prompt_text(tok, problem.problem))
    t_prompt = core.prompt_ids(
        tok, teacher_prompt_text(tok, problem.problem, problem.solution, think_mode=args.teacher_think)
    )
    sampling = core.Sampling(args.temperature, args.top_p, args.top_k)
    rollouts = backend.generate(
        [s_prompt] * args.rollouts,
        args.max_completion_length,
        sampling,
        core.seed_for(args.seed, problem.index, "rollout"),
    )
    records = []
    for r, completion in enumerate(rollouts):
        text = core.completion_text(tok, completion, lm.eos_ids)
        predicted = extract_answer(text, args.answer_format)
        record: dict[str, Any] = {
            "problem_index": problem.index,
            "rollout": r,
            "n_tokens": len(completion),
            "completion_ids": completion,
            "predicted": predicted,
            "correct": bool(grader.grade(predicted, problem.answer)),
        }
        if completion:
            zt = core.completion_logits(lm, t_prompt, completion)
            zs = core.completion_logits(lm, s_prompt, completion)
            metrics = core.token_stats(zt, zs, torch.tensor(completion), args.temperature, args.jsd_token_clip)
            record["metrics"] = {k: [round(float(x), 6) for x in v.cpu()] for k, v in metrics.items()}
        else:
            record["metrics"] = {k: [] for k in core.TOKEN_METRICS}
        records.append(record)
    return records


def summarize(records: list[dict[str, Any]], n_bins: int, n_boot: int, seed: int) -> dict[str, Any]:
    """Per metric, split and u-bin: token count, mean and 95% cluster-bootstrap interval."""
    u, cluster, correct = [], [], []
    values: dict[str, list[float]] = {k: [] for k in core.TOKEN_METRICS}
    for rec in records:
        n = rec["n_tokens"]
        u.extend(core.relative_positions(n))
        cluster.extend([rec["problem_index"]] * n)
        correct.extend([rec["correct"]] * n)
        for k in core.TOKEN_METRICS:
            values[k].extend(rec["metrics"][k])
    u_arr, c_arr, ok = np.asarray(u), np.asarray(cluster), np.asarray(correct, dtype=bool)
    bins: dict[str, Any] = {}
    for split in SPLITS:
        keep = np.ones_like(ok) if split == "all" else ok if split == "correct" else ~ok
        bins[split] = {}
        for k in core.TOKEN_METRICS:
            if keep.any():
                b = stats.binned_mean(u_arr[keep], np.asarray(values[k])[keep], c_arr[keep], n_bins, n_boot, seed)
                bins[split][k] = {"n": b.n, "mean": b.mean, "lo": b.lo, "hi": b.hi}
            else:
                nan = np.full(n_bins, np.nan)
                bins[split][k] = {"n": np.zeros(n_bins, dtype=int), "mean": nan, "lo": nan, "hi": nan}
    return core.jsonable(
        {
            "rollouts": len(records),
            "correct_rollouts": int(sum(r["correct"] for r in records)),
            "tokens": len(u),
            "bin_edges": stats.bin_edges(n_bins),
            "bins": bins,
            "ci": f"95% percentile cluster bootstrap over problems, {n_boot} resamples, seed {seed}",
        }
    )


def bin_rows(summary: dict[str, Any]) -> list[list[Any]]:
    edges = summary["bin_edges"]
    rows = []
    for split, per_metric in summary["bins"].items():
        for metric, b in per_metric.items():
            for i in range(len(edges) - 1):
                rows.append([metric, split, i, edges[i], edges[i + 1], b["n"][i], b["mean"][i], b["lo"][i], b["hi"][i]])
    return rows


def plot(summary: dict[str, Any], path: Path) -> None:
    """One panel per metric: the per-bin mean (and interval) of each split, with the Moderate schedule overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.asarray(summary["bin_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    grid = np.linspace(0, 1, 201)
    fig, axes = plt.subplots(3, 3, figsize=(16, 13), layout="constrained")
    for ax, metric in zip(axes.flat, core.TOKEN_METRICS):
        for split, colour in zip(SPLITS, ("black", "tab:green", "tab:red")):
            b = summary["bins"][split][metric]
            mean = np.array(b["mean"], dtype=float)
            if np.isfinite(mean).any():
                ax.plot(centres, mean, color=colour, label=split, marker=".")
                ax.fill_between(centres, np.array(b["lo"], float), np.array(b["hi"], float), color=colour, alpha=0.15)
        ax.set_title(metric)
        ax.set_xlabel("relative position u")
        twin = ax.twinx()
        twin.plot(grid, stats.schedule(grid, *stats.MODERATE), color="tab:blue", linestyle="--", label="Moderate w(u)")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("w(u)", color="tab:blue")
    axes.flat[0].legend(loc="best", fontsize=8)
    fig.suptitle("teacher-student profile by relative position (95% cluster-bootstrap CI; dashed: Moderate schedule)")
    core.save_figure(fig, path)
