"""Merge a LoRA adapter into its base model, as the reference release does.

    python code/merge_lora.py BASE ADAPTER OUT [--dtype bfloat16] [--overwrite] [--strict_base]

1. load BASE with AutoModelForCausalLM in bf16 on CPU; 2. `PeftModel.from_pretrained(ADAPTER)` then
`merge_and_unload()`; 3. save to OUT with `save_pretrained(safe_serialization=True)` (default sharding); 4. save the
*base* tokenizer to OUT. No dtype or config editing. `--dtype` (default bfloat16, the reference) exists for exact
checks in float32.

What the reference did not do, so that a merge can never destroy what the user owns:
- OUT may not be BASE or ADAPTER, lie inside either, or contain either (checked before anything is loaded).
- An existing OUT is replaced only when it is a merged model this tool wrote (it holds the marker file
  `.pwopsd_merged.json`), when it is an empty folder, or with `--overwrite`; a file is never replaced.
- The merge is written to `OUT.tmp-PID` next to OUT; an existing OUT is renamed aside, the new folder renamed in,
  and only then is the old one deleted, so a failure at any point leaves the old OUT (or none) intact.
- The adapter's recorded base (`base_model_name_or_path` in adapter_config.json) is compared with BASE (see
  `same_base`): a mismatch is a warning, or an error with `--strict_base`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pwopsd.io import ArgumentParser, UserError, atomic_write_dir, first_line, run_main

logger = logging.getLogger("merge_lora")

PROG = "merge_lora.py"
MARKER = ".pwopsd_merged.json"
"""Written into every merged folder: proof that OUT is ours to replace on a re-run."""
DTYPES = ("bfloat16", "float16", "float32")
"""Merge dtypes: the model classes refuse integer dtypes, and merging in 8 bits would not be the reference's merge."""
BASE_FIX = "pass a model folder (config.json, tokenizer, weights) or a Hub id"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ---------------------------------------------------------------------------------------------------------------------
# Checks done before anything is loaded (loading an 8B base takes minutes)
# ---------------------------------------------------------------------------------------------------------------------
def read_adapter_config(adapter: str) -> dict[str, Any]:
    """adapter_config.json of the ADAPTER folder; a `UserError` unless it is a PEFT adapter with weights."""
    path = Path(adapter)
    fix = "pass a checkpoint-N folder of a LoRA run (it holds adapter_config.json and adapter_model.safetensors)"
    if path.is_file():
        raise UserError(f"ADAPTER '{adapter}' is a file, not an adapter folder: {fix}")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"ADAPTER '{adapter}' has no adapter_config.json: {fix}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(
            f"ADAPTER '{adapter}': adapter_config.json is not valid JSON ({first_line(err)}): {fix}"
        ) from None
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise UserError(f"ADAPTER '{adapter}' is not a PEFT adapter (adapter_config.json has no peft_type): {fix}")
    if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        raise UserError(f"ADAPTER '{adapter}' has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}): {fix}")
    return config


def _within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def is_merge_output(folder: Path) -> bool:
    """True when `folder` holds the marker this tool writes into every merged model."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("tool") == PROG


def check_out(base: str, adapter: str, out: Path, overwrite: bool) -> None:
    """Refuse an OUT whose replacement would delete BASE, ADAPTER, a file or a folder this tool did not write."""
    target = out.resolve()
    owned = [("ADAPTER", adapter)] + ([("BASE", base)] if Path(base).exists() else [])  # a Hub id has no folder
    for role, name in owned:
        other = Path(name).resolve()
        if _within(target, other) or _within(other, target):
            where = "is" if target == other else ("is inside" if _within(target, other) else "contains")
            raise UserError(
                f"OUT '{out}' {where} {role} '{name}': the merge must neither replace nor write into {role}; "
                "choose an OUT outside BASE and ADAPTER (e.g. outputs/NAME_merged)"
            )
    if out.is_symlink():
        raise UserError(f"OUT '{out}' is a symbolic link: pass the folder it points to ('{target}') instead")
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise UserError(f"OUT '{out}' is a file: choose a folder path for the merged model (it is never replaced)")
    if out.is_dir() and not overwrite and any(out.iterdir()) and not is_merge_output(out):
        raise UserError(
            f"OUT '{out}' exists and was not written by {PROG} (no {MARKER}): choose another OUT or pass --overwrite"
        )
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create OUT '{out}': '{parent}' is not a writable folder; choose another OUT")


def _identity(name: str) -> tuple[Path | None, str | None, str]:
    """(resolved local folder or None, Hub id or None, last name component casefolded) of a model name."""
    path = Path(name).expanduser()
    local = path.resolve() if path.exists() else None
    hub = None
    for part in (local or path).parts:  # a Hugging Face cache snapshot: .../models--ORG--NAME/snapshots/HASH
        if part.startswith("models--"):
            hub = part.removeprefix("models--").replace("--", "/")
    if hub is None and local is None and _HUB_ID.fullmatch(name):
        hub = name
    leaf = hub.rsplit("/", 1)[-1] if hub else (local or path).name
    return local, hub, leaf.casefold()


def same_base(recorded: str, base: str) -> bool:
    """Whether the adapter's recorded base names BASE.

    The rule, strongest evidence first: two existing local folders are the same when their resolved paths are (or when
    both are Hugging Face cache snapshots of the same Hub id); two Hub ids (a cache snapshot counts as its id) are the
    same when equal ignoring case; otherwise (a Hub id against a local folder, or a path recorded on another machine)
    the last name components are compared ignoring case (`Qwen/Qwen3-4B` matches `/models/Qwen3-4B`).
    """
    r_local, r_hub, r_leaf = _identity(recorded)
    b_local, b_hub, b_leaf = _identity(base)
    if r_local and b_local:
        return r_local == b_local or (r_hub is not None and r_hub.casefold() == (b_hub or "").casefold())
    if r_hub and b_hub:
        return r_hub.casefold() == b_hub.casefold()
    return r_leaf == b_leaf


def check_base(base: str, adapter: str, adapter_config: dict[str, Any], strict: bool) -> None:
    """Warn (or, `strict`, refuse) when the adapter records a different base model than BASE."""
    recorded = adapter_config.get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded or same_base(recorded, base):
        return
    what = f"ADAPTER '{adapter}' was trained on '{recorded}' (adapter_config.json base_model_name_or_path), not BASE '{base}'"
    if strict:
        raise UserError(f"{what}: pass the base it was trained on, or drop --strict_base to merge anyway")
    logger.warning("warning: %s; merging anyway (--strict_base refuses)", what)


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------
def _marker(base: str, adapter: str, dtype: str) -> str:
    from pwopsd import __version__

    base_path = Path(base)
    marker = {
        "tool": PROG,
        "pwopsd_version": __version__,
        "base": str(base_path.resolve()) if base_path.exists() else base,
        "adapter": str(Path(adapter).resolve()),
        "dtype": dtype,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return json.dumps(marker, indent=2) + "\n"


def merge_lora(
    base: str,
    adapter: str,
    out: str | Path,
    dtype: str = "bfloat16",
    *,
    overwrite: bool = False,
    strict_base: bool = False,
) -> Path:
    """Merge `adapter` into `base` and write the merged model plus the base tokenizer to `out`; returns `out`."""
    out = Path(out)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not a merge dtype: use {', '.join(DTYPES)} (bfloat16 is the reference)")
    adapter_config = read_adapter_config(adapter)
    if not Path(base).exists() and (base.startswith(("/", "~", ".")) or base.count("/") > 1):  # a path, no Hub id
        raise UserError(f"cannot load BASE '{base}': no such folder; {BASE_FIX}")
    check_out(base, adapter, out, overwrite)

    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        AutoConfig.from_pretrained(base)  # seconds, where a bad BASE would otherwise fail after loading weights
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot load BASE '{base}': {first_line(err).rstrip('.')}; {BASE_FIX}") from None
    check_base(base, adapter, adapter_config, strict_base)
    try:
        # On the CPU by design: merging is a one-off weight sum that needs no accelerator, fits any machine that can
        # hold the model in RAM, and saves from host memory; the merged folder carries no device.
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), device_map="cpu")
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot load BASE '{base}' as a causal LM: {first_line(err)}") from None
    try:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"cannot apply ADAPTER '{adapter}' to BASE '{base}': {first_line(err)}") from None

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(_marker(base, adapter, dtype), encoding="utf-8")
        check_out(base, adapter, out, overwrite)  # again: OUT may have appeared during the merge

    atomic_write_dir(out, write)
    logger.info("merged %s + %s -> %s (%s)", base, adapter, out, dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    class _Parser(ArgumentParser):
        """One-line errors that end with the short usage (three positional arguments are easy to misorder)."""

        help_hint = f" (usage: {PROG} BASE ADAPTER OUT [--dtype bfloat16] [--overwrite] [--strict_base])"

    parser = _Parser(prog=PROG, description="Merge a LoRA adapter into its base model.")
    parser.add_argument("base", help="base model folder or Hub id")
    parser.add_argument("adapter", help="adapter folder (e.g. outputs/NAME/checkpoint-100)")
    parser.add_argument("out", help="output folder for the merged model")
    parser.add_argument(
        "--dtype", default="bfloat16", help=f"load/merge dtype: {', '.join(DTYPES)} (reference: bfloat16)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace an existing OUT even without the {MARKER} marker"
    )
    parser.add_argument(
        "--strict_base",
        action="store_true",
        help="refuse when adapter_config.json records a different base model than BASE (default: warn)",
    )

    def run() -> int:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="[merge_lora] %(message)s")
        merge_lora(
            args.base, args.adapter, args.out, args.dtype, overwrite=args.overwrite, strict_base=args.strict_base
        )
        return 0

    return run_main(run, PROG)


if __name__ == "__main__":
    sys.exit(main())
