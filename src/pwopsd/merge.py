"""Merge a LoRA adapter into its base model, as the reference release does.

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
import sys
from pathlib import Path

from pwopsd.io import UserError, atomic_write_dir, first_line, run_main

logger = logging.getLogger("merge_lora")




def merge_lora(base: str, adapter: str, out: str | Path, dtype: str = "bfloat16") -> Path:
    """Merge `adapter` into `base` and write the merged model plus the base tokenizer to `out`; returns `out`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_path = Path(adapter)
    if not (adapter_path / "adapter_config.json").is_file():
        raise UserError(f"ADAPTER '{adapter}' has no adapter_config.json: pass a checkpoint-N folder of a LoRA run")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise UserError(f"--dtype {dtype!r} is not a torch dtype: use bfloat16, float16 or float32")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, device_map="cpu")
        tokenizer = AutoTokenizer.from_pretrained(base)
    except OSError as err:
        raise UserError(f"cannot load BASE '{base}': {first_line(err)}") from None
    try:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(
            f"cannot apply ADAPTER '{adapter}' to BASE '{base}': {first_line(err)}"
        ) from None

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    out = atomic_write_dir(out, write)
    logger.info("merged %s + %s -> %s (%s)", base, adapter, out, dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model.")
    parser.add_argument("base", help="base model folder or Hub id")
    parser.add_argument("adapter", help="adapter folder (e.g. outputs/NAME/checkpoint-100)")
    parser.add_argument("out", help="output folder for the merged model")
    parser.add_argument("--dtype", default="bfloat16", help="load/merge dtype (reference: bfloat16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[merge_lora] %(message)s")

    def run() -> int:
        merge_lora(args.base, args.adapter, args.out, args.dtype)
        return 0

    return run_main(run, "merge_lora.py")


if __name__ == "__main__":
    sys.exit(main())
