"""Details of the attention kernels' bodies (kernels/attention_triton.py) that the broader attention tests leave
open, checked against the fp64 reference (kernels/reference.py) and hand computations:
- the dropout keep-mask is the documented Philox draw (key seed + b * heads + h, counter i * ceil(max_seqlen / 8)
  + j // 8, eight 16-bit draws a call, kept when a draw >= round(p * 2**16)), against Philox4x32-10 written here
  in numpy and anchored on Random123's known answers;
- the online softmax stays exact when key blocks' maxima are far apart or every score of a row is very negative;
- masked loads and stores: q, k, v, out and dO as views into buffers poisoned with NaN (rows before and after,
  an extra head, padding beyond head_dim), gradients written into a buffer whose other entries must stay as
  they were; with the separate and the fused rowsum(O dO);
- q, k, v (and out, dO) of different layouts in one call, and samples longer than a query plus a key block;
- the log-sum-exp the forward saves is base 2 of the scaled scores, and the backward reads it whatever its
  row stride.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import cu_seqlens_of
from uniter_fast.kernels import attention_triton as att
from uniter_fast.kernels import reference


def exact(q, k, v, cu, grad, scale):
    """The fp64 reference output and the gradients of (out * grad).sum() with respect to q, k, v."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference.varlen_attention_ref(*leaves, cu, int(cu.diff().max()), softmax_scale=scale)
    return [out, *torch.autograd.grad(out, leaves, grad.double())]


def assert_near(got, expected, what, atol=2e-5, rtol=1e-4):
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert bool(torch.isfinite(g).all()), f"{what}: {name} is not finite"
        torch.testing.assert_close(g.double(), e, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {name}: {m}")


def kernels_and_grads(q, k, v, cu, grad, scale, out_view=None):
    """The launchers' forward and backward without dropout, and the saved log-sum-exp; out_view(out): the out
    the backward reads (out itself when None)."""
    n = int(cu.diff().max())
    out, lse = att.forward(q, k, v, cu, n, scale, 0.0, None)
    grads = att.backward(grad, q, k, v, out if out_view is None else out_view(out), lse, cu, n, scale, 0.0, None)
    return [out, *grads], lse


# ---------------------------------------------------------------------------------------------------------
# dropout: the documented Philox draw
# ---------------------------------------------------------------------------------------------------------


def philox4x32(counters, key: int, rounds: int = 10):
    """Philox4x32-10 (Salmon et al. 2011, Random123) of four uint32 counter words and a 64-bit key (lo, hi)."""
    low = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint64) & low for x in counters]
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64((key >> 32) & 0xFFFFFFFF)
    for _ in range(rounds):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & low, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & low]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & low, (k1 + np.uint64(0xBB67AE85)) & low
    return c


def draws(seed: int, b: int, h: int, heads: int, rows: int, groups: int, max_seqlen: int) -> np.ndarray:
    """(rows, groups, 8) 16-bit draws of (sample b, head h) as the module docstring defines them: one Philox call
    per query i and group of 8 keys g, keyed by seed + b * heads + h, counter i * ceil(max_seqlen / 8) + g."""
    counter = np.arange(rows)[:, None] * -(-max_seqlen // 8) + np.arange(groups)[None, :]
    words = philox4x32([counter, 0, 0, 0], seed + b * heads + h)
    halves = [x for w in words for x in (w & np.uint64(0xFFFF), w >> np.uint64(16))]
    return np.stack(halves, -1).astype(np.int64)


def test_philox_helper_reproduces_random123_known_answers():
    """The oracle below: Random123's published Philox4x32-10 test vectors (kat_vectors)."""
    cases = [([0, 0, 0, 0], 0, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
             ([0xFFFFFFFF] * 4, 2**64 - 1, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
             ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], 0x299F31D0A4093822,
              [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])]
    for counters, key, expected in cases:
        assert [int(w) for w in philox4x32(counters, key)] == expected


def test_keep_mask_is_the_documented_philox_draw():
    """Each full group of 8 keys keeps as many keys as its 8 draws at or above round(p * 2**16) (the order of the
    draws within a group is the kernels' own): max_seqlen 21 is no multiple of 8 (ceil, not floor), the seed
    passes 2**32 (both key words), and one rate puts the threshold exactly on a draw (kept: >=, not >)."""
    lens, heads, n, seed = [21, 0, 16, 9], 2, 21, 2**40 + 977
    cu = cu_seqlens_of(lens)
    first = int(draws(seed, 0, 0, heads, 1, 1, n)[0, 0, 0])
    assert 0 < first < 65536
    for p in (0.5, first / 65536):  # the second rate's threshold is exactly the first draw
        mask = att.dropout_keep_mask(cu, heads, n, p, seed).numpy()
        threshold = round(p * 65536)
        for b, length in enumerate(lens):
            groups = length // 8
            for h in range(heads):
                expected = (draws(seed, b, h, heads, length, groups, n) >= threshold).sum(-1)
                got = mask[b, h, :length, :8 * groups].reshape(length, groups, 8).sum(-1)
                np.testing.assert_array_equal(got, expected, err_msg=f"p={p}, sample {b}, head {h}")


# ---------------------------------------------------------------------------------------------------------
# the online softmax
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # lanes that tl.where then drops
def test_online_softmax_survives_far_apart_block_maxima_and_very_negative_rows():
    """One sample of 70 rows: 3 key blocks of 32 (head_dim 8). Scores q.k * scale = a_i * b_j with key 0 at
    b = 10 and the others at 4.5 to 6: rows with a = +100 score 250 on key 0 against at most 150 on the later
    blocks (144 apart in base 2: past fp32's exp2 range), rows with a = -100 score at most -112 on every key
    (every exp2 of a score underflows in fp32 unless the running maximum starts at -inf, not 0). softmax_scale
    0.25 is not the default 8 ** -0.5."""
    gen = torch.Generator().manual_seed(1)
    length, heads, d, scale = 70, 2, 8, 0.25
    unit = torch.zeros(d)
    unit[0] = 1.0
    a = torch.where(torch.arange(length) % 2 == 0, 100.0, -100.0)
    b = 4.5 + 1.5 * torch.rand(length, generator=gen)
    b[0] = 10.0
    q = (a[:, None] * unit).expand(heads, length, d).transpose(0, 1).contiguous()
    k = (b[:, None] * unit).expand(heads, length, d).transpose(0, 1).contiguous()
    v = torch.randn(length, heads, d, generator=gen)
    cu, grad = cu_seqlens_of([length]), torch.randn(length, heads, d, generator=gen)
    got, _ = kernels_and_grads(q, k, v, cu, grad, scale)
    expected = exact(q, k, v, cu, grad, scale)
    torch.testing.assert_close(got[0][0::2].double(), v[0:1].double().expand(35, -1, -1), atol=1e-5, rtol=0)
    assert_near(got, expected, "extreme scores", atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# masked loads and stores, layouts
# ---------------------------------------------------------------------------------------------------------


def poisoned(values: torch.Tensor, fill: float, pad: int = 3, widen: bool = True):
    """(buffer, view): values copied into a buffer of `pad` more rows before and after, and (widen) one more head
    and 8 more columns, holding `fill` everywhere else; without widen the view stays contiguous."""
    shape = list(values.shape)
    if widen:
        shape[-2] += 1
        shape[-1] += 8
    buffer = torch.full([shape[0] + 2 * pad, *shape[1:]], fill, dtype=values.dtype)
    view = buffer[pad:pad + values.shape[0]][(slice(None),) + tuple(slice(0, s) for s in values.shape[1:])]
    view.copy_(values)
    return buffer, view


def test_nothing_outside_the_views_is_read_or_written():
    """q, k, v as views of one fused projection inside a NaN-filled buffer (rows before and after, an extra head,
    columns past head_dim 8 up to the kernels' 16), out and dO likewise: no NaN reaches the output or the
    gradients, with the separate and the fused rowsum(O dO). The gradients go into a buffer of the same layout
    whose other entries must keep their value. An empty sample sits between others; the backward runs in 16-row
    blocks: one sample spans three, the last is one row past a block (its tiles reach past the tensor's end)."""
    lens, heads, d, scale, sentinel = [5, 0, 40, 1, 17], 2, 8, 0.3, -7.0
    cu, total, n = cu_seqlens_of(lens), sum(lens), max(lens)
    gen = torch.Generator().manual_seed(2)
    buffer, qkv = poisoned(torch.randn(total, 3, heads, d, generator=gen), float("nan"))
    q, k, v = qkv.unbind(1)
    grad = torch.randn(total, heads, d, generator=gen)
    _, grad_out = poisoned(grad, float("nan"), widen=False)
    assert grad_out.is_contiguous() and not q.is_contiguous()
    expected = exact(q, k, v, cu, grad, scale)
    out, lse = att.forward(q, k, v, cu, n, scale, 0.0, None)
    _, out_view = poisoned(out, float("nan"))
    for fused in (False, True):
        grad_buffer = torch.full_like(buffer, sentinel)
        views = grad_buffer[3:3 + total, :, :heads, :d]
        grads = att.backward(grad_out, q, k, v, out_view, lse, cu, n, scale, 0.0, None,
                             att.Launch(16, 16, fused_delta=fused), grads=views.unbind(1))
        assert_near([out, *grads], expected, f"fused_delta={fused}")
        outside = torch.ones_like(grad_buffer, dtype=torch.bool)
        outside[3:3 + total, :, :heads, :d] = False
        assert bool((grad_buffer[outside] == sentinel).all()), f"fused_delta={fused}: wrote outside the gradients"


def test_q_k_v_out_and_dout_of_different_layouts():
    """q contiguous, k a slice of wider rows, v head-major (heads, total, d) transposed; out handed back
    head-major and dO contiguous: each is read with its own strides. A sample of 100 rows spans two query blocks
    of 64 and four key blocks of 32. The saved log-sum-exp is log2 of sum_j exp(scale q.k_j) per row and head."""
    lens, heads, d, scale = [100, 0, 3], 2, 16, 0.2
    cu, total = cu_seqlens_of(lens), sum(lens)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(total, heads, d, generator=gen)
    k = torch.randn(total, heads, 2 * d, generator=gen)[..., :d]
    v = torch.randn(heads, total, d, generator=gen).transpose(0, 1)
    assert len({q.stride(), k.stride(), v.stride()}) == 3
    grad = torch.randn(total, heads, d, generator=gen)
    head_major = lambda out: out.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    got, lse = kernels_and_grads(q, k, v, cu, grad, scale, out_view=head_major)
    assert_near(got, exact(q, k, v, cu, grad, scale), "layouts")
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        scores = torch.einsum("qhd,khd->qhk", q[lo:hi].double(), k[lo:hi].double()) * scale
        torch.testing.assert_close(lse[lo:hi].double(), scores.logsumexp(-1) / math.log(2), atol=1e-5, rtol=1e-6)


def test_backward_reads_an_lse_of_any_row_stride():
    """The log-sum-exp handed to the backward as a view of wider rows (its row stride not heads) gives the
    reference's gradients: the kernels' rowsum(O dO) buffer is the backward's own, contiguous."""
    lens, heads, d, scale = [6, 0, 9], 2, 8, 0.3
    cu, total = cu_seqlens_of(lens), sum(lens)
    gen = torch.Generator().manual_seed(4)
    q, k, v, grad = (torch.randn(total, heads, d, generator=gen) for _ in range(4))
    out, lse = att.forward(q, k, v, cu, 9, scale, 0.0, None)
    lse_view = torch.zeros(total, heads + 3)[:, :heads]
    lse_view.copy_(lse)
    assert lse_view.stride(0) != heads
    grads = att.backward(grad, q, k, v, out, lse_view, cu, 9, scale, 0.0, None)
    assert_near([out, *grads], exact(q, k, v, cu, grad, scale), "lse view")
