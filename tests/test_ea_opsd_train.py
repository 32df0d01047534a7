"""The training entry point: the issue's Must-show command for each method (then the merge), flag defaults, run names,
user errors (one line, exit 2, no traceback), and a two-process CPU run under accelerate (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT as REPO
from transformers import AutoModelForCausalLM

from pwopsd import train
from pwopsd.checkpoints import COMPLETE_MARKER, CheckpointLayout, checkpoint_problem
from pwopsd.config import ConfigError, OPSDConfig

MUST_SHOW = (
    "--method {method} --output_dir {out} --max_steps 2 --save_steps 1 --per_device_train_batch_size 2 "
    "--gradient_accumulation_steps 1 --learning_rate 1e-3 --max_completion_length 8 --max_length 512 --use_peft "
    "--lora_r 4 --lora_alpha 8 --lora_target_modules q_proj v_proj --fixed_teacher --temperature 1.1 --top_p 0.95 "
    "--top_k 20 --lmbda 1 --beta 0 --jsd_token_clip 0.05 --logging_steps 1 --report_to none"
)
ARCH_FOR_METHOD = {"opsd": "qwen3", "eopd": "dsr1_llama", "pwopsd": "olmo3_think", "reopold": "qwen3"}


@pytest.fixture(scope="module")
def train_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"problem": f"What is {a} * 3?", "solution": f"{a} * 3 = {3 * a}. \\boxed{{{3 * a}}}"} for a in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(args: list[str], env_extra: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add contention on the shared CI cores
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method", ["opsd", "eopd", "pwopsd", "reopold"])
def test_must_show_command_then_merge(tiny_model_dir, train_jsonl, tmp_path, method):
    tiny = tiny_model_dir(ARCH_FOR_METHOD[method])
    out, merged = tmp_path / "OUT", tmp_path / "MERGED"
    cmd = [sys.executable, "code/ea_opsd_train.py", "--model_name_or_path", str(tiny)]
    cmd += MUST_SHOW.format(method=method, out=out).split()
    proc = run_cli(cmd, {"PWOPSD_TRAIN_DATASET": str(train_jsonl)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (1, 2):
        assert (out / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2]
    assert (out / "adapter_model.safetensors").is_file()  # final save_model

    proc = run_cli([sys.executable, "code/merge_lora.py", str(tiny), str(out / "checkpoint-2"), str(merged)], {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(merged)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    assert model.dtype == torch.bfloat16  # merged in bf16 as the reference
    deltas = [
        (p.float() - base.state_dict()[n].to(torch.bfloat16).float()).abs().max().item()
        for n, p in model.state_dict().items()
        if "q_proj" in n or "v_proj" in n
    ]
    assert max(deltas) > 0, "merged model equals the base model"


# ---------------------------------------------------------------------------------------------------------------------
# Defaults and run names
# ---------------------------------------------------------------------------------------------------------------------
def test_reference_defaults_are_explicit(tmp_path):
    args = OPSDConfig(output_dir=str(tmp_path))
    expected = {  # the reference's flags and inherited defaults (library defaults of its pinned versions)
        "method": None,
        "use_tinker_loss": False,
        "fixed_teacher": False,
        "use_ema_teacher": False,
        "ema_decay": 0.999,
        "run_config": None,
        "presence_penalty": 0.0,
        "reason_first": False,
        "max_reasoning_length": 4096,
        "top_k_loss": 0,
        "jsd_token_clip": 0.05,
        "position_w_min": 0.25,
        "position_tau": 0.30,
        "position_s": 0.10,
        "position_global_reduction": False,
        "reopold_lambda": 0.1,
        "reopold_beta": 0.2,
        "reopold_t_switch": 50,
        "learning_rate": 1e-7,
        "max_grad_norm": 1.0,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "seed": 42,
        "max_completion_length": 128,
        "temperature": 0.9,
        "top_p": 0.95,
        "top_k": 0,
        "lmbda": 0.5,
        "beta": 0.5,
        "seq_kd": False,
        "disable_dropout": True,
        "use_vllm": False,
        "vllm_mode": "server",
        "vllm_server_port": 8000,  # `trl vllm-serve`'s port (GOLDConfig's 8001 met no server)
        "vllm_gpu_memory_utilization": 0.9,
        "vllm_sync_frequency": 1,
        "vllm_enable_sleep_mode": False,
        "vllm_tensor_parallel_size": 1,
        "gradient_checkpointing": True,
        "remove_unused_columns": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "dense_loss": False,
        "prompt_padding": "right",
        "teacher_think": "reference",
        "eos_mask": "pad_id",
        "student_enable_thinking": False,
        "generations_dump_steps": 5,
    }
    for name, value in expected.items():
        assert getattr(args, name) == value, name
    assert args.optim in ("adamw_torch", "adamw_torch_fused")
    assert args.bf16 is torch.cuda.is_available()


def test_run_config_names_output_dir_and_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    args = OPSDConfig(
        output_dir=str(tmp_path / "outputs"),
        run_config="qwen3_4b_base_pwopsd",
        learning_rate=5e-6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        wandb_project="pwopsd",
    )
    train.apply_run_config(args)
    assert args.output_dir == str(tmp_path / "outputs" / "qwen3_4b_base_pwopsd")
    assert args.run_name == "qwen3_4b_base_pwopsd_lr5e-6_bs8"  # x4 processes in the launchers gives bs32
    assert os.environ["WANDB_PROJECT"] == "pwopsd"
    train.apply_run_config(args)  # already ends with the name: not appended twice
    assert args.output_dir == str(tmp_path / "outputs" / "qwen3_4b_base_pwopsd")
    assert train.format_learning_rate(1e-3) == "0.001"
    assert train.format_learning_rate(1.5e-5) == "1.5e-5"


# ---------------------------------------------------------------------------------------------------------------------
# User errors: one line naming the flag/file/column and the fix, exit status 2, no traceback
# ---------------------------------------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


BAD_INPUTS = {  # case: (dataset/model setup, flags to set (None = drop the flag, True = bare flag), expected text)
    "missing columns": ({"data": "wrong_columns"}, {}, "lacks column(s) problem, solution; it has question, answer"),
    "unreadable path": ({"data": "/nonexistent/train.jsonl"}, {}, "no such file or folder"),
    "corrupt json": ({"data": "corrupt"}, {}, "cannot read dataset"),
    "empty folder": ({"data": "empty_dir"}, {}, "no data files"),
    "unknown method": ({}, {"--method": "foo"}, "unknown --method 'foo': choose one of"),
    "missing method": ({}, {"--method": None}, "--method is required"),
    "fixed teacher without peft": ({}, {"--use_peft": None}, "--fixed_teacher needs --use_peft"),
    "ema and fixed teacher": ({}, {"--use_ema_teacher": True}, "mutually exclusive"),
    "bad schedule": ({}, {"--method": "pwopsd", "--position_s": "-1"}, "--position_s"),
    "bad lambda": ({}, {"--method": "reopold", "--reopold_lambda": "1.5"}, "--reopold_lambda must be in (0, 1)"),
    "bad reopold beta": ({}, {"--method": "reopold", "--reopold_beta": "0"}, "--reopold_beta"),
    "bad gkd beta": ({}, {"--beta": "2"}, "--beta"),
    "missing model": ({"model": "/nonexistent/model"}, {}, "cannot load --model_name_or_path '/nonexistent/model'"),
    "completion >= max_length": ({}, {"--max_completion_length": "512"}, "must be smaller than --max_length"),
    "reason_first": ({}, {"--reason_first": True}, "--reason_first is not implemented"),
    "unknown flag": ({}, {"--bogus_flag": "1"}, "--bogus_flag"),
    "bad resume": ({}, {"--resume_from_checkpoint": "/nonexistent/ckpt"}, "--resume_from_checkpoint"),
    # models that are not models, flags the libraries reject only after loading (each printed a traceback before)
    "folder that is not a model": ({"model": "not_a_model"}, {}, "the folder has no config.json, so it is not a model"),
    "model folder without weights": ({"model": "config_only"}, {}, "cannot load --model_name_or_path"),
    "lora rank 0": ({}, {"--lora_r": "0"}, "--lora_r must be >= 1 (the LoRA rank), got 0"),
    "integer dtype": (
        {},
        {"--torch_dtype": "int8"},
        "--torch_dtype 'int8' is not a floating-point dtype: use bfloat16",
    ),
    "unknown dtype": ({}, {"--torch_dtype": "float8"}, "--torch_dtype 'float8' is not a torch dtype"),
    # data that used to be reported as "StopIteration" or trained on as the text "None" / "[1, 2]"
    "empty file": ({"data": "empty_file"}, {}, "has no rows (its file(s) are empty)"),
    "blank lines only": ({"data": "blank_file"}, {}, "has no rows (its file(s) are empty)"),
    "null problem": ({"data": "null_problem"}, {}, "row 1 (0-based): column 'problem' is null, not a string; fix"),
    "list problem": ({"data": "list_problem"}, {}, "row 0 (0-based): column 'problem' is list '[1, 2]', not a string"),
    "number solution": (
        {"data": "number_solution"},
        {},
        "row 2 (0-based): column 'solution' is int '3', not a string (2 values in all)",
    ),
    # rollout sampling flags the engines check only at the first rollout
    "vllm temperature": ({}, {"--use_vllm": True, "--temperature": "2.5"}, "--temperature 2.5 is above 2, the most"),
    "vllm presence penalty": ({}, {"--use_vllm": True, "--presence_penalty": "2.5"}, "--presence_penalty must be in"),
    "top_p": ({}, {"--top_p": "0"}, "--top_p must be in (0, 1], got 0.0"),
    "min_p": ({}, {"--min_p": "1.5"}, "--min_p must be in [0, 1], got 1.5"),
}
BAD_DATA = {  # data file contents of the bad-data cases
    "empty_file": "",
    "blank_file": "\n  \n",
    "null_problem": '{"problem": "p", "solution": "s"}\n{"problem": null, "solution": "s"}\n',
    "list_problem": '{"problem": [1, 2], "solution": "s"}\n{"problem": "p", "solution": "s"}\n',
    "number_solution": "".join(json.dumps({"problem": "p", "solution": s}) + "\n" for s in ["s", "s", 3, None]),
}


def _argv(model: str, out: Path, flags: dict) -> list[str]:
    """The Must-show argv with `flags` set: a value replaces the flag's value, None drops it, True makes it bare."""
    argv = ["--model_name_or_path", model, *MUST_SHOW.format(method="opsd", out=out).split()]
    for flag, value in flags.items():
        if flag in argv:
            i = argv.index(flag)
            end = i + 1
            while end < len(argv) and not argv[end].startswith("--"):
                end += 1
            del argv[i:end]
        if value is True:
            argv.append(flag)
        elif value is not None:
            argv += [flag, value]
    return argv


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_user_errors_are_one_line(case, tiny_model_dir, train_jsonl, tmp_path, monkeypatch, capsys):
    setup, extra, message = BAD_INPUTS[case]
    data = {
        "wrong_columns": _write(tmp_path / "w.jsonl", '{"question": "q", "answer": "a"}\n'),
        "corrupt": _write(tmp_path / "c.jsonl", '{"problem": "p", "solution": \n'),
        "empty_dir": tmp_path / "empty",
        **{name: _write(tmp_path / f"{name}.jsonl", text) for name, text in BAD_DATA.items()},
    }
    (tmp_path / "empty").mkdir()
    models = {"not_a_model": tmp_path / "not_a_model", "config_only": tmp_path / "config_only"}
    for folder in models.values():
        folder.mkdir()
    _write(models["not_a_model"] / "notes.txt", "not a model")
    shutil.copy(tiny_model_dir("qwen3") / "config.json", models["config_only"])
    spec = setup.get("data")
    monkeypatch.setenv("PWOPSD_TRAIN_DATASET", str(data.get(spec, spec) if spec else train_jsonl))
    model = setup.get("model", str(tiny_model_dir("qwen3")))
    model = str(models.get(model, model))
    rc = train.main(_argv(model, tmp_path / "out", extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err and err[-1].startswith("ea_opsd_train.py: error: "), err
    assert sum(line.startswith("ea_opsd_train.py: error:") for line in err) == 1
    assert message in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize(
    ("case", "flags", "expected"),
    [
        ("not a model", {}, "ea_opsd_train.py: error: cannot load --model_name_or_path '{model}': the folder has no "
         "config.json, so it is not a model folder (pass the folder save_pretrained wrote, or a Hub id)"),
        ("lora rank 0", {"--lora_r": "0"}, "ea_opsd_train.py: error: --lora_r must be >= 1 (the LoRA rank), got 0"),
        ("int8", {"--torch_dtype": "int8"}, "ea_opsd_train.py: error: --torch_dtype 'int8' is not a floating-point "
         "dtype: use bfloat16, float16, float32 or auto"),
    ],
)  # fmt: skip
def test_errors_that_printed_a_traceback_are_one_line(tiny_model_dir, train_jsonl, tmp_path, case, flags, expected):
    model = tiny_model_dir("qwen3")
    if case == "not a model":
        model = tmp_path / "notes"
        model.mkdir()
        (model / "notes.txt").write_text("not a model")
    cmd = [sys.executable, "code/ea_opsd_train.py", *_argv(str(model), tmp_path / "out", flags)]
    proc = run_cli(cmd, {"PWOPSD_TRAIN_DATASET": str(train_jsonl)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == expected.format(model=model)


@pytest.mark.skipif(train._vllm_installed(), reason="vLLM is installed here")
def test_use_vllm_without_vllm_is_one_line_before_loading(tiny_model_dir, train_jsonl, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PWOPSD_TRAIN_DATASET", str(train_jsonl))
    rc = train.main(_argv(str(tiny_model_dir("qwen3")), tmp_path / "out", {"--use_vllm": True}))
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ea_opsd_train.py: error: --use_vllm needs vLLM, which is not installed in this Python: install it (GPU "
        "machines) or drop --use_vllm to roll out with transformers generate"
    )


def test_vllm_bounds_apply_to_vllm_only(tmp_path):
    """vLLM's SamplingParams limits (temperature <= 2, |presence_penalty| <= 2) are checked when the config is built,
    with --use_vllm; transformers generate takes any temperature > 0 and ignores the presence penalty."""
    for kwargs in ({"temperature": 2.0}, {"presence_penalty": -2.0}, {"presence_penalty": 2.0}):
        OPSDConfig(output_dir=str(tmp_path), use_vllm=True, **kwargs)  # the bounds themselves are allowed
    for kwargs, flag in (({"temperature": 2.01}, "--temperature"), ({"presence_penalty": -2.5}, "--presence_penalty")):
        with pytest.raises(ConfigError, match=flag):
            OPSDConfig(output_dir=str(tmp_path), use_vllm=True, **kwargs)
        OPSDConfig(output_dir=str(tmp_path), use_vllm=False, **kwargs)


def test_vllm_server_defaults_meet_trl_vllm_serve():
    """Read from TRL itself: the port `trl vllm-serve` listens on, and the one its client connects to by default."""
    import inspect
    from dataclasses import fields

    from trl.generation.vllm_generation import VLLMGeneration
    from trl.scripts.vllm_serve import ScriptArguments

    serve = {f.name: f.default for f in fields(ScriptArguments)}
    client = inspect.signature(VLLMGeneration).parameters
    ours = {f.name: f.default for f in fields(OPSDConfig)}
    assert ours["vllm_server_port"] == serve["port"] == client["server_port"].default == 8000
    assert ours["vllm_server_host"] == serve["host"] == "0.0.0.0"


def test_refused_vllm_server_connection_is_one_line(tiny_model_dir, train_jsonl, tmp_path, monkeypatch, capsys):
    """The real TRL client (`VLLMGeneration` -> `VLLMClient.check_server`) against a port nothing listens on. vLLM is
    not installed here, so only TRL's "is vLLM installed" checks are answered yes; no request reaches any server."""
    import trl.generation.vllm_client as vllm_client
    import trl.generation.vllm_generation as vllm_generation

    monkeypatch.setattr(train, "_vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setenv("PWOPSD_TRAIN_DATASET", str(train_jsonl))
    with socket.socket() as sock:  # bound, never listening: connections to it are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        flags = {"--use_vllm": True, "--vllm_mode": "server", "--vllm_server_host": "127.0.0.1"}
        flags |= {"--vllm_server_port": str(port), "--vllm_server_timeout": "0"}
        rc = train.main(_argv(str(tiny_model_dir("qwen3")), tmp_path / "out", flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not any("Traceback" in line for line in err)
    assert err[-1] == (
        f"ea_opsd_train.py: error: cannot reach the vLLM server at http://127.0.0.1:{port} (--vllm_server_host/"
        "--vllm_server_port, or --vllm_server_base_url) within --vllm_server_timeout 0 s: start it first with "
        "`trl vllm-serve --model MODEL` (it listens on port 8000 unless given --port), or pass --vllm_mode colocate"
    )


def test_cli_error_has_no_traceback(tiny_model_dir, train_jsonl, tmp_path):
    cmd = [sys.executable, "code/ea_opsd_train.py", *_argv(str(tiny_model_dir("qwen3")), tmp_path, {"--method": "x"})]
    proc = run_cli(cmd, {"PWOPSD_TRAIN_DATASET": str(train_jsonl)})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "ea_opsd_train.py: error: unknown --method 'x': choose one of opsd, eopd, pwopsd, reopold"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Two processes on CPU (gloo) under accelerate
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_under_accelerate(tiny_model_dir, train_jsonl, tmp_path):
    """`accelerate launch --num_processes 2 --cpu` starts ONE process in accelerate 1.x (multi-CPU needs torchrun or
    mpirun), so the two-process job is started through the torchrun launcher; without CUDA the config sets use_cpu and
    the ranks form a gloo group."""
    out = tmp_path / "out"
    argv = _argv(str(tiny_model_dir("qwen3")), out, {"--method": "pwopsd", "--generations_dump_steps": "1"})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(29500 + os.getpid() % 400), "code/ea_opsd_train.py", *argv]
    proc = run_cli(cmd, {"PWOPSD_TRAIN_DATASET": str(train_jsonl)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 2 and len(logs) == 2
    assert logs[0]["epoch"] == pytest.approx(0.5)  # 8 rows / (2 processes x 2 prompts) = 2 steps per epoch
    # the completion marker is written after both processes wrote their RNG state
    manifest = json.loads((out / "checkpoint-2" / COMPLETE_MARKER).read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= manifest.keys()
    assert checkpoint_problem(out / "checkpoint-2", CheckpointLayout(adapter=True, world_size=2)) is None
    # the dump gathers the rollouts of both ranks
    records = json.loads((out / "generations" / "generations_step_1.json").read_text())
    assert len(records) == 4


def test_dataset_sources(tmp_path):
    """A .jsonl file, a .parquet file and a Hub-snapshot-like folder (train split only); extra columns are dropped."""
    import pandas as pd

    rows = [{"problem": "p1", "solution": "s1", "Answer": "1"}, {"problem": "p2", "solution": "s2", "Answer": "2"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    snapshot = tmp_path / "snap" / "data"
    snapshot.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(snapshot / "train-00000-of-00001.parquet")
    pd.DataFrame(rows[:1]).to_parquet(snapshot / "test-00000-of-00001.parquet")
    (tmp_path / "snap" / "README.md").write_text("# card")
    for spec, n in ((tmp_path / "a.jsonl", 2), (snapshot / "train-00000-of-00001.parquet", 2), (tmp_path / "snap", 2)):
        dataset = train.load_train_dataset(str(spec))
        assert dataset.column_names == ["problem", "solution"] and len(dataset) == n
        assert dataset[1] == {"problem": "p2", "solution": "s2"}


def test_first_line_of_an_error_message():
    from pwopsd.io import first_line

    assert first_line(OSError("  cannot open\nTraceback details")) == "cannot open"
    assert first_line(OSError()) == "OSError" and first_line(ValueError("   ")) == "ValueError"  # never IndexError


# ---------------------------------------------------------------------------------------------------------------------
# Training health through the CLI: a poisoned run exits 2 with one line, keeps its healthy checkpoint, no final adapter
# ---------------------------------------------------------------------------------------------------------------------
NAN_WRAPPER = """
import math, sys, torch
from pwopsd import train
load, graded = train.load_model_and_tokenizer, []
def poisoned(*args, **kwargs):
    model, tokenizer = load(*args, **kwargs)
    # NaN from the 2nd graded (student) forward on: step 1 is healthy; rollouts and the teacher run without grad
    def hook(module, inputs, output):
        if not torch.is_grad_enabled():
            return output
        graded.append(1)
        return output * math.nan if len(graded) > 1 else output
    model.model.norm.register_forward_hook(hook)
    return model, tokenizer
train.load_model_and_tokenizer = poisoned
sys.exit(train.main(sys.argv[1:]))
"""


def test_nonfinite_run_exits_2_keeps_the_healthy_checkpoint_and_writes_no_adapter(
    tiny_model_dir, train_jsonl, tmp_path
):
    out = tmp_path / "out"
    argv = _argv(str(tiny_model_dir("qwen3")), out, {"--max_steps": "3", "--save_total_limit": "1"})
    proc = run_cli([sys.executable, "-c", NAN_WRAPPER, *argv], {"PWOPSD_TRAIN_DATASET": str(train_jsonl)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [proc.stderr.strip().splitlines()[-1]]
    assert errors[0] == (
        f"ea_opsd_train.py: error: non-finite grad_norm=nan at step 2: training stopped, the state is saved in "
        f"{out / 'nonfinite-checkpoint-2'} for inspection (a resume starts from the last healthy checkpoint-*); lower "
        "--learning_rate or --max_grad_norm"
    )
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter: the launcher does not merge
    assert (out / "nonfinite-checkpoint-2" / "adapter_model.safetensors").is_file()
    # --save_total_limit 1 did not rotate the last healthy checkpoint away in favour of the poisoned one
    assert checkpoint_problem(out / "checkpoint-1", CheckpointLayout(adapter=True)) is None
    kept = sorted(p.name for p in out.iterdir() if "checkpoint-" in p.name)
    assert kept == ["checkpoint-1", "nonfinite-checkpoint-2"]


def test_health_flags_are_checked_on_the_command_line(tiny_model_dir, train_jsonl, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PWOPSD_TRAIN_DATASET", str(train_jsonl))
    rc = train.main(_argv(str(tiny_model_dir("qwen3")), tmp_path / "out", {"--health_window": "0"}))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["ea_opsd_train.py: error: --health_window must be an integer >= 1, got 0"]


# ---------------------------------------------------------------------------------------------------------------------
# --position_schedule_from: every bad file is one line naming it
# ---------------------------------------------------------------------------------------------------------------------
FIT = {"scale": 0.8, "w_min": 0.4, "tau": 0.55, "s": 0.2}
SCHEDULE_FILES = {  # case: (file contents or None = missing, extra flags, the expected message after "FLAG FILE: ")
    "missing": (None, {}, "no such file (pass the viability.json written by `diagnose.py viability`)"),
    "corrupt": ('{"summary": {"schedule_fit": ', {}, "not valid JSON (Expecting value, line 1): rerun `diagnose.py "
                "viability`"),
    "profile file": ({"summary": {"auroc": {}}}, {}, "no summary.schedule_fit in the file (is it the viability.json "
                     "of `diagnose.py viability`?)"),
    "fit failed": ({"summary": {"schedule_fit": {"error": "no viable branch: the viability curve is 0 everywhere, "
                   "nothing to fit"}}}, {}, "the file holds no fitted schedule: no viable branch: the viability curve "
                   "is 0 everywhere, nothing to fit"),
    "nan tau": ('{"summary": {"schedule_fit": {"w_min": 0.4, "tau": NaN, "s": 0.2}}}', {},
                "summary.schedule_fit.tau is nan, not a finite number"),
    "not pwopsd": (FIT, {"--method": "opsd"}, None),
    "both": ({"summary": {"schedule_fit": FIT}}, {"--position_tau": "0.3"}, None),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SCHEDULE_FILES))
def test_position_schedule_file_errors_are_one_line(case, tiny_model_dir, train_jsonl, tmp_path, monkeypatch, capsys):
    contents, extra, message = SCHEDULE_FILES[case]
    path = tmp_path / "viability.json"
    if contents is not None:
        path.write_text(contents if isinstance(contents, str) else json.dumps(contents), encoding="utf-8")
    monkeypatch.setenv("PWOPSD_TRAIN_DATASET", str(train_jsonl))
    flags = {"--method": "pwopsd", **extra, "--position_schedule_from": str(path)}
    rc = train.main(_argv(str(tiny_model_dir("qwen3")), tmp_path / "out", flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    expected = {
        "not pwopsd": "--position_schedule_from sets the PW-OPSD schedule, but --method is opsd: use --method pwopsd "
        "or drop the flag",
        "both": "--position_schedule_from sets the schedule; drop --position_tau (or drop the file)",
    }.get(case, f"--position_schedule_from {path}: {message}")
    assert err[0] == f"ea_opsd_train.py: error: {expected}"
