"""bench/gpu_check.sh: one JSON line per part (ok, skipped with its reason, or failed), a summary, exit 0; its
parsers; per-part time limits that end the whole process tree; the CPU dry run (SIZE=small) of every part."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "bench" / "gpu_check.sh"


def load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gc = load_driver()
PART_NAMES = [p.name for p in gc.parts()]


def run_script(tmp_path: Path, timeout: int, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"), "PY": sys.executable}
    full_env.update(env)
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.strip().splitlines()]  # every stdout line must be JSON


def by_part(lines: list[dict]) -> dict[str, list[dict]]:
    parts: dict[str, list[dict]] = {}
    for line in lines:
        parts.setdefault(line["part"], []).append(line)
    return parts


def make_ctx(tmp_path: Path, budget: float = 300):
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    results.mkdir()
    ctx = gc.Ctx("small", gc.SIZES["small"], sys.executable, work, results, dict(os.environ), time.monotonic() + budget)
    ctx.env_ok, ctx.device = True, "test-device"
    return ctx


# ---------------------------------------------------------------------------------------------------------------------
# Parsers


def test_markdown_rows_reads_every_table_and_new_columns() -> None:
    stdout = """# B=4 T=1024
| method | LM head | dense MB | chunked MB | memory ratio | time ratio |
|---|---|---:|---:|---:|---:|
| opsd     | frozen    |   14284.0 |    485.5 |   29.4x |  0.57 |
| reopold  | trainable |   10.5 |    -1.25e-03 |   8.4× |  1.20 |
some line between tables
| method | fused s | note |
|---|---:|---|
| pwopsd | 0.0224 | compiled |
{"memory_ratio": 29.4}
"""
    assert gc.markdown_rows(stdout) == [
        {"method": "opsd", "lm_head": "frozen", "dense_mb": 14284.0, "chunked_mb": 485.5, "memory_ratio": 29.4,
         "time_ratio": 0.57},
        {"method": "reopold", "lm_head": "trainable", "dense_mb": 10.5, "chunked_mb": -0.00125, "memory_ratio": 8.4,
         "time_ratio": 1.2},
        {"method": "pwopsd", "fused_s": 0.0224, "note": "compiled"},
    ]  # fmt: skip
    assert gc.markdown_rows("no table here\n") == []


def test_loss_parse_keeps_rows_and_the_benchmark_json() -> None:
    stdout = '# B=1 T=64\n| method | dense s |\n|---|---:|\n| opsd | 0.5 |\n{"memory_ratio": 2.5, "device": "cuda"}\n'
    lines = gc.loss_parse(None, stdout)
    assert lines == [
        {"kind": "row", "method": "opsd", "dense_s": 0.5},
        {"kind": "summary", "config": "B=1 T=64", "memory_ratio": 2.5, "device": "cuda"},
    ]
    with pytest.raises(gc.PartError, match="no JSON object"):
        gc.loss_parse(None, "| a |\n|---|\n| 1 |\n")


def test_trainer_logs_reads_the_printed_dicts() -> None:
    stdout = """noise {'x': 1}
{'loss': '0.0007538', 'grad_norm': '0.003529', 'learning_rate': '5e-06', 'epoch': '0.25'}
{'loss': 0.25, 'grad_norm': 1.5, 'note': 'n/a'}
{'train_runtime': '0.3388', 'train_steps_per_second': '5.903', 'epoch': '0.5'}
{'loss': broken
"""
    assert gc.trainer_logs(stdout) == [
        {"loss": 0.0007538, "grad_norm": 0.003529, "learning_rate": 5e-06, "epoch": 0.25},
        {"loss": 0.25, "grad_norm": 1.5, "note": "n/a"},
        {"train_runtime": 0.3388, "train_steps_per_second": 5.903, "epoch": 0.5},
    ]


def test_error_summary_names_the_child_error_not_the_launcher() -> None:
    stderr = """Traceback (most recent call last):
  File "code/ea_opsd_train.py", line 17, in <module>
RuntimeError: The size of tensor a (0) must match the size of tensor b (64) at non-singleton dimension 0
Traceback (most recent call last):
  File "accelerate/commands/launch.py", line 999, in simple_launcher
subprocess.CalledProcessError: Command '['python', 'code/ea_opsd_train.py']' returned non-zero exit status 1.
"""
    assert gc.error_summary("", stderr) == (
        "RuntimeError: The size of tensor a (0) must match the size of tensor b (64) at non-singleton dimension 0"
    )
    one_line = "ea_opsd_train.py: error: --method is required: use one of opsd, eopd, pwopsd, reopold\n"
    assert gc.error_summary("", "progress\n" + one_line) == one_line.strip()
    assert gc.error_summary("a\nb\n", "") == "a\nb"


# ---------------------------------------------------------------------------------------------------------------------
# Running parts


def test_timeout_ends_the_whole_process_tree(tmp_path) -> None:
    ctx = make_ctx(tmp_path)
    pid_file = tmp_path / "grandchild.pid"
    cmd = ["bash", "-c", f"sleep 120 & echo $! > {pid_file}; echo started; wait"]
    start = time.monotonic()
    rc, stdout, _ = gc.run_command(ctx, "sleeper", cmd, 2, dict(os.environ))
    assert rc is None  # timed out
    assert stdout.strip() == "started"  # what it printed before the kill is kept
    assert time.monotonic() - start < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":  # dead, not yet reaped
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the part's grandchild {grandchild} survived the timeout")


def test_a_failing_part_does_not_stop_the_next(tmp_path, capsys) -> None:
    ctx = make_ctx(tmp_path)
    py = sys.executable
    parts = [
        gc.Part("bad", 60, lambda c: [py, "-c", "import sys; sys.exit('boom: the input is wrong')"], gc.single_json),
        gc.Part("slow", 1, lambda c: [py, "-c", "import time; print('begun', flush=True); time.sleep(60)"],
                gc.single_json),
        gc.Part("no_json", 60, lambda c: [py, "-c", "print('hello')"], gc.single_json),
        gc.Part("missing", 60, lambda c: [py, "-c", "pass"], gc.single_json, needs=("no_such_module_xyz",)),
        gc.Part("good", 60, lambda c: [py, "-c", "print('log'); print('{\"x\": 1, \"part\": \"mine\"}')"],
                gc.single_json),
    ]  # fmt: skip
    for part in parts:
        gc.run_part(ctx, part)
    lines = json_lines(capsys.readouterr().out)
    got = {line["part"]: line for line in lines}
    assert list(got) == ["bad", "slow", "no_json", "missing", "good"]
    assert got["bad"]["status"] == "failed" and got["bad"]["error"] == "exit 1: boom: the input is wrong"
    assert got["slow"]["status"] == "failed" and got["slow"]["error"].startswith("timed out after 1 s")
    assert "begun" in got["slow"]["error"]
    assert got["no_json"]["status"] == "failed" and got["no_json"]["error"] == "no JSON object in the output"
    assert got["missing"]["status"] == "skipped"
    assert got["missing"]["reason"].startswith("skipped: missing package(s) no-such-module-xyz;")
    good = got["good"]
    assert (good["status"], good["x"], good["device"], good["size"]) == ("ok", 1, "test-device", "small")
    assert isinstance(good["part_wall_s"], float)
    assert (ctx.ok, ctx.skipped, ctx.failed) == (["good"], ["missing"], ["bad", "slow", "no_json"])
    written = json_lines((ctx.results / "gpu_check.jsonl").read_text())
    assert written == lines
    assert "##### good: exit 0" in (ctx.results / "gpu_check.log").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# The script


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SIZE": "huge"}, "gpu_check: error: SIZE=huge is not valid: use SIZE=full (GPU) or SIZE=small (CPU dry run)"),
        ({"SIZE": "small", "BUDGET": "soon"}, "gpu_check: error: BUDGET=soon is not a positive number of seconds"),
        ({"SIZE": "small", "BUDGET": "-5"}, "gpu_check: error: BUDGET=-5 is not a positive number of seconds"),
        (
            {"SIZE": "small", "ONLY": "env,tran_steps_dense"},
            "gpu_check: error: ONLY=env,tran_steps_dense: unknown part tran_steps_dense; use some of "
            + ", ".join(PART_NAMES),
        ),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, env, message) -> None:
    proc = run_script(tmp_path, 60, **env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message
    assert proc.stdout == ""


def test_spent_budget_still_prints_a_line_per_part_and_the_summary(tmp_path) -> None:
    proc = run_script(tmp_path, 60, SIZE="small", BUDGET="1")
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    assert [line["part"] for line in lines] == [*PART_NAMES, "summary"]
    for line in lines[:-1]:
        assert line["status"] == "skipped"
        assert line["reason"].startswith("skipped: the run's time budget is spent")
    assert lines[-1]["skipped"] == PART_NAMES and lines[-1]["ok"] == lines[-1]["failed"] == []
    assert json_lines((tmp_path / "out" / "gpu_check.jsonl").read_text()) == lines


def test_only_runs_the_chosen_parts_and_what_they_stand_on(tmp_path) -> None:
    proc = run_script(tmp_path, 120, SIZE="small", ONLY="env")
    assert proc.returncode == 0, proc.stderr
    parts = by_part(json_lines(proc.stdout))
    assert list(parts) == [*PART_NAMES, "summary"]
    assert parts["env"][0]["status"] == "ok" and parts["env"][0]["device"] == "cpu"
    assert parts["wheels"][0]["reason"].startswith("skipped: SIZE=small uses the current environment")
    for name in PART_NAMES[PART_NAMES.index("env") + 1 :]:
        assert parts[name][0]["reason"] == "skipped: not in ONLY=env"
    assert parts["summary"][0]["ok"] == ["env"]


def test_full_size_without_cuda_skips_every_gpu_part(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: SIZE=full would run for real")
    proc = run_script(tmp_path, 120, SIZE="full")
    assert proc.returncode == 0, proc.stderr
    parts = by_part(json_lines(proc.stdout))
    assert list(parts) == [*PART_NAMES, "summary"]
    env = parts["env"][0]
    assert env["status"] == "ok" and env["cuda"] is False and env["device"] == "cpu"
    assert env["packages"]["torch"] == torch.__version__
    for name in PART_NAMES[PART_NAMES.index("env") + 1 :]:
        (line,) = parts[name]
        assert line["status"] == "skipped"
        assert line["reason"].startswith("skipped: no CUDA device"), line


def qwen3_parameters(hidden, intermediate, layers, heads, kv_heads, head_dim, vocab) -> int:
    """Qwen3ForCausalLM with tied embeddings, counted by hand: q/k/v/o, q/k RMSNorm, SwiGLU MLP, two norms per layer."""
    attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden + 2 * head_dim
    mlp = 3 * hidden * intermediate
    return vocab * hidden + layers * (attention + mlp + 2 * hidden) + hidden


def test_qwen3_4b_dims_count_4_billion_parameters() -> None:
    dims = gc_model_dims()["full"]
    n = qwen3_parameters(
        dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"], dims["num_attention_heads"],
        dims["num_key_value_heads"], dims["head_dim"], dims["vocab_size"],
    )  # fmt: skip
    assert n == 4_022_468_096  # Qwen3-4B model card: 4.0 B parameters, 3.6 B without the 389 M embedding


def gc_model_dims() -> dict:
    spec = importlib.util.spec_from_file_location("gpu_model", REPO_ROOT / "bench" / "gpu_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DIMS


@pytest.mark.slow
def test_cpu_dry_run_runs_every_part(tmp_path) -> None:
    proc = run_script(tmp_path, 1500, SIZE="small", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = json_lines(proc.stdout)
    parts = by_part(lines)
    assert list(parts) == [*PART_NAMES, "summary"]
    (summary,) = parts["summary"]
    errors = {n: parts[n][0].get("error") for n in summary["failed"]}
    assert summary["failed"] == [], errors
    assert summary["skipped"] == ["wheels"]  # SIZE=small uses the current environment
    assert parts["wheels"][0]["reason"].startswith("skipped: ")
    assert summary["ok"] == PART_NAMES[1:]
    assert all(line["size"] == "small" for line in lines)
    assert all(line["device"] == "cpu" for line in lines[1:])  # from the env part on (torch says)
    out = tmp_path / "out"
    assert json_lines((out / "gpu_check.jsonl").read_text()) == lines
    assert "##### accelerate_zero2: exit 0" in (out / "gpu_check.log").read_text()

    # loss benchmark: a row per method (frozen head) plus opsd with a trainable head, then its own JSON
    rows = [line for line in parts["loss_memory"] if line["kind"] == "row"]
    assert [(r["method"], r["lm_head"]) for r in rows] == [
        ("opsd", "frozen"), ("eopd", "frozen"), ("pwopsd", "frozen"), ("reopold", "frozen"), ("opsd", "trainable"),
    ]  # fmt: skip
    assert parts["loss_memory"][-1]["kind"] == "summary" and parts["loss_memory"][-1]["max_abs_diff"] <= 1e-4
    assert parts["loss_memory_T4096"][-1]["T"] == 256

    (model,) = parts["model"]
    dims = gc_model_dims()["small"]
    assert model["parameters"] == qwen3_parameters(
        dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"], dims["num_attention_heads"],
        dims["num_key_value_heads"], dims["head_dim"], dims["vocab_size"],
    )  # fmt: skip

    # dense and chunked loss paths: the same micro-batch, the same loss
    dense, chunked = parts["train_loss_dense"][0]["loss_value"], parts["train_loss_chunked"][0]["loss_value"]
    assert chunked == pytest.approx(dense, rel=1e-4)
    for name in ("train_steps_dense", "train_steps_chunked"):
        assert parts[name][0]["step_s"] > 0 and parts[name][0]["completion_length"] == 16

    (evaluation,) = parts["eval_hf"]
    assert (evaluation["problems"], evaluation["samples"], evaluation["backend"]) == (2, 4, "hf")
    assert json.loads((out / "eval_hf.json").read_text())["val_n"] == 2
    (tokens,) = parts["eval_hf_tokens"]
    assert tokens["rows"] == 4 and tokens["decode_steps"] <= 16
    assert 0 < tokens["new_tokens"] <= tokens["rows"] * tokens["decode_steps"]
    assert tokens["tokens_per_s"] == pytest.approx(tokens["new_tokens"] / tokens["gen_s"], rel=0.02)

    (zero2,) = parts["accelerate_zero2"]
    assert zero2["optimizer_steps"] == 2 and len(zero2["loss"]) == 2
    assert zero2["checkpoint_saved"] and zero2["adapter_saved"]
