"""Every tensor the project builds lives on the device of the tensors it meets (no GPU here, so two CPU probes).

* **meta inputs**: pure tensor math (token terms, position weights, fused and autograd chunk bodies, the batch, the
  EMA teacher, the presence penalty) called with tensors on device ``meta`` (shapes, no data) must return ``meta``
  tensors; a tensor built on the CPU and mixed with them raises "... is not on the expected device ...".
* **the default-device trap**, for code with data-dependent steps (``nonzero``, ``.item()``, a real model and
  ``generate``): inputs on the CPU, default device ``meta`` (``with torch.device("meta")``), so a tensor built
  without an explicit device lands on ``meta`` and meets the CPU inputs.

Both run under :class:`OneDevicePerOp`, a dispatch mode that fails every aten op whose tensor arguments sit on two
devices (0-dim CPU tensors excepted, which PyTorch accepts beside CUDA tensors; copies such as ``.to()`` are the
allowed crossings): the meta kernels of gather, index_select, scatter and matmul accept CPU arguments that CUDA
refuses, so meta alone would miss those. The first tests show each probe failing on a deliberately wrong variant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_trainer import ROWS, fixed_batch, make_args, make_trainer  # a real tiny trainer (tests/ is importable)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoTokenizer

from pwopsd import chunked_loss
from pwopsd.batch import build_distillation_batch, distillation_batch_from_collated, prompt_token_lists
from pwopsd.chunked_loss import _ChunkedTokenTerms, _ChunkSpec, _FusedSpec, _FusedTokenTerms, _get_body
from pwopsd.collator import SelfDistillationDataCollator
from pwopsd.evaluation.evaluate import EvalArguments
from pwopsd.evaluation.generate import PresencePenaltyLogitsProcessor, RowSampler, sampling_processors
from pwopsd.losses import METHODS, check_hparams, compute_distillation_loss, gkd_token_loss, position_weights
from pwopsd.teacher import EMATeacher

META = torch.device("meta")
CROSSINGS = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize", "lift_fresh", "lift_fresh_copy"}
"""aten ops that move data between devices on purpose (`.to()`, `copy_`, `torch.tensor(..., device=...)`)."""


class OneDevicePerOp(TorchDispatchMode):
    """Fail any aten op whose tensor arguments lie on more than one device (0-dim CPU tensors and copies excepted)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name not in CROSSINGS:
            devices = {
                str(a.device)
                for a in tree_flatten((args, kwargs))[0]
                if isinstance(a, torch.Tensor) and not (a.dim() == 0 and a.device.type == "cpu")
            }
            if len(devices) > 1:
                raise AssertionError(f"aten.{name} mixes devices {sorted(devices)}")
        self.ops += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def one_device() -> Iterator[OneDevicePerOp]:
    with OneDevicePerOp() as mode:
        yield mode
    assert mode.ops > 0  # the probe saw the code run


@contextlib.contextmanager
def default_device_trap() -> Iterator[OneDevicePerOp]:
    """Inputs made before entering stay on the CPU; a tensor made inside without a device goes to meta."""
    with torch.device("meta"), one_device() as mode:
        yield mode


def tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def assert_on(obj, device: str) -> None:
    found = tensors(obj)
    assert found and all(t.device.type == device for t in found), [t.device for t in found]


# ---------------------------------------------------------------------------------------------------------------------
# The probes can fail
# ---------------------------------------------------------------------------------------------------------------------
def test_the_probes_catch_a_tensor_on_the_wrong_device() -> None:
    x = torch.randn(3, 5, device=META)
    cpu_index = torch.zeros(3, 1, dtype=torch.long)
    assert x.gather(-1, cpu_index).device == META  # the meta kernel alone lets a CPU index through (CUDA refuses)
    with pytest.raises(AssertionError, match=r"aten.gather mixes devices \['cpu', 'meta'\]"), one_device():
        x.gather(-1, cpu_index)
    with one_device():
        assert (x * torch.tensor(2.0)).device == META  # a CPU scalar is allowed, as beside a CUDA tensor
    cpu = torch.ones(3)
    with pytest.raises((AssertionError, RuntimeError)), default_device_trap():
        cpu + torch.zeros(3)  # no device given: lands on meta
    with default_device_trap():
        assert (cpu + torch.zeros(3, device=cpu.device)).device.type == "cpu"


def test_a_device_less_variant_of_a_chunk_body_fails(monkeypatch) -> None:
    """The same fused-body call as below, with `_one_hot` building its arange without `device=`: the probe fails."""
    hp = check_hparams("reopold")
    args = fused_inputs(trainable=False)
    spec = _FusedSpec(
        _get_body(chunked_loss._REOPOLD, hp, torch.float32, False), chunked_loss._REOPOLD, 4, torch.float32
    )
    with one_device():
        _FusedTokenTerms.apply(spec, *args)
    monkeypatch.setattr(
        chunked_loss, "_one_hot", lambda ids, like: (torch.arange(like.shape[-1]) == ids.unsqueeze(-1)).to(like.dtype)
    )
    spec = _FusedSpec(chunked_loss._REOPOLD.make(hp, torch.float32), chunked_loss._REOPOLD, 4, torch.float32)
    with pytest.raises((AssertionError, RuntimeError), match="device"), one_device():
        _FusedTokenTerms.apply(spec, *args)


# ---------------------------------------------------------------------------------------------------------------------
# Losses (pwopsd.losses): token terms and position weights on meta; reductions (.item() metrics) under the trap
# ---------------------------------------------------------------------------------------------------------------------
B, T, V, H = 2, 7, 11, 5
VARIANTS = [
    ("opsd", {}),
    ("opsd", {"use_tinker_loss": True}),
    ("opsd", {"opsd_bf16": True}),
    ("opsd", {"top_k_loss": 4, "jsd_clip_mode": "token", "beta": 0.5}),
    ("pwopsd", {}),
    ("pwopsd", {"beta": 1.0, "position_global_reduction": True}),
    ("eopd", {}),
    ("reopold", {}),
]
IDS = [f"{m}-{'-'.join(map(str, hp)) or 'default'}" for m, hp in VARIANTS]


def test_variants_cover_every_method() -> None:
    assert {m for m, _ in VARIANTS} == set(METHODS)


@pytest.mark.parametrize(("method", "hparams"), VARIANTS, ids=IDS)
def test_token_terms_stay_on_the_logits_device(method, hparams) -> None:
    spec, hp = METHODS[method], check_hparams(method, **hparams)
    dtype = spec.log_prob_dtype(hp) or torch.float32
    student = torch.randn(B, T, V, device=META, dtype=dtype, requires_grad=True)
    teacher = torch.randn(B, T, V, device=META, dtype=dtype)
    ids = torch.zeros(B, T, dtype=torch.long, device=META)
    with one_device():
        terms = spec.token_terms(student, teacher, ids, hp)
        assert_on(terms, "meta")
        assert all(t.shape == (B, T) for t in terms.values())
        diff = [t for t in terms.values() if t.requires_grad]
        (grad,) = torch.autograd.grad(sum(t.sum() for t in diff), student)
    assert grad.device == META


def test_position_weights_and_gkd_loss_stay_on_meta() -> None:
    mask = torch.ones(B, T, dtype=torch.bool, device=META)
    lp = torch.randn(B, T, V, device=META)
    with one_device():
        w = position_weights(mask, 0.25, 0.3, 0.1)
        assert w.device == META and w.dtype == torch.float32 and w.shape == (B, T)
        for kw in ({"beta": 0.0, "clip": 0.05}, {"beta": 0.5, "clip": 0.05, "clip_mode": "token", "top_k": 3}):
            assert gkd_token_loss(lp, lp, **kw).device == META


def cpu_loss_inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1] * 5 + [0] * 2, [1] * 2 + [0] * 5], dtype=torch.bool)
    return student, teacher, ids, mask


@pytest.mark.parametrize(("method", "hparams"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("step", [0, 100], ids=["step0", "step100"])  # REOPOLD's two phases
def test_dense_loss_and_metrics_make_no_tensor_on_the_default_device(method, hparams, step) -> None:
    student, teacher, ids, mask = cpu_loss_inputs()
    with default_device_trap():
        loss, metrics = compute_distillation_loss(method, student, teacher, ids, mask, global_step=step, **hparams)
        loss.backward()
    assert loss.device.type == "cpu" and student.grad is not None and student.grad.device.type == "cpu"
    assert metrics and all(isinstance(v, float) for v in metrics.values())


# ---------------------------------------------------------------------------------------------------------------------
# Chunked loss (pwopsd.chunked_loss): both chunk paths on meta; the whole function under the trap
# ---------------------------------------------------------------------------------------------------------------------
N = 7  # valid tokens: two chunks of 4, the last one padded


def fused_inputs(trainable: bool, device: torch.device = META, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    student_h = torch.randn(N, H, device=device, dtype=dtype, requires_grad=True)
    teacher_h = torch.randn(N, H, device=device, dtype=dtype)
    weight = torch.randn(V, H, device=device, dtype=dtype, requires_grad=trainable)
    ids = torch.zeros(N, dtype=torch.long, device=device)
    return student_h, teacher_h, weight, ids


FUSED = {
    "gkd": chunked_loss._GKD,
    "tinker": chunked_loss._TINKER,
    "eopd": chunked_loss._EOPD,
    "reopold": chunked_loss._REOPOLD,
}


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen_head", "trainable_head"])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_chunks_stay_on_meta(name, trainable) -> None:
    fused = FUSED[name]
    hp = check_hparams("opsd", top_k_loss=4) if name == "gkd" else check_hparams("opsd")
    spec = _FusedSpec(_get_body(fused, hp, torch.float32, False), fused, 4, torch.float32)
    student_h, _, weight, _ = inputs = fused_inputs(trainable)
    with one_device():
        outputs = _FusedTokenTerms.apply(spec, *inputs)
        assert_on(outputs, "meta")
        outputs[fused.diff].sum().backward()
    assert student_h.grad.device == META and (weight.grad.device == META if trainable else weight.grad is None)


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen_head", "trainable_head"])
@pytest.mark.parametrize(("method", "hparams"), VARIANTS, ids=IDS)
def test_autograd_chunks_stay_on_meta(method, hparams, trainable) -> None:
    spec = _ChunkSpec(METHODS[method], check_hparams(method, **hparams), 4)
    student_h, _, weight, _ = inputs = fused_inputs(trainable)
    with one_device():
        outputs = _ChunkedTokenTerms.apply(spec, *inputs)
        assert_on(outputs, "meta")
        sum(o.sum() for o in outputs if o.requires_grad).backward()
    assert student_h.grad.device == META and (weight.grad.device == META if trainable else weight.grad is None)


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen_head", "trainable_head"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])
@pytest.mark.parametrize(("method", "hparams"), VARIANTS, ids=IDS)
def test_chunked_loss_makes_no_tensor_on_the_default_device(method, hparams, fused, trainable) -> None:
    _, _, ids, mask = cpu_loss_inputs()
    g = torch.Generator().manual_seed(1)
    student_h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=trainable)
    with default_device_trap():
        loss, _ = chunked_loss.chunked_distillation_loss(
            method, student_h, teacher_h, weight, ids, mask, chunk_size="auto", fused=fused, compiled=False,
            global_step=100, **hparams,
        )  # fmt: skip
        loss.backward()
    assert loss.device.type == "cpu" and student_h.grad.device.type == "cpu"


# ---------------------------------------------------------------------------------------------------------------------
# Collator -> distillation batch (pwopsd.collator, pwopsd.batch)
# ---------------------------------------------------------------------------------------------------------------------
COMPLETIONS = [[5, 6, 7], [8], []]


def meta_prompts(p_s: int = 4, p_t: int = 6) -> dict[str, torch.Tensor]:
    b = len(COMPLETIONS)
    return dict(
        student_prompts=torch.ones(b, p_s, dtype=torch.long, device=META),
        student_prompt_attention_mask=torch.ones(b, p_s, dtype=torch.long, device=META),
        student_prompt_lengths=torch.full((b,), p_s, dtype=torch.long, device=META),
        teacher_prompts=torch.ones(b, p_t, dtype=torch.long, device=META),
        teacher_prompt_attention_mask=torch.ones(b, p_t, dtype=torch.long, device=META),
    )


@pytest.mark.parametrize("eos_mask", ["pad_id", "length"])
@pytest.mark.parametrize("prompt_padding", ["right", "left"])
def test_distillation_batch_follows_the_prompts_device(eos_mask, prompt_padding) -> None:
    with one_device():
        batch = build_distillation_batch(**meta_prompts(), completions=COMPLETIONS, max_completion_length=5,
                                         pad_token_id=0, eos_mask=eos_mask, prompt_padding=prompt_padding)  # fmt: skip
    assert_on(batch, "meta")
    assert batch["student_input_ids"].shape == (3, 9) and batch["teacher_input_ids"].shape == (3, 11)
    assert batch["loss_mask"].dtype == torch.bool and batch["completion_ids"].dtype == torch.long
    assert (batch["student_position_ids"] is None) == (prompt_padding == "right")


def test_distillation_batch_makes_no_tensor_on_the_default_device() -> None:
    prompts = {k: torch.ones_like(v, device="cpu") for k, v in meta_prompts().items()}
    for eos_mask in ("pad_id", "length"):
        with default_device_trap():
            batch = build_distillation_batch(**prompts, completions=COMPLETIONS, max_completion_length=5,
                                             pad_token_id=0, eos_mask=eos_mask, prompt_padding="left")  # fmt: skip
            lists = prompt_token_lists(prompts["student_prompts"], prompts["student_prompt_attention_mask"])
        assert_on(batch, "cpu")
        assert lists == [[1, 1, 1, 1]] * 3


def test_collator_returns_cpu_tensors_that_the_batch_follows(tiny_model_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen3"))
    collated = SelfDistillationDataCollator(tokenizer, max_length=512)(ROWS[:3])
    assert_on(collated, "cpu")  # by design: the Trainer moves the batch to the training device
    on_meta = {k: v.to(META) if isinstance(v, torch.Tensor) else v for k, v in collated.items()}
    with one_device():
        batch = distillation_batch_from_collated(on_meta, COMPLETIONS, max_completion_length=5,
                                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert_on(batch, "meta")
    assert batch["student_prompt_length"] == collated["student_prompt_length"]


# ---------------------------------------------------------------------------------------------------------------------
# EMA teacher (pwopsd.teacher): shadows and backups on each parameter's own device and dtype
# ---------------------------------------------------------------------------------------------------------------------
def test_ema_teacher_keeps_every_copy_on_its_parameters_device() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4, device=META), torch.nn.Linear(4, 2, device=META, dtype=torch.bfloat16)
    )
    ema = EMATeacher(model, decay=0.9)
    with one_device():
        ema.update()  # lazy init
        ema.update()
        with ema.swapped_in():
            pass
    assert [(s.device, s.dtype) for s in ema.shadow] == [(p.device, p.dtype) for _, p in ema.named_params]
    state = {"decay": 0.9, "shadow": {n: torch.zeros(p.shape) for n, p in ema.named_params}}  # a CPU float32 file
    with one_device():
        ema.load_state_dict(state)
    assert [(s.device, s.dtype) for s in ema.shadow] == [(p.device, p.dtype) for _, p in ema.named_params]


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation sampling chain (pwopsd.evaluation.generate)
# ---------------------------------------------------------------------------------------------------------------------
def test_presence_penalty_and_sampling_chain_follow_the_logits_device() -> None:
    scores = torch.randn(3, V, device=META)
    ids = torch.zeros(3, 6, dtype=torch.long, device=META)
    with one_device():
        out = PresencePenaltyLogitsProcessor(0.5, prompt_length=2)(ids, scores)
    assert out.device == META and out.dtype == scores.dtype and out.shape == scores.shape
    args = EvalArguments(base_model="m", dataset="d", output_file="o", temperature=0.7, top_p=0.9, top_k=3,
                         min_p=0.05, presence_penalty=0.5)  # fmt: skip
    processors = [*sampling_processors(args, prompt_length=2), RowSampler([torch.Generator() for _ in range(3)])]
    with one_device():
        for processor in processors:
            scores = processor(ids, scores)
            assert scores.device == META, type(processor).__name__


# ---------------------------------------------------------------------------------------------------------------------
# Trainer (real tiny model): rollouts, batch, loss, teacher, diagnostics, metrics under the trap
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [{}, {"dense_loss": True, "fixed_teacher": False, "use_ema_teacher": True, "method": "reopold"}],
    ids=["chunked-fixed-pwopsd", "dense-ema-reopold"],
)
def test_trainer_makes_no_tensor_on_the_default_device(tiny_model_dir, tmp_path: Path, overrides) -> None:
    """Rollout, batch, teacher pass (fixed adapter-off / EMA swap), student loss and backward, pos/* and health
    diagnostics and metric logging, with the model and batch on the CPU and the default device meta."""
    overrides = dict(overrides)
    args = make_args(tmp_path, overrides.pop("method", "pwopsd"), **overrides)
    trainer = make_trainer(tiny_model_dir("qwen3"), args)
    trainer.model.train()
    collated = trainer.data_collator(ROWS[:2])
    given = fixed_batch(trainer, [[5, 6, 7], [8, 9]])
    with default_device_trap():
        if trainer.ema_teacher is not None:
            trainer.ema_teacher.update()  # the EMA exists from the first optimizer step on
        batch = trainer._prepare_inputs(collated)  # transformers rollouts + distillation batch + completion metrics
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(given))
    assert_on(batch, "cpu")
    assert_on(loss, "cpu")
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight
    width = head.shape[0] if args.dense_loss else head.shape[1]  # logits [.., V] or hidden states [.., H]
    features = [torch.randn(*given["loss_mask"].shape, width) for _ in range(2)]
    with default_device_trap():
        trainer._log_token_diagnostics(*features, head, given["loss_mask"])
        trainer._log_metrics({"loss": loss.detach(), "plain": 1.0})
    logged = trainer._metrics["train"]
    assert {"health/student_entropy", "pos/kl_q1", "completions/mean_length", "loss", "plain"} <= set(logged)
