"""Per-token training diagnostics on real tiny runs through the CLI: `health/student_entropy` and the per-quarter
`pos/kl_q*`, `pos/teacher_entropy_q*`, `pos/top1_agree_q*` in trainer_state.json equal a naive re-computation from the
very tensors the loss received (dense: logits; chunked: hidden states and the LM head); the logging-step gating; and
`--position_schedule_from` driving the PW-OPSD weights of a real run."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from pwopsd import train
from pwopsd import trainer as trainer_module

ARGS = (
    "--method {method} --output_dir {out} --max_steps 2 --save_steps 1 --per_device_train_batch_size 2 "
    "--gradient_accumulation_steps 1 --learning_rate 1e-3 --max_completion_length 8 --max_length 512 --use_peft "
    "--lora_r 4 --lora_alpha 8 --lora_target_modules q_proj v_proj --fixed_teacher --temperature 1.1 --top_p 0.95 "
    "--top_k 20 --lmbda 1 --beta 0 --jsd_token_clip 0.05 --logging_steps {logging_steps} --report_to none "
    "--generations_dump_steps 0"
)
QUARTER_KEYS = [f"pos/{name}_q{q}" for name in ("kl", "teacher_entropy", "top1_agree") for q in range(1, 5)]


@pytest.fixture(scope="module")
def train_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"problem": f"What is {a} * 7?", "solution": f"{a} * 7 = {7 * a}. \\boxed{{{7 * a}}}"} for a in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Naive computation: one token at a time, float64, explicit sums
# ---------------------------------------------------------------------------------------------------------------------
def naive_quarter(k: int, length: int) -> int:
    u = (k - 0.5) / length
    if u < 0.25:
        return 0
    if u < 0.5:
        return 1
    if u < 0.75:
        return 2
    return 3


def naive_diagnostics(student_logits, teacher_logits, mask, temperature: float) -> dict[str, float]:
    """Token means over the micro-batch: student entropy; per quarter forward KL(q||p), teacher entropy, top-1."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value
        counts[key] = counts.get(key, 0) + 1

    for b in range(mask.shape[0]):
        length = int(mask[b].sum())
        k = 0
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            k += 1
            quarter = naive_quarter(k, length) + 1
            p = torch.softmax(student_logits[b, t].double() / temperature, -1).tolist()
            q = torch.softmax(teacher_logits[b, t].double() / temperature, -1).tolist()
            entropy_p = -sum(x * math.log(x) for x in p if x > 0)
            entropy_q = -sum(x * math.log(x) for x in q if x > 0)
            kl = sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q) if qi > 0)
            agree = float(max(range(len(p)), key=p.__getitem__) == max(range(len(q)), key=q.__getitem__))
            add("health/student_entropy", entropy_p)
            add(f"pos/kl_q{quarter}", kl)
            add(f"pos/teacher_entropy_q{quarter}", entropy_q)
            add(f"pos/top1_agree_q{quarter}", agree)
    return {key: sums[key] / counts[key] for key in sums}


def naive_position_weight_mean(mask, w_min: float, tau: float, s: float) -> float:
    weights = []
    for b in range(mask.shape[0]):
        length = int(mask[b].sum())
        k = 0
        for t in range(mask.shape[1]):
            if mask[b, t]:
                k += 1
                u = (k - 0.5) / length
                weights.append(w_min + (1 - w_min) / (1 + math.exp(-(u - tau) / s)))
    return sum(weights) / len(weights)


# ---------------------------------------------------------------------------------------------------------------------
# Real runs through the CLI, recording the tensors the loss receives (the real loss functions still compute)
# ---------------------------------------------------------------------------------------------------------------------
def run_recorded(tiny_model_dir, train_jsonl, out: Path, monkeypatch, *, dense: bool, method: str, extra=(),
                 logging_steps: int = 1) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Run the CLI in-process; return the log history entries with a loss and the recorded loss calls, in order."""
    calls: list[dict] = []
    if dense:
        real = trainer_module.compute_distillation_loss

        def spy(method_name, student, teacher, ids, mask, **kwargs):
            if mask.shape[1] > 1:  # not the first-token diagnostic
                calls.append({"student": student.detach().clone(), "teacher": teacher.detach().clone(),
                              "mask": mask.clone(), "temperature": kwargs["temperature"]})  # fmt: skip
            return real(method_name, student, teacher, ids, mask, **kwargs)

        monkeypatch.setattr(trainer_module, "compute_distillation_loss", spy)
    else:
        real = trainer_module.chunked_distillation_loss

        def spy(method_name, student, teacher, weight, ids, mask, **kwargs):
            w = weight.detach().double()
            calls.append({"student": student.detach().double() @ w.T, "teacher": teacher.detach().double() @ w.T,
                          "mask": mask.clone(), "temperature": kwargs["temperature"]})  # fmt: skip
            return real(method_name, student, teacher, weight, ids, mask, **kwargs)

        monkeypatch.setattr(trainer_module, "chunked_distillation_loss", spy)
    monkeypatch.setenv("PWOPSD_TRAIN_DATASET", str(train_jsonl))
    argv = ["--model_name_or_path", str(tiny_model_dir("qwen3"))]
    argv += ARGS.format(method=method, out=out, logging_steps=logging_steps).split()
    argv += ["--dense_loss"] if dense else ["--loss_chunk_size", "3"]
    assert train.main([*argv, *extra]) == 0
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert (out / "adapter_model.safetensors").is_file()  # a healthy run writes its final adapter
    return [h for h in state["log_history"] if "loss" in h], calls


def assert_logged_equals_naive(logged: dict, call: dict) -> None:
    expected = naive_diagnostics(call["student"], call["teacher"], call["mask"], call["temperature"])
    assert "health/student_entropy" in expected
    for key in ["health/student_entropy", *QUARTER_KEYS]:
        if key in expected:
            assert logged[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
        else:  # no token of this micro-batch falls in that quarter: nothing is logged
            assert key not in logged, key


def test_dense_run_logs_entropy_and_position_metrics_and_uses_the_schedule_file(
    tiny_model_dir, train_jsonl, tmp_path, monkeypatch, caplog
):
    schedule = {"scale": 0.8, "w_min": 0.4, "tau": 0.55, "s": 0.2, "cost": 0.01}
    path = tmp_path / "viability.json"
    path.write_text(json.dumps({"settings": {}, "records": [], "summary": {"schedule_fit": schedule}}))
    with caplog.at_level(logging.INFO, logger="ea_opsd_train"):
        logs, calls = run_recorded(tiny_model_dir, train_jsonl, tmp_path / "out", monkeypatch, dense=True,
                                   method="pwopsd", extra=["--position_schedule_from", str(path)])  # fmt: skip
    assert [h["step"] for h in logs] == [1, 2] and len(calls) == 2  # one micro-batch per step
    for logged, call in zip(logs, calls):
        assert_logged_equals_naive(logged, call)
        assert logged["ea/position_weight_mean"] == pytest.approx(
            naive_position_weight_mean(call["mask"], 0.4, 0.55, 0.2), rel=1e-5
        )
    assert all(any(k in h for k in QUARTER_KEYS) for h in logs)
    assert f"PW-OPSD schedule from {path}: --position_w_min 0.4 --position_tau 0.55 --position_s 0.2" in caplog.text


def test_chunked_run_logs_the_same_quantities_from_hidden_states(tiny_model_dir, train_jsonl, tmp_path, monkeypatch):
    logs, calls = run_recorded(tiny_model_dir, train_jsonl, tmp_path / "out", monkeypatch, dense=False, method="opsd")
    assert [h["step"] for h in logs] == [1, 2] and len(calls) == 2
    for logged, call in zip(logs, calls):
        assert_logged_equals_naive(logged, call)


def test_diagnostics_are_computed_for_logged_steps_only(tiny_model_dir, train_jsonl, tmp_path, monkeypatch):
    """--logging_steps 2: step 1 is not logged, so only step 2's micro-batch enters the step-2 log's diagnostics."""
    logs, calls = run_recorded(tiny_model_dir, train_jsonl, tmp_path / "out", monkeypatch, dense=True,
                               method="opsd", logging_steps=2)  # fmt: skip
    assert [h["step"] for h in logs] == [2] and len(calls) == 2
    assert_logged_equals_naive(logs[0], calls[1])
    both = naive_diagnostics(
        torch.cat([calls[0]["student"], calls[1]["student"]]),
        torch.cat([calls[0]["teacher"], calls[1]["teacher"]]),
        torch.cat([calls[0]["mask"], calls[1]["mask"]]),
        calls[1]["temperature"],
    )
    assert logs[0]["health/student_entropy"] != pytest.approx(both["health/student_entropy"], rel=1e-9)
