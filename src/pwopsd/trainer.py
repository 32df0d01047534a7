"""On-policy self-distillation trainer (SPEC §4): rollouts, teacher pass, labels and alignment, teacher modes.

One training step, per micro-batch:
  1. the collator gives student and teacher prompt ids (SPEC §3);
  2. the student samples one completion per prompt, with vLLM (colocate or server, TRL's `VLLMGeneration`, weights
     synced after every optimizer step) or with transformers `generate` (CPU, tests);
  3. `build_distillation_batch` concatenates prompt + completion for the student and the teacher and builds labels and
     the loss mask (pad == EOS masking and right-padded prompts with `arange` position ids, as the reference);
  4. the teacher (base weights with LoRA disabled, an EMA of the trainable weights, or the current weights) and the
     student are run; by default only their final hidden states at the completion positions are kept and the loss
     is computed chunk by chunk through the LM head (`distill_losses.chunked_distillation_loss`), so `[B, T, V]`
     logits never exist; `--dense_loss` takes the reference path through full logits.

The loss itself is one entry of `distill_losses.METHODS`; this trainer fixes it to `opsd` and `EAOPSDTrainer`
(ea_opsd_trainer.py) dispatches `--method`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GOLDConfig lives in trl.experimental (as in the reference)

from accelerate.utils import gather_object, is_peft_model
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import SFTTrainer
from trl.experimental.gold import GOLDConfig
from trl.models import unwrap_model_for_generation
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import disable_dropout_in_model

from pwopsd.collator import TEACHER_THINK_MODES, SelfDistillationDataCollator
from pwopsd.io import atomic_write_text
from pwopsd.losses import (
    METHODS,
    check_hparams,
    chunked_distillation_loss,
    compute_distillation_loss,
    loss_hparams_from_args,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
EMA_FILE = "ema_teacher.pt"


class ConfigError(ValueError):
    """A user error in flags or inputs: reported as one line by the entry point, without a traceback."""


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class OPSDConfig(GOLDConfig):
    """`GOLDConfig` (the reference's config class) plus the flags of SPEC §2.2 and pwopsd's opt-in switches.

    Every inherited default that matters (SPEC §2.3) is set here explicitly, so results do not drift with TRL versions.
    """

    # --- SPEC §2.2: flags added by the reference ---------------------------------------------------------------
    method: str | None = field(
        default=None,
        metadata={"help": "Distillation loss: " + "; ".join(f"{m.name} = {m.summary}" for m in METHODS.values()) + "."},
    )
    use_tinker_loss: bool = field(
        default=False, metadata={"help": "opsd only: sampled-token policy-gradient reverse KL (SPEC §5.1)."}
    )
    fixed_teacher: bool = field(
        default=False, metadata={"help": "Teacher = base weights with the LoRA adapter disabled. Needs --use_peft."}
    )
    use_ema_teacher: bool = field(default=False, metadata={"help": "Teacher = EMA of the trainable parameters."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay d: ema <- d*ema + (1-d)*theta."})
    run_config: str | None = field(
        default=None, metadata={"help": "Run name: appended to output_dir; WandB name {run_config}_lr{lr}_bs{batch}."}
    )
    presence_penalty: float = field(default=0.0, metadata={"help": "vLLM rollout presence penalty."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Rollout repetition penalty."})
    min_p: float = field(default=0.0, metadata={"help": "Rollout min-p."})
    reason_first: bool = field(
        default=False, metadata={"help": "Not implemented (SPEC §12 #7): the teacher first analyses the solution."}
    )
    max_reasoning_length: int = field(default=4096, metadata={"help": "reason_first only (not implemented)."})
    top_k_loss: int = field(default=0, metadata={"help": "0 = full vocabulary; k > 0 = teacher top-k (opsd/pwopsd)."})
    jsd_token_clip: float = field(
        default=0.05, metadata={"help": "Point-wise upper clip of the divergence terms (opsd/pwopsd); 0 = off."}
    )
    jsd_clip_mode: str = field(
        default="pointwise",
        metadata={
            "help": "pointwise = reference (clip each (token, vocab) term, losses can be negative); token = clip the "
            "per-token loss itself (opt-in, SPEC §11.2).",
            "choices": ["pointwise", "token"],
        },
    )
    opsd_bf16: bool = field(
        default=False, metadata={"help": "opsd only: element terms in bf16 as the reference (SPEC §12 #5)."}
    )
    position_w_min: float = field(default=0.25, metadata={"help": "PW-OPSD schedule: minimum weight w_min."})
    position_tau: float = field(
        default=0.30, metadata={"help": "PW-OPSD schedule: centre tau, a fraction of the row's own length."}
    )
    position_s: float = field(default=0.10, metadata={"help": "PW-OPSD schedule: sigmoid width s."})
    position_global_reduction: bool = field(
        default=False, metadata={"help": "PW-OPSD ablation: global token mean instead of the per-sequence mean."}
    )
    reopold_lambda: float = field(default=0.1, metadata={"help": "REOPOLD floor lambda in (0, 1)."})
    reopold_beta: float = field(default=0.2, metadata={"help": "REOPOLD phase-II entropy fraction beta in (0, 1]."})
    reopold_t_switch: int = field(default=50, metadata={"help": "REOPOLD phase switch (optimizer step)."})

    # --- pwopsd additions (opt-in; defaults reproduce the reference) ---------------------------------------------
    dense_loss: bool = field(
        default=False,
        metadata={"help": "Reference loss path through full [B, T, V] logits (default: chunked through the LM head)."},
    )
    loss_chunk_size: int = field(default=256, metadata={"help": "Completion positions per chunk (chunked loss)."})
    prompt_padding: str = field(
        default="right",
        metadata={
            "help": "right = reference (right-padded prompts, arange position ids); left = left-padded prompts with "
            "compact position ids (fix for the right-padding quirk, SPEC §4.3 item 8).",
            "choices": ["right", "left"],
        },
    )
    teacher_think: str = field(
        default="reference",
        metadata={
            "help": "reference = teacher rendered with thinking on (OPSD #10 mismatch kept); match_student = teacher "
            "ends with the student's think prefix; open_think = append '<think>\\n' to the teacher prompt.",
            "choices": list(TEACHER_THINK_MODES),
        },
    )
    student_enable_thinking: bool = field(
        default=False, metadata={"help": "Render the student prompt with thinking on (reference: off)."}
    )
    eos_mask: str = field(
        default="pad_id",
        metadata={
            "help": "pad_id = reference (mask every pad-id token, so pad == EOS never trains the stop token); "
            "length = mask by completion length, keeping the first EOS.",
            "choices": ["pad_id", "length"],
        },
    )
    rollout_batching: str = field(
        default="micro_batch",
        metadata={
            "help": "micro_batch = one rollout call per micro-batch (reference); step = one call for all micro-batches "
            "of an optimizer step (same policy, fewer and larger engine calls: faster with gradient accumulation).",
            "choices": ["micro_batch", "step"],
        },
    )
    generations_dump_steps: int = field(
        default=5, metadata={"help": "Write output_dir/generations/generations_step_{N}.json every N steps; 0 = off."}
    )
    wandb_project: str | None = field(default=None, metadata={"help": "WandB project (sets WANDB_PROJECT)."})

    # --- SPEC §2.3: inherited fields set explicitly -----------------------------------------------------------
    learning_rate: float = field(default=1e-7, metadata={"help": "GOLD default 1e-7; the launchers pass 5e-6."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip; the launchers pass 0.1."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (reference: AdamW)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Linear decay to 0 at max_steps."})
    warmup_steps: float = field(default=0, metadata={"help": "No warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "No weight decay."})
    seed: int = field(default=42, metadata={"help": "Seed (also the data-sampler seed)."})
    max_completion_length: int = field(default=128, metadata={"help": "Rollout length; launchers: 1024."})
    max_length: int | None = field(default=1024, metadata={"help": "Prompt truncation limit; launchers: 20000."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling AND loss temperature; launchers: 1.1."})
    top_p: float = field(default=0.95, metadata={"help": "Sampling top-p (never in the loss)."})
    top_k: int = field(default=0, metadata={"help": "Sampling top-k, 0 = off (never in the loss); launchers: 20."})
    lmbda: float = field(default=0.5, metadata={"help": "Stored but unused: every step is on-policy."})
    beta: float = field(default=0.5, metadata={"help": "GKD beta (0 = forward KL); launchers: 0."})
    seq_kd: bool = field(default=False, metadata={"help": "Unused."})
    disable_dropout: bool = field(default=True, metadata={"help": "Zero every dropout, including LoRA's."})
    use_vllm: bool = field(default=False, metadata={"help": "Roll out with vLLM (GPU)."})
    vllm_mode: str = field(default="server", metadata={"help": "colocate | server; launchers: colocate."})
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "Colocated vLLM memory fraction."})
    vllm_sync_frequency: int = field(default=1, metadata={"help": "Push weights to vLLM every N optimizer steps."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "vLLM sleep mode (reference: off)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Gradient checkpointing."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. Default: on when a CUDA device is available, off on CPU."},
    )
    report_to: None | str | list[str] = field(  # noqa: RUF036 (this order is what HfArgumentParser parses)
        default="wandb", metadata={"help": "Loggers (reference: wandb). `none` turns logging integrations off."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the raw `problem`/`solution` columns for the collator."}
    )
    dataset_kwargs: dict[str, Any] | str | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "SFT dataset preparation is skipped: the collator builds the prompts."},
    )

    def __post_init__(self) -> None:
        if not self.use_cpu and not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            # torchrun/accelerate started several processes on a machine without CUDA: without `use_cpu` accelerate
            # would not join them (each would train alone); with it they form a gloo process group.
            self.use_cpu = True
        if self.bf16 is None:
            self.bf16 = (not self.fp16) and torch.cuda.is_available() and not self.use_cpu
        self.validate_pwopsd_flags()
        super().__post_init__()

    def validate_pwopsd_flags(self) -> None:
        """Reject contradictory or out-of-range flags with a message naming the flag and the fix."""
        for flag in fields(OPSDConfig):  # flags with a fixed set of values (argparse checks them only on the CLI)
            choices = flag.metadata.get("choices")
            if flag.name in OPSDConfig.__annotations__ and choices and getattr(self, flag.name) not in choices:
                value = getattr(self, flag.name)
                raise ConfigError(f"--{flag.name} must be one of {', '.join(choices)}, got {value!r}")
        if self.reason_first:
            raise ConfigError(
                "--reason_first is not implemented (the reference's analysis prompt is unknown, SPEC §12 #7; no run "
                "uses it): drop the flag"
            )
        if self.fixed_teacher and self.use_ema_teacher:
            raise ConfigError("--fixed_teacher and --use_ema_teacher are mutually exclusive: pick one teacher")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_length is not None and self.max_completion_length >= self.max_length:
            raise ConfigError(
                f"--max_completion_length ({self.max_completion_length}) must be smaller than --max_length "
                f"({self.max_length}): raise --max_length or lower --max_completion_length"
            )
        if self.max_completion_length < 1:
            raise ConfigError(f"--max_completion_length must be >= 1, got {self.max_completion_length}")
        self.validate_loss_hparams()
        if self.loss_chunk_size < 1:
            raise ConfigError(f"--loss_chunk_size must be >= 1, got {self.loss_chunk_size}")
        if self.generations_dump_steps < 0:
            raise ConfigError(f"--generations_dump_steps must be >= 0, got {self.generations_dump_steps}")

    def validate_loss_hparams(self) -> None:
        """Check --method and the loss flags with the loss module's own checks (no model needed)."""
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}: choose one of {', '.join(METHODS)}")
        try:
            check_hparams(self.method or "opsd", **loss_hparams_from_args(self))
        except ValueError as err:
            raise ConfigError(str(err)) from None

    @property
    def teacher_mode(self) -> str:
        """`fixed` (LoRA disabled), `ema` or `dynamic` (the current student, no grad)."""
        if self.fixed_teacher:
            return "fixed"
        return "ema" if self.use_ema_teacher else "dynamic"


# ---------------------------------------------------------------------------------------------------------------
# Sequences, labels and alignment (SPEC §4.3) — pure functions
# ---------------------------------------------------------------------------------------------------------------
def prompt_token_lists(prompt_ids: torch.Tensor, prompt_attention_mask: torch.Tensor) -> list[list[int]]:
    """The real (unpadded) prompt tokens of each row, for the rollout engine."""
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
    """Right-pad (or truncate) every completion with `pad_token_id` to exactly `max_completion_length` tokens."""
    out = torch.full((len(completions), max_completion_length), pad_token_id, dtype=torch.long)
    for i, ids in enumerate(completions):
        ids = list(ids)[:max_completion_length]
        if ids:
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
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
    """Student/teacher sequences, labels and the loss mask for one micro-batch (SPEC §4.3).

    Reference (`eos_mask="pad_id"`, `prompt_padding="right"`): completions are right-padded with the pad id to exactly
    T = `max_completion_length`; `student = [prompt | completion]`, `teacher = [teacher prompt | completion]`;
    attention masks are `id != pad`; labels mask each row's prompt and every pad id; the loss mask is
    `labels[:, P_S:] != -100`; position ids are not passed (transformers uses `arange`). Position t of
    `logits_S[:, P_S-1:-1]` and of `logits_T[:, P_T-1:-1]` both predict completion token t.

    `eos_mask="length"`: validity comes from the completion length (keeps a stop token equal to pad) and the prompt
    attention from the collator. `prompt_padding="left"`: prompts are left-padded, so pass compact position ids.
    """
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
        lengths = torch.tensor([min(len(c), max_completion_length) for c in completions], device=device)
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


# ---------------------------------------------------------------------------------------------------------------
# Teacher modes (SPEC §4.4)
# ---------------------------------------------------------------------------------------------------------------
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


class EMATeacher:
    """EMA of the trainable parameters: `ema <- d*ema + (1-d)*theta` after each optimizer step.

    Initialised lazily from the weights after the first optimizer step, as the reference; until then the teacher is the
    current student. `swapped_in()` copies the EMA into the parameters for the teacher pass and restores them after.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.shadow: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self) -> None:
        if self.shadow is None:
            self.shadow = [p.detach().clone() for _, p in self.named_params]
            return
        for s, (_, p) in zip(self.shadow, self.named_params):
            s.lerp_(p.detach().to(s.dtype), 1.0 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        if self.shadow is None:
            yield
            return
        backup = [p.detach().clone() for _, p in self.named_params]
        with torch.no_grad():
            for s, (_, p) in zip(self.shadow, self.named_params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, (_, p) in zip(backup, self.named_params):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        shadow = None if self.shadow is None else {n: s.cpu() for s, (n, _) in zip(self.shadow, self.named_params)}
        return {"decay": self.decay, "shadow": shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("shadow") is None:
            self.shadow = None
            return
        self.shadow = [state["shadow"][n].to(device=p.device, dtype=p.dtype) for n, p in self.named_params]


class _OPSDCallback(TrainerCallback):
    """Trainer hooks: EMA update after each optimizer step, generation dumps, per-step buffers."""

    def __init__(self, trainer: OPSDTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._on_train_begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._on_optimizer_step_end()


# ---------------------------------------------------------------------------------------------------------------
# vLLM rollouts: TRL's engine, plus the reference's enforce_eager switch
# ---------------------------------------------------------------------------------------------------------------
def make_vllm_generation(trainer: OPSDTrainer):
    """TRL's `VLLMGeneration` configured as the reference engine (SPEC §4.2).

    `max_num_seqs` = per-device batch × GA, `max_model_len` = `max_length`, `seed` = process_index // tp (set by TRL),
    `enforce_eager` from env `VLLM_ENFORCE_EAGER`; `SamplingParams(n=1, temperature, top_p, top_k, min_p,
    repetition_penalty, presence_penalty, max_tokens=max_completion_length)`. Weight sync (merge LoRA → `load_weights`
    → unmerge → reset prefix cache) is `VLLMGeneration.sync_weights`.
    """
    import trl.generation.vllm_generation as vllm_generation

    args: OPSDConfig = trainer.args
    enforce_eager = os.environ.get("VLLM_ENFORCE_EAGER", "0").strip().lower() in ("1", "true", "yes")

    class _VLLMGeneration(vllm_generation.VLLMGeneration):
        def _init_vllm(self) -> None:
            original = vllm_generation.LLM
            vllm_generation.LLM = functools.partial(original, enforce_eager=enforce_eager)
            try:
                super()._init_vllm()
            finally:
                vllm_generation.LLM = original

    return _VLLMGeneration(
        model=trainer.model,
        accelerator=trainer.accelerator,
        processing_class=trainer.processing_class,
        mode=args.vllm_mode,
        server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host,
        server_port=args.vllm_server_port,
        group_port=args.vllm_group_port,
        server_timeout=args.vllm_server_timeout,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.vllm_max_model_length or args.max_length,
        max_num_seqs=args.per_device_train_batch_size * args.gradient_accumulation_steps,
        enable_sleep_mode=args.vllm_enable_sleep_mode,
        model_impl=args.vllm_model_impl,
        trust_remote_code=args.trust_remote_code,
        repetition_penalty=args.repetition_penalty,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_completion_length=args.max_completion_length,
        logprobs=None,
        generation_kwargs={"presence_penalty": args.presence_penalty},
    )


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------
class OPSDTrainer(SFTTrainer):
    """TRL `SFTTrainer` subclass for on-policy self-distillation with a privileged teacher context (the `opsd` loss).

    The dataset holds raw `problem`/`solution` rows; `SelfDistillationDataCollator` renders the prompts; rollouts,
    sequences and the teacher pass happen in `_prepare_inputs` / `compute_loss`.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "opsd", "pwopsd"]
    _name = "EA-OPSD"

    def __init__(
        self,
        model: nn.Module,
        args: OPSDConfig,
        train_dataset,
        processing_class: PreTrainedTokenizerBase,
        peft_config=None,
        data_collator=None,
        callbacks: list[TrainerCallback] | None = None,
    ) -> None:
        if args.method is None or args.method not in METHODS:
            got = "missing" if args.method is None else f"{args.method!r}"
            raise ConfigError(f"--method is {got}: choose one of {', '.join(METHODS)}")
        tokenizer = processing_class
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if data_collator is None:
            data_collator = SelfDistillationDataCollator(
                tokenizer,
                max_length=args.max_length,
                reason_first=args.reason_first,
                padding_side=args.prompt_padding,
                teacher_think=args.teacher_think,
                student_enable_thinking=args.student_enable_thinking,
            )
        teacher_mode = args.teacher_mode
        if teacher_mode == "fixed" and peft_config is None and not is_peft_model(model):
            raise ConfigError("--fixed_teacher needs --use_peft (the teacher is the base with the adapter disabled)")
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.num_processes != launched:
            raise ConfigError(
                f"{launched} processes were launched but accelerate joined {self.accelerator.num_processes}: on a "
                "machine without GPUs pass --use_cpu so they form one (gloo) job"
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        unwrapped.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        unwrapped.generation_config.pad_token_id = tokenizer.pad_token_id
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        if args.lmbda < 1.0:
            logger.warning("--lmbda %s is stored but unused: every step is on-policy (as the reference)", args.lmbda)

        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = self._eos_token_ids(unwrapped, tokenizer)
        self.teacher_mode = teacher_mode
        self.hparams = loss_hparams_from_args(args)
        self._forward_redirection = _ForwardRedirection()
        self._check_lm_head(unwrapped)
        self.ema_teacher = EMATeacher(unwrapped, args.ema_decay) if teacher_mode == "ema" else None
        self._resume_dir: str | None = None
        self._generation_buffer: list[dict[str, Any]] = []
        self.add_callback(_OPSDCallback(self))

        pad_is_eos = tokenizer.pad_token_id == tokenizer.eos_token_id
        logger.info(
            "pad token %r (id %s), eos %r (id %s): pad == eos is %s%s",
            tokenizer.pad_token,
            tokenizer.pad_token_id,
            tokenizer.eos_token,
            tokenizer.eos_token_id,
            pad_is_eos,
            " -> the stop token is masked out of the loss (reference); --eos_mask length keeps it"
            if pad_is_eos and args.eos_mask == "pad_id"
            else "",
        )
        logger.info(
            "method %s, teacher %s, loss path %s, prompts %s-padded",
            self.method,
            teacher_mode,
            "dense" if args.dense_loss else f"chunked ({args.loss_chunk_size} positions)",
            args.prompt_padding,
        )

        self.generation_config = GenerationConfig(
            max_new_tokens=args.max_completion_length,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k if args.top_k > 0 else None,
            min_p=args.min_p if args.min_p > 0 else None,
            repetition_penalty=args.repetition_penalty,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
            use_cache=True,
        )
        self.vllm_generation = None
        self._last_vllm_sync_step = -1
        if args.use_vllm:
            self.vllm_generation = make_vllm_generation(self)
        elif args.presence_penalty:
            logger.warning("--presence_penalty applies to vLLM rollouts only; ignored by transformers generate")

    # --- properties ----------------------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """The `METHODS` key this trainer optimises (`--method`)."""
        return self.args.method

    @staticmethod
    def _eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Every id that ends a completion: the tokenizer's EOS and the generation config's EOS ids."""
        ids = model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids = [tokenizer.eos_token_id, *ids]
        return ids

    def _check_lm_head(self, unwrapped: nn.Module) -> None:
        """The chunked path computes `hidden @ W.T` with the student's plain head weight for student and teacher: refuse
        heads it cannot reproduce (bias, soft-capping, scaling, a PEFT-adapted head, a trained head the teacher does not
        share)."""
        if self.args.dense_loss:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import AuxiliaryTrainingWrapper

        head = unwrapped.get_output_embeddings()
        text_config = unwrapped.config.get_text_config()
        unsupported = [
            name
            for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
            if getattr(text_config, name, None) not in (None, 1.0)
        ]
        if getattr(head, "bias", None) is not None:
            unsupported.append("lm_head bias")
        if isinstance(head, (BaseTunerLayer, AuxiliaryTrainingWrapper)):  # LoRA on lm_head, or modules_to_save
            unsupported.append("a PEFT-adapted lm_head")
        elif self.teacher_mode != "dynamic" and getattr(getattr(head, "weight", None), "requires_grad", False):
            unsupported.append(f"a trainable lm_head with the {self.teacher_mode} teacher")
        if unsupported or not hasattr(head, "weight"):
            raise ConfigError(
                f"the chunked loss computes logits as hidden @ lm_head.weight.T, but this model has "
                f"{', '.join(unsupported) or 'no plain lm_head'}: pass --dense_loss"
            )

    # --- rollouts ------------------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step (fetched together by the Trainer); kept for step-level rollouts."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_batches = batch_samples
        self._step_completions = None
        return batch_samples, num_items_in_batch

    def _step_rollouts(self, inputs: dict[str, Any]) -> list[list[int]] | None:
        """`--rollout_batching step`: one engine call for every micro-batch of the optimizer step, on first use.

        The weights only change at the optimizer step, so this samples from the same policy as per-micro-batch calls
        (the reference), with GA times fewer, GA times larger engine calls.
        """
        batches = getattr(self, "_step_batches", None)
        if self.args.rollout_batching != "step" or not batches or not any(inputs is b for b in batches):
            return None
        if self._step_completions is None:
            prompts = [prompt_token_lists(b["student_prompts"], b["student_prompt_attention_mask"]) for b in batches]
            flat = self._generate([p for batch_prompts in prompts for p in batch_prompts])
            self._step_completions, start = {}, 0
            for batch, batch_prompts in zip(batches, prompts):
                self._step_completions[id(batch)] = flat[start : start + len(batch_prompts)]
                start += len(batch_prompts)
        return self._step_completions[id(inputs)]

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        completions = self._step_rollouts(inputs) if self.model.training else None
        inputs = super()._prepare_inputs(inputs)
        if "student_prompts" not in inputs or "completion_ids" in inputs:
            return inputs
        return self._build_rollout_batch(inputs, completions)

    def _build_rollout_batch(
        self, inputs: dict[str, Any], completions: list[list[int]] | None = None
    ) -> dict[str, Any]:
        """Sample one completion per prompt (unless given) and assemble the student/teacher sequences (SPEC §4.2–§4.3)."""
        prompts = prompt_token_lists(inputs["student_prompts"], inputs["student_prompt_attention_mask"])
        if completions is None:
            completions = self._generate(prompts)
        batch = distillation_batch_from_collated(
            inputs,
            completions,
            max_completion_length=self.args.max_completion_length,
            pad_token_id=self.pad_token_id,
            eos_mask=self.args.eos_mask,
            prompt_padding=self.args.prompt_padding,
        )
        self._record_completion_metrics(completions)
        every = self.args.generations_dump_steps
        if every and (self.state.global_step + 1) % every == 0:  # only the steps that are dumped decode their text
            self._buffer_generations(prompts, completions)
        return batch

    def _generate(self, prompts: list[list[int]]) -> list[list[int]]:
        """One completion per prompt (token ids, ending with the stop token when one was sampled)."""
        max_len = self.args.max_completion_length
        if self.vllm_generation is not None:
            self._maybe_sync_vllm()
            _, completions, _, _ = self.vllm_generation.generate(prompts=prompts, images=None, num_generations=1)
            return [list(map(int, c))[:max_len] for c in completions]
        return self._generate_transformers(prompts)

    def _maybe_sync_vllm(self) -> None:
        """Push the current (merged) weights to vLLM once per `vllm_sync_frequency` optimizer steps (SPEC §4.5)."""
        step = self.state.global_step
        if step != self._last_vllm_sync_step and (
            self._last_vllm_sync_step < 0 or step - self._last_vllm_sync_step >= self.args.vllm_sync_frequency
        ):
            self.vllm_generation.sync_weights()
            self._last_vllm_sync_step = step

    @torch.no_grad()
    def _generate_transformers(self, prompts: list[list[int]]) -> list[list[int]]:
        """transformers `generate` on left-padded prompts, same temperature/top-p/top-k (the reference's fallback)."""
        device = self.accelerator.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, device=device)
            attention_mask[i, width - len(p) :] = 1
        with unwrap_model_for_generation(
            self.model_wrapped,
            self.accelerator,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ) as unwrapped:
            out = unwrapped.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation_config
            )
        return [
            truncate_at_eos(row, self.eos_token_ids, self.args.max_completion_length) for row in out[:, width:].tolist()
        ]

    # --- loss ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _backbone(unwrapped: nn.Module) -> nn.Module:
        """The decoder stack without the LM head (through the PEFT wrapper, so LoRA layers stay active)."""
        model = unwrapped.base_model.model if is_peft_model(unwrapped) else unwrapped
        return model.base_model

    def _completion_features(
        self,
        unwrapped: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        prompt_length: int,
    ) -> torch.Tensor:
        """Features at the positions `[P-1, P+T-1)` that predict the T completion tokens.

        Chunked path: final hidden states `[B, T, H]` (after the final norm). Dense path: logits `[B, T, V]`, computed
        only for those positions (`logits_to_keep = T + 1`, identical values to slicing the full logits).
        """
        completion_length = input_ids.size(1) - prompt_length
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self.args.dense_loss:
            logits = unwrapped(**kwargs, logits_to_keep=completion_length + 1).logits
            return logits[:, :-1]
        hidden = self._backbone(unwrapped)(**kwargs).last_hidden_state
        return hidden[:, prompt_length - 1 : -1]

    def _teacher_context(self, unwrapped: nn.Module):
        """Route the teacher pass: adapter disabled (fixed), EMA weights swapped in (ema), or as-is (dynamic)."""
        if self.teacher_mode == "fixed":
            return unwrapped.disable_adapter()
        if self.teacher_mode == "ema":
            return self.ema_teacher.swapped_in()
        return nullcontext()

    def _distillation_loss(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        lm_head_weight: torch.Tensor,
        completion_ids: torch.Tensor,
        loss_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        step = self.state.global_step
        if self.args.dense_loss:
            return compute_distillation_loss(
                self.method, student, teacher, completion_ids, loss_mask, global_step=step, **self.hparams
            )
        return chunked_distillation_loss(
            self.method,
            student,
            teacher,
            lm_head_weight,
            completion_ids,
            loss_mask,
            chunk_size=self.args.loss_chunk_size,
            global_step=step,
            **self.hparams,
        )

    def _student_loss(
        self, unwrapped: nn.Module, inputs: dict[str, Any], teacher: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        """Student forward (with grad) and loss; runs inside the wrapper's forward (DDP/DeepSpeed hooks fire)."""
        student = self._completion_features(
            unwrapped,
            inputs["student_input_ids"],
            inputs["student_attention_mask"],
            inputs["student_position_ids"],
            inputs["student_prompt_length"],
        )
        head = unwrapped.get_output_embeddings().weight
        loss, metrics = self._distillation_loss(student, teacher, head, inputs["completion_ids"], inputs["loss_mask"])
        return loss, metrics, student[:, :1].detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError(f"{type(self).__name__} does not return model outputs")
        unwrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad(), self._teacher_context(unwrapped):
            teacher = self._completion_features(
                unwrapped,
                inputs["teacher_input_ids"],
                inputs["teacher_attention_mask"],
                inputs["teacher_position_ids"],
                inputs["teacher_prompt_length"],
            )
        loss, metrics, student_first = self._forward_redirection(
            model, unwrapped, self._student_loss, unwrapped, inputs, teacher
        )
        metrics = dict(metrics)
        metrics["distill/first_token_loss"] = self._first_token_loss(student_first, teacher[:, :1], unwrapped, inputs)
        self._log_metrics(metrics)
        return loss

    @torch.no_grad()
    def _first_token_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, unwrapped: nn.Module, inputs: dict[str, Any]
    ) -> torch.Tensor:
        """Unclipped GKD divergence (β = --beta) at completion position 0, where the think-mode mismatch shows."""
        if not self.args.dense_loss:
            weight = unwrapped.get_output_embeddings().weight
            student = student.to(weight.dtype) @ weight.T
            teacher = teacher.to(weight.dtype) @ weight.T
        first = {**self.hparams, "jsd_token_clip": 0.0, "top_k_loss": 0, "use_tinker_loss": False, "opsd_bf16": False}
        loss, _ = compute_distillation_loss(
            "opsd", student, teacher, inputs["completion_ids"][:, :1], inputs["loss_mask"][:, :1], **first
        )
        return loss.detach()

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Rough FLOPs of a micro-batch for `total_flos`: 6·N per student token (forward + backward) and 2·N per teacher
        token (forward), N = non-embedding parameters, counting full-length completions."""
        if "student_prompt_attention_mask" not in inputs:
            return 0
        if getattr(self, "_num_params", None) is None:
            self._num_params = self.accelerator.unwrap_model(self.model).num_parameters(exclude_embeddings=True)
        completion = inputs["student_prompt_attention_mask"].size(0) * self.args.max_completion_length
        student = int(inputs["student_prompt_attention_mask"].sum()) + completion
        teacher = int(inputs["teacher_prompt_attention_mask"].sum()) + completion
        return (6 * student + 2 * teacher) * self._num_params

    # --- metrics, dumps, checkpoints ------------------------------------------------------------------------------
    def _log_metrics(self, metrics: dict[str, Any]) -> None:
        """Average each metric over processes (one collective) and queue it for the next log."""
        if not metrics:
            return
        keys = sorted(metrics)
        device = self.accelerator.device
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=device).detach() for k in keys])
        values = self.accelerator.gather(values.unsqueeze(0)).view(-1, len(keys)).mean(0).tolist()
        mode = "train" if self.model.training else "eval"
        for key, value in zip(keys, values):
            self._metrics[mode][key].append(value)

    def _record_completion_metrics(self, completions: list[list[int]]) -> None:
        """Mean/min/max completion length and the truncation rate (no stop token within max_completion_length)."""
        eos = set(self.eos_token_ids)
        lengths = [len(c) for c in completions]
        truncated = [float(not c or c[-1] not in eos) for c in completions]
        device = self.accelerator.device
        local = torch.tensor([lengths, truncated], dtype=torch.float32, device=device).T  # [B, 2]
        gathered = self.accelerator.gather(local)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["completions/mean_length"].append(gathered[:, 0].mean().item())
        self._metrics[mode]["completions/min_length"].append(gathered[:, 0].min().item())
        self._metrics[mode]["completions/max_length"].append(gathered[:, 0].max().item())
        self._metrics[mode]["completions/clipped_ratio"].append(gathered[:, 1].mean().item())

    def _buffer_generations(self, prompts: list[list[int]], completions: list[list[int]]) -> None:
        prompt_texts = self.processing_class.batch_decode(prompts, skip_special_tokens=False)
        completion_texts = self.processing_class.batch_decode(completions, skip_special_tokens=False)
        step = self.state.global_step + 1  # the optimizer step these rollouts belong to
        self._generation_buffer.extend(
            {"step": step, "prompt": p, "completion": c} for p, c in zip(prompt_texts, completion_texts)
        )

    def _on_train_begin(self) -> None:
        if self.ema_teacher is not None and self._resume_dir is not None:
            path = Path(self._resume_dir) / EMA_FILE
            if path.exists():
                self.ema_teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                logger.info("EMA teacher restored from %s", path)

    def _on_optimizer_step_end(self) -> None:
        if self.ema_teacher is not None:
            self.ema_teacher.update()
        step = self.state.global_step
        every = self.args.generations_dump_steps
        if every and step % every == 0:
            records = gather_object(self._generation_buffer)
            if self.accelerator.is_main_process:
                self._write_generations(step, records)
        self._generation_buffer = []

    def _write_generations(self, step: int, records: list[dict[str, Any]]) -> None:
        """`output_dir/generations/generations_step_{N}.json`: a list of {step, prompt, completion}, written atomically."""
        out_dir = Path(self.args.output_dir) / "generations"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"generations_step_{step}.json"
        atomic_write_text(path, json.dumps(records, ensure_ascii=False, indent=1), fsync=False)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.ema_teacher is not None and self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            torch.save(self.ema_teacher.state_dict(), folder / EMA_FILE)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` picks the last checkpoint of output_dir."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ConfigError(f"--resume_from_checkpoint: no checkpoint-* folder in {self.args.output_dir}")
        self._resume_dir = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


EAOPSDTrainer = OPSDTrainer
"""The reference's name of the trainer that dispatches `--method` (kept so its imports keep working)."""
