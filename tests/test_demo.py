"""The README's main job, CI-sized: `launchers/run_demo.sh --tiny` with one method, one step, two problems (MATH-500
and the bundled arith set), and the diagnostic's profile of the base model."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file


def _weights(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "PWOPSD_CACHE": str(tmp_path / "cache")}
    cmd = [
        "bash",
        "launchers/run_demo.sh",
        "--tiny",
        "--methods",
        "pwopsd",
        "--steps",
        "1",
        "--problems",
        "2",
        "--val_n",
        "2",
        "--max_new_tokens",
        "16",
        "--arith_problems",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in (
        "model:",
        "evaluate tiny_qwen3_base on MATH-500[:2]",
        "evaluate tiny_qwen3_base on arith[:2]",
        "diagnose profile of the base model",
        "train pwopsd",
        "merge pwopsd",
        "evaluate tiny_qwen3_pwopsd",
        "summarize",
        "done in",
    ):
        assert stage in proc.stdout
    # Training wrote the checkpoint, the merge a standalone model that differs from the base.
    assert (out / "tiny_qwen3_pwopsd" / "checkpoint-1" / "adapter_config.json").exists()
    base, merged = _weights(out / "tiny_qwen3_base"), _weights(out / "tiny_qwen3_pwopsd_merged")
    assert base.keys() == merged.keys()
    assert any(not torch.equal(base[k].float(), merged[k].float()) for k in base)
    # Evaluation wrote the full result schema for both models.
    for name in ("tiny_qwen3_base", "tiny_qwen3_pwopsd"):
        result = json.loads((out / "eval_results" / f"{name}_38k_seed0.json").read_text())
        assert (result["dataset"], result["num_problems"], result["val_n"], result["seed"]) == ("math500", 2, 2, 0)
        assert result["total_solutions"] == 4 and len(result["results"]) == 2
        assert (result["backend"], result["answer_format"]) == ("hf", "boxed")  # MATH-500: the reference's rule
        # The arith set: its own file and dataset key, the first 2 rows of data/arith.jsonl.
        arith = json.loads((out / "eval_results" / f"{name}_arith_38k_seed0.json").read_text())
        assert (arith["dataset"], arith["num_problems"], arith["total_solutions"]) == ("arith", 2, 4)
        rows = [json.loads(line) for line in (REPO_ROOT / "data" / "arith.jsonl").read_text().splitlines()[:2]]
        assert [r["ground_truth"] for r in arith["results"]] == [r["answer"] for r in rows]
        assert arith["answer_format"] == "boxed_or_last_number"  # the 135M model rarely boxes: last-number fallback
    # The diagnostic's profile of the base model: 2 problems x 2 rollouts, figure written and its path printed.
    profile = json.loads((out / "diagnose_tiny_qwen3_base" / "profile.json").read_text())
    assert profile["summary"]["rollouts"] == 4
    png = out / "diagnose_tiny_qwen3_base" / "profile.png"
    assert png.stat().st_size > 1000 and f"diagnose profile figure: {png}" in proc.stdout
    table = (out / "summary" / "summary.md").read_text()
    assert "| tiny_qwen3 | base |" in table and "| tiny_qwen3 | pwopsd |" in table
    assert "arith" in table.splitlines()[next(i for i, line in enumerate(table.splitlines()) if "math500" in line)]
    assert (out / "summary" / "summary.png").stat().st_size > 1000
    # A re-run keeps every finished stage.
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "train pwopsd" not in proc.stdout and proc.stdout.count("kept existing") == 5


def test_demo_rejects_bad_arguments() -> None:
    for args, msg in (
        (["--methods", "sft"], "unknown method 'sft'"),
        (["--bogus"], "unknown argument '--bogus'"),
        (["--arith_problems", "-1"], "--arith_problems must be a whole number >= 0 (0 = skip the arith set), got '-1'"),
    ):
        proc = subprocess.run(["bash", "launchers/run_demo.sh", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr


def test_demo_methods_come_from_the_registry() -> None:
    """The valid --methods (and the default: all of them) are pwopsd.losses.METHODS, in registry order."""
    from pwopsd.losses import METHODS

    proc = subprocess.run(["bash", "launchers/run_demo.sh", "--methods", "opsd sft"], cwd=REPO_ROOT,
                          capture_output=True, text=True)  # fmt: skip
    expected = f"run_demo.sh: unknown method 'sft' in --methods ({' '.join(METHODS)})"
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == expected


def test_demo_methods_are_names_never_patterns_or_code(tmp_path) -> None:
    """--methods is split on spaces only: a `*` is not expanded to file names, `$(...)` and backticks never run."""
    canary = tmp_path / "canary"
    env = {**os.environ, "CANARY": str(canary)}
    for methods, shown in (("opsd *", "*"), ('$(touch "$CANARY") `touch "$CANARY"`', "$(touch")):
        proc = subprocess.run(["bash", "launchers/run_demo.sh", "--methods", methods], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
            f"run_demo.sh: unknown method '{shown}' in --methods"
        )
    assert not canary.exists()
