"""pwopsd.device: native bf16 detection and the compute dtype rule (auto = checkpoint dtype if native, else float32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pwopsd import device

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def naive_auto(checkpoint: torch.dtype | None, bf16_native: bool, fp16_native: bool) -> torch.dtype:
    """The documented rule, written out: keep the checkpoint dtype when the device computes it natively."""
    if checkpoint is None:
        return torch.float32
    native = {torch.float32: True, torch.bfloat16: bf16_native, torch.float16: fp16_native}[checkpoint]
    return checkpoint if native else torch.float32


@pytest.mark.parametrize("bf16_native", [True, False])
def test_compute_dtype_rules(bf16_native: bool, monkeypatch) -> None:
    monkeypatch.setattr(device, "native_bf16", lambda dev: bf16_native)
    fp16_native = device.native_dtype(torch.float16, "cpu")
    for checkpoint in (*DTYPES, None):
        assert device.compute_dtype("auto", "cpu", checkpoint) == naive_auto(checkpoint, bf16_native, fp16_native)
        for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
            assert device.compute_dtype(name, "cpu", checkpoint) == dtype  # explicit values are kept as given
    expected = torch.bfloat16 if bf16_native else torch.float32
    assert device.compute_dtype("auto", "cpu", torch.bfloat16) == expected
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        device.compute_dtype("int8", "cpu", torch.bfloat16)


def test_native_bf16_on_cuda_follows_torch(monkeypatch) -> None:
    device._native_bf16.cache_clear()
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        for supported in (True, False):
            monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, s=supported, **k: s)
            device._native_bf16.cache_clear()
            assert device.native_bf16("cuda") is supported
            assert device.native_bf16(torch.device("cuda", 0)) is supported
            assert device.compute_dtype("auto", "cuda", torch.bfloat16) == (
                torch.bfloat16 if supported else torch.float32
            )
    finally:
        device._native_bf16.cache_clear()


def test_native_bf16_is_cached() -> None:
    device._native_bf16.cache_clear()
    first = device.native_bf16("cpu")
    assert device.native_bf16("cpu") is first and device.native_bf16(torch.device("cpu")) is first
    info = device._native_bf16.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_an_avx2_cpu_gets_float32() -> None:
    """Capped at AVX2 (what an AVX2-only EPYC reports), oneDNN's check and the timed probe both say 'not native'."""
    code = (
        "import torch; from pwopsd import device as d; "
        "print(torch.backends.cpu.get_cpu_capability(), d.native_bf16('cpu'), d._probe_bf16_cpu(), "
        "d.compute_dtype('auto', 'cpu', torch.bfloat16), d.compute_dtype('bfloat16', 'cpu', torch.bfloat16))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AVX2", "False", "False", "torch.float32", "torch.bfloat16"]


def test_checkpoint_dtype_reads_the_config(tmp_path) -> None:
    cases = {
        "new": {"dtype": "bfloat16"},
        "old": {"torch_dtype": "float16"},
        "vlm": {"text_config": {"dtype": "bfloat16"}},
        "none": {"model_type": "llama"},
        "int": {"dtype": "int8"},
    }
    expected = {"new": torch.bfloat16, "old": torch.float16, "vlm": torch.bfloat16, "none": None, "int": None}
    for name, config in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        assert device.checkpoint_dtype(str(tmp_path / name)) == expected[name], name
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert device.checkpoint_dtype(str(tmp_path / "bad")) is None
    assert device.checkpoint_dtype(str(tmp_path / "missing")) is None  # neither a folder nor a reachable hub id


@pytest.mark.parametrize(
    ("flag", "bf16_native", "expected"),
    [(None, False, torch.float32), ("auto", False, torch.float32), (None, True, torch.bfloat16),
     ("bfloat16", False, torch.bfloat16), ("float16", True, torch.float16)],
)  # fmt: skip
def test_training_loads_float32_only_for_auto_without_native_bf16(
    flag, bf16_native, expected, tiny_model_dir, tmp_path, monkeypatch, caplog
) -> None:
    """train.py: --torch_dtype auto/unset on a CPU without native bf16 loads a bf16 checkpoint in float32 (logged);
    explicit values are kept as given."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pwopsd import train

    folder = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3"), dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir("qwen3")).save_pretrained(folder)
    monkeypatch.setattr(device, "native_bf16", lambda dev: bf16_native)
    script_args = SimpleNamespace(torch_dtype=flag)
    model_args = SimpleNamespace(model_name_or_path=str(folder), dtype=None, model_revision=None,
                                 attn_implementation=None)  # fmt: skip
    with caplog.at_level("INFO", logger="ea_opsd_train"):
        model, _ = train.load_model_and_tokenizer(script_args, model_args)
    assert {p.dtype for p in model.parameters()} == {expected}
    logged = "loading the bfloat16 checkpoint in float32" in caplog.text
    assert logged == (flag in (None, "auto") and not bf16_native)
