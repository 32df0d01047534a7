"""The four on-policy distillation losses of pwopsd: ``opsd``, ``eopd``, ``pwopsd``, ``reopold`` (docs/methods.md).

Every method is a function of the two temperature-scaled distributions log p = log_softmax(z_S / T) and
log q = log_softmax(z_T / T), split in two small pure functions registered in :data:`METHODS`:

* ``token_terms(student_log_probs, teacher_log_probs, ids, hp) -> {name: [...] tensor}``: the per-token quantities of
  one position, from that position's distributions alone. Some carry the student gradient (the token loss,
  ``log p(o_t)``), the others are constants (teacher entropy, ``log q(o_t)``, ...).
* ``reduce(terms, mask, global_step, hp) -> (loss, metrics)``: everything batch-level, on ``[B, T]`` tensors: the
  PW-OPSD weights and row lengths, REOPOLD's phase mask and entropy quantile, the reductions, the logged metrics.

:func:`compute_distillation_loss` applies ``token_terms`` to materialised ``[B, T, V]`` logits (the reference's way).
:func:`pwopsd.chunked_loss.chunked_distillation_loss` applies the *same* ``token_terms`` to the valid tokens only, a
chunk at a time, projecting ``hidden @ W.T`` inside the chunk, and then the *same* ``reduce``: no ``[B, T, V]``
tensor ever exists. Both paths therefore agree by construction up to float rounding of the projection.

Numerical rules (docs/methods.md#numerical-safety): upcast to float32 before dividing by ``T``; ``log_softmax``,
never ``log(softmax)``; ``logaddexp`` for the JSD mixture; ``-100`` ids replaced by 0 before any gather; masking with
``where`` (NaN/inf in padded positions cannot leak into the value); every denominator clamped to at least 1; a
micro-batch without valid tokens returns a zero that is attached to the graph (backward runs and yields zero
gradients).

Deviation from the reference: the reference computes the ``opsd`` loss in the model dtype (bf16); here every method
computes in float32 (float64 inputs stay float64). ``opsd_bf16=True`` restores bf16 for ``opsd``
(docs/methods.md#numerical-safety).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "EOPD_CLIP_EPS",
    "EOPD_ENTROPY_THRESHOLD",
    "EOPD_TOP_K",
    "METHODS",
    "DistillationMethod",
    "LossHParams",
    "check_hparams",
    "compute_distillation_loss",
    "eopd_gate",
    "get_method",
    "gkd_element_terms",
    "gkd_token_loss",
    "loss_hparam_field",
    "loss_hparam_fields",
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


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _hparam(
    default: Any,
    help_text: str,
    check: Callable[[Any], bool],
    valid: str,
    *,
    choices: tuple[str, ...] | None = None,
    cli_default: Any = dataclasses.MISSING,
) -> Any:
    """One loss flag: its default, help text, valid range (predicate + the words of the error) in one place."""
    metadata: dict[str, Any] = {"help": help_text, "check": check, "valid": valid}
    if choices is not None:
        metadata["choices"] = choices
    if cli_default is not dataclasses.MISSING:
        metadata["cli_default"] = cli_default
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class LossHParams:
    """The loss hyper-parameters: the single declaration of every loss flag (docs/methods.md#flags-and-defaults).

    Each field is named exactly as its training flag (``--name``) and carries, in ``field(metadata=...)``:

    * ``"help"``: the flag's help text;
    * ``"check"``: a predicate a valid value satisfies, and ``"valid"``: what a valid value is, in the words of the
      error ``--name {valid}, got ...`` (:func:`check_hparams` checks the flags the method uses, and ``temperature``);
    * ``"choices"`` (string flags only): the accepted values;
    * ``"cli_default"`` (only where it differs): the training command line's default.

    Adding a loss flag is adding one field here (plus the method's ``hparams`` in :data:`METHODS` when a method reads
    it). The training configuration declares its loss flags from these fields: :func:`loss_hparam_fields` lists them
    and :func:`loss_hparam_field` turns one into a config field (default, help and choices only).

    The defaults are the launchers' values (the paper's settings), so calling the losses directly reproduces the
    paper. Two differ on the training command line, ``temperature`` 0.9 and ``beta`` 0.5 (``cli_default``): there they
    are the defaults of TRL's GKD-family configuration (``GKDConfig``, and ``GOLDConfig``, the class the reference
    parses), which the reference script inherits for any flag it does not pass, and pwopsd keeps them so that the
    same command line behaves like the reference's; every launcher passes ``--temperature 1.1 --beta 0``. See
    docs/methods.md#why-the-cli-defaults-differ-from-the-launchers.
    """

    temperature: float = _hparam(
        1.1,
        "Temperature T > 0: divides the student and teacher logits in every loss, and is the sampling temperature "
        "(top-p and top-k never enter a loss). Launchers: 1.1.",
        lambda v: _is_real(v) and v > 0,
        "must be a number > 0",
        cli_default=0.9,
    )
    beta: float = _hparam(
        0.0,
        "GKD beta in [0, 1] of opsd/pwopsd: 0 = forward KL, 1 = reverse KL, in between the generalised JSD "
        "(unrelated to --reopold_beta). Launchers: 0.",
        lambda v: _is_real(v) and 0 <= v <= 1,
        "(the GKD β) must be in [0, 1]",
        cli_default=0.5,
    )
    jsd_token_clip: float = _hparam(
        0.05,
        "Upper clip c >= 0 of each (token, vocabulary) divergence term (opsd/pwopsd); 0 = off.",
        lambda v: _is_real(v) and v >= 0,
        "must be >= 0 (0 disables the clip)",
    )
    jsd_clip_mode: str = _hparam(
        "pointwise",
        "pointwise = reference (clip each (token, vocabulary) term, so token losses can be negative); token = clip the "
        "per-token loss itself (opt-in fix, docs/deviations.md#upstream-issues-addressed).",
        lambda v: v in ("pointwise", "token"),
        "must be 'pointwise' or 'token'",
        choices=("pointwise", "token"),
    )
    top_k_loss: int = _hparam(
        0,
        "0 = full vocabulary; k > 0 = renormalise student and teacher over the teacher's top-k (opsd/pwopsd).",
        lambda v: _is_int(v) and v >= 0,
        "must be an integer >= 0 (0 = full vocabulary)",
    )
    use_tinker_loss: bool = _hparam(
        False,
        "opsd only: sampled-token policy-gradient reverse KL instead of the full-vocabulary divergence.",
        _is_bool,
        "must be True or False",
    )
    opsd_bf16: bool = _hparam(
        False,
        "opsd only: element terms in bf16 as the reference computed them (default: float32, as every other loss).",
        _is_bool,
        "must be True or False",
    )
    position_w_min: float = _hparam(
        0.25,
        "PW-OPSD schedule: minimum weight w_min >= 0 of w = w_min + (1 - w_min) sigmoid((u - tau) / s).",
        lambda v: _is_real(v) and v >= 0,
        "must be a number >= 0",
    )
    position_tau: float = _hparam(
        0.30,
        "PW-OPSD schedule: centre tau, a fraction of the row's own number of valid tokens.",
        _is_real,
        "must be a finite number",
    )
    position_s: float = _hparam(
        0.10,
        "PW-OPSD schedule: sigmoid width s > 0 (values below 1e-6 are used as 1e-6).",
        lambda v: _is_real(v) and v > 0,
        "must be > 0 (values below 1e-6 are used as 1e-6)",
    )
    position_global_reduction: bool = _hparam(
        False,
        "PW-OPSD ablation: global token mean instead of the per-sequence mean.",
        _is_bool,
        "must be True or False",
    )
    reopold_lambda: float = _hparam(
        0.1,
        "REOPOLD: lambda of the reward floor ln(lambda) / (1 - lambda), in (0, 1).",
        lambda v: _is_real(v) and 0 < v < 1,
        "must be in (0, 1)",
    )
    reopold_beta: float = _hparam(
        0.2,
        "REOPOLD phase II: the fraction beta in (0, 1] of tokens kept, by highest student entropy.",
        lambda v: _is_real(v) and 0 < v <= 1,
        "(REOPOLD's kept fraction) must be in (0, 1]",
    )
    reopold_t_switch: int = _hparam(
        50,
        "REOPOLD phase switch (an optimizer step >= 0): phase I (drop floored tokens) for optimizer steps < t_switch, "
        "phase II after.",
        lambda v: _is_int(v) and v >= 0,
        "must be an integer >= 0",
    )


HPARAM_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LossHParams))

# name -> (predicate, what a valid value is), read from the field metadata. Checked for the hyper-parameters the
# method uses.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    f.name: (f.metadata["check"], f.metadata["valid"]) for f in dataclasses.fields(LossHParams)
}


def loss_hparam_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of :class:`LossHParams`, in declaration order; see its docstring for the metadata keys."""
    return dataclasses.fields(LossHParams)


def loss_hparam_field(name: str, *, cli: bool = True) -> Any:
    """A ``dataclasses.field`` declaring the loss flag ``name`` in a configuration dataclass.

    Only ``help`` and ``choices`` go into its metadata, so HfArgumentParser (which passes the metadata to
    ``add_argument`` as keyword arguments) accepts it; validate the values with :func:`check_hparams`. ``cli=True``
    uses the training command line's default (``cli_default`` where declared), ``cli=False`` the loss default.
    Use: ``beta: float = loss_hparam_field("beta")``.
    """
    f = LossHParams.__dataclass_fields__[name]
    metadata: dict[str, Any] = {"help": f.metadata["help"]}
    if "choices" in f.metadata:
        metadata["choices"] = list(f.metadata["choices"])
    default = f.metadata.get("cli_default", f.default) if cli else f.default
    return field(default=default, metadata=metadata)


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
    """Per-token OPSD loss ℓ_t = Σ_v min(d_{t,v}, c) (docs/methods.md#opsd); [..., V] log-probs at T -> [...].

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

    The Moderate schedule (0.25, 0.30, 0.10) gives w(0) = 0.2856, w(0.3) = 0.625, w(1) = 0.9993
    (docs/methods.md#test-vectors).
    """
    ok, what = _CHECKS["position_s"]
    if not ok(s):
        raise ValueError(f"--position_s {what}, got {s!r}")
    return w_min + (1 - w_min) * torch.sigmoid((u - tau) / max(s, POSITION_S_GUARD))


def position_weights(mask: Tensor, w_min: float, tau: float, s: float) -> Tensor:
    """PW-OPSD position weights (docs/methods.md#pwopsd); [B, T] bool mask -> [B, T] float32, 0 at invalid positions.

    L_b = max(Σ_t m_bt, 1), k_bt = Σ_{t' <= t} m_bt', u_bt = max(k_bt - 1/2, 0) / L_b, w_bt = w(u_bt) of
    :func:`schedule_weight`. The position is relative to the row's own valid tokens (not max_completion_length).
    The weights are constants (no gradient); L = 4 gives 0.3610, 0.7594, 0.9720, 0.9976 (Moderate schedule).
    """
    m = mask.to(torch.float32)
    u = (m.cumsum(-1) - 0.5).clamp_min(0) / m.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(mask, schedule_weight(u, w_min, tau, s), 0.0)


def reopold_floor(lam: float) -> float:
    """REOPOLD's reward floor f = ln(λ) / (1 - λ) (docs/methods.md#reopold; λ = 0.1 gives -2.5584)."""
    return math.log(lam) / (1 - lam)


# --------------------------------------------------------------------------------------------------------------------
# opsd and pwopsd (docs/methods.md#opsd, docs/methods.md#pwopsd)
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
# eopd (docs/methods.md#eopd)
# --------------------------------------------------------------------------------------------------------------------


def eopd_gate(teacher_entropy: Tensor) -> Tensor:
    """EOPD's gate g = 1[H^T > 0.8]: strict, so H^T = 0.8 is off (docs/methods.md#eopd)."""
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
# reopold (docs/methods.md#reopold)
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
    ``launcher_args``: the extra training flags the paper's launchers pass for this method, as the strings the bash
    launchers print (e.g. ``"0.30"``, not ``"0.3"``); the shared launcher arguments are not repeated here.
    """

    name: str
    token_terms: Callable[[Tensor, Tensor, Tensor, LossHParams], Terms]
    reduce: Callable[[Terms, Tensor, int, LossHParams], tuple[Tensor, Metrics]]
    hparams: tuple[str, ...]
    summary: str
    log_prob_dtype: Callable[[LossHParams], torch.dtype | None] = lambda hp: None
    launcher_args: tuple[str, ...] = ()


_GKD_HPARAMS = ("beta", "jsd_token_clip", "jsd_clip_mode", "top_k_loss")

METHODS: dict[str, DistillationMethod] = {
    m.name: m
    # the order of the launchers, the summary tables and the README
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
            "eopd", _eopd_token_terms, _eopd_reduce, (), "sampled reverse KL + entropy-gated top-16 forward KL"
        ),
        DistillationMethod(
            "pwopsd",
            _pwopsd_token_terms,
            _pwopsd_reduce,
            (*_GKD_HPARAMS, "position_w_min", "position_tau", "position_s", "position_global_reduction"),
            "opsd token loss x position weight, per-sequence mean",
            launcher_args=("--position_w_min", "0.25", "--position_tau", "0.30", "--position_s", "0.10"),
        ),
        DistillationMethod(
            "reopold",
            _reopold_token_terms,
            _reopold_reduce,
            ("reopold_lambda", "reopold_beta", "reopold_t_switch"),
            "floored-reward REINFORCE with a two-phase token mask",
            launcher_args=("--reopold_lambda", "0.1", "--reopold_beta", "0.2", "--reopold_t_switch", "50"),
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
