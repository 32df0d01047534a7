"""pwopsd.io: one-line user errors and atomic writes (a failure never leaves a half-written file or folder)."""

from __future__ import annotations

import json
import os

import pytest

from pwopsd.io import UserError, atomic_write_dir, atomic_write_json, atomic_write_text, first_line, run_main


def test_first_line_and_run_main(capsys):
    assert first_line(ValueError("bad flag\nTraceback ...")) == "bad flag"
    assert first_line(KeyError()) == "KeyError"

    def fails() -> int:
        raise UserError("--x 3 is not valid: use 1 or 2")

    assert run_main(fails, "tool.py") == 2
    assert capsys.readouterr().err == "tool.py: error: --x 3 is not valid: use 1 or 2\n"
    assert run_main(lambda: 0, "tool.py") == 0


def test_atomic_write_json_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "result.json"
    atomic_write_json(path, {"a": 1, "é": [1.5]})
    atomic_write_json(path, {"a": 2})
    assert path.read_text(encoding="utf-8") == '{\n  "a": 2\n}\n'
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["result.json"]


def test_atomic_write_text_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_write_dir_failure_removes_the_temporary_folder(tmp_path):
    out = tmp_path / "merged"
    atomic_write_dir(out, lambda d: (d.mkdir(), (d / "w.bin").write_bytes(b"1")))
    assert (out / "w.bin").read_bytes() == b"1"

    def half_written(d):
        d.mkdir()
        (d / "shard-1").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_dir(out, half_written)
    assert sorted(os.listdir(tmp_path)) == ["merged"] and (out / "w.bin").read_bytes() == b"1"
    atomic_write_dir(out, lambda d: (d.mkdir(), (d / "v2").write_bytes(b"2")))
    assert os.listdir(out) == ["v2"]
