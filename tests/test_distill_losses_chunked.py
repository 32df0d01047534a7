"""The chunked path equals the dense path (values, metrics, gradients) for every method, and property tests.

``chunked_distillation_loss(hidden, W)`` must equal ``compute_distillation_loss(hidden @ W.T)`` for chunk sizes
1, 3, T, N (all valid tokens) and more, with a frozen and a trainable LM head, and must never keep [B, T, V] tensors.
Every test runs on both chunked paths: the fused one (closed-form body, the default) and the autograd one
(``fused=False``, the fallback); tests/test_fused_loss.py has the fused path's own tests.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pwopsd.chunked_loss import chunked_distillation_loss
from pwopsd.losses import METHODS, compute_distillation_loss, position_weights

F64 = torch.float64
MASK = torch.tensor(
    [[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool
)
VOCAB, HIDDEN = 19, 6

VARIANTS = [
    ("opsd", 0, {}),
    ("opsd", 0, {"beta": 0.5, "top_k_loss": 5}),
    ("opsd", 0, {"beta": 1.0, "jsd_token_clip": 0.0}),
    ("opsd", 0, {"use_tinker_loss": True}),
    ("pwopsd", 0, {}),
    ("pwopsd", 0, {"position_global_reduction": True, "top_k_loss": 4}),
    ("eopd", 0, {}),
    ("eopd", 0, {"temperature": 0.6}),
    ("reopold", 0, {}),
    ("reopold", 80, {}),
]


def make_hidden(seed: int, mask: torch.Tensor = MASK, vocab: int = VOCAB, hidden: int = HIDDEN, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*mask.shape, hidden, generator=g, dtype=F64)
    teacher = student + 0.7 * torch.randn(*mask.shape, hidden, generator=g, dtype=F64)
    weight = torch.randn(vocab, hidden, generator=g, dtype=F64) * 1.5
    ids = torch.randint(0, vocab, mask.shape, generator=g)
    ids[~mask] = -100
    return student.to(dtype), teacher.to(dtype), weight.to(dtype), ids


def dense(method, student, teacher, weight, ids, mask, step, trainable, **hp):
    s, w = student.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
    loss, metrics = compute_distillation_loss(
        method, s @ w.T, teacher @ w.detach().T, ids, mask, global_step=step, **hp
    )
    loss.backward()
    return loss.detach(), metrics, s.grad, w.grad


PATHS = pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])


def chunked(method, student, teacher, weight, ids, mask, step, trainable, chunk_size, fused=True, **hp):
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    w = weight.clone().requires_grad_(trainable)
    loss, metrics = chunked_distillation_loss(
        method, s, t, w, ids, mask, chunk_size=chunk_size, global_step=step, fused=fused, compiled=False, **hp
    )
    loss.backward()
    assert t.grad is None, "the teacher path carries no gradient"
    return loss.detach(), metrics, s.grad, w.grad


@pytest.mark.parametrize(("method", "step", "hp"), VARIANTS, ids=[f"{m}-{s}-{h}" for m, s, h in VARIANTS])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen_head", "trainable_head"])
@PATHS
def test_chunked_equals_dense(method, step, hp, trainable, fused):
    student, teacher, weight, ids = make_hidden(0)
    ref = dense(method, student, teacher, weight, ids, MASK, step, trainable, **hp)
    n_valid = int(MASK.sum())
    for chunk_size in (1, 3, MASK.shape[1], n_valid, 100):
        got = chunked(method, student, teacher, weight, ids, MASK, step, trainable, chunk_size, fused, **hp)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
        assert got[1] == pytest.approx(ref[1], rel=1e-12, abs=1e-12)
        torch.testing.assert_close(got[2], ref[2], rtol=1e-10, atol=1e-12)
        if trainable:
            torch.testing.assert_close(got[3], ref[3], rtol=1e-10, atol=1e-12)
            assert got[3].abs().sum() > 0
        else:
            assert got[3] is None
        assert got[2].abs().sum() > 0 and got[2][~MASK].abs().max() == 0


@pytest.mark.parametrize("method", list(METHODS))
@PATHS
def test_chunked_float32_and_bf16(method, fused):
    """float32 and bf16 hidden states (the model's dtype): close to the dense path on the same bf16 logits."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        student, teacher, weight, ids = make_hidden(1, dtype=dtype)
        ref = dense(method, student, teacher, weight, ids, MASK, 60, True)
        got = chunked(method, student, teacher, weight, ids, MASK, 60, True, 3, fused)
        assert got[0].dtype == torch.float32 and got[2].dtype == dtype and got[3].dtype == dtype
        torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=tol)
        torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=tol, atol=tol)
        torch.testing.assert_close(got[3].float(), ref[3].float(), rtol=tol, atol=tol)
        frozen = chunked(method, student, teacher, weight, ids, MASK, 60, False, 3, fused)
        torch.testing.assert_close(frozen[2].float(), ref[2].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen_head", "trainable_head"])
@PATHS
def test_chunked_never_keeps_full_logits(method, trainable, fused):
    """No tensor saved for backward has the size of the [B, T, V] logits (the dense path saves several)."""
    mask = torch.ones(4, 16, dtype=torch.bool)
    student, teacher, weight, ids = make_hidden(2, mask=mask, vocab=50, hidden=2)
    full = mask.numel() * 50

    def largest_saved(fn) -> int:
        sizes = []

        def pack(x):
            sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss, _ = fn()
        loss.backward()
        return max(sizes)

    s, w = student.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
    assert (
        largest_saved(lambda: chunked_distillation_loss(method, s, teacher, w, ids, mask, chunk_size=8, fused=fused))
        < full / 4
    )
    s = student.clone().requires_grad_()
    assert largest_saved(lambda: compute_distillation_loss(method, s @ weight.T, teacher @ weight.T, ids, mask)) >= full


# --------------------------------------------------------------------------------------------------------------------
# Property tests (hypothesis) over shapes and masks
# --------------------------------------------------------------------------------------------------------------------


@st.composite
def batches(draw):
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 6))
    mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)))
    vocab = draw(st.integers(2, 20))
    hidden = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    return mask, vocab, hidden, seed


METHOD_NAMES = st.sampled_from(list(METHODS))
SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(batches(), METHOD_NAMES, st.integers(1, 8), st.sampled_from([0, 100]), st.booleans(), st.booleans())
def test_property_chunked_equals_dense(batch, method, chunk_size, step, trainable, fused):
    mask, vocab, hidden, seed = batch
    student, teacher, weight, ids = make_hidden(seed, mask=mask, vocab=vocab, hidden=hidden)
    ref = dense(method, student, teacher, weight, ids, mask, step, trainable)
    got = chunked(method, student, teacher, weight, ids, mask, step, trainable, chunk_size, fused)
    assert torch.isfinite(ref[0]) and all(math.isfinite(v) for v in ref[1].values())
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-9, atol=1e-12)
    if trainable:
        torch.testing.assert_close(got[3], ref[3], rtol=1e-9, atol=1e-12)
    if not mask.any():
        assert ref[0].item() == 0.0 and got[2].abs().max() == 0


@SETTINGS
@given(batches(), METHOD_NAMES, st.sampled_from([0, 100]), st.data())
def test_property_row_permutation_and_padding_invariance(batch, method, step, data):
    """Every reduction is symmetric in the rows, and extra invalid positions (any logits) change nothing."""
    mask, vocab, hidden, seed = batch
    student, teacher, weight, ids = make_hidden(seed, mask=mask, vocab=vocab, hidden=hidden)
    s_logits, t_logits = student @ weight.T, teacher @ weight.T
    loss, metrics = compute_distillation_loss(method, s_logits, t_logits, ids, mask, global_step=step)
    perm = torch.tensor(data.draw(st.permutations(range(mask.shape[0]))))
    permuted, _ = compute_distillation_loss(
        method, s_logits[perm], t_logits[perm], ids[perm], mask[perm], global_step=step
    )
    torch.testing.assert_close(permuted, loss, rtol=1e-12, atol=1e-12)
    extra = data.draw(st.integers(1, 3))
    pad = torch.randn(mask.shape[0], extra, vocab, dtype=F64) * 50
    padded, padded_metrics = compute_distillation_loss(
        method,
        torch.cat([s_logits, pad], 1),
        torch.cat([t_logits, -pad], 1),
        torch.cat([ids, torch.full((mask.shape[0], extra), -100)], 1),
        torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=torch.bool)], 1),
        global_step=step,
    )
    torch.testing.assert_close(padded, loss, rtol=1e-12, atol=1e-12)
    assert padded_metrics == pytest.approx(metrics, rel=1e-12, abs=1e-12)


@SETTINGS
@given(batches())
def test_property_forward_kl_is_non_negative_without_clip(batch):
    mask, vocab, hidden, seed = batch
    student, teacher, weight, ids = make_hidden(seed, mask=mask, vocab=vocab, hidden=hidden)
    for method in ("opsd", "pwopsd"):
        loss, metrics = compute_distillation_loss(
            method, student @ weight.T, teacher @ weight.T, ids, mask, jsd_token_clip=0.0
        )
        assert loss.item() >= -1e-12 and metrics["opsd/neg_token_fraction"] == 0.0


@SETTINGS
@given(
    st.lists(st.lists(st.booleans(), min_size=1, max_size=12), min_size=1, max_size=4).filter(
        lambda rows: len({len(r) for r in rows}) == 1
    ),
    st.floats(0.0, 1.0),
    st.floats(-0.5, 1.5),
    st.floats(1e-3, 2.0),
)
def test_property_position_weights(rows, w_min, tau, s):
    mask = torch.tensor(rows)
    w = position_weights(mask, w_min, tau, s)
    assert (w[~mask] == 0).all()
    valid = w[mask]
    assert ((valid >= w_min - 1e-6) & (valid <= 1 + 1e-6)).all()
    for b in range(mask.shape[0]):
        row = w[b][mask[b]]
        assert (row[1:] >= row[:-1] - 1e-7).all(), "weights never decrease along a row's valid tokens"
