"""The teacher: which weights score the student's completion, and how they are put in place for one forward pass.

Self-distillation has no second model: the teacher is the student's own network reading the privileged prompt (the
problem plus its reference solution). What differs is the weights it runs with, chosen by the flags
(docs/architecture.md#teacher):

* `fixed` (`--fixed_teacher`, every launcher; needs `--use_peft`): the base weights, by disabling the LoRA adapter,
  i.e. the step-0 policy;
* `ema` (`--use_ema_teacher`): an exponential moving average of the trainable parameters, swapped into the model for
  the teacher pass, saved next to each checkpoint as `ema_teacher.pt` and restored on resume;
* `dynamic` (neither flag): the current student.

The teacher pass always runs without gradient, so its outputs are constants in the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from torch import nn

from pwopsd.checkpoints import EMA_FILE
from pwopsd.config import ConfigError

logger = logging.getLogger(__name__)


class EMATeacher:
    """EMA of the trainable parameters: `ema <- d*ema + (1-d)*theta` after each optimizer step.

    Initialised lazily from the weights after the first optimizer step, as the reference; until then the teacher is the
    current student. `swapped_in()` copies the EMA into the parameters for the teacher pass and restores them after.

    Devices: each shadow (and each backup of `swapped_in`) is a clone of its own parameter, so it lives on that
    parameter's device and dtype, and every update and swap is an in-place op between the two (no host round trip,
    whatever device each parameter sits on). Only `state_dict` moves the shadows to the CPU (a device-independent
    file); `load_state_dict` puts each one back on its parameter's device and dtype.
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


def check_teacher_model(teacher_mode: str, model: nn.Module, peft_config: Any) -> None:
    """The fixed teacher is the model with its LoRA adapter disabled: refuse a model that has no adapter to disable."""
    if teacher_mode == "fixed" and peft_config is None and not is_peft_model(model):
        raise ConfigError("--fixed_teacher needs --use_peft (the teacher is the base with the adapter disabled)")


def teacher_context(teacher_mode: str, model: nn.Module, ema_teacher: EMATeacher | None) -> AbstractContextManager[Any]:
    """Route the teacher pass: adapter disabled (fixed), EMA weights swapped in (ema), or as-is (dynamic)."""
    if teacher_mode == "fixed":
        return model.disable_adapter()
    if teacher_mode == "ema":
        return ema_teacher.swapped_in()
    return nullcontext()


def save_ema_teacher(ema_teacher: EMATeacher, checkpoint_dir: str | Path) -> None:
    """Write the EMA weights into a checkpoint folder, so that resuming from it continues the same average."""
    torch.save(ema_teacher.state_dict(), Path(checkpoint_dir) / EMA_FILE)


def restore_ema_teacher(ema_teacher: EMATeacher, checkpoint_dir: str | Path) -> None:
    """Load the EMA weights of a checkpoint folder, if it has them (a checkpoint of another teacher mode has not)."""
    path = Path(checkpoint_dir) / EMA_FILE
    if path.exists():
        ema_teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("EMA teacher restored from %s", path)
