"""The prompt texts shared by training and evaluation, and their chat-template rendering.

Training (docs/architecture.md#prompts). The student message is ``Problem: {problem}`` + a blank line +
:data:`INSTRUCTION`, rendered with thinking off; if the rendered text ends in an unclosed think tag (the
DeepSeek-R1-Distill and Olmo-3-Think templates always open one), ``</think>\\n\\n`` is appended. The teacher message
is the problem, :data:`TEACHER_INTRO`, the reference solution between ``=== Reference Solution Begin/End ===``
markers, :data:`TEACHER_TRANSITION`, a newline and :data:`INSTRUCTION`, rendered with thinking on and no patch, so for
those two templates the teacher prompt ends inside an open ``<think>`` while the student's is closed: the
thinking-mode mismatch of the reference, kept by default (docs/deviations.md#upstream-issues-addressed). The opt-in
``think_mode`` values of :func:`teacher_prompt_text` align the teacher with the student.

Evaluation (docs/evaluation.md#prompt). The user message is ``{problem}`` + :data:`EVAL_PROMPT_SUFFIX`: the same
instruction after a blank line, but without the ``Problem:`` prefix and without any think patch.

This module imports no tokenizer library: rendering takes the tokenizer as an argument.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "EVAL_PROMPT_SUFFIX",
    "INSTRUCTION",
    "TEACHER_INTRO",
    "TEACHER_THINK_MODES",
    "TEACHER_TRANSITION",
    "THINK_PATCH",
    "patch_unclosed_think",
    "render_user_prompt",
    "student_message",
    "student_prompt_text",
    "teacher_message",
    "teacher_prompt_text",
]

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

EVAL_PROMPT_SUFFIX = "\n\n" + INSTRUCTION
"""What the evaluator appends to the bare problem: ``\\n\\nPlease reason step by step, ... within \\boxed{}.``.

The instruction is the training one, but training writes ``Problem: {problem}\\n\\n{INSTRUCTION}`` (the student; the
teacher has the reference solution and the transition between problem and instruction) and patches an unclosed
``<think>`` of the student, while evaluation sends ``{problem}{EVAL_PROMPT_SUFFIX}`` with no prefix and no patch.
"""


def student_message(problem: str) -> str:
    """`Problem: {problem}\\n\\nPlease reason step by step, and put your final answer within \\boxed{}.`"""
    return f"Problem: {problem}\n\n{INSTRUCTION}"


def teacher_message(problem: str, solution: str) -> str:
    """The teacher's six parts: problem, intro, solution block, transition, separator, instruction."""
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
