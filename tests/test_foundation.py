"""Foundation: bundled data files, tiny offline models, and the real chat templates rendering as the real models do."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from conftest import DATA_DIR, read_data
from transformers import AutoModelForCausalLM, AutoTokenizer

from pwopsd import models

CHAT = [{"role": "user", "content": "What is 2+2?"}]
OLMO_SYSTEM = (
    "<|im_start|>system\nYou are OLMo, a helpful function-calling AI assistant built by Ai2. Your date cutoff is "
    "November 2024, and your model weights are available at https://huggingface.co/allenai. You do not currently have "
    "access to any functions. <functions></functions><|im_end|>\n"
)
# Renders of the real templates for one user message with add_generation_prompt=True (data/templates/SOURCES.md).
EXPECTED = {
    ("qwen3", True): "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    ("qwen3", False): "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ("dsr1_llama", True): "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n",
    ("dsr1_llama", False): "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n",
    ("olmo3_think", True): OLMO_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>",
    ("olmo3_think", False): OLMO_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>",
}
SPECIAL_TOKENS = {  # (bos, eos, pad) as the real tokenizers ship them
    "qwen3": (None, "<|im_end|>", "<|endoftext|>"),
    "dsr1_llama": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "olmo3_think": ("<|endoftext|>", "<|endoftext|>", "<|pad|>"),
}
TINY_ARCHS = ("qwen3", "dsr1_llama", "olmo3_think")



@pytest.mark.parametrize(
    ("name", "count", "id_key"),
    [("math500.jsonl", 500, "id"), ("aime24.jsonl", 30, "id"), ("aime25.jsonl", 30, "problem_idx"),
     ("hmmt25.jsonl", 30, "problem_idx"), ("gsm8k_train.jsonl", 7473, None)],
)
def test_data_files_rows_and_columns(name: str, count: int, id_key: str | None) -> None:
    rows = read_data(name)
    assert len(rows) == count
    if id_key is None:  # training set
        assert all(set(r) == {"problem", "solution"} and r["problem"] and "####" in r["solution"] for r in rows)
        return
    assert all(r["problem"].strip() and str(r["answer"]).strip() for r in rows)
    ids = [r[id_key] for r in rows]
    assert len(set(ids)) == count


def test_data_ids_and_known_answers() -> None:
    math500 = read_data("math500.jsonl")
    assert [r["id"] for r in math500] == list(range(500))
    assert {"solution", "subject", "level", "unique_id"} <= set(math500[0])
    assert math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    aime24 = read_data("aime24.jsonl")
    assert [r["id"] for r in aime24] == list(range(60, 90)) and aime24[7]["answer"] == "025"
    assert [r["problem_idx"] for r in read_data("aime25.jsonl")] == list(range(1, 31))
    hmmt = read_data("hmmt25.jsonl")
    assert hmmt[16]["answer"] == "2^{25} \\cdot 26!"
    table = pq.read_table(DATA_DIR / "hmmt25_clean" / "train.parquet").to_pylist()
    assert table == [{k: r[k] for k in ("problem_idx", "problem", "answer")} for r in hmmt]


def test_data_stays_small() -> None:
    assert sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file()) < 20 * 1024 * 1024


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_loads_offline_and_generates(arch: str, tiny_model_dir) -> None:
    path = tiny_model_dir(arch)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    expected_class = {"qwen3": "Qwen3ForCausalLM", "dsr1_llama": "LlamaForCausalLM", "olmo3_think": "Olmo3ForCausalLM"}
    assert type(model).__name__ == expected_class[arch]
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == SPECIAL_TOKENS[arch]
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    enc = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), return_tensors="pt",
              add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=6, do_sample=True, top_k=20, min_new_tokens=6)
    assert out.shape == (1, enc.input_ids.shape[1] + 6)
    assert torch.equal(out[0, : enc.input_ids.shape[1]], enc.input_ids[0])


@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_template_renders_like_the_real_model(arch: str, enable_thinking: bool, tiny_model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir(arch))
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking)
    assert text == EXPECTED[(arch, enable_thinking)]
    # Special strings are single tokens and round-trip through the tokenizer.
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert (tok.convert_tokens_to_ids("<think>") in ids) == ("<think>" in text)


def test_llama_tokenizer_adds_bos_like_the_real_one(tiny_model_dir) -> None:
    """The DSR1 tokenizer prepends BOS, so a template that already holds BOS gets two, as the real tokenizer does."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("dsr1_llama"))
    ids = tok(EXPECTED[("dsr1_llama", True)]).input_ids
    assert ids[:2] == [tok.bos_token_id, tok.bos_token_id]
    qwen = AutoTokenizer.from_pretrained(tiny_model_dir("qwen3"))
    assert qwen(EXPECTED[("qwen3", True)]).input_ids[0] == qwen.convert_tokens_to_ids("<|im_start|>")


def test_tiny_models_are_seeded(tmp_path) -> None:
    a = models.build("qwen3", tmp_path / "a", seed=3)
    b = models.build("qwen3", tmp_path / "b", seed=3)
    c = models.build("qwen3", tmp_path / "c", seed=4)
    wa, wb, wc = (AutoModelForCausalLM.from_pretrained(p).model.embed_tokens.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert (a / "tokenizer.json").read_text() == (c / "tokenizer.json").read_text()


def test_unknown_arch_is_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown --arch 'gpt2'"):
        models.build("gpt2", tmp_path)


@pytest.mark.slow
def test_smollm2_converts_once_and_answers(smollm2_dir) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert models.is_converted(smollm2_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer briefly."}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is 2+2? Answer briefly.<|im_end|>\n<|im_start|>assistant\n")
    enc = tok(text, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "4" in tok.decode(out[0, enc.input_ids.shape[1]:])
