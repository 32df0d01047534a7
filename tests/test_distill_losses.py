"""The four distillation losses against naive float64 references and the documented test vectors.

The references are written here from docs/methods.md and the vectors come from docs/methods.md#test-vectors. They
loop over tokens and use plain formulas (probabilities, not log-space mixtures; sorting for top-k; a hand-written
linear quantile), sharing no code with ``pwopsd.losses``. Values and gradients are compared on random
logits with ragged masks, an empty row, a row with holes and ``-100`` ids.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import pytest
import torch

from pwopsd.chunked_loss import chunked_distillation_loss
from pwopsd.losses import (
    HPARAM_NAMES,
    METHODS,
    LossHParams,
    check_hparams,
    compute_distillation_loss,
    eopd_gate,
    gkd_element_terms,
    gkd_token_loss,
    loss_hparam_field,
    loss_hparam_fields,
    loss_hparams_from_args,
    position_weights,
    reopold_floor,
    schedule_weight,
)

F64 = torch.float64

# --------------------------------------------------------------------------------------------------------------------
# Naive references (docs/methods.md), one token at a time
# --------------------------------------------------------------------------------------------------------------------


def ref_log_softmax(z: torch.Tensor) -> torch.Tensor:
    m = z.max().detach()
    return z - m - torch.log(torch.exp(z - m).sum())


def ref_top_index(z: torch.Tensor, k: int) -> torch.Tensor:
    order = sorted(range(len(z)), key=lambda v: -float(z[v]))
    return torch.tensor(order[:k])


def ref_gkd_token(zs, zt, *, temperature, beta, jsd_token_clip, top_k_loss=0, jsd_clip_mode="pointwise"):
    zs, zt = zs / temperature, zt / temperature
    if 0 < top_k_loss < len(zt):
        idx = ref_top_index(zt, top_k_loss)
        zs, zt = zs[idx], zt[idx]
    lp, lq = ref_log_softmax(zs), ref_log_softmax(zt)
    p, q = lp.exp(), lq.exp()
    if beta == 0:
        d = q * (lq - lp)
    elif beta == 1:
        d = p * (lp - lq)
    else:
        mix = beta * q + (1 - beta) * p
        d = beta * q * (lq - mix.log()) + (1 - beta) * p * (lp - mix.log())
    c = torch.tensor(jsd_token_clip, dtype=d.dtype)
    if jsd_token_clip > 0 and jsd_clip_mode == "pointwise":
        d = torch.minimum(d, c)
    loss = d.sum()
    if jsd_token_clip > 0 and jsd_clip_mode == "token":
        loss = torch.minimum(loss, c)
    return loss


def valid_positions(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def ref_opsd(s, t, ids, mask, step=0, *, temperature=1.1, beta=0.0, jsd_token_clip=0.05, top_k_loss=0,
             jsd_clip_mode="pointwise", use_tinker_loss=False):  # fmt: skip
    total = torch.zeros((), dtype=F64)
    for b, i in valid_positions(mask):
        if use_tinker_loss:
            lp = ref_log_softmax(s[b, i] / temperature)[ids[b, i]]
            lq = ref_log_softmax(t[b, i] / temperature)[ids[b, i]]
            total = total - (lq - lp).detach() * lp
        else:
            total = total + ref_gkd_token(s[b, i], t[b, i], temperature=temperature, beta=beta,
                                          jsd_token_clip=jsd_token_clip, top_k_loss=top_k_loss,
                                          jsd_clip_mode=jsd_clip_mode)  # fmt: skip
    return total / max(int(mask.sum()), 1)


def ref_weight(k, length, w_min, tau, s):
    u = max(k - 0.5, 0) / max(length, 1)
    x = (u - tau) / max(s, 1e-6)
    sigmoid = 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
    return w_min + (1 - w_min) * sigmoid


def ref_pwopsd(s, t, ids, mask, step=0, *, temperature=1.1, beta=0.0, jsd_token_clip=0.05, top_k_loss=0,
               position_w_min=0.25, position_tau=0.30, position_s=0.10, position_global_reduction=False):  # fmt: skip
    rows, total, count = [], torch.zeros((), dtype=F64), 0
    for b in range(mask.shape[0]):
        length, k, row = int(mask[b].sum()), 0, torch.zeros((), dtype=F64)
        for i in range(mask.shape[1]):
            if not mask[b, i]:
                continue
            k += 1
            w = ref_weight(k, length, position_w_min, position_tau, position_s)
            ell = ref_gkd_token(s[b, i], t[b, i], temperature=temperature, beta=beta,
                                jsd_token_clip=jsd_token_clip, top_k_loss=top_k_loss)  # fmt: skip
            row = row + w * ell
        if length:
            rows.append(row / length)
            total, count = total + row, count + length
    if position_global_reduction:
        return total / max(count, 1)
    return sum(rows, torch.zeros((), dtype=F64)) / max(len(rows), 1)


def ref_eopd(s, t, ids, mask, step=0, *, temperature=1.1):
    total = torch.zeros((), dtype=F64)
    for b, i in valid_positions(mask):
        o = ids[b, i]
        lp, lq = ref_log_softmax(s[b, i] / temperature), ref_log_softmax(t[b, i] / temperature)
        advantage = (lq[o] - lp[o]).detach()
        opd = -advantage * (1 + lp[o] - lp[o].detach())  # value log p(o) - log q(o), gradient -Â ∇log p(o)
        q = lq.exp().detach()
        entropy = -(q * lq.detach()).sum()
        if entropy > 0.8:
            idx = ref_top_index(t[b, i], 16)
            q_top = q[idx] / q[idx].sum()
            opd = opd + (q_top * (q_top.log() - lp[idx])).sum()
        total = total + opd
    return total / max(int(mask.sum()), 1)


def ref_quantile(values, q):
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def ref_reopold(s, t, ids, mask, step=0, *, temperature=1.1, reopold_lambda=0.1, reopold_beta=0.2,
                reopold_t_switch=50):  # fmt: skip
    floor = math.log(reopold_lambda) / (1 - reopold_lambda)
    tokens = []
    for b, i in valid_positions(mask):
        o = ids[b, i]
        lp = ref_log_softmax(s[b, i] / temperature)
        lq = ref_log_softmax(t[b, i] / temperature)
        p = lp.exp().detach()
        tokens.append((float((lq[o] - lp[o]).detach()), lp[o], float(-(p * lp.detach()).sum())))
    if step < reopold_t_switch:
        kept = [(r, lp) for r, lp, _ in tokens if r >= floor]
    else:
        tau = ref_quantile([h for _, _, h in tokens], 1 - reopold_beta) if tokens else 0.0
        kept = [(r, lp) for r, lp, h in tokens if h >= tau]
    total = torch.zeros((), dtype=F64)
    for r, lp in kept:
        total = total - max(r, floor) * lp
    return total / max(len(kept), 1)


REFERENCES = {"opsd": ref_opsd, "pwopsd": ref_pwopsd, "eopd": ref_eopd, "reopold": ref_reopold}


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    student: torch.Tensor
    teacher: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor


MASK_ROWS = [
    [1, 1, 1, 1, 1, 1, 1],  # full
    [0, 0, 0, 0, 0, 0, 0],  # empty row
    [1, 1, 1, 0, 0, 0, 0],  # right-padded
    [1, 0, 1, 1, 0, 1, 0],  # holes (pad == EOS inside a completion)
]


def make_batch(seed: int, vocab: int = 19, scale: float = 2.5, dtype: torch.dtype = F64) -> Batch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor(MASK_ROWS, dtype=torch.bool)
    shape = (*mask.shape, vocab)
    student = torch.randn(shape, generator=g, dtype=F64) * scale
    teacher = 0.6 * student + torch.randn(shape, generator=g, dtype=F64) * scale
    ids = torch.randint(0, vocab, mask.shape, generator=g)
    ids[~mask] = -100
    return Batch(student.to(dtype), teacher.to(dtype), ids, mask)


def module_loss_and_grad(method, batch, step=0, **hp):
    student = batch.student.clone().requires_grad_()
    teacher = batch.teacher.clone().requires_grad_()
    loss, metrics = compute_distillation_loss(method, student, teacher, batch.ids, batch.mask, global_step=step, **hp)
    loss.backward()
    assert teacher.grad is None, "the teacher must carry no gradient"
    return loss.detach(), student.grad, metrics


def reference_loss_and_grad(method, batch, step=0, **hp):
    student = batch.student.clone().requires_grad_()
    loss = REFERENCES[method](student, batch.teacher, batch.ids, batch.mask, step, **hp)
    (grad,) = torch.autograd.grad(loss, student, allow_unused=True)
    return loss.detach(), torch.zeros_like(student) if grad is None else grad


CASES = [
    ("opsd", 0, {}),
    ("opsd", 0, {"jsd_token_clip": 0.0}),
    ("opsd", 0, {"beta": 0.5}),
    ("opsd", 0, {"beta": 0.5, "jsd_token_clip": 0.0}),
    ("opsd", 0, {"beta": 1.0}),
    ("opsd", 0, {"beta": 1.0, "jsd_token_clip": 0.0, "temperature": 0.7}),
    ("opsd", 0, {"top_k_loss": 5}),
    ("opsd", 0, {"top_k_loss": 4, "beta": 0.3, "temperature": 1.0}),
    ("opsd", 0, {"top_k_loss": 50}),  # k >= V: the full vocabulary
    ("opsd", 0, {"jsd_clip_mode": "token", "jsd_token_clip": 1.5}),
    ("opsd", 0, {"use_tinker_loss": True}),
    ("opsd", 0, {"temperature": 2.0, "jsd_token_clip": 0.01}),
    ("pwopsd", 0, {}),
    ("pwopsd", 0, {"position_global_reduction": True}),
    ("pwopsd", 0, {"position_w_min": 1.0}),
    ("pwopsd", 0, {"position_w_min": 0.5, "position_tau": 0.1, "position_s": 0.3}),
    ("pwopsd", 0, {"position_s": 1e-9, "position_global_reduction": True}),  # s guarded to 1e-6: a step
    ("pwopsd", 0, {"beta": 0.5, "top_k_loss": 6, "jsd_token_clip": 0.0}),
    ("pwopsd", 0, {"beta": 1.0, "temperature": 0.8}),
    ("eopd", 0, {}),
    ("eopd", 0, {"temperature": 0.6}),
    ("eopd", 0, {"temperature": 3.0}),
    ("reopold", 0, {}),  # phase I
    ("reopold", 49, {}),
    ("reopold", 50, {}),  # phase II
    ("reopold", 120, {"reopold_beta": 0.5, "reopold_lambda": 0.3, "temperature": 0.8}),
    ("reopold", 7, {"reopold_t_switch": 0}),
    ("reopold", 70, {"reopold_beta": 1.0}),
    ("reopold", 3, {"reopold_lambda": 0.9, "reopold_t_switch": 10}),
]


@pytest.mark.parametrize(("method", "step", "hp"), CASES, ids=[f"{m}-{s}-{h}" for m, s, h in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_reference(method, step, hp, seed):
    batch = make_batch(seed)
    loss, grad, _ = module_loss_and_grad(method, batch, step, **hp)
    ref_loss, ref_grad = reference_loss_and_grad(method, batch, step, **hp)
    # position weights are computed in float32 (docs/methods.md#pwopsd), everything else in the input's float64
    tol = 1e-6 if method == "pwopsd" else 1e-10
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)
    assert grad.abs().sum() > 0
    assert grad[~batch.mask].abs().max() == 0, "no gradient may reach invalid positions"


def test_reference_cases_exercise_every_branch():
    """The random inputs must hit the clip, negative token losses, both EOPD gate states and the REOPOLD floor."""
    batch = make_batch(0)
    _, _, m = module_loss_and_grad("opsd", batch)
    assert 0 < m["opsd/neg_token_fraction"] < 1
    terms = gkd_element_terms(
        torch.log_softmax(batch.student / 1.1, -1), torch.log_softmax(batch.teacher / 1.1, -1), 0.0
    )[batch.mask]
    assert (terms > 0.05).any() and (terms < 0).any()
    for seed in (0, 1):
        _, _, m = module_loss_and_grad("eopd", make_batch(seed))
        assert 0 < m["eopd/pct_high_entropy"] < 1
        _, _, m = module_loss_and_grad("reopold", make_batch(seed))
        assert 0 < m["reopold/clip_fraction"] < 1


# --------------------------------------------------------------------------------------------------------------------
# Unit-test vectors (docs/methods.md#test-vectors)
# --------------------------------------------------------------------------------------------------------------------


def moderate(mask):
    return position_weights(mask, 0.25, 0.30, 0.10)


def test_position_weights_vectors():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    w = moderate(mask)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w[0], torch.tensor([0.3610, 0.7594, 0.9720, 0.9976]), atol=1e-4, rtol=0)
    torch.testing.assert_close(w[1], torch.tensor([0.5332, 0.9918, 0.0, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(w[2], torch.tensor([0.9106, 0.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    assert w[3].abs().sum() == 0
    # positions count valid tokens only, and the normaliser is the row length, not the padded width
    holes = torch.tensor([[0, 1, 0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(w[0], moderate(holes)[holes], atol=1e-6, rtol=0)


def test_schedule_weight_vector():
    u = torch.tensor([0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0])
    expected = torch.tensor([0.2856, 0.3394, 0.4517, 0.6250, 0.7983, 0.9106, 0.9865, 0.9993])
    torch.testing.assert_close(schedule_weight(u, 0.25, 0.30, 0.10), expected, atol=1e-4, rtol=0)
    # mean over uniform u: 0.25 + 0.075 [ln(1 + e^7) - ln(1 + e^-3)] = 0.7714 (documented: ≈ 0.771)
    mean = schedule_weight(torch.linspace(0, 1, 100_001, dtype=F64), 0.25, 0.30, 0.10).mean().item()
    assert mean == pytest.approx(0.25 + 0.075 * (math.log1p(math.exp(7)) - math.log1p(math.exp(-3))), abs=1e-5)
    assert mean == pytest.approx(0.771, abs=5e-4)


def test_pw_reduction_vector():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    ones = {"token_loss": torch.ones(2, 4)}
    reduce = METHODS["pwopsd"].reduce
    per_sequence, _ = reduce(ones, mask, 0, LossHParams())
    global_mean, _ = reduce(ones, mask, 0, LossHParams(position_global_reduction=True))
    assert per_sequence.item() == pytest.approx(0.76748, abs=1e-5)
    assert global_mean.item() == pytest.approx(0.76916, abs=1e-5)
    row_means = (moderate(mask).sum(-1) / mask.sum(-1)).tolist()
    assert row_means == pytest.approx([0.77251, 0.76246], abs=1e-5)


def test_reopold_floor_and_phase_vectors():
    assert reopold_floor(0.1) == pytest.approx(-2.5584, abs=1e-4)
    assert reopold_floor(0.2) == pytest.approx(-2.0118, abs=1e-4)
    assert reopold_floor(0.05) == pytest.approx(-3.1534, abs=1e-4)
    batch = make_batch(3)
    assert module_loss_and_grad("reopold", batch, 49)[2]["reopold/phase"] == 1.0
    assert module_loss_and_grad("reopold", batch, 50)[2]["reopold/phase"] == 2.0
    assert module_loss_and_grad("reopold", batch, 49)[2]["reopold/floor"] == pytest.approx(-2.5584, abs=1e-4)


def log_probs(*probs):
    return torch.tensor(probs, dtype=F64).log()


def test_pointwise_clip_vector_two_entries():
    q, p = log_probs(0.5, 0.5), log_probs(0.9, 0.1)
    assert gkd_token_loss(p, q, beta=0.0, clip=0.0).item() == pytest.approx(0.5108, abs=1e-4)
    assert gkd_token_loss(p, q, beta=0.0, clip=0.05).item() == pytest.approx(-0.2439, abs=1e-4)
    # through the public loss: one valid token, logits = log-probs at T = 1
    ids, mask = torch.tensor([[0]]), torch.tensor([[True]])
    loss, metrics = compute_distillation_loss("opsd", p[None, None], q[None, None], ids, mask, temperature=1.0)
    assert loss.item() == pytest.approx(-0.2439, abs=1e-4)
    assert metrics["opsd/neg_token_fraction"] == 1.0


def test_pointwise_clip_vector_three_entries():
    q, p = log_probs(0.7, 0.2, 0.1), log_probs(0.2, 0.3, 0.5)
    terms = gkd_element_terms(p, q, 0.0)
    torch.testing.assert_close(terms, torch.tensor([0.8769, -0.0811, -0.1609], dtype=F64), atol=1e-4, rtol=0)
    assert gkd_token_loss(p, q, beta=0.0, clip=0.05).item() == pytest.approx(-0.1920, abs=1e-4)
    # clipped entries pass no gradient: dℓ/dz_S(j) = (1/T)[p(j) Σ_{v∈U} q(v) - q(j) 1[j∈U]], U = unclipped entries
    z = p.clone().requires_grad_()  # logits at T = 1
    loss, _ = compute_distillation_loss("opsd", z[None, None], q[None, None], torch.tensor([[0]]),
                                        torch.tensor([[True]]), temperature=1.0)  # fmt: skip
    loss.backward()
    prob_p, prob_q, unclipped = p.exp(), q.exp(), torch.tensor([False, True, True])
    expected = prob_p * prob_q[unclipped].sum() - prob_q * unclipped
    torch.testing.assert_close(z.grad, expected)


def test_opsd_equals_pwopsd_with_flat_weights_and_global_reduction():
    batch = make_batch(5, dtype=torch.float32)
    for hp in ({}, {"beta": 0.5, "top_k_loss": 7}):
        a, ga, _ = module_loss_and_grad("opsd", batch, **hp)
        b, gb, _ = module_loss_and_grad("pwopsd", batch, position_w_min=1.0, position_global_reduction=True, **hp)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


def logits_with_entropy(entropy: float) -> torch.Tensor:
    """Logits over V = 3 (at T = 1) of probabilities (1 - 2a, a, a) with the given entropy (bisection on a ≤ 1/3)."""
    lo, hi = 1e-12, 1 / 3
    for _ in range(200):
        a = (lo + hi) / 2
        h = -((1 - 2 * a) * math.log(1 - 2 * a) + 2 * a * math.log(a))
        lo, hi = (a, hi) if h < entropy else (lo, a)
    return torch.tensor([1 - 2 * a, a, a], dtype=F64).log()


def test_eopd_gate_flips_just_above_threshold():
    student = torch.tensor([[[0.3, -0.2, 0.1]]], dtype=F64)
    ids, mask = torch.tensor([[0]]), torch.tensor([[True]])
    below = compute_distillation_loss("eopd", student, logits_with_entropy(0.8 - 1e-9)[None, None], ids, mask,
                                      temperature=1.0)  # fmt: skip
    above = compute_distillation_loss("eopd", student, logits_with_entropy(0.8 + 1e-9)[None, None], ids, mask,
                                      temperature=1.0)  # fmt: skip
    assert below[1]["eopd/pct_high_entropy"] == 0.0 and below[1]["eopd/L_FKL_mean"] == 0.0
    assert above[1]["eopd/pct_high_entropy"] == 1.0 and above[1]["eopd/L_FKL_mean"] > 0
    # H^T exactly 0.8 is off (strict inequality), the next float above is on
    for dtype in (torch.float32, torch.float64):
        entropy = torch.tensor([0.8, 0.8, 0.7, 2.0], dtype=dtype)
        entropy[1] = torch.nextafter(entropy[1], torch.tensor(1.0, dtype=dtype))
        assert eopd_gate(entropy).tolist() == [False, True, False, True]


def test_eopd_metrics_and_on_policy_ratio():
    batch = make_batch(2)
    loss, _, metrics = module_loss_and_grad("eopd", batch)
    assert metrics["eopd/r_mean"] == 1.0 and metrics["eopd/clip_fraction"] == 0.0
    assert metrics["eopd/L_OPD_mean"] + metrics["eopd/L_FKL_mean"] == pytest.approx(loss.item(), abs=1e-12)
    entropies = []
    for b, i in valid_positions(batch.mask):
        q = torch.softmax(batch.teacher[b, i] / 1.1, -1)
        entropies.append(float(-(q * q.log()).sum()))
    assert metrics["eopd/teacher_entropy_mean"] == pytest.approx(sum(entropies) / len(entropies), abs=1e-10)
    assert metrics["eopd/pct_high_entropy"] == pytest.approx(sum(h > 0.8 for h in entropies) / len(entropies))


def test_reopold_phase_two_keeps_top_beta_fraction_by_entropy():
    g = torch.Generator().manual_seed(11)
    student = torch.randn(1, 10, 9, generator=g, dtype=F64) * torch.linspace(0.2, 4, 10, dtype=F64)[None, :, None]
    teacher = torch.randn(1, 10, 9, generator=g, dtype=F64)
    batch = Batch(student, teacher, torch.randint(0, 9, (1, 10), generator=g), torch.ones(1, 10, dtype=torch.bool))
    _, grad, metrics = module_loss_and_grad("reopold", batch, 60)
    entropy = -(torch.softmax(student / 1.1, -1) * torch.log_softmax(student / 1.1, -1)).sum(-1)[0]
    top_two = set(entropy.argsort()[-2:].tolist())
    assert metrics["reopold/M_fraction"] == pytest.approx(0.2)
    assert {i for i in range(10) if grad[0, i].abs().sum() > 0} == top_two


def test_reopold_phase_one_drops_floored_tokens():
    batch = make_batch(4)
    _, grad, metrics = module_loss_and_grad("reopold", batch, 0)
    floor = reopold_floor(0.1)
    floored = 0
    for b, i in valid_positions(batch.mask):
        lp = torch.log_softmax(batch.student[b, i] / 1.1, -1)[batch.ids[b, i]]
        lq = torch.log_softmax(batch.teacher[b, i] / 1.1, -1)[batch.ids[b, i]]
        dropped = (lq - lp).item() < floor
        floored += dropped
        assert (grad[b, i].abs().sum() == 0) == dropped
    assert floored > 0
    n = int(batch.mask.sum())
    assert metrics["reopold/clip_fraction"] == pytest.approx(floored / n)
    assert metrics["reopold/M_fraction"] == pytest.approx(1 - floored / n)


def test_reopold_cleans_infinite_rewards():
    """A teacher log-prob of -inf (reward -inf) is floored, not NaN; +inf/NaN rewards become 0 (docs/methods.md#reopold)."""
    student = torch.zeros(1, 2, 3, dtype=F64)
    teacher = torch.tensor([[[-math.inf, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=F64)
    ids, mask = torch.tensor([[0, 0]]), torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = compute_distillation_loss("reopold", student, teacher, ids, mask, global_step=60,
                                              reopold_beta=1.0)  # fmt: skip
    floor, logp = reopold_floor(0.1), math.log(1 / 3)
    assert loss.item() == pytest.approx(-(floor * logp + 0.0) / 2)
    assert metrics["reopold/R_min"] == -1e30 and metrics["reopold/R_mean"] == pytest.approx(-5e29)
    assert metrics["reopold/clip_fraction"] == 0.5 and metrics["reopold/M_fraction"] == 1.0


def test_pwopsd_metrics():
    batch = make_batch(6)
    _, _, metrics = module_loss_and_grad("pwopsd", batch)
    w = moderate(batch.mask)[batch.mask]
    assert metrics["ea/position_weight_mean"] == pytest.approx(w.mean().item())
    assert metrics["ea/position_weight_min"] == pytest.approx(w.min().item())
    assert metrics["ea/position_weight_max"] == pytest.approx(w.max().item())


# --------------------------------------------------------------------------------------------------------------------
# Cross-check with TRL's generalized_jsd_loss (the function the reference vendors), clip off
# --------------------------------------------------------------------------------------------------------------------


def test_opsd_without_clip_matches_trl_generalized_jsd_loss(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd_trainer = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    batch = make_batch(8)
    for beta in (0.0, 0.5, 1.0):
        trl_loss = gkd_trainer.GKDTrainer.generalized_jsd_loss(
            batch.student, batch.teacher, labels=batch.ids, beta=beta, temperature=1.1
        )
        ours, _ = compute_distillation_loss("opsd", batch.student, batch.teacher, batch.ids, batch.mask, beta=beta,
                                            jsd_token_clip=0.0)  # fmt: skip
        torch.testing.assert_close(ours, trl_loss, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Edge cases, dtypes, validation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_empty_micro_batch_returns_graph_attached_zero(method):
    batch = make_batch(1, dtype=torch.float32)
    empty = torch.zeros_like(batch.mask)
    ids = torch.full_like(batch.ids, -100)
    student = batch.student.clone().requires_grad_()
    loss, metrics = compute_distillation_loss(method, student, batch.teacher, ids, empty, global_step=60)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert student.grad is not None and student.grad.abs().max() == 0
    assert all(math.isfinite(v) for v in metrics.values())
    hidden = torch.randn(*empty.shape, 5, requires_grad=True)
    weight = torch.randn(19, 5, requires_grad=True)
    loss, _ = chunked_distillation_loss(method, hidden, hidden.detach(), weight, ids, empty, global_step=60)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


@pytest.mark.parametrize("method", list(METHODS))
def test_invalid_positions_cannot_leak(method):
    """NaN/inf logits and garbage ids at masked positions change neither the value nor the valid gradients."""
    batch = make_batch(9)
    clean_loss, clean_grad, clean_metrics = module_loss_and_grad(method, batch, 60)
    dirty = make_batch(9)
    dirty.student[~dirty.mask] = float("nan")
    dirty.teacher[~dirty.mask] = float("inf")
    dirty.ids[~dirty.mask] = 10**9
    student = dirty.student.clone().requires_grad_()
    loss, metrics = compute_distillation_loss(method, student, dirty.teacher, dirty.ids, dirty.mask, global_step=60)
    assert loss.item() == clean_loss.item() and metrics == clean_metrics
    loss.backward()
    torch.testing.assert_close(student.grad[dirty.mask], clean_grad[dirty.mask], rtol=0, atol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_inputs_compute_in_float32(method):
    batch = make_batch(10, dtype=torch.bfloat16)
    student = batch.student.clone().requires_grad_()
    loss, _ = compute_distillation_loss(method, student, batch.teacher, batch.ids, batch.mask, global_step=60)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad.dtype == torch.bfloat16
    upcast = student.detach().float().requires_grad_()
    loss32, _ = compute_distillation_loss(method, upcast, batch.teacher.float(), batch.ids, batch.mask, global_step=60)
    loss32.backward()
    assert loss.item() == loss32.item()  # same float32 math on the same (bf16-representable) values
    torch.testing.assert_close(student.grad, upcast.grad.to(torch.bfloat16), rtol=0, atol=0)


def test_opsd_bf16_fidelity_switch():
    batch = make_batch(12, dtype=torch.bfloat16)
    fp32, _ = compute_distillation_loss("opsd", batch.student, batch.teacher, batch.ids, batch.mask)
    bf16, _ = compute_distillation_loss("opsd", batch.student, batch.teacher, batch.ids, batch.mask, opsd_bf16=True)
    assert bf16.dtype == torch.float32
    assert bf16.item() != fp32.item()
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.05, abs=0.02)
    # the per-token terms equal the reference's bf16 op sequence: /T, log_softmax, q(log q - log p), clamp, sum
    s, t = batch.student / 1.1, batch.teacher / 1.1
    lp, lq = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    d = (lq.exp() * (lq - lp)).clamp(max=0.05)
    expected = d.sum(-1).float()[batch.mask].sum() / batch.mask.sum()
    assert bf16.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("method", "hp", "flag"),
    [
        ("reopold", {"reopold_lambda": 0.0}, "--reopold_lambda"),
        ("reopold", {"reopold_lambda": 1.0}, "--reopold_lambda"),
        ("reopold", {"reopold_beta": 0.0}, "--reopold_beta"),
        ("reopold", {"reopold_beta": 1.5}, "--reopold_beta"),
        ("reopold", {"reopold_t_switch": -1}, "--reopold_t_switch"),
        ("opsd", {"beta": -0.1}, "--beta"),
        ("pwopsd", {"beta": 1.01}, "--beta"),
        ("pwopsd", {"position_s": 0.0}, "--position_s"),
        ("pwopsd", {"position_s": -0.1}, "--position_s"),
        ("pwopsd", {"position_w_min": -0.5}, "--position_w_min"),
        ("pwopsd", {"position_tau": float("nan")}, "--position_tau"),
        ("opsd", {"jsd_token_clip": -0.05}, "--jsd_token_clip"),
        ("opsd", {"top_k_loss": -1}, "--top_k_loss"),
        ("opsd", {"top_k_loss": 2.5}, "--top_k_loss"),
        ("opsd", {"jsd_clip_mode": "tokenwise"}, "--jsd_clip_mode"),
        ("eopd", {"temperature": 0.0}, "--temperature"),
        ("reopold", {"temperature": -1.0}, "--temperature"),
    ],
)
def test_invalid_hyper_parameters_name_the_flag(method, hp, flag):
    batch = make_batch(0, dtype=torch.float32)
    with pytest.raises(ValueError, match=flag):
        compute_distillation_loss(method, batch.student, batch.teacher, batch.ids, batch.mask, **hp)
    hidden = torch.randn(*batch.mask.shape, 3)
    with pytest.raises(ValueError, match=flag):
        chunked_distillation_loss(method, hidden, hidden, torch.randn(19, 3), batch.ids, batch.mask, **hp)
    with pytest.raises(ValueError, match=flag):  # the same check, without a batch (the trainer's config validation)
        check_hparams(method, **hp)


def test_unused_hyper_parameters_are_ignored_and_unknown_names_rejected():
    batch = make_batch(0, dtype=torch.float32)
    args = (batch.student, batch.teacher, batch.ids, batch.mask)
    base, _ = compute_distillation_loss("opsd", *args)
    ignored, _ = compute_distillation_loss("opsd", *args, reopold_lambda=7.0, position_s=-1.0, position_w_min=0.9)
    assert base.item() == ignored.item()
    with pytest.raises(TypeError, match="temprature"):
        compute_distillation_loss("opsd", *args, temprature=1.0)
    with pytest.raises(ValueError, match=r"unknown --method 'kl'.*opsd, eopd, pwopsd, reopold"):
        compute_distillation_loss("kl", *args)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distillation_loss("opsd", batch.student, batch.teacher, torch.eye(19), batch.ids, batch.mask,
                                  chunk_size=0)  # fmt: skip


def test_loss_hparams_from_args():
    config = argparse.Namespace(temperature=1.1, beta=0.0, position_w_min=0.5, learning_rate=5e-6, reopold_beta=0.3)
    assert loss_hparams_from_args(config) == {"temperature": 1.1, "beta": 0.0, "position_w_min": 0.5,
                                              "reopold_beta": 0.3}  # fmt: skip
    assert loss_hparams_from_args({"top_k_loss": 3, "seed": 1}) == {"top_k_loss": 3}
    full = loss_hparams_from_args(LossHParams())
    assert full == {f: getattr(LossHParams(), f) for f in full} and len(full) == len(LossHParams.__dataclass_fields__)
    batch = make_batch(0, dtype=torch.float32)
    compute_distillation_loss("pwopsd", batch.student, batch.teacher, batch.ids, batch.mask, **full)


def test_reference_defaults():
    hp = LossHParams()
    assert (hp.temperature, hp.beta, hp.jsd_token_clip, hp.top_k_loss) == (1.1, 0.0, 0.05, 0)
    assert (hp.position_w_min, hp.position_tau, hp.position_s, hp.position_global_reduction) == (0.25, 0.3, 0.1, False)
    assert (hp.reopold_lambda, hp.reopold_beta, hp.reopold_t_switch) == (0.1, 0.2, 50)
    assert list(METHODS) == ["opsd", "eopd", "pwopsd", "reopold"]  # the launchers', tables' and README's order


def test_launcher_args():
    """The extra flags the paper's launchers pass per method, as the strings they print."""
    assert {name: m.launcher_args for name, m in METHODS.items()} == {
        "opsd": (),
        "eopd": (),
        "pwopsd": ("--position_w_min", "0.25", "--position_tau", "0.30", "--position_s", "0.10"),
        "reopold": ("--reopold_lambda", "0.1", "--reopold_beta", "0.2", "--reopold_t_switch", "50"),
    }
    for m in METHODS.values():  # every launcher flag is one the method reads, at its default value
        flags = dict(zip(m.launcher_args[::2], m.launcher_args[1::2], strict=True))
        assert all(f.removeprefix("--") in m.hparams for f in flags)
        assert check_hparams(m.name, **{f[2:]: type(getattr(LossHParams(), f[2:]))(v) for f, v in flags.items()}) == (
            LossHParams()
        )


def test_hparam_fields_declare_every_flag():
    """Each field carries its help text and its check; the config helper keeps only argparse-safe metadata."""
    fields = loss_hparam_fields()
    assert tuple(f.name for f in fields) == HPARAM_NAMES
    for f in fields:
        assert f.metadata["help"] and f.metadata["valid"] and f.metadata["check"](f.default), f.name
    cli_beta, loss_beta = loss_hparam_field("beta"), loss_hparam_field("beta", cli=False)
    assert (cli_beta.default, loss_beta.default) == (0.5, 0.0)  # TRL's GKD default on the CLI, the launchers' here
    assert loss_hparam_field("temperature").default == 0.9 and loss_hparam_field("jsd_token_clip").default == 0.05
    assert set(cli_beta.metadata) == {"help"}
    assert dict(loss_hparam_field("jsd_clip_mode").metadata)["choices"] == ["pointwise", "token"]
