"""The chunked distillation loss: the losses of :mod:`pwopsd.losses` from hidden states, without the logits.

See docs/methods.md#chunked-loss for the algorithm in prose and the trainer's use (its default loss path).

Why. The dense path (:func:`pwopsd.losses.compute_distillation_loss`, the reference's way) needs the student and
teacher logits as ``[B, T, V]`` tensors, plus their float32 log-softmaxes and the autograd buffers of the loss. With
Qwen3's vocabulary (V = 151,936) that is several GB for a single micro-batch of a few thousand tokens, far more than
the LoRA-wrapped model itself needs. Every per-token quantity of every method depends on its own position's two
distributions only (the ``token_terms`` contract of :class:`pwopsd.losses.DistillationMethod`); everything that
couples tokens (position weights, row lengths, REOPOLD's entropy quantile, the reductions) lives in ``reduce`` and
works on ``[B, T]`` tensors. So :func:`chunked_distillation_loss` projects ``hidden @ W.T`` for the valid tokens
only, ``chunk_size`` of them at a time, evaluates the method's own ``token_terms`` on that chunk, keeps only the
per-token results, and hands them to the method's own ``reduce``: value, metrics and gradients equal the dense
path's up to the float rounding of the projection, and no ``[B, T, V]`` tensor ever exists.

Two implementations of the chunk, the same results:

* **Fused** (the default where it covers the settings, :func:`fused_fallback_reason`): per chunk ONE product
  ``[h_S; h_T] @ W.T`` for both logits, then ONE elementwise body per method (``_gkd_body`` for opsd/pwopsd,
  ``_sampled_body`` for opsd's tinker variant and reopold, ``_eopd_body``) that returns the per-token terms AND the
  logit gradient ``dz = ∂term/∂z_S`` of the method's one differentiable term in closed form (log-softmaxes, clip
  masks, top-k renormalisation, PPO max/clamp rules and the softmax pull-back, written out as autograd would
  compute them), so no autograd graph is built inside a chunk. The body is ``torch.compile``d (fused into a few
  kernels) on CUDA by default, eager on CPU (``compiled=``, ``PWOPSD_LOSS_COMPILE``). Every chunk has the same
  shape (the last one is padded with zero rows, dropped from every result), so a run compiles each body once.
* **Autograd** (the fallback: ``opsd_bf16``, ``fused=False`` or ``PWOPSD_FUSED_LOSS=0``): the method's own
  ``token_terms`` under autograd on the chunk's log-probs, then ``torch.autograd.grad`` and the log-softmax backward.

The backward is not autograd's over the whole loss (that would keep every chunk's ``[chunk, V]`` graph alive).
With a frozen LM head (LoRA training) the forward pulls each differentiable term back to the hidden state right
away, ``J_t = ∂term_t/∂z_t @ W`` (``[N, H]`` per term), and the backward is a weighted sum of those Jacobians (one
scale per token on the fused path). With a trainable head the forward keeps only its inputs, and the backward
recomputes each chunk (activation checkpointing; the fused body takes the upstream gradient as a row scale) to
accumulate ``grad_W`` in place.

Physical limits.

* Memory: the largest tensors are one chunk's ``[chunk_size, V]`` student and teacher log-probs (float32: about
  155 MB each for 256 tokens of Qwen3's vocabulary) and their autograd buffers; on top of that the frozen-head path
  keeps ``N x H`` per differentiable term (N valid tokens, in the head's dtype) until the backward. Measured figures
  are in ``bench/RESULTS.md`` (``bench/loss_memory.py``): about 11x less peak memory than the dense path on CPU at
  B x T = 2 x 512, a ratio that grows with B x T.
* Time: the projection is the same matmul as the dense path's, split into chunks; the frozen-head path adds one
  ``[chunk, V] @ [V, H]`` product per differentiable term, the trainable-head path recomputes the whole forward in
  the backward (about 1.5x the dense time in the benchmark). Smaller chunks trade speed for memory;
  :func:`auto_chunk_size` picks the chunk from a memory budget (``chunk_size="auto"``). On one H200 (bf16,
  4 x 1024 tokens, V 151,936, H 2560) a throw-away probe of the compiled fused body for opsd measured 0.57x the
  dense time at 29x less memory (chunk 256); the autograd path was 1.26x the dense time (chunk 128).
* Scope: the logits must be exactly ``hidden @ W.T`` (final norm already applied; no bias, no soft-capping, no
  scaling); student and teacher share the one head ``W`` (both are projected in a single product, so a teacher
  with its own head, e.g. an EMA copy of a trainable head, needs the dense path); ``W`` must be the full ``[V, H]``
  matrix (not a ZeRO-3 shard); the teacher path carries no gradient; the function is ``once_differentiable`` (no
  double backward). Padding costs nothing: only valid tokens are
  projected, so a fully valid batch is the worst case.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from pwopsd.losses import (
    EOPD_CLIP_EPS,
    EOPD_ENTROPY_THRESHOLD,
    EOPD_TOP_K,
    DistillationMethod,
    LossHParams,
    Metrics,
    _check_inputs,
    _is_int,
    _make_hparams,
    _math_dtype,
    get_method,
)

__all__ = ["auto_chunk_size", "chunked_distillation_loss", "fused_fallback_reason"]


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


# --------------------------------------------------------------------------------------------------------------------
# Fused path: one product and one elementwise body per chunk, the logit gradient in closed form
# --------------------------------------------------------------------------------------------------------------------

COMPILE_ENV = "PWOPSD_LOSS_COMPILE"  # "1": torch.compile the fused body, "0": eager; unset: compiled on CUDA only
FUSED_ENV = "PWOPSD_FUSED_LOSS"  # "0": always the autograd path (debugging); unset or "1": the fused path where covered

# auto_chunk_size's budget rule (see its docstring)
AUTO_CUDA_BUDGET_BYTES = 1 << 30
AUTO_CUDA_FREE_FRACTION = 0.05
AUTO_CPU_BUDGET_BYTES = 512 << 20
AUTO_MAX_CHUNK = 4096
_WORK_BUFFERS = 4  # [C, V] math-dtype buffers alive at once in the eager body (log p, log q, ∂ℓ/∂log p, one temporary)

Body = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class _Fused:
    """A method's fused body: ``names`` of the terms it returns (stacked, in this order), ``diff`` the index of the
    one term that carries the student gradient, ``make(hp, dtype)`` the body for these hyper-parameters and math
    dtype: ``(z_S, z_T, ids, row_scale) -> (terms [len(names), C], dz [C, V])`` with
    ``dz = row_scale · ∂term_diff/∂z_S`` in ``z_S``'s dtype."""

    names: tuple[str, ...]
    diff: int
    make: Callable[[LossHParams, torch.dtype], Body]
    key: Callable[[LossHParams], tuple]  # the hyper-parameters the body reads (the compile cache key)


def _softmax_pullback(grad: Tensor, log_probs: Tensor) -> Tensor:
    """∂/∂x of Σ grad · log_softmax(x), given ``log_probs = log_softmax(x)``: grad - softmax · Σ grad."""
    return grad - log_probs.exp() * grad.sum(-1, keepdim=True)


def _one_hot(ids: Tensor, like: Tensor) -> Tensor:
    """1[v = ids_t] as a [C, V] tensor of ``like``'s dtype (an elementwise comparison, fusable)."""
    return (torch.arange(like.shape[-1], device=like.device) == ids.unsqueeze(-1)).to(like.dtype)


def _finish(grad_log_probs: Tensor, student_log_probs: Tensor, temperature: float, scale: Tensor, dtype) -> Tensor:
    """dz = scale · ∂term/∂z from ∂term/∂log p (z → log_softmax(z / T)), in the logits' dtype."""
    return (_softmax_pullback(grad_log_probs, student_log_probs) * (scale.unsqueeze(-1) / temperature)).to(dtype)


def _gkd_body(hp: LossHParams, dtype: torch.dtype) -> Body:
    """ℓ_t of :func:`pwopsd.losses.gkd_token_loss` (β, point-wise or token clip, top-k) and its logit gradient."""
    temperature, beta, clip, token_clip, top_k = (
        hp.temperature, hp.beta, hp.jsd_token_clip, hp.jsd_clip_mode == "token", hp.top_k_loss,
    )  # fmt: skip
    log_1m_beta, log_beta = (math.log1p(-beta), math.log(beta)) if 0 < beta < 1 else (0.0, 0.0)

    def body(zs: Tensor, zt: Tensor, ids: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        ls = torch.log_softmax(zs.to(dtype) / temperature, dim=-1)
        lt = torch.log_softmax(zt.to(dtype) / temperature, dim=-1)
        a, b, index = ls, lt, None
        if 0 < top_k < ls.shape[-1]:
            teacher_top, index = lt.topk(top_k, dim=-1)
            a, b = torch.log_softmax(ls.gather(-1, index), dim=-1), torch.log_softmax(teacher_top, dim=-1)
        # element terms d (gkd_element_terms) and ∂d/∂a, entry by entry
        if beta == 0:
            q = b.exp()
            d, g = q * (b - a), -q
        elif beta == 1:
            p = a.exp()
            d = p * (a - b)
            g = d + p
        else:
            log_mix = torch.logaddexp(a + log_1m_beta, b + log_beta)
            p_part = (1 - beta) * a.exp() * (a - log_mix)
            d = beta * b.exp() * (b - log_mix) + p_part
            g = p_part  # the mixture's own derivative cancels: ∂d/∂a = (1-β) p (log p - log M)
        if clip > 0 and not token_clip:
            over = d > clip
            d, g = torch.where(over, clip, d), torch.where(over, 0.0, g)
        loss = d.sum(-1)
        if clip > 0 and token_clip:
            g = torch.where((loss <= clip).unsqueeze(-1), g, 0.0)
            loss = loss.clamp(max=clip)
        if index is not None:
            g = torch.zeros_like(ls).scatter(-1, index, _softmax_pullback(g, a))
        return loss.unsqueeze(0), _finish(g, ls, temperature, scale, zs.dtype)

    return body


def _sampled_body(hp: LossHParams, dtype: torch.dtype, entropy: bool) -> Body:
    """log p(o_t), log q(o_t) (opsd's tinker variant; REOPOLD adds the student entropy); ∂log p(o_t)/∂z."""
    temperature = hp.temperature

    def body(zs: Tensor, zt: Tensor, ids: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        ls = torch.log_softmax(zs.to(dtype) / temperature, dim=-1)
        lt = torch.log_softmax(zt.to(dtype) / temperature, dim=-1)
        index = ids.unsqueeze(-1)
        terms = [ls.gather(-1, index).squeeze(-1), lt.gather(-1, index).squeeze(-1)]
        if entropy:
            terms.append(torch.special.entr(ls.exp()).sum(-1))
        return torch.stack(terms), _finish(_one_hot(ids, ls), ls, temperature, scale, zs.dtype)

    return body


def _eopd_body(hp: LossHParams, dtype: torch.dtype) -> Body:
    """The terms of :func:`pwopsd.losses._eopd_token_terms` and ∂token_loss/∂z (PPO max/clamp rules as autograd's)."""
    temperature = hp.temperature
    lo, hi = 1 - EOPD_CLIP_EPS, 1 + EOPD_CLIP_EPS

    def body(zs: Tensor, zt: Tensor, ids: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        ls = torch.log_softmax(zs.to(dtype) / temperature, dim=-1)
        lt = torch.log_softmax(zt.to(dtype) / temperature, dim=-1)
        index = ids.unsqueeze(-1)
        logp_o = ls.gather(-1, index).squeeze(-1)
        advantage = lt.gather(-1, index).squeeze(-1) - logp_o
        ratio = torch.exp(logp_o - logp_o)  # 1 in value, ∂ratio/∂log p(o) = ratio
        unclipped, clipped_ratio = -ratio * advantage, -ratio.clamp(lo, hi) * advantage
        opd = torch.maximum(unclipped, clipped_ratio)
        g_unclipped = -advantage * ratio
        g_clipped = torch.where((ratio >= lo) & (ratio <= hi), g_unclipped, 0.0)
        g_opd = torch.where(
            unclipped > clipped_ratio,
            g_unclipped,
            torch.where(unclipped < clipped_ratio, g_clipped, (g_unclipped + g_clipped) / 2),
        )  # torch.maximum's backward: the larger side, halves on a tie
        teacher_top, top_index = lt.topk(min(EOPD_TOP_K, lt.shape[-1]), dim=-1)
        top_log_probs = torch.log_softmax(teacher_top, dim=-1)
        top_probs = top_log_probs.exp()
        fkl = (top_probs * (top_log_probs - ls.gather(-1, top_index))).sum(-1)
        teacher_entropy = torch.special.entr(lt.exp()).sum(-1)
        gate = teacher_entropy > EOPD_ENTROPY_THRESHOLD
        fkl = torch.where(gate, fkl, 0.0)
        clipped = ((ratio < lo) & (advantage < 0)) | ((ratio > hi) & (advantage > 0))
        g = torch.zeros_like(ls).scatter(-1, top_index, torch.where(gate.unsqueeze(-1), -top_probs, 0.0))
        g = g + _one_hot(ids, ls) * g_opd.unsqueeze(-1)
        terms = torch.stack([opd + fkl, opd, fkl, teacher_entropy, ratio, clipped.to(teacher_entropy.dtype)])
        return terms, _finish(g, ls, temperature, scale, zs.dtype)

    return body


_GKD = _Fused(
    ("token_loss",),
    0,
    _gkd_body,
    lambda hp: (hp.temperature, hp.beta, hp.jsd_token_clip, hp.jsd_clip_mode, hp.top_k_loss),
)
_TINKER = _Fused(("logp_o", "logq_o"), 0, lambda hp, dt: _sampled_body(hp, dt, False), lambda hp: (hp.temperature,))
_REOPOLD = _Fused(
    ("logp_o", "logq_o", "student_entropy"), 0, lambda hp, dt: _sampled_body(hp, dt, True), lambda hp: (hp.temperature,)
)
_EOPD = _Fused(
    ("token_loss", "opd", "fkl", "teacher_entropy", "ratio", "clipped"), 0, _eopd_body, lambda hp: (hp.temperature,)
)


def _fused_for(method: DistillationMethod, hp: LossHParams) -> _Fused | None:
    """The fused body of ``method`` with ``hp``, None where the fused path does not cover it."""
    if method.name == "opsd":
        if hp.use_tinker_loss:
            return _TINKER
        return None if hp.opsd_bf16 else _GKD
    return {"pwopsd": _GKD, "eopd": _EOPD, "reopold": _REOPOLD}.get(method.name)


def fused_fallback_reason(method: str, **hparams: Any) -> str | None:
    """Why :func:`chunked_distillation_loss` takes the autograd path for these settings; None = the fused path.

    Covered: every method and option (opsd/pwopsd with any β, point-wise or token clip, top-k; opsd's tinker
    variant; eopd; reopold), with a frozen or a trainable LM head. Not covered: ``opsd_bf16`` (the reference's bf16
    element terms) and a method registered without a fused body; ``PWOPSD_FUSED_LOSS=0`` turns the fused path off.
    """
    spec = get_method(method)
    hp = _make_hparams(spec, hparams)
    if os.environ.get(FUSED_ENV, "1") == "0":
        return f"{FUSED_ENV}=0"
    if _fused_for(spec, hp) is None:
        return "opsd_bf16 (bf16 element terms)" if hp.opsd_bf16 else f"no fused body for method {spec.name}"
    return None


def _compile_wanted(compiled: bool | None, device: torch.device) -> bool:
    """``compiled`` if given, else ``PWOPSD_LOSS_COMPILE`` (0/1), else on for CUDA, off on CPU (minutes of compile
    per process for a short CPU run)."""
    if compiled is not None:
        return compiled
    env = os.environ.get(COMPILE_ENV, "")
    if env in ("0", "1"):
        return env == "1"
    return device.type == "cuda"


_COMPILE_BACKEND: Any = "inductor"  # tests swap in a counting backend
_BODIES: dict[tuple, Body] = {}


def _get_body(fused: _Fused, hp: LossHParams, dtype: torch.dtype, compiled: bool) -> Body:
    """The body for (hyper-parameters, dtype), built once per process; compiled with static shapes (every chunk is
    padded to ``chunk_size`` rows), so a run compiles each body once."""
    key = (fused.make, fused.key(hp), dtype, compiled, _COMPILE_BACKEND if compiled else None)
    body = _BODIES.get(key)
    if body is None:
        body = fused.make(hp, dtype)
        if compiled:
            body = torch.compile(body, backend=_COMPILE_BACKEND, dynamic=False, fullgraph=True)
        _BODIES[key] = body
    return body


@dataclass
class _FusedSpec:
    body: Body
    fused: _Fused
    chunk_size: int
    math_dtype: torch.dtype


def _padded(x: Tensor, rows: int) -> Tensor:
    """``x`` with zero rows appended up to ``rows`` (the last chunk keeps the compiled shape; its extra rows are
    dropped from every result)."""
    return x if len(x) == rows else torch.cat([x, x.new_zeros(rows - len(x), *x.shape[1:])])


def _fused_chunks(spec: _FusedSpec, student_h: Tensor, teacher_h: Tensor, weight: Tensor, ids: Tensor, scale: Tensor):
    """Yield (rows, terms [k, n], dz [n, V]) chunk by chunk: one product for both logits, one body call."""
    size = spec.chunk_size
    for start in range(0, len(ids), size):
        rows = slice(start, min(start + size, len(ids)))
        n = rows.stop - start
        logits = torch.cat([_padded(student_h[rows], size), _padded(teacher_h[rows], size)]) @ weight.T
        terms, dz = spec.body(logits[:size], logits[size:], _padded(ids[rows], size), _padded(scale[rows], size))
        del logits
        yield rows, terms[:, :n], dz[:n]


class _FusedTokenTerms(torch.autograd.Function):
    """The terms of N tokens from the fused body, ``chunk_size`` at a time; the student-logit gradient of the one
    differentiable term comes out of the same body (closed form, no autograd graph).

    Frozen head: the forward stores J = dz @ W ([N, H]); the backward is grad_h = g · J.
    Trainable head: the forward keeps its inputs; the backward recomputes each chunk with the body's row scale = g
    and accumulates grad_h = dz @ W and grad_W += dz^T h.
    """

    @staticmethod
    def forward(ctx, spec: _FusedSpec, student_h: Tensor, teacher_h: Tensor, weight: Tensor, ids: Tensor):  # type: ignore[override]
        need_h, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        ctx.spec, ctx.need_h, ctx.need_w = spec, need_h, need_w
        n, k = len(ids), len(spec.fused.names)
        outputs = [student_h.new_empty(n, dtype=spec.math_dtype) for _ in range(k)]
        jacobian = student_h.new_empty(n, student_h.shape[-1], dtype=weight.dtype) if need_h and not need_w else None
        ones = student_h.new_ones(n, dtype=spec.math_dtype)
        for rows, terms, dz in _fused_chunks(spec, student_h, teacher_h, weight, ids, ones):
            for i in range(k):
                outputs[i][rows] = terms[i]
            if jacobian is not None:
                jacobian[rows] = dz.to(weight.dtype) @ weight
        if need_w:
            ctx.save_for_backward(student_h, teacher_h, weight, ids)
        elif need_h:
            ctx.save_for_backward(jacobian)
        ctx.mark_non_differentiable(*(o for i, o in enumerate(outputs) if i != spec.fused.diff))
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        spec, g = ctx.spec, grads[ctx.spec.fused.diff]
        if not ctx.need_w:
            (jacobian,) = ctx.saved_tensors
            return None, (g.unsqueeze(-1) * jacobian).to(jacobian.dtype), None, None, None
        student_h, teacher_h, weight, ids = ctx.saved_tensors
        grad_h = torch.zeros_like(student_h) if ctx.need_h else None
        grad_w = torch.zeros_like(weight)
        for rows, _, dz in _fused_chunks(spec, student_h, teacher_h, weight, ids, g.to(spec.math_dtype)):
            dz = dz.to(weight.dtype)
            if grad_h is not None:
                grad_h[rows] = dz @ weight
            grad_w.addmm_(dz.T, student_h[rows].to(weight.dtype))
        return None, grad_h, None, grad_w, None


def _bytes_per_token(vocab: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes one chunk row costs on the fused path (see :func:`auto_chunk_size`)."""
    size = dtype.itemsize
    math_size = max(size, 4)
    return vocab * (3 * size + _WORK_BUFFERS * math_size) + 2 * hidden * size


def auto_chunk_size(
    num_tokens: int,
    vocab: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device | str,
    budget_bytes: int | None = None,
) -> int:
    """The chunk size (positions) whose working set fits a memory budget: ``--loss_chunk_size auto``.

    Rule: a chunk row costs ``V · (3·s + 4·m) + 2·H·s`` bytes (s = the head's dtype size, m = the math dtype's,
    float32 or wider): the student and teacher logits ``[2C, V]`` and the gradient ``dz`` ``[C, V]`` in the head's
    dtype, four ``[C, V]`` math-dtype buffers of the body (log p, log q, ∂ℓ/∂log p, a temporary; the compiled body
    keeps fewer), the ``[C, H]`` products. The budget is ``budget_bytes`` if given, else on CUDA
    min(1 GiB, 5% of the device's free memory at the call), on CPU a fixed 512 MiB. The largest chunk within it is
    rounded down to a power of two (at least 1), capped at 4096 and at ``num_tokens`` rounded up to a multiple of 16
    (a small batch is not padded to a large chunk).
    Qwen3 (V = 151,936), bf16, on an H200: 256.
    """
    device = torch.device(device)
    if budget_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget_bytes = min(AUTO_CUDA_BUDGET_BYTES, int(AUTO_CUDA_FREE_FRACTION * free))
        else:
            budget_bytes = AUTO_CPU_BUDGET_BYTES
    chunk = 1 << (max(int(budget_bytes // _bytes_per_token(vocab, hidden, dtype)), 1).bit_length() - 1)
    cap = max(16 * math.ceil(max(num_tokens, 1) / 16), 1)
    return int(min(chunk, AUTO_MAX_CHUNK, cap))


_AUTO: dict[tuple, int] = {}


def _resolve_chunk_size(chunk_size: int | str, num_positions: int, hidden: Tensor, weight: Tensor) -> int:
    """An int, or ``"auto"``: :func:`auto_chunk_size` of the [B, T] positions, computed once per process and shape
    (so a run keeps one chunk shape, and one compiled body, even though free memory changes)."""
    if chunk_size == "auto":
        key = (num_positions, *weight.shape, weight.dtype, hidden.device)
        if key not in _AUTO:
            _AUTO[key] = auto_chunk_size(num_positions, weight.shape[0], weight.shape[1], weight.dtype, hidden.device)
        return _AUTO[key]
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 or 'auto', got {chunk_size!r}")
    return chunk_size


def chunked_distillation_loss(
    method: str,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    lm_head_weight: Tensor,
    completion_ids: Tensor,
    mask: Tensor,
    *,
    chunk_size: int | str = 256,
    global_step: int = 0,
    fused: bool | None = None,
    compiled: bool | None = None,
    **hparams: Any,
) -> tuple[Tensor, Metrics]:
    """:func:`compute_distillation_loss` of ``student_hidden @ W.T`` and ``teacher_hidden @ W.T`` without the logits.

    ``student_hidden``/``teacher_hidden``: [B, T, H] final hidden states (after the final norm), aligned like the
    logits; ``lm_head_weight``: [V, H], frozen or trainable. Only the valid tokens are projected, ``chunk_size`` of
    them at a time ([chunk_size, V] is the largest tensor; ``"auto"``: :func:`auto_chunk_size`); the per-token terms
    are gathered into [B, T] and reduced by the method's own ``reduce``, so value and gradients (w.r.t.
    ``student_hidden`` and ``lm_head_weight``) equal the dense path's. The teacher path carries no gradient. Same
    ``global_step``/``hparams`` as the dense path.

    ``fused`` (default: on unless ``PWOPSD_FUSED_LOSS=0``): the fused path where it covers the settings
    (:func:`fused_fallback_reason`), else the autograd path. ``compiled`` (default: ``PWOPSD_LOSS_COMPILE`` 0/1,
    else on for CUDA tensors only): ``torch.compile`` the fused body.
    """
    spec = get_method(method)
    hp = _make_hparams(spec, hparams)
    _check_inputs(completion_ids, mask, student_hidden.shape[:-1])
    if teacher_hidden.shape != student_hidden.shape or lm_head_weight.shape[-1] != student_hidden.shape[-1]:
        raise ValueError(
            f"shape mismatch: student_hidden {tuple(student_hidden.shape)}, teacher_hidden "
            f"{tuple(teacher_hidden.shape)}, lm_head_weight {tuple(lm_head_weight.shape)}"
        )
    chunk_size = _resolve_chunk_size(chunk_size, mask.numel(), student_hidden, lm_head_weight)
    hidden = student_hidden.shape[-1]
    # the valid-token indices live on the mask's device (a data-dependent size, hence one host sync here); every
    # gathered tensor, the chunk outputs (new_empty/new_zeros of these) and the scattered [B, T] terms follow them
    valid = mask.reshape(-1).nonzero().squeeze(-1)
    student_h = student_hidden.reshape(-1, hidden).index_select(0, valid)
    teacher_h = teacher_hidden.detach().reshape(-1, hidden).index_select(0, valid)
    ids = completion_ids.reshape(-1).index_select(0, valid)
    if fused is None:
        fused = os.environ.get(FUSED_ENV, "1") != "0"
    body = _fused_for(spec, hp) if fused else None
    if body is not None:
        dtype = torch.promote_types(torch.promote_types(student_h.dtype, lm_head_weight.dtype), torch.float32)
        compiled = _compile_wanted(compiled, student_hidden.device)
        fused_spec = _FusedSpec(_get_body(body, hp, dtype, compiled), body, chunk_size, dtype)
        names: tuple[str, ...] = body.names
        outputs = _FusedTokenTerms.apply(fused_spec, student_h, teacher_h, lm_head_weight, ids)
    else:
        chunk_spec = _ChunkSpec(spec, hp, chunk_size)
        outputs = _ChunkedTokenTerms.apply(chunk_spec, student_h, teacher_h, lm_head_weight, ids)
        names = chunk_spec.names
    terms = {
        name: values.new_zeros(mask.numel()).index_copy(0, valid, values).view(mask.shape)
        for name, values in zip(names, outputs)
    }
    return spec.reduce(terms, mask, global_step, hp)
