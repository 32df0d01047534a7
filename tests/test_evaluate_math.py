"""evaluate_math.py (docs/evaluation.md): datasets, CLI, the transformers backend end to end on a tiny model, the
exact vLLM arguments (recording stand-in: vLLM cannot run here), every JSON key, resume after a kill, atomic writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, REPO_ROOT, read_data

from pwopsd.evaluation import benchmarks, evaluate, generate
from pwopsd.evaluation.benchmarks import BENCHMARKS, load_benchmark
from pwopsd.evaluation.evaluate import EvalArguments, main
from pwopsd.evaluation.extract import NO_BOXED_ANSWER, extract_answer
from pwopsd.evaluation.generate import PresencePenaltyLogitsProcessor, sampling_processors
from pwopsd.io import UserError, atomic_write_json
from pwopsd.prompts import EVAL_PROMPT_SUFFIX

TOP_KEYS = [  # docs/evaluation.md#output-json, in order
    "base_model", "dataset", "enable_thinking", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
    "max_new_tokens", "val_n", "seed", "num_problems", "total_solutions", "pass_at_n", "pass_at_n_pct", "average_at_n",
    "average_at_n_pct", "majority_vote_at_n", "majority_vote_at_n_pct", "formatted_count", "format_rate",
]  # fmt: skip
EXTRA_KEYS = [
    "pass_at_k", "backend", "dtype", "sample_seed_rule", "grader", "answer_format", "math_verify_version",
    "grading_timeouts",
]  # fmt: skip
RESULT_KEYS = [
    "problem_id", "problem", "ground_truth", "val_n", "generations", "num_correct", "pass_at_n",
    "majority_vote_correct", "predicted_answer", "full_generation", "correct", "formatted",
]  # fmt: skip
SAMPLE_KEYS = ["predicted_answer", "full_generation", "correct", "formatted"]


@pytest.fixture
def single_thread():
    """One torch thread: CPU sampling is then bit-identical across processes (resume comparisons)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_schema(result: dict, n: int, problems: int, answer_format: str = "boxed") -> None:
    assert list(result)[: len(TOP_KEYS)] == TOP_KEYS
    assert set(EXTRA_KEYS) <= set(result) and list(result)[-1] == "results"
    assert result["answer_format"] == answer_format
    assert result["num_problems"] == problems == len(result["results"])
    assert result["total_solutions"] == problems * n
    assert result["math_verify_version"] == "0.9.0"
    for entry in result["results"]:
        assert list(entry) == RESULT_KEYS
        assert len(entry["generations"]) == n == entry["val_n"]
        for sample in entry["generations"]:
            assert list(sample) == SAMPLE_KEYS
            answer = extract_answer(sample["full_generation"], answer_format)
            assert sample["formatted"] == (answer is not None)
            assert sample["predicted_answer"] == (answer if answer else NO_BOXED_ANSWER)  # empty box: the marker too
            assert sample["formatted"] or not sample["correct"]
        assert {k: entry[k] for k in SAMPLE_KEYS} == entry["generations"][0]
        assert entry["num_correct"] == sum(s["correct"] for s in entry["generations"])
        assert entry["pass_at_n"] == (entry["num_correct"] > 0)
    # metrics recomputed from the entries (docs/evaluation.md#metrics)
    entries = result["results"]
    assert result["pass_at_n"] == sum(e["pass_at_n"] for e in entries)
    assert result["average_at_n"] == sum(e["num_correct"] for e in entries)
    assert result["majority_vote_at_n"] == sum(e["majority_vote_correct"] for e in entries)
    assert result["formatted_count"] == sum(s["formatted"] for e in entries for s in e["generations"])
    assert result["pass_at_n_pct"] == pytest.approx(100 * result["pass_at_n"] / problems)
    assert result["average_at_n_pct"] == pytest.approx(100 * result["average_at_n"] / (problems * n))
    assert result["majority_vote_at_n_pct"] == pytest.approx(100 * result["majority_vote_at_n"] / problems)
    assert result["format_rate"] == pytest.approx(100 * result["formatted_count"] / (problems * n))
    assert result["pass_at_k"][str(n)] == pytest.approx(result["pass_at_n_pct"])
    assert result["pass_at_k"]["1"] == pytest.approx(result["average_at_n_pct"])


# ----------------------------------------------------------------------------------------------------------------------
# Datasets (docs/evaluation.md#benchmarks)


@pytest.mark.parametrize(
    ("name", "count", "ids"),
    [("math500", 500, list(range(500))), ("aime24", 30, list(range(60, 90))), ("aime25", 30, list(range(1, 31))),
     ("hmmt25", 30, list(range(1, 31)))],
)  # fmt: skip
def test_bundled_benchmarks_offline(name: str, count: int, ids: list[int], monkeypatch, caplog, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # hmmt25's default ./data/hmmt25_clean/train.parquet is relative: not found here
    with caplog.at_level("WARNING", logger="pwopsd.evaluation.benchmarks"):
        problems, source = load_benchmark(name)
    assert source == f"data/{name}.jsonl"
    assert "notice:" in caplog.text and f"data/{name}.jsonl" in caplog.text
    assert len(problems) == count and [p.problem_id for p in problems] == ids
    rows = read_data(f"{name}.jsonl")
    assert [p.problem for p in problems] == [r["problem"] for r in rows]
    assert [p.ground_truth for p in problems] == [str(r["answer"]) for r in rows]


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_registered_benchmark_loads_offline_with_its_count(name: str, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    problems, source = load_benchmark(name)
    assert source == f"data/{BENCHMARKS[name].bundled}" and len(problems) == BENCHMARKS[name].num_problems
    assert len({p.problem_id for p in problems}) == len(problems) and all(p.problem and p.ground_truth for p in problems)


def test_hmmt25_reads_the_parquet_path(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(REPO_ROOT)  # the reference's default ./data/hmmt25_clean/train.parquet
    problems, source = load_benchmark("hmmt25")
    assert source == "data/hmmt25_clean/train.parquet"
    bundled, _ = load_benchmark("hmmt25", str(DATA_DIR / "hmmt25.jsonl"))
    assert problems == bundled
    monkeypatch.setenv("HMMT25_PARQUET_PATH", str(tmp_path / "missing.parquet"))
    with pytest.raises(UserError, match=r"HMMT25_PARQUET_PATH=.*missing\.parquet does not exist"):
        load_benchmark("hmmt25")


def test_hub_rows_are_mapped_like_the_reference(monkeypatch) -> None:
    import datasets

    monkeypatch.setattr(benchmarks, "_hub_unavailable", lambda: None)
    real_load_dataset = datasets.load_dataset
    calls = []

    def fake_load_dataset(path, split):  # the hub cannot be reached from here: stand-in rows with the hub schema
        calls.append((path, split))
        return [{"problem_idx": 7, "problem": "P", "answer": 25}, {"problem_idx": 8, "problem": "Q", "answer": 3}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems, source = load_benchmark("aime25")
    assert calls == [("yentinglin/aime_2025", "train")] and source == "hf://yentinglin/aime_2025/train"
    assert [(p.problem_id, p.problem, p.ground_truth) for p in problems] == [(7, "P", "25"), (8, "Q", "3")]

    monkeypatch.setattr(datasets, "load_dataset", lambda path, split: [{"problem": "P", "solution": "so \\boxed{12}"}])
    (problem,) = load_benchmark("math500")[0]
    assert (problem.problem_id, problem.ground_truth) == (0, "12")  # answer from the last box of the solution

    def unreachable(path, split=None, **kwargs):
        if path in ("json", "parquet", "csv"):  # the bundled file is read with the real loader
            return real_load_dataset(path, split=split, **kwargs)
        raise ConnectionError("no route")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    problems, source = load_benchmark("aime24")
    assert source == "data/aime24.jsonl" and len(problems) == 30


def test_data_file_formats_and_errors(tmp_path) -> None:
    rows = [{"problem": "1+1?", "answer": "2", "id": "a"}, {"problem": "2+2?", "answer": 4, "id": "b"}]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = tmp_path / "mine.csv"
    csv.write_text("id,problem,answer\na,1+1?,2\nb,2+2?,4\n")
    for path in (jsonl, csv):
        problems, _ = load_benchmark("custom", str(path))
        assert [(p.problem_id, p.problem, p.ground_truth) for p in problems] == [("a", "1+1?", "2"), ("b", "2+2?", "4")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x", "answer": "1"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl has no 'problem' column \(columns: answer, question\)"):
        load_benchmark("custom", str(bad))
    with pytest.raises(UserError, match="no 'answer' column"):
        no_answer = tmp_path / "na.jsonl"
        no_answer.write_text(json.dumps({"problem": "x"}) + "\n")
        load_benchmark("aime24", str(no_answer))
    with pytest.raises(UserError, match="does not exist"):
        load_benchmark("custom", str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="unsupported type"):
        load_benchmark("custom", str(tmp_path / "x.txt"))
    with pytest.raises(UserError, match="no 'id' column"):
        load_benchmark("aime24", str(_noid(tmp_path)))
    with pytest.raises(UserError, match="no pinned source"):
        load_benchmark("amc23")
    with pytest.raises(UserError, match="unknown --dataset"):
        load_benchmark("gsm8k")


def _noid(tmp_path: Path) -> Path:
    path = tmp_path / "noid.jsonl"
    path.write_text(json.dumps({"problem": "x", "answer": "1"}) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Command line and sampling


def test_defaults_follow_spec() -> None:
    args = EvalArguments(base_model="m", dataset="math500", output_file="o.json")
    assert (args.val_n, args.temperature, args.top_p, args.top_k, args.min_p, args.presence_penalty) == (6, 1.0, 0.8, -1, 0.0, 0.0)
    assert (args.max_new_tokens, args.tensor_parallel_size, args.seed, args.max_model_len) == (38912, 1, None, 32768)
    assert (args.gpu_memory_utilization, args.backend, args.grader, args.trust_remote_code, args.resume) == (0.9, "auto", "reference", False, True)
    thinking = EvalArguments(base_model="m", dataset="math500", output_file="o.json", enable_thinking=True)
    assert (thinking.top_p, thinking.max_model_len) == (0.95, 40960)
    parsed = evaluate.parse_args(
        ["--base_model", "m", "--dataset", "aime24", "--output_file", "o", "--enable_thinking", "--no_resume", "--seed", "3"]
    )
    assert (parsed.enable_thinking, parsed.resume, parsed.seed, parsed.top_p) == (True, False, 3, 0.95)


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--val_n", "0"], "--val_n must be >= 1"), (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
     (["--top_k", "-2"], "--top_k must be -1"), (["--dataset", "minerva"], "no pinned source"),
     (["--grading_workers", "0"], "--grading_workers must be >= 1"),
     (["--bogus", "1"], "unrecognized arguments: --bogus 1"), (["--val_n", "abc"], "invalid int value: 'abc'"),
     (["--temperature", "2.5"], "--temperature must be in [0, 2]"),
     (["--presence_penalty", "-2.5"], "--presence_penalty must be in [-2, 2]"),
     (["--sample_seeds", "independent"], "--sample_seeds independent needs --seed"),
     (["--sample_seeds", "hashed"], "invalid choice: 'hashed'"),
     (["--answer_format", "last"], "invalid choice: 'last' (choose from 'boxed', 'boxed_or_last_number')"),
     (["--data_file", "EMPTY"], "is empty; pass a file with one problem per row")],
)  # fmt: skip
def test_user_errors_are_one_line(flags: list[str], message: str, capsys, tmp_path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    flags = [str(tmp_path / "empty.jsonl") if f == "EMPTY" else f for f in flags]
    argv = ["--base_model", str(tmp_path), "--dataset", "math500", "--output_file", str(tmp_path / "o.json"), *flags]
    _assert_user_error(main(argv), capsys, message)


def _assert_user_error(status: int, capsys, message: str) -> str:
    """Exit 2, exactly one stderr line `evaluate_math.py: error: ...` holding `message`, no traceback."""
    err = capsys.readouterr().err
    progress = re.compile(r"\|.*\| *\d+/\d+ \[")  # tqdm bars (loading weights, generating, grading)
    lines = [line for line in err.splitlines() if line.strip() and not progress.search(line)]
    assert status == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("evaluate_math.py: error:") and message in lines[0], err
    return lines[0]


def test_missing_model_is_a_one_line_error(capsys, tmp_path) -> None:
    argv = ["--base_model", str(tmp_path / "nope"), "--dataset", "aime24", "--num_samples", "1", "--backend", "hf",
            "--output_file", str(tmp_path / "o.json")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("evaluate_math.py: error: cannot load the tokenizer of --base_model")


def test_sampling_chain_matches_vllm_order() -> None:
    args = EvalArguments(base_model="m", dataset="d", output_file="o", temperature=0.7, top_p=0.9, top_k=20,
                         min_p=0.05, presence_penalty=0.5)  # fmt: skip
    chain = sampling_processors(args, prompt_length=3)
    assert [type(p).__name__ for p in chain] == [
        "PresencePenaltyLogitsProcessor", "TemperatureLogitsWarper", "MinPLogitsWarper", "TopKLogitsWarper",
        "TopPLogitsWarper",
    ]  # fmt: skip
    default = sampling_processors(EvalArguments(base_model="m", dataset="d", output_file="o", enable_thinking=True), 3)
    assert [type(p).__name__ for p in default] == ["TopPLogitsWarper"]  # T = 1, top_k -1, min_p 0: top-p 0.95 only


def test_presence_penalty_counts_generated_tokens_once() -> None:
    torch.manual_seed(0)
    ids = torch.tensor([[5, 1, 1, 2, 1], [3, 3, 4, 0, 0]])
    scores = torch.randn(2, 6)
    out = PresencePenaltyLogitsProcessor(0.5, prompt_length=2)(ids, scores.clone())
    expected = scores.clone()
    for row in range(2):
        for token in set(ids[row, 2:].tolist()):  # the prompt (first 2 ids) is not penalised
            expected[row, token] -= 0.5
    torch.testing.assert_close(out, expected)


def test_greedy_decoding_applies_the_presence_penalty(tiny_model_dir) -> None:
    # vLLM applies penalties before its greedy pick, so temperature 0 with a presence penalty is not plain argmax
    from transformers import AutoTokenizer

    model_dir = tiny_model_dir("qwen3")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = "Problem: what is 12 + 30? Answer:"
    texts = {}
    for penalty in (0.0, 1.5):
        args = EvalArguments(base_model=str(model_dir), dataset="d", output_file="o", temperature=0.0,
                             presence_penalty=penalty, max_new_tokens=24, val_n=2)  # fmt: skip
        backend = generate.HFBackend(args, tokenizer)
        [(index, texts[penalty])] = list(backend.generate([prompt], [0]))
        assert index == 0 and texts[penalty][0] == texts[penalty][1]  # val_n copies of the one greedy answer
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated: list[int] = []
        with torch.no_grad():  # naive: full forward per token, penalty once per distinct generated token, argmax
            for _ in range(24):
                logits = backend.model(torch.tensor([ids[0].tolist() + generated])).logits[0, -1].float()
                for token in set(generated):
                    logits[token] -= penalty
                token = int(logits.argmax())
                if token in backend.eos_ids:
                    break
                generated.append(token)
        assert texts[penalty][0] == tokenizer.decode(generated, skip_special_tokens=True)
    assert texts[0.0] != texts[1.5]


def test_sample_seed_arithmetic_matches_a_naive_listing() -> None:
    """engine: vLLM seeds child j of `SamplingParams(n=12, seed=S)` with S + j, for every problem; independent: a
    BLAKE2b hash per (seed, problem, sample). The transformers backend seeds its generators with the same integers."""
    n, problems = 12, range(5)

    def naive(rule: str, seed: int, problem: int) -> list[int]:
        if rule == "engine":
            return [seed + j for j in range(n)]
        return [
            int.from_bytes(hashlib.blake2b(f"pwopsd-eval-sample:{seed}:{problem}:{j}".encode(), digest_size=8).digest(),
                           "little") & (2**63 - 1)
            for j in range(n)
        ]  # fmt: skip

    for rule, overlap in (("engine", 11), ("independent", 0)):
        listing = {(s, p): naive(rule, s, p) for s in range(3) for p in problems}
        for (s, p), seeds in listing.items():
            assert [generate.sample_seed(s, p, j, rule) for j in range(n)] == seeds
            assert [g.initial_seed() for g in generate.row_generators(s, p, n, rule)] == seeds
        for s in (0, 1):  # consecutive evaluation seeds, same problem
            assert len(set(listing[s, 0]) & set(listing[s + 1, 0])) == overlap
        all_seeds = [x for seeds in listing.values() for x in seeds]
        if rule == "independent":
            assert len(set(all_seeds)) == 3 * len(problems) * n  # no stream shared anywhere
        else:
            assert sorted(set(all_seeds)) == list(range(0, 2 + n))  # 14 streams for 3 seeds x 5 problems x 12
    with pytest.raises(ValueError, match="unknown sample seed rule"):
        generate.sample_seed(0, 0, 0, "other")


def test_row_sampler_follows_the_logits_device() -> None:
    """CPU generators, draws moved to the logits' device: on `meta` (no data) a mixed-device op would raise."""
    from pwopsd.evaluation.generate import RowSampler

    logits = torch.randn(3, 7, device="meta")
    out = RowSampler([torch.Generator().manual_seed(i) for i in range(3)])(None, logits)
    assert out.device.type == "meta" and out.shape == (3, 7)
    ids = torch.zeros(3, 5, dtype=torch.long, device="meta")
    args = EvalArguments(base_model="m", dataset="d", output_file="o", temperature=0.7, top_p=0.9, top_k=3,
                         min_p=0.05, presence_penalty=0.5)  # fmt: skip
    for processor in sampling_processors(args, prompt_length=2):
        assert processor(ids, logits).device.type == "meta", type(processor).__name__


# ----------------------------------------------------------------------------------------------------------------------
# End to end with the transformers backend


def test_end_to_end_tiny_model_writes_full_schema(tiny_model_dir, tmp_path, single_thread) -> None:
    model = tiny_model_dir("qwen3")
    out = tmp_path / "out.json"
    argv = ["--base_model", str(model), "--dataset", "math500", "--num_samples", "3", "--val_n", "2",
            "--max_new_tokens", "16", "--backend", "hf", "--seed", "0", "--output_file", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    _check_schema(result, n=2, problems=3)
    assert (result["base_model"], result["dataset"], result["seed"], result["backend"]) == (str(model), "math500", 0, "hf")
    assert (result["top_p"], result["top_k"], result["enable_thinking"], result["max_new_tokens"]) == (0.8, -1, False, 16)
    assert [r["problem_id"] for r in result["results"]] == [0, 1, 2]
    assert [r["ground_truth"] for r in result["results"]] == [r["answer"] for r in read_data("math500.jsonl")[:3]]
    assert not Path(str(out) + ".partial.jsonl").exists() and list(tmp_path.iterdir()) == [out]
    # same seed -> same samples; another seed -> other samples
    again = tmp_path / "again.json"
    assert main([*argv[:-1], str(again)]) == 0
    assert json.loads(again.read_text())["results"] == result["results"]
    other = tmp_path / "other.json"
    assert main([*argv[:-3], "1", "--output_file", str(other)]) == 0
    texts = lambda r: [s["full_generation"] for e in r["results"] for s in e["generations"]]  # noqa: E731
    assert texts(json.loads(other.read_text())) != texts(result)


def test_transformers_samples_do_not_depend_on_batching(tiny_model_dir, tmp_path, single_thread) -> None:
    """Each sample draws from its own generator seeded by (seed, problem, sample): one problem per generate call and
    all problems in one call give the same texts, although prompts of different lengths are left-padded together."""
    model = tiny_model_dir("qwen3")
    common = ["--base_model", str(model), "--dataset", "hmmt25", "--num_samples", "5", "--val_n", "3",
              "--max_new_tokens", "12", "--backend", "hf", "--seed", "7", "--temperature", "1.0"]  # fmt: skip
    results = {}
    for batch in ("3", "64"):
        out = tmp_path / f"b{batch}.json"
        assert main([*common, "--hf_batch_size", batch, "--output_file", str(out)]) == 0
        results[batch] = json.loads(out.read_text())["results"]
    texts = [[g["full_generation"] for g in r["generations"]] for r in results["3"]]
    assert texts == [[g["full_generation"] for g in r["generations"]] for r in results["64"]]
    assert all(len(set(t)) > 1 for t in texts)  # the N samples of a problem differ


def test_resume_after_kill_equals_uninterrupted_run(tiny_model_dir, tmp_path, single_thread) -> None:
    model = tiny_model_dir("qwen3")
    common = ["--base_model", str(model), "--dataset", "aime24", "--num_samples", "30", "--val_n", "2",
              "--max_new_tokens", "32", "--backend", "hf", "--seed", "5", "--hf_batch_size", "4"]  # fmt: skip
    killed = tmp_path / "killed.json"
    partial = Path(str(killed) + ".partial.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "eval/evaluate_math.py", *common, "--output_file", str(killed)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_bytes().count(b"\n") >= 4:  # header + 3 problems
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = partial.read_bytes().count(b"\n") - 1
    assert not killed.exists() and 3 <= done < 30, done
    with partial.open("ab") as f:  # a line cut short by the kill must be dropped on resume
        f.write(b'{"index": 29, "problem_id": 89, "generati')

    assert main([*common, "--output_file", str(killed)]) == 0  # resumes
    assert not partial.exists()
    fresh = tmp_path / "fresh.json"
    assert main([*common, "--output_file", str(fresh)]) == 0
    resumed, uninterrupted = json.loads(killed.read_text()), json.loads(fresh.read_text())
    _check_schema(resumed, n=2, problems=30)
    assert resumed == uninterrupted


def _aime_run(tiny_model_dir, tmp_path) -> tuple[Path, Path, list[str], dict]:
    """(output file, its partial log, the argv of a 2-problem aime24 run on the tiny model, that run's settings)."""
    model = tiny_model_dir("qwen3")
    out = tmp_path / "o.json"
    partial = Path(str(out) + ".partial.jsonl")
    argv = ["--base_model", str(model), "--dataset", "aime24", "--num_samples", "2", "--val_n", "1",
            "--max_new_tokens", "4", "--backend", "hf", "--seed", "0", "--output_file", str(out)]  # fmt: skip
    return out, partial, argv, evaluate.run_settings(evaluate.parse_args(argv), "hf")


def test_partial_file_checks(tiny_model_dir, tmp_path, capsys) -> None:
    out, partial, argv, settings = _aime_run(tiny_model_dir, tmp_path)
    header = json.dumps({"pwopsd_partial": 1, "settings": settings})
    # a finished problem is reused as is, not regenerated
    partial.write_text(header + "\n" + json.dumps({"index": 0, "problem_id": 60, "generations": ["so \\boxed{204}"]}) + "\n")
    assert main(argv) == 0
    first = json.loads(out.read_text())["results"][0]
    assert first["generations"][0]["full_generation"] == "so \\boxed{204}" and first["num_correct"] == 1
    # other settings: refused, with the fix named, when the file holds a problem
    record = json.dumps({"index": 0, "problem_id": 60, "generations": ["a", "b", "c"]})
    partial.write_text(header.replace('"val_n": 1', '"val_n": 3') + "\n" + record + "\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "val_n: 3 -> 1" in err and "pass --no_resume" in err
    # a corrupt line in the middle: refused
    partial.write_text(header + "\nnot json\n" + json.dumps({"index": 1, "problem_id": 61, "generations": ["x"]}) + "\n")
    assert main(argv) == 2
    assert "line 2 is corrupt" in capsys.readouterr().err
    # --no_resume starts over
    assert main([*argv, "--no_resume"]) == 0 and not partial.exists()


# ----------------------------------------------------------------------------------------------------------------------
# vLLM: a recording stand-in checks the exact arguments (vLLM cannot run on this machine)


class _Recorder:
    def __init__(self) -> None:
        self.llm_kwargs: list[dict] = []
        self.sampling_kwargs: list[dict] = []
        self.enqueued: list[tuple] = []
        self.lora: list[tuple] = []


def _fake_vllm(recorder: _Recorder, texts_for) -> types.ModuleType:
    """A `vllm` module that records LLM(...), SamplingParams(...), enqueue(...) and returns outputs out of order."""

    class SamplingParams:
        def __init__(self, **kwargs):
            recorder.sampling_kwargs.append(kwargs)
            self.n = kwargs["n"]

    class Engine:
        def __init__(self) -> None:
            self.pending: list = []

        def has_unfinished_requests(self) -> bool:
            return bool(self.pending)

        def step(self) -> list:
            out = self.pending.pop()  # last submitted finishes first
            unfinished = types.SimpleNamespace(request_id="x", finished=False, outputs=[])
            return [unfinished, out]

    class LLM:
        def __init__(self, **kwargs):
            recorder.llm_kwargs.append(kwargs)
            self.llm_engine = Engine()

        def enqueue(self, prompts, sampling_params, lora_request=None, use_tqdm=True):
            recorder.enqueued.append((list(prompts), sampling_params, lora_request, use_tqdm))
            for i in range(len(prompts)):
                params = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
                samples = [types.SimpleNamespace(index=j, text=t) for j, t in enumerate(texts_for(i, params))]
                self.llm_engine.pending.append(  # outputs carry the external id (vLLM 0.31)
                    types.SimpleNamespace(request_id=str(100 + i), finished=True, outputs=samples[::-1])
                )
            return [f"{100 + i}-{i:08x}" for i in range(len(prompts))]  # enqueue returns the internal ids

    class LoRARequest:
        def __init__(self, *args):
            recorder.lora.append(args)

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    return vllm, lora, request


def test_vllm_backend_arguments_prompts_and_grading(tiny_model_dir, tmp_path, monkeypatch) -> None:
    model = tiny_model_dir("qwen3")
    golds = [r["answer"] for r in read_data("aime24.jsonl")[:3]]

    def texts_for(i: int, params) -> list[str]:
        n = params.n
        # problem 0: 3 right of 4; problem 1: 1 right + 3 without a box (INVALID wins); problem 2: 2-2 tie, wrong first
        return [
            [f"\\boxed{{{golds[0]}}}", f"\\boxed{{{int(golds[0])}}}", "\\boxed{1}", f"so {golds[0]} \\boxed{{{golds[0]}}}"],
            [f"\\boxed{{{golds[1]}}}", "no box", "\\boxed 5", "\\boxed{7"],
            ["\\boxed{999}", f"\\boxed{{{golds[2]}}}", "\\boxed{999}", f"\\boxed{{{golds[2]}}}"],
        ][i][:n]

    recorder = _Recorder()
    vllm, lora, request = _fake_vllm(recorder, texts_for)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    out = tmp_path / "v.json"
    argv = ["--base_model", str(model), "--dataset", "aime24", "--num_samples", "3", "--val_n", "4", "--temperature",
            "1.0", "--top_p", "0.95", "--top_k", "-1", "--min_p", "0.0", "--presence_penalty", "0.0", "--enable_thinking",
            "--max_new_tokens", "38912", "--tensor_parallel_size", "4", "--seed", "2", "--backend", "vllm",
            "--output_file", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert recorder.llm_kwargs == [dict(
        model=str(model), trust_remote_code=False, tensor_parallel_size=4, gpu_memory_utilization=0.9,
        max_model_len=40960, distributed_executor_backend="mp", enforce_eager=True, dtype="auto",
    )]  # fmt: skip
    assert recorder.sampling_kwargs == [dict(
        n=4, temperature=1.0, top_p=0.95, top_k=-1, min_p=0.0, presence_penalty=0.0, max_tokens=38912, seed=2,
    )]  # fmt: skip
    ((prompts, _, lora_request, _),) = recorder.enqueued  # one engine call with every prompt
    problems = [r["problem"] for r in read_data("aime24.jsonl")[:3]]
    assert prompts == [
        f"<|im_start|>user\n{p}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
        "<|im_start|>assistant\n"
        for p in problems
    ]
    assert EVAL_PROMPT_SUFFIX in prompts[0] and lora_request is None

    result = json.loads(out.read_text())
    _check_schema(result, n=4, problems=3)
    first, second, third = result["results"]
    assert [s["full_generation"] for s in first["generations"]] == texts_for(0, types.SimpleNamespace(n=4))
    assert [s["correct"] for s in first["generations"]] == [True, True, False, True] and first["majority_vote_correct"]
    assert [s["formatted"] for s in second["generations"]] == [True, False, False, False]
    assert second["num_correct"] == 1 and not second["majority_vote_correct"]  # INVALID wins
    assert third["num_correct"] == 2 and not third["majority_vote_correct"]  # tie -> earliest cluster (999)
    assert (result["pass_at_n"], result["average_at_n"], result["majority_vote_at_n"]) == (3, 6, 1)
    assert result["formatted_count"] == 9 and result["backend"] == "vllm" and result["seed"] == 2

    # unseeded: no seed in SamplingParams; a LoRA adapter: enable_lora + max_lora_rank 64 + one LoRARequest
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 64, "peft_type": "LORA"}))
    assert main([*argv[: argv.index("--seed")], "--backend", "vllm", "--checkpoint_dir", str(adapter),
                 "--output_file", str(tmp_path / "v2.json")]) == 0  # fmt: skip
    assert "seed" not in recorder.sampling_kwargs[-1]
    assert recorder.llm_kwargs[-1]["enable_lora"] is True and recorder.llm_kwargs[-1]["max_lora_rank"] == 64
    assert recorder.lora == [("adapter", 1, str(adapter))]


def test_vllm_independent_seeds_and_empty_boxes(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """--sample_seeds independent: one n=1 request per sample with its hashed seed, texts regrouped in sample order.
    Empty boxes are stored as the marker and form one Maj@N cluster, which wins a 2-2 tie when it comes first."""
    model = tiny_model_dir("qwen3")
    gold = read_data("aime24.jsonl")[0]["answer"]
    texts = ["\\boxed{}", "\\boxed{ }", f"\\boxed{{{gold}}}", f"\\boxed{{{gold}}}"]  # problem 0, samples 0..3

    def texts_for(i: int, params) -> list[str]:  # request i = problem i // 4, sample i % 4
        assert params.n == 1
        return [texts[i % 4]]

    recorder = _Recorder()
    vllm, lora, request = _fake_vllm(recorder, texts_for)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    out = tmp_path / "v.json"
    argv = ["--base_model", str(model), "--dataset", "aime24", "--num_samples", "2", "--val_n", "4", "--seed", "1",
            "--backend", "vllm", "--sample_seeds", "independent", "--output_file", str(out)]  # fmt: skip
    assert main(argv) == 0
    ((prompts, _, _, _),) = recorder.enqueued
    assert len(prompts) == 8 and prompts[0] == prompts[3] != prompts[4]
    assert [(k["n"], k["seed"]) for k in recorder.sampling_kwargs] == [
        (1, generate.sample_seed(1, p, j, "independent")) for p in range(2) for j in range(4)
    ]
    result = json.loads(out.read_text())
    _check_schema(result, n=4, problems=2)
    assert result["sample_seed_rule"] == "independent"
    for entry in result["results"]:
        assert [g["full_generation"] for g in entry["generations"]] == texts  # sample order restored
        assert [g["predicted_answer"] for g in entry["generations"]][:2] == [NO_BOXED_ANSWER] * 2
        assert [g["formatted"] for g in entry["generations"]] == [True] * 4
    first = result["results"][0]
    assert first["num_correct"] == 2 and first["majority_vote_correct"] is False  # marker cluster first: wins the tie


def test_failed_starts_leave_no_partial_and_the_corrected_command_runs(tiny_model_dir, tmp_path, capsys) -> None:
    model = tiny_model_dir("qwen3")
    out = tmp_path / "o.json"
    partial = Path(str(out) + ".partial.jsonl")
    argv = ["--dataset", "aime24", "--num_samples", "1", "--val_n", "1", "--max_new_tokens", "2", "--backend", "hf",
            "--seed", "0", "--output_file", str(out)]  # fmt: skip
    _assert_user_error(main(["--base_model", str(tmp_path / "nope"), *argv]), capsys, "cannot load the tokenizer")
    assert not partial.exists()
    not_adapter = tmp_path / "not_adapter"
    not_adapter.mkdir()
    for folder, message in ((not_adapter, "has no adapter_config.json"), (tmp_path / "missing", "is not a folder")):
        status = main(["--base_model", str(model), "--checkpoint_dir", str(folder), *argv])
        _assert_user_error(status, capsys, message)
        assert not partial.exists()
    big = tmp_path / "rank128"
    big.mkdir()
    (big / "adapter_config.json").write_text(json.dumps({"r": 128, "peft_type": "LORA"}))
    (not_adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    status = main(["--base_model", str(model), "--checkpoint_dir", str(not_adapter), *argv])
    _assert_user_error(status, capsys, "has no 'peft_type', so it is not a PEFT adapter configuration")
    _assert_user_error(main(["--base_model", str(model), "--checkpoint_dir", str(big), *argv]), capsys, "rank 128 > 64")
    # an adapter folder PEFT cannot load (no weights): one line, no partial
    (not_adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    status = main(["--base_model", str(model), "--checkpoint_dir", str(not_adapter), *argv])
    _assert_user_error(status, capsys, "cannot load the LoRA adapter")
    assert not partial.exists()
    # a header-only partial left by an older failed start, with other settings: replaced silently
    settings = evaluate.run_settings(evaluate.parse_args(["--base_model", str(tmp_path / "nope"), *argv]), "hf")
    partial.write_text(json.dumps({"pwopsd_partial": 1, "settings": settings}) + "\n")
    assert main(["--base_model", str(model), *argv]) == 0 and out.exists() and not partial.exists()


def test_output_path_errors_come_before_loading_anything(tmp_path, capsys) -> None:
    argv = ["--base_model", str(tmp_path / "no_model"), "--dataset", "aime24", "--backend", "hf"]  # model never read
    folder = tmp_path / "a_folder.json"
    folder.mkdir()
    _assert_user_error(main([*argv, "--output_file", str(folder)]), capsys, "is a directory; pass a file name")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        target = Path("/sys") if os.geteuid() == 0 else readonly  # root writes anywhere but in sysfs
        line = _assert_user_error(main([*argv, "--output_file", str(target / "o.json")]), capsys, "cannot write in")
        assert "pass a path in a writable folder" in line
    finally:
        readonly.chmod(0o755)
    file_parent = tmp_path / "plain_file"
    file_parent.write_text("x")
    _assert_user_error(main([*argv, "--output_file", str(file_parent / "o.json")]), capsys, "is a file, not a folder")


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"problem_id": 60, "generations": ["a"]}', "has no valid 'index'"),
     ('[0, 60, ["a"]]', "is a JSON list, not a problem record"),
     ('{"index": 0, "problem_id": 60, "generations": []}', "holds 0 generation(s) for problem index 0, but --val_n is 2"),
     ('{"index": 0, "problem_id": 60, "generations": ["a"]}', "holds 1 generation(s)"),
     ('{"index": 0, "problem_id": 60}', "has no 'generations' list"),
     ('{"index": 0, "problem_id": 60, "generations": ["a", 5]}', "has no 'generations' list of texts"),
     ('{"index": 0, "generations": ["a", "b"]}', "has no 'problem_id'")],
)  # fmt: skip
def test_malformed_partial_lines_are_refused_with_their_line(line: str, message: str, tmp_path, capsys) -> None:
    out = tmp_path / "o.json"
    argv = ["--base_model", str(tmp_path / "m"), "--dataset", "aime24", "--val_n", "2", "--backend", "hf",
            "--output_file", str(out)]  # fmt: skip
    header = json.dumps({"pwopsd_partial": 1, "settings": evaluate.run_settings(evaluate.parse_args(argv), "hf")})
    good = json.dumps({"index": 1, "problem_id": 61, "generations": ["x", "y"]})
    Path(str(out) + ".partial.jsonl").write_text(f"{header}\n{good}\n{line}\n")
    err = _assert_user_error(main(argv), capsys, message)
    assert ".partial.jsonl line 3 " in err and "pass --no_resume" in err


def test_full_disk_is_one_line_and_the_partial_resumes(tiny_model_dir, tmp_path, monkeypatch, capsys) -> None:
    model = tiny_model_dir("qwen3")
    argv = ["--base_model", str(model), "--dataset", "aime24", "--num_samples", "3", "--val_n", "1",
            "--max_new_tokens", "4", "--backend", "hf", "--seed", "0", "--hf_batch_size", "1"]  # fmt: skip
    out = tmp_path / "o.json"
    partial = Path(str(out) + ".partial.jsonl")
    fresh = tmp_path / "fresh.json"
    assert main([*argv, "--output_file", str(fresh)]) == 0
    capsys.readouterr()
    real_fsync, calls = os.fsync, []

    def full_after_two(fd: int) -> None:  # header and problem 0 reach the disk, then the disk is full
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(evaluate.os, "fsync", full_after_two)
    line = _assert_user_error(main([*argv, "--output_file", str(out)]), capsys, "No space left on device")
    assert "re-run the same command to resume" in line and partial.exists() and not out.exists()
    monkeypatch.setattr(evaluate.os, "fsync", real_fsync)

    def no_space(path, obj) -> None:  # the final result cannot be written: the partial log stays
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(evaluate, "atomic_write_json", no_space)
    line = _assert_user_error(main([*argv, "--output_file", str(out)]), capsys, "No space left on device")
    assert "generations are kept in" in line and partial.read_bytes().count(b"\n") == 4  # header + 3 problems
    monkeypatch.undo()
    assert main([*argv, "--output_file", str(out)]) == 0 and not partial.exists()
    assert json.loads(out.read_text())["results"] == json.loads(fresh.read_text())["results"]


def test_backend_auto_without_vllm_is_hf(monkeypatch) -> None:
    monkeypatch.setattr(generate.importlib.util, "find_spec", lambda name: None)
    assert generate.resolve_backend("auto") == "hf"
    assert generate.resolve_backend("vllm") == "vllm"


# ----------------------------------------------------------------------------------------------------------------------
# Atomic write


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path) -> None:
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})  # fails half-way through serialisation
    assert json.loads(path.read_text()) == {"a": 1}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_row_sampler_draws_from_the_processed_distribution() -> None:
    """RowSampler picks token i with probability softmax(scores)_i (masked tokens never), one generator per row."""
    import torch

    from pwopsd.evaluation.generate import RowSampler

    torch.manual_seed(0)
    logits = torch.randn(1, 7)
    logits[0, 2] = float("-inf")  # e.g. removed by top-p
    probs = torch.softmax(logits, dim=-1)[0]
    rows = 20_000
    out = RowSampler([torch.Generator().manual_seed(i) for i in range(rows)])(None, logits.expand(rows, 7).clone())
    picks = out.argmax(dim=-1)
    assert torch.isinf(out).sum(dim=-1).eq(6).all()  # exactly one finite entry per row
    freq = torch.bincount(picks, minlength=7).double() / rows
    assert freq[2] == 0
    assert (freq - probs.double()).abs().max() < 4 * (0.25 / rows) ** 0.5  # 4 sigma of a Bernoulli mean
    again = RowSampler([torch.Generator().manual_seed(i) for i in range(rows)])(None, logits.expand(rows, 7).clone())
    assert torch.equal(again.argmax(dim=-1), picks)


# ----------------------------------------------------------------------------------------------------------------------
# --dtype and the batching of the transformers backend


def test_dtype_flag_parses_and_refuses_other_values(capsys, tmp_path) -> None:
    base = ["--base_model", "m", "--dataset", "aime24", "--output_file", "o"]
    assert evaluate.parse_args(base).dtype == "auto"
    for name in ("bfloat16", "float16", "float32", "auto"):
        assert evaluate.parse_args([*base, "--dtype", name]).dtype == name
    argv = ["--base_model", str(tmp_path), "--dataset", "math500", "--output_file", str(tmp_path / "o.json"),
            "--dtype", "int8"]  # fmt: skip
    _assert_user_error(main(argv), capsys, "argument --dtype: invalid choice: 'int8'")
    with pytest.raises(UserError, match="--dtype must be one of auto, bfloat16, float16, float32, got 'half'"):
        EvalArguments(base_model="m", dataset="d", output_file="o", dtype="half")  # type: ignore[arg-type]


@pytest.fixture
def bf16_checkpoint(tiny_model_dir, tmp_path) -> Path:
    """The tiny qwen3 model saved in bfloat16, the released checkpoints' dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model_dir("qwen3")
    folder = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("flag", "bf16_native", "expected"), [
    ("auto", True, torch.bfloat16), ("auto", False, torch.float32),
    ("bfloat16", False, torch.bfloat16), ("float32", True, torch.float32), ("float16", False, torch.float16),
])  # fmt: skip
def test_dtype_flag_loads_and_logs_the_dtype(flag, bf16_native, expected, bf16_checkpoint, tmp_path, monkeypatch,
                                             caplog, single_thread) -> None:  # fmt: skip
    from pwopsd import device

    monkeypatch.setattr(device, "native_bf16", lambda dev: bf16_native)
    loaded = {}
    real_init = generate.HFBackend.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        loaded["dtype"] = {p.dtype for p in self.model.parameters()}

    monkeypatch.setattr(generate.HFBackend, "__init__", spy)
    argv = ["--base_model", str(bf16_checkpoint), "--dataset", "math500", "--num_samples", "1", "--val_n", "1",
            "--max_new_tokens", "2", "--backend", "hf", "--seed", "0", "--dtype", flag,
            "--output_file", str(tmp_path / "o.json")]  # fmt: skip
    with caplog.at_level("INFO", logger="pwopsd.evaluation.evaluate"):
        assert main(argv) == 0
    assert loaded["dtype"] == {expected}
    name = str(expected).removeprefix("torch.")
    assert f"transformers backend on cpu: --dtype {flag} -> {name} (checkpoint bfloat16)" in caplog.text
    assert json.loads((tmp_path / "o.json").read_text())["dtype"] == name  # the dtype the samples were made in


def test_one_problem_batches_give_the_same_samples_as_padded_batches(tiny_model_dir, single_thread) -> None:
    """The default batching (the N samples of one problem, no padding, no mask) and the former one (several problems
    left-padded together) draw the same samples: each row has its own seeded generator. Prompts of different lengths,
    so the padded batches really are padded."""
    from transformers import AutoTokenizer

    model = tiny_model_dir("qwen3")
    tokenizer = AutoTokenizer.from_pretrained(model)
    problems = load_benchmark("hmmt25", None)[0][:5]
    prompts = [generate.build_prompt(tokenizer, p.problem, False) for p in problems]
    assert len({len(tokenizer(p).input_ids) for p in prompts}) > 1
    args = EvalArguments(base_model=str(model), dataset="hmmt25", output_file="o", val_n=3, max_new_tokens=12,
                         seed=7, hf_batch_size=64, dtype="float32")  # fmt: skip
    texts = {}
    for batching in generate.HF_BATCHING:
        backend = generate.HFBackend(args, tokenizer, batching=batching)
        calls: list[tuple[int, int]] = []

        def spy(*a, _real=backend.model.generate, _calls=calls, **k):
            _calls.append(tuple(k["input_ids"].shape))
            return _real(*a, **k)

        backend.model.generate = spy
        texts[batching] = dict(backend.generate(prompts, list(range(5))))
        assert calls == ([(3, len(tokenizer(p).input_ids)) for p in prompts] if batching == "problem" else
                         [(15, max(len(tokenizer(p).input_ids) for p in prompts))])  # fmt: skip
    assert texts["problem"] == texts["padded"]
    assert all(len(set(t)) > 1 for t in texts["problem"].values())  # the N samples of a problem differ
    with pytest.raises(ValueError, match="unknown batching"):
        generate.HFBackend(args, tokenizer, batching="rows")


def test_shared_prompt_pass_gives_the_same_samples(tiny_model_dir, single_thread) -> None:
    """The per-problem path computes the prompt's cache once and repeats it for the N rows; the samples equal those of
    recomputing the prompt for every row (sharing off), and `generate` receives a cache of P - 1 positions x N rows."""
    from transformers import AutoTokenizer

    model = tiny_model_dir("qwen3")
    tokenizer = AutoTokenizer.from_pretrained(model)
    problems = load_benchmark("math500", None)[0][:3]
    prompts = [generate.build_prompt(tokenizer, p.problem, False) for p in problems]
    args = EvalArguments(base_model=str(model), dataset="math500", output_file="o", val_n=4, max_new_tokens=10,
                         seed=3, dtype="float32", presence_penalty=0.5)  # fmt: skip
    texts, caches = {}, []
    for share in (False, True):
        backend = generate.HFBackend(args, tokenizer)
        backend.share_prefill = share

        def spy(*a, _real=backend.model.generate, **k):
            cache = k.get("past_key_values")
            caches.append(None if cache is None else (cache.get_seq_length(), cache.layers[0].keys.shape[0]))
            return _real(*a, **k)

        backend.model.generate = spy
        texts[share] = dict(backend.generate(prompts, list(range(3))))
    assert texts[True] == texts[False]
    assert all(len(set(t)) > 1 for t in texts[True].values())  # sampled: the 4 rows differ
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    assert caches == [None] * 3 + [(n - 1, 4) for n in lengths]


# ----------------------------------------------------------------------------------------------------------------------
# --answer_format, and the answer format and dtype in the resume settings and the result


def test_answer_format_flag_parses_and_refuses_other_values() -> None:
    base = ["--base_model", "m", "--dataset", "aime24", "--output_file", "o"]
    assert evaluate.parse_args(base).answer_format == "boxed"
    fallback = evaluate.parse_args([*base, "--answer_format", "boxed_or_last_number"])
    assert fallback.answer_format == "boxed_or_last_number"
    with pytest.raises(UserError, match="--answer_format must be one of boxed, boxed_or_last_number, got 'last'"):
        EvalArguments(base_model="m", dataset="d", output_file="o", answer_format="last")  # type: ignore[arg-type]


def test_boxed_or_last_number_end_to_end(tiny_model_dir, tmp_path, single_thread, capsys) -> None:
    """Two arith problems answered by hand (held in the partial log), two generated by the tiny model: every stored
    answer is the fallback rule's reading of its text, graded and voted on; recompute_majn re-votes the stored answers
    and agrees (under the boxed rule problem 0's vote would be INVALID)."""
    from pwopsd.evaluation import recompute

    model = tiny_model_dir("qwen3")
    out = tmp_path / "o.json"
    argv = ["--base_model", str(model), "--dataset", "arith", "--data_file", str(REPO_ROOT / "data" / "arith.jsonl"),
            "--num_samples", "4", "--val_n", "3", "--max_new_tokens", "24", "--backend", "hf", "--seed", "0",
            "--answer_format", "boxed_or_last_number", "--output_file", str(out)]  # fmt: skip
    rows = read_data("arith.jsonl")[:4]
    assert [r["problem"] for r in rows[:2]] == ["What is 7 + 7?", "What is 3 - 2?"]
    by_hand = {
        0: ["So the final answer is 14.", "7 + 7 = \\boxed{14}, not 15", "I do not know"],
        1: ["3 - 2 = 2", "\\boxed{} and then 1", "so it is 1."],
    }
    settings = evaluate.run_settings(evaluate.parse_args(argv), "hf")
    lines = [{"pwopsd_partial": 1, "settings": settings}]
    lines += [{"index": i, "problem_id": i, "generations": texts} for i, texts in by_hand.items()]
    Path(str(out) + ".partial.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(argv) == 0
    result = json.loads(out.read_text())
    _check_schema(result, n=3, problems=4, answer_format="boxed_or_last_number")
    assert (result["dataset"], result["dtype"]) == ("arith", "float32")
    entries = result["results"]
    assert [[s["full_generation"] for s in e["generations"]] for e in entries[:2]] == [by_hand[0], by_hand[1]]
    answers = [[s["predicted_answer"] for s in e["generations"]] for e in entries[:2]]
    assert answers == [["14", "14", NO_BOXED_ANSWER], ["2", NO_BOXED_ANSWER, "1"]]
    assert [[s["formatted"] for s in e["generations"]] for e in entries[:2]] == [[True, True, False], [True] * 3]
    correct = [[s["correct"] for s in e["generations"]] for e in entries[:2]]
    assert correct == [[True, True, False], [False, False, True]]
    # Maj@N: problem 0's "14" cluster (2 of 3) wins; problem 1 has three clusters of one, the first ("2") wins
    assert [e["majority_vote_correct"] for e in entries[:2]] == [True, False]
    generated = [s["full_generation"] for e in entries[2:] for s in e["generations"]]
    assert len(set(generated)) > 1 and not any(t in by_hand[0] + by_hand[1] for t in generated)
    capsys.readouterr()
    assert recompute.main([str(out)]) == 0
    old, new = re.search(r"Maj@N ([\d.]+) -> ([\d.]+)", capsys.readouterr().out).groups()
    assert float(old) == float(new) == result["majority_vote_at_n_pct"] >= 25.0


def _partial_with_one_problem(path: Path, settings: dict) -> str:
    text = json.dumps({"pwopsd_partial": 1, "settings": settings}) + "\n"
    text += json.dumps({"index": 0, "problem_id": 60, "generations": ["so \\boxed{204}"]}) + "\n"
    path.write_text(text)
    return text


@pytest.mark.parametrize(("saved", "now", "diff"), [
    ([], ["--answer_format", "boxed_or_last_number"], "answer_format: 'boxed' -> 'boxed_or_last_number'"),
    (["--answer_format", "boxed_or_last_number"], [], "answer_format: 'boxed_or_last_number' -> 'boxed'"),
    (["--dtype", "float32"], ["--dtype", "float16"], "dtype: 'float32' -> 'float16'"),
    (["--dtype", "bfloat16"], [], "dtype: 'bfloat16' -> 'float32'"),  # auto resolves to the tiny model's float32
])  # fmt: skip
def test_resume_is_refused_when_the_answer_format_or_dtype_differ(saved, now, diff, tiny_model_dir, tmp_path,
                                                                   capsys) -> None:  # fmt: skip
    model = tiny_model_dir("qwen3")
    out = tmp_path / "o.json"
    partial = Path(str(out) + ".partial.jsonl")
    argv = ["--base_model", str(model), "--dataset", "aime24", "--num_samples", "2", "--val_n", "1",
            "--max_new_tokens", "4", "--backend", "hf", "--seed", "0", "--output_file", str(out)]  # fmt: skip
    text = _partial_with_one_problem(partial, evaluate.run_settings(evaluate.parse_args([*argv, *saved]), "hf"))
    line = _assert_user_error(main([*argv, *now]), capsys, f"was written with other settings ({diff})")
    assert line.endswith(f"({diff}); pass --no_resume to start over")  # nothing else differs
    assert partial.read_text() == text and not out.exists()


def test_partial_log_without_answer_format_and_dtype_resumes_with_the_defaults(tiny_model_dir, tmp_path,
                                                                               capsys) -> None:  # fmt: skip
    """A log written before the two keys were recorded counts as boxed and --dtype auto (here float32): the default
    command and an explicit --dtype float32 resume it; another rule or dtype is refused."""
    out, partial, argv, settings = _aime_run(tiny_model_dir, tmp_path)
    assert (settings.pop("answer_format"), settings.pop("dtype")) == ("boxed", "float32")
    text = _partial_with_one_problem(partial, settings)
    refused = [(["--answer_format", "boxed_or_last_number"], "answer_format: 'boxed' -> 'boxed_or_last_number'"),
               (["--dtype", "bfloat16"], "dtype: 'float32' -> 'bfloat16'")]  # fmt: skip
    for flags, diff in refused:
        _assert_user_error(main([*argv, *flags]), capsys, diff)
        assert partial.read_text() == text
    for flags in ([], ["--dtype", "float32"]):
        _partial_with_one_problem(partial, settings)
        assert main([*argv, *flags]) == 0 and not partial.exists()
        result = json.loads(out.read_text())
        first = result["results"][0]["generations"][0]
        assert (first["full_generation"], first["correct"]) == ("so \\boxed{204}", True)  # reused, not regenerated
        assert (result["answer_format"], result["dtype"]) == ("boxed", "float32")
        out.unlink()


def test_validate_accepts_only_the_boxed_rule() -> None:
    """validate_eval_result.py checks the paper's run: answers read with the boxed rule, or files without the key."""
    from pwopsd.evaluation.validate import eval_result_problems

    result = {"dataset": "aime24", "val_n": 12, "max_new_tokens": 38912, "temperature": 1.0, "top_p": 0.95,
              "top_k": -1, "min_p": 0.0, "presence_penalty": 0.0, "enable_thinking": True, "pass_at_n_pct": 50.0,
              "average_at_n_pct": 20.0, "majority_vote_at_n_pct": 30.0, "num_problems": 30, "results": [{}] * 30,
              "base_model": "m", "seed": 0}  # fmt: skip
    assert eval_result_problems(result, "aime24", "m", 0) == []  # written before answer_format was recorded
    assert eval_result_problems({**result, "answer_format": "boxed"}, "aime24", "m", 0) == []
    assert eval_result_problems({**result, "answer_format": "boxed_or_last_number"}, "aime24", "m", 0) == [
        "answer_format is 'boxed_or_last_number', expected 'boxed' (the reference's rule)"
    ]
