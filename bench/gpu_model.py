"""A randomly initialised Qwen3 model with Qwen3-4B's exact dimensions (or a tiny one for a CPU dry run), with the
project's offline Qwen3 tokenizer (real chat template), saved with `save_pretrained`: a stand-in for Qwen/Qwen3-4B
where nothing can be downloaded. Time and memory of a 4B model do not depend on its weights' values.

    python bench/gpu_model.py --out DIR [--size full|small]

`full` is Qwen/Qwen3-4B's config.json (hidden 2560, intermediate 9728, 36 layers, 32 heads, 8 KV heads, head_dim 128,
vocab 151,936, tied embeddings, RoPE θ 1e6), built directly on the GPU in bfloat16 (float32 without CUDA). `small`
keeps the architecture at a size a CPU trains in seconds. The tokenizer has about 1,000 tokens, so ids beyond it
decode to nothing: generated texts are short, token counts must come from ids, not from re-tokenised text.

A folder that already holds a model of the same size is reused (re-runs on a warm machine skip the 8 GB write).
The last line printed is one JSON object: parameters, build and save seconds, size on disk (MiB).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pwopsd.io import ArgumentParser, UserError, run_main

DIMS = {
    # Qwen/Qwen3-4B config.json
    "full": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=151_936),
    # same architecture, CPU-sized; vocab above the tokenizer's, as in the full model
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=2048),
}  # fmt: skip


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def existing_matches(out: Path, size: str) -> bool:
    """True when `out` already holds a complete model of these dimensions (config, weights and tokenizer)."""
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    same = all(config.get(k) == v for k, v in DIMS[size].items())
    return same and (out / "tokenizer.json").is_file() and any(out.glob("*.safetensors"))


def build(out: Path, size: str) -> dict:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from pwopsd.io import atomic_write_dir
    from pwopsd.models import TOKENIZER_FAMILIES, build_tokenizer

    cuda = torch.cuda.is_available()
    figures = {"size": size, "model_dir": str(out), "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if existing_matches(out, size):
        return {**figures, "reused": True, "disk_mb": round(folder_bytes(out) / 2**20, 1)}

    start = time.perf_counter()
    tokenizer = build_tokenizer("qwen3")
    spec = TOKENIZER_FAMILIES["qwen3"]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (spec.eos, spec.pad, *spec.generation_eos)}
    dtype = torch.bfloat16 if cuda else torch.float32
    config = Qwen3Config(
        **DIMS[size],
        tie_word_embeddings=True,
        max_position_embeddings=40960,
        rope_theta=1_000_000,
        rms_norm_eps=1e-6,
        eos_token_id=ids[spec.eos],
        pad_token_id=ids[spec.pad],
        bos_token_id=ids[spec.pad],
        dtype=dtype,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids[t] for t in spec.generation_eos], pad_token_id=ids[spec.pad]
    )
    if cuda:
        torch.cuda.synchronize()
    built = time.perf_counter()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_dir(out, write)
    saved = time.perf_counter()
    return {
        **figures,
        "reused": False,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "build_s": round(built - start, 2),
        "save_s": round(saved - built, 2),
        "disk_mb": round(folder_bytes(out) / 2**20, 1),
        **DIMS[size],
    }


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        parser = ArgumentParser(description=__doc__.split("\n\n")[0])
        parser.add_argument("--out", required=True, type=Path, help="model folder to write (reused when complete)")
        parser.add_argument("--size", choices=sorted(DIMS), default="full")
        args = parser.parse_args(argv)
        try:
            figures = build(args.out, args.size)
        except OSError as e:
            raise UserError(f"cannot write --out {args.out}: {e.strerror or e}; pass a writable folder") from e
        print(json.dumps(figures), flush=True)
        return 0

    return run_main(run, "gpu_model.py")


if __name__ == "__main__":
    sys.exit(main())
