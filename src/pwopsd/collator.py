"""Self-distillation collator: the student and teacher prompts of SPEC §3, tokenized and padded.

The student sees the problem; the teacher (same network) additionally sees the reference solution. Both prompts are
rendered with the tokenizer's chat template, tokenized, padded to the batch maximum and returned as tensors. Labels
are not built here: they need the rollout (see `opsd_trainer`).

Quirks kept by default (SPEC §3, §11.2):
* the student is rendered with `enable_thinking=False` and, if its text ends with an unclosed `<think>`, gets
  `</think>\\n\\n` appended (DSR1/Olmo templates always open a think block); the teacher is rendered with
  `enable_thinking=True` and no patch, so for DSR1/Olmo it ends with an *open* `<think>` (thinking-mode mismatch);
* prompts are right-padded (the collator switches the *shared* tokenizer to right padding).

Opt-in fixes: `padding_side="left"` (used with compact position ids by the trainer), `teacher_think="match_student"`
(render the teacher's generation prompt exactly like the student's, closing the think block) or
`teacher_think="open_think"` (append `<think>\\n` to a teacher prompt that does not already end in an open think
block, the upstream author's suggestion in OPSD issue #10), `student_enable_thinking=True` (thinking student).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEACHER_INTRO = "Here is a reference solution to this problem:\n"
TEACHER_TRANSITION = (
    "\n\nAfter reading the reference solution above, make sure you truly understand the reasoning behind each step — "
    "do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the same final answer "
    "to the problem above. Think step by step, explore different approaches, and don't be afraid to backtrack or "
    "reconsider if something doesn't work out:\n"
)
THINK_PATCH = "</think>\n\n"
_UNCLOSED_THINK = re.compile(r"<think\s*>\s*$")
TEACHER_THINK_MODES = ("reference", "match_student", "open_think")


def student_message(problem: str) -> str:
    """`Problem: {problem}\\n\\nPlease reason step by step, and put your final answer within \\boxed{}.`"""
    return f"Problem: {problem}\n\n{INSTRUCTION}"


def teacher_message(problem: str, solution: str) -> str:
    """The six parts of SPEC §3: problem, intro, solution block, transition, separator, instruction."""
    return (
        f"Problem: {problem}\n\n"
        + TEACHER_INTRO
        + f"=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n"
        + TEACHER_TRANSITION
        + "\n"
        + INSTRUCTION
    )


def patch_unclosed_think(text: str) -> str:
    """Append `</think>\\n\\n` if `text` ends in an unclosed think tag (regex `<think\\s*>\\s*$`), else return it."""
    return text + THINK_PATCH if _UNCLOSED_THINK.search(text) else text


def render_user_prompt(tokenizer: PreTrainedTokenizerBase, content: str, *, enable_thinking: bool) -> str:
    """Render one user message with the chat template and the assistant generation prompt."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )


def student_prompt_text(tokenizer: PreTrainedTokenizerBase, problem: str, *, enable_thinking: bool = False) -> str:
    """Student prompt: thinking off (reference) and the unclosed-think patch."""
    text = render_user_prompt(tokenizer, student_message(problem), enable_thinking=enable_thinking)
    return text if enable_thinking else patch_unclosed_think(text)


def teacher_prompt_text(
    tokenizer: PreTrainedTokenizerBase,
    problem: str,
    solution: str,
    *,
    think_mode: str = "reference",
    student_enable_thinking: bool = False,
) -> str:
    """Teacher prompt: thinking on, no patch (`reference`), or aligned with the student's think prefix (opt-in)."""
    content = teacher_message(problem, solution)
    if think_mode == "reference":
        return render_user_prompt(tokenizer, content, enable_thinking=True)
    if think_mode == "match_student":
        text = render_user_prompt(tokenizer, content, enable_thinking=student_enable_thinking)
        return text if student_enable_thinking else patch_unclosed_think(text)
    if think_mode == "open_think":
        text = render_user_prompt(tokenizer, content, enable_thinking=True)
        return text if _UNCLOSED_THINK.search(text) else text + "<think>\n"
    raise ValueError(f"unknown teacher think mode {think_mode!r}; choose one of {', '.join(TEACHER_THINK_MODES)}")


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int | None, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Tokenize (truncated to `max_length`) and pad to the batch maximum P on `padding_side`.

    The reference tokenizes twice (unpadded for the true lengths, then padded to their maximum); one padded call gives
    the same ids, mask, P and lengths. `add_special_tokens=True` (so a Llama template that already writes BOS gets a
    second one, as in the reference). Returns `(ids [B, P], attention_mask [B, P], P, lengths [B])`.
    """
    padded = tokenizer(
        list(texts),
        add_special_tokens=True,
        padding="longest",
        truncation=max_length is not None,
        max_length=max_length,
        padding_side=padding_side,
        return_tensors="pt",
    )
    lengths = padded["attention_mask"].sum(-1)
    return padded["input_ids"], padded["attention_mask"], padded["input_ids"].size(1), lengths


class SelfDistillationDataCollator:
    """Collate `{problem, solution}` rows into student and teacher prompt tensors (SPEC §3).

    Output keys: `student_prompts`, `student_prompt_attention_mask`, `student_prompt_length` (P_S, int),
    `student_prompt_lengths_per_example` and the same four `teacher_*` keys (P_T). No `labels`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = 20000,
        reason_first: bool = False,
        padding_side: str = "right",
        teacher_think: str = "reference",
        student_enable_thinking: bool = False,
    ) -> None:
        if reason_first:
            raise NotImplementedError(
                "--reason_first is not implemented: the reference's analysis instruction is unknown (SPEC §12 #7) "
                "and no run uses it; drop the flag"
            )
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if teacher_think not in TEACHER_THINK_MODES:
            raise ValueError(f"teacher_think must be one of {', '.join(TEACHER_THINK_MODES)}, got {teacher_think!r}")
        self.tokenizer = tokenizer
        # The reference switches the *shared* tokenizer to right padding; the rollout re-tokenization follows it.
        tokenizer.padding_side = padding_side
        self.max_length = max_length
        self.padding_side = padding_side
        self.teacher_think = teacher_think
        self.student_enable_thinking = student_enable_thinking

    def prompt_texts(self, features: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
        """The rendered student and teacher prompt strings of a batch."""
        students = [
            student_prompt_text(self.tokenizer, f["problem"], enable_thinking=self.student_enable_thinking)
            for f in features
        ]
        teachers = [
            teacher_prompt_text(
                self.tokenizer,
                f["problem"],
                f["solution"],
                think_mode=self.teacher_think,
                student_enable_thinking=self.student_enable_thinking,
            )
            for f in features
        ]
        return students, teachers

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        students, teachers = self.prompt_texts(features)
        batch: dict[str, Any] = {}
        for role, texts in (("student", students), ("teacher", teachers)):
            ids, mask, batch_max, lengths = tokenize_prompts(self.tokenizer, texts, self.max_length, self.padding_side)
            batch[f"{role}_prompts"] = ids
            batch[f"{role}_prompt_attention_mask"] = mask
            batch[f"{role}_prompt_length"] = batch_max
            batch[f"{role}_prompt_lengths_per_example"] = lengths
        return batch
