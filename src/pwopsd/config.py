"""Training configuration: TRL's `GOLDConfig` plus the flags of on-policy self-distillation.

The reference script parses TRL's `GOLDConfig`; `OPSDConfig` subclasses it so that every flag the reference accepts
is accepted here under the same name, and adds the flags the reference put on top of TRL (`--method`, the teacher
switches, the loss hyper-parameters) and pwopsd's opt-in switches, whose defaults reproduce the reference.

Inherited defaults that matter are declared again here, with their values written out, so that a different TRL
version cannot change what a run does. Contradictory or out-of-range flags are rejected when the config is built
(`__post_init__`), before any model is loaded, with a `ConfigError` that names the flag and the fix.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GOLDConfig lives in trl.experimental (as in the reference)

from trl.experimental.gold import GOLDConfig

from pwopsd.health import HealthArguments
from pwopsd.losses import METHODS, check_hparams, loss_hparam_field, loss_hparams_from_args
from pwopsd.prompts import TEACHER_THINK_MODES


class ConfigError(ValueError):
    """A user error in flags or inputs: reported as one line by the entry point, without a traceback."""


POSITION_SCHEDULE_FLAGS = ("position_w_min", "position_tau", "position_s")
SCHEDULE_FILE_KEYS = {"position_w_min": "w_min", "position_tau": "tau", "position_s": "s"}


def read_position_schedule(path: str) -> dict[str, float]:
    """The fitted PW-OPSD schedule of a `diagnose.py viability` JSON: `summary.schedule_fit.{w_min, tau, s}` as the
    three `--position_*` flags. Any unreadable, corrupt or fit-less file is a `ConfigError` naming the file."""
    where = f"--position_schedule_from {path}"
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"{where}: no such file (pass the viability.json written by `diagnose.py viability`)"
        ) from None
    except OSError as err:
        raise ConfigError(f"{where}: cannot read it: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"{where}: not a UTF-8 text file (pass the viability.json of `diagnose.py viability`)"
        ) from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{where}: not valid JSON ({err.msg}, line {err.lineno}): rerun `diagnose.py viability`"
        ) from None
    summary = data.get("summary", data) if isinstance(data, dict) else None
    fit = summary.get("schedule_fit") if isinstance(summary, dict) else None
    if not isinstance(fit, dict):
        raise ConfigError(
            f"{where}: no summary.schedule_fit in the file (is it the viability.json of `diagnose.py viability`?)"
        )
    if "error" in fit and "w_min" not in fit:
        raise ConfigError(f"{where}: the file holds no fitted schedule: {fit['error']}")
    values = {}
    for flag, key in SCHEDULE_FILE_KEYS.items():
        value = fit.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: summary.schedule_fit.{key} is {value!r}, not a finite number")
        values[flag] = float(value)
    return values


@dataclass
class OPSDConfig(GOLDConfig, HealthArguments):
    r"""`GOLDConfig` (the reference's config class) plus the reference's flags and pwopsd's opt-in switches.

    The flags the reference adds on top of TRL and their defaults are listed in docs/methods.md#flags-and-defaults.
    Every inherited default that matters is set here explicitly, so results do not drift with TRL versions; the
    launchers override several of them (docs/methods.md#why-the-cli-defaults-differ-from-the-launchers).

    Args:
        > Flags added by the reference

        method (`str | None`, *optional*, defaults to `None`):
            Distillation loss, a key of `pwopsd.losses.METHODS`: `opsd`, `pwopsd`, `eopd` or `reopold`. Required by the
            trainer.
        use_tinker_loss (`bool`, *optional*, defaults to `False`):
            opsd only: sampled-token policy-gradient reverse KL (see docs/methods.md#opsd).
        fixed_teacher (`bool`, *optional*, defaults to `False`):
            Teacher = base weights with the LoRA adapter disabled. Needs --use_peft.
        use_ema_teacher (`bool`, *optional*, defaults to `False`):
            Teacher = EMA of the trainable parameters.
        ema_decay (`float`, *optional*, defaults to `0.999`):
            EMA decay d: ema <- d*ema + (1-d)*theta.
        run_config (`str | None`, *optional*, defaults to `None`):
            Run name: appended to output_dir; WandB name {run_config}_lr{lr}_bs{batch}.
        presence_penalty (`float`, *optional*, defaults to `0.0`):
            vLLM rollout presence penalty.
        repetition_penalty (`float`, *optional*, defaults to `1.0`):
            Rollout repetition penalty.
        min_p (`float`, *optional*, defaults to `0.0`):
            Rollout min-p.
        reason_first (`bool`, *optional*, defaults to `False`):
            Not implemented (the reference's analysis prompt is unpublished): the teacher first analyses the solution.
        max_reasoning_length (`int`, *optional*, defaults to `4096`):
            reason_first only (not implemented).
        top_k_loss (`int`, *optional*, defaults to `0`):
            0 = full vocabulary; k > 0 = teacher top-k (opsd/pwopsd).
        jsd_token_clip (`float`, *optional*, defaults to `0.05`):
            Point-wise upper clip of the divergence terms (opsd/pwopsd); 0 = off.
        jsd_clip_mode (`str`, *optional*, defaults to `"pointwise"`):
            pointwise = reference (clip each (token, vocab) term, losses can be negative); token = clip the per-token
            loss itself (opt-in fix, see docs/deviations.md#upstream-issues-addressed). One of `pointwise`, `token`.
        opsd_bf16 (`bool`, *optional*, defaults to `False`):
            opsd only: element terms in bf16 as the reference (default: every loss in float32).
        position_w_min (`float`, *optional*, defaults to `0.25`):
            PW-OPSD schedule: minimum weight w_min.
        position_tau (`float`, *optional*, defaults to `0.3`):
            PW-OPSD schedule: centre tau, a fraction of the row's own length.
        position_s (`float`, *optional*, defaults to `0.1`):
            PW-OPSD schedule: sigmoid width s.
        position_global_reduction (`bool`, *optional*, defaults to `False`):
            PW-OPSD ablation: global token mean instead of the per-sequence mean.
        reopold_lambda (`float`, *optional*, defaults to `0.1`):
            REOPOLD floor lambda in (0, 1).
        reopold_beta (`float`, *optional*, defaults to `0.2`):
            REOPOLD phase-II entropy fraction beta in (0, 1].
        reopold_t_switch (`int`, *optional*, defaults to `50`):
            REOPOLD phase switch (optimizer step).

        > pwopsd additions (opt-in; the defaults reproduce the reference)

        dense_loss (`bool`, *optional*, defaults to `False`):
            Reference loss path through full [B, T, V] logits (default: chunked through the LM head).
        loss_chunk_size (`int` or `"auto"`, *optional*, defaults to `"auto"`):
            Completion positions per chunk of the chunked loss; auto = the largest power of two whose per-chunk
            buffers fit a memory budget (`pwopsd.chunked_loss.auto_chunk_size`).
        prompt_padding (`str`, *optional*, defaults to `"right"`):
            right = reference (right-padded prompts, arange position ids); left = left-padded prompts with compact
            position ids (fix for the right-padding quirk, see docs/architecture.md#distillation-batch). One of `right`,
            `left`.
        teacher_think (`str`, *optional*, defaults to `"reference"`):
            reference = teacher rendered with thinking on (OPSD #10 mismatch kept); match_student = teacher ends with
            the student's think prefix; open_think = append '<think>\n' to the teacher prompt. One of `reference`,
            `match_student`, `open_think`.
        student_enable_thinking (`bool`, *optional*, defaults to `False`):
            Render the student prompt with thinking on (reference: off).
        eos_mask (`str`, *optional*, defaults to `"pad_id"`):
            pad_id = reference (mask every pad-id token, so pad == EOS never trains the stop token); length = mask by
            completion length, keeping the first EOS. One of `pad_id`, `length`.
        rollout_batching (`str`, *optional*, defaults to `"micro_batch"`):
            micro_batch = one rollout call per micro-batch (reference); step = one call for all micro-batches of an
            optimizer step (same policy, fewer and larger engine calls: faster with gradient accumulation). One of
            `micro_batch`, `step`.
        generations_dump_steps (`int`, *optional*, defaults to `5`):
            Write output_dir/generations/generations_step_{N}.json every N steps; 0 = off.
        position_schedule_from (`str | None`, *optional*, defaults to `None`):
            PW-OPSD only: take --position_w_min/--position_tau/--position_s from the fitted schedule
            (summary.schedule_fit) of the viability.json that `diagnose.py viability` writes; do not pass those three
            flags with it.
        wandb_project (`str | None`, *optional*, defaults to `None`):
            WandB project (sets WANDB_PROJECT).

        > Inherited fields set explicitly (TRL's defaults written out; the launchers override several)

        learning_rate (`float`, *optional*, defaults to `1e-7`):
            GOLD default 1e-7; the launchers pass 5e-6.
        max_grad_norm (`float`, *optional*, defaults to `1.0`):
            Gradient-norm clip; the launchers pass 0.1.
        optim (`str`, *optional*, defaults to `"adamw_torch"`):
            Optimizer (reference: AdamW).
        lr_scheduler_type (`str`, *optional*, defaults to `"linear"`):
            Linear decay to 0 at max_steps.
        warmup_steps (`float`, *optional*, defaults to `0`):
            No warm-up.
        weight_decay (`float`, *optional*, defaults to `0.0`):
            No weight decay.
        seed (`int`, *optional*, defaults to `42`):
            Seed (also the data-sampler seed).
        max_completion_length (`int`, *optional*, defaults to `128`):
            Rollout length; launchers: 1024.
        max_length (`int | None`, *optional*, defaults to `1024`):
            Prompt truncation limit; launchers: 20000.
        temperature (`float`, *optional*, defaults to `0.9`):
            Sampling AND loss temperature; launchers: 1.1.
        top_p (`float`, *optional*, defaults to `0.95`):
            Sampling top-p (never in the loss).
        top_k (`int`, *optional*, defaults to `0`):
            Sampling top-k, 0 = off (never in the loss); launchers: 20.
        lmbda (`float`, *optional*, defaults to `0.5`):
            Stored but unused: every step is on-policy.
        beta (`float`, *optional*, defaults to `0.5`):
            GKD beta (0 = forward KL); launchers: 0.
        seq_kd (`bool`, *optional*, defaults to `False`):
            Unused.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Zero every dropout, including LoRA's.
        use_vllm (`bool`, *optional*, defaults to `False`):
            Roll out with vLLM (GPU).
        vllm_mode (`str`, *optional*, defaults to `"server"`):
            colocate | server; launchers: colocate.
        vllm_server_port (`int`, *optional*, defaults to `8000`):
            Port of the vLLM server (--vllm_mode server); `trl vllm-serve` listens on 8000 by default (GOLDConfig's
            own default, 8001, matches no server).
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.9`):
            Colocated vLLM memory fraction.
        vllm_sync_frequency (`int`, *optional*, defaults to `1`):
            Push weights to vLLM every N optimizer steps.
        vllm_enable_sleep_mode (`bool`, *optional*, defaults to `False`):
            vLLM sleep mode (reference: off).
        gradient_checkpointing (`bool`, *optional*, defaults to `True`):
            Gradient checkpointing.
        bf16 (`bool | None`, *optional*, defaults to `None`):
            bf16 mixed precision. Default: on when a CUDA device is available, off on CPU.
        report_to (`str, list[str] or None`, *optional*, defaults to `"wandb"`):
            Loggers (reference: wandb). `none` turns logging integrations off.
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Keep the raw `problem`/`solution` columns for the collator.
        dataset_kwargs (`dict[str, Any] | str | None`, *optional*, defaults to `{'skip_prepare_dataset': True}`):
            SFT dataset preparation is skipped: the collator builds the prompts.
    """

    # --- Flags added by the reference ----------------------------------------------------------------------------
    method: str | None = field(
        default=None,
        metadata={"help": "Distillation loss: " + "; ".join(f"{m.name} = {m.summary}" for m in METHODS.values()) + "."},
    )
    use_tinker_loss: bool = loss_hparam_field("use_tinker_loss")
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
        default=False,
        metadata={
            "help": "Not implemented (the reference's analysis prompt is unpublished): the teacher first analyses the "
            "solution."
        },
    )
    max_reasoning_length: int = field(default=4096, metadata={"help": "reason_first only (not implemented)."})
    top_k_loss: int = loss_hparam_field("top_k_loss")
    jsd_token_clip: float = loss_hparam_field("jsd_token_clip")
    jsd_clip_mode: str = loss_hparam_field("jsd_clip_mode")
    opsd_bf16: bool = loss_hparam_field("opsd_bf16")
    position_w_min: float = loss_hparam_field("position_w_min")
    position_tau: float = loss_hparam_field("position_tau")
    position_s: float = loss_hparam_field("position_s")
    position_global_reduction: bool = loss_hparam_field("position_global_reduction")
    reopold_lambda: float = loss_hparam_field("reopold_lambda")
    reopold_beta: float = loss_hparam_field("reopold_beta")
    reopold_t_switch: int = loss_hparam_field("reopold_t_switch")

    # --- pwopsd additions (opt-in; defaults reproduce the reference) ---------------------------------------------
    dense_loss: bool = field(
        default=False,
        metadata={"help": "Reference loss path through full [B, T, V] logits (default: chunked through the LM head)."},
    )
    loss_chunk_size: str = field(
        default="auto",
        metadata={
            "help": "Completion positions per chunk of the chunked loss: an integer >= 1, or auto (the largest power "
            "of two whose per-chunk buffers fit min(1 GiB, 5% of free GPU memory), 512 MiB on CPU; "
            "pwopsd.chunked_loss.auto_chunk_size)."
        },
    )
    prompt_padding: str = field(
        default="right",
        metadata={
            "help": "right = reference (right-padded prompts, arange position ids); left = left-padded prompts with "
            "compact position ids (fix for the right-padding quirk, see docs/architecture.md#distillation-batch).",
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
    position_schedule_from: str | None = field(
        default=None,
        metadata={
            "help": "PW-OPSD only: take --position_w_min/--position_tau/--position_s from the fitted schedule "
            "(summary.schedule_fit) of the viability.json that `diagnose.py viability` writes; do not pass those "
            "three flags with it."
        },
    )
    wandb_project: str | None = field(default=None, metadata={"help": "WandB project (sets WANDB_PROJECT)."})

    # --- Inherited fields set explicitly -------------------------------------------------------------------------
    # The values are the defaults of TRL's GKD/GOLD configs (and transformers' TrainingArguments) that the reference
    # inherits, written out so that another TRL version cannot change them. Several are not the paper's settings: they
    # are kept on purpose, so that the script run without those flags behaves as the reference's script; the
    # launchers pass the paper's values (docs/methods.md#why-the-cli-defaults-differ-from-the-launchers).
    # TRL's GKD/GOLD default, kept as the reference's; the launchers pass the paper's 5e-6.
    learning_rate: float = field(default=1e-7, metadata={"help": "GOLD default 1e-7; the launchers pass 5e-6."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip; the launchers pass 0.1."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (reference: AdamW)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Linear decay to 0 at max_steps."})
    warmup_steps: float = field(default=0, metadata={"help": "No warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "No weight decay."})
    seed: int = field(default=42, metadata={"help": "Seed (also the data-sampler seed)."})
    # TRL's GKD/GOLD default, kept as the reference's; the launchers pass the paper's 1024.
    max_completion_length: int = field(default=128, metadata={"help": "Rollout length; launchers: 1024."})
    # TRL's SFT default, kept as the reference's; the launchers pass 20000.
    max_length: int | None = field(default=1024, metadata={"help": "Prompt truncation limit; launchers: 20000."})
    # TRL's GKD/GOLD default, kept as the reference's; the launchers pass the paper's 1.1.
    temperature: float = loss_hparam_field("temperature")
    top_p: float = field(default=0.95, metadata={"help": "Sampling top-p (never in the loss)."})
    top_k: int = field(default=0, metadata={"help": "Sampling top-k, 0 = off (never in the loss); launchers: 20."})
    # TRL's GKD/GOLD default, kept as the reference's (unused here: every step is on-policy); the launchers pass 1.
    lmbda: float = field(default=0.5, metadata={"help": "Stored but unused: every step is on-policy."})
    # TRL's GKD/GOLD default (the generalised JSD), kept as the reference's; the launchers pass the paper's 0.
    beta: float = loss_hparam_field("beta")
    seq_kd: bool = field(default=False, metadata={"help": "Unused."})
    disable_dropout: bool = field(default=True, metadata={"help": "Zero every dropout, including LoRA's."})
    use_vllm: bool = field(default=False, metadata={"help": "Roll out with vLLM (GPU)."})
    vllm_mode: str = field(default="server", metadata={"help": "colocate | server; launchers: colocate."})
    # GOLDConfig's default is 8001, but `trl vllm-serve` (and `vllm serve`) listen on 8000 by default: meet them.
    vllm_server_port: int = field(
        default=8000,
        metadata={"help": "Port of the vLLM server (--vllm_mode server); `trl vllm-serve` listens on 8000 by default."},
    )
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
                "--reason_first is not implemented (the reference's analysis prompt is unpublished; no run uses it): "
                "drop the flag"
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
        self.apply_position_schedule_file()
        self.validate_loss_hparams()
        self.validate_sampling()
        self.loss_chunk_size = _chunk_size(self.loss_chunk_size)
        if self.generations_dump_steps < 0:
            raise ConfigError(f"--generations_dump_steps must be >= 0, got {self.generations_dump_steps}")
        try:  # HealthArguments.__post_init__ is not on this MRO path (GOLDConfig's does not call super's)
            self.validate_health_flags()
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def apply_position_schedule_file(self) -> None:
        """`--position_schedule_from FILE`: the file's fitted schedule replaces the three `--position_*` flags.

        Passing both is refused (which would win is a guess): in code, when any of the three differs from its
        default; on the command line the entry point also refuses them given explicitly with default values.
        """
        path = self.position_schedule_from
        if path is None:
            return
        if self.method is not None and self.method != "pwopsd":
            raise ConfigError(
                f"--position_schedule_from sets the PW-OPSD schedule, but --method is {self.method}: use --method "
                "pwopsd or drop the flag"
            )
        schedule = read_position_schedule(path)
        defaults = {f.name: f.default for f in fields(OPSDConfig) if f.name in POSITION_SCHEDULE_FLAGS}
        current = {name: getattr(self, name) for name in POSITION_SCHEDULE_FLAGS}
        given = [name for name in POSITION_SCHEDULE_FLAGS if current[name] != defaults[name]]
        if given and current != schedule:  # equal: this config was already built from the file (a re-validation)
            raise ConfigError(
                f"--position_schedule_from {path} sets the schedule; drop {', '.join('--' + g for g in given)}"
            )
        for name, value in schedule.items():
            setattr(self, name, value)

    def validate_sampling(self) -> None:
        """The rollout sampling flags, checked now rather than by the engine minutes later (vLLM checks them when the
        first rollout is requested, after the model and the engine have loaded).

        The upper bounds are vLLM's own (`SamplingParams`: temperature in [0, 2], presence penalty in [-2, 2]) and
        apply with `--use_vllm` only: transformers `generate` accepts any temperature > 0 (which is also the loss
        temperature, where a value above 2 is mathematically fine) and ignores the presence penalty.
        """
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"--min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            raise ConfigError(f"--repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not self.use_vllm:
            return
        if not self.temperature <= 2.0:  # > 0 and finite: the loss check
            raise ConfigError(
                f"--temperature {self.temperature} is above 2, the most vLLM accepts (--use_vllm): lower it, or roll "
                "out with transformers generate (drop --use_vllm)"
            )
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ConfigError(
                f"--presence_penalty must be in [-2, 2] for vLLM (--use_vllm), got {self.presence_penalty}"
            )

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


def _chunk_size(value: int | str) -> int | str:
    """`--loss_chunk_size`: "auto" or an integer >= 1 (given as an int in code, as text on the command line)."""
    if value == "auto":
        return value
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--loss_chunk_size must be an integer >= 1 or auto, got {value!r}")
    return int(text)
