"""The fused chunked path (one product and one closed-form body per chunk) equals the dense path and the naive
references in values, metrics and gradients, eager and compiled; padding, fallback, compile switch, auto chunk size.

The naive references are those of tests/test_distill_losses.py (one token at a time, plain formulas, no code shared
with pwopsd), applied to ``hidden @ W.T`` so that their gradient w.r.t. the hidden states is autograd's.
"""

from __future__ import annotations

import pytest
import torch
from test_distill_losses import REFERENCES  # the naive float64 references (tests/ is importable under pytest)
from test_distill_losses_chunked import dense
from test_distill_losses_chunked import make_hidden as chunked_inputs
from torch._dynamo.testing import CompileCounter

from pwopsd import chunked_loss
from pwopsd.chunked_loss import auto_chunk_size, chunked_distillation_loss, fused_fallback_reason
from pwopsd.losses import METHODS, compute_distillation_loss

F64 = torch.float64
MASK = torch.tensor(
    [[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool
)
VOCAB, HIDDEN = 23, 6

# every option the fused path covers (each branch of every body)
COVERED = [
    ("opsd", 0, {}),
    ("opsd", 0, {"jsd_token_clip": 0.0}),
    ("opsd", 0, {"beta": 0.5}),
    ("opsd", 0, {"beta": 0.3, "jsd_token_clip": 0.0, "temperature": 0.7}),
    ("opsd", 0, {"beta": 1.0}),
    ("opsd", 0, {"beta": 1.0, "jsd_token_clip": 0.0}),
    ("opsd", 0, {"top_k_loss": 5}),
    ("opsd", 0, {"top_k_loss": 4, "beta": 0.3, "temperature": 1.0}),
    ("opsd", 0, {"top_k_loss": 6, "beta": 1.0}),
    ("opsd", 0, {"top_k_loss": 50}),  # k >= V: the full vocabulary
    ("opsd", 0, {"jsd_clip_mode": "token", "jsd_token_clip": 1.5}),
    ("opsd", 0, {"jsd_clip_mode": "token", "jsd_token_clip": 0.3, "beta": 0.5, "top_k_loss": 5}),
    ("opsd", 0, {"temperature": 2.0, "jsd_token_clip": 0.01}),
    ("opsd", 0, {"use_tinker_loss": True}),
    ("opsd", 0, {"use_tinker_loss": True, "temperature": 0.6}),
    ("pwopsd", 0, {}),
    ("pwopsd", 0, {"position_global_reduction": True, "top_k_loss": 4}),
    ("pwopsd", 0, {"beta": 0.5, "top_k_loss": 6, "jsd_token_clip": 0.0}),
    ("pwopsd", 0, {"beta": 1.0, "temperature": 0.8}),
    ("eopd", 0, {}),
    ("eopd", 0, {"temperature": 0.6}),
    ("eopd", 0, {"temperature": 3.0}),
    ("reopold", 0, {}),  # phase I
    ("reopold", 80, {}),  # phase II
    ("reopold", 120, {"reopold_beta": 0.5, "reopold_lambda": 0.3, "temperature": 0.8}),
]
IDS = [f"{m}-{s}-{h}" for m, s, h in COVERED]


def make_hidden(seed: int, mask: torch.Tensor = MASK, vocab: int = VOCAB, hidden: int = HIDDEN, dtype=F64):
    return chunked_inputs(seed, mask, vocab, hidden, dtype)  # this file's vocabulary and mask by default


def naive(method, student, teacher, weight, ids, mask, step, trainable, **hp):
    s, w = student.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
    loss = REFERENCES[method](s @ w.T, teacher @ w.detach().T, ids, mask, step, **hp)
    loss.backward()
    return loss.detach(), s.grad, w.grad


def fused(method, student, teacher, weight, ids, mask, step, trainable, chunk_size, **kw):
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    w = weight.clone().requires_grad_(trainable)
    loss, metrics = chunked_distillation_loss(
        method, s, t, w, ids, mask, chunk_size=chunk_size, global_step=step, fused=True, **kw
    )
    assert loss_path(loss) == "fused"
    loss.backward()
    assert t.grad is None, "the teacher path carries no gradient"
    return loss.detach(), metrics, s.grad, w.grad


def loss_path(loss: torch.Tensor) -> str:
    """Which chunked Function the loss's graph holds: 'fused', 'autograd' (or 'none')."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name.startswith("_FusedTokenTerms"):
            return "fused"
        if name.startswith("_ChunkedTokenTerms"):
            return "autograd"
        stack.extend(n for n, _ in node.next_functions)
    return "none"


@pytest.fixture
def counting_compiler(monkeypatch):
    """The fused bodies compiled by a counting backend (graph captured by dynamo exactly as for inductor, then run
    eagerly): ``counter.frame_count`` is the number of compilations."""
    counter = CompileCounter()
    monkeypatch.setattr(chunked_loss, "_COMPILE_BACKEND", counter)
    monkeypatch.setattr(chunked_loss, "_BODIES", {})
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------------------------
# fused == dense == naive
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "step", "hp"), COVERED, ids=IDS)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen_head", "trainable_head"])
def test_fused_equals_dense_and_naive(method, step, hp, trainable):
    student, teacher, weight, ids = make_hidden(0)
    assert fused_fallback_reason(method, **hp) is None
    ref = dense(method, student, teacher, weight, ids, MASK, step, trainable, **hp)
    ref_naive = naive(method, student, teacher, weight, ids, MASK, step, trainable, **hp)
    # position weights are float32 (docs/methods.md#pwopsd): the naive reference's are float64
    tol = 1e-6 if method == "pwopsd" else 1e-10
    torch.testing.assert_close(ref[0], ref_naive[0], rtol=tol, atol=tol)
    torch.testing.assert_close(ref[2], ref_naive[1], rtol=tol, atol=tol)
    n_valid = int(MASK.sum())
    for chunk_size in (1, 3, 4, MASK.shape[1], n_valid, 100):  # 3 and 4 pad the last chunk, 100 pads the only one
        got = fused(method, student, teacher, weight, ids, MASK, step, trainable, chunk_size, compiled=False, **hp)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
        assert got[1] == pytest.approx(ref[1], rel=1e-12, abs=1e-12)
        torch.testing.assert_close(got[2], ref[2], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[2], ref_naive[1], rtol=tol, atol=tol)
        if trainable:
            torch.testing.assert_close(got[3], ref[3], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got[3], ref_naive[2], rtol=tol, atol=tol)
            assert got[3].abs().sum() > 0
        else:
            assert got[3] is None
        assert got[2].abs().sum() > 0 and got[2][~MASK].abs().max() == 0


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_float32_and_bf16(method):
    """float32 and bf16 hidden states (the model's dtype): close to the dense path on the same logits, and the same
    dtypes out as the autograd path (loss float32, gradients in the hidden states' dtype)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        student, teacher, weight, ids = make_hidden(1, dtype=dtype)
        ref = dense(method, student, teacher, weight, ids, MASK, 60, True)
        for trainable in (True, False):
            got = fused(method, student, teacher, weight, ids, MASK, 60, trainable, 3, compiled=False)
            assert got[0].dtype == torch.float32 and got[2].dtype == dtype
            torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=tol)
            torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=tol, atol=tol)
            if trainable:
                assert got[3].dtype == dtype
                torch.testing.assert_close(got[3].float(), ref[3].float(), rtol=tol, atol=tol)


COMPILED = [
    ("opsd", 0, {}),
    ("opsd", 0, {"beta": 0.5, "top_k_loss": 5, "jsd_clip_mode": "token", "jsd_token_clip": 0.3}),
    ("opsd", 0, {"use_tinker_loss": True}),
    ("eopd", 0, {}),
    ("reopold", 80, {}),
]


@pytest.mark.parametrize(("method", "step", "hp"), COMPILED, ids=[f"{m}-{s}-{h}" for m, s, h in COMPILED])
def test_inductor_compiled_body_equals_dense(method, step, hp):
    """The inductor-compiled bodies (float64 on CPU) give the dense values and gradients: what a GPU run compiles."""
    student, teacher, weight, ids = make_hidden(3)
    for trainable in (False, True):
        ref = dense(method, student, teacher, weight, ids, MASK, step, trainable, **hp)
        got = fused(method, student, teacher, weight, ids, MASK, step, trainable, 4, compiled=True, **hp)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
        assert got[1] == pytest.approx(ref[1], rel=1e-12, abs=1e-12)
        torch.testing.assert_close(got[2], ref[2], rtol=1e-10, atol=1e-12)
        if trainable:
            torch.testing.assert_close(got[3], ref[3], rtol=1e-10, atol=1e-12)


def test_fused_never_keeps_full_logits():
    """No tensor saved for backward has the size of the [B, T, V] logits."""
    mask = torch.ones(4, 16, dtype=torch.bool)
    student, teacher, weight, ids = make_hidden(2, mask=mask, vocab=50, hidden=2)
    for method in METHODS:
        for trainable in (False, True):
            sizes = []

            def pack(x, sizes=sizes):
                sizes.append(x.numel())
                return x

            s, w = student.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                loss, _ = chunked_distillation_loss(method, s, teacher, w, ids, mask, chunk_size=8, fused=True)
            loss.backward()
            assert max(sizes) < mask.numel() * 50 / 4


def test_empty_batch_on_the_fused_path():
    """No valid token: a zero attached to the graph, zero gradients (frozen and trainable head)."""
    empty = torch.zeros(2, 3, dtype=torch.bool)
    student, teacher, weight, ids = make_hidden(4, mask=empty)
    for method in METHODS:
        for trainable in (False, True):
            loss, _, grad_h, grad_w = fused(method, student, teacher, weight, ids, empty, 60, trainable, 4)
            assert loss.item() == 0.0 and grad_h.abs().max() == 0
            assert grad_w is None if not trainable else grad_w.abs().max() == 0


# --------------------------------------------------------------------------------------------------------------------
# Padding of the last chunk and bounded compilation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_padding_the_last_chunk_changes_nothing(method):
    """A body called on n rows and on the same rows padded with zero rows gives bit-identical first n rows; the
    loss with a padded last chunk equals the loss without padding."""
    hp = chunked_loss._make_hparams(METHODS[method], {"top_k_loss": 5} if method != "eopd" else {})
    body_spec = chunked_loss._fused_for(METHODS[method], hp)
    body = body_spec.make(hp, F64)
    g = torch.Generator().manual_seed(5)
    zs, zt = torch.randn(3, VOCAB, generator=g, dtype=F64) * 3, torch.randn(3, VOCAB, generator=g, dtype=F64) * 3
    ids = torch.randint(0, VOCAB, (3,), generator=g)
    scale = torch.rand(3, generator=g, dtype=F64)
    terms, dz = body(zs, zt, ids, scale)
    pad = lambda x: torch.cat([x, x.new_zeros(4, *x.shape[1:])])  # noqa: E731
    padded_terms, padded_dz = body(pad(zs), pad(zt), pad(ids), pad(scale))
    assert torch.equal(padded_terms[:, :3], terms) and torch.equal(padded_dz[:3], dz)
    assert torch.isfinite(padded_terms).all() and torch.isfinite(padded_dz).all()

    student, teacher, weight, ids = make_hidden(6)
    n_valid = int(MASK.sum())  # 13: chunk 5 pads the last chunk by 2, chunk 13 pads nothing
    unpadded = fused(method, student, teacher, weight, ids, MASK, 60, True, n_valid)
    padded = fused(method, student, teacher, weight, ids, MASK, 60, True, 5)
    for a, b in zip(padded[::2] + padded[3:], unpadded[::2] + unpadded[3:]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    assert padded[1] == pytest.approx(unpadded[1], rel=1e-13, abs=1e-14)


def test_one_compilation_per_run_whatever_the_token_count(counting_compiler):
    """Every chunk has the compiled shape (the last one padded): micro-batches with 13, 9, 4 and 1 valid tokens and
    both heads compile the body once. A body called with another shape does recompile (the counter can count)."""
    for seed, keep in enumerate((13, 9, 4, 1)):
        mask = MASK.clone()
        mask.view(-1)[mask.view(-1).nonzero()[keep:]] = False
        student, teacher, weight, ids = make_hidden(seed, mask=mask)
        for trainable in (False, True):
            ref = dense("opsd", student, teacher, weight, ids, mask, 0, trainable)
            got = fused("opsd", student, teacher, weight, ids, mask, 0, trainable, 8, compiled=True)
            torch.testing.assert_close(got[2], ref[2], rtol=1e-10, atol=1e-12)
    assert counting_compiler.frame_count == 1
    (body,) = chunked_loss._BODIES.values()
    z = torch.randn(5, VOCAB, dtype=F64)
    body(z, z, torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=F64))
    assert counting_compiler.frame_count == 2


def test_compile_switch(counting_compiler, monkeypatch):
    """``compiled`` argument first, then PWOPSD_LOSS_COMPILE (0/1), then the device (CPU: eager)."""
    student, teacher, weight, ids = make_hidden(7)

    def run(**kw):
        chunked_distillation_loss("eopd", student, teacher, weight, ids, MASK, chunk_size=4, **kw)
        return counting_compiler.frame_count

    monkeypatch.delenv(chunked_loss.COMPILE_ENV, raising=False)
    assert run() == 0  # CPU default: eager
    monkeypatch.setenv(chunked_loss.COMPILE_ENV, "0")
    assert run() == 0 and run(compiled=True) == 1
    monkeypatch.setattr(chunked_loss, "_BODIES", {})
    torch._dynamo.reset()
    monkeypatch.setenv(chunked_loss.COMPILE_ENV, "1")
    assert run(compiled=False) == 1 and run() == 2


# --------------------------------------------------------------------------------------------------------------------
# Fallback
# --------------------------------------------------------------------------------------------------------------------


def test_fallback_is_taken_where_documented(monkeypatch):
    """opsd_bf16, fused=False and PWOPSD_FUSED_LOSS=0 take the autograd path (and still equal the dense path);
    everything else takes the fused path."""
    monkeypatch.delenv(chunked_loss.FUSED_ENV, raising=False)
    student, teacher, weight, ids = make_hidden(8, dtype=torch.float32)

    def path(method, **kw):
        s = student.clone().requires_grad_()
        loss, _ = chunked_distillation_loss(method, s, teacher, weight, ids, MASK, chunk_size=3, **kw)
        return loss_path(loss)

    for method, _, hp in COVERED:
        assert path(method, **hp) == "fused" and fused_fallback_reason(method, **hp) is None
        assert path(method, fused=False, **hp) == "autograd"
    assert fused_fallback_reason("opsd", opsd_bf16=True) == "opsd_bf16 (bf16 element terms)"
    assert path("opsd", opsd_bf16=True) == path("opsd", opsd_bf16=True, fused=True) == "autograd"
    assert path("opsd", opsd_bf16=True, use_tinker_loss=True) == "fused"  # the switch does not touch tinker
    assert fused_fallback_reason("pwopsd", opsd_bf16=True) is None  # an opsd-only flag
    monkeypatch.setenv(chunked_loss.FUSED_ENV, "0")
    assert fused_fallback_reason("eopd") == "PWOPSD_FUSED_LOSS=0"
    assert path("eopd") == "autograd" and path("eopd", fused=True) == "fused"

    s = student.clone().requires_grad_()
    loss, _ = chunked_distillation_loss("opsd", s, teacher, weight, ids, MASK, chunk_size=3, opsd_bf16=True)
    ref, _ = compute_distillation_loss("opsd", student @ weight.T, teacher @ weight.T, ids, MASK, opsd_bf16=True)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------------------------------
# auto_chunk_size
# --------------------------------------------------------------------------------------------------------------------


def naive_bytes_per_token(vocab: int, hidden: int, dtype: torch.dtype) -> int:
    s = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4, torch.float64: 8}[dtype]
    m = max(s, 4)
    return vocab * (2 * s + s + 4 * m) + hidden * 2 * s  # [2C, V] logits + dz, four math buffers, [C, H] products


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_auto_chunk_size_respects_its_budget(dtype):
    for vocab in (50, 32_000, 151_936):
        for hidden in (8, 2560):
            per_token = naive_bytes_per_token(vocab, hidden, dtype)
            for budget in (1, per_token - 1, per_token, 63 * per_token, 64 * per_token, 300 * per_token, 1 << 30):
                for num_tokens in (1, 100, 4096, 10**6):
                    c = auto_chunk_size(num_tokens, vocab, hidden, dtype, "cpu", budget_bytes=budget)
                    assert c >= 1 and c <= 4096
                    assert c * per_token <= budget or c == 1, (vocab, hidden, budget, c)
                    cap = 16 * -(-num_tokens // 16)  # num_tokens rounded up to a multiple of 16
                    assert c <= cap
                    assert c == cap or (c & (c - 1)) == 0  # a power of two, or the cap
                    if num_tokens == 10**6 and budget >= per_token:
                        assert 2 * c > min(budget // per_token, 2048)  # the largest power of two within it
    assert auto_chunk_size(4096, 151_936, 2560, torch.bfloat16, "cpu", budget_bytes=1 << 30) == 256  # an H200's
    assert auto_chunk_size(1024, 151_936, 512, torch.float32, "cpu") == 64  # CPU default budget: 512 MiB
    assert auto_chunk_size(20, 151_936, 512, torch.float32, "cpu") == 32  # a small batch: not padded to 64


def test_auto_chunk_size_in_the_loss():
    """``chunk_size="auto"``: the same loss as an explicit chunk; bad values name the argument."""
    student, teacher, weight, ids = make_hidden(9)
    assert auto_chunk_size(MASK.numel(), VOCAB, HIDDEN, F64, "cpu") == 32  # one chunk, padded
    auto = fused("pwopsd", student, teacher, weight, ids, MASK, 0, False, "auto")
    explicit = fused("pwopsd", student, teacher, weight, ids, MASK, 0, False, 3)
    torch.testing.assert_close(auto[0], explicit[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(auto[2], explicit[2], rtol=1e-10, atol=1e-12)
    for bad in (0, "big", 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be an integer >= 1 or 'auto'"):
            chunked_distillation_loss("opsd", student, teacher, weight, ids, MASK, chunk_size=bad)
