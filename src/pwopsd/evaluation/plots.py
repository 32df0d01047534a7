"""Figures of the summary: forest plot of paired differences, learning curves over checkpoints, training curves.

Every figure is written under a temporary name and renamed into place, so a killed run never leaves a truncated PNG
where a good one was. The training curves read `trainer_state.json` (the `log_history` that the Hugging Face trainer
writes into every checkpoint and, at the end, into the output folder).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pwopsd.io import UserError, first_line

TRAINING_KEYS = ("loss", "grad_norm", "completions/mean_length", "completions/clipped_ratio", "opsd/neg_token_fraction")
"""Training metrics drawn when logged: the loss, the gradient norm, the rollout lengths, OPSD's negative-token share."""
TRAINING_PREFIXES = ("ea/", "eopd/", "reopold/", "health/", "pos/")
"""Metric families drawn when logged: each method's own diagnostics and the health / position metrics."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, **savefig_kwargs: Any) -> None:
    """Save `fig` as PNG atomically (temporary name in the same folder, then rename) and close it.

    `savefig_kwargs` go to `fig.savefig` (default dpi 120).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.png")
    try:
        fig.savefig(tmp, **{"dpi": 120, **savefig_kwargs})
        os.replace(tmp, path)
    finally:
        _pyplot().close(fig)
        if tmp.exists():
            tmp.unlink()


def forest_plot(rows: Sequence[dict[str, Any]], metric_titles: dict[str, str], path: Path) -> None:
    """Paired differences with their intervals: one panel per metric, one row per model × method × benchmark."""
    plt = _pyplot()
    metrics = [m for m in metric_titles if any(r["metric"] == f"{m}_diff" for r in rows)]
    labels: list[str] = []
    for r in rows:
        label = f"{r['model']} {r['method']} − {r['baseline_method']}: {r['dataset']}"
        if label not in labels:
            labels.append(label)
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(5 * len(metrics) + 2, 0.35 * len(labels) + 1.5), squeeze=False, sharey=True
    )
    for ax, metric in zip(axes[0], metrics):
        for r in rows:
            if r["metric"] != f"{metric}_diff":
                continue
            y = labels.index(f"{r['model']} {r['method']} − {r['baseline_method']}: {r['dataset']}")
            err = [[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]]
            ax.errorbar([r["mean"]], [y], xerr=err, fmt="o", color="C0" if r["dataset"] != "avg" else "C3", capsize=3)
        ax.axvline(0.0, color="black", linewidth=1)
        ax.set_title(f"{metric_titles[metric]}@N difference (pct points, 95% CI)")
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def learning_curves(
    points: Sequence[dict[str, Any]], benchmarks: Sequence[str], protocol_checkpoint: int, path: Path,
    selected: dict[str, int] | None = None,
) -> None:  # fmt: skip
    """Avg@N against the checkpoint step, one panel per benchmark, one line per run, the protocol's step marked."""
    plt = _pyplot()
    runs = sorted({p["run"] for p in points})
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(4.5 * len(benchmarks), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], benchmarks):
        for i, run in enumerate(runs):
            mine = sorted((p for p in points if p["run"] == run and p["dataset"] == dataset), key=lambda p: p["step"])
            if not mine:
                continue
            xs, ys = [p["step"] for p in mine], [p["mean"] for p in mine]
            low = [p["mean"] - p["ci_low"] if not math.isnan(p["ci_low"]) else 0.0 for p in mine]
            high = [p["ci_high"] - p["mean"] if not math.isnan(p["ci_high"]) else 0.0 for p in mine]
            ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, color=f"C{i}", label=run)
            if selected and run in selected:
                chosen = [p for p in mine if p["step"] == selected[run]]
                if chosen:
                    ax.plot([selected[run]], [chosen[0]["mean"]], marker="*", markersize=14, color=f"C{i}")
        ax.axvline(protocol_checkpoint, color="grey", linestyle="--", linewidth=1, label="protocol checkpoint")
        ax.set_title(dataset)
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel("Avg@N (%), 95% CI over problems")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


# --- training curves -------------------------------------------------------------------------------------------------


def find_trainer_state(output_dir: Path) -> Path:
    """`OUTPUT_DIR/trainer_state.json`, else the one in the newest `checkpoint-*`; UserError when there is none."""
    if not output_dir.is_dir():
        raise UserError(f"--training {output_dir} is not a folder; pass a training output folder (outputs/NAME)")
    direct = output_dir / "trainer_state.json"
    if direct.is_file():
        return direct
    checkpoints = []
    for child in output_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and (child / "trainer_state.json").is_file():
            checkpoints.append((int(match.group(1)), child / "trainer_state.json"))
    if not checkpoints:
        raise UserError(
            f"--training {output_dir} holds no trainer_state.json (nor a checkpoint-* with one); pass the run's "
            "output folder, e.g. outputs/NAME"
        )
    return max(checkpoints)[1]


def training_series(state_file: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Metric -> (steps, values) from `log_history`: the drawn metrics (`TRAINING_KEYS`, `TRAINING_PREFIXES`) only."""
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        history = state["log_history"]
        if not isinstance(history, list):
            raise TypeError("log_history is not a list")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(
            f"{state_file} is not a readable trainer state ({first_line(e)}); re-copy it from the run"
        ) from e
    series: dict[str, tuple[list[float], list[float]]] = {}
    for entry in history:
        if not isinstance(entry, dict) or not _is_number(entry.get("step")):
            continue
        for key, value in entry.items():
            if not (key in TRAINING_KEYS or key.startswith(TRAINING_PREFIXES)) or not _is_number(value):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(float(entry["step"]))
            values.append(float(value))
    order = {key: i for i, key in enumerate(TRAINING_KEYS)}
    return dict(sorted(series.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def metric_file_name(metric: str) -> str:
    """A file-name-safe form of a metric name (`completions/mean_length` -> `completions_mean_length`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)


def training_run_plot(name: str, series: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    """One panel per logged metric of one run."""
    plt = _pyplot()
    cols = min(4, max(1, len(series)))
    rows = max(1, math.ceil(len(series) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (metric, (steps, values)) in zip(axes.flat, series.items()):
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(metric, fontsize="small")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.set_visible(False)
    fig.suptitle(name)
    fig.tight_layout()
    save_figure(fig, path)


def training_overlay_plot(metric: str, runs: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    """One metric across runs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (steps, values) in runs.items():
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=name)
    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def training_plots(output_dirs: Sequence[Path], out_dir: Path) -> list[Path]:
    """Per-run and per-metric overlay PNGs under `out_dir`; every folder is checked before anything is drawn."""
    states = [(d, find_trainer_state(d)) for d in output_dirs]
    names = _run_names([d for d, _ in states])
    all_series = {name: training_series(state) for name, (_, state) in zip(names, states)}
    written = []
    for name, series in all_series.items():
        path = out_dir / f"run_{metric_file_name(name)}.png"
        training_run_plot(name, series, path)
        written.append(path)
    metrics = sorted({m for s in all_series.values() for m in s}, key=list(_all_metric_order(all_series)).index)
    for metric in metrics:
        path = out_dir / f"overlay_{metric_file_name(metric)}.png"
        training_overlay_plot(metric, {n: s[metric] for n, s in all_series.items() if metric in s}, path)
        written.append(path)
    return written


def _all_metric_order(all_series: dict[str, dict[str, Any]]) -> dict[str, None]:
    order: dict[str, None] = {}
    for series in all_series.values():
        order.update(dict.fromkeys(series))
    return order


def _run_names(dirs: Sequence[Path]) -> list[str]:
    """The folder names; `parent/name` where two folders share a name."""
    names = [d.resolve().name for d in dirs]
    return [
        f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(dirs, names)
    ]  # fmt: skip
