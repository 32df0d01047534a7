"""merge_lora.py (pwopsd.merge): the merged model reproduces the PEFT model's logits; files, dtype and user errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from pwopsd import merge


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with non-zero weights (B is zero at init, so randomise it) saved like a training checkpoint."""
    base_dir = tiny_model_dir("dsr1_llama")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    path = tmp_path_factory.mktemp("adapter") / "checkpoint-2"
    peft_model.save_pretrained(path)
    return base_dir, path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_logits_equal_peft_logits(adapter, tmp_path):
    base_dir, adapter_dir = adapter
    out = merge.merge_lora(str(base_dir), str(adapter_dir), tmp_path / "merged", dtype="float32")
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_logits = _logits(base, ids)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    diff = (_logits(merged, ids) - _logits(peft_model, ids)).abs().max().item()
    assert diff < 1e-5, diff
    assert (_logits(merged, ids) - base_logits).abs().max() > 1e-3  # the adapter matters
    assert not any("lora" in k for k in merged.state_dict())
    # the base tokenizer is saved next to the weights
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(base_dir).get_vocab()
    assert list(out.glob("*.safetensors")) and not list(tmp_path.glob("merged.tmp-*"))


def test_default_merge_is_bf16_like_the_reference(adapter, tmp_path):
    base_dir, adapter_dir = adapter
    assert merge.main([str(base_dir), str(adapter_dir), str(tmp_path / "m")]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    # re-running replaces the folder (safe re-run)
    assert merge.main([str(base_dir), str(adapter_dir), str(tmp_path / "m")]) == 0


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("adapter", "has no adapter_config.json"),
        ("base", "cannot load BASE"),
        ("dtype", "is not a torch dtype"),
    ],
)
def test_user_errors_are_one_line(adapter, tmp_path, capsys, which, message):
    base_dir, adapter_dir = adapter
    argv = [str(base_dir), str(adapter_dir), str(tmp_path / "m")]
    if which == "adapter":
        argv[1] = str(tmp_path / "missing")
    elif which == "base":
        argv[0] = str(tmp_path / "missing_base")
    else:
        argv += ["--dtype", "float7"]
    assert merge.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("merge_lora.py: error: ") and message in err[0]
    assert not (tmp_path / "m").exists()


def test_a_failed_save_leaves_no_partial_folder(adapter, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def full_disk(self, save_directory, **kwargs):
        save_directory.mkdir(parents=True)
        (save_directory / "model.safetensors").write_bytes(b"half")  # what was written before the disk filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    base_dir, adapter_dir = adapter
    with pytest.raises(OSError, match="No space left"):
        merge.merge_lora(str(base_dir), str(adapter_dir), str(tmp_path / "merged"))
    assert list(tmp_path.iterdir()) == []  # neither the output nor its tmp folder
