"""Training health: notice when a run goes wrong from its logged metrics, warn once, and stop when asked.

A distillation run can fail silently: a NaN poisons the weights and every later step is wasted, or the student slides
into a degenerate policy (answers shrinking to nothing, completions that never stop, the clipped loss driven negative,
the sampling distribution collapsing) while the loss still looks fine. `HealthCallback` watches the metrics the trainer
logs anyway and reports each kind of failure once, as one log line and, when a WandB run is active, as a WandB alert and
summary keys.

The rules are pure functions over the stream of logged values of one metric (oldest first) that say whether the rule
holds at the stream's end; the callback only keeps the streams and acts. Streams count *logged* values, not optimizer
steps: with `--logging_steps 2` a window of 5 spans 10 optimizer steps. A metric that is never logged is never checked.

- **Non-finite** (`loss` or `grad_norm` NaN/inf): fatal. The callback asks for a checkpoint (for inspection), stops
  training and sets `callback.fatal` to a one-line message. The checkpoint is renamed `nonfinite-checkpoint-{N}` so that
  `--resume_from_checkpoint last` (and the launchers) resume from the last healthy `checkpoint-*`, not from NaN weights.
  Note: transformers' `--logging_nan_inf_filter` (on by default) replaces a NaN *loss* by the running mean before it is
  logged; the gradient norm of that step is not filtered, so a NaN is still caught through `grad_norm`.
- **Collapse** kinds (length, clipped, neg_token, entropy): a warning; with `--stop_on_collapse` also a checkpoint and a
  clean stop, with `callback.stopped` set to the message.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

LENGTH_KEY = "completions/mean_length"
CLIPPED_KEY = "completions/clipped_ratio"
NEG_TOKEN_KEY = "opsd/neg_token_fraction"
ENTROPY_KEY = "health/student_entropy"
NONFINITE_KEYS = ("loss", "grad_norm")
NONFINITE_PREFIX = "nonfinite-"
"""A non-finite checkpoint `checkpoint-N` is renamed `nonfinite-checkpoint-N`: no resume or launcher glob matches it."""


@dataclass
class HealthArguments:
    """The health-check flags, mixed into the training config (every name is unique there: `health_` prefix).

    Windows and the early period count logged values (one every `--logging_steps` optimizer steps).
    """

    health_checks: bool = field(
        default=True,
        metadata={"help": "Watch the logged metrics and warn (log line, WandB alert) when a run goes wrong; a "
                  "non-finite loss or gradient norm always saves a checkpoint and stops. false = no checks."},
    )  # fmt: skip
    health_early_steps: int = field(
        default=5,
        metadata={"help": "The early-run level of a metric is the mean of its first N logged values (the baseline of "
                  "the length, entropy and neg-token rules)."},
    )  # fmt: skip
    health_window: int = field(
        default=5,
        metadata={"help": "A collapse must hold for this many consecutive logged values (after the early period for "
                  "the rules that use the early level) before it is reported."},
    )  # fmt: skip
    health_min_length_ratio: float = field(
        default=0.5,
        metadata={"help": "Length collapse: completions/mean_length below this fraction of its early level for "
                  "--health_window logs."},
    )  # fmt: skip
    health_max_clipped_ratio: float = field(
        default=0.95,
        metadata={"help": "Runaway completions: completions/clipped_ratio (share hitting --max_completion_length) at "
                  "or above this for --health_window logs."},
    )  # fmt: skip
    health_max_neg_token_fraction: float = field(
        default=0.5,
        metadata={"help": "Neg-token surge: opsd/neg_token_fraction above this (absolute) for --health_window logs "
                  "(or above --health_neg_token_surge times its early level)."},
    )  # fmt: skip
    health_neg_token_surge: float = field(
        default=4.0,
        metadata={"help": "Neg-token surge: opsd/neg_token_fraction above this multiple of its early level (when that "
                  "level is > 0) for --health_window logs."},
    )  # fmt: skip
    health_min_entropy_ratio: float = field(
        default=0.25,
        metadata={"help": "Entropy collapse: health/student_entropy below this fraction of its early level for "
                  "--health_window logs."},
    )  # fmt: skip
    stop_on_collapse: bool = field(
        default=False,
        metadata={"help": "On a collapse warning (length, clipped, neg-token, entropy) also save a checkpoint and stop "
                  "training cleanly, instead of only warning."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.validate_health_flags()

    def validate_health_flags(self) -> None:
        """Reject out-of-range thresholds with a message naming the flag (a mixing config must call this itself)."""
        for name in ("health_early_steps", "health_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
        open_unit = ("health_min_length_ratio", "health_min_entropy_ratio")
        half_open_unit = ("health_max_clipped_ratio", "health_max_neg_token_fraction")
        for name in (*open_unit, *half_open_unit, "health_neg_token_surge"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"--{name} must be a finite number, got {value!r}")
        for name in open_unit:
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(
                    f"--{name} must be in (0, 1) (a fraction of the early level), got {getattr(self, name)}"
                )
        for name in half_open_unit:
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in (0, 1], got {getattr(self, name)}")
        if self.health_neg_token_surge <= 1.0:
            raise ValueError(
                f"--health_neg_token_surge must be > 1 (a multiple of the early level), got {self.health_neg_token_surge}"
            )


# ---------------------------------------------------------------------------------------------------------------------
# Rules: pure functions of one metric's stream of logged values (oldest first); True = the rule holds at its end
# ---------------------------------------------------------------------------------------------------------------------
def nonfinite_keys(logs: Mapping[str, Any]) -> list[str]:
    """The keys among `loss`, `grad_norm` whose logged value is NaN or +-inf (a poisoned step: weights are lost)."""
    bad = []
    for key in NONFINITE_KEYS:
        value = logs.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            bad.append(key)
    return bad


def early_level(stream: Sequence[float], early: int) -> float | None:
    """The mean of the first `early` values, or None while fewer have been logged."""
    if len(stream) < early:
        return None
    return math.fsum(stream[:early]) / early


def fell_below(stream: Sequence[float], *, early: int, window: int, ratio: float) -> bool:
    """The last `window` values all lie strictly below `ratio` × the early level (mean of the first `early` values).

    The window must lie entirely after the early period (stream length >= early + window), and the early level must be
    > 0 (nothing can collapse from 0). Used for the length and entropy collapses.
    """
    if len(stream) < early + window:
        return False
    base = early_level(stream, early)
    if base is None or not base > 0:
        return False
    return all(v < ratio * base for v in stream[-window:])


def length_collapsed(stream: Sequence[float], *, early: int, window: int, ratio: float) -> bool:
    """Length collapse: `completions/mean_length` below `ratio` × its early level for `window` logs (`fell_below`)."""
    return fell_below(stream, early=early, window=window, ratio=ratio)


def entropy_collapsed(stream: Sequence[float], *, early: int, window: int, ratio: float) -> bool:
    """Entropy collapse: `health/student_entropy` below `ratio` × its early level for `window` logs (`fell_below`)."""
    return fell_below(stream, early=early, window=window, ratio=ratio)


def clipped(stream: Sequence[float], *, window: int, threshold: float) -> bool:
    """Runaway completions: the last `window` values of `completions/clipped_ratio` are all >= `threshold`."""
    return len(stream) >= window and all(v >= threshold for v in stream[-window:])


def neg_token_surged(stream: Sequence[float], *, early: int, window: int, max_fraction: float, surge: float) -> bool:
    """Neg-token surge: each of the last `window` values of `opsd/neg_token_fraction` is high.

    A value at (0-based) position j is high when it is > `max_fraction`, or when j >= `early` (after the early period),
    the early level (mean of the first `early` values) is > 0 and the value is > `surge` × that level.
    """
    n = len(stream)
    if n < window:
        return False
    base = early_level(stream, early)
    relative = base is not None and base > 0

    def high(j: int) -> bool:
        v = stream[j]
        return v > max_fraction or (relative and j >= early and v > surge * base)

    return all(high(j) for j in range(n - window, n))


# ---------------------------------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------------------------------
COLLAPSE_KINDS = ("length", "clipped", "neg_token", "entropy")
KIND_KEYS = {"length": LENGTH_KEY, "clipped": CLIPPED_KEY, "neg_token": NEG_TOKEN_KEY, "entropy": ENTROPY_KEY}


class HealthCallback(TrainerCallback):
    """Applies the rules to every training log; warns once per kind; stops on a non-finite value (and on a collapse with
    `--stop_on_collapse`).

    `config` is any object with the `HealthArguments` fields (the training config once they are mixed in). Decisions
    are taken on every process (the logged values are already averaged over processes, so all agree and stop together);
    only the world process zero writes the warnings. After the run: `fatal` (non-finite: the CLI reports it and exits 2)
    and `stopped` (a collapse stop), else None; `warned` lists the kinds reported, in order.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.streams: dict[str, list[float]] = {}
        self.warned: list[str] = []
        self.fatal: str | None = None
        self.stopped: str | None = None
        self._rename_step: int | None = None

    # --- trainer events -----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        """Rebuild the streams from the log history, so a resumed run keeps its early level and windows."""
        self.streams = {}
        self.warned = []
        self.fatal = self.stopped = None
        self._rename_step = None
        if not self.config.health_checks:
            return control
        for entry in state.log_history:
            self._append(entry)
            for kind in self._fired():
                if kind not in self.warned:
                    self.warned.append(kind)  # reported by the run before the resume
        if self.warned and state.is_world_process_zero:
            logger.info("health: already reported before this resume: %s", ", ".join(self.warned))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.config.health_checks or not logs or self.fatal is not None:
            return control
        step = state.global_step
        bad = nonfinite_keys(logs)
        if bad:
            self._rename_step = step
            where = os.path.join(args.output_dir, f"{NONFINITE_PREFIX}checkpoint-{step}")
            values = ", ".join(f"{key}={logs[key]}" for key in bad)
            self.fatal = (
                f"non-finite {values} at step {step}: training stopped, the state is saved in {where} for inspection "
                f"(a resume starts from the last healthy checkpoint-*); lower --learning_rate or --max_grad_norm"
            )
            control.should_save = True
            control.should_training_stop = True
            self._report("nonfinite", self.fatal, step, state, error=True)
            return control
        self._append(logs)
        for kind in self._fired():
            if kind in self.warned:
                continue
            message = self._message(kind, step)
            if self.config.stop_on_collapse:
                message += "; training stopped with a checkpoint (--stop_on_collapse)"
                self.stopped = self.stopped or message
                control.should_save = True
                control.should_training_stop = True
            else:
                message += " (--stop_on_collapse stops such runs)"
            self._report(kind, message, step, state, error=False)
        return control

    def on_save(self, args, state, control, **kwargs):
        """Move a non-finite checkpoint out of the way of `--resume_from_checkpoint last`."""
        if self._rename_step is None or self._rename_step != state.global_step:
            return control
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every process has written its part of the checkpoint
        if args.should_save:
            source = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            target = os.path.join(args.output_dir, f"{NONFINITE_PREFIX}checkpoint-{state.global_step}")
            if os.path.isdir(source):
                if os.path.isdir(target):
                    shutil.rmtree(target)  # left by an earlier failed attempt at the same step
                os.replace(source, target)
        PartialState().wait_for_everyone()
        self._rename_step = None
        return control

    # --- helpers ------------------------------------------------------------------------------------------------
    def _append(self, logs: Mapping[str, Any]) -> None:
        for key in KIND_KEYS.values():
            value = logs.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.streams.setdefault(key, []).append(float(value))

    def _fired(self) -> list[str]:
        """The collapse kinds whose rule holds at the end of their stream."""
        c = self.config
        s = self.streams
        fired = []
        if length_collapsed(s.get(LENGTH_KEY, []), early=c.health_early_steps, window=c.health_window,
                            ratio=c.health_min_length_ratio):  # fmt: skip
            fired.append("length")
        if clipped(s.get(CLIPPED_KEY, []), window=c.health_window, threshold=c.health_max_clipped_ratio):
            fired.append("clipped")
        if neg_token_surged(s.get(NEG_TOKEN_KEY, []), early=c.health_early_steps, window=c.health_window,
                            max_fraction=c.health_max_neg_token_fraction, surge=c.health_neg_token_surge):  # fmt: skip
            fired.append("neg_token")
        if entropy_collapsed(s.get(ENTROPY_KEY, []), early=c.health_early_steps, window=c.health_window,
                             ratio=c.health_min_entropy_ratio):  # fmt: skip
            fired.append("entropy")
        return fired

    def _message(self, kind: str, step: int) -> str:
        c = self.config
        key = KIND_KEYS[kind]
        stream = self.streams[key]
        last = stream[-1]
        w = c.health_window
        base = early_level(stream, c.health_early_steps)
        early = (
            f"its early level {base:.4g} (mean of the first {c.health_early_steps} logs)" if base is not None else ""
        )
        if kind == "length":
            what = (f"{key} below {c.health_min_length_ratio} x {early} for {w} logs (last {last:.4g}): the student's "
                    "answers are shrinking")  # fmt: skip
        elif kind == "clipped":
            what = (f"{key} >= {c.health_max_clipped_ratio} for {w} logs (last {last:.4g}): completions run into "
                    "--max_completion_length (runaway length or repetition)")  # fmt: skip
        elif kind == "neg_token":
            relative = f" or {c.health_neg_token_surge} x {early}" if base else ""
            what = (f"{key} above {c.health_max_neg_token_fraction}{relative} for {w} logs (last {last:.4g}): the "
                    "clipped loss is being driven negative")  # fmt: skip
        else:
            what = (f"{key} below {c.health_min_entropy_ratio} x {early} for {w} logs (last {last:.4g}): the "
                    "student's distribution is collapsing")  # fmt: skip
        return f"{kind} collapse at step {step}: {what}"

    def _report(self, kind: str, message: str, step: int, state, *, error: bool) -> None:
        """One log line and, on the main process with an active WandB run, an alert and summary keys; once per kind."""
        self.warned.append(kind)
        if not state.is_world_process_zero:
            return
        logger.warning("health: %s", message)
        wandb = sys.modules.get("wandb")  # imported by the WandB integration when a run reports there
        run = getattr(wandb, "run", None) if wandb is not None else None
        if run is None:
            return
        try:
            run.summary["health/warning"] = message
            run.summary[f"health/{kind}_step"] = step
            run.alert(title=f"pwopsd health: {kind}", text=message, level="ERROR" if error else "WARN")
        except Exception as err:  # an unreachable WandB must not end the run: the log line is written
            logger.warning("health: could not send the WandB alert: %s", str(err).partition("\n")[0])
