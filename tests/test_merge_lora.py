"""merge_lora.py (pwopsd.merge): the merged model reproduces the PEFT model's logits; files, dtype and user errors.

Safety: OUT never deletes BASE, ADAPTER, a file or a folder the tool did not write; replacement is atomic.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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
        ("dtype", "is not a merge dtype"),
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


# ---------------------------------------------------------------------------------------------------------------------
# OUT safety, replacement, base check, bad inputs
# ---------------------------------------------------------------------------------------------------------------------
def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: compares a folder before and after a run."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("merge_lora.py: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def owned(adapter, tmp_path):
    """Private copies of BASE and ADAPTER (so a bug cannot damage the shared fixtures) and their snapshots."""
    base_dir, adapter_dir = adapter
    base = shutil.copytree(base_dir, tmp_path / "base")
    ckpt = shutil.copytree(adapter_dir, tmp_path / "run" / "checkpoint-2")
    return base, ckpt, _tree(base), _tree(ckpt)


@pytest.mark.parametrize(
    ("out_of", "where"),
    [
        (lambda b, a: b, "is BASE"),
        (lambda b, a: a, "is ADAPTER"),
        (lambda b, a: a / "merged", "is inside ADAPTER"),
        (lambda b, a: b / "sub" / "merged", "is inside BASE"),
        (lambda b, a: a.parent, "contains ADAPTER"),
    ],
    ids=["base", "adapter", "inside_adapter", "inside_base", "contains_adapter"],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_overlapping_base_or_adapter_is_refused(owned, capsys, out_of, where, overwrite):
    base, ckpt, base_files, ckpt_files = owned
    out = out_of(base, ckpt)
    argv = [str(base), str(ckpt), str(out)] + (["--overwrite"] if overwrite else [])
    assert merge.main(argv) == 2
    _one_error_line(capsys, f"OUT '{out}' {where}", "choose an OUT outside BASE and ADAPTER")
    assert _tree(base) == base_files and _tree(ckpt) == ckpt_files
    assert sorted(p.name for p in base.parent.iterdir()) == ["base", "run"]


def test_out_given_through_another_spelling_of_adapter_is_refused(owned, capsys, monkeypatch):
    base, ckpt, _, ckpt_files = owned
    monkeypatch.chdir(ckpt.parent)
    assert merge.main([str(base), "checkpoint-2", f"../{ckpt.parent.name}/./checkpoint-2"]) == 2
    _one_error_line(capsys, "is ADAPTER")
    assert _tree(ckpt) == ckpt_files


def test_unrelated_folder_is_untouched(owned, tmp_path, capsys):
    base, ckpt, _, _ = owned
    out = tmp_path / "thesis"
    (out / "chapter1").mkdir(parents=True)
    (out / "chapter1" / "draft.tex").write_text("results")
    (out / "config.json").write_text("{}")  # even a model-looking folder is not ours without the marker
    before = _tree(out)
    assert merge.main([str(base), str(ckpt), str(out)]) == 2
    _one_error_line(capsys, f"OUT '{out}' exists and was not written by merge_lora.py", "pass --overwrite")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "run", "thesis"]


def test_out_that_is_a_file_is_refused(owned, tmp_path, capsys):
    base, ckpt, _, _ = owned
    out = tmp_path / "merged"
    out.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert merge.main([str(base), str(ckpt), str(out), *extra]) == 2
        _one_error_line(capsys, f"OUT '{out}' is a file")
    assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "merged", "run"]  # no merged.tmp-PID


def test_out_that_is_a_symlink_is_refused(owned, tmp_path, capsys):
    base, ckpt, _, _ = owned
    target = _marked_old_out(tmp_path)
    before = _tree(target)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    assert merge.main([str(base), str(ckpt), str(link), "--overwrite"]) == 2
    _one_error_line(capsys, f"OUT '{link}' is a symbolic link", str(target))
    assert link.is_symlink() and _tree(target) == before


def test_remerge_into_a_marked_folder_replaces_it(owned, tmp_path):
    base, ckpt, _, _ = owned
    out = tmp_path / "merged"
    assert merge.main([str(base), str(ckpt), str(out), "--dtype", "float32"]) == 0
    marker = json.loads((out / merge.MARKER).read_text())
    assert marker["tool"] == "merge_lora.py" and marker["dtype"] == "float32"
    assert marker["base"] == str(base.resolve()) and marker["adapter"] == str(ckpt.resolve()) and marker["time"]
    (out / ".complete").write_text("launcher sentinel")  # written later by the launchers
    assert merge.main([str(base), str(ckpt), str(out)]) == 0  # bf16 this time
    assert not (out / ".complete").exists()  # a fresh folder, not a merge into the old one
    assert json.loads((out / merge.MARKER).read_text())["dtype"] == "bfloat16"
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "merged", "run"]


@pytest.mark.parametrize("content", ["folder", "empty"])
def test_overwrite_replaces_an_unmarked_folder_and_an_empty_one_needs_no_flag(owned, tmp_path, content):
    base, ckpt, _, _ = owned
    out = tmp_path / "merged"
    out.mkdir()
    if content == "folder":
        (out / "old.bin").write_bytes(b"old")
    argv = [str(base), str(ckpt), str(out)] + (["--overwrite"] if content == "folder" else [])
    assert merge.main(argv) == 0
    assert not (out / "old.bin").exists() and merge.is_merge_output(out) and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "merged", "run"]


def _marked_old_out(tmp_path: Path) -> Path:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous merge")
    (out / merge.MARKER).write_text(json.dumps({"tool": "merge_lora.py"}))
    return out


def test_a_failed_save_during_a_replacement_keeps_the_old_out(owned, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    base, ckpt, _, _ = owned
    out = _marked_old_out(tmp_path)
    before = _tree(out)

    def full_disk(self, save_directory, **kwargs):
        Path(save_directory).mkdir(parents=True)
        (Path(save_directory) / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        merge.merge_lora(str(base), str(ckpt), out)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "merged", "run"]


def test_a_failed_rename_during_a_replacement_restores_the_old_out(owned, tmp_path, monkeypatch):
    base, ckpt, _, _ = owned
    out = _marked_old_out(tmp_path)
    before = _tree(out)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if ".tmp-" in Path(src).name:  # the new folder cannot be moved in
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        merge.merge_lora(str(base), str(ckpt), out)
    pid = os.getpid()
    assert calls == [
        ("merged", f"merged.old-{pid}"),
        (f"merged.tmp-{pid}", "merged"),
        (f"merged.old-{pid}", "merged"),
    ]
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "merged", "run"]


def _with_recorded_base(ckpt: Path, recorded: str) -> Path:
    config_file = ckpt / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = recorded
    config_file.write_text(json.dumps(config))
    return ckpt


def test_base_mismatch_warns_once_and_merges(owned, tmp_path, caplog):
    base, ckpt, _, _ = owned
    _with_recorded_base(ckpt, "some-org/another-model")
    with caplog.at_level("WARNING", logger="merge_lora"):
        assert merge.main([str(base), str(ckpt), str(tmp_path / "merged")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "was trained on 'some-org/another-model'" in warnings[0]
    assert f"not BASE '{base}'" in warnings[0] and "--strict_base" in warnings[0]
    assert merge.is_merge_output(tmp_path / "merged")


def test_matching_base_does_not_warn(owned, tmp_path, caplog):
    base, ckpt, _, _ = owned
    _with_recorded_base(ckpt, str(base))
    with caplog.at_level("WARNING", logger="merge_lora"):
        assert merge.main([str(base), str(ckpt), str(tmp_path / "merged"), "--strict_base"]) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_strict_base_refuses_a_mismatch(owned, tmp_path, capsys):
    base, ckpt, _, _ = owned
    _with_recorded_base(ckpt, "some-org/another-model")
    assert merge.main([str(base), str(ckpt), str(tmp_path / "merged"), "--strict_base"]) == 2
    _one_error_line(capsys, "was trained on 'some-org/another-model'", "drop --strict_base")
    assert not (tmp_path / "merged").exists()


def test_same_base_rule(tmp_path, monkeypatch):
    """The documented rule, case by case, against the expected answer written out by hand."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "Qwen3-4B").mkdir(parents=True)
    (tmp_path / "other" / "Qwen3-4B").mkdir(parents=True)
    snap = tmp_path / "hub" / "models--Qwen--Qwen3-4B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    snap2 = tmp_path / "hub2" / "models--Qwen--Qwen3-4B" / "snapshots" / "def456"
    snap2.mkdir(parents=True)
    local, copy = str(tmp_path / "models" / "Qwen3-4B"), str(tmp_path / "other" / "Qwen3-4B")
    cases = [
        (local, "models/Qwen3-4B", True),  # resolved local paths
        (local, "./models/../models/Qwen3-4B", True),
        (local, copy, False),  # two different folders: no basename fallback
        ("Qwen/Qwen3-4B", "Qwen/Qwen3-4B", True),  # Hub ids
        ("Qwen/Qwen3-4B", "qwen/qwen3-4b", True),
        ("Qwen/Qwen3-4B", "unsloth/Qwen3-4B", False),
        ("Qwen/Qwen3-4B", "Qwen/Qwen3-8B", False),
        ("Qwen/Qwen3-4B", str(snap), True),  # a cache snapshot is its Hub id
        (str(snap2), str(snap), True),
        ("unsloth/Qwen3-4B", str(snap), False),
        ("Qwen/Qwen3-4B", local, True),  # last resort: the last name component
        ("/cluster/models/Qwen3-4B", local, True),  # a path recorded on another machine
        ("/cluster/models/Qwen3-8B", local, False),
        ("/cluster/models/Qwen3-4B", "Qwen/Qwen3-4B", True),
    ]
    for recorded, base, expected in cases:
        assert merge.same_base(recorded, base) is expected, (recorded, base)


@pytest.mark.parametrize("kind", ["folder", "config_without_model_type", "missing_path"])
def test_base_that_is_not_a_model(owned, tmp_path, capsys, kind):
    _, ckpt, _, _ = owned
    notes = tmp_path / "notes"
    if kind != "missing_path":
        notes.mkdir()
        (notes / "readme.txt").write_text("not a model")
    if kind == "config_without_model_type":
        (notes / "config.json").write_text("{}")
    before = _tree(notes) if notes.exists() else None
    assert merge.main([str(notes), str(ckpt), str(tmp_path / "merged")]) == 2
    needle = {"folder": "config.json", "config_without_model_type": "model_type", "missing_path": "no such folder"}[
        kind
    ]
    _one_error_line(capsys, f"cannot load BASE '{notes}': ", needle, "pass a model folder")
    assert not (tmp_path / "merged").exists() and (before is None or _tree(notes) == before)


@pytest.mark.parametrize("dtype", ["int8", "float7", "bool"])
def test_non_float_dtype_is_refused(owned, tmp_path, capsys, dtype):
    base, ckpt, _, _ = owned
    assert merge.main([str(base), str(ckpt), str(tmp_path / "merged"), "--dtype", dtype]) == 2
    _one_error_line(capsys, f"--dtype '{dtype}' is not a merge dtype", "bfloat16, float16, float32")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("file", "is a file, not an adapter folder"),
        ("no_config", "has no adapter_config.json"),
        ("not_json", "adapter_config.json is not valid JSON"),
        ("no_peft_type", "is not a PEFT adapter"),
        ("no_weights", "has no adapter weights"),
    ],
)
def test_adapter_that_is_not_an_adapter(owned, tmp_path, capsys, broken, message):
    base, ckpt, _, _ = owned
    if broken == "file":
        bad = ckpt / "adapter_model.safetensors"
    else:
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "weights.bin").write_bytes(b"x")
        if broken == "not_json":
            (bad / "adapter_config.json").write_text("{not json")
        elif broken == "no_peft_type":
            (bad / "adapter_config.json").write_text(json.dumps({"r": 4}))
            (bad / "adapter_model.safetensors").write_bytes((ckpt / "adapter_model.safetensors").read_bytes())
        elif broken == "no_weights":
            (bad / "adapter_config.json").write_text((ckpt / "adapter_config.json").read_text())
    assert merge.main([str(base), str(bad), str(tmp_path / "merged")]) == 2
    _one_error_line(capsys, f"ADAPTER '{bad}' {message}" if broken != "not_json" else message, "checkpoint-N folder")
    assert not (tmp_path / "merged").exists()


def test_argument_errors_are_one_line(capsys):
    assert merge.main(["only-base"]) == 2
    _one_error_line(capsys, "the following arguments are required", "usage: merge_lora.py BASE ADAPTER OUT")
