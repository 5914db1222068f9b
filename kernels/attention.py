"""Variable-length bidirectional attention over packed samples (text and regions attend to each other).

q, k, v: (total_tokens, heads, head_dim); sample b owns rows cu_seqlens[b] .. cu_seqlens[b+1]; nothing attends
across samples. `max_seqlen` is a host int carried by the packed batch, so no call synchronises with the device.
"""
from __future__ import annotations

import torch

from . import reference
from .backend import choose


def _triton_reason(q: torch.Tensor) -> str | None:
    return "no triton kernel for varlen_attention in this version"


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
    """softmax(q k^T * scale) v within each sample, with attention dropout; returns (total_tokens, heads, head_dim)."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"varlen_attention: q, k, v must share one (total, heads, head_dim) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"varlen_attention: cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} "
                         f"of shape {tuple(cu_seqlens.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"varlen_attention: dropout_p must be in [0, 1), got {dropout_p}")
    choose("varlen_attention", backend, q.device, _triton_reason(q))
    return reference.varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p,
                                          softmax_scale=softmax_scale)
