"""Merge a LoRA adapter into its base model (SPEC §6).

    python code/merge_lora.py BASE ADAPTER OUT [--dtype bfloat16]

1. load BASE with AutoModelForCausalLM in bf16 on CPU; 2. `PeftModel.from_pretrained(ADAPTER)` then
`merge_and_unload()`; 3. save to OUT with `save_pretrained(safe_serialization=True)` (default sharding); 4. save the
*base* tokenizer to OUT. No dtype or config editing. The folder is written next to OUT and renamed into place, so an
interrupted merge never leaves a half-written OUT. `--dtype` (default bfloat16, the reference) exists for exact
checks in float32.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from ea_opsd_train import first_line

logger = logging.getLogger("merge_lora")


class MergeError(Exception):
    """Bad input: reported as one line, no traceback."""


def merge_lora(base: str, adapter: str, out: str | Path, dtype: str = "bfloat16") -> Path:
    """Merge `adapter` into `base` and write the merged model plus the base tokenizer to `out`; returns `out`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_path = Path(adapter)
    if not (adapter_path / "adapter_config.json").is_file():
        raise MergeError(f"ADAPTER '{adapter}' has no adapter_config.json: pass a checkpoint-N folder of a LoRA run")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise MergeError(f"--dtype {dtype!r} is not a torch dtype: use bfloat16, float16 or float32")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, device_map="cpu")
        tokenizer = AutoTokenizer.from_pretrained(base)
    except OSError as err:
        raise MergeError(f"cannot load BASE '{base}': {first_line(err)}") from None
    try:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as err:
        raise MergeError(
            f"cannot apply ADAPTER '{adapter}' to BASE '{base}': {first_line(err)}"
        ) from None

    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    except BaseException:  # e.g. a full disk or Ctrl-C: no multi-GB half-written folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("merged %s + %s -> %s (%s)", base, adapter, out, dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model (SPEC §6).")
    parser.add_argument("base", help="base model folder or Hub id")
    parser.add_argument("adapter", help="adapter folder (e.g. outputs/NAME/checkpoint-100)")
    parser.add_argument("out", help="output folder for the merged model")
    parser.add_argument("--dtype", default="bfloat16", help="load/merge dtype (reference: bfloat16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[merge_lora] %(message)s")
    try:
        merge_lora(args.base, args.adapter, args.out, args.dtype)
    except MergeError as err:
        print(f"merge_lora.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
