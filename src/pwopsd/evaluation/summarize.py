"""Seed tables of evaluation results: mean ± sample std over seeds, markdown + CSV + PNG bar chart.

    python eval/summarize.py [--results_dir eval_results] [--out_dir eval_results_summary]

Reads every `*.json` result in `--results_dir` (the names `run_eval.sh` writes:
`{NAME}[_{DATASET}]_38k[_seed{S}].json`, or any `{RUN}[_{DATASET}][_{B}k][_seed{S}].json`). The benchmark and seed
come from the file's `dataset` and `seed` keys; the run name is the file name without those suffixes, split into model
and method when it ends in a known method (`METHODS`: the methods of `pwopsd.losses.METHODS`, then `base`), e.g.
`qwen3_4b_base_pwopsd` -> (`qwen3_4b_base`, `pwopsd`) and `smollm2_base` -> (`smollm2`, `base`). Benchmarks come in
the order of `pwopsd.evaluation.benchmarks.BENCHMARKS`, unknown ones after them.

For each run × benchmark: mean ± sample standard deviation (n−1) over seeds of Avg@N, Pass@N and Maj@N; per run the
equal-weight cross-benchmark Avg@N (mean over benchmarks of the per-benchmark means; its std is over the seeds that
cover every benchmark). Writes `summary.md`, `summary.csv` (long format) and `summary.png` (bars with std error bars).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pwopsd.evaluation.benchmarks import BENCHMARKS
from pwopsd.losses import METHODS as LOSS_METHODS

logger = logging.getLogger(__name__)

METHODS = (*LOSS_METHODS, "base")  # the row order of the tables: the distillation methods, then the base model
BENCHMARK_ORDER = tuple(BENCHMARKS)
METRICS = {"avg": "average_at_n_pct", "pass": "pass_at_n_pct", "maj": "majority_vote_at_n_pct"}
METRIC_TITLES = {"avg": "Avg", "pass": "Pass", "maj": "Maj"}
CROSS = "avg"  # the dataset label of the cross-benchmark average in the CSV


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


def split_run(run: str) -> tuple[str, str]:
    """(model, method): the method is the last `_` part when it is a known method, else '-'."""
    model, _, method = run.rpartition("_")
    if model and method in METHODS:
        return model, method
    return run, "-"


def run_name(stem: str, dataset: str, seed: int | None) -> str:
    """File stem without `_seed{S}`, a `_{B}k` token budget and `_{dataset}` suffixes (in that order)."""
    if seed is not None:
        stem = re.sub(rf"_seed{seed}$", "", stem)
    stem = re.sub(r"_\d+k$", "", stem)
    return re.sub(rf"_{re.escape(dataset)}$", "", stem)


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
    dataset = str(data["dataset"])
    run = run_name(path.stem, dataset, seed)
    model, method = split_run(run)
    try:
        values = {short: float(data[key]) for short, key in METRICS.items()}
        val_n = int(data["val_n"])
    except (TypeError, ValueError) as e:  # e.g. null or "n/a"
        raise ValueError(f"not an evaluation result (a metric or val_n is not a number: {e})") from e
    return Record(run, model, method, dataset, seed, val_n, values, path.name)


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


def cell_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    if math.isnan(row["std"]):
        return f"{row['mean']:.2f} (n={row['n_seeds']})"
    return f"{row['mean']:.2f} ± {row['std']:.2f} (n={row['n_seeds']})"


def markdown(rows: list[dict[str, Any]], benchmarks: list[str]) -> str:
    """One table per metric: runs × benchmarks (+ the cross-benchmark Avg@N in the Avg table)."""
    ns = sorted({row["val_n"] for row in rows})
    n = str(ns[0]) if len(ns) == 1 else "N"
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


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        rows, columns=["model", "method", "run", "dataset", "metric", "val_n", "n_seeds", "seeds", "mean", "std"]
    )
    frame["seeds"] = frame["seeds"].map(lambda seeds: " ".join("none" if s is None else str(s) for s in seeds))
    frame.to_csv(path, index=False, float_format="%.4f")


def write_chart(rows: list[dict[str, Any]], benchmarks: list[str], path: Path) -> None:
    """Grouped bars (benchmark × run) for each metric, error bars = sample std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results_dir", type=Path, default=Path("eval_results"), help="folder of result JSON files")
    parser.add_argument("--out_dir", type=Path, default=Path("eval_results_summary"), help="where to write the summary")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        print(f"summarize.py: error: --results_dir {args.results_dir} is not a folder", file=sys.stderr)
        return 2
    records, errors = collect(args.results_dir)
    for error in errors:
        print(f"summarize.py: error: {error}", file=sys.stderr)
    if not records:
        print(f"summarize.py: error: no evaluation result in {args.results_dir}", file=sys.stderr)
        return 1
    rows = aggregate(records)
    benchmarks = ordered_benchmarks(records)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, benchmarks)
    (args.out_dir / "summary.md").write_text(table, encoding="utf-8")
    write_csv(rows, args.out_dir / "summary.csv")
    write_chart(rows, benchmarks, args.out_dir / "summary.png")
    print(table)
    print(f"wrote {args.out_dir}/summary.md, summary.csv, summary.png ({len(records)} files)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
