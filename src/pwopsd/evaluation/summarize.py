"""Seed tables of evaluation results, paired comparisons over problems, learning curves and training curves.

    python eval/summarize.py [--results_dir eval_results] [--out_dir eval_results_summary] [--baseline opsd]
        [--bootstrap 10000] [--permutations 10000] [--stats_seed 0] [--protocol_checkpoint 100]
        [--select_on DATASET] [--training OUTPUT_DIR [OUTPUT_DIR ...]]

Reads every `*.json` result in `--results_dir` (the names `run_eval.sh` writes:
`{NAME}[_{DATASET}]_38k[_seed{S}].json`, or any `{RUN}[_{DATASET}][_{B}k][_seed{S}].json`). The benchmark and seed
come from the file's `dataset` and `seed` keys; the run name is the file name without those suffixes, split into model
and method when it ends in a known method (`METHODS`: the methods of `pwopsd.losses.METHODS`, then `base`), e.g.
`qwen3_4b_base_pwopsd` -> (`qwen3_4b_base`, `pwopsd`) and `smollm2_base` -> (`smollm2`, `base`). A run named
`{NAME}_ckpt{N}` is checkpoint N of `NAME` (a checkpoint sweep): it goes into the learning curves, not the tables (the
tables hold the protocol's checkpoint, whose files carry no `_ckpt`). Benchmarks come in the order of
`pwopsd.evaluation.benchmarks.BENCHMARKS`, unknown ones after them.

For each run × benchmark: mean ± sample standard deviation (n−1) over seeds of Avg@N, Pass@N and Maj@N; per run the
equal-weight cross-benchmark Avg@N (mean over benchmarks of the per-benchmark means; its std is over the seeds that
cover every benchmark). From the per-problem results (`results[*].generations[*].correct`): a 95% bootstrap interval
over problems of each score, and for every method the paired difference against `--baseline` of the same model on the
problems both evaluated, with a paired bootstrap interval and a sign-flip permutation p-value (`pwopsd.evaluation.stats`).
Writes `summary.md`, `summary.csv` (long format), `summary.png` (bars with std error bars), `forest.png` (the paired
differences), `learning_curves.png` + `learning_curves.csv` (checkpoint sweeps) and, with `--training`, training curves
under `training/`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pwopsd.evaluation import plots, stats
from pwopsd.evaluation.benchmarks import BENCHMARKS
from pwopsd.evaluation.generate import SAMPLE_SEED_RULES
from pwopsd.io import ArgumentParser, UserError, atomic_write_text, run_main
from pwopsd.losses import METHODS as LOSS_METHODS

logger = logging.getLogger(__name__)

PROG = "summarize.py"
METHODS = (*LOSS_METHODS, "base")  # the row order of the tables: the distillation methods, then the base model
BENCHMARK_ORDER = tuple(BENCHMARKS)
METRICS = {"avg": "average_at_n_pct", "pass": "pass_at_n_pct", "maj": "majority_vote_at_n_pct"}
METRIC_TITLES = {"avg": "Avg", "pass": "Pass", "maj": "Maj"}
CROSS = "avg"  # the dataset label of the cross-benchmark average in the CSV
CSV_COLUMNS = ["model", "method", "run", "dataset", "metric", "val_n", "n_seeds", "seeds", "mean", "std",
               "n_problems", "ci_low", "ci_high", "baseline", "p_value"]  # fmt: skip
"""The first ten are the columns of the seed tables (unchanged); the rest are filled where problems were available."""
DEFAULT_SEED_RULE = "engine"  # a file without `sample_seed_rule` was written before the key existed: the engine rule


@dataclass(frozen=True)
class Record:
    """One result file."""

    run: str
    model: str
    method: str
    dataset: str
    seed: int | None
    val_n: int
    values: dict[str, float]  # metric short name -> percent
    file: str
    checkpoint: int | None = None  # N of a `{NAME}_ckpt{N}` run (a checkpoint sweep); None = the protocol's checkpoint
    base_run: str = ""  # the run name without `_ckpt{N}`
    seed_rule: str = DEFAULT_SEED_RULE
    problems: dict[str, dict[str, float]] | None = field(default=None, compare=False)
    """metric -> {problem key -> value in [0, 1] for this seed}; None when the file has no usable per-problem results."""
    problems_note: str = ""  # why `problems` is None


def split_run(run: str) -> tuple[str, str]:
    """(model, method): the method is the last `_` part when it is a known method, else '-'."""
    model, _, method = run.rpartition("_")
    if model and method in METHODS:
        return model, method
    return run, "-"


def split_checkpoint(run: str) -> tuple[str, int | None]:
    """(`NAME`, N) for a checkpoint-sweep run `NAME_ckpt{N}`, else (run, None)."""
    match = re.fullmatch(r"(.+)_ckpt(\d+)", run)
    return (match.group(1), int(match.group(2))) if match else (run, None)


def run_name(stem: str, dataset: str, seed: int | None) -> str:
    """File stem without `_seed{S}`, a `_{B}k` token budget and `_{dataset}` suffixes (in that order)."""
    if seed is not None:
        stem = re.sub(rf"_seed{seed}$", "", stem)
    stem = re.sub(r"_\d+k$", "", stem)
    return re.sub(rf"_{re.escape(dataset)}$", "", stem)


def problem_results(data: dict[str, Any]) -> tuple[dict[str, dict[str, float]] | None, str]:
    """Per-problem values of one seed: Avg = correct/N, Pass and Maj as 0/1; (None, why) when unusable.

    The key of a problem is its `problem_id` as JSON text, so `5` and `"5"` stay distinct and any JSON id is usable.
    Maj is left out when a problem lacks `majority_vote_correct`.
    """
    results = data.get("results")
    if not isinstance(results, list) or not results:
        return None, "no per-problem results"
    table: dict[str, dict[str, float]] = {"avg": {}, "pass": {}, "maj": {}}
    for i, item in enumerate(results):
        if not isinstance(item, dict) or "problem_id" not in item:
            return None, f"results[{i}] has no problem_id"
        generations = item.get("generations")
        if not isinstance(generations, list) or not generations:
            return None, f"results[{i}] has no generations"
        flags = [g.get("correct") if isinstance(g, dict) else None for g in generations]
        if not all(isinstance(f, bool) for f in flags):
            return None, f"results[{i}].generations[*].correct is not true/false"
        key = json.dumps(item["problem_id"], sort_keys=True)
        if key in table["avg"]:
            return None, f"problem_id {key} appears twice"
        table["avg"][key] = sum(flags) / len(flags)
        table["pass"][key] = float(any(flags))
        maj = item.get("majority_vote_correct")
        if isinstance(maj, bool) and table["maj"] is not None:
            table["maj"][key] = float(maj)
        else:
            table["maj"] = None  # type: ignore[assignment]
    return {k: v for k, v in table.items() if v is not None}, ""


def read_record(path: Path) -> Record:
    """A `Record` from a result file; ValueError with the reason if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise ValueError("not an evaluation result")
    missing = [k for k in ("dataset", "val_n", *METRICS.values()) if k not in data]
    if missing:
        raise ValueError(f"not an evaluation result (missing {', '.join(missing)})")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed is {json.dumps(seed)} ({type(seed).__name__}); expected an integer or null; fix or "
                         "move the file")  # fmt: skip
    rule = data.get("sample_seed_rule", DEFAULT_SEED_RULE)
    if rule not in SAMPLE_SEED_RULES:
        raise ValueError(f"sample_seed_rule is {json.dumps(rule)}; expected one of {', '.join(SAMPLE_SEED_RULES)}")
    dataset = str(data["dataset"])
    run = run_name(path.stem, dataset, seed)
    base_run, checkpoint = split_checkpoint(run)
    model, method = split_run(base_run)
    try:
        values = {short: float(data[key]) for short, key in METRICS.items()}
        val_n = int(data["val_n"])
    except (TypeError, ValueError) as e:  # e.g. null or "n/a"
        raise ValueError(f"not an evaluation result (a metric or val_n is not a number: {e})") from e
    problems, note = problem_results(data)
    return Record(run, model, method, dataset, seed, val_n, values, path.name, checkpoint, base_run, rule, problems,
                  note)  # fmt: skip


def collect(results_dir: Path) -> tuple[list[Record], list[str]]:
    """Records of every result file, and one error line per file that is not one."""
    records: dict[tuple[str, str, int | None], Record] = {}
    errors = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            record = read_record(path)
        except ValueError as e:
            errors.append(f"{path}: {e}")
            continue
        key = (record.run, record.dataset, record.seed)
        if key in records:
            errors.append(f"{path}: same run, benchmark and seed as {records[key].file}; ignored")
            continue
        records[key] = record
    return list(records.values()), errors


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n−1; NaN for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(records: list[Record]) -> list[dict[str, Any]]:
    """Long-format rows: run × benchmark × metric (and the cross-benchmark Avg) with mean, std and seeds."""
    benchmarks = ordered_benchmarks(records)
    runs = sorted({(r.model, r.method, r.run) for r in records})
    rows = []
    for model, method, run in runs:
        mine = [r for r in records if r.run == run]
        avg_mean: dict[str, float] = {}  # benchmark -> mean Avg@N over its seeds
        for dataset in benchmarks:
            cell = [r for r in mine if r.dataset == dataset]
            if not cell:
                continue
            seeds = sorted((r.seed for r in cell), key=_seed_order)
            for metric in METRICS:
                mean, std = mean_std([r.values[metric] for r in cell])
                if metric == "avg":
                    avg_mean[dataset] = mean
                rows.append(dict(model=model, method=method, run=run, dataset=dataset, metric=metric,
                                 val_n=cell[0].val_n, n_seeds=len(cell), seeds=seeds, mean=mean, std=std))  # fmt: skip
        if len(benchmarks) > 1 and len(avg_mean) == len(benchmarks):
            avg = {(r.dataset, r.seed): r.values["avg"] for r in mine}  # unique: collect() drops repeats
            full_seeds = sorted({s for _, s in avg if all((d, s) in avg for d in benchmarks)}, key=_seed_order)
            per_seed = [sum(avg[d, s] for d in benchmarks) / len(benchmarks) for s in full_seeds]
            std = mean_std(per_seed)[1] if per_seed else math.nan
            rows.append(dict(model=model, method=method, run=run, dataset=CROSS, metric="avg", val_n=mine[0].val_n,
                             n_seeds=len(full_seeds), seeds=full_seeds,
                             mean=sum(avg_mean.values()) / len(avg_mean), std=std))  # fmt: skip
    return rows


def _seed_order(seed: int | None) -> tuple[bool, int | None]:
    """Seeds in increasing order, the unseeded run last."""
    return seed is None, seed


def ordered_benchmarks(records: list[Record]) -> list[str]:
    present = {r.dataset for r in records}
    return [b for b in BENCHMARK_ORDER if b in present] + sorted(present - set(BENCHMARK_ORDER))


# --- statistics over problems ----------------------------------------------------------------------------------------


def problem_values(cell: list[Record], metric: str) -> dict[str, float]:
    """Problem key -> the mean over the cell's seeds of the problem's per-seed value (seeds with per-problem data)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for record in cell:
        if record.problems is None or metric not in record.problems:
            continue
        for key, value in record.problems[metric].items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


def _pct(values: dict[str, float]) -> list[float]:
    """Values in percent, in a fixed problem order (so resampling does not depend on file order)."""
    return [100.0 * values[k] for k in sorted(values)]


def add_problem_intervals(rows: list[dict[str, Any]], records: list[Record], n_boot: int, seed: int) -> None:
    """Fill `n_problems`, `ci_low`, `ci_high` of the score rows: bootstrap over problems (within each benchmark)."""
    for row in rows:
        mine = [r for r in records if r.run == row["run"]]
        if row["dataset"] == CROSS:
            datasets = sorted({r.dataset for r in mine})
            strata = [_pct(problem_values([r for r in mine if r.dataset == d], "avg")) for d in datasets]
        else:
            strata = [_pct(problem_values([r for r in mine if r.dataset == row["dataset"]], row["metric"]))]
        if not all(strata):
            continue
        low, high = stats.bootstrap_ci(strata, n_boot, stats.rng_for(seed, row["run"], row["dataset"], row["metric"]))
        row.update(n_problems=sum(len(s) for s in strata), ci_low=low, ci_high=high)


def paired_rows(records: list[Record], baseline: str, n_boot: int, n_perm: int, seed: int) -> list[dict[str, Any]]:
    """method − baseline of the same model on the problems both evaluated, per benchmark and metric (+ cross Avg)."""
    benchmarks = ordered_benchmarks(records)
    rows = []
    base_runs = {r.model: r.run for r in records if r.method == baseline}
    runs = sorted({(r.model, r.method, r.run) for r in records if r.model in base_runs and r.method != baseline})
    for model, method, run in runs:
        base_run = base_runs[model]
        mine = [r for r in records if r.run == run]
        theirs = [r for r in records if r.run == base_run]
        for metric in METRICS:
            strata = {}
            for dataset in benchmarks:
                a = problem_values([r for r in mine if r.dataset == dataset], metric)
                b = problem_values([r for r in theirs if r.dataset == dataset], metric)
                common = sorted(a.keys() & b.keys())
                if not common:
                    continue
                strata[dataset] = [100.0 * (a[k] - b[k]) for k in common]
            cells = [(d, [s]) for d, s in strata.items()]
            if metric == "avg" and len(benchmarks) > 1 and len(strata) == len(benchmarks):
                cells.append((CROSS, list(strata.values())))
            for dataset, diffs in cells:
                result = stats.paired_difference(diffs, n_boot, n_perm, seed, run, base_run, dataset, metric)
                seeds = sorted({r.seed for r in mine if dataset in (CROSS, r.dataset)}, key=_seed_order)
                rows.append(dict(model=model, method=method, run=run, dataset=dataset, metric=f"{metric}_diff",
                                 val_n=mine[0].val_n, n_seeds=len(seeds), seeds=seeds, mean=result.mean,
                                 std=math.nan, n_problems=result.n_problems, ci_low=result.ci_low,
                                 ci_high=result.ci_high, baseline=base_run, p_value=result.p_value,
                                 baseline_method=baseline))  # fmt: skip
    return rows


def seed_overlaps(records: list[Record]) -> list[str]:
    """'RUN: DATASETS seeds a b ... (val_n N)' for the run × benchmark cells whose seeds share sample streams.

    Engine rule: sample i of seed s uses seed s + i, so seed s covers streams s .. s + val_n − 1 and seeds closer than
    val_n share streams (seeds s and s + 1 share val_n − 1). Only pairs where both files follow the engine rule count.
    One line per run and set of shared seeds, its benchmarks listed.
    """
    cells: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        cells.setdefault((record.run, record.dataset), []).append(record)
    found: dict[tuple[str, str], list[str]] = {}
    for (run, dataset), cell in cells.items():
        engine = [r for r in cell if r.seed is not None and r.seed_rule == "engine"]
        shared: set[int] = set()
        for a, b in itertools.combinations(engine, 2):
            assert a.seed is not None and b.seed is not None
            if a.seed < b.seed + b.val_n and b.seed < a.seed + a.val_n:  # streams [s, s + val_n) intersect
                shared.update((a.seed, b.seed))
        if shared:
            what = f"seeds {' '.join(str(s) for s in sorted(shared))} (val_n {engine[0].val_n})"
            found.setdefault((run, what), []).append(dataset)
    order = {d: i for i, d in enumerate(ordered_benchmarks(records))}
    return [
        f"{run}: {', '.join(sorted(ds, key=order.__getitem__))} {what}" for (run, what), ds in sorted(found.items())
    ]


# --- tables ----------------------------------------------------------------------------------------------------------


def cell_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    if math.isnan(row["std"]):
        return f"{row['mean']:.2f} (n={row['n_seeds']})"
    return f"{row['mean']:.2f} ± {row['std']:.2f} (n={row['n_seeds']})"


def ci_text(row: dict[str, Any] | None, signed: bool = False) -> str:
    if row is None or row.get("ci_low") is None:
        return "—"
    fmt = "+.2f" if signed else ".2f"
    text = f"{row['mean']:{fmt}} [{row['ci_low']:{fmt}}, {row['ci_high']:{fmt}}]"
    if signed:
        text += f" p={row['p_value']:.3g}"
    return text + f" (P={row['n_problems']})"


def _n_label(rows: list[dict[str, Any]]) -> str:
    ns = sorted({row["val_n"] for row in rows})
    return str(ns[0]) if len(ns) == 1 else "N"


def markdown(rows: list[dict[str, Any]], benchmarks: list[str]) -> str:
    """One table per metric: runs × benchmarks (+ the cross-benchmark Avg@N in the Avg table)."""
    n = _n_label(rows)
    runs = sorted({(row["model"], row["method"], row["run"]) for row in rows})
    index = {(row["run"], row["dataset"], row["metric"]): row for row in rows}
    out = []
    for metric, title in METRIC_TITLES.items():
        columns = list(benchmarks) + ([f"{CROSS} (equal weight)"] if metric == "avg" and len(benchmarks) > 1 else [])
        out.append(f"### {title}@{n} (mean ± sample std over seeds)\n")
        out.append("| model | method | " + " | ".join(columns) + " |")
        out.append("|---|---|" + "---|" * len(columns))
        for model, method, run in runs:
            cells = [cell_text(index.get((run, d, metric))) for d in benchmarks]
            if len(columns) > len(benchmarks):
                cells.append(cell_text(index.get((run, CROSS, "avg"))))
            out.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


CI_NOTE = (
    "The intervals are 95% percentile bootstrap intervals over problems ({n_boot} resamples; within each benchmark, "
    "then averaged with equal weight for the cross-benchmark column); p is a two-sided sign-flip permutation test over "
    "problems (exact when 2^P <= {n_perm}, else {n_perm} random sign patterns). Differences are in percentage points "
    "(method − baseline on the problems both evaluated; +100 = every problem went from wrong to right). They cover the "
    "choice of problems and the sampling of the answers, not the variance of training: each method was trained once, "
    "and another training run can move a score or a difference beyond its interval."
)


def markdown_statistics(
    rows: list[dict[str, Any]], diff_rows: list[dict[str, Any]], benchmarks: list[str], baseline: str,
    n_boot: int, n_perm: int,
) -> str:  # fmt: skip
    """The Avg@N interval table and the paired-difference table ('' when no problem-level data was found)."""
    if not any(row.get("ci_low") is not None for row in rows) and not diff_rows:
        return ""
    n = _n_label(rows)
    cross = len(benchmarks) > 1
    columns = list(benchmarks) + ([f"{CROSS} (equal weight)"] if cross else [])
    datasets = list(benchmarks) + ([CROSS] if cross else [])
    out = [f"### Avg@{n}: 95% bootstrap interval over problems\n"]
    out.append("| model | method | " + " | ".join(columns) + " |")
    out.append("|---|---|" + "---|" * len(columns))
    index = {(row["run"], row["dataset"], row["metric"]): row for row in rows}
    for model, method, run in sorted({(row["model"], row["method"], row["run"]) for row in rows}):
        cells = [ci_text(index.get((run, d, "avg"))) for d in datasets]
        out.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    out.append("")
    if diff_rows:
        out.append(f"### Paired differences vs {baseline} (percentage points, 95% paired bootstrap interval, p)\n")
        out.append("| model | method | metric | " + " | ".join(columns) + " |")
        out.append("|---|---|---|" + "---|" * len(columns))
        index = {(row["run"], row["dataset"], row["metric"]): row for row in diff_rows}
        for model, method, run in sorted({(row["model"], row["method"], row["run"]) for row in diff_rows}):
            for metric, title in METRIC_TITLES.items():
                cells = [ci_text(index.get((run, d, f"{metric}_diff")), signed=True) for d in datasets]
                if set(cells) != {"—"}:
                    out.append(f"| {model} | {method} | {title}@{n} | " + " | ".join(cells) + " |")
        out.append("")
    out.append(CI_NOTE.format(n_boot=n_boot, n_perm=n_perm))
    out.append("")
    return "\n".join(out)


def overlap_note(overlaps: list[str]) -> str:
    return (
        "Note: the seeds of these runs share sample streams (engine seed rule: sample i of seed s is drawn with seed "
        "s + i, so seeds s and s + 1 share val_n − 1 of their val_n streams); their std over seeds understates the "
        "seed-to-seed variation. Evaluate with `--sample_seeds independent` for disjoint streams.\n\n"
        + "".join(f"- {o}\n" for o in overlaps)
    )


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=CSV_COLUMNS)
    frame["seeds"] = frame["seeds"].map(lambda seeds: " ".join("none" if s is None else str(s) for s in seeds))
    frame["n_problems"] = frame["n_problems"].astype("Int64")  # an integer, blank where no problem was available
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.4f"))


def write_chart(rows: list[dict[str, Any]], benchmarks: list[str], path: Path) -> None:
    """Grouped bars (benchmark × run) for each metric, error bars = sample std over seeds."""
    plt = plots._pyplot()
    runs = sorted({row["run"] for row in rows})
    index = {(row["run"], row["dataset"], row["metric"]): row for row in rows}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4), squeeze=False)
    width = 0.8 / max(len(runs), 1)
    for ax, (metric, title) in zip(axes[0], METRIC_TITLES.items()):
        groups = list(benchmarks) + ([CROSS] if metric == "avg" and len(benchmarks) > 1 else [])
        for i, run in enumerate(runs):
            cells = [index.get((run, g, metric)) for g in groups]
            means = [c["mean"] if c else 0.0 for c in cells]
            errs = [0.0 if c is None or math.isnan(c["std"]) else c["std"] for c in cells]
            xs = [g + (i - (len(runs) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=run)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel(f"{title}@N (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{title}@N")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    plots.save_figure(fig, path)


# --- learning curves -------------------------------------------------------------------------------------------------


def curve_points(
    records: list[Record], protocol_checkpoint: int, n_boot: int, seed: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Avg@N per run × benchmark × checkpoint step (mean over seeds, bootstrap interval over problems); warnings.

    Only runs with at least one `_ckpt{N}` file; their protocol-checkpoint files (no `_ckpt`) sit at
    `protocol_checkpoint`. A `_ckpt{protocol}` file that repeats a protocol file's seed is left out.
    """
    swept = {r.base_run for r in records if r.checkpoint is not None}
    cells: dict[tuple[str, str, int], dict[int | None, Record]] = {}
    warnings = []
    for record in sorted(records, key=lambda r: (r.checkpoint is not None, r.file)):  # protocol names first
        if record.base_run not in swept:
            continue
        step = protocol_checkpoint if record.checkpoint is None else record.checkpoint
        cell = cells.setdefault((record.base_run, record.dataset, step), {})
        if record.seed in cell:
            warnings.append(
                f"{record.file} repeats {cell[record.seed].file} (step {step}, seed {record.seed}); ignored"
            )
            continue
        cell[record.seed] = record
    points = []
    for (run, dataset, step), by_seed in sorted(cells.items()):
        cell = list(by_seed.values())
        values = _pct(problem_values(cell, "avg"))
        low = high = math.nan
        if values:
            low, high = stats.bootstrap_ci([values], n_boot, stats.rng_for(seed, run, dataset, str(step), "curve"))
        points.append(dict(run=run, model=cell[0].model, method=cell[0].method, dataset=dataset, step=step,
                           n_seeds=len(cell), mean=mean_std([r.values["avg"] for r in cell])[0],
                           n_problems=len(values), ci_low=low, ci_high=high))  # fmt: skip
    return points, warnings


def select_checkpoints(points: list[dict[str, Any]], dataset: str) -> dict[str, int]:
    """Run -> the step with the highest mean Avg@N on the held-out `dataset` (the earliest on a tie)."""
    chosen: dict[str, tuple[float, int]] = {}
    for p in points:
        if p["dataset"] != dataset:
            continue
        best = chosen.get(p["run"])
        if best is None or (-p["mean"], p["step"]) < (-best[0], best[1]):
            chosen[p["run"]] = (p["mean"], p["step"])
    return {run: step for run, (_, step) in chosen.items()}


# --- command line ----------------------------------------------------------------------------------------------------


class _Parser(ArgumentParser):
    """One-line errors (`pwopsd.io.ArgumentParser`), worded "…; see --help" as this tool always has."""

    help_hint = "; see --help"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--results_dir", type=Path, default=None,
                        help="folder of result JSON files (default eval_results; skipped when only --training is "
                             "given)")  # fmt: skip
    parser.add_argument("--out_dir", type=Path, default=Path("eval_results_summary"), help="where to write the summary")
    parser.add_argument("--baseline", default="opsd", help="method every other method of a model is compared with")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples per interval")
    parser.add_argument("--permutations", type=int, default=10000,
                        help="random sign patterns of the permutation test (exact when 2^P is not larger)")  # fmt: skip
    parser.add_argument("--stats_seed", type=int, default=0, help="seed of the bootstrap and permutation draws")
    parser.add_argument("--protocol_checkpoint", type=int, default=100,
                        help="the step whose files carry no _ckpt (marked on the learning curves)")  # fmt: skip
    parser.add_argument("--select_on", default=None, metavar="DATASET",
                        help="choose each run's checkpoint by its Avg@N on this held-out split (never a test "
                             "benchmark); left out of the tables")  # fmt: skip
    parser.add_argument("--training", type=Path, nargs="+", default=None, metavar="OUTPUT_DIR",
                        help="training output folders: curves from trainer_state.json into OUT_DIR/training/")  # fmt: skip
    args = parser.parse_args(argv)
    if args.baseline not in METHODS:
        raise UserError(f"--baseline {args.baseline!r} is not a method; choose one of {', '.join(METHODS)}")
    for flag in ("bootstrap", "permutations"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.stats_seed < 0:
        raise UserError(f"--stats_seed must be >= 0, got {args.stats_seed}")
    if args.select_on is not None and args.select_on in BENCHMARKS:
        raise UserError(f"--select_on {args.select_on} is a test benchmark; choosing a checkpoint by its test score is "
                        "not offered: name a held-out split (its result files' dataset)")  # fmt: skip
    if args.results_dir is None and args.training is None:
        args.results_dir = Path("eval_results")
    return args


def check_out_dir(out_dir: Path) -> None:
    """`--out_dir` must be (or be creatable as) a writable folder: checked before any work."""
    path = out_dir.absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file, not a folder; pass a folder (it is created if missing)")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--out_dir {out_dir} cannot be created: {probe} is a file; pass another folder")
    if not os.access(probe, os.W_OK | os.X_OK) or not probe.stat().st_mode & 0o222:
        what = "is read-only" if probe == path else f"cannot be created: {probe} is read-only"
        raise UserError(f"--out_dir {out_dir} {what}; pass a writable folder")


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def summarize_results(args: argparse.Namespace) -> int:
    """Tables, intervals, paired differences, forest plot and learning curves of `--results_dir`."""
    records, errors = collect(args.results_dir)
    for error in errors:
        print(f"{PROG}: error: {error}", file=sys.stderr)
    if not records:
        print(f"{PROG}: error: no evaluation result in {args.results_dir}", file=sys.stderr)
        return 1
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    usable = [r for r in records if r.dataset != args.select_on]
    protocol = [r for r in usable if r.checkpoint is None]
    without = [r for r in records if r.problems is None]
    if without:
        warn(f"{len(without)} result file(s) without usable per-problem results (first: {without[0].file}: "
             f"{without[0].problems_note}); the intervals and paired differences leave them out")  # fmt: skip
    overlaps = seed_overlaps(records)
    if overlaps:
        warn(f"{len(overlaps)} run(s) average seeds that share sample streams under the engine seed "
             f"rule (first: {overlaps[0]}); their std over seeds understates the seed variation (note in summary.md)")  # fmt: skip
    table = ""
    if protocol:
        rows = aggregate(protocol)
        benchmarks = ordered_benchmarks(protocol)
        add_problem_intervals(rows, protocol, args.bootstrap, args.stats_seed)
        diffs: list[dict[str, Any]] = []
        if any(r.method == args.baseline for r in protocol):
            diffs = paired_rows(protocol, args.baseline, args.bootstrap, args.permutations, args.stats_seed)
        elif any(r.method in METHODS for r in protocol):
            warn(f"no {args.baseline} run among the results; the paired differences are skipped (set --baseline)")
        table = markdown(rows, benchmarks)
        extra = markdown_statistics(rows, diffs, benchmarks, args.baseline, args.bootstrap, args.permutations)
        table_overlaps = seed_overlaps(protocol)
        if table_overlaps:
            extra += ("\n" if extra else "") + overlap_note(table_overlaps)
        full = table + ("\n" + extra if extra else "")
        atomic_write_text(out / "summary.md", full)
        write_csv(rows + diffs, out / "summary.csv")
        write_chart(rows, benchmarks, out / "summary.png")
        written += ["summary.md", "summary.csv", "summary.png"]
        if diffs:
            plots.forest_plot(diffs, METRIC_TITLES, out / "forest.png")
            written.append("forest.png")
        print(full)
    points, curve_warnings = curve_points(records, args.protocol_checkpoint, args.bootstrap, args.stats_seed)
    for line in curve_warnings:
        warn(line)
    if points:
        import pandas as pd

        selected = select_checkpoints(points, args.select_on) if args.select_on else {}
        frame = pd.DataFrame(points)
        frame["selected_on"] = [args.select_on if selected.get(p["run"]) == p["step"] else "" for p in points]
        atomic_write_text(out / "learning_curves.csv", frame.to_csv(index=False, float_format="%.4f"))
        curve_benchmarks = ordered_benchmarks([r for r in records if r.base_run in {p["run"] for p in points}])
        plots.learning_curves(points, curve_benchmarks, args.protocol_checkpoint, out / "learning_curves.png",
                              selected)  # fmt: skip
        written += ["learning_curves.csv", "learning_curves.png"]
        for run in sorted({p["run"] for p in points}):
            if args.select_on:
                choice = f"step {selected[run]}" if run in selected else f"none (no {args.select_on} result)"
                print(f"checkpoint of {run} chosen by Avg@N on the held-out {args.select_on}: {choice}")
        if not args.select_on:
            print(f"learning curves: the tables use the protocol checkpoint ({args.protocol_checkpoint}); "
                  "no checkpoint is chosen by a test score")  # fmt: skip
    if not written:
        print(f"{PROG}: error: no protocol or checkpoint result to summarize in {args.results_dir}", file=sys.stderr)
        return 1
    print(f"wrote {out}/{', '.join(written)} ({len(records)} files)")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        args = parse_args(argv)
        if args.results_dir is not None and not args.results_dir.is_dir():
            raise UserError(f"--results_dir {args.results_dir} is not a folder; pass the folder of result JSON files")
        check_out_dir(args.out_dir)
        states = [plots.find_trainer_state(d) for d in args.training or []]  # every folder checked before any work
        status = summarize_results(args) if args.results_dir is not None else 0
        if states:
            written = plots.training_plots(args.training, args.out_dir / "training")
            print(f"wrote {len(written)} training plot(s) to {args.out_dir / 'training'}")
        return status

    return run_main(run, PROG)


if __name__ == "__main__":
    sys.exit(main())
