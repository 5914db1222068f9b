"""xformers' memory_efficient_attention with a block-diagonal mask: a packed-attention backend where it runs.

It serves only where xformers imports with its compiled operators and the inputs are on CUDA; everywhere else
`unavailable()` says why. Building the mask needs the lengths on the host (`BlockDiagonalMask.from_seqlens` takes
a list), so this backend syncs once per call: a peer to measure against, not the default.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    try:
        import xformers.ops  # noqa: F401
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask  # noqa: F401
    except Exception as err:  # a broken build raises more than ImportError
        return f"xformers does not import here ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return None


def unavailable(q: torch.Tensor) -> str | None:
    """Why xformers cannot serve inputs like q, or None when it may (its operators decide at the call)."""
    error = _import_error()
    if error:
        return error
    if q.device.type != "cuda":
        return f"inputs on {q.device.type}: xformers' memory_efficient_attention runs on CUDA only"
    return None


def block_diagonal_mask(cu_seqlens: torch.Tensor):
    """xformers' BlockDiagonalMask for the packed samples (empty samples own no rows and are left out)."""
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # the host sync this backend pays
    return BlockDiagonalMask.from_seqlens([n for n in lens if n > 0])


def attend(q, k, v, mask, *, dropout_p: float, softmax_scale: float) -> torch.Tensor:
    import xformers.ops as xops

    return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=mask, p=dropout_p,
                                           scale=softmax_scale)[0]


def varlen_attention(q, k, v, cu_seqlens, *, dropout_p: float, softmax_scale: float) -> torch.Tensor:
    return attend(q, k, v, block_diagonal_mask(cu_seqlens), dropout_p=dropout_p, softmax_scale=softmax_scale)
