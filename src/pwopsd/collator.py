"""Self-distillation collator: the student and teacher prompts (docs/architecture.md#prompts), tokenized and padded.

The student sees the problem; the teacher (same network) additionally sees the reference solution. Both prompts are
rendered with the tokenizer's chat template (the texts and the rendering are in `pwopsd.prompts`), tokenized, padded
to the batch maximum and returned as tensors. Labels are not built here: they need the rollout (see `pwopsd.batch`).

Quirks kept by default (docs/architecture.md#prompts, docs/deviations.md#upstream-issues-addressed):
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

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pwopsd.prompts import TEACHER_THINK_MODES, student_prompt_text, teacher_prompt_text

logger = logging.getLogger(__name__)


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
    """Collate `{problem, solution}` rows into student and teacher prompt tensors (docs/architecture.md#prompts).

    The tensors are CPU tensors by design (the tokenizer builds them in host memory, possibly in DataLoader workers);
    the Trainer's `_prepare_inputs` moves the whole batch to the training device, and everything built from it
    (:mod:`pwopsd.batch`) follows the device of these tensors.

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
                "--reason_first is not implemented: the reference's analysis instruction is unpublished "
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
        self._cut_rows: set[int] = set()
        self.longest_prompt = 0
        """The longest prompt cut to `max_length` so far, in tokens before the cut."""

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
        cut: dict[int, int] = {}  # row -> its longest prompt before the cut
        for role, texts in (("student", students), ("teacher", teachers)):
            ids, mask, batch_max, lengths = tokenize_prompts(self.tokenizer, texts, self.max_length, self.padding_side)
            batch[f"{role}_prompts"] = ids
            batch[f"{role}_prompt_attention_mask"] = mask
            batch[f"{role}_prompt_length"] = batch_max
            batch[f"{role}_prompt_lengths_per_example"] = lengths
            for row, length in self._full_lengths_of_cut(texts, lengths).items():
                cut[row] = max(cut.get(row, 0), length)
        if cut:
            self._report_truncation(cut, features)
        return batch

    @property
    def truncated_rows(self) -> int:
        """Distinct rows whose student or teacher prompt was cut to `max_length` so far (in this process; a row seen
        again in a later epoch is counted once)."""
        return len(self._cut_rows)

    def _full_lengths_of_cut(self, texts: Sequence[str], lengths: torch.Tensor) -> dict[int, int]:
        """Rows whose prompt was longer than `max_length`, with their untruncated length. Only rows that fill
        `max_length` exactly can have been cut, so only those are tokenized again (without truncation)."""
        if self.max_length is None:
            return {}
        full = [i for i, n in enumerate(lengths.tolist()) if n >= self.max_length]
        if not full:
            return {}
        ids = self.tokenizer([texts[i] for i in full], add_special_tokens=True)["input_ids"]
        return {i: len(row) for i, row in zip(full, ids) if len(row) > self.max_length}

    def _report_truncation(self, cut: dict[int, int], features: Sequence[dict[str, Any]]) -> None:
        """The truncation itself is the reference's behaviour (kept); it is no longer silent: one warning, the first
        time, and the running totals (`truncated_rows`, `longest_prompt`) for the end-of-training summary."""
        first = not self._cut_rows
        self._cut_rows.update(hash((features[i]["problem"], features[i]["solution"])) for i in cut)
        self.longest_prompt = max(self.longest_prompt, *cut.values())
        batch_size = len(features)
        if first:
            logger.warning(
                "%d of %d prompt rows in this batch are longer than --max_length %d and are cut to it (longest: %d "
                "tokens); the run's total is logged at the end of training. Raise --max_length to keep them whole",
                len(cut),
                batch_size,
                self.max_length,
                max(cut.values()),
            )
