"""What every entry point shares: one-line user errors, atomic writes, and the repository's paths.

Two promises rest on this module. A user mistake (a bad flag, a missing file, a corrupt result) is reported as one line
that names the flag or file and the fix, never as a traceback: raise `UserError` and let `run_main` print it. And a
result is never half-written: files and folders are written under a temporary name next to their destination and
renamed into place, so a kill or a full disk leaves the previous version intact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository root: `outputs/`, `eval_results/` and the bundled `data/` are anchored here (editable install)."""
DATA_DIR = REPO_ROOT / "data"
TEMPLATES_DIR = DATA_DIR / "templates"

DATASET_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""Local data files by suffix -> the `datasets` builder that reads them (training data and benchmark files alike)."""


class UserError(Exception):
    """Bad input: reported as one line, no traceback, exit status 2."""


class OneLineErrors:
    """Mixin for an argparse parser (argparse's own, or transformers' / TRL's subclasses): a parse error (unknown
    flag, bad value, missing argument) raises `UserError(message + help_hint)` instead of printing the usage block and
    exiting, so `run_main` reports it as the same one line as every other user error."""

    help_hint = " (see --help)"

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}{self.help_hint}")


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one `UserError` line (`OneLineErrors`)."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    return str(err).strip().partition("\n")[0] or type(err).__name__


def run_main(run: Callable[[], int], prog: str) -> int:
    """Call `run()`; a `UserError` becomes `"{prog}: error: {message}"` on stderr and exit status 2."""
    try:
        return run()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> None:
    """Write `text` to a temporary file in the same folder, (fsync,) then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented UTF-8 JSON with a final newline, written atomically (fsynced)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_dir(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Fill a fresh `OUT.tmp-PID` folder with `write(tmp)`, then replace `out` with it.

    A failure inside `write` (a full disk, Ctrl-C, a check that `write` makes last) or in the replacement removes the
    temporary folder, so no multi-GB half-written folder is left behind and an existing `out` is untouched; the
    replacement itself is `replace_dir`'s.
    """
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there after a successful rename
    return out


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the complete folder `tmp` to `out`; an existing `out` is renamed aside first and deleted only at the end.

    If renaming `tmp` in fails, the old `out` is renamed back, so at every moment either the old or the new folder is
    complete (a kill between the two renames leaves the old one as `OUT.old-PID`).
    """
    if not out.exists():
        os.rename(tmp, out)
        return
    aside = out.with_name(f"{out.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)

