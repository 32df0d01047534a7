"""Checkpoint completeness: which `checkpoint-N` folders a resume may start from, and how a save marks itself done.

A run killed while it writes `checkpoint-N` (pre-emption, OOM, Ctrl-C) leaves a half-written folder. Resuming from it
fails (`Can't find a valid checkpoint`, a missing `trainer_state.json`) or, worse, loads a truncated file. So a save
writes two markers around its files (docs/architecture.md#checkpoints):

1. `.pwopsd_saving` is created in the (fresh) folder before any other file;
2. the Trainer's files (adapter, optimizer, scheduler, RNG state(s), trainer state) and `ema_teacher.pt` are written;
3. after every process has written its files, the main process fsyncs them and writes `.pwopsd_complete` (atomically:
   a temporary file renamed into place), a JSON manifest of every file in the folder with its size; then it removes
   `.pwopsd_saving`.

A marker was chosen over "write to a temporary folder and rename": the Trainer, PEFT and DeepSpeed write into the
`checkpoint-N` path they compute themselves, on every process, so redirecting all of them is invasive; a marker written
last needs no change to them.

A folder is complete when it has `.pwopsd_complete` and every file of the manifest has its recorded size, and the files
the resume reads are there. A folder with `.pwopsd_saving` but no `.pwopsd_complete` was interrupted. A folder with
neither marker was written before markers existed: it counts as complete when every file the resume reads is present
and loads (JSON parses, safetensors header and size agree, torch zip archives pass their CRC check).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pwopsd.io import atomic_write_text

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".pwopsd_complete"
"""Written last by a finished save: a JSON manifest `{"step", "files": {relative path: size in bytes}}`."""
SAVING_MARKER = ".pwopsd_saving"
"""Written first by a save, removed after `COMPLETE_MARKER`: its presence alone means the save was interrupted."""
EMA_FILE = "ema_teacher.pt"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class CheckpointLayout:
    """What a resume of this run reads from a checkpoint folder (so what must be there for it to count as complete)."""

    adapter: bool = True
    """PEFT run: `adapter_config.json` and `adapter_model.safetensors` (or `.bin`) instead of full model weights."""
    ema: bool = False
    """EMA teacher: `ema_teacher.pt`."""
    world_size: int = 1
    """Processes: `rng_state.pth` for one, `rng_state_{i}.pth` for each i otherwise."""
    deepspeed: bool = False
    """DeepSpeed: optimizer (and scheduler) inside the `global_step*` folder named by `latest`, not `optimizer.pt`."""
    full_state: bool = True
    """Optimizer, scheduler and RNG state are saved (False with `--save_only_model`: the weights only)."""


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    match = CHECKPOINT_RE.match(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


# --- what a resume reads ------------------------------------------------------------------------------------------
def _required_files(folder: Path, layout: CheckpointLayout) -> tuple[list[str], list[str]]:
    """(files that must be present, human-readable descriptions of missing alternatives)."""
    required = ["trainer_state.json"]
    missing: list[str] = []
    if layout.adapter:
        required.append("adapter_config.json")
        weights = ("adapter_model.safetensors", "adapter_model.bin")
    else:
        weights = (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    present = [w for w in weights if (folder / w).is_file()]
    if present:
        required.append(present[0])
        if present[0].endswith(".index.json"):
            required += _index_shards(folder / present[0])
    else:
        missing.append(" or ".join(weights))
    if layout.full_state and layout.deepspeed:
        tag_file = folder / "latest"
        required.append("latest")
        if tag_file.is_file():
            tag = tag_file.read_text(encoding="utf-8").strip()
            states = sorted(p.relative_to(folder).as_posix() for p in (folder / tag).glob("*_states.pt"))
            if not any(s.endswith("optim_states.pt") for s in states):
                missing.append(f"{tag}/*optim_states.pt")
            required += states
    elif layout.full_state:
        required += ["optimizer.pt", "scheduler.pt"]
    if layout.full_state and layout.world_size <= 1:
        required.append("rng_state.pth")
    elif layout.full_state:
        required += [f"rng_state_{i}.pth" for i in range(layout.world_size)]
    if layout.ema:
        required.append(EMA_FILE)
    return required, missing


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    except (OSError, ValueError):
        return []  # the load check of the index itself reports it
    return sorted(set(weight_map.values()))


def _load_problem(path: Path) -> str | None:
    """Why `path` does not load (truncated, corrupt), or None. Reads the file, but never unpickles it."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # checks the header against the file size
                list(f.keys())
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as archive:  # torch.save writes a zip archive: CRC of every member
                bad = archive.testzip()
            if bad is not None:
                return f"{path.name} is corrupt ({bad} fails its CRC check)"
        elif path.stat().st_size == 0 and path.name != "latest":
            return f"{path.name} is empty"
    except Exception as err:  # any reader error means the file cannot be resumed from
        reason = str(err).strip().partition("\n")[0] or type(err).__name__
        return f"{path.name} does not load ({reason})"
    return None


def checkpoint_problem(folder: str | os.PathLike, layout: CheckpointLayout, *, deep: bool = True) -> str | None:
    """Why `folder` cannot be resumed from (one short phrase), or None when it is complete.

    With `.pwopsd_complete`: every manifest file has its recorded size and every file the resume reads is listed.
    Without any marker (written before markers existed): every file the resume reads is present and, when `deep`,
    loads.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    marker = folder / COMPLETE_MARKER
    required, missing = _required_files(folder, layout)
    if marker.is_file():
        try:
            files = json.loads(marker.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{COMPLETE_MARKER} is unreadable"
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, the save wrote {size}"
        absent = [name for name in required if name not in files] + missing
        return f"it lacks {', '.join(absent)}" if absent else None
    if (folder / SAVING_MARKER).exists():
        return f"its save was interrupted, {SAVING_MARKER} is there without {COMPLETE_MARKER}"
    absent = [name for name in required if not (folder / name).is_file()]
    problems = [f"it lacks {', '.join(absent + missing)}"] if absent or missing else []
    if deep:
        problems += filter(None, (_load_problem(folder / name) for name in required if name not in absent))
    return "; ".join(problems) or None


def last_complete_checkpoint(
    output_dir: str | os.PathLike, layout: CheckpointLayout
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The complete checkpoint with the highest step, and the (folder, problem) of every newer one skipped."""
    skipped: list[tuple[Path, str]] = []
    for folder in reversed(checkpoint_folders(output_dir)):
        problem = checkpoint_problem(folder, layout)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def describe_skipped(skipped: Iterable[tuple[Path, str]]) -> str:
    return "; ".join(f"{folder.name} ({problem})" for folder, problem in skipped)


# --- writing ------------------------------------------------------------------------------------------------------
def begin_checkpoint(folder: str | os.PathLike) -> None:
    """Start a save: replace a leftover folder of the same step by an empty one holding only `.pwopsd_saving`.

    A leftover is either a half-written save or a checkpoint this run is about to overwrite (it resumed from an older
    one); its complete marker goes first, so that a kill during the deletion cannot leave a marked, partial folder.
    """
    folder = Path(folder)
    if folder.exists():
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with (folder / SAVING_MARKER).open("w", encoding="utf-8") as f:
        f.write("a save is in progress, or was interrupted: this checkpoint is incomplete\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_checkpoint(folder: str | os.PathLike, step: int) -> None:
    """End a save: fsync every file, write the `.pwopsd_complete` manifest atomically, remove `.pwopsd_saving`."""
    folder = Path(folder)
    files: dict[str, int] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in (COMPLETE_MARKER, SAVING_MARKER):
            _fsync(path)
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    for sub in {folder, *(p.parent for p in folder.rglob("*"))}:
        _fsync(sub)  # the directory entries, so the files survive a power loss along with the marker
    atomic_write_text(folder / COMPLETE_MARKER, json.dumps({"step": step, "files": files}, indent=1) + "\n")
    _fsync(folder)
    (folder / SAVING_MARKER).unlink(missing_ok=True)


def rotate_checkpoints(
    run_dir: str | os.PathLike,
    save_total_limit: int | None,
    layout: CheckpointLayout,
    keep: Iterable[str | os.PathLike] = (),
) -> list[Path]:
    """`--save_total_limit`: delete the oldest COMPLETE checkpoints beyond the limit; return what was deleted.

    Unlike transformers' rotation (which runs before the checkpoint it just wrote is complete and counts every
    `checkpoint-*`), an incomplete folder is never counted and never deleted, so the newest complete checkpoint cannot
    be deleted in favour of a half-written one. Age is the time a checkpoint was completed (the marker's mtime, or
    `trainer_state.json`'s for a checkpoint without one), so a run resumed from an older checkpoint rotates away the
    abandoned newer ones first, as transformers does. `keep` (the best checkpoint, the one just written) is never
    deleted.
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    complete = [f for f in checkpoint_folders(run_dir) if checkpoint_problem(f, layout, deep=False) is None]

    def completed_at(folder: Path) -> tuple[float, int]:
        stamp = folder / COMPLETE_MARKER
        stamp = stamp if stamp.is_file() else folder / "trainer_state.json"
        return stamp.stat().st_mtime, checkpoint_step(folder)

    complete.sort(key=completed_at)
    protected = {Path(k).resolve() for k in keep if k}
    if complete:
        protected.add(complete[-1].resolve())
    deleted: list[Path] = []
    remaining = len(complete)
    for folder in complete:
        if remaining <= max(save_total_limit, len(protected)):
            break
        if folder.resolve() not in protected:
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)  # never a marked, half-deleted folder
            shutil.rmtree(folder, ignore_errors=True)
            deleted.append(folder)
            remaining -= 1
    return deleted
