"""summarize.py on synthetic result files: name parsing, mean ± sample std over seeds, cross-benchmark Avg, outputs."""

from __future__ import annotations

import itertools
import json
import random
import statistics
from pathlib import Path

import pandas as pd
import pytest

from pwopsd.evaluation import stats, summarize

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
                _write(
                    results,
                    _file_name(name, dataset, seed),
                    dataset,
                    seed,
                    values["avg"],
                    values["pass"],
                    values["maj"],
                )
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
        assert cross["mean"] == pytest.approx(
            statistics.mean(statistics.mean(truth[(name, d, "avg")]) for d in DATASETS), abs=1e-4
        )
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


# --- per-problem statistics, learning curves, training curves, bad input ---------------------------------------------


def _write_problems(
    folder: Path, file_name: str, dataset: str, seed: int | None, correct: dict[object, list[bool]],
    maj: dict[object, bool] | None = None, **extra: object,
) -> None:  # fmt: skip
    """A result file with per-problem generations; the headline metrics computed from them."""
    maj = maj if maj is not None else {pid: sum(flags) * 2 > len(flags) for pid, flags in correct.items()}
    n = len(next(iter(correct.values())))
    results = [{"problem_id": pid, "generations": [{"correct": c} for c in flags], "num_correct": sum(flags),
                "pass_at_n": any(flags), "majority_vote_correct": maj[pid]} for pid, flags in correct.items()]  # fmt: skip
    data = {"dataset": dataset, "val_n": n, "seed": seed,
            "average_at_n_pct": 100 * statistics.mean(sum(f) / n for f in correct.values()),
            "pass_at_n_pct": 100 * statistics.mean(any(f) for f in correct.values()),
            "majority_vote_at_n_pct": 100 * statistics.mean(maj.values()), "results": results, **extra}  # fmt: skip
    (folder / file_name).write_text(json.dumps(data))


def _naive_percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    h = (len(xs) - 1) * q / 100
    lo = int(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_paired_differences_against_naive(tmp_path, capsys) -> None:
    """method − opsd per problem (mean over seeds), keyed bootstrap redone by a loop, exact sign-flip p enumerated."""
    rng = random.Random(1)
    results, out = tmp_path / "r", tmp_path / "o"
    results.mkdir()
    n, boot = 4, 400
    flags: dict[tuple[str, str, int], dict[int, list[bool]]] = {}
    problems = {"math500": list(range(12)), "aime24": list(range(100, 109))}
    for name in ("m_pwopsd", "m_opsd"):
        for dataset, ids in problems.items():
            mine = ids if name == "m_pwopsd" else ids[:-2]  # the baseline lacks two problems: only common ones count
            for seed in (0, 1):
                correct = {pid: [rng.random() < 0.5 for _ in range(n)] for pid in mine}
                flags[(name, dataset, seed)] = correct
                _write_problems(results, _file_name(name, dataset, seed), dataset, seed, correct,
                                sample_seed_rule="independent")  # fmt: skip
    code = summarize.main(["--results_dir", str(results), "--out_dir", str(out), "--bootstrap", str(boot),
                           "--permutations", "2000"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().err == ""  # per-problem data everywhere, independent seeds: no warning
    frame = pd.read_csv(out / "summary.csv")

    def per_problem(name: str, dataset: str, metric: str) -> dict[int, float]:
        def value(f: list[bool]) -> float:
            return {"avg": sum(f) / n, "pass": float(any(f)), "maj": float(sum(f) * 2 > n)}[metric]

        seeds = [flags[(name, dataset, s)] for s in (0, 1)]
        return {pid: statistics.mean(value(s[pid]) for s in seeds) for pid in seeds[0]}

    strata = {}
    for metric in ("avg", "pass", "maj"):
        for dataset in problems:
            a, b = per_problem("m_pwopsd", dataset, metric), per_problem("m_opsd", dataset, metric)
            order = sorted(set(a) & set(b), key=lambda pid: json.dumps(pid))  # the documented problem order
            diffs = [100 * (a[p] - b[p]) for p in order]
            strata[(metric, dataset)] = diffs
            row = frame[(frame.run == "m_pwopsd") & (frame.dataset == dataset) & (frame.metric == f"{metric}_diff")]
            row = row.iloc[0]
            assert row["n_problems"] == len(problems[dataset]) - 2 and row["baseline"] == "m_opsd"
            assert row["mean"] == pytest.approx(statistics.mean(diffs), abs=1e-4)
            rng_np = stats.rng_for(0, "bootstrap", "m_pwopsd", "m_opsd", dataset, metric)
            idx = rng_np.integers(0, len(diffs), size=(boot, len(diffs)))
            reps = [statistics.mean(diffs[int(i)] for i in row_idx) for row_idx in idx]
            assert row["ci_low"] == pytest.approx(_naive_percentile(reps, 2.5), abs=1e-4)
            assert row["ci_high"] == pytest.approx(_naive_percentile(reps, 97.5), abs=1e-4)
            observed = statistics.mean(diffs)  # 2^10 or 2^7 sign patterns <= 2000: exact
            flips = [abs(sum(s * d for s, d in zip(signs, diffs)) / len(diffs)) >= abs(observed) - 1e-9
                     for signs in itertools.product((1, -1), repeat=len(diffs))]  # fmt: skip
            assert row["p_value"] == pytest.approx(sum(flips) / len(flips), abs=1e-4)
        score = frame[(frame.run == "m_opsd") & (frame.dataset == dataset) & (frame.metric == metric)].iloc[0]
        assert score["n_problems"] == len(problems[dataset]) - 2  # the score's own interval: all its problems
    cross = frame[(frame.run == "m_pwopsd") & (frame.dataset == "avg") & (frame.metric == "avg_diff")].iloc[0]
    parts = [strata[("avg", d)] for d in problems]
    assert cross["mean"] == pytest.approx(statistics.mean(statistics.mean(p) for p in parts), abs=1e-4)
    rng_np = stats.rng_for(0, "bootstrap", "m_pwopsd", "m_opsd", "avg", "avg")
    draws = [rng_np.integers(0, len(p), size=(boot, len(p))) for p in parts]  # within each benchmark, in order
    reps = [
        statistics.mean(statistics.mean(p[int(i)] for i in d[b]) for p, d in zip(parts, draws)) for b in range(boot)
    ]
    assert (cross["ci_low"], cross["ci_high"]) == pytest.approx(
        (_naive_percentile(reps, 2.5), _naive_percentile(reps, 97.5)), abs=1e-4
    )
    assert 0 <= cross["p_value"] <= 1 and cross["n_problems"] == 17

    table = (out / "summary.md").read_text()
    assert "### Paired differences vs opsd" in table and "| m | pwopsd | Avg@4 |" in table
    assert "not the variance of training" in table
    png = (out / "forest.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_and_flipped_methods(tmp_path) -> None:
    """Identical per-problem results: interval contains 0 and p = 1. Every problem 0 -> 1: +100 [+100, +100]."""
    results, out = tmp_path / "r", tmp_path / "o"
    results.mkdir()
    rng = random.Random(2)
    same = {pid: [rng.random() < 0.4 for _ in range(4)] for pid in range(15)}
    for name in ("m_opsd", "m_eopd"):
        _write_problems(results, f"{name}_38k_seed0.json", "math500", 0, same)
    wrong = {pid: [False] * 4 for pid in range(6)}
    right = {pid: [True] * 4 for pid in range(6)}
    _write_problems(results, "m_opsd_aime24_38k_seed0.json", "aime24", 0, wrong)
    _write_problems(results, "m_pwopsd_aime24_38k_seed0.json", "aime24", 0, right)
    assert summarize.main(["--results_dir", str(results), "--out_dir", str(out), "--bootstrap", "300"]) == 0
    frame = pd.read_csv(out / "summary.csv")
    for metric in ("avg_diff", "pass_diff", "maj_diff"):
        row = frame[(frame.run == "m_eopd") & (frame.metric == metric)].iloc[0]
        assert row["ci_low"] <= 0 <= row["ci_high"] and row["p_value"] == 1.0 and row["mean"] == 0.0
        flip = frame[(frame.run == "m_pwopsd") & (frame.metric == metric)].iloc[0]
        assert (flip["mean"], flip["ci_low"], flip["ci_high"]) == (100.0, 100.0, 100.0)
        assert flip["p_value"] == pytest.approx(2 / 2**6, abs=1e-4)  # exact: only all-plus / all-minus reach 100
    assert "+100.00 [+100.00, +100.00] p=0.0312 (P=6)" in (out / "summary.md").read_text()


def test_seed_overlap_warning(tmp_path, capsys) -> None:
    """Engine rule (or no key): seeds closer than val_n share streams -> one warning and a note; independent: none."""
    results, out = tmp_path / "r", tmp_path / "o"
    results.mkdir()
    correct = {pid: [True, False, True, False] for pid in range(3)}
    for seed in (0, 1, 2):
        _write_problems(results, f"a_opsd_38k_seed{seed}.json", "math500", seed, correct)  # no key: engine
        _write_problems(results, f"b_opsd_38k_seed{seed}.json", "math500", seed, correct, sample_seed_rule="engine")
        _write_problems(results, f"c_opsd_38k_seed{seed}.json", "math500", seed, correct,
                        sample_seed_rule="independent")  # fmt: skip
        _write_problems(results, f"d_opsd_38k_seed{seed * 4}.json", "math500", seed * 4, correct)  # 0, 4, 8: apart
    assert summarize.main(["--results_dir", str(results), "--out_dir", str(out), "--bootstrap", "50"]) == 0
    line = _one_error_line(capsys)
    assert line == (
        "summarize.py: warning: 2 run(s) average seeds that share sample streams under the engine seed rule (first: "
        "a_opsd: math500 seeds 0 1 2 (val_n 4)); their std over seeds understates the seed variation (note in "
        "summary.md)"
    )
    note = (out / "summary.md").read_text().split("Note: the seeds of these runs share sample streams")[1]
    assert "- a_opsd: math500 seeds 0 1 2 (val_n 4)" in note and "- b_opsd: math500 seeds 0 1 2 (val_n 4)" in note
    assert "c_opsd" not in note and "d_opsd" not in note


@pytest.mark.parametrize("seed", ["0", 1.5, [0], True, {"s": 0}])
def test_bad_seed_skips_one_file(tmp_path, capsys, seed: object) -> None:
    results, out = tmp_path / "r", tmp_path / "o"
    results.mkdir()
    _write(results, "x_opsd_38k_seed0.json", "math500", 0, 10.0, 20.0, 30.0)
    _write(results, "x_opsd_38k_seed1.json", "math500", 1, 20.0, 20.0, 30.0)
    _write(results, "x_opsd_38k_seedbad.json", "math500", seed, 99.0, 99.0, 99.0)  # type: ignore[arg-type]
    assert summarize.main(["--results_dir", str(results), "--out_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    bad = [line for line in err.splitlines() if "seedbad" in line]
    assert bad == [f"summarize.py: error: {results}/x_opsd_38k_seedbad.json: seed is {json.dumps(seed)} "
                   f"({type(seed).__name__}); expected an integer or null; fix or move the file"]  # fmt: skip
    row = pd.read_csv(out / "summary.csv").query("metric == 'avg'").iloc[0]
    assert (row["mean"], row["n_seeds"]) == (15.0, 2)  # the two good files are summarised


def test_user_errors_one_line(tmp_path, capsys) -> None:
    results = tmp_path / "r"
    results.mkdir()
    (results / "broken.json").write_text("{")  # never read: the checks come before any work
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    cases = [
        (["--out_dir", str(a_file)], f"--out_dir {a_file} is a file, not a folder; pass a folder"),
        (["--out_dir", str(a_file / "sub")], f"--out_dir {a_file / 'sub'} cannot be created: {a_file} is a file"),
        (["--out_dir", str(readonly)], f"--out_dir {readonly} is read-only; pass a writable folder"),
        (["--out_dir", str(readonly / "new")], f"--out_dir {readonly / 'new'} cannot be created: {readonly} is read-o"),
        (["--baseline", "nope"], "--baseline 'nope' is not a method; choose one of"),
        (["--bootstrap", "0"], "--bootstrap must be at least 1, got 0"),
        (["--bootstrap", "many"], "argument --bootstrap: invalid int value: 'many'; see --help"),
        (["--select_on", "aime24"], "--select_on aime24 is a test benchmark; choosing a checkpoint by its test score"),
        (["--training", str(tmp_path / "none")], f"--training {tmp_path / 'none'} is not a folder"),
        (["--training", str(results)], f"--training {results} holds no trainer_state.json"),
        (["--results_dir", str(tmp_path / "missing")], f"--results_dir {tmp_path / 'missing'} is not a folder"),
    ]
    try:
        for extra, expected in cases:
            argv = ["--results_dir", str(results), "--out_dir", str(tmp_path / "o"), *extra]
            assert summarize.main(argv) == 2, extra
            line = _one_error_line(capsys)
            assert line.startswith(f"summarize.py: error: {expected}"), line
            assert not (tmp_path / "o").exists()
    finally:
        readonly.chmod(0o755)


def test_user_error_from_the_script(tmp_path) -> None:
    """The entry script: exit 2, one stderr line, no traceback."""
    import subprocess
    import sys

    a_file = tmp_path / "f"
    a_file.write_text("x")
    script = Path(__file__).resolve().parents[1] / "eval" / "summarize.py"
    proc = subprocess.run([sys.executable, str(script), "--results_dir", str(tmp_path), "--out_dir", str(a_file)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"summarize.py: error: --out_dir {a_file} is a file, not a folder; pass a folder (it is created if missing)"
    ]


def test_learning_curves(tmp_path, capsys) -> None:
    """`_ckpt{N}` runs: steps parsed, the protocol files at --protocol_checkpoint, held-out selection, tables untouched."""
    results, out = tmp_path / "r", tmp_path / "o"
    results.mkdir()
    rng = random.Random(3)
    truth: dict[tuple[str, int], list[dict[int, list[bool]]]] = {}
    for step, tag in ((50, "_ckpt50"), (100, ""), (150, "_ckpt150")):
        for dataset in ("math500", "aime24", "heldout"):
            for seed in (0, 1):
                correct = {pid: [rng.random() < step / 200 for _ in range(4)] for pid in range(8)}
                truth.setdefault((dataset, step), []).append(correct)
                middle = "" if dataset == "math500" else f"_{dataset}"
                _write_problems(results, f"m_pwopsd{tag}{middle}_38k_seed{seed}.json", dataset, seed, correct,
                                sample_seed_rule="independent")  # fmt: skip
    heldout = {step: statistics.mean(100 * statistics.mean(sum(f) / 4 for f in c.values()) for c in truth[("heldout", step)])
               for step in (50, 100, 150)}  # fmt: skip
    argv = ["--results_dir", str(results), "--out_dir", str(out), "--bootstrap", "200", "--select_on", "heldout"]
    assert summarize.main(argv) == 0
    printed = capsys.readouterr().out
    best = max(heldout, key=lambda s: (heldout[s], -s))
    assert f"checkpoint of m_pwopsd chosen by Avg@N on the held-out heldout: step {best}" in printed
    curves = pd.read_csv(out / "learning_curves.csv")
    assert sorted(set(curves.step)) == [50, 100, 150] and set(curves.dataset) == {"math500", "aime24", "heldout"}
    for (dataset, step), cells in truth.items():
        row = curves[(curves.dataset == dataset) & (curves.step == step)].iloc[0]
        values = [100 * statistics.mean(sum(c[pid]) / 4 for c in cells) for pid in sorted(cells[0], key=json.dumps)]
        assert row["mean"] == pytest.approx(statistics.mean(values), abs=1e-4)
        rng_np = stats.rng_for(0, "m_pwopsd", dataset, str(step), "curve")
        reps = [statistics.mean(values[int(i)] for i in r) for r in rng_np.integers(0, 8, size=(200, 8))]
        assert row["ci_low"] == pytest.approx(_naive_percentile(reps, 2.5), abs=1e-4)
        assert (row["selected_on"] == "heldout") == (dataset == "heldout" and step == best) or dataset != "heldout"
    frame = pd.read_csv(out / "summary.csv")
    assert set(frame.run) == {"m_pwopsd"} and set(frame.dataset) == {"math500", "aime24", "avg"}  # no ckpt, no heldout
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _state(steps: list[int], scale: float) -> dict[str, object]:
    history: list[dict[str, object]] = [
        {"step": s, "loss": scale * s, "grad_norm": 1.0 + s, "completions/mean_length": 10.0 * s,
         "ea/position_weight_mean": 0.5, "health/nan_fraction": 0.0, "learning_rate": 1e-6, "epoch": 0.1 * s}
        for s in steps
    ]  # fmt: skip
    history.append({"step": steps[-1], "train_runtime": 12.0, "train_loss": 0.3})
    return {"global_step": steps[-1], "log_history": history}


def test_training_plots(tmp_path, capsys) -> None:
    """trainer_state.json from OUTPUT_DIR or its newest checkpoint-*; per-run and overlay PNGs; the series read."""
    from pwopsd.evaluation import plots

    run_a, run_b, out = tmp_path / "a_opsd", tmp_path / "b_pwopsd", tmp_path / "o"
    (run_a / "checkpoint-2").mkdir(parents=True)
    (run_a / "checkpoint-10").mkdir()
    (run_a / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(_state([1, 2], 9.0)))
    (run_a / "checkpoint-10" / "trainer_state.json").write_text(json.dumps(_state([1, 2, 3, 10], 2.0)))
    run_b.mkdir()
    (run_b / "trainer_state.json").write_text(json.dumps(_state([1, 2, 3], 1.0)))
    assert plots.find_trainer_state(run_a) == run_a / "checkpoint-10" / "trainer_state.json"  # 10 > 2 numerically
    series = plots.training_series(run_a / "checkpoint-10" / "trainer_state.json")
    assert list(series) == ["loss", "grad_norm", "completions/mean_length", "ea/position_weight_mean",
                            "health/nan_fraction"]  # fmt: skip
    assert series["loss"] == ([1.0, 2.0, 3.0, 10.0], [2.0, 4.0, 6.0, 20.0])
    assert summarize.main(["--training", str(run_a), str(run_b), "--out_dir", str(out)]) == 0
    assert capsys.readouterr().err == ""
    names = sorted(p.name for p in (out / "training").iterdir())
    assert names == sorted(["run_a_opsd.png", "run_b_pwopsd.png", "overlay_loss.png", "overlay_grad_norm.png",
                            "overlay_completions_mean_length.png", "overlay_ea_position_weight_mean.png",
                            "overlay_health_nan_fraction.png"])  # fmt: skip
    assert not (out / "summary.md").exists()  # only --training: no result tables
    (run_b / "trainer_state.json").write_text("{broken")
    assert summarize.main(["--training", str(run_b), "--out_dir", str(out)]) == 2
    assert _one_error_line(capsys).startswith(f"summarize.py: error: {run_b / 'trainer_state.json'} is not a readable")


def test_old_files_without_problems_warn_once(tmp_path, capsys) -> None:
    results, out = tmp_path / "r", tmp_path / "o"
    results.mkdir()
    for seed in (0, 20):
        _write(results, f"m_opsd_38k_seed{seed}.json", "math500", seed, 10.0, 20.0, 30.0)
        _write(results, f"m_pwopsd_38k_seed{seed}.json", "math500", seed, 11.0, 20.0, 30.0)
    assert summarize.main(["--results_dir", str(results), "--out_dir", str(out)]) == 0
    assert _one_error_line(capsys) == (
        "summarize.py: warning: 4 result file(s) without usable per-problem results (first: m_opsd_38k_seed0.json: "
        "no per-problem results); the intervals and paired differences leave them out"
    )
    assert "Paired" not in (out / "summary.md").read_text() and not (out / "forest.png").exists()
