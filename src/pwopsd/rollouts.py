"""Rollouts: the student samples one completion per prompt, with vLLM or with transformers `generate`.

On-policy distillation trains on the student's own samples, so each micro-batch starts by sampling one completion per
prompt from the current weights, with the training temperature (which is also the loss temperature), top-p, top-k,
min-p and repetition penalty, at most `max_completion_length` tokens (docs/architecture.md#rollout). Both engines have
the same interface, `generate(prompts) -> completions` on unpadded prompt token ids, and read the trainer's live state
(wrapped model, optimizer step) at call time:

* `VLLMRollouts` (`--use_vllm`): TRL's `VLLMGeneration` configured as the reference's engine, colocated or on a
  server. Before the first rollout of each new optimizer step the LoRA weights are merged, pushed to vLLM and unmerged
  and the prefix cache is reset (docs/architecture.md#weight-sync), so rollouts always come from the current student.
* `TransformersRollouts` (otherwise: CPU, tests): `generate` on left-padded prompts with the same sampling settings
  (the presence penalty is vLLM-only), each output cut after its first EOS id.

A completion ends with its stop token when one was sampled; `eos_token_ids` is the set of ids that count as one.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase
from trl.models import unwrap_model_for_generation

from pwopsd.batch import truncate_at_eos
from pwopsd.config import ConfigError

if TYPE_CHECKING:
    from pwopsd.config import OPSDConfig
    from pwopsd.trainer import OPSDTrainer


def eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's EOS ids."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    return ids


def make_vllm_generation(trainer: OPSDTrainer):
    """TRL's `VLLMGeneration` configured as the reference engine (docs/architecture.md#rollout).

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
            if self.mode != "colocate":  # server mode builds no engine here: only the client
                return super()._init_vllm()
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


def vllm_server_url(args: OPSDConfig) -> str:
    """The URL TRL's client connects to: `--vllm_server_base_url`, else `http://{host}:{port}`."""
    return args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"


def trl_vllm_serve_default_port() -> int:
    """The port `trl vllm-serve` listens on when given none (read from TRL, so the hint follows TRL upgrades)."""
    from dataclasses import fields

    from trl.scripts.vllm_serve import ScriptArguments

    return next(f.default for f in fields(ScriptArguments) if f.name == "port")


def vllm_server_unreachable(args: OPSDConfig) -> str:
    """One line for a refused or timed-out connection to the vLLM server: where we tried, where the server listens."""
    return (
        f"cannot reach the vLLM server at {vllm_server_url(args)} (--vllm_server_host/--vllm_server_port, or "
        f"--vllm_server_base_url) within --vllm_server_timeout {args.vllm_server_timeout:g} s: start it first with "
        f"`trl vllm-serve --model MODEL` (it listens on port {trl_vllm_serve_default_port()} unless given --port), "
        "or pass --vllm_mode colocate"
    )


class VLLMRollouts:
    """vLLM rollouts, with the weights pushed to the engine once per `vllm_sync_frequency` optimizer steps."""

    def __init__(self, trainer: OPSDTrainer) -> None:
        self.trainer = trainer
        try:
            self.engine = make_vllm_generation(trainer)
        except OSError as err:  # requests' ConnectionError: server mode could not reach the server
            if trainer.args.vllm_mode != "server":
                raise
            raise ConfigError(vllm_server_unreachable(trainer.args)) from err
        self.last_sync_step = -1

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        """One completion per prompt (token ids, ending with the stop token when one was sampled)."""
        self._maybe_sync()
        _, completions, _, _ = self.engine.generate(prompts=prompts, images=None, num_generations=1)
        return [list(map(int, c))[: self.trainer.args.max_completion_length] for c in completions]

    def _maybe_sync(self) -> None:
        """Push the current (merged) weights to vLLM once per `vllm_sync_frequency` optimizer steps."""
        step = self.trainer.state.global_step
        if step != self.last_sync_step and (
            self.last_sync_step < 0 or step - self.last_sync_step >= self.trainer.args.vllm_sync_frequency
        ):
            self.engine.sync_weights()
            self.last_sync_step = step


class TransformersRollouts:
    """transformers `generate` rollouts: the reference's fallback without vLLM, used on CPU and in the tests."""

    def __init__(self, trainer: OPSDTrainer) -> None:
        self.trainer = trainer
        args = trainer.args
        self.generation_config = GenerationConfig(
            max_new_tokens=args.max_completion_length,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k if args.top_k > 0 else None,
            min_p=args.min_p if args.min_p > 0 else None,
            repetition_penalty=args.repetition_penalty,
            pad_token_id=trainer.pad_token_id,
            eos_token_id=trainer.eos_token_ids,
            use_cache=True,
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        """`generate` on left-padded prompts, same temperature/top-p/top-k; each output cut after its first EOS id.

        The prompts are Python lists; the padded ids and mask are built directly on the device of the model's input
        embeddings (the first weights they meet), one host-to-device copy each."""
        trainer = self.trainer
        width = max(len(p) for p in prompts)
        padded = [[trainer.pad_token_id] * (width - len(p)) + list(p) for p in prompts]
        attended = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        with unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as unwrapped:
            device = unwrapped.get_input_embeddings().weight.device
            input_ids = torch.tensor(padded, dtype=torch.long, device=device)
            attention_mask = torch.tensor(attended, dtype=torch.long, device=device)
            out = unwrapped.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation_config
            )
        return [
            truncate_at_eos(row, trainer.eos_token_ids, trainer.args.max_completion_length)
            for row in out[:, width:].tolist()
        ]
