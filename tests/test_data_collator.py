"""Self-distillation collator (docs/architecture.md#prompts) and the sequence/label/alignment builder
(docs/architecture.md#distillation-batch).

Expected strings are written out literally from the reference behaviour and the real templates, not produced by the
code under test.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pwopsd.batch import (
    IGNORE_INDEX,
    build_distillation_batch,
    compact_position_ids,
    distillation_batch_from_collated,
    prompt_token_lists,
)
from pwopsd.collator import SelfDistillationDataCollator
from pwopsd.prompts import patch_unclosed_think, student_message, teacher_message, teacher_prompt_text

PROBLEM = "Let x be a real number. Find x."
SOLUTION = "We compute x = 42.\nThe answer is \\boxed{42}."
INSTR = "Please reason step by step, and put your final answer within \\boxed{}."
STUDENT_MSG = f"Problem: {PROBLEM}\n\n{INSTR}"
TEACHER_MSG = (
    f"Problem: {PROBLEM}\n\n"
    "Here is a reference solution to this problem:\n"
    f"=== Reference Solution Begin ===\n{SOLUTION}\n=== Reference Solution End ===\n"
    "\n\nAfter reading the reference solution above, make sure you truly understand the reasoning behind each step — "
    "do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the same final answer "
    "to the problem above. Think step by step, explore different approaches, and don't be afraid to backtrack or "
    "reconsider if something doesn't work out:\n"
    "\n" + INSTR
)
DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
OLMO_SYSTEM = (
    "<|im_start|>system\nYou are OLMo, a helpful function-calling AI assistant built by Ai2. Your date cutoff is "
    "November 2024, and your model weights are available at https://huggingface.co/allenai. You do not currently have "
    "access to any functions. <functions></functions><|im_end|>\n"
)
EXPECTED_STUDENT = {
    "qwen3": f"<|im_start|>user\n{STUDENT_MSG}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "dsr1_llama": f"{DS_BOS}<｜User｜>{STUDENT_MSG}<｜Assistant｜><think>\n</think>\n\n",
    "olmo3_think": f"{OLMO_SYSTEM}<|im_start|>user\n{STUDENT_MSG}<|im_end|>\n<|im_start|>assistant\n<think></think>\n\n",
}
EXPECTED_TEACHER = {
    "qwen3": f"<|im_start|>user\n{TEACHER_MSG}<|im_end|>\n<|im_start|>assistant\n",
    "dsr1_llama": f"{DS_BOS}<｜User｜>{TEACHER_MSG}<｜Assistant｜><think>\n",
    "olmo3_think": f"{OLMO_SYSTEM}<|im_start|>user\n{TEACHER_MSG}<|im_end|>\n<|im_start|>assistant\n<think>",
}
ARCHS = ("qwen3", "dsr1_llama", "olmo3_think")


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir):
    return {arch: AutoTokenizer.from_pretrained(tiny_model_dir(arch)) for arch in ARCHS}


def test_messages_are_the_spec_strings():
    assert student_message(PROBLEM) == STUDENT_MSG
    assert teacher_message(PROBLEM, SOLUTION) == TEACHER_MSG
    # three newlines after the End marker, two between "work out:" and "Please"
    assert "=== Reference Solution End ===\n\n\nAfter" in TEACHER_MSG
    assert "work out:\n\nPlease" in teacher_message(PROBLEM, SOLUTION)


@pytest.mark.parametrize(
    ("text", "patched"),
    [
        ("a<think>", True),
        ("a<think>\n", True),
        ("a<think >\n \n", True),
        ("a<think>\n\n</think>\n\n", False),
        ("a<thinking>", False),
        ("a<think>x", False),
        ("", False),
    ],
)
def test_think_patch_only_for_unclosed_trailing_think(text, patched):
    assert patch_unclosed_think(text) == (text + "</think>\n\n" if patched else text)


@pytest.mark.parametrize("arch", ARCHS)
def test_student_and_teacher_prompts_exactly_as_spec(tokenizers, arch):
    collator = SelfDistillationDataCollator(tokenizers[arch], max_length=20000)
    students, teachers = collator.prompt_texts([{"problem": PROBLEM, "solution": SOLUTION}])
    assert students == [EXPECTED_STUDENT[arch]]
    assert teachers == [EXPECTED_TEACHER[arch]]  # the teacher gets no patch: DSR1/Olmo keep an open <think>


def test_opt_in_teacher_think_modes(tokenizers):
    tok = tokenizers["dsr1_llama"]
    matched = teacher_prompt_text(tok, PROBLEM, SOLUTION, think_mode="match_student")
    assert matched == f"{DS_BOS}<｜User｜>{TEACHER_MSG}<｜Assistant｜><think>\n</think>\n\n"
    assert teacher_prompt_text(tok, PROBLEM, SOLUTION, think_mode="open_think") == EXPECTED_TEACHER["dsr1_llama"]
    qwen = tokenizers["qwen3"]
    assert teacher_prompt_text(qwen, PROBLEM, SOLUTION, think_mode="open_think") == (
        EXPECTED_TEACHER["qwen3"] + "<think>\n"
    )
    assert teacher_prompt_text(qwen, PROBLEM, SOLUTION, think_mode="match_student") == (
        f"<|im_start|>user\n{TEACHER_MSG}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenization_right_padding_and_lengths(tokenizers, arch):
    tok = tokenizers[arch]
    tok.padding_side = "left"  # the entry point creates it left-padded; the collator switches the shared tokenizer
    collator = SelfDistillationDataCollator(tok, max_length=20000)
    assert tok.padding_side == "right"
    rows = [{"problem": "1+1?", "solution": "2"}, {"problem": PROBLEM * 3, "solution": SOLUTION * 2}]
    batch = collator(rows)
    assert "labels" not in batch
    students, teachers = collator.prompt_texts(rows)
    for role, texts in (("student", students), ("teacher", teachers)):
        ids, mask = batch[f"{role}_prompts"], batch[f"{role}_prompt_attention_mask"]
        lengths = batch[f"{role}_prompt_lengths_per_example"]
        expected = [tok(t)["input_ids"] for t in texts]  # add_special_tokens=True, unpadded
        assert lengths.tolist() == [len(e) for e in expected]
        assert batch[f"{role}_prompt_length"] == ids.size(1) == max(len(e) for e in expected)
        for i, e in enumerate(expected):
            assert ids[i, : len(e)].tolist() == e
            assert (ids[i, len(e) :] == tok.pad_token_id).all()  # right padding
            assert mask[i].tolist() == [1] * len(e) + [0] * (ids.size(1) - len(e))
    if arch == "dsr1_llama":  # template writes BOS and the tokenizer adds one: the reference's double BOS
        assert batch["student_prompts"][0, :2].tolist() == [tok.bos_token_id] * 2


def test_truncation_to_max_length(tokenizers):
    tok = tokenizers["qwen3"]
    collator = SelfDistillationDataCollator(tok, max_length=16)
    batch = collator([{"problem": PROBLEM, "solution": SOLUTION}])
    assert batch["student_prompt_length"] == batch["teacher_prompt_length"] == 16
    assert batch["student_prompts"].shape == (1, 16)


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncated_ragged_batch_equals_the_reference_two_pass_tokenization(tokenizers, side):
    # the reference: unpadded + truncated for the lengths, then padded to their maximum
    tok = tokenizers["qwen3"]
    rows = [{"problem": "1+1?", "solution": "2"}, {"problem": PROBLEM * 3, "solution": SOLUTION * 2}]
    students, _ = SelfDistillationDataCollator(tok, max_length=None).prompt_texts(rows)
    limit = len(tok(students[0])["input_ids"]) + 5  # the short prompt fits, the long one is cut
    collator = SelfDistillationDataCollator(tok, max_length=limit, padding_side=side)
    batch = collator(rows)
    for role, texts in zip(("student", "teacher"), collator.prompt_texts(rows)):
        expected = [tok(t, truncation=True, max_length=limit)["input_ids"] for t in texts]
        width = max(len(e) for e in expected)
        assert batch[f"{role}_prompt_length"] == width and batch[f"{role}_prompts"].shape == (2, width)
        assert batch[f"{role}_prompt_lengths_per_example"].tolist() == [len(e) for e in expected]
        for i, e in enumerate(expected):
            pad = [tok.pad_token_id] * (width - len(e))
            ones, zeros = [1] * len(e), [0] * len(pad)
            assert batch[f"{role}_prompts"][i].tolist() == (e + pad if side == "right" else pad + e)
            assert batch[f"{role}_prompt_attention_mask"][i].tolist() == (
                ones + zeros if side == "right" else zeros + ones
            )
    assert batch["student_prompt_lengths_per_example"].tolist()[1] == limit


def test_prompts_cut_to_max_length_are_reported_once_with_count_and_longest(tokenizers, caplog):
    """Truncation is kept (the reference's), but no longer silent: one warning with the rows cut and the longest."""
    tok = tokenizers["qwen3"]
    rows = [
        {"problem": "1+1?", "solution": "2"},
        {"problem": PROBLEM * 4, "solution": SOLUTION},  # student and teacher prompts both too long
        {"problem": "2+2?", "solution": SOLUTION * 6},  # only the teacher prompt too long
    ]
    students, teachers = SelfDistillationDataCollator(tok, max_length=None).prompt_texts(rows)
    full = [max(len(tok(s)["input_ids"]), len(tok(t)["input_ids"])) for s, t in zip(students, teachers)]
    limit = len(tok(teachers[0])["input_ids"]) + 1  # row 0 fits whole, rows 1 and 2 do not
    naive_cut = [n for n in full if n > limit]
    assert len(naive_cut) == 2
    collator = SelfDistillationDataCollator(tok, max_length=limit)
    with caplog.at_level("WARNING", logger="pwopsd.collator"):
        batch = collator(rows)
        collator(rows[:2])
    (record,) = [r for r in caplog.records if r.name == "pwopsd.collator"]  # once, not per batch
    assert record.getMessage().startswith(
        f"2 of 3 prompt rows in this batch are longer than --max_length {limit} and are cut to it (longest: "
        f"{max(naive_cut)} tokens)"
    )
    assert (collator.truncated_rows, collator.longest_prompt) == (2, max(naive_cut))  # distinct rows, not batches
    for role, texts in (("student", students), ("teacher", teachers)):  # the cut itself is unchanged
        expected = [tok(t, truncation=True, max_length=limit)["input_ids"] for t in texts]
        assert batch[f"{role}_prompt_lengths_per_example"].tolist() == [len(e) for e in expected]
    quiet = SelfDistillationDataCollator(tok, max_length=max(full))  # a prompt of exactly max_length is not cut
    quiet(rows)
    assert quiet.truncated_rows == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_rollout_prompts_round_trip_through_text(tokenizers, arch):
    """Rollout prompts (docs/architecture.md#rollout): decode with special tokens, strip pad strings, re-tokenize
    without special tokens -> the same ids the rollout engine receives (the template is kept)."""
    tok = tokenizers[arch]
    collator = SelfDistillationDataCollator(tok, max_length=20000)
    batch = collator([{"problem": "1+1?", "solution": "2"}, {"problem": PROBLEM, "solution": SOLUTION}])
    rollout = prompt_token_lists(batch["student_prompts"], batch["student_prompt_attention_mask"])
    for i, text in enumerate(tok.batch_decode(batch["student_prompts"], skip_special_tokens=False)):
        text = text.replace(tok.pad_token, "")
        assert tok(text, add_special_tokens=False)["input_ids"] == rollout[i]
        assert "Problem:" in text and text.endswith("</think>\n\n")


def test_reason_first_is_not_implemented(tokenizers):
    with pytest.raises(NotImplementedError, match="reason_first"):
        SelfDistillationDataCollator(tokenizers["qwen3"], reason_first=True)


# ---------------------------------------------------------------------------------------------------------------------
# Sequences, labels and alignment (docs/architecture.md#distillation-batch)
# ---------------------------------------------------------------------------------------------------------------------
PAD = 0


def _ragged_batch(padding_side="right"):
    """Two rows with different student and teacher prompt lengths, ids >= 5 (pad 0, eos 1)."""
    s_rows, t_rows = [[5, 6, 7, 8, 9], [10, 11]], [[20, 21, 22], [23, 24, 25, 26, 27, 28]]

    def pad(rows):
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), PAD)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if padding_side == "right" else slice(width - len(r), width)
            ids[i, sl], mask[i, sl] = torch.tensor(r), 1
        return ids, mask, torch.tensor(list(map(len, rows)))

    return (*pad(s_rows), *pad(t_rows))


def naive_reference_labels(student_ids: torch.Tensor, prompt_lengths: list[int]) -> torch.Tensor:
    """The reference labels (each row's prompt and every pad id masked), written as a loop."""
    labels = student_ids.clone()
    for i in range(labels.size(0)):
        for j in range(labels.size(1)):
            if j < prompt_lengths[i] or student_ids[i, j] == PAD:
                labels[i, j] = IGNORE_INDEX
    return labels


def test_reference_sequences_labels_and_alignment():
    s_ids, s_mask, s_len, t_ids, t_mask, _ = _ragged_batch()
    completions = [[30, 31, 1], [32, 33, 34, 35, 36, 37]]  # row 0 stopped (eos 1), row 1 truncated at T = 6
    T = 6
    out = build_distillation_batch(
        student_prompts=s_ids,
        student_prompt_attention_mask=s_mask,
        student_prompt_lengths=s_len,
        teacher_prompts=t_ids,
        teacher_prompt_attention_mask=t_mask,
        completions=completions,
        max_completion_length=T,
        pad_token_id=PAD,
    )
    p_s, p_t = s_ids.size(1), t_ids.size(1)
    assert out["completion_ids"].tolist() == [[30, 31, 1, PAD, PAD, PAD], [32, 33, 34, 35, 36, 37]]
    assert out["student_input_ids"].shape == (2, p_s + T) and out["teacher_input_ids"].shape == (2, p_t + T)
    assert out["student_input_ids"][1].tolist() == [10, 11, PAD, PAD, PAD, 32, 33, 34, 35, 36, 37]
    assert out["student_attention_mask"].tolist() == (out["student_input_ids"] != PAD).long().tolist()
    assert out["teacher_attention_mask"].tolist() == (out["teacher_input_ids"] != PAD).long().tolist()
    assert out["student_position_ids"] is None and out["teacher_position_ids"] is None  # arange (reference quirk)
    assert torch.equal(out["labels"], naive_reference_labels(out["student_input_ids"], [5, 2]))
    assert out["loss_mask"].tolist() == [[True, True, True, False, False, False], [True] * 6]
    # position t of logits[:, P-1:-1] predicts the token at P+t, in both sequences: the same completion token
    for i in range(2):
        for t in range(T):
            if out["loss_mask"][i, t]:
                assert out["student_input_ids"][i, p_s - 1 + t + 1] == out["completion_ids"][i, t]
                assert out["teacher_input_ids"][i, p_t - 1 + t + 1] == out["completion_ids"][i, t]
                assert out["labels"][i, p_s + t] == out["completion_ids"][i, t]


def test_pad_equals_eos_masks_the_stop_token_unless_length_mode():
    s_ids, s_mask, s_len, t_ids, t_mask, _ = _ragged_batch()
    completions = [[30, PAD], [31, 32, 33]]  # pad == eos: row 0 sampled the stop token (id 0)
    kwargs = dict(
        student_prompts=s_ids,
        student_prompt_attention_mask=s_mask,
        student_prompt_lengths=s_len,
        teacher_prompts=t_ids,
        teacher_prompt_attention_mask=t_mask,
        completions=completions,
        max_completion_length=4,
        pad_token_id=PAD,
    )
    ref = build_distillation_batch(**kwargs)
    assert ref["loss_mask"].tolist() == [[True, False, False, False], [True, True, True, False]]
    fixed = build_distillation_batch(**kwargs, eos_mask="length")
    assert fixed["loss_mask"].tolist() == [[True, True, False, False], [True, True, True, False]]
    p_s = s_ids.size(1)
    assert fixed["student_attention_mask"][0, p_s : p_s + 2].tolist() == [1, 1]  # the stop token is attended
    assert fixed["student_attention_mask"][:, :p_s].tolist() == s_mask.tolist()


def test_left_padding_gives_compact_positions_and_same_alignment():
    s_ids, s_mask, s_len, t_ids, t_mask, _ = _ragged_batch("left")
    out = build_distillation_batch(
        student_prompts=s_ids,
        student_prompt_attention_mask=s_mask,
        student_prompt_lengths=s_len,
        teacher_prompts=t_ids,
        teacher_prompt_attention_mask=t_mask,
        completions=[[30, 31], [32]],
        max_completion_length=3,
        pad_token_id=PAD,
        prompt_padding="left",
    )
    assert out["student_input_ids"][1].tolist() == [PAD, PAD, PAD, 10, 11, 32, PAD, PAD]
    assert out["student_position_ids"][1].tolist()[3:6] == [0, 1, 2]
    assert out["student_position_ids"][0].tolist()[:7] == [0, 1, 2, 3, 4, 5, 6]
    assert out["loss_mask"].tolist() == [[True, True, False], [True, False, False]]
    assert (out["labels"][:, : s_ids.size(1)] == IGNORE_INDEX).all()
    assert compact_position_ids(torch.tensor([[0, 0, 1, 1, 0, 1]])).tolist() == [[0, 0, 0, 1, 1, 2]]


def test_left_padding_logits_equal_unpadded_forward(tiny_model_dir):
    """The opt-in left-padded mode reproduces each row's unpadded forward; the reference right padding does not for
    the shorter prompt (its first completion logit sits on a pad position)."""
    path = tiny_model_dir("qwen3")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = [{"problem": "1+1?", "solution": "2"}, {"problem": PROBLEM * 2, "solution": SOLUTION}]
    completions = [[100, 101, 102], [103, 104, 105]]
    results = {}
    for side in ("left", "right"):
        batch = SelfDistillationDataCollator(tok, padding_side=side)(rows)
        out = distillation_batch_from_collated(
            batch, completions, max_completion_length=3, pad_token_id=tok.pad_token_id, prompt_padding=side
        )
        kwargs = {"input_ids": out["student_input_ids"], "attention_mask": out["student_attention_mask"]}
        if out["student_position_ids"] is not None:
            kwargs["position_ids"] = out["student_position_ids"]
        with torch.no_grad():
            logits = model(**kwargs).logits
        p_s = batch["student_prompt_length"]
        results[side] = (logits[:, p_s - 1 : -1], batch)
    for i in range(2):
        batch = results["left"][1]
        prompt = prompt_token_lists(batch["student_prompts"], batch["student_prompt_attention_mask"])[i]
        ids = torch.tensor([prompt + completions[i]])
        with torch.no_grad():
            single = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        torch.testing.assert_close(results["left"][0][i], single, atol=1e-5, rtol=1e-4)
        if i == 0:  # the shorter prompt: the reference right padding shifts its positions (the quirk)
            assert (results["right"][0][i] - single).abs().max() > 1e-3
        else:
            torch.testing.assert_close(results["right"][0][i], single, atol=1e-5, rtol=1e-4)
