"""The four on-policy distillation losses of pwopsd: ``opsd``, ``pwopsd``, ``eopd``, ``reopold`` (SPEC §5).

Every method is a function of the two temperature-scaled distributions log p = log_softmax(z_S / T) and
log q = log_softmax(z_T / T), split in two small pure functions registered in :data:`METHODS`:

* ``token_terms(student_log_probs, teacher_log_probs, ids, hp) -> {name: [...] tensor}``: the per-token quantities of
  one position, from that position's distributions alone. Some carry the student gradient (the token loss,
  ``log p(o_t)``), the others are constants (teacher entropy, ``log q(o_t)``, ...).
* ``reduce(terms, mask, global_step, hp) -> (loss, metrics)``: everything batch-level, on ``[B, T]`` tensors: the
  PW-OPSD weights and row lengths, REOPOLD's phase mask and entropy quantile, the reductions, the logged metrics.

:func:`compute_distillation_loss` applies ``token_terms`` to materialised ``[B, T, V]`` logits (the reference's way).
:func:`chunked_distillation_loss` applies the *same* ``token_terms`` to the valid tokens only, a chunk at a time,
projecting ``hidden @ W.T`` inside the chunk, and then the *same* ``reduce``: no ``[B, T, V]`` tensor ever exists.
Both paths therefore agree by construction up to float rounding of the projection.

Numerical rules (SPEC §5.6): upcast to float32 before dividing by ``T``; ``log_softmax``, never ``log(softmax)``;
``logaddexp`` for the JSD mixture; ``-100`` ids replaced by 0 before any gather; masking with ``where`` (NaN/inf in
padded positions cannot leak into the value); every denominator clamped to at least 1; a micro-batch without valid
tokens returns a zero that is attached to the graph (backward runs and yields zero gradients).

Deviation from the reference: the reference computes the ``opsd`` loss in the model dtype (bf16); here every method
computes in float32 (float64 inputs stay float64). ``opsd_bf16=True`` restores bf16 for ``opsd`` (SPEC §12 #5).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "EOPD_CLIP_EPS",
    "EOPD_ENTROPY_THRESHOLD",
    "EOPD_TOP_K",
    "METHODS",
    "DistillationMethod",
    "LossHParams",
    "check_hparams",
    "chunked_distillation_loss",
    "compute_distillation_loss",
    "eopd_gate",
    "get_method",
    "gkd_element_terms",
    "gkd_token_loss",
    "loss_hparams_from_args",
    "position_weights",
    "reopold_floor",
    "schedule_weight",
]

Terms = dict[str, Tensor]
Metrics = dict[str, float]

EOPD_ENTROPY_THRESHOLD = 0.8  # τ_H: the FKL term is on where the teacher entropy (nats) is strictly above this
EOPD_TOP_K = 16  # k of EOPD's top-k forward KL
EOPD_CLIP_EPS = 0.2  # PPO ratio clip ε of EOPD's sampled reverse KL (inactive on-policy)
POSITION_S_GUARD = 1e-6  # s is used as max(s, 1e-6)
REOPOLD_NEG_INF_REWARD = -1e30  # a -inf reward becomes this before the floor restores it


# --------------------------------------------------------------------------------------------------------------------
# Hyper-parameters
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossHParams:
    """The loss hyper-parameters, named exactly as the training flags, with the reference defaults (SPEC §2.2)."""

    temperature: float = 1.1  # T: divides student and teacher logits in every method (SPEC §4.6)
    beta: float = 0.0  # GKD β of opsd/pwopsd: 0 forward KL, 1 reverse KL, (0,1) generalised JSD
    jsd_token_clip: float = 0.05  # c: upper clip of each (token, vocabulary) element term; 0 = off
    jsd_clip_mode: str = "pointwise"  # opt-in (SPEC §11.2): "pointwise" (reference) or "token" (clip ℓ_t itself)
    top_k_loss: int = 0  # k > 0: renormalise student and teacher over the teacher's top-k (opsd/pwopsd)
    use_tinker_loss: bool = False  # opsd only: sampled-token policy-gradient reverse KL (SPEC §5.1)
    opsd_bf16: bool = False  # opsd only: element terms in bf16 as the reference (SPEC §4.7, §12 #5)
    position_w_min: float = 0.25  # PW-OPSD schedule (SPEC §5.2)
    position_tau: float = 0.30
    position_s: float = 0.10
    position_global_reduction: bool = False  # PW-OPSD ablation: global token mean instead of per-sequence
    reopold_lambda: float = 0.1  # REOPOLD floor ln λ / (1 - λ)  (SPEC §5.4)
    reopold_beta: float = 0.2  # REOPOLD phase II keeps the top β fraction of tokens by student entropy
    reopold_t_switch: int = 50  # REOPOLD phase I for global_step < t_switch, phase II after


HPARAM_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LossHParams))


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# name -> (predicate, what a valid value is). Checked for the hyper-parameters the method uses.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: _is_real(v) and v > 0, "must be a number > 0"),
    "beta": (lambda v: _is_real(v) and 0 <= v <= 1, "(the GKD β) must be in [0, 1]"),
    "jsd_token_clip": (lambda v: _is_real(v) and v >= 0, "must be >= 0 (0 disables the clip)"),
    "jsd_clip_mode": (lambda v: v in ("pointwise", "token"), "must be 'pointwise' or 'token'"),
    "top_k_loss": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0 (0 = full vocabulary)"),
    "use_tinker_loss": (lambda v: isinstance(v, bool), "must be True or False"),
    "opsd_bf16": (lambda v: isinstance(v, bool), "must be True or False"),
    "position_w_min": (lambda v: _is_real(v) and v >= 0, "must be a number >= 0"),
    "position_tau": (_is_real, "must be a finite number"),
    "position_s": (lambda v: _is_real(v) and v > 0, "must be > 0 (values below 1e-6 are used as 1e-6)"),
    "position_global_reduction": (lambda v: isinstance(v, bool), "must be True or False"),
    "reopold_lambda": (lambda v: _is_real(v) and 0 < v < 1, "must be in (0, 1)"),
    "reopold_beta": (lambda v: _is_real(v) and 0 < v <= 1, "(REOPOLD's kept fraction) must be in (0, 1]"),
    "reopold_t_switch": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0"),
}


def _make_hparams(method: DistillationMethod, hparams: Mapping[str, Any]) -> LossHParams:
    """Build the hyper-parameters; reject unknown names (TypeError) and invalid values of used ones (ValueError)."""
    unknown = sorted(set(hparams) - set(HPARAM_NAMES))
    if unknown:
        raise TypeError(f"unknown loss hyper-parameter(s) {', '.join(unknown)}; valid names: {', '.join(HPARAM_NAMES)}")
    hp = LossHParams(**hparams)
    for name in ("temperature", *method.hparams):
        ok, what = _CHECKS[name]
        value = getattr(hp, name)
        if not ok(value):
            raise ValueError(f"--{name} {what}, got {value!r} (method {method.name})")
    return hp


def check_hparams(method: str, **hparams: Any) -> LossHParams:
    """The hyper-parameters of ``method`` with the reference defaults, validated as the losses validate them.

    ValueError naming the flag for an unknown method or an invalid value, TypeError for an unknown name.
    """
    return _make_hparams(get_method(method), hparams)


def loss_hparams_from_args(args: Any) -> dict[str, Any]:
    """The loss hyper-parameters found on a config object (dataclass, Namespace or mapping), by flag name.

    Names the object lacks are left out, so the loss uses the reference default for them.
    """
    if isinstance(args, Mapping):
        return {k: args[k] for k in HPARAM_NAMES if k in args}
    return {k: getattr(args, k) for k in HPARAM_NAMES if hasattr(args, k)}


# --------------------------------------------------------------------------------------------------------------------
# Shared math
# --------------------------------------------------------------------------------------------------------------------


def _math_dtype(x: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (the reference tests): never below float32."""
    return torch.promote_types(x.dtype, torch.float32)


def _log_probs(logits: Tensor, temperature: float, dtype: torch.dtype | None = None) -> Tensor:
    """log softmax(z / T) over the last axis, upcast (to at least float32 by default) before dividing."""
    return F.log_softmax(logits.to(dtype or _math_dtype(logits)) / temperature, dim=-1)


def _gather(x: Tensor, ids: Tensor) -> Tensor:
    """x[..., ids] for a [..., V] tensor and [...] ids."""
    return x.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Σ_valid x / max(N, 1) with ``where`` masking."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1)


def _entropy(log_probs: Tensor) -> Tensor:
    """H = -Σ_v p(v) log p(v) with 0·log 0 = 0, without gradient."""
    return torch.special.entr(log_probs.detach().exp()).sum(-1)


def _item(x: Tensor) -> float:
    return float(x.detach())


def gkd_element_terms(student_log_probs: Tensor, teacher_log_probs: Tensor, beta: float) -> Tensor:
    """Element terms d_{t,v} of GKD's generalised JSD (TRL ``generalized_jsd_loss``), before the vocabulary sum.

    With p = student, q = teacher:
      β = 0: d = q (log q - log p)                       (Σ_v d = KL(q || p), forward KL)
      β = 1: d = p (log p - log q)                       (Σ_v d = KL(p || q), reverse KL)
      else:  log M = logaddexp(log p + log(1-β), log q + log β)
             d = β q (log q - log M) + (1-β) p (log p - log M)
    """
    if beta == 0:  # in place on the fresh difference: one [..., V] buffer fewer (autograd keeps only q)
        return (teacher_log_probs - student_log_probs).mul_(teacher_log_probs.exp())
    if beta == 1:
        return student_log_probs.exp() * (student_log_probs - teacher_log_probs)
    log_mix = torch.logaddexp(student_log_probs + math.log1p(-beta), teacher_log_probs + math.log(beta))
    return beta * teacher_log_probs.exp() * (teacher_log_probs - log_mix) + (1 - beta) * student_log_probs.exp() * (
        student_log_probs - log_mix
    )


def gkd_token_loss(
    student_log_probs: Tensor,
    teacher_log_probs: Tensor,
    *,
    beta: float,
    clip: float,
    clip_mode: str = "pointwise",
    top_k: int = 0,
) -> Tensor:
    """Per-token OPSD loss ℓ_t = Σ_v min(d_{t,v}, c) (SPEC §5.1); [..., V] log-probs at temperature T -> [...].

    d are :func:`gkd_element_terms`. The clip c is point-wise and upper-only, before the vocabulary sum (clipped
    entries pass no gradient, ℓ_t may be negative); c = 0 disables it. ``clip_mode="token"`` (opt-in) clips the sum
    instead: ℓ_t = min(Σ_v d_{t,v}, c). ``top_k > 0``: keep the teacher's top-k entries and renormalise student and
    teacher over those k (log_softmax of the gathered log-probs = of the gathered logits / T; k >= V: all of them).
    """
    if 0 < top_k < teacher_log_probs.shape[-1]:
        teacher_top, index = teacher_log_probs.topk(top_k, dim=-1)
        student_log_probs = F.log_softmax(student_log_probs.gather(-1, index), dim=-1)
        teacher_log_probs = F.log_softmax(teacher_top, dim=-1)
    d = gkd_element_terms(student_log_probs, teacher_log_probs, beta)
    if clip > 0 and clip_mode == "pointwise":
        d = d.masked_fill_(d > clip, clip)  # min(d, c) in place on the fresh d; backward keeps the bool mask only
    loss = d.sum(-1)
    if clip > 0 and clip_mode == "token":
        loss = loss.clamp(max=clip)
    return loss


def schedule_weight(u: Tensor, w_min: float, tau: float, s: float) -> Tensor:
    """PW-OPSD schedule w(u) = w_min + (1 - w_min) · σ((u - τ) / max(s, 1e-6)) of a relative position u ∈ [0, 1].

    The Moderate schedule (0.25, 0.30, 0.10) gives w(0) = 0.2856, w(0.3) = 0.625, w(1) = 0.9993 (SPEC §5.7).
    """
    ok, what = _CHECKS["position_s"]
    if not ok(s):
        raise ValueError(f"--position_s {what}, got {s!r}")
    return w_min + (1 - w_min) * torch.sigmoid((u - tau) / max(s, POSITION_S_GUARD))


def position_weights(mask: Tensor, w_min: float, tau: float, s: float) -> Tensor:
    """PW-OPSD position weights (SPEC §5.2); [B, T] bool mask -> [B, T] float32, 0 at invalid positions.

    L_b = max(Σ_t m_bt, 1), k_bt = Σ_{t' <= t} m_bt', u_bt = max(k_bt - 1/2, 0) / L_b, w_bt = w(u_bt) of
    :func:`schedule_weight`. The position is relative to the row's own valid tokens (not max_completion_length).
    The weights are constants (no gradient); L = 4 gives 0.3610, 0.7594, 0.9720, 0.9976 (Moderate schedule).
    """
    m = mask.to(torch.float32)
    u = (m.cumsum(-1) - 0.5).clamp_min(0) / m.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(mask, schedule_weight(u, w_min, tau, s), 0.0)


def reopold_floor(lam: float) -> float:
    """REOPOLD's reward floor f = ln(λ) / (1 - λ) (SPEC §5.4; λ = 0.1 gives -2.5584)."""
    return math.log(lam) / (1 - lam)


# --------------------------------------------------------------------------------------------------------------------
# opsd and pwopsd (SPEC §5.1, §5.2)
# --------------------------------------------------------------------------------------------------------------------


def _gkd_loss_from_hparams(student_log_probs: Tensor, teacher_log_probs: Tensor, hp: LossHParams) -> Tensor:
    """ℓ_t of :func:`gkd_token_loss` with the flags' β, clip, clip mode and top-k."""
    return gkd_token_loss(
        student_log_probs,
        teacher_log_probs,
        beta=hp.beta,
        clip=hp.jsd_token_clip,
        clip_mode=hp.jsd_clip_mode,
        top_k=hp.top_k_loss,
    )


def _opsd_token_terms(student_log_probs: Tensor, teacher_log_probs: Tensor, ids: Tensor, hp: LossHParams) -> Terms:
    """``token_loss`` = ℓ_t of :func:`gkd_token_loss`; with ``use_tinker_loss``: ``logp_o`` and ``logq_o``."""
    if hp.use_tinker_loss:
        return {"logp_o": _gather(student_log_probs, ids), "logq_o": _gather(teacher_log_probs, ids)}
    token_loss = _gkd_loss_from_hparams(student_log_probs, teacher_log_probs, hp)
    return {"token_loss": token_loss.to(_math_dtype(token_loss))}  # bf16 (opsd_bf16) -> float32


def _opsd_log_prob_dtype(hp: LossHParams) -> torch.dtype | None:
    """bf16 with the fidelity switch (the reference's opsd path runs /T and log_softmax on bf16 logits)."""
    return torch.bfloat16 if hp.opsd_bf16 and not hp.use_tinker_loss else None


def _pwopsd_token_terms(student_log_probs: Tensor, teacher_log_probs: Tensor, ids: Tensor, hp: LossHParams) -> Terms:
    """``token_loss`` = ℓ_t exactly as opsd."""
    return {"token_loss": _gkd_loss_from_hparams(student_log_probs, teacher_log_probs, hp)}


def _negative_fraction(token_loss: Tensor, mask: Tensor) -> float:
    return _item(_masked_mean((token_loss < 0).float(), mask))


def _opsd_reduce(terms: Terms, mask: Tensor, global_step: int, hp: LossHParams) -> tuple[Tensor, Metrics]:
    """Global token mean 𝓛 = Σ m ℓ / max(N, 1).

    Tinker variant: 𝓛 = -mean_valid[sg(log q(o_t) - log p(o_t)) · log p(o_t)].
    """
    if hp.use_tinker_loss:
        logp_o = torch.where(mask, terms["logp_o"], 0.0)
        advantage = (torch.where(mask, terms["logq_o"], 0.0) - logp_o).detach()
        return -_masked_mean(advantage * logp_o, mask), {"opsd/reverse_kl_mean": -_item(_masked_mean(advantage, mask))}
    token_loss = terms["token_loss"]
    return _masked_mean(token_loss, mask), {"opsd/neg_token_fraction": _negative_fraction(token_loss.detach(), mask)}


def _pwopsd_reduce(terms: Terms, mask: Tensor, global_step: int, hp: LossHParams) -> tuple[Tensor, Metrics]:
    """𝓛 = 1/|B_{>0}| Σ_{b∈B_{>0}} 1/L_b Σ_t m w ℓ  (rows with a valid token count equally);
    with ``position_global_reduction``: 𝓛 = Σ m w ℓ / max(N, 1).  w from :func:`position_weights` (constant)."""
    token_loss = terms["token_loss"]
    w = position_weights(mask, hp.position_w_min, hp.position_tau, hp.position_s).to(token_loss.dtype)
    weighted = torch.where(mask, w * token_loss, 0.0)
    if hp.position_global_reduction:
        loss = weighted.sum() / mask.sum().clamp_min(1)
    else:
        lengths = mask.sum(-1)
        row_means = weighted.sum(-1) / lengths.clamp_min(1)
        nonempty = lengths > 0
        loss = torch.where(nonempty, row_means, 0.0).sum() / nonempty.sum().clamp_min(1)
    valid_w = w[mask]
    metrics = {
        "ea/position_weight_mean": _item(valid_w.mean()) if valid_w.numel() else 0.0,
        "ea/position_weight_min": _item(valid_w.min()) if valid_w.numel() else 0.0,
        "ea/position_weight_max": _item(valid_w.max()) if valid_w.numel() else 0.0,
        "opsd/neg_token_fraction": _negative_fraction(token_loss.detach(), mask),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------------
# eopd (SPEC §5.3)
# --------------------------------------------------------------------------------------------------------------------


def eopd_gate(teacher_entropy: Tensor) -> Tensor:
    """EOPD's gate g = 1[H^T > 0.8]: strict, so H^T = 0.8 is off (SPEC §5.3)."""
    return teacher_entropy > EOPD_ENTROPY_THRESHOLD


def _eopd_token_terms(student_log_probs: Tensor, teacher_log_probs: Tensor, ids: Tensor, hp: LossHParams) -> Terms:
    """``token_loss`` ℓ_t = ℓ^OPD_t + g_t ℓ^FKL_t, everything token-local (so one backward per token), and its parts:

    ℓ^OPD_t = max(-r_t Â_t, -clip(r_t, 1-ε, 1+ε) Â_t), Â_t = sg(log q(o_t) - log p_old(o_t)), p_old = sg(p),
      r_t = exp(log p(o_t) - log p_old(o_t)) (= 1 in value): value log p(o_t) - log q(o_t), gradient -Â_t ∇log p(o_t);
    ℓ^FKL_t = Σ_{v∈K_t} q̃(v) [log q̃(v) - log p(v)], K_t the top-16 teacher entries, q̃ the teacher renormalised on
      K_t, p the student's *full-vocabulary* distribution;
    g_t = :func:`eopd_gate` (H^T_t) = 1[H^T_t > 0.8], H^T_t = -Σ_v q log q the teacher entropy in nats.
    The teacher, Â, p_old and the gate are constants.
    """
    logp_o = _gather(student_log_probs, ids)
    advantage = _gather(teacher_log_probs, ids) - logp_o.detach()
    ratio = torch.exp(logp_o - logp_o.detach())
    opd = torch.maximum(-ratio * advantage, -ratio.clamp(1 - EOPD_CLIP_EPS, 1 + EOPD_CLIP_EPS) * advantage)
    top_teacher, top_index = teacher_log_probs.topk(min(EOPD_TOP_K, teacher_log_probs.shape[-1]), dim=-1)
    top_log_probs = F.log_softmax(top_teacher, dim=-1)
    fkl = (top_log_probs.exp() * (top_log_probs - student_log_probs.gather(-1, top_index))).sum(-1)
    entropy = _entropy(teacher_log_probs)
    fkl = torch.where(eopd_gate(entropy), fkl, 0.0)
    clipped = ((ratio < 1 - EOPD_CLIP_EPS) & (advantage < 0)) | ((ratio > 1 + EOPD_CLIP_EPS) & (advantage > 0))
    return {
        "token_loss": opd + fkl,
        "opd": opd.detach(),
        "fkl": fkl.detach(),
        "teacher_entropy": entropy,
        "ratio": ratio.detach(),
        "clipped": clipped.to(entropy.dtype),
    }


def _eopd_reduce(terms: Terms, mask: Tensor, global_step: int, hp: LossHParams) -> tuple[Tensor, Metrics]:
    """Global token mean 𝓛 = Σ m ℓ / max(N, 1) of the token losses of :func:`_eopd_token_terms`."""
    with torch.no_grad():
        metrics = {
            "eopd/teacher_entropy_mean": _item(_masked_mean(terms["teacher_entropy"], mask)),
            "eopd/pct_high_entropy": _item(_masked_mean(eopd_gate(terms["teacher_entropy"]).float(), mask)),
            "eopd/L_OPD_mean": _item(_masked_mean(terms["opd"], mask)),
            "eopd/L_FKL_mean": _item(_masked_mean(terms["fkl"], mask)),
            "eopd/r_mean": _item(_masked_mean(terms["ratio"], mask)),
            "eopd/clip_fraction": _item(_masked_mean(terms["clipped"], mask)),
        }
    return _masked_mean(terms["token_loss"], mask), metrics


# --------------------------------------------------------------------------------------------------------------------
# reopold (SPEC §5.4)
# --------------------------------------------------------------------------------------------------------------------


def _reopold_token_terms(student_log_probs: Tensor, teacher_log_probs: Tensor, ids: Tensor, hp: LossHParams) -> Terms:
    """``logp_o`` = log p_t(o_t); ``logq_o`` = log q_t(o_t); ``student_entropy`` H_t = -Σ_v p log p (no grad)."""
    return {
        "logp_o": _gather(student_log_probs, ids),
        "logq_o": _gather(teacher_log_probs, ids),
        "student_entropy": _entropy(student_log_probs),
    }


def _reopold_reduce(terms: Terms, mask: Tensor, global_step: int, hp: LossHParams) -> tuple[Tensor, Metrics]:
    """𝓛 = -Σ R̂ M log p(o_t) / max(Σ M, 1), with R = log q(o_t) - sg(log p(o_t)) (0 at invalid positions; NaN -> 0,
    +inf -> 0, -inf -> -1e30), R̂ = max(R, f) constant, f = ln λ / (1-λ), and the constant mask
    phase I (global_step < t_switch): M = m · 1[R >= f]  (tokens that would be floored are dropped);
    phase II: M = m · 1[H >= τ_β], τ_β the (1-β)-quantile (linear) of the student entropy over the valid tokens."""
    floor = reopold_floor(hp.reopold_lambda)
    logp_o = torch.where(mask, terms["logp_o"], 0.0)
    reward = torch.where(mask, terms["logq_o"], 0.0) - logp_o.detach()
    reward = torch.nan_to_num(reward, nan=0.0, posinf=0.0, neginf=REOPOLD_NEG_INF_REWARD)
    reward_hat = reward.clamp_min(floor)
    entropy = terms["student_entropy"]
    phase_one = global_step < hp.reopold_t_switch
    if phase_one:
        keep = reward >= floor
    elif mask.any():
        keep = entropy >= torch.quantile(entropy[mask], 1 - hp.reopold_beta)
    else:
        keep = mask
    keep = keep & mask
    loss = -torch.where(keep, reward_hat * logp_o, 0.0).sum() / keep.sum().clamp_min(1)
    with torch.no_grad():
        metrics = {
            "reopold/floor": floor,
            "reopold/phase": 1.0 if phase_one else 2.0,
            "reopold/R_mean": _item(_masked_mean(reward, mask)),
            "reopold/R_min": _item(reward[mask].min()) if mask.any() else 0.0,
            "reopold/clip_fraction": _item(_masked_mean((reward < floor).float(), mask)),
            "reopold/student_mismatch_fraction": 0.0,
            "reopold/H_mean": _item(_masked_mean(entropy, mask)),
            "reopold/M_fraction": _item(keep.sum() / mask.sum().clamp_min(1)),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillationMethod:
    """A ``--method``: its per-token quantities, its batch-level reduction and the hyper-parameters it reads.

    ``log_prob_dtype(hp)``: the dtype of log p and log q; None = float32 (float64 for float64 inputs).
    """

    name: str
    token_terms: Callable[[Tensor, Tensor, Tensor, LossHParams], Terms]
    reduce: Callable[[Terms, Tensor, int, LossHParams], tuple[Tensor, Metrics]]
    hparams: tuple[str, ...]
    summary: str
    log_prob_dtype: Callable[[LossHParams], torch.dtype | None] = lambda hp: None


_GKD_HPARAMS = ("beta", "jsd_token_clip", "jsd_clip_mode", "top_k_loss")

METHODS: dict[str, DistillationMethod] = {
    m.name: m
    for m in (
        DistillationMethod(
            "opsd",
            _opsd_token_terms,
            _opsd_reduce,
            (*_GKD_HPARAMS, "use_tinker_loss", "opsd_bf16"),
            "uniform point-wise clipped forward KL, global token mean",
            _opsd_log_prob_dtype,
        ),
        DistillationMethod(
            "pwopsd",
            _pwopsd_token_terms,
            _pwopsd_reduce,
            (*_GKD_HPARAMS, "position_w_min", "position_tau", "position_s", "position_global_reduction"),
            "opsd token loss x position weight, per-sequence mean",
        ),
        DistillationMethod(
            "eopd", _eopd_token_terms, _eopd_reduce, (), "sampled reverse KL + entropy-gated top-16 forward KL"
        ),
        DistillationMethod(
            "reopold",
            _reopold_token_terms,
            _reopold_reduce,
            ("reopold_lambda", "reopold_beta", "reopold_t_switch"),
            "floored-reward REINFORCE with a two-phase token mask",
        ),
    )
}


def get_method(name: str) -> DistillationMethod:
    """The registered method called ``name``; ValueError listing the valid ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown --method {name!r}; valid: {', '.join(METHODS)}") from None


def _check_inputs(completion_ids: Tensor, mask: Tensor, batch_shape: torch.Size) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != batch_shape or completion_ids.shape != batch_shape:
        raise ValueError(
            f"shape mismatch: logits/hidden {tuple(batch_shape)} + (V|H,), completion_ids "
            f"{tuple(completion_ids.shape)}, mask {tuple(mask.shape)}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Dense path
# --------------------------------------------------------------------------------------------------------------------


def compute_distillation_loss(
    method: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    completion_ids: Tensor,
    mask: Tensor,
    *,
    global_step: int = 0,
    **hparams: Any,
) -> tuple[Tensor, Metrics]:
    """The distillation loss of ``method`` on materialised logits; returns ``(scalar loss, metrics)``.

    ``student_logits``/``teacher_logits``: [B, T, V], position t predicting ``completion_ids[:, t]``; any float dtype
    (all math in float32); the teacher is detached. ``completion_ids``: [B, T] long, may hold -100 where ``mask``
    is False. ``mask``: [B, T] bool. ``global_step``: the optimizer step (REOPOLD's phase). ``hparams``: see
    :class:`LossHParams` (flag names); unknown names raise TypeError, invalid values of used ones ValueError.
    """
    spec = get_method(method)
    hp = _make_hparams(spec, hparams)
    _check_inputs(completion_ids, mask, student_logits.shape[:-1])
    dtype = spec.log_prob_dtype(hp) or _math_dtype(student_logits)
    student_log_probs = _log_probs(student_logits, hp.temperature, dtype)
    teacher_log_probs = _log_probs(teacher_logits.detach(), hp.temperature, dtype)
    terms = spec.token_terms(student_log_probs, teacher_log_probs, torch.where(mask, completion_ids, 0), hp)
    terms = {name: torch.where(mask, value, 0.0) for name, value in terms.items()}
    return spec.reduce(terms, mask, global_step, hp)


# --------------------------------------------------------------------------------------------------------------------
# Chunked path
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _ChunkSpec:
    method: DistillationMethod
    hp: LossHParams
    chunk_size: int
    names: tuple[str, ...] = ()  # filled in by the forward: the order of the Function's outputs


def _chunk_log_probs(spec: _ChunkSpec, student_h: Tensor, teacher_h: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """log p and log q of a chunk from one product with the LM head (read once); the logits are freed on return."""
    logits = torch.cat([student_h, teacher_h]) @ weight.T
    dtype = spec.method.log_prob_dtype(spec.hp) or _math_dtype(logits)
    # the values of _log_probs (z.to(dtype) / T), dividing the fresh product in place: no second [2·chunk, V] buffer;
    # two separate outputs, so the teacher's can be freed before the backward
    scaled = logits.to(dtype).div_(spec.hp.temperature)
    return F.log_softmax(scaled[: len(student_h)], dim=-1), F.log_softmax(scaled[len(student_h) :], dim=-1)


def _logit_grad(grad_log_probs: Tensor, log_probs: Tensor, temperature: float) -> Tensor:
    """Backward of z -> log_softmax(z / T): dz = (G - softmax · Σ_v G) / T (ATen's fused kernel, as autograd uses)."""
    return torch._log_softmax_backward_data(grad_log_probs, log_probs, -1, log_probs.dtype).div_(temperature)


def _hidden_jacobians(
    terms: list[Tensor], student_log_probs: Tensor, weight: Tensor, temperature: float
) -> list[Tensor]:
    """J_t = ∂term_t/∂z_t @ W ([chunk, H]) of each per-token term (z = hidden @ W.T, log p = log_softmax(z / T))."""
    jacobians = []
    for k, term in enumerate(terms):
        (grad,) = torch.autograd.grad(term, student_log_probs, torch.ones_like(term), retain_graph=k + 1 < len(terms))
        jacobians.append(_logit_grad(grad, student_log_probs.detach(), temperature).to(weight.dtype) @ weight)
    return jacobians


class _ChunkedTokenTerms(torch.autograd.Function):
    """``token_terms`` of N tokens, ``chunk_size`` at a time, projecting ``hidden @ W.T`` inside each chunk.

    The teacher is a constant. Every per-token term depends on its own position only, so the loss gradient w.r.t. the
    student logits of token t is dz_t = Σ_terms g_t · ∂term_t/∂z_t, and grad_h = dz @ W, grad_W = Σ_chunks dz^T h.
    Frozen head (the LoRA case): the forward already pulls each differentiable term back to the hidden state,
    J_t = ∂term_t/∂z_t @ W ([N, H] per term), so backward is grad_h = Σ_terms g_t · J_t, with no recomputation.
    Trainable head: backward recomputes each chunk's log-probs (checkpointing) and accumulates grad_W in place.
    Only one chunk's [chunk_size, V] tensors exist at any time.
    """

    @staticmethod
    def forward(ctx, spec: _ChunkSpec, student_h: Tensor, teacher_h: Tensor, weight: Tensor, ids: Tensor):  # type: ignore[override]
        need_h, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        ctx.spec, ctx.need_h, ctx.need_w = spec, need_h, need_w
        pieces, jacobians = [], []
        # an empty micro-batch still runs one (empty) chunk: the outputs exist and the zero loss keeps its graph
        for start in range(0, max(len(ids), 1), spec.chunk_size):
            rows = slice(start, start + spec.chunk_size)
            student_log_probs, teacher_log_probs = _chunk_log_probs(spec, student_h[rows], teacher_h[rows], weight)
            student_log_probs.requires_grad_(need_h or need_w)
            with torch.set_grad_enabled(need_h or need_w):
                terms = spec.method.token_terms(student_log_probs, teacher_log_probs, ids[rows], spec.hp)
            del teacher_log_probs
            if not spec.names:
                spec.names = tuple(sorted(terms))
                ctx.diff = tuple(i for i, n in enumerate(spec.names) if terms[n].requires_grad)
            if need_h and not need_w:
                diff = [terms[spec.names[i]] for i in ctx.diff]
                jacobians.append(_hidden_jacobians(diff, student_log_probs, weight, spec.hp.temperature))
                del diff
            pieces.append([terms[n].detach() for n in spec.names])
            del terms, student_log_probs  # this chunk's graph goes before the next chunk is projected
        if need_w:
            ctx.save_for_backward(student_h, teacher_h, weight, ids)
        elif need_h:
            ctx.save_for_backward(*(torch.cat([chunk[k] for chunk in jacobians]) for k in range(len(ctx.diff))))
        outputs = tuple(torch.cat([piece[k] for piece in pieces]) for k in range(len(spec.names)))
        ctx.mark_non_differentiable(*(o for i, o in enumerate(outputs) if i not in ctx.diff))
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        spec, g = ctx.spec, [grads[i] for i in ctx.diff]
        if not ctx.need_w:
            jacobians = ctx.saved_tensors
            grad_h = sum(gi.unsqueeze(-1) * jac for gi, jac in zip(g, jacobians)) if g else None
            return None, None if grad_h is None else grad_h.to(jacobians[0].dtype), None, None, None
        student_h, teacher_h, weight, ids = ctx.saved_tensors
        grad_h = torch.zeros_like(student_h) if ctx.need_h else None
        grad_w = torch.zeros_like(weight)
        for start in range(0, len(ids), spec.chunk_size):
            rows = slice(start, start + spec.chunk_size)
            student_log_probs, teacher_log_probs = _chunk_log_probs(spec, student_h[rows], teacher_h[rows], weight)
            student_log_probs.requires_grad_()
            with torch.enable_grad():
                terms = spec.method.token_terms(student_log_probs, teacher_log_probs, ids[rows], spec.hp)
                del teacher_log_probs
                outs = [terms[spec.names[i]] for i in ctx.diff]
                (grad,) = torch.autograd.grad(outs, student_log_probs, [gi[rows] for gi in g])
            del terms, outs
            dz = _logit_grad(grad, student_log_probs.detach(), spec.hp.temperature).to(weight.dtype)
            del grad, student_log_probs
            if grad_h is not None:
                grad_h[rows] = dz @ weight
            grad_w.addmm_(dz.T, student_h[rows].to(weight.dtype))
            del dz
        return None, grad_h, None, grad_w, None


def chunked_distillation_loss(
    method: str,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    lm_head_weight: Tensor,
    completion_ids: Tensor,
    mask: Tensor,
    *,
    chunk_size: int = 256,
    global_step: int = 0,
    **hparams: Any,
) -> tuple[Tensor, Metrics]:
    """:func:`compute_distillation_loss` of ``student_hidden @ W.T`` and ``teacher_hidden @ W.T`` without the logits.

    ``student_hidden``/``teacher_hidden``: [B, T, H] final hidden states (after the final norm), aligned like the
    logits; ``lm_head_weight``: [V, H], frozen or trainable. Only the valid tokens are projected, ``chunk_size`` of
    them at a time ([chunk_size, V] is the largest tensor); the per-token terms are gathered into [B, T] and reduced
    by the method's own ``reduce``, so value and gradients (w.r.t. ``student_hidden`` and ``lm_head_weight``) equal
    the dense path's. The teacher path carries no gradient. Same ``global_step``/``hparams`` as the dense path.
    """
    spec = get_method(method)
    hp = _make_hparams(spec, hparams)
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    _check_inputs(completion_ids, mask, student_hidden.shape[:-1])
    if teacher_hidden.shape != student_hidden.shape or lm_head_weight.shape[-1] != student_hidden.shape[-1]:
        raise ValueError(
            f"shape mismatch: student_hidden {tuple(student_hidden.shape)}, teacher_hidden "
            f"{tuple(teacher_hidden.shape)}, lm_head_weight {tuple(lm_head_weight.shape)}"
        )
    hidden = student_hidden.shape[-1]
    valid = mask.reshape(-1).nonzero().squeeze(-1)
    student_h = student_hidden.reshape(-1, hidden).index_select(0, valid)
    teacher_h = teacher_hidden.detach().reshape(-1, hidden).index_select(0, valid)
    ids = completion_ids.reshape(-1).index_select(0, valid)
    chunk_spec = _ChunkSpec(spec, hp, chunk_size)
    outputs = _ChunkedTokenTerms.apply(chunk_spec, student_h, teacher_h, lm_head_weight, ids)
    terms = {
        name: values.new_zeros(mask.numel()).index_copy(0, valid, values).view(mask.shape)
        for name, values in zip(chunk_spec.names, outputs)
    }
    return spec.reduce(terms, mask, global_step, hp)
