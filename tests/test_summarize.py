"""summarize.py on synthetic result files: name parsing, mean ± sample std over seeds, cross-benchmark Avg, outputs."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pandas as pd
import pytest

from pwopsd.evaluation import summarize

DATASETS = ("math500", "aime24", "aime25", "hmmt25")


def _file_name(name: str, dataset: str, seed: int | None) -> str:
    """The output names `run_eval.sh` writes: `{NAME}[_{DATASET}]_38k[_seed{S}].json`."""
    middle = "" if dataset == "math500" else f"_{dataset}"
    return f"{name}{middle}_38k" + ("" if seed is None else f"_seed{seed}") + ".json"


def _write(folder: Path, file_name: str, dataset: str, seed: int | None, avg: float, pas: float, maj: float) -> None:
    data = {"base_model": "m", "dataset": dataset, "val_n": 12, "seed": seed, "average_at_n_pct": avg,
            "pass_at_n_pct": pas, "majority_vote_at_n_pct": maj, "results": []}  # fmt: skip
    (folder / file_name).write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("stem", "dataset", "seed", "run", "model", "method"),
    [("qwen3_4b_base_pwopsd_38k_seed0", "math500", 0, "qwen3_4b_base_pwopsd", "qwen3_4b_base", "pwopsd"),
     ("dsr1_l8b_reopold_aime24_38k_seed2", "aime24", 2, "dsr1_l8b_reopold", "dsr1_l8b", "reopold"),
     ("olmo3_7b_think_eopd_hmmt25_38k", "hmmt25", None, "olmo3_7b_think_eopd", "olmo3_7b_think", "eopd"),
     ("smollm2_base_math500_seed0", "math500", 0, "smollm2_base", "smollm2", "base"),
     ("smollm2_pwopsd_aime25_seed1", "aime25", 1, "smollm2_pwopsd", "smollm2", "pwopsd"),
     ("my_run", "custom", None, "my_run", "my_run", "-")],
)  # fmt: skip
def test_run_names(stem: str, dataset: str, seed: int | None, run: str, model: str, method: str) -> None:
    assert summarize.run_name(stem, dataset, seed) == run
    assert summarize.split_run(run) == (model, method)


def test_tables_over_seeds(tmp_path, capsys) -> None:
    rng = random.Random(0)
    results, out = tmp_path / "eval_results", tmp_path / "summary"
    results.mkdir()
    truth: dict[tuple[str, str, str], list[float]] = {}
    for name in ("qwen3_4b_base_pwopsd", "qwen3_4b_base_opsd"):
        for dataset in DATASETS:
            for seed in (0, 1, 2):
                values = {"avg": rng.uniform(0, 100), "pass": rng.uniform(0, 100), "maj": rng.uniform(0, 100)}
                _write(results, _file_name(name, dataset, seed), dataset, seed, values["avg"], values["pass"], values["maj"])
                for metric, value in values.items():
                    truth.setdefault((name, dataset, metric), []).append(value)
    _write(results, "smollm2_base_math500_seed0.json", "math500", 0, 10.0, 20.0, 15.0)  # the demo's naming
    (results / "broken.json").write_text("{not json")
    (results / "notes.json").write_text(json.dumps({"hello": 1}))
    _write(results, "nulls.json", "math500", 0, None, 20.0, 15.0)  # a metric that is null

    assert summarize.main(["--results_dir", str(results), "--out_dir", str(out)]) == 1  # bad files flagged ...
    err = capsys.readouterr().err
    assert "broken.json: not valid JSON" in err and "notes.json: not an evaluation result" in err
    assert "nulls.json: not an evaluation result (a metric or val_n is not a number" in err

    frame = pd.read_csv(out / "summary.csv")  # ... but every good file is summarised
    for (name, dataset, metric), values in truth.items():
        row = frame[(frame.run == name) & (frame.dataset == dataset) & (frame.metric == metric)].iloc[0]
        assert row["mean"] == pytest.approx(statistics.mean(values), abs=1e-4)
        assert row["std"] == pytest.approx(statistics.stdev(values), abs=1e-4)  # sample std (n - 1)
        assert (row["n_seeds"], row["seeds"]) == (3, "0 1 2")
    for name in ("qwen3_4b_base_pwopsd", "qwen3_4b_base_opsd"):
        cross = frame[(frame.run == name) & (frame.dataset == "avg")].iloc[0]
        per_seed = [statistics.mean(truth[(name, d, "avg")][s] for d in DATASETS) for s in range(3)]
        assert cross["mean"] == pytest.approx(statistics.mean(statistics.mean(truth[(name, d, "avg")]) for d in DATASETS), abs=1e-4)
        assert cross["std"] == pytest.approx(statistics.stdev(per_seed), abs=1e-4)
    demo = frame[(frame.run == "smollm2_base") & (frame.metric == "avg")]
    assert list(demo.dataset) == ["math500"] and demo.iloc[0]["n_seeds"] == 1 and pd.isna(demo.iloc[0]["std"])
    assert set(frame.method) == {"pwopsd", "opsd", "base"}

    table = (out / "summary.md").read_text()
    values = truth[("qwen3_4b_base_pwopsd", "aime24", "avg")]
    cell = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n=3)"
    assert "### Avg@12 (mean ± sample std over seeds)" in table
    assert "| model | method | math500 | aime24 | aime25 | hmmt25 | avg (equal weight) |" in table
    assert any(line.startswith("| qwen3_4b_base | pwopsd | ") and cell in line for line in table.splitlines())
    assert "| smollm2 | base | 10.00 (n=1) | — | — | — | — |" in table  # incomplete run: no cross average
    assert "### Pass@12" in table and "### Maj@12" in table

    png = (out / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_duplicate_run_and_missing_folder(tmp_path, capsys) -> None:
    results = tmp_path / "r"
    results.mkdir()
    _write(results, "x_pwopsd_38k_seed0.json", "math500", 0, 1.0, 2.0, 3.0)
    _write(results, "x_pwopsd_math500_38k_seed0.json", "math500", 0, 9.0, 9.0, 9.0)  # same run/benchmark/seed
    assert summarize.main(["--results_dir", str(results), "--out_dir", str(tmp_path / "o")]) == 1
    assert "same run, benchmark and seed" in capsys.readouterr().err
    assert summarize.main(["--results_dir", str(tmp_path / "nope")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert summarize.main(["--results_dir", str(empty), "--out_dir", str(tmp_path / "o2")]) == 1
