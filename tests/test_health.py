"""Training health: each rule against a naive re-implementation on random metric streams, once-per-kind warnings, the
stop semantics, the flag checks, WandB reporting, and one real tiny run poisoned with a NaN."""

from __future__ import annotations

import json
import logging
import math
import random
import re
from pathlib import Path

import pytest
import torch
from test_trainer import ROWS, make_args, make_trainer
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from pwopsd import health
from pwopsd.health import (
    CLIPPED_KEY,
    ENTROPY_KEY,
    LENGTH_KEY,
    NEG_TOKEN_KEY,
    HealthArguments,
    HealthCallback,
)

KEYS = {"length": LENGTH_KEY, "clipped": CLIPPED_KEY, "neg_token": NEG_TOKEN_KEY, "entropy": ENTROPY_KEY}


# ---------------------------------------------------------------------------------------------------------------------
# Naive rules: a run-length counter over per-value "bad" flags (the module checks windows at the stream's end instead)
# ---------------------------------------------------------------------------------------------------------------------
def naive_first_trigger(stream: list[float], bad, window: int) -> int | None:
    run = 0
    for i in range(len(stream)):
        run = run + 1 if bad(i) else 0
        if run >= window:
            return i
    return None


def naive_mean(values: list[float]) -> float:
    total = 0.0
    for v in values:
        total += v
    return total / len(values)


def naive(kind: str, s: list[float], h: HealthArguments) -> int | None:
    k, w = h.health_early_steps, h.health_window
    base = naive_mean(s[:k]) if len(s) >= k else None
    if kind in ("length", "entropy"):
        ratio = h.health_min_length_ratio if kind == "length" else h.health_min_entropy_ratio
        return naive_first_trigger(s, lambda i: i >= k and base > 0 and s[i] < ratio * base, w)
    if kind == "clipped":
        return naive_first_trigger(s, lambda i: s[i] >= h.health_max_clipped_ratio, w)
    surge = h.health_neg_token_surge

    def bad(i: int) -> bool:
        return s[i] > h.health_max_neg_token_fraction or (i >= k and base > 0 and s[i] > surge * base)

    return naive_first_trigger(s, bad, w)


def random_stream(kind: str, rng: random.Random, n: int) -> list[float]:
    """Two regimes (healthy / failing) switching at random, so windows of failure of every length occur."""
    failing = False
    out = []
    for i in range(n):
        if i > 3 and rng.random() < 0.3:
            failing = not failing
        if kind == "length":
            out.append(rng.uniform(5, 45) if failing else rng.uniform(60, 120))
        elif kind == "entropy":
            out.append(rng.uniform(0.01, 0.3) if failing else rng.uniform(0.5, 2.0))
        elif kind == "clipped":  # exact threshold and 1.0 values test the >= edge
            out.append(rng.choice([0.9, 1.0, rng.uniform(0.9, 1.0)]) if failing else rng.uniform(0.0, 0.95))
        else:
            out.append(rng.uniform(0.2, 0.8) if failing else rng.uniform(0.0, 0.12))
    return out


def random_health(rng: random.Random) -> HealthArguments:
    return HealthArguments(
        health_early_steps=rng.randint(1, 6),
        health_window=rng.randint(1, 6),
        health_min_length_ratio=rng.uniform(0.3, 0.6),
        health_max_clipped_ratio=0.9,
        health_max_neg_token_fraction=rng.choice([0.5, 0.7, 1.0]),
        health_neg_token_surge=rng.uniform(1.5, 6.0),
        health_min_entropy_ratio=rng.uniform(0.2, 0.5),
    )


@pytest.fixture(scope="module")
def train_args(tmp_path_factory) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path_factory.mktemp("health")), report_to="none")


def feed(cb: HealthCallback, args, logs_list: list[dict], state: TrainerState | None = None, start: int = 0):
    """Feed logs as steps start+1, start+2, ...; return (state, control, {kind: index of its first warning})."""
    state = state or TrainerState()
    control = TrainerControl()
    first: dict[str, int] = {}
    for i, logs in enumerate(logs_list):
        state.global_step = start + i + 1
        before = set(cb.warned)
        control = cb.on_log(args, state, control, logs=logs)
        for kind in set(cb.warned) - before:
            first[kind] = start + i
    return state, control, first


RULES = {
    "length": lambda s, h: health.length_collapsed(
        s, early=h.health_early_steps, window=h.health_window, ratio=h.health_min_length_ratio
    ),
    "entropy": lambda s, h: health.entropy_collapsed(
        s, early=h.health_early_steps, window=h.health_window, ratio=h.health_min_entropy_ratio
    ),
    "clipped": lambda s, h: health.clipped(s, window=h.health_window, threshold=h.health_max_clipped_ratio),
    "neg_token": lambda s, h: health.neg_token_surged(
        s,
        early=h.health_early_steps,
        window=h.health_window,
        max_fraction=h.health_max_neg_token_fraction,
        surge=h.health_neg_token_surge,
    ),
}


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_rule_first_trigger_matches_naive_rule_on_random_streams(kind, train_args):
    rng = random.Random(f"health-{kind}")
    fired = quiet = 0
    for _ in range(300):
        h = random_health(rng)
        stream = random_stream(kind, rng, 30)
        expected = naive(kind, stream, h)
        pure = next((i for i in range(len(stream)) if RULES[kind](stream[: i + 1], h)), None)
        _, control, first = feed(HealthCallback(h), train_args, [{KEYS[kind]: v} for v in stream])
        assert pure == expected, (kind, stream, h)
        assert first.get(kind) == expected, (kind, stream, h)
        assert not control.should_training_stop  # warnings only without --stop_on_collapse
        fired += expected is not None
        quiet += expected is None
    assert fired > 30 and quiet > 30, (fired, quiet)  # both outcomes are exercised


def test_neg_token_relative_and_absolute_thresholds():
    h = HealthArguments(health_early_steps=2, health_window=2, health_max_neg_token_fraction=0.5,
                        health_neg_token_surge=4.0)  # fmt: skip
    rule = RULES["neg_token"]
    assert rule([0.05, 0.05, 0.21, 0.21], h)  # 0.21 > 4 x 0.05
    assert not rule([0.05, 0.05, 0.2, 0.21], h)  # 0.2 is not above 4 x 0.05
    assert rule([0.6, 0.6], h)  # absolute, before any early level
    assert not rule([0.0, 0.0, 0.3, 0.3], h)  # early level 0: only the absolute threshold applies
    assert not rule([0.05, 0.3, 0.9], h)  # 0.3 sits in the early period: the relative test does not apply to it


def test_collapse_edges_strictly_below_after_the_early_period():
    h = HealthArguments(health_early_steps=2, health_window=2, health_min_length_ratio=0.5)
    rule = RULES["length"]
    assert not rule([100.0, 100.0, 50.0, 50.0], h)  # exactly half the early level is not below it
    assert rule([100.0, 100.0, 49.99, 49.99], h)
    assert not rule([100.0, 100.0, 49.99], h)  # the window is not full yet
    assert not rule([0.0, 0.0, 0.0, 0.0], h)  # nothing collapses from an early level of 0


def test_one_warning_per_kind_however_long_the_failure_lasts(train_args, caplog):
    h = HealthArguments(health_early_steps=2, health_window=3)
    healthy = {
        LENGTH_KEY: 100.0,
        CLIPPED_KEY: 0.1,
        NEG_TOKEN_KEY: 0.05,
        ENTROPY_KEY: 1.0,
        "loss": 0.3,
        "grad_norm": 1.0,
    }
    failing = {LENGTH_KEY: 10.0, CLIPPED_KEY: 1.0, NEG_TOKEN_KEY: 0.9, ENTROPY_KEY: 0.01, "loss": 0.3, "grad_norm": 1.0}
    cb = HealthCallback(h)
    with caplog.at_level(logging.WARNING, logger="pwopsd.health"):
        _, control, first = feed(cb, train_args, [healthy] * 2 + [failing] * 20 + [healthy] * 3 + [failing] * 10)
    records = [r.getMessage() for r in caplog.records]
    assert len(records) == 4, records
    assert sorted(cb.warned) == sorted(KEYS)
    assert first == {"length": 4, "clipped": 4, "neg_token": 4, "entropy": 4}  # logs 2, 3, 4 are the first window
    assert all("\n" not in m and m.startswith("health: ") for m in records)
    length = next(m for m in records if LENGTH_KEY in m)
    assert "below 0.5 x its early level 100 (mean of the first 2 logs) for 3 logs (last 10)" in length
    assert "at step 5" in length and "--stop_on_collapse stops such runs" in length
    assert not control.should_save and not control.should_training_stop and cb.stopped is None and cb.fatal is None


@pytest.mark.parametrize(("logs", "key"), [
    ({"loss": float("nan"), "grad_norm": 1.0}, "loss=nan"),
    ({"loss": 0.2, "grad_norm": float("inf")}, "grad_norm=inf"),
    ({"loss": float("-inf"), "grad_norm": float("nan")}, "loss=-inf, grad_norm=nan"),
])  # fmt: skip
def test_nonfinite_value_saves_stops_and_sets_fatal(train_args, caplog, logs, key):
    cb = HealthCallback(HealthArguments())
    healthy = {"loss": 0.3, "grad_norm": 0.5}
    with caplog.at_level(logging.WARNING, logger="pwopsd.health"):
        state, control, _ = feed(cb, train_args, [healthy, healthy])
        assert not control.should_save and not control.should_training_stop
        state.global_step = 3
        control = cb.on_log(train_args, state, control, logs=logs)
        assert control.should_save and control.should_training_stop
        assert cb.fatal.startswith(f"non-finite {key} at step 3: training stopped")
        assert "nonfinite-checkpoint-3 for inspection" in cb.fatal and "\n" not in cb.fatal
        fatal = cb.fatal
        state.global_step = 4
        cb.on_log(train_args, state, TrainerControl(), logs={"loss": float("nan")})
    assert cb.fatal == fatal and cb.warned == ["nonfinite"]
    assert [r.getMessage() for r in caplog.records] == [f"health: {fatal}"]


def test_stop_on_collapse_stops_with_a_checkpoint_only_when_asked(train_args):
    stream = [{LENGTH_KEY: v} for v in (100, 100, 100, 20, 20, 20)]
    for stop in (False, True):
        cb = HealthCallback(HealthArguments(health_early_steps=3, health_window=3, stop_on_collapse=stop))
        _, control, first = feed(cb, train_args, stream[:-1])
        assert not control.should_save and not control.should_training_stop and not cb.warned
        _, control, first = feed(cb, train_args, stream[-1:], start=5)
        assert first == {"length": 5}
        assert control.should_save is stop and control.should_training_stop is stop
        assert cb.fatal is None
        if stop:
            assert cb.stopped.startswith("length collapse at step 6: ")
            assert cb.stopped.endswith("; training stopped with a checkpoint (--stop_on_collapse)")
        else:
            assert cb.stopped is None


def test_health_checks_off_does_nothing(train_args):
    cb = HealthCallback(HealthArguments(health_checks=False, health_early_steps=1, health_window=1))
    _, control, _ = feed(cb, train_args, [{"loss": float("nan"), LENGTH_KEY: 1.0, CLIPPED_KEY: 1.0}] * 3)
    assert not control.should_training_stop and cb.fatal is None and not cb.warned


@pytest.mark.parametrize("split", [0, 3, 6, 9, 12])
def test_resume_rebuilds_the_streams_from_the_log_history(train_args, split):
    # the early level and windows survive a resume: same first trigger, and a kind reported before is not repeated
    h = HealthArguments(health_early_steps=3, health_window=4)
    logs = [{LENGTH_KEY: v, "loss": 0.1} for v in (100, 90, 110, 30, 80, 30, 30, 30, 30, 30, 30, 30, 20, 20)]
    _, _, whole = feed(HealthCallback(h), train_args, logs)
    assert whole == {"length": 8}
    resumed = HealthCallback(h)
    state = TrainerState(log_history=[{**entry, "step": i + 1} for i, entry in enumerate(logs[:split])])
    state.global_step = split
    resumed.on_train_begin(train_args, state, TrainerControl())
    _, _, after = feed(resumed, train_args, logs[split:], state=state, start=split)
    assert after == ({} if split > 8 else whole)
    assert resumed.warned == ["length"]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("health_early_steps", 0, "--health_early_steps must be an integer >= 1, got 0"),
    ("health_window", 2.5, "--health_window must be an integer >= 1, got 2.5"),
    ("health_min_length_ratio", 1.0, "--health_min_length_ratio must be in (0, 1)"),
    ("health_min_entropy_ratio", 0.0, "--health_min_entropy_ratio must be in (0, 1)"),
    ("health_max_clipped_ratio", 1.5, "--health_max_clipped_ratio must be in (0, 1], got 1.5"),
    ("health_max_neg_token_fraction", -0.1, "--health_max_neg_token_fraction must be in (0, 1]"),
    ("health_neg_token_surge", 1.0, "--health_neg_token_surge must be > 1 (a multiple of the early level), got 1.0"),
    ("health_neg_token_surge", float("nan"), "--health_neg_token_surge must be a finite number, got nan"),
])  # fmt: skip
def test_flags_are_checked(flag, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        HealthArguments(**{flag: value})
    HealthArguments(health_max_clipped_ratio=1.0, health_max_neg_token_fraction=1.0)  # the closed ends are allowed


def test_every_flag_has_a_default_and_help():
    import dataclasses

    for f in dataclasses.fields(HealthArguments):
        assert f.default is not dataclasses.MISSING and f.metadata["help"], f.name
        assert f.name.startswith("health_") or f.name == "stop_on_collapse"


def test_warning_reaches_an_active_wandb_run(train_args, tmp_path, caplog):
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), project="pwopsd-health-test")
    try:
        cb = HealthCallback(HealthArguments(health_early_steps=1, health_window=2))
        with caplog.at_level(logging.WARNING, logger="pwopsd.health"):
            feed(cb, train_args, [{CLIPPED_KEY: 1.0}] * 3 + [{"loss": float("nan")}])
        assert run.summary["health/clipped_step"] == 2
        assert run.summary["health/nonfinite_step"] == 4
        assert run.summary["health/warning"] == cb.fatal
        assert not any("could not send" in r.getMessage() for r in caplog.records)
    finally:
        run.finish()


# ---------------------------------------------------------------------------------------------------------------------
# One real tiny run with a NaN forced into the student's forward pass (copied from tests/test_trainer.py's helpers)
# ---------------------------------------------------------------------------------------------------------------------
def test_real_run_with_a_nan_stops_at_once_with_a_checkpoint_and_fatal(tiny_model_dir, tmp_path):
    callback = HealthCallback(HealthArguments())
    # no periodic checkpoint (save_steps 100): the only one is the health callback's
    args = make_args(tmp_path, "opsd", max_steps=3, save_steps=100)
    trainer = make_trainer(tiny_model_dir("qwen3"), args, rows=ROWS[:4], callbacks=[callback])
    norm = next(m for n, m in trainer.model.named_modules() if n.endswith("model.norm"))
    # NaN only in the graded (student) forward: rollouts (generate) and the teacher pass run without grad, so sampling
    # still works and the loss and its gradient become NaN, as a diverging run's would
    norm.register_forward_hook(lambda _m, _i, out: out * math.nan if torch.is_grad_enabled() else out)
    trainer.train()
    out = Path(trainer.args.output_dir)
    assert trainer.state.global_step == 1  # stopped after the first step of 3
    assert math.isnan(trainer.state.log_history[0]["grad_norm"])  # the logged loss is NaN-filtered by transformers
    assert callback.fatal.startswith("non-finite grad_norm=nan at step 1: training stopped, the state is saved in ")
    saved = out / "nonfinite-checkpoint-1"
    assert str(saved) in callback.fatal
    assert (saved / "adapter_model.safetensors").is_file() and (saved / "optimizer.pt").is_file()
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == 1
    assert not (out / "checkpoint-1").exists() and get_last_checkpoint(str(out)) is None  # never resumed from
