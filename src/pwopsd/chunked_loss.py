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

The backward is not autograd's over the whole loss (that would keep every chunk's ``[chunk, V]`` graph alive).
With a frozen LM head (LoRA training) the forward pulls each differentiable term back to the hidden state right
away, ``J_t = ∂term_t/∂z_t @ W`` (``[N, H]`` per term), and the backward is a weighted sum of those Jacobians. With
a trainable head the forward keeps only its inputs, and the backward recomputes each chunk's log-probs (activation
checkpointing) to accumulate ``grad_W`` in place.

Physical limits.

* Memory: the largest tensors are one chunk's ``[chunk_size, V]`` student and teacher log-probs (float32: about
  155 MB each for 256 tokens of Qwen3's vocabulary) and their autograd buffers; on top of that the frozen-head path
  keeps ``N x H`` per differentiable term (N valid tokens, in the head's dtype) until the backward. Measured figures
  are in ``bench/RESULTS.md`` (``bench/loss_memory.py``): about 11x less peak memory than the dense path on CPU at
  B x T = 2 x 512, a ratio that grows with B x T.
* Time: the projection is the same matmul as the dense path's, split into chunks; the frozen-head path adds one
  ``[chunk, V] @ [V, H]`` product per differentiable term, the trainable-head path recomputes the whole forward in
  the backward (about 1.5x the dense time in the benchmark). Smaller chunks trade speed for memory.
* Scope: the logits must be exactly ``hidden @ W.T`` (final norm already applied; no bias, no soft-capping, no
  scaling); student and teacher share the one head ``W`` (both are projected in a single product, so a teacher
  with its own head, e.g. an EMA copy of a trainable head, needs the dense path); ``W`` must be the full ``[V, H]``
  matrix (not a ZeRO-3 shard); the teacher path carries no gradient; the function is ``once_differentiable`` (no
  double backward). Padding costs nothing: only valid tokens are
  projected, so a fully valid batch is the worst case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from pwopsd.losses import (
    DistillationMethod,
    LossHParams,
    Metrics,
    _check_inputs,
    _is_int,
    _make_hparams,
    _math_dtype,
    get_method,
)

__all__ = ["chunked_distillation_loss"]


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
