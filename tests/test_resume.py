"""Resume after a kill during a checkpoint save: real tiny training runs of `code/ea_opsd_train.py`, killed with SIGKILL
at each stage of writing `checkpoint-2`, then resumed with `--resume_from_checkpoint last`.

The kill is placed by a small wrapper script (written below) that runs the real entry point with `torch.save`,
`safetensors.torch.save_file`, `open(..., "w")`, `os.replace` and `os.unlink` counted for the files of one checkpoint
folder: at the chosen write the process kills itself, before the write or after writing half of the file. The trainer,
the model and the data stay real; only the moment of death is chosen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT as REPO
from safetensors.torch import load_file

from pwopsd.checkpoints import (
    COMPLETE_MARKER,
    SAVING_MARKER,
    CheckpointLayout,
    checkpoint_problem,
    last_complete_checkpoint,
    rotate_checkpoints,
)

ARGS = (
    "--method opsd --max_steps 2 --save_steps 1 --save_total_limit 1 --per_device_train_batch_size 2 "
    "--gradient_accumulation_steps 1 --learning_rate 1e-3 --max_completion_length 8 --max_length 512 --use_peft "
    "--lora_r 4 --lora_alpha 8 --lora_target_modules q_proj v_proj --use_ema_teacher --ema_decay 0.5 "
    "--temperature 1.1 --top_p 0.95 --top_k 20 --lmbda 1 --beta 0 --logging_steps 1 --report_to none "
    "--disable_tqdm true --dataloader_pin_memory false"
)
LAYOUT = CheckpointLayout(adapter=True, ema=True, world_size=1)

KILLER = r'''
"""Run a script with the writes into KILL_DIR counted; SIGKILL the process at write number KILL_AT."""
import builtins, functools, os, runpy, signal, sys

TARGET = os.path.realpath(os.environ["KILL_DIR"])
AT = int(os.environ.get("KILL_AT", "0"))  # 0: only record the writes
MODE = os.environ.get("KILL_MODE", "before")  # before the write, or "truncate": write, cut to half, die
LOG = os.environ["KILL_LOG"]
state = {"count": 0, "inside": False}


def inside_target(path):
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:  # a file object
        return False
    return os.path.realpath(path).startswith(TARGET + os.sep)


def event(kind, path, write):
    if state["inside"] or not inside_target(path):
        return write()
    state["count"] += 1
    with _open(LOG, "a") as f:
        f.write(f"{kind}\t{os.path.relpath(os.path.realpath(os.fspath(path)), TARGET)}\n")
    if state["count"] == AT:
        if MODE == "truncate":
            state["inside"] = True
            write()
            os.truncate(path, os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    state["inside"] = True
    try:
        return write()
    finally:
        state["inside"] = False


def wrap(module, name, kind, path_of):
    original = getattr(module, name)

    @functools.wraps(original)
    def patched(*args, **kwargs):
        return event(kind, path_of(*args, **kwargs), lambda: original(*args, **kwargs))

    setattr(module, name, patched)


_open = builtins.open


def open_patched(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        return event("open", file, lambda: _open(file, mode, *args, **kwargs))
    return _open(file, mode, *args, **kwargs)


import safetensors.torch  # noqa: E402
import torch  # noqa: E402

wrap(torch, "save", "torch.save", lambda obj, f, *a, **k: f)
wrap(safetensors.torch, "save_file", "safetensors", lambda tensors, filename, *a, **k: filename)
wrap(os, "replace", "rename", lambda src, dst, *a, **k: dst)
wrap(os, "unlink", "unlink", lambda path, *a, **k: path)
builtins.open = open_patched
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory) -> dict:
    """The data, the wrapper, and one uninterrupted run (its final adapter and the writes of its checkpoint-2)."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "train.jsonl"
    rows = [{"problem": f"What is {a} * 3?", "solution": f"{a} * 3 = {3 * a}. \\boxed{{{3 * a}}}"} for a in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    killer = root / "killer.py"
    killer.write_text(KILLER, encoding="utf-8")
    box = {"root": root, "data": data, "killer": killer, "model": tiny_model_dir("qwen3")}
    out = root / "uninterrupted"
    proc = train(box, out, kill_dir=out / "checkpoint-2", log=root / "writes.log")
    assert proc.returncode == 0, proc.stderr[-3000:]
    box["final"] = load_file(out / "adapter_model.safetensors")
    box["writes"] = (root / "writes.log").read_text().splitlines()
    return box


def train(box: dict, out: Path, *extra: str, kill_dir: Path | None = None, **kill) -> subprocess.CompletedProcess:
    """`python code/ea_opsd_train.py` on the tiny model, through the wrapper when `kill_dir` is given."""
    cmd = [sys.executable]
    env = {**os.environ, "PWOPSD_TRAIN_DATASET": str(box["data"]), "OMP_NUM_THREADS": "1"}
    if kill_dir is not None:
        cmd.append(str(box["killer"]))
        env.update(KILL_DIR=str(kill_dir), KILL_LOG=str(kill.get("log", out.parent / f"{out.name}.log")))
        env.update(KILL_AT=str(kill.get("at", 0)), KILL_MODE=kill.get("mode", "before"))
    cmd += ["code/ea_opsd_train.py", "--model_name_or_path", str(box["model"]), "--output_dir", str(out)]
    cmd += [*ARGS.split(), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def assert_same_adapter(path: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(path)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name  # bitwise: same data order, same RNG state


# stage: (write to die at, how, the file a checkpoint without markers shows as the problem, or None when it is whole)
STAGES = {
    "adapter weights half-written": (
        "safetensors\tadapter_model.safetensors",
        "truncate",
        "adapter_model.safetensors does not load",
    ),
    "before adapter config": ("open\tadapter_config.json", "before", "adapter_config.json"),
    "optimizer half-written": ("torch.save\toptimizer.pt", "truncate", "optimizer.pt does not load"),
    "rng state half-written": ("torch.save\trng_state.pth", "truncate", "rng_state.pth does not load"),
    "before trainer state": ("open\ttrainer_state.json", "before", "trainer_state.json"),
    "ema teacher half-written": ("torch.save\tema_teacher.pt", "truncate", "ema_teacher.pt does not load"),
    "before the complete marker": (f"rename\t{COMPLETE_MARKER}", "before", None),
    "after the complete marker": (f"unlink\t{SAVING_MARKER}", "before", None),
}


def test_the_uninterrupted_save_writes_every_stage_and_marks_the_checkpoint_complete(setup):
    names = [w.split("\t")[1] for w in setup["writes"]]
    assert [w for w, _, _ in STAGES.values() if w not in setup["writes"]] == []
    # the complete marker is the last file written, after the EMA file; then the in-progress marker goes
    assert names[-2:] == [COMPLETE_MARKER, SAVING_MARKER] and names.index("ema_teacher.pt") < len(names) - 2
    folder = setup["root"] / "uninterrupted" / "checkpoint-2"
    manifest = json.loads((folder / COMPLETE_MARKER).read_text())
    assert manifest["step"] == 2
    assert manifest["files"]["optimizer.pt"] == (folder / "optimizer.pt").stat().st_size
    assert not (folder / SAVING_MARKER).exists() and checkpoint_problem(folder, LAYOUT) is None
    assert not (setup["root"] / "uninterrupted" / "checkpoint-1").exists()  # --save_total_limit 1


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_kill_during_the_save_resumes_from_the_last_complete_checkpoint(setup, tmp_path, stage):
    write, mode, legacy_problem = STAGES[stage]
    out = tmp_path / "out"
    ckpt1, ckpt2 = out / "checkpoint-1", out / "checkpoint-2"
    killed = train(setup, out, kill_dir=ckpt2, at=setup["writes"].index(write) + 1, mode=mode)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (out / "adapter_model.safetensors").exists()  # the run did not finish
    # --save_total_limit 1 must not have deleted the only complete checkpoint while checkpoint-2 was being written
    assert checkpoint_problem(ckpt1, LAYOUT) is None
    whole = stage == "after the complete marker"
    assert (checkpoint_problem(ckpt2, LAYOUT) is None) is whole
    # the same folder without markers (as a checkpoint written before markers existed) is judged by loading its files
    legacy = tmp_path / "legacy" / "checkpoint-2"
    shutil.copytree(ckpt2, legacy)
    for marker in (SAVING_MARKER, COMPLETE_MARKER):
        (legacy / marker).unlink(missing_ok=True)
    problem = checkpoint_problem(legacy, LAYOUT)
    if legacy_problem is None:
        assert problem is None
    else:
        assert problem is not None and legacy_problem in problem, problem

    resumed = train(setup, out, "--resume_from_checkpoint", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = ckpt2 if whole else ckpt1
    assert f"resuming from {start}" in resumed.stderr
    skipped = [line for line in resumed.stderr.splitlines() if "skipping incomplete checkpoint" in line]
    if whole:
        assert skipped == []
    else:
        assert len(skipped) == 1 and skipped[0].endswith(
            f"skipping incomplete checkpoint(s) checkpoint-2 (its save was interrupted, {SAVING_MARKER} is there "
            f"without {COMPLETE_MARKER}): resuming from checkpoint-1"
        ), skipped
    assert_same_adapter(out / "adapter_model.safetensors", setup["final"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == (
        ["checkpoint-1", "checkpoint-2"] if whole else ["checkpoint-2"]
    )
    assert checkpoint_problem(ckpt2, LAYOUT) is None  # after the resumed save, rotation removed checkpoint-1
    assert json.loads((ckpt2 / "trainer_state.json").read_text())["global_step"] == 2


def test_a_kill_during_the_first_save_restarts_from_step_zero(setup, tmp_path):
    out = tmp_path / "out"
    at = setup["writes"].index("torch.save\toptimizer.pt") + 1  # the same sequence of writes in checkpoint-1
    killed = train(setup, out, kill_dir=out / "checkpoint-1", at=at, mode="truncate")
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = train(setup, out, "--resume_from_checkpoint", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (line,) = [x for x in resumed.stderr.splitlines() if "skipping incomplete checkpoint" in x]
    assert line.endswith("training starts from step 0")
    assert_same_adapter(out / "adapter_model.safetensors", setup["final"])


def test_a_checkpoint_without_markers_resumes_when_its_files_load(setup, tmp_path):
    """A checkpoint written before markers existed: complete when every file the resume reads loads."""
    out = tmp_path / "out"
    shutil.copytree(setup["root"] / "uninterrupted" / "checkpoint-2", out / "checkpoint-1")
    (out / "checkpoint-1" / COMPLETE_MARKER).unlink()
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # a newer, marker-less folder with a truncated optimizer: skipped by the load check
    shutil.copytree(out / "checkpoint-1", out / "checkpoint-5")
    optimizer = out / "checkpoint-5" / "optimizer.pt"
    os.truncate(optimizer, optimizer.stat().st_size - 100)
    folder, skipped = last_complete_checkpoint(out, LAYOUT)
    assert folder == out / "checkpoint-1"
    assert [(f.name, p.split(" (")[0]) for f, p in skipped] == [("checkpoint-5", "optimizer.pt does not load")]
    # the EMA state is required only when the run uses the EMA teacher
    (out / "checkpoint-1" / "ema_teacher.pt").unlink()
    assert "ema_teacher.pt" in checkpoint_problem(out / "checkpoint-1", LAYOUT)
    assert checkpoint_problem(out / "checkpoint-1", CheckpointLayout(adapter=True, ema=False)) is None
    assert "rng_state_1.pth" in checkpoint_problem(out / "checkpoint-1", CheckpointLayout(world_size=2))


def test_explicit_incomplete_checkpoint_is_a_one_line_error(setup, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(setup["root"] / "uninterrupted" / "checkpoint-2", out / "checkpoint-2")
    (out / "checkpoint-2" / "scheduler.pt").unlink()
    proc = train(setup, out, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ea_opsd_train.py: error: --resume_from_checkpoint {out / 'checkpoint-2'} is incomplete: scheduler.pt is "
        "missing; pass 'last' to resume from the newest complete checkpoint"
    )


def test_rotation_counts_only_complete_checkpoints(setup, tmp_path):
    """Naive rule: keep the `limit` most recently completed complete checkpoints; never touch an incomplete one."""
    source = setup["root"] / "uninterrupted" / "checkpoint-2"
    for step in (1, 2, 3, 4):
        shutil.copytree(source, tmp_path / f"checkpoint-{step}")
        stamp = 1_000_000 + 10 * (5 - step)  # completed in reverse step order: time, not step, decides the age
        os.utime(tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER, (stamp, stamp))
    (tmp_path / "checkpoint-4" / COMPLETE_MARKER).unlink()
    (tmp_path / "checkpoint-4" / SAVING_MARKER).write_text("")  # the newest folder is a killed save
    expected_kept = {"checkpoint-1", "checkpoint-2"}  # the two completed last (smallest steps here)
    deleted = rotate_checkpoints(tmp_path, 2, LAYOUT, keep=[tmp_path / "checkpoint-1"])
    assert sorted(p.name for p in deleted) == ["checkpoint-3"]
    assert {p.name for p in tmp_path.iterdir()} == expected_kept | {"checkpoint-4"}
    assert rotate_checkpoints(tmp_path, 1, LAYOUT, keep=[tmp_path / "checkpoint-1"]) == [tmp_path / "checkpoint-2"]
    assert (tmp_path / "checkpoint-4").is_dir()  # incomplete: never counted, never deleted
