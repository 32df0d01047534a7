"""The distillation batch: student and teacher sequences, labels and the loss mask, built from prompts and rollouts.

Pure tensor functions with no model and no trainer, so each rule can be tested on hand-written ids. Completions are
right-padded with the pad id to exactly `max_completion_length` and appended to both the student prompt and the
teacher prompt (which holds the reference solution), so the two models read the same completion tokens and position t
of both completion windows predicts completion token t. Labels mask each row's prompt and every pad id, the loss mask
is the completion part of the labels, and right-padded prompts keep transformers' `arange` position ids; these are
the reference's rules, kept by default, and `eos_mask="length"` / `prompt_padding="left"` are the opt-in fixes. See
docs/architecture.md#distillation-batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def prompt_token_lists(prompt_ids: torch.Tensor, prompt_attention_mask: torch.Tensor) -> list[list[int]]:
    """The real (unpadded) prompt tokens of each row, for the rollout engine.

    The engines take Python lists, so the ids come to the CPU here, once per tensor (not once per row)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_attention_mask.cpu())]


def truncate_at_eos(token_ids: Sequence[int], eos_token_ids: Sequence[int], max_len: int) -> list[int]:
    """Keep tokens up to and including the first EOS, at most `max_len` tokens (the engine's `max_tokens`)."""
    out: list[int] = []
    eos = set(eos_token_ids)
    for tok in list(token_ids)[:max_len]:
        out.append(int(tok))
        if tok in eos:
            break
    return out


def pad_completions(
    completions: Sequence[Sequence[int]], max_completion_length: int, pad_token_id: int
) -> torch.Tensor:
    """Right-pad (or truncate) every completion with `pad_token_id` to exactly `max_completion_length` tokens.

    Built on the CPU on purpose (explicitly, whatever the default device): the completions are Python lists from the
    rollout engine, so the rows are filled in host memory and the caller moves the whole tensor to the prompts'
    device in one copy (:func:`build_distillation_batch`)."""
    out = torch.full((len(completions), max_completion_length), pad_token_id, dtype=torch.long, device="cpu")
    for i, ids in enumerate(completions):
        ids = list(ids)[:max_completion_length]
        if ids:
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long, device="cpu")
    return out


def build_labels(input_ids: torch.Tensor, prompt_lengths: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Reference labels: clone the ids, mask each row's prompt `[:prompt_length_i]` and every pad-id position."""
    labels = input_ids.clone()
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    labels[positions.unsqueeze(0) < prompt_lengths.to(input_ids.device).unsqueeze(1)] = IGNORE_INDEX
    labels[input_ids == pad_token_id] = IGNORE_INDEX
    return labels


def compact_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only attended tokens (left-padded mode): `cumsum(mask) - 1`, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_distillation_batch(
    *,
    student_prompts: torch.Tensor,
    student_prompt_attention_mask: torch.Tensor,
    student_prompt_lengths: torch.Tensor,
    teacher_prompts: torch.Tensor,
    teacher_prompt_attention_mask: torch.Tensor,
    completions: Sequence[Sequence[int]],
    max_completion_length: int,
    pad_token_id: int,
    eos_mask: str = "pad_id",
    prompt_padding: str = "right",
) -> dict[str, torch.Tensor | None]:
    """Student/teacher sequences, labels and the loss mask for one micro-batch.

    Reference (`eos_mask="pad_id"`, `prompt_padding="right"`): completions are right-padded with the pad id to exactly
    T = `max_completion_length`; `student = [prompt | completion]`, `teacher = [teacher prompt | completion]`;
    attention masks are `id != pad`; labels mask each row's prompt and every pad id; the loss mask is
    `labels[:, P_S:] != -100`; position ids are not passed (transformers uses `arange`). Position t of
    `logits_S[:, P_S-1:-1]` and of `logits_T[:, P_T-1:-1]` both predict completion token t.

    `eos_mask="length"`: validity comes from the completion length (keeps a stop token equal to pad) and the prompt
    attention from the collator. `prompt_padding="left"`: prompts are left-padded, so pass compact position ids.
    """
    # Every tensor below lives on the prompts' device (the collator's tensors after the Trainer moved them): the
    # completions are padded on the CPU and copied once; masks, labels and positions derive from tensors on `device`.
    device = student_prompts.device
    completion_ids = pad_completions(completions, max_completion_length, pad_token_id).to(device)
    student_input_ids = torch.cat([student_prompts, completion_ids], dim=1)
    teacher_input_ids = torch.cat([teacher_prompts, completion_ids], dim=1)
    p_s = student_prompts.size(1)
    if eos_mask == "pad_id":
        student_attention_mask = (student_input_ids != pad_token_id).long()
        teacher_attention_mask = (teacher_input_ids != pad_token_id).long()
        labels = build_labels(student_input_ids, student_prompt_lengths, pad_token_id)
        if prompt_padding == "left":  # a left-padded prompt occupies the last length_i slots of [0, P_S)
            labels[:, :p_s] = IGNORE_INDEX
    elif eos_mask == "length":
        lengths = torch.tensor(
            [min(len(c), max_completion_length) for c in completions], dtype=torch.long, device=device
        )
        valid = (torch.arange(max_completion_length, device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()
        student_attention_mask = torch.cat([student_prompt_attention_mask.long(), valid], dim=1)
        teacher_attention_mask = torch.cat([teacher_prompt_attention_mask.long(), valid], dim=1)
        labels = student_input_ids.clone()
        labels[:, :p_s] = IGNORE_INDEX
        labels[:, p_s:][valid == 0] = IGNORE_INDEX
    else:
        raise ValueError(f"eos_mask must be 'pad_id' or 'length', got {eos_mask!r}")
    if prompt_padding == "left":
        student_position_ids = compact_position_ids(student_attention_mask)
        teacher_position_ids = compact_position_ids(teacher_attention_mask)
    else:
        student_position_ids = teacher_position_ids = None
    return {
        "student_input_ids": student_input_ids,
        "student_attention_mask": student_attention_mask,
        "student_position_ids": student_position_ids,
        "teacher_input_ids": teacher_input_ids,
        "teacher_attention_mask": teacher_attention_mask,
        "teacher_position_ids": teacher_position_ids,
        "completion_ids": completion_ids,
        "labels": labels,
        "loss_mask": labels[:, p_s:] != IGNORE_INDEX,
    }


def distillation_batch_from_collated(
    collated: Mapping[str, Any],
    completions: Sequence[Sequence[int]],
    *,
    max_completion_length: int,
    pad_token_id: int,
    eos_mask: str = "pad_id",
    prompt_padding: str = "right",
) -> dict[str, Any]:
    """:func:`build_distillation_batch` of a collator output (:class:`SelfDistillationDataCollator`) and completions.

    Maps the collator's keys to the arguments and carries its ``student_prompt_length``/``teacher_prompt_length``.
    """
    batch = build_distillation_batch(
        student_prompts=collated["student_prompts"],
        student_prompt_attention_mask=collated["student_prompt_attention_mask"],
        student_prompt_lengths=collated["student_prompt_lengths_per_example"],
        teacher_prompts=collated["teacher_prompts"],
        teacher_prompt_attention_mask=collated["teacher_prompt_attention_mask"],
        completions=completions,
        max_completion_length=max_completion_length,
        pad_token_id=pad_token_id,
        eos_mask=eos_mask,
        prompt_padding=prompt_padding,
    )
    batch["student_prompt_length"] = collated["student_prompt_length"]
    batch["teacher_prompt_length"] = collated["teacher_prompt_length"]
    return batch
