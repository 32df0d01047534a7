"""The on-policy self-distillation trainer: TRL's `SFTTrainer` with rollouts, a teacher pass and a distillation loss.

The student learns from its own samples, scored by a teacher that is the same network reading a privileged prompt (the
problem plus its reference solution). One training step, per micro-batch (docs/architecture.md#training-data-flow):

  1. the collator (`pwopsd.collator`) gives the student and teacher prompt ids;
  2. the student samples one completion per prompt (`pwopsd.rollouts`: vLLM through TRL's `VLLMGeneration`, weights
     synced after every optimizer step, or transformers `generate` on CPU and in tests);
  3. `pwopsd.batch` appends each completion to both prompts and builds the labels and the loss mask (pad == EOS
     masking and right-padded prompts with `arange` position ids, as the reference);
  4. the teacher (`pwopsd.teacher`: base weights with LoRA disabled, an EMA of the trainable weights, or the current
     weights) runs without gradient, then the student with it; by default only their final hidden states at the
     completion positions are kept and the loss is computed chunk by chunk through the LM head
     (`pwopsd.chunked_loss`), so `[B, T, V]` logits never exist; `--dense_loss` takes the reference path through full
     logits.

The loss is the entry `args.method` of `pwopsd.losses.METHODS` (`opsd`, `pwopsd`, `eopd`, `reopold`), chosen by
`--method`; `EAOPSDTrainer`, the reference's name, is the same class.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate.utils import gather_object, is_peft_model
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import disable_dropout_in_model

from pwopsd.batch import distillation_batch_from_collated, prompt_token_lists
from pwopsd.checkpoints import (
    CheckpointLayout,
    begin_checkpoint,
    checkpoint_folders,
    checkpoint_problem,
    describe_skipped,
    finish_checkpoint,
    last_complete_checkpoint,
    rotate_checkpoints,
)
from pwopsd.chunked_loss import chunked_distillation_loss, fused_fallback_reason
from pwopsd.collator import SelfDistillationDataCollator
from pwopsd.config import ConfigError, OPSDConfig
from pwopsd.io import atomic_write_text
from pwopsd.losses import METHODS, compute_distillation_loss, loss_hparams_from_args
from pwopsd.rollouts import TransformersRollouts, VLLMRollouts, eos_token_ids
from pwopsd.teacher import (
    EMATeacher,
    check_teacher_model,
    restore_ema_teacher,
    save_ema_teacher,
    teacher_context,
)

logger = logging.getLogger(__name__)


class _OPSDCallback(TrainerCallback):
    """Trainer hooks: EMA update after each optimizer step, generation dumps, per-step buffers."""

    def __init__(self, trainer: OPSDTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._on_train_begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._on_optimizer_step_end()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._on_train_end()


def _check_method(args: OPSDConfig) -> None:
    """The trainer needs a loss: `--method` must name an entry of `METHODS`."""
    if args.method is None or args.method not in METHODS:
        got = "missing" if args.method is None else f"{args.method!r}"
        raise ConfigError(f"--method is {got}: choose one of {', '.join(METHODS)}")


def _with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer, with pad = EOS when it has no pad token (as the reference)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _default_collator(tokenizer: PreTrainedTokenizerBase, args: OPSDConfig) -> SelfDistillationDataCollator:
    """The prompt collator configured from the flags (prompt padding, teacher/student thinking mode)."""
    return SelfDistillationDataCollator(
        tokenizer,
        max_length=args.max_length,
        reason_first=args.reason_first,
        padding_side=args.prompt_padding,
        teacher_think=args.teacher_think,
        student_enable_thinking=args.student_enable_thinking,
    )


class OPSDTrainer(SFTTrainer):
    """TRL `SFTTrainer` subclass for on-policy self-distillation with a privileged teacher context.

    The loss is `METHODS[args.method]` (`--method`: `opsd`, `pwopsd`, `eopd` or `reopold`). The dataset holds raw
    `problem`/`solution` rows; `SelfDistillationDataCollator` renders the prompts; rollouts and the distillation batch
    are built in `_prepare_inputs`, the teacher and student passes and the loss run in `compute_loss`.
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
        _check_method(args)
        tokenizer = _with_pad_token(processing_class)
        if data_collator is None:
            data_collator = _default_collator(tokenizer, args)
        check_teacher_model(args.teacher_mode, model, peft_config)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        self._check_process_count()
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._configure_model(unwrapped, tokenizer)
        self._init_distillation(unwrapped, tokenizer)
        self._log_setup(tokenizer)
        self.rollouts = self._make_rollouts()

    # --- construction steps, in the order __init__ runs them -------------------------------------------------------
    def _check_process_count(self) -> None:
        """Refuse a multi-process launch that accelerate did not join into one job (each process would train alone)."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.num_processes != launched:
            raise ConfigError(
                f"{launched} processes were launched but accelerate joined {self.accelerator.num_processes}: on a "
                "machine without GPUs pass --use_cpu so they form one (gloo) job"
            )

    def _configure_model(self, unwrapped: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Give the model the tokenizer's pad id and zero its dropout (`--disable_dropout`)."""
        args = self.args
        unwrapped.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        unwrapped.generation_config.pad_token_id = tokenizer.pad_token_id
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        if args.lmbda < 1.0:
            logger.warning("--lmbda %s is stored but unused: every step is on-policy (as the reference)", args.lmbda)

    def _init_distillation(self, unwrapped: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Token ids, teacher, loss hyper-parameters and per-run buffers; registers the step callback."""
        args = self.args
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = eos_token_ids(unwrapped, tokenizer)
        self.teacher_mode = args.teacher_mode
        self.hparams = loss_hparams_from_args(args)
        self._forward_redirection = _ForwardRedirection()
        self._check_lm_head(unwrapped)
        self.ema_teacher = EMATeacher(unwrapped, args.ema_decay) if self.teacher_mode == "ema" else None
        self._resume_dir: str | None = None
        self._generation_buffer: list[dict[str, Any]] = []
        self.add_callback(_OPSDCallback(self))

    def _log_setup(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Log whether pad == EOS (then the stop token is never trained), the method, teacher and loss path."""
        args = self.args
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
            self.teacher_mode,
            "dense" if args.dense_loss else self._chunked_path_name(),
            args.prompt_padding,
        )

    def _chunked_path_name(self) -> str:
        """How the chunked loss runs for these flags, for the start-up log."""
        reason = fused_fallback_reason(self.method, **self.hparams)
        body = "fused" if reason is None else f"autograd: {reason}"
        return f"chunked ({self.args.loss_chunk_size} positions, {body})"

    def _make_rollouts(self) -> VLLMRollouts | TransformersRollouts:
        """The rollout engine: vLLM with `--use_vllm`, else transformers `generate`."""
        if self.args.use_vllm:
            return VLLMRollouts(self)
        if self.args.presence_penalty:
            logger.warning("--presence_penalty applies to vLLM rollouts only; ignored by transformers generate")
        return TransformersRollouts(self)

    # --- properties and checks -------------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """The `METHODS` key this trainer optimises (`--method`)."""
        return self.args.method

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
            flat = self.rollouts.generate([p for batch_prompts in prompts for p in batch_prompts])
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
        """Sample one completion per prompt (unless given) and build the student/teacher distillation batch."""
        prompts = prompt_token_lists(inputs["student_prompts"], inputs["student_prompt_attention_mask"])
        if completions is None:
            completions = self.rollouts.generate(prompts)
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
        return teacher_context(self.teacher_mode, unwrapped, self.ema_teacher)

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
        if self._logs_this_step():
            self._log_token_diagnostics(student, teacher, head, inputs["loss_mask"])
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

    # --- per-token diagnostics (health/student_entropy, pos/*) ----------------------------------------------------
    def _logs_this_step(self) -> bool:
        """Whether the optimizer step being computed will be logged (DefaultFlowCallback's rule): the diagnostics are
        computed for those steps only, so the chunked path pays their extra LM-head projection once per log."""
        args = self.args
        if args.logging_strategy == "no" or not self.model.training:
            return False
        if args.logging_strategy != "steps":
            return True
        step = self.state.global_step + 1
        every = max(int(self.state.logging_steps or 1), 1)
        return step % every == 0 or (step == 1 and args.logging_first_step)

    @torch.no_grad()
    def _log_token_diagnostics(
        self, student: torch.Tensor, teacher: torch.Tensor, head: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """Log the student entropy and, per quarter of relative position, the teacher-student forward KL, the teacher
        entropy and the top-1 agreement, at the loss temperature, over the valid completion tokens.

        `student`/`teacher` are the loss inputs: logits `[B, T, V]` (dense path) or final hidden states `[B, T, H]`
        (chunked path, projected here through `head` chunk by chunk without gradient: only `[chunk, V]` exists).
        u = (k - 1/2) / L for the k-th valid token of a row with L valid tokens; quarter q holds u in
        [(q-1)/4, q/4) (the last one includes 1). Each value is a token mean pooled over every process (sums and counts
        are gathered), so a quarter is logged only when some process has tokens in it.
        """
        temperature = float(self.hparams.get("temperature", self.args.temperature))
        valid = mask.reshape(-1).nonzero().squeeze(-1)
        m = mask.to(torch.float32)
        u = (m.cumsum(-1) - 0.5) / m.sum(-1, keepdim=True).clamp_min(1)
        quarter = (u * 4).floor().clamp(0, 3).long().reshape(-1).index_select(0, valid)
        s = student.detach().reshape(-1, student.size(-1)).index_select(0, valid)
        t = teacher.detach().reshape(-1, teacher.size(-1)).index_select(0, valid)
        parts: dict[str, list[torch.Tensor]] = {"student_entropy": [], "teacher_entropy": [], "kl": [], "top1": []}
        chunk = self.args.loss_chunk_size if isinstance(self.args.loss_chunk_size, int) else 256
        for start in range(0, len(valid), chunk):
            zs, zt = s[start : start + chunk], t[start : start + chunk]
            if not self.args.dense_loss:
                zs, zt = zs.to(head.dtype) @ head.T, zt.to(head.dtype) @ head.T
            dtype = torch.promote_types(zs.dtype, torch.float32)
            ls = torch.log_softmax(zs.to(dtype) / temperature, dim=-1)
            lt = torch.log_softmax(zt.to(dtype) / temperature, dim=-1)
            q = lt.exp()
            parts["student_entropy"].append(torch.special.entr(ls.exp()).sum(-1))
            parts["teacher_entropy"].append(torch.special.entr(q).sum(-1))
            parts["kl"].append(torch.where(q > 0, q * (lt - ls), 0.0).sum(-1))
            parts["top1"].append((ls.argmax(-1) == lt.argmax(-1)).to(dtype))
            del ls, lt, q
        device = mask.device  # the loss inputs' device: valid, quarter and every part above already live there
        values = {
            k: torch.cat(v) if v else torch.zeros(0, dtype=torch.float32, device=device) for k, v in parts.items()
        }
        sums, counts = {"health/student_entropy": values["student_entropy"].sum()}, {}
        counts["health/student_entropy"] = torch.tensor(float(len(valid)), dtype=torch.float32, device=device)
        one_hot = torch.nn.functional.one_hot(quarter, 4).to(values["kl"].dtype)  # [N, 4]
        per_quarter = one_hot.sum(0)
        for name, key in (("kl", "kl"), ("teacher_entropy", "teacher_entropy"), ("top1_agree", "top1")):
            quarter_sums = values[key] @ one_hot
            for q in range(4):
                sums[f"pos/{name}_q{q + 1}"] = quarter_sums[q]
                counts[f"pos/{name}_q{q + 1}"] = per_quarter[q]
        self._log_token_means(sums, counts)

    def _log_token_means(self, sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]) -> None:
        """Queue Σ sums / Σ counts over processes (one collective) for the next log; a key with no token is skipped."""
        keys = sorted(sums)
        device = self.accelerator.device  # the collective's device (NCCL gathers CUDA tensors only)
        local = torch.stack(
            [torch.stack([sums[k].to(device, torch.float64) for k in keys]),
             torch.stack([counts[k].to(device, torch.float64) for k in keys])]
        )  # fmt: skip
        total = self.accelerator.gather(local.unsqueeze(0)).view(-1, 2, len(keys)).sum(0).tolist()
        mode = "train" if self.model.training else "eval"
        for key, value, count in zip(keys, total[0], total[1]):
            if count > 0:
                self._metrics[mode][key].append(value / count)

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
            restore_ema_teacher(self.ema_teacher, self._resume_dir)

    def _on_train_end(self) -> None:
        """Summarise the prompts the collator cut to --max_length (counted in this process's collator)."""
        rows = getattr(self.data_collator, "truncated_rows", 0)
        if rows:
            logger.warning(
                "%d prompt row(s) were longer than --max_length %s and were cut (longest: %d tokens)%s",
                rows,
                self.args.max_length,
                self.data_collator.longest_prompt,
                "" if self.accelerator.num_processes == 1 else f" in process {self.accelerator.process_index}",
            )

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

    # --- checkpoints and resume (pwopsd.checkpoints) ------------------------------------------------------------------
    @property
    def checkpoint_layout(self) -> CheckpointLayout:
        """The files a resume of this run reads from a checkpoint (what makes one complete)."""
        return CheckpointLayout(
            adapter=is_peft_model(self.accelerator.unwrap_model(self.model)),
            ema=self.ema_teacher is not None,
            world_size=self.args.world_size,
            deepspeed=self.is_deepspeed_enabled,
            full_state=not self.args.save_only_model,
        )

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint plus `ema_teacher.pt`, between the `.pwopsd_saving` and `.pwopsd_complete` markers.

        The Trainer's own rotation (`--save_total_limit`) is suspended during its save and run once the new checkpoint
        is complete, over complete checkpoints only: a kill during the save never leaves the run without one.
        """
        run_dir = self._get_output_dir(trial)
        folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            begin_checkpoint(folder)
        self.accelerator.wait_for_everyone()  # no process writes into the folder before it is fresh
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.ema_teacher is not None and self.args.should_save:
            save_ema_teacher(self.ema_teacher, folder)
        self.accelerator.wait_for_everyone()  # every process's files (RNG state, DeepSpeed shards) are written
        if self.args.should_save:
            finish_checkpoint(folder, self.state.global_step)
            if self._health_stopped():  # this checkpoint is the broken state: keep every healthy one
                return
            for deleted in rotate_checkpoints(
                run_dir, limit, self.checkpoint_layout, keep=(folder, self.state.best_model_checkpoint)
            ):
                logger.info("deleted %s (--save_total_limit %s)", deleted, limit)

    def _health_stopped(self) -> bool:
        """A health callback (`pwopsd.health.HealthCallback`) stopped the run at this step (non-finite value, or a
        collapse with --stop_on_collapse). `control.should_training_stop` alone would also hold at --max_steps."""
        return any(getattr(cb, "fatal", None) or getattr(cb, "stopped", None) for cb in self.callback_handler.callbacks)

    def _resolve_resume(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """`True` (`--resume_from_checkpoint last`): the newest COMPLETE checkpoint of output_dir, skipping (with one
        warning, without deleting) incomplete ones; when every one is incomplete, train from step 0. A folder given
        by name must be complete."""
        layout = self.checkpoint_layout
        main = self.accelerator.is_main_process
        if resume_from_checkpoint is True:
            output_dir = self.args.output_dir
            if not checkpoint_folders(output_dir):
                raise ConfigError(f"--resume_from_checkpoint: no checkpoint-* folder in {output_dir}")
            folder, skipped = last_complete_checkpoint(output_dir, layout)
            if main and skipped:
                then = f"resuming from {folder.name}" if folder else "training starts from step 0"
                logger.warning("skipping incomplete checkpoint(s) %s: %s", describe_skipped(skipped), then)
            return None if folder is None else str(folder)
        if not resume_from_checkpoint:
            return None
        problem = checkpoint_problem(resume_from_checkpoint, layout)
        if problem:
            raise ConfigError(
                f"--resume_from_checkpoint {resume_from_checkpoint} is incomplete: {problem}; pass 'last' to resume "
                "from the newest complete checkpoint"
            )
        return str(resume_from_checkpoint)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train` from a complete checkpoint; `resume_from_checkpoint=True` picks the newest complete one."""
        resume_from_checkpoint = self._resolve_resume(resume_from_checkpoint)
        if resume_from_checkpoint and self.accelerator.is_main_process:
            logger.info("resuming from %s", resume_from_checkpoint)
        self._resume_dir = resume_from_checkpoint
        if resume_from_checkpoint and self._already_finished(resume_from_checkpoint):
            return None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _already_finished(self, checkpoint: str) -> bool:
        """A checkpoint at `--max_steps` (a run killed after its last save) has nothing left to train: load its
        weights for the final save. `Trainer.train` would run one more optimizer step (at learning rate 0, but it
        would update the EMA teacher and write `checkpoint-{max_steps + 1}`)."""
        step = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME)).global_step
        if self.args.max_steps <= 0 or step < self.args.max_steps:
            return False
        if self.accelerator.is_main_process:
            logger.info("%s is at step %d = --max_steps: nothing left to train", checkpoint, step)
        self._load_from_checkpoint(checkpoint)
        return True


EAOPSDTrainer = OPSDTrainer
"""The reference's name of the trainer that dispatches `--method` (kept so its imports keep working)."""
