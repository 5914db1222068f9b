"""Variable-length bidirectional attention over packed samples (text and regions attend to each other).

q, k, v: (total_tokens, heads, head_dim); sample b owns rows cu_seqlens[b] .. cu_seqlens[b+1]; nothing attends
across samples. `max_seqlen` is a host int carried by the packed batch, so no call synchronises with the device.

The stack: Triton kernels and launchers (attention_triton.py) -> `_VarlenAttention` (autograd; under
torch.compile the custom ops `uniter_fast::varlen_attention` and its backward instead) -> `varlen_attention`
(functional, backend dispatch) -> `VarlenAttention` (nn.Module, `AttentionOptions`). `varlen_attention_qkv` and
`VarlenAttention.from_qkv` take q, k, v as one (total, 3, heads, head_dim) projection (`_VarlenAttentionQKV`:
one gradient tensor, written by the backward kernel).
Backends: "torch" (kernels/reference.py: pad, SDPA with a key mask, unpad), "triton", and "xformers"
(memory_efficient_attention with a block-diagonal mask, where it imports and runs; never chosen by "auto").
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import attention_xformers, reference
from .backend import BackendUnavailable, choose, requested_backend


def _kernels():
    from . import attention_triton  # imported on first use: triton loads only when a kernel runs

    return attention_triton


def _triton_reason(q: torch.Tensor) -> str | None:
    """Why the triton kernels cannot serve q; triton is imported only here, on first use."""
    try:
        from .attention_triton import unsupported
    except ImportError as err:  # no triton on this platform: the reference serves
        return f"triton is not importable ({err})"
    return unsupported(q)


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed):
        out, lse = _kernels().forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.args = (max_seqlen, softmax_scale, dropout_p, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: these gradients refuse a further backward when it comes
            return _grads_once_differentiable(ctx, grad_out)
        return _grads(ctx, grad_out)  # the usual call skips once_differentiable's wrapping (host time)


def _grads(ctx, grad_out):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _kernels().backward(grad_out, q, k, v, out, lse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_grads_once_differentiable = torch.autograd.function.once_differentiable(_grads)


class _VarlenAttentionQKV(torch.autograd.Function):
    """_VarlenAttention on the three views of one (total, 3, heads, head_dim) tensor: the backward writes dq, dk and
    dv into one gradient of that shape, so nothing stacks them, and q, k, v need no contiguous copies."""

    @staticmethod
    def forward(ctx, qkv, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed):
        out, lse = _kernels().forward(*qkv.unbind(1), cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed)
        ctx.save_for_backward(qkv, out, lse, cu_seqlens)
        ctx.args = (max_seqlen, softmax_scale, dropout_p, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            return _qkv_grads_once_differentiable(ctx, grad_out)
        return _qkv_grads(ctx, grad_out)


def _qkv_grads(ctx, grad_out):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    grad = torch.empty_like(qkv)  # qkv is contiguous (varlen_attention_qkv): its views and grad's share strides
    _kernels().backward(grad_out, *qkv.unbind(1), out, lse, cu_seqlens, *ctx.args, grads=grad.unbind(1))
    return grad, None, None, None, None, None


_qkv_grads_once_differentiable = torch.autograd.function.once_differentiable(_qkv_grads)


# Under torch.compile the kernels run as two custom ops, opaque to the compiler, so it can trace (and fuse) the
# layers around them without a graph break. Eager calls keep `_VarlenAttention`: a custom op's dispatch adds about
# 40 us of host time per forward+backward (measured on this project's CPU), and an encoder makes 12 or 24 calls.
@torch.library.custom_op("uniter_fast::varlen_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, seed: torch.Tensor,
                  max_seqlen: int, softmax_scale: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the triton forward, both contiguous; seed: one int64 on q's device (the kernels read it)."""
    _check_offsets(cu_seqlens, q.shape[0], max_seqlen)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the outputs' strides as the fake's
    return _kernels().forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed)


@_attention_op.register_fake
def _(q, k, v, cu_seqlens, seed, max_seqlen, softmax_scale, dropout_p):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("uniter_fast::varlen_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, seed: torch.Tensor,
                           max_seqlen: int, softmax_scale: float,
                           dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, seed, max_seqlen, softmax_scale, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the kernels write


def _save_for_op_backward(ctx, inputs, output):
    q, k, v, cu_seqlens, seed, max_seqlen, softmax_scale, dropout_p = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, seed)
    ctx.args = (max_seqlen, softmax_scale, dropout_p)


def _op_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, cu_seqlens, seed, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_attention_op.register_autograd(_op_backward, setup_context=_save_for_op_backward)


def _check(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale) -> None:
    """Raise naming the argument (cu_seqlens' values: _check_offsets)."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"varlen_attention: q, k, v must share one (total, heads, head_dim) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"varlen_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"varlen_attention: cu_seqlens must be a 1-D int32/int64 tensor of batch+1 offsets, got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device or k.device != q.device or v.device != q.device:
        raise ValueError(f"varlen_attention: q, k, v and cu_seqlens must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}, {cu_seqlens.device}")
    if not isinstance(max_seqlen, numbers.Integral) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise ValueError(f"varlen_attention: max_seqlen must be a non-negative int (the packed batch's), "
                         f"got {max_seqlen!r}")
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"varlen_attention: dropout_p must be in [0, 1), got {dropout_p!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, numbers.Real) and math.isfinite(softmax_scale)
                                          and softmax_scale > 0):
        raise ValueError(f"varlen_attention: softmax_scale must be a finite number > 0, got {softmax_scale!r}")


def _check_offsets(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """cu_seqlens' values against the rows and max_seqlen; only on the CPU, where reading them costs no sync."""
    if cu_seqlens.device.type != "cpu":
        return
    offsets = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if offsets[0] != 0 or offsets[-1] != total or min(lens, default=0) < 0:
        raise ValueError(f"varlen_attention: cu_seqlens must rise from 0 to total_tokens={total}, "
                         f"got {offsets[:8]}{' ...' if len(offsets) > 8 else ''}")
    if max(lens, default=0) > max_seqlen:
        raise ValueError(f"varlen_attention: max_seqlen={max_seqlen} is below the longest sample "
                         f"({max(lens)} tokens, sample {lens.index(max(lens))})")


@dataclass(frozen=True)
class AttentionOptions:
    dropout_p: float = 0.0                # applied in training mode only
    softmax_scale: float | None = None    # None: 1 / sqrt(head_dim)
    deterministic: bool = False
    backend: str | None = None            # auto | torch | triton | xformers (None: auto)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v within each sample, with attention dropout; returns (total_tokens, heads, head_dim).

    Dropout in the triton kernel is Philox keyed by a seed drawn on the inputs' device by torch's generator, so
    `torch.manual_seed` makes it reproducible and a CUDA graph's replays draw fresh masks. The triton backward has
    no atomics: it is deterministic whatever `deterministic` says;
    `deterministic=True` refuses the xformers backend, whose backward may not be.
    """
    _check(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    return _attend(q, k, v, None, cu_seqlens, max_seqlen, dropout_p, softmax_scale, deterministic, backend)


def varlen_attention_qkv(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                         options: AttentionOptions = AttentionOptions()) -> torch.Tensor:
    """varlen_attention of q, k, v = qkv.unbind(1), for qkv (total_tokens, 3, heads, head_dim) as one projection
    makes it, with varlen_attention's keyword arguments as `options` (dropout_p applies as given here). On the triton
    backend its gradient is one tensor like qkv, written by the kernel."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"varlen_attention_qkv: qkv must be (total, 3, heads, head_dim), got {tuple(qkv.shape)}")
    qkv = qkv.contiguous()  # a no-op for a projection's output
    q, k, v = qkv.unbind(1)
    o = options
    _check(q, k, v, cu_seqlens, max_seqlen, o.dropout_p, o.softmax_scale)
    return _attend(q, k, v, qkv, cu_seqlens, max_seqlen, o.dropout_p, o.softmax_scale, o.deterministic, o.backend)


def _attend(q, k, v, qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale, deterministic, backend) -> torch.Tensor:
    """The checked call on its backend; qkv: the tensor q, k, v are views of, or None."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    chosen = "xformers" if requested_backend(backend) == "xformers" else \
        choose("varlen_attention", backend, q.device, _triton_reason(q))
    if chosen == "triton" and torch.compiler.is_compiling():  # the op checks the offsets, on real values
        seed = _draw_seed(q.device) if dropout_p > 0 else torch.zeros(1, dtype=torch.int64, device=q.device)
        return _attention_op(q, k, v, cu_seqlens, seed, max_seqlen, scale, float(dropout_p))[0]
    _check_offsets(cu_seqlens, q.shape[0], max_seqlen)
    if chosen == "xformers":
        return _on_xformers(q, k, v, cu_seqlens, dropout_p, scale, deterministic)
    if chosen == "torch":
        return reference.varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p,
                                              softmax_scale=scale)
    seed = _draw_seed(q.device) if dropout_p > 0 else None
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # no gradient wanted (evaluation, retrieval): the launcher alone, without autograd.Function's host time
        return _kernels().forward(q, k, v, cu_seqlens, max_seqlen, scale, float(dropout_p), seed)[0]
    if qkv is not None:
        return _VarlenAttentionQKV.apply(qkv, cu_seqlens, max_seqlen, scale, float(dropout_p), seed)
    return _VarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen, scale, float(dropout_p), seed)


def _draw_seed(device: torch.device) -> torch.Tensor:
    """Dropout's Philox seed, drawn on the inputs' device by its torch generator: no host sync, reproducible with
    torch.manual_seed, and drawn afresh by each replay of a CUDA graph (the kernels read it from memory)."""
    return torch.randint(2**62, (1,), dtype=torch.int64, device=device)


def _on_xformers(q, k, v, cu_seqlens, dropout_p: float, scale: float, deterministic: bool) -> torch.Tensor:
    """The xformers backend, or BackendUnavailable saying why it cannot serve the call."""
    reason, cause = attention_xformers.unavailable(q), None
    if reason is None and deterministic:
        reason = "deterministic=True: xformers' backward may accumulate with atomics"
    if reason is None:
        try:
            return attention_xformers.varlen_attention(q, k, v, cu_seqlens, dropout_p=dropout_p, softmax_scale=scale)
        except NotImplementedError as err:  # xformers' own "no operator of this build serves these inputs"
            reason, cause = str(err).splitlines()[0], err
    raise BackendUnavailable(f"varlen_attention: the xformers backend cannot serve this call: {reason}") from cause


class VarlenAttention(nn.Module):
    """`varlen_attention` as a module; `probs=True` also returns each sample's attention probabilities
    (heads, L_b, L_b), computed by the reference in fp32 without dropout, for attention maps."""

    def __init__(self, options: AttentionOptions = AttentionOptions()):
        super().__init__()
        self.options = options

    def forward(self, q, k, v, cu_seqlens, max_seqlen: int, *, probs: bool = False):
        o = self.options
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=o.dropout_p if self.training else 0.0,
                               softmax_scale=o.softmax_scale, deterministic=o.deterministic, backend=o.backend)
        if not probs:
            return out
        return out, reference.attention_probs_ref(q.detach(), k.detach(), cu_seqlens, softmax_scale=o.softmax_scale)

    def from_qkv(self, qkv, cu_seqlens, max_seqlen: int, *, probs: bool = False):
        """forward of q, k, v = qkv.unbind(1) through varlen_attention_qkv, qkv (total, 3, heads, head_dim)."""
        o = self.options
        out = varlen_attention_qkv(qkv, cu_seqlens, max_seqlen,
                                   o if self.training or not o.dropout_p else replace(o, dropout_p=0.0))
        if not probs:
            return out
        q, k, _ = qkv.detach().unbind(1)
        return out, reference.attention_probs_ref(q, k, cu_seqlens, softmax_scale=o.softmax_scale)
