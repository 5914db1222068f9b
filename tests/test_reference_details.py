"""The attention oracle and the packing helpers of kernels/reference.py, against independent computations.

pad_rows, zero_pads, row_positions and unpad_rows on hand-built packed batches (expected values written out by
hand); varlen_attention_ref and attention_probs_ref against BERT's attention, softmax(q k^T / sqrt(head_dim)) v,
written as a loop over each sample's own rows: the default scale, a given keep-mask and its 1 / (1 - p),
samples of length 0 and 1, a max_seqlen above the longest sample, rows after the last sample, and the dtypes.
"""
from __future__ import annotations

import pytest
import torch

from helpers import cu_seqlens_of
from uniter_fast.kernels import ot, reference

# heads != head_dim, so a scale built from the wrong dim shows; lengths with an empty and a length-1 sample
HEADS, HEAD_DIM = 3, 4
LENS = [2, 0, 1, 4]


def qkv(total: int, dtype=torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(total, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))


def bert_attention(q, k, v, scale, keep=None, p=0.0):
    """One sample's BERT self-attention in fp64: softmax(q k^T * scale) per head, dropout as keep / (1 - p), @ v."""
    q, k, v = (t.double() for t in (q, k, v))
    out = torch.empty_like(q)
    for h in range(q.shape[1]):
        probs = torch.softmax(q[:, h] @ k[:, h].T * scale, dim=-1)
        if keep is not None:
            probs = probs * keep[h].double() / (1 - p)
        out[:, h] = probs @ v[:, h]
    return out


# ---------------------------------------------------------------------------------------------------------
# packing helpers
# ---------------------------------------------------------------------------------------------------------


def test_pad_rows_keeps_the_last_row_and_pads_with_exact_zeros_whatever_other_rows_hold():
    """A sample ending on the tensor's last row gathers that row; pads are 0 even when rows outside every sample
    (here row 0, which the pads would otherwise read) hold inf or NaN, so nothing non-finite reaches a pad."""
    x = torch.arange(1.0, 13.0, dtype=torch.float64).view(6, 2)
    x[0] = float("nan")
    x[1, 0] = float("inf")
    out = reference.pad_rows(x, torch.tensor([4, 2, 5]), torch.tensor([2, 1, 0]), 3)
    expected = torch.tensor([[[9.0, 10.0], [11.0, 12.0], [0.0, 0.0]],
                             [[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]],
                             [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_packed_wra_on_the_torch_path_keeps_a_nan_row_of_no_problem_out_of_the_others():
    """The user-visible side of the zero pads: in ot.wra_distance_packed's torch path (pad_rows), a NaN in row 0,
    which belongs to no problem, leaves every distance and every gradient finite, and row 0's gradient 0."""
    hidden = torch.randn(9, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hidden[0] = float("nan")
    hidden.requires_grad_()
    dist = ot.wra_distance_packed(hidden, torch.tensor([1, 5]), torch.tensor([2, 1]), torch.tensor([3, 6]),
                                  torch.tensor([2, 2]), 2, 2, iterations=3, backend="torch")
    (grad,) = torch.autograd.grad(dist.sum(), hidden)
    assert bool(torch.isfinite(dist).all()) and bool(torch.isfinite(grad).all())
    assert bool((grad[[0, 8]] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_pad_rows_of_one_row_and_of_no_rows_keep_the_dtype(dtype):
    one = torch.tensor([[2.5, -1.0]], dtype=dtype)
    out = reference.pad_rows(one, torch.tensor([0, 1]), torch.tensor([1, 0]), 2)
    assert out.dtype == dtype and out.tolist() == [[[2.5, -1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]
    empty = reference.pad_rows(one[:0], torch.tensor([0]), torch.tensor([0]), 3)
    assert empty.dtype == dtype and empty.shape == (1, 3, 2) and bool((empty == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_zero_pads_zeroes_exactly_the_rows_from_lens_on_nan_included(dtype):
    """Rows lens[b] onwards become 0 (NaN and inf too, so that 0 * NaN cannot reach a result); rows before
    lens[b] are kept as they are, NaN included; trailing dims (4-D here) are zeroed whole."""
    x = torch.arange(1.0, 1.0 + 3 * 4 * 2 * 2, dtype=torch.float64).view(3, 4, 2, 2).to(dtype)
    x[0, 3] = float("nan")
    x[1, 0, 1, 1] = float("nan")
    x[2, 2] = float("-inf")
    out = reference.zero_pads(x, torch.tensor([3, 4, 0]))
    assert out.dtype == dtype and out.shape == x.shape
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert bool((out[~keep] == 0).all())
    torch.testing.assert_close(out[keep], x[keep], rtol=0, atol=0, equal_nan=True)
    alone = reference.zero_pads(x[:1], torch.tensor([3]))  # a batch of one sample is zeroed alike
    assert torch.equal(alone, out[:1])


def test_zero_pads_gives_no_gradient_to_the_pads():
    x = torch.ones(2, 3, 1, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(reference.zero_pads(x, torch.tensor([1, 3])).sum(), x)
    assert grad[..., 0].tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]


def test_row_positions_name_each_rows_sample_and_place():
    """cu_seqlens [0, 2, 2, 5, 6]: an empty sample 1 and a length-1 sample 3, written out by hand."""
    sample, pos = reference.row_positions(torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32), 6)
    assert sample.tolist() == [0, 0, 2, 2, 2, 3]
    assert pos.tolist() == [0, 1, 0, 1, 2, 0]
    sample, pos = reference.row_positions(torch.tensor([0, 0], dtype=torch.int64), 0)
    assert sample.tolist() == [] and pos.tolist() == []


def test_unpad_rows_reads_each_rows_entry_of_the_padded_tensor():
    """padded[b, i] = 10 b + i (pads -1): unpacking gives, row by row, 10 * sample + position; a pad_rows round
    trip gives the packed rows back, in their dtype."""
    cu = torch.tensor([0, 3, 3, 4, 6], dtype=torch.int32)
    padded = torch.full((4, 3, 1), -1.0, dtype=torch.float64)
    for b, n in enumerate([3, 0, 1, 2]):
        padded[b, :n, 0] = torch.arange(n) + 10.0 * b
    assert reference.unpad_rows(padded, cu, 6)[:, 0].tolist() == [0.0, 1.0, 2.0, 20.0, 30.0, 31.0]
    x = torch.randn(6, 2, 5).to(torch.bfloat16)
    back = reference.unpad_rows(reference.pad_rows(x, cu[:-1], cu.diff(), 3), cu, 6)
    assert back.dtype == torch.bfloat16 and torch.equal(back, x)


# ---------------------------------------------------------------------------------------------------------
# varlen_attention_ref
# ---------------------------------------------------------------------------------------------------------


def check_against_bert(out, q, k, v, lens, scale, keep=None, p=0.0, tol=1e-12):
    bounds = cu_seqlens_of(lens).tolist()
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        mask = None if keep is None else keep[b, :, :hi - lo, :hi - lo]
        expected = bert_attention(q[lo:hi], k[lo:hi], v[lo:hi], scale, mask, p)
        torch.testing.assert_close(out[lo:hi].double(), expected, rtol=tol, atol=tol, msg=lambda m: f"{b}: {m}")


@pytest.mark.parametrize("max_seqlen", [4, 7])
def test_attention_reference_is_bert_attention_per_sample(max_seqlen):
    """fp64 in, fp64 out, with the default scale 1 / sqrt(head_dim), also when max_seqlen exceeds the longest
    sample; a length-1 sample's output is its own value row (softmax over one key is 1)."""
    cu = cu_seqlens_of(LENS)
    q, k, v = qkv(int(cu[-1]))
    out = reference.varlen_attention_ref(q, k, v, cu, max_seqlen)
    assert out.dtype == torch.float64 and out.shape == q.shape
    check_against_bert(out, q, k, v, LENS, HEAD_DIM ** -0.5)
    assert torch.equal(out[2], v[2])


def test_attention_reference_with_a_keep_mask_scales_the_kept_probabilities():
    """A given keep-mask, with and without softmax_scale: kept probabilities times 1 / (1 - p), dropped ones 0;
    the mask's entries beyond a sample's length play no part."""
    cu, p = cu_seqlens_of(LENS), 0.4
    q, k, v = qkv(int(cu[-1]), seed=1)
    keep = torch.rand(len(LENS), HEADS, 5, 5, generator=torch.Generator().manual_seed(2)) >= p
    keep[:, :, :, 4] = False  # column 4 is a pad of every sample but the last
    for scale, kwargs in ((HEAD_DIM ** -0.5, {}), (0.3, {"softmax_scale": 0.3})):
        out = reference.varlen_attention_ref(q, k, v, cu, 5, dropout_p=p, dropout_mask=keep, **kwargs)
        check_against_bert(out, q, k, v, LENS, scale, keep, p)
        flipped = keep.clone()
        flipped[:, :, :, 4] = True
        again = reference.varlen_attention_ref(q, k, v, cu, 5, dropout_p=p, dropout_mask=flipped, **kwargs)
        torch.testing.assert_close(again[:3], out[:3], rtol=0, atol=0)


def test_attention_reference_with_dropout_p_and_no_mask_drops_and_rescales():
    """No mask given: dropout is drawn, so the output changes, yet its mean over draws is the output without
    dropout (kept probabilities scaled by 1 / (1 - p)); p = 0 draws nothing."""
    cu = cu_seqlens_of([6, 5])
    q, k, v = qkv(11, seed=3)
    plain = reference.varlen_attention_ref(q, k, v, cu, 6)
    torch.testing.assert_close(reference.varlen_attention_ref(q, k, v, cu, 6, dropout_p=0.0), plain,
                               rtol=0, atol=0)
    # 2000 copies of the batch in one call: one independent draw each
    copies = 2000
    torch.manual_seed(0)
    draws = reference.varlen_attention_ref(q.repeat(copies, 1, 1), k.repeat(copies, 1, 1), v.repeat(copies, 1, 1),
                                           cu_seqlens_of([6, 5] * copies), 6, dropout_p=0.5).view(copies, *q.shape)
    assert not torch.equal(draws[0], plain)
    # each entry sums <= 6 terms v * prob * (2 or 0), v unit normal: the mean's sd is ~0.03, while a mean without
    # the 1 / (1 - p) would be plain / 2 (off by ~0.9 here)
    assert (draws.mean(0) - plain).abs().max().item() < 0.3


def test_attention_reference_ignores_other_samples_and_an_empty_sample_gives_finite_gradients():
    """Changing sample 3's rows leaves samples 0 and 2 as they were; the gradient through a batch with an empty
    sample is finite everywhere."""
    cu = cu_seqlens_of(LENS)
    q, k, v = qkv(int(cu[-1]), seed=4)
    out = reference.varlen_attention_ref(q, k, v, cu, 4)
    k2, v2 = k.clone(), v.clone()
    k2[3:], v2[3:] = 100.0, -7.0
    torch.testing.assert_close(reference.varlen_attention_ref(q, k2, v2, cu, 4)[:3], out[:3], rtol=0, atol=0)
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    grads = torch.autograd.grad(reference.varlen_attention_ref(*leaves, cu, 4).square().sum(), leaves)
    assert all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_attention_reference_returns_the_inputs_dtype(dtype):
    cu = cu_seqlens_of(LENS)
    q, k, v = qkv(int(cu[-1]), dtype=dtype, seed=5)
    out = reference.varlen_attention_ref(q, k, v, cu, 4)
    assert out.dtype == dtype
    check_against_bert(out, q, k, v, LENS, HEAD_DIM ** -0.5, tol=3e-2 if dtype != torch.float32 else 1e-5)


# ---------------------------------------------------------------------------------------------------------
# attention_probs_ref
# ---------------------------------------------------------------------------------------------------------


def bert_probs(q, k, scale):
    return torch.stack([torch.softmax(q[:, h].double() @ k[:, h].double().T * scale, -1) for h in range(HEADS)])


@pytest.mark.parametrize("dtype, want", [(torch.float64, torch.float64), (torch.float16, torch.float32),
                                         (torch.bfloat16, torch.float32)])
def test_attention_probs_are_per_sample_softmaxes_in_fp32_or_finer(dtype, want):
    """One (heads, L_b, L_b) map per sample (empty ones (heads, 0, 0)), with the default and a given scale; rows
    after cu_seqlens[-1] belong to no sample and are ignored; a sample longer than a 64-row tile is mapped whole."""
    lens = [*LENS, 0, 70]
    cu = cu_seqlens_of(lens)
    q, k, _ = qkv(int(cu[-1]) + 2, dtype=dtype, seed=6)  # two trailing rows
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for scale, kwargs in ((HEAD_DIM ** -0.5, {}), (0.7, {"softmax_scale": 0.7})):
        maps = reference.attention_probs_ref(q, k, cu, **kwargs)
        assert len(maps) == len(lens)
        for b, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            assert maps[b].dtype == want and maps[b].shape == (HEADS, hi - lo, hi - lo)
            torch.testing.assert_close(maps[b].double(), bert_probs(q[lo:hi], k[lo:hi], scale), rtol=0, atol=tol)


def test_attention_probs_stay_fp32_inside_a_bf16_autocast_region():
    cu = cu_seqlens_of([5, 3])
    q, k, _ = qkv(8, dtype=torch.float32, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = reference.attention_probs_ref(q * 3, k, cu)
    for b, (lo, hi) in enumerate([(0, 5), (5, 8)]):
        assert maps[b].dtype == torch.float32
        torch.testing.assert_close(maps[b].double(), bert_probs(q[lo:hi] * 3, k[lo:hi], HEAD_DIM ** -0.5),
                                   rtol=0, atol=2e-6)
