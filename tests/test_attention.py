"""Variable-length attention (kernels.attention): the triton kernels against the fp64 reference, dropout, errors,
backends, and the attention maps of the model.

On the CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1): fp32 and the
16-bit dtypes at small sizes. Tests marked gpu run on CUDA in fp32, fp16 and bf16 at UNITER's sizes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import cu_seqlens_of
from uniter_fast.kernels import attention, backend, reference

GRAPH_CAPTURE_CHECK = Path(__file__).with_name("graph_capture_check.py")

# lengths: empty samples, length 1, odd sizes, and one longer than a 64-row tile (several blocks)
LENS = [5, 0, 1, 17, 70, 3]


def packed(lens, heads=2, head_dim=16, *, dtype=torch.float64, device="cpu", seed=0):
    """q, k, v (total, heads, head_dim) and int32 cu_seqlens for samples of these lengths."""
    gen = torch.Generator().manual_seed(seed)
    cu = cu_seqlens_of(lens)
    q, k, v = (torch.randn(int(cu[-1]), heads, head_dim, generator=gen, dtype=torch.float64)
               .to(device=device, dtype=dtype) for _ in range(3))
    return q, k, v, cu.to(device)


def reference_and_grads(q, k, v, cu, grad, **kwargs):
    """The fp64 reference output and the gradients of (out * grad).sum() with respect to q, k, v."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference.varlen_attention_ref(q, k, v, cu, max(cu.diff().tolist()), **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad.double()))


def triton_and_grads(q, k, v, cu, grad, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention.varlen_attention(q, k, v, cu, max(cu.diff().tolist()), backend="triton", **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def test_reference_is_softmax_attention_within_each_sample():
    """The oracle itself, against softmax(q k^T * scale) v written per sample (empty and length-1 samples among them):
    the default scale is 1 / sqrt(head_dim), a given keep-mask's kept probabilities are scaled by 1 / (1 - p), and
    the gradients are finite."""
    lens, p = [5, 0, 1, 17, 3], 0.25
    q, k, v, cu = packed(lens, head_dim=8)
    mask = torch.rand(len(lens), 2, 17, 17, generator=torch.Generator().manual_seed(5)) >= p
    bounds = cu.tolist()
    for scale, kwargs in ((8 ** -0.5, {}), (0.37, {"softmax_scale": 0.37}),
                          (8 ** -0.5, {"dropout_p": p, "dropout_mask": mask})):
        out = reference.varlen_attention_ref(q, k, v, cu, 17, **kwargs)
        assert out.shape == q.shape
        for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            probs = (torch.einsum("qhd,khd->hqk", q[lo:hi], k[lo:hi]) * scale).softmax(-1)
            if "dropout_mask" in kwargs:
                probs = probs * mask[b, :, :hi - lo, :hi - lo] / (1 - p)
            torch.testing.assert_close(out[lo:hi], torch.einsum("hqk,khd->qhd", probs, v[lo:hi]), rtol=1e-12,
                                       atol=1e-12, msg=lambda m: f"{kwargs.keys()}, sample {b}: {m}")
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    for kwargs in ({}, {"dropout_p": p, "dropout_mask": mask}):  # the empty sample gives no NaN to the others
        grads = torch.autograd.grad(reference.varlen_attention_ref(*inputs, cu, 17, **kwargs).sum(), inputs)
        assert all(bool(torch.isfinite(g).all()) for g in grads), kwargs.keys()


@pytest.mark.parametrize("head_dim", [8, 16, 40, 64, 128])
def test_forward_and_gradients_match_the_fp64_reference(head_dim):
    q, k, v, cu = packed(LENS, head_dim=head_dim, dtype=torch.float32)
    grad = torch.randn_like(q)
    expected = reference_and_grads(q, k, v, cu, grad)
    got = triton_and_grads(q, k, v, cu, grad)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert g.dtype == torch.float32 and bool(torch.isfinite(g).all()), name
        torch.testing.assert_close(g.double(), e, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_strided_inputs_and_a_longer_max_seqlen():
    """q, k, v as slices of one fused projection, cu_seqlens a strided view, max_seqlen above the longest sample."""
    lens = [5, 0, 17, 70]
    total, heads, d = sum(lens), 2, 16
    qkv = torch.randn(total, 3, heads, d)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 5, 5, 22, 92], dtype=torch.int32)
    strided_cu = torch.stack([cu, cu * 7], 1)[:, 0]
    assert not q.is_contiguous() and not strided_cu.is_contiguous()
    grad = torch.randn(total, heads, d)
    expected = reference_and_grads(q, k, v, cu, grad)
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention.varlen_attention(qs, ks, vs, strided_cu, 100, backend="triton")
    got = (out, *torch.autograd.grad(out, (qs, ks, vs), grad))
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g.double(), e, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_one_qkv_tensor_gives_the_three_tensor_call_and_one_gradient(dropout_p):
    """varlen_attention_qkv: the output and q, k, v gradients of varlen_attention on qkv's views, its gradient one
    tensor like qkv (written by the backward kernel), with and without dropout, on the triton and torch backends."""
    q, k, v, cu = packed(LENS, dtype=torch.float32)
    qkv = torch.stack([q, k, v], 1).requires_grad_()
    grad = torch.randn_like(q)
    n = max(LENS)
    for backend_name in ("triton", "torch"):
        torch.manual_seed(3)
        out = attention.varlen_attention_qkv(qkv, cu, n, attention.AttentionOptions(dropout_p, backend=backend_name))
        (got,) = torch.autograd.grad(out, qkv, grad)
        views = qkv.detach().clone().unbind(1)
        views = tuple(t.requires_grad_() for t in views)
        torch.manual_seed(3)
        ref = attention.varlen_attention(*views, cu, n, dropout_p=dropout_p, backend=backend_name)
        expected = torch.stack(torch.autograd.grad(ref, views, grad), 1)
        torch.testing.assert_close(out, ref, atol=0, rtol=0, msg=lambda m: f"{backend_name} out: {m}")
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=lambda m: f"{backend_name} grad: {m}")
        assert got.shape == qkv.shape and bool(torch.isfinite(got).all())


def test_qkv_backward_writes_into_given_gradients_and_refuses_other_layouts():
    from uniter_fast.kernels import attention_triton

    q, k, v, cu = packed(LENS, dtype=torch.float32)
    qkv = torch.stack([q, k, v], 1)
    out, lse = attention_triton.forward(*qkv.unbind(1), cu, max(LENS), 0.25, 0.0, 0)
    grad_out = torch.randn_like(out)
    expected = attention_triton.backward(grad_out, q, k, v, out, lse, cu, max(LENS), 0.25, 0.0, 0)
    grads = torch.full_like(qkv, float("nan"))
    got = attention_triton.backward(grad_out, *qkv.unbind(1), out, lse, cu, max(LENS), 0.25, 0.0, 0,
                                    grads=grads.unbind(1))
    for g, e, view in zip(got, expected, grads.unbind(1)):
        assert g.data_ptr() == view.data_ptr()
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    assert bool(torch.isfinite(grads).all()), "every row of the gradient is written"
    with pytest.raises(ValueError, match="share one layout"):
        attention_triton.backward(grad_out, q, k, v, out, lse, cu, max(LENS), 0.25, 0.0, 0, grads=grads.unbind(1))
    with pytest.raises(ValueError, match=r"\(total, 3, heads, head_dim\)"):
        attention.varlen_attention_qkv(q, cu, max(LENS), attention.AttentionOptions(backend="triton"))


def test_rows_beyond_32_bit_offsets_are_refused():
    """The kernels address rows within a sample in 32 bits: a sample that could pass 2**31 elements is refused
    before any launch, naming max_seqlen."""
    base = torch.randn(4 * 4096)
    q = base.as_strided((4, 1, 64), (4096, 64, 1))  # rows 4096 elements apart, as in a wide fused projection
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen=524288 rows of stride 4096"):
        attention.varlen_attention(q, q, q, cu, 2**19, backend="triton")
    assert attention.varlen_attention(q, q, q, cu, 4, backend="triton").shape == q.shape


@pytest.mark.parametrize("launch", [(64, 32, 4, 2, False), (32, 32, 2, 1, True), (128, 128, 8, None, False)])
def test_every_launch_gives_the_same_result(launch):
    """benchmarks/tune_kernels.py sweeps tiles, warps, stages and where the backward's rowsum(O dO) is made: each
    must compute what the rule's launch does."""
    from uniter_fast.kernels import attention_triton as kernels

    q, k, v, cu = packed(LENS, dtype=torch.float32)
    grad, n, scale = torch.randn_like(q), max(LENS), 16 ** -0.5
    out, lse = kernels.forward(q, k, v, cu, n, scale, 0.0, 0)
    grads = kernels.backward(grad, q, k, v, out, lse, cu, n, scale, 0.0, 0)
    m, n_, warps, stages, fused = launch
    out2, lse2 = kernels.forward(q, k, v, cu, n, scale, 0.0, 0, kernels.Launch(m, n_, warps, stages))
    grads2 = kernels.backward(grad, q, k, v, out2, lse2, cu, n, scale, 0.0, 0,
                              kernels.Launch(m, m, warps, stages, fused_delta=fused))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (out2, lse2, *grads2)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda msg: f"{name}: {msg}")


def test_double_backward_is_refused_clearly():
    q, k, v, cu = packed([6, 3], dtype=torch.float32)
    q.requires_grad_()
    out = attention.varlen_attention(q, k, v, cu, 6, backend="triton")
    (dq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)  # its incoming gradient needs grad
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        dq.sum().backward()


def test_calls_without_gradients_skip_autograd_and_match():
    """Evaluation calls (no_grad, or inputs that need no gradient) run the kernels without autograd.Function: the
    same output as a training call, and no graph behind it; a training call keeps its graph."""
    q, k, v, cu = packed([6, 3, 0, 11], dtype=torch.float32)
    q.requires_grad_()
    trained = attention.varlen_attention(q, k, v, cu, 11, backend="triton")
    assert trained.grad_fn is not None
    with torch.no_grad():
        evaluated = attention.varlen_attention(q, k, v, cu, 11, backend="triton")
    plain = attention.varlen_attention(q.detach(), k, v, cu, 11, backend="triton")
    for out in (evaluated, plain):
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, trained.detach(), rtol=0, atol=0)


def test_softmax_scale_is_used():
    q, k, v, cu = packed([9, 4], dtype=torch.float32)
    grad = torch.randn_like(q)
    expected = reference_and_grads(q, k, v, cu, grad, softmax_scale=0.37)
    got = triton_and_grads(q, k, v, cu, grad, softmax_scale=0.37)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, atol=2e-5, rtol=1e-4)


def test_nothing_attends_across_samples():
    """Changing one sample's keys and values changes no other sample's output or gradients."""
    q, k, v, cu = packed([6, 9, 4], dtype=torch.float32)
    grad = torch.randn_like(q)
    before = triton_and_grads(q, k, v, cu, grad)
    k2, v2 = k.clone(), v.clone()
    k2[6:15] += 3.0
    v2[6:15] -= 2.0
    after = triton_and_grads(q, k2, v2, cu, grad)
    others = torch.cat([torch.arange(0, 6), torch.arange(15, 19)])
    for b, a in zip(before, after):
        torch.testing.assert_close(a[others], b[others], atol=0, rtol=0)


def test_gradients_reach_k_and_v_when_q_needs_none():
    """A call where only k or only v needs a gradient is a training call: it keeps autograd and gives the
    reference's gradient, not the evaluation shortcut's graph-less output."""
    q, k, v, cu = packed([6, 0, 11], dtype=torch.float32)
    grad = torch.randn_like(q)
    _, _, dk_ref, dv_ref = reference_and_grads(q, k, v, cu, grad)
    for wanted, expected in (("k", dk_ref), ("v", dv_ref)):
        inputs = {"q": q, "k": k, "v": v}
        inputs[wanted] = inputs[wanted].detach().requires_grad_()
        out = attention.varlen_attention(*inputs.values(), cu, 11, backend="triton")
        assert out.requires_grad, wanted
        (got,) = torch.autograd.grad(out, inputs[wanted], grad)
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"d{wanted}: {m}")


def test_inputs_and_gradients_with_strided_last_dims():
    """q, k, v whose head_dim is not the contiguous dim, and incoming gradients of any layout (out.sum()'s is an
    expanded tensor of stride 0): the reference's output and gradients."""
    lens = [5, 0, 17, 1]
    total, heads, d = sum(lens), 2, 16
    cu = packed(lens)[3]
    q, k, v = (torch.randn(total, d, heads).transpose(1, 2) for _ in range(3))  # stride(-1) == heads
    assert q.stride(-1) != 1
    transposed_grad = torch.randn(total, d, heads).transpose(1, 2)
    for grad in (transposed_grad, torch.ones(1, 1, 1).expand(total, heads, d)):
        expected = reference_and_grads(q, k, v, cu, grad)
        got = triton_and_grads(q, k, v, cu, grad)
        for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
            torch.testing.assert_close(g.double(), e, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    qs = q.detach().requires_grad_()
    attention.varlen_attention(qs, k, v, cu, 17, backend="triton").sum().backward()  # autograd's own expanded grad
    torch.testing.assert_close(qs.grad.double(), reference_and_grads(q, k, v, cu, torch.ones_like(q))[1],
                               atol=2e-5, rtol=1e-4)


def test_qkv_call_on_a_non_contiguous_projection():
    """varlen_attention_qkv on a qkv that is a slice of a wider tensor: the three-tensor call's output and
    gradients, the gradient shaped like qkv."""
    q, k, v, cu = packed([5, 0, 17, 1], dtype=torch.float32)
    wide = torch.cat([torch.stack([q, k, v], 1), torch.randn(q.shape[0], 3, q.shape[1], 8)], -1)
    qkv = wide[..., :q.shape[-1]].detach().requires_grad_()
    assert not qkv.is_contiguous() and qkv.stride(-1) == 1
    grad = torch.randn_like(q)
    out = attention.varlen_attention_qkv(qkv, cu, 17, attention.AttentionOptions(backend="triton"))
    (got,) = torch.autograd.grad(out, qkv, grad)
    expected = reference_and_grads(q, k, v, cu, grad)
    torch.testing.assert_close(out.double(), expected[0], atol=2e-5, rtol=1e-4)
    assert got.shape == qkv.shape
    torch.testing.assert_close(got.double(), torch.stack(expected[1:], 1), atol=2e-5, rtol=1e-4)


def test_softmax_scale_reaches_every_entry_point():
    """softmax_scale given through varlen_attention_qkv's options and the module (forward and from_qkv) is the one
    used, forward and backward; the module's attention maps are each sample's own, at that scale, and are the
    weights of its output."""
    scale, lens = 0.37, [5, 0, 17, 1]
    q, k, v, cu = packed(lens, dtype=torch.float32)
    grad = torch.randn_like(q)
    expected = reference_and_grads(q, k, v, cu, grad, softmax_scale=scale)
    options = attention.AttentionOptions(softmax_scale=scale, backend="triton")
    qkv = torch.stack([q, k, v], 1).requires_grad_()
    out = attention.varlen_attention_qkv(qkv, cu, 17, options)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    torch.testing.assert_close(out.double(), expected[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dqkv.double(), torch.stack(expected[1:], 1), atol=2e-5, rtol=1e-4)
    module = attention.VarlenAttention(options).eval()
    bounds = cu.tolist()
    for name, (out, maps) in (("forward", module(q, k, v, cu, 17, probs=True)),
                              ("from_qkv", module.from_qkv(qkv, cu, 17, probs=True))):
        torch.testing.assert_close(out.double(), expected[0], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        assert len(maps) == len(lens), name
        for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            scores = torch.einsum("qhd,khd->hqk", q[lo:hi].double(), k[lo:hi].double()) * scale
            torch.testing.assert_close(maps[b].double(), scores.softmax(-1), atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"{name} map {b}: {m}")
            torch.testing.assert_close(torch.einsum("hqk,khd->qhd", maps[b], v[lo:hi]), out[lo:hi].detach(),
                                       atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} map {b} against out: {m}")


def test_a_batch_without_rows():
    """Samples that are all empty, or none at all: empty outputs and gradients."""
    for lens in ([0, 0], []):
        q, k, v, cu = packed(lens, dtype=torch.float32)
        inputs = tuple(t.requires_grad_() for t in (q, k, v))
        out = attention.varlen_attention(*inputs, cu, 0, backend="triton")
        for g in (out, *torch.autograd.grad(out, inputs, torch.randn_like(q))):
            assert g.shape == (0, 2, 16) and g.dtype == torch.float32, lens


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_is_within_twice_the_reference_paths(dtype):
    """DESIGN.md's rule: the error against fp64 at most twice that of the torch path in the same dtype.

    Under the interpreter bf16 operands are upcast to fp32 (its bf16 dot gives NaN): real bf16 tensor-core
    products are checked by the gpu tests below."""
    q, k, v, cu = packed([23, 1, 40, 0, 9], heads=2, head_dim=32, dtype=dtype)
    grad = torch.randn_like(q)
    exact = reference_and_grads(q, k, v, cu, grad)
    ours = triton_and_grads(q, k, v, cu, grad)
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    torch_out = reference.varlen_attention_ref(qr, kr, vr, cu, 40)
    torch_path = (torch_out, *torch.autograd.grad(torch_out, (qr, kr, vr), grad))
    for name, o, t, e in zip(("out", "dq", "dk", "dv"), ours, torch_path, exact):
        assert o.dtype == dtype and bool(torch.isfinite(o).all()), name
        err, ref_err = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 2 * ref_err + 1e-3, f"{name}: error {err:.2e} against the torch path's {ref_err:.2e}"


# ---------------------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------------------


def test_dropout_gradients_match_the_reference_under_the_kernels_mask():
    from uniter_fast.kernels import attention_triton

    q, k, v, cu = packed(LENS, dtype=torch.float32)
    grad = torch.randn_like(q)
    p, seed = 0.3, 1234
    mask = attention_triton.dropout_keep_mask(cu, q.shape[1], max(LENS), p, seed)
    expected = reference_and_grads(q, k, v, cu, grad, dropout_p=p, dropout_mask=mask)
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention._VarlenAttention.apply(qs, ks, vs, cu, max(LENS), q.shape[-1] ** -0.5, p, seed)
    got = (out, *torch.autograd.grad(out, (qs, ks, vs), grad))
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g.double(), e, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_dropout_mask_statistics():
    """Keep rate 1 - p within 4 standard deviations; heads and samples draw independent masks."""
    from uniter_fast.kernels import attention_triton

    lens, p = [40, 40, 25], 0.25
    cu = torch.tensor([0, 40, 80, 105], dtype=torch.int32)
    mask = attention_triton.dropout_keep_mask(cu, 2, 40, p, seed=7)
    valid = sum(n * n for n in lens) * 2
    kept = int(mask.sum())
    sd = (valid * p * (1 - p)) ** 0.5
    assert abs(kept - valid * (1 - p)) < 4 * sd, (kept, valid)
    assert not bool(mask[2, :, 25:].any()) and not bool(mask[2, :, :, 25:].any())  # nothing beyond a length
    agree = (mask[0, 0] == mask[0, 1]).float().mean().item()  # independent: p^2 + (1-p)^2 = 0.625
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.05
    for step in range(1, 8):  # keys that share a Philox call (eight per call) are independent too
        adjacent = (mask[:2, :, :, :-step] == mask[:2, :, :, step:]).float().mean().item()
        assert abs(adjacent - (p * p + (1 - p) ** 2)) < 0.03, (step, adjacent)
    assert not torch.equal(mask[0], mask[1])


def test_every_sample_and_head_draws_its_own_dropout_mask():
    """Samples of one length: no two (sample, head) pairs share a mask (each keys its own Philox stream), and any
    two agree where independent draws would (p^2 + (1-p)^2 of the entries)."""
    from uniter_fast.kernels import attention_triton

    p, n = 0.25, 24
    cu = torch.arange(4, dtype=torch.int32) * n
    masks = attention_triton.dropout_keep_mask(cu, 3, n, p, seed=11).flatten(0, 1)  # 9 (sample, head) pairs
    for i in range(len(masks)):
        for j in range(i):
            agree = (masks[i] == masks[j]).float().mean().item()
            assert abs(agree - (p * p + (1 - p) ** 2)) < 0.12, (divmod(i, 3), divmod(j, 3), agree)


def test_dropout_seed_lives_on_the_device_and_bad_seeds_are_refused(monkeypatch):
    """The call draws its seed as one int64 tensor on the inputs' device (the kernels read it from memory); the
    launchers take such a tensor or an int, and refuse anything else by name."""
    from uniter_fast.kernels import attention_triton

    q, k, v, cu = packed([12, 7], dtype=torch.float32)
    seen = []
    launcher = attention_triton.forward
    monkeypatch.setattr(attention_triton, "forward", lambda *a, **kw: seen.append(a[7]) or launcher(*a, **kw))
    with torch.no_grad():
        attention.varlen_attention(q, k, v, cu, 12, dropout_p=0.3, backend="triton")
    (seed,) = seen
    assert isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.shape == (1,)
    assert seed.device == q.device
    as_int = launcher(q, k, v, cu, 12, 0.25, 0.3, int(seed))[0]
    torch.testing.assert_close(launcher(q, k, v, cu, 12, 0.25, 0.3, seed)[0], as_int, atol=0, rtol=0)
    for bad in (seed.int(), seed.repeat(2), None, 2**64, 0.5):
        with pytest.raises(ValueError, match="seed"):
            launcher(q, k, v, cu, 12, 0.25, 0.3, bad)


def test_dropout_is_reproducible_with_a_seed_and_unbiased():
    q, k, v, cu = packed([12, 7], dtype=torch.float32)
    run = lambda: attention.varlen_attention(q, k, v, cu, 12, dropout_p=0.5, backend="triton")  # noqa: E731
    torch.manual_seed(3)
    a = run()
    torch.manual_seed(3)
    b = run()
    c = run()
    assert torch.equal(a, b) and not torch.equal(a, c)
    # averaged over seeds, dropout with 1/(1-p) scaling leaves the output unchanged: our mean strays from the
    # output without dropout no further than the mean of as many draws of the torch path's dropout does
    plain = attention.varlen_attention(q, k, v, cu, 12, backend="triton")
    ours = torch.stack([run() for _ in range(60)]).mean(0)
    peers = torch.stack([reference.varlen_attention_ref(q, k, v, cu, 12, dropout_p=0.5) for _ in range(60)]).mean(0)
    stray, peer_stray = ((m - plain).abs().mean().item() for m in (ours, peers))
    assert stray < 1.5 * peer_stray, (stray, peer_stray)


# ---------------------------------------------------------------------------------------------------------
# arguments and backends
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "k": a["k"][:-1]}, "share one"),
    (lambda a: {**a, "v": a["v"].double()}, "floating dtype"),
    (lambda a: {**a, "cu_seqlens": a["cu_seqlens"].float()}, "cu_seqlens"),
    (lambda a: {**a, "cu_seqlens": torch.tensor([0, 5], dtype=torch.int32)}, "total_tokens=12"),
    (lambda a: {**a, "max_seqlen": 6}, "max_seqlen=6 is below the longest sample (7 tokens, sample 1)"),
    (lambda a: {**a, "max_seqlen": 7.0}, "max_seqlen"),
    (lambda a: {**a, "dropout_p": 1.0}, "dropout_p"),
    (lambda a: {**a, "softmax_scale": -1.0}, "softmax_scale"),
    (lambda a: {**a, "softmax_scale": float("inf")}, "softmax_scale"),
    (lambda a: {**a, "softmax_scale": 0.0}, "softmax_scale"),
    (lambda a: {**a, "dropout_p": -0.1}, "dropout_p"),
    (lambda a: {**a, "dropout_p": float("nan")}, "dropout_p"),
    (lambda a: {**a, "max_seqlen": -1}, "max_seqlen"),
    (lambda a: {**a, "max_seqlen": True}, "max_seqlen"),
    (lambda a: {**a, "cu_seqlens": torch.tensor([0, 9, 7, 12], dtype=torch.int32)}, "rise from 0"),  # falls
    (lambda a: {**a, "cu_seqlens": torch.tensor([2, 5, 12], dtype=torch.int32)}, "rise from 0"),  # not from 0
    (lambda a: {**a, "cu_seqlens": torch.tensor([[0, 5, 12]], dtype=torch.int32)}, "cu_seqlens"),
])
def test_bad_arguments_name_themselves(change, message):
    q, k, v, cu = packed([5, 7], dtype=torch.float32)
    args = change(dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=7, dropout_p=0.0, softmax_scale=None))
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        attention.varlen_attention(**args, backend="triton")


@pytest.mark.parametrize("choice", ["torch", "triton"])
def test_malformed_offsets_and_qkv_layouts_are_refused(choice):
    """cu_seqlens on another device than q or with no entry at all, and a qkv that is not (total, 3, heads, head_dim),
    are refused by name on every backend."""
    q, k, v, cu = packed([5, 7], dtype=torch.float32)
    with pytest.raises(ValueError, match="q, k, v and cu_seqlens must be on one device"):
        attention.varlen_attention(q, k, v, cu.to("meta"), 7, backend=choice)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32/int64 tensor of batch\\+1 offsets"):
        attention.varlen_attention(q, k, v, cu[:0], 7, backend=choice)
    options = attention.AttentionOptions(backend=choice)
    for qkv in (torch.stack([q, k, v, v], 1), torch.stack([q, k], 1), torch.stack([q, k, v], 1).flatten(2)):
        with pytest.raises(ValueError, match=r"qkv must be \(total, 3, heads, head_dim\)"):
            attention.varlen_attention_qkv(qkv, cu, 7, options)


def test_attention_maps_of_half_inputs_are_fp32():
    """The maps are computed in fp32 whatever the inputs: fp16 q, k give the fp64 softmax of their values to fp32
    rounding (an fp16 softmax is off by ~1e-4)."""
    lens = [9, 0, 14]
    q, k, _, cu = packed(lens, dtype=torch.float16, seed=3)
    maps = reference.attention_probs_ref(q * 4, k, cu)
    bounds = cu.tolist()
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        assert maps[b].dtype == torch.float32 and maps[b].shape == (2, lens[b], lens[b])
        scores = torch.einsum("qhd,khd->hqk", (q[lo:hi] * 4).double(), k[lo:hi].double()) / 16 ** 0.5
        torch.testing.assert_close(maps[b].double(), scores.softmax(-1), rtol=0, atol=2e-6)


def test_backend_choice_and_refusals():
    q, k, v, cu = packed([5, 7], head_dim=200, dtype=torch.float32)
    with pytest.raises(backend.BackendUnavailable, match="head_dim 200"):
        attention.varlen_attention(q, k, v, cu, 7, backend="triton")
    out = attention.varlen_attention(q, k, v, cu, 7, backend="auto")  # falls back to the reference
    torch.testing.assert_close(out, reference.varlen_attention_ref(q, k, v, cu, 7))
    with pytest.raises(backend.BackendUnavailable, match="xformers"):  # no CUDA here, or no xformers
        attention.varlen_attention(q, k, v, cu, 7, backend="xformers")
    # "xformers" names attention's backend: the other ops choose automatically
    assert backend.explain("ipot", "xformers", torch.device("cpu"), None)[0] == "torch"


def test_xformers_that_imports_but_has_no_operator_is_refused_clearly(monkeypatch):
    """The device machine's case: xformers imports, but its operators were built for another torch."""
    from uniter_fast.kernels import attention_xformers

    def no_operator(*args, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n ...")

    monkeypatch.setattr(attention_xformers, "unavailable", lambda q: None)
    monkeypatch.setattr(attention_xformers, "varlen_attention", no_operator)
    q, k, v, cu = packed([5, 7], dtype=torch.float32)
    with pytest.raises(backend.BackendUnavailable, match="xformers backend cannot serve this call: No operator") as err:
        attention.varlen_attention(q, k, v, cu, 7, backend="xformers")
    assert isinstance(err.value.__cause__, NotImplementedError)
    with pytest.raises(backend.BackendUnavailable, match="deterministic=True"):
        attention.varlen_attention(q, k, v, cu, 7, backend="xformers", deterministic=True)


def test_module_applies_dropout_only_in_training():
    q, k, v, cu = packed([12, 7], dtype=torch.float32)
    module = attention.VarlenAttention(attention.AttentionOptions(dropout_p=0.5, backend="triton"))
    module.eval()
    torch.testing.assert_close(module(q, k, v, cu, 12), attention.varlen_attention(q, k, v, cu, 12, backend="triton"))
    module.train()
    assert not torch.equal(module(q, k, v, cu, 12), module.eval()(q, k, v, cu, 12))


def test_module_from_qkv_applies_dropout_only_in_training():
    q, k, v, cu = packed([12, 7], dtype=torch.float32)
    qkv = torch.stack([q, k, v], 1)
    module = attention.VarlenAttention(attention.AttentionOptions(dropout_p=0.5, backend="triton")).eval()
    plain = attention.varlen_attention(q, k, v, cu, 12, backend="triton")
    torch.testing.assert_close(module.from_qkv(qkv, cu, 12), plain, atol=0, rtol=0)
    assert module.options.dropout_p == 0.5  # eval leaves the options as they were
    module.train()
    assert not torch.equal(module.from_qkv(qkv, cu, 12), plain)


def test_xformers_backend_passes_mask_scale_and_dropout(monkeypatch):
    """The xformers wrapper, with memory_efficient_attention replaced by exact attention under the bias it is
    given: the block-diagonal mask of the packed samples (an empty one among them), the scale and dropout_p as
    called (the module's eval gives 0, its deterministic=True refuses)."""
    from uniter_fast.kernels import attention_xformers

    if attention_xformers._import_error() is not None:
        pytest.skip(attention_xformers._import_error())
    import xformers.ops as xops

    calls = []

    def exact(query, key, value, attn_bias=None, p=0.0, scale=None):
        calls.append((p, scale))
        bias = attn_bias.materialize((query.shape[1], key.shape[1]), dtype=query.dtype)
        scores = torch.einsum("bqhd,bkhd->bhqk", query, key) * scale + bias
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), value)

    monkeypatch.setattr(attention_xformers, "unavailable", lambda q: None)
    monkeypatch.setattr(xops, "memory_efficient_attention", exact)
    q, k, v, cu = packed([5, 0, 17, 1], dtype=torch.float32)
    for scale, p in ((None, 0.0), (0.37, 0.2)):
        out = attention.varlen_attention(q, k, v, cu, 17, softmax_scale=scale, dropout_p=p, backend="xformers")
        assert calls.pop() == (p, pytest.approx(scale or 16 ** -0.5))
        torch.testing.assert_close(out, reference.varlen_attention_ref(q, k, v, cu, 17, softmax_scale=scale),
                                   atol=1e-5, rtol=1e-4)
    options = attention.AttentionOptions(dropout_p=0.2, backend="xformers")
    attention.VarlenAttention(options).eval()(q, k, v, cu, 17)
    assert calls.pop() == (0.0, pytest.approx(16 ** -0.5))
    with pytest.raises(backend.BackendUnavailable, match="deterministic=True"):
        attention.VarlenAttention(replace(options, deterministic=True))(q, k, v, cu, 17)
    assert not calls


# ---------------------------------------------------------------------------------------------------------
# the encoder and attention maps
# ---------------------------------------------------------------------------------------------------------


def test_trunk_on_the_triton_backend_matches_the_reference():
    from helpers import random_batch, tiny_config
    from uniter_fast.model import UniterModel

    batch, _, _ = random_batch(5, seed=3)
    torch.manual_seed(0)
    ref_model = UniterModel(tiny_config(backend="torch"))
    fast_model = UniterModel(tiny_config(backend="triton"))
    fast_model.load_state_dict(ref_model.state_dict())
    grad = torch.randn(int(batch.cu_seqlens[-1]), ref_model.config.hidden_size)  # pow(2) would give about 0
    outs = []
    for model in (ref_model, fast_model):
        hidden = model(batch)
        hidden.backward(grad)
        outs.append((hidden, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-4)
    for g_fast, g_ref in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-4, rtol=1e-3)


def test_attention_maps_per_sample(tmp_path):
    from helpers import random_batch, tiny_config
    from uniter_fast.model import UniterModel
    from uniter_fast.viz.attention import attention_maps, plot_attention

    batch, texts, regions = random_batch(4, seed=5)
    model = UniterModel(tiny_config(backend="triton"))
    hidden, maps = model(batch, output_attentions=True)
    torch.testing.assert_close(hidden, model(batch))  # asking for maps does not change the result
    lens = batch.cu_seqlens.diff().tolist()
    assert len(maps) == model.config.num_hidden_layers and all(len(layer) == 4 for layer in maps)
    samples = attention_maps(model, batch)
    for b, sample in enumerate(samples):
        assert sample.probs.shape == (2, 4, lens[b], lens[b]) and sample.text_len == len(texts[b])
        torch.testing.assert_close(sample.probs.sum(-1), torch.ones(2, 4, lens[b]))
    # the maps are the model's: recompute layer 0 of sample 0 from its query and key projections
    x = model.embed(batch)
    attn = model.encoder.layer[0].attention.self
    lo, hi = 0, lens[0]
    q, k, _ = attn.projections(x)[lo:hi].unbind(1)
    expected = (torch.einsum("qhd,khd->hqk", q, k) / attn.head_dim ** 0.5).softmax(-1)
    torch.testing.assert_close(samples[0].probs[0], expected.detach())
    plot_attention(samples[0], tmp_path / "map.png", layer=0)
    assert (tmp_path / "map.png").stat().st_size > 1000


def test_attention_maps_of_every_layer_and_sample():
    """maps[layer][sample] is that layer's softmax(q k^T / sqrt(d)) over that sample's own rows, q and k projected
    from the layer's own input (captured by a hook)."""
    from helpers import random_batch, tiny_config
    from uniter_fast.model import UniterModel

    batch, _, _ = random_batch(4, seed=6)
    model = UniterModel(tiny_config(backend="triton", num_hidden_layers=3)).eval()
    inputs = []
    for layer in model.encoder.layer:
        layer.attention.self.register_forward_pre_hook(lambda module, args: inputs.append((module, args[0])))
    with torch.no_grad():
        _, maps = model(batch, output_attentions=True)
    assert len(maps) == len(inputs) == 3
    bounds = batch.cu_seqlens.tolist()
    for i, (layer_maps, (attn, x)) in enumerate(zip(maps, inputs)):
        with torch.no_grad():
            q, k, _ = attn.projections(x).unbind(1)
        for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            expected = (torch.einsum("qhd,khd->hqk", q[lo:hi], k[lo:hi]) / attn.head_dim ** 0.5).softmax(-1)
            torch.testing.assert_close(layer_maps[b], expected, msg=lambda m: f"layer {i} sample {b}: {m}")


# ---------------------------------------------------------------------------------------------------------
# convergence
# ---------------------------------------------------------------------------------------------------------


def _mlm_curve(backend_name: str, steps: int, attention_dropout: float = 0.0) -> list[float]:
    """Per-update MLM losses of a 1-layer UNITER trained from scratch on the synthetic world, 4 captions a batch."""
    import numpy as np

    from uniter_fast.config import UniterConfig
    from uniter_fast.data.pretrain import MaskingOptions, make_task_batch
    from uniter_fast.data.synthetic import WorldConfig
    from uniter_fast.model import UniterForPretraining
    from uniter_fast.train.config import DataOptions, PretrainConfig
    from uniter_fast.train.loop import build_synthetic_data

    world = WorldConfig(num_train_images=200, num_val_images=1, captions_per_image=2, num_classes=4, max_objects=1,
                        min_regions=3, max_regions=6)
    data = build_synthetic_data(PretrainConfig(data=DataOptions(world=world, vocab_size=120)))
    torch.manual_seed(0)
    config = UniterConfig.tiny(vocab_size=data.tokenizer.vocab_size, hidden_size=64, num_attention_heads=1,
                               num_hidden_layers=1, intermediate_size=128, backend=backend_name,
                               attention_probs_dropout_prob=attention_dropout)
    model = UniterForPretraining(config, itm_ot_lambda=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    losses = []
    for step in range(steps):
        picks = rng.integers(len(data.train), size=4).tolist()
        out = model(make_task_batch(data.train, "mlm", picks, np.random.default_rng(step), MaskingOptions()))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.slow
def test_training_with_the_triton_backend_follows_the_reference_curve():
    """DESIGN.md's convergence test: 200 updates on each path give the same loss curve, and the curve falls.

    One head keeps the interpreter's time down (about 40 s on 2 cores); the kernels' head count is covered above."""
    steps = 200
    ref, fast = _mlm_curve("torch", steps), _mlm_curve("triton", steps)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), atol=1e-3, rtol=0)  # measured: 4e-6
    ref_avg = torch.tensor(ref).unfold(0, 20, 20).mean(1)
    assert ref_avg[-1] < 0.7 * ref_avg[0], f"the loss did not fall: {ref_avg.tolist()}"


@pytest.mark.slow
def test_training_with_attention_dropout_in_the_kernel_follows_the_reference():
    """With attention dropout the two paths draw different masks: the curves agree in their averages."""
    steps = 100
    ref, fast = (torch.tensor(_mlm_curve(b, steps, attention_dropout=0.2)) for b in ("torch", "triton"))
    no_dropout = torch.tensor(_mlm_curve("triton", 3))
    assert not torch.equal(fast[:3], no_dropout)  # the kernel's dropout ran in training
    ref_avg, fast_avg = ref.unfold(0, 25, 25).mean(1), fast.unfold(0, 25, 25).mean(1)
    torch.testing.assert_close(fast_avg, ref_avg, atol=0.05, rtol=0)  # measured: within 0.011
    assert fast_avg[-1] < 0.8 * fast_avg[0], f"the loss did not fall: {fast_avg.tolist()}"


# ---------------------------------------------------------------------------------------------------------
# torch.compile: the kernels as custom ops, the code around them traced in one graph
# ---------------------------------------------------------------------------------------------------------


def _compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True)  # fullgraph: a graph break fails the test


def _attend_and_grads(fn, q, k, v, cu, grad, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, cu, max(cu.diff().tolist()), **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def _triton_attention(q, k, v, cu, max_seqlen, dropout_p=0.0):
    return attention.varlen_attention(q, k, v, cu, max_seqlen, dropout_p=dropout_p, backend="triton")


def test_compiled_attention_equals_eager_in_one_graph_across_batch_shapes():
    compiled = _compiled(_triton_attention)
    torch._dynamo.utils.counters.clear()
    for lens, seed in ((LENS, 0), ([9, 2, 30], 1), ([4, 4, 0, 12, 1], 2)):  # new totals and max_seqlen: no break
        q, k, v, cu = packed(lens, dtype=torch.float32, seed=seed)
        grad = torch.randn_like(q)
        for ours, eager in zip(_attend_and_grads(compiled, q, k, v, cu, grad),
                               _attend_and_grads(_triton_attention, q, k, v, cu, grad)):
            torch.testing.assert_close(ours, eager, atol=1e-6, rtol=1e-5)
    # the first batch's static graph, then one with dynamic sizes for every later batch (not one per batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_compiled_attention_draws_its_dropout_like_eager():
    """The seed is drawn in the graph from torch's generator: under aot_eager the same manual_seed gives eager's
    masks (inductor draws it with its own generator: reproducible under manual_seed, not eager's draw)."""
    compiled = _compiled(_triton_attention)
    q, k, v, cu = packed([12, 7, 1], dtype=torch.float32)
    grad = torch.randn_like(q)
    torch.manual_seed(4)
    ours = _attend_and_grads(compiled, q, k, v, cu, grad, dropout_p=0.3)
    torch.manual_seed(4)
    eager = _attend_and_grads(_triton_attention, q, k, v, cu, grad, dropout_p=0.3)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(ours[0], _attend_and_grads(compiled, q, k, v, cu, grad, dropout_p=0.3)[0])  # new seed


def test_compiled_attention_uses_the_softmax_scale_given():
    compiled = _compiled(lambda q, k, v, cu, n: attention.varlen_attention(q, k, v, cu, n, softmax_scale=0.37,
                                                                            backend="triton"))
    q, k, v, cu = packed([6, 0, 9], dtype=torch.float32)
    grad = torch.randn_like(q)
    expected = reference_and_grads(q, k, v, cu, grad, softmax_scale=0.37)
    for name, g, e in zip(("out", "dq", "dk", "dv"), _attend_and_grads(compiled, q, k, v, cu, grad), expected):
        torch.testing.assert_close(g.double(), e, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_custom_ops_keep_their_contract():
    """torch.library.opcheck: schema, fake tensors (shapes and strides, a transposed q too), autograd registration
    and AOT dispatch of the ops a compiled graph calls."""
    q, k, v, cu = packed([6, 0, 3], dtype=torch.float32)
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)  # dense, not row-major
    seed = torch.tensor(5, dtype=torch.int64)
    for q_in, p in ((q, 0.0), (q_t, 0.0), (q, 0.3)):
        args = tuple(t.detach().requires_grad_() for t in (q_in, k, v)) + (cu, seed, 6, 0.25, p)
        torch.library.opcheck(attention._attention_op, args)
        out, lse = attention._attention_op(*args)
        backward_args = (torch.randn_like(out), *(t.detach() for t in args[:3]), out.detach(), lse.detach(), cu,
                         seed, 6, 0.25, p)
        torch.library.opcheck(attention._attention_backward_op, backward_args)


def test_custom_ops_keep_their_contract_in_fp16():
    """The fakes in a 16-bit dtype: out in q's dtype, lse in fp32, as the kernels give them."""
    q, k, v, cu = packed([6, 0, 3], dtype=torch.float16)
    seed = torch.tensor(5, dtype=torch.int64)
    args = tuple(t.requires_grad_() for t in (q, k, v)) + (cu, seed, 6, 0.25, 0.0)
    torch.library.opcheck(attention._attention_op, args, test_utils=("test_schema", "test_faketensor"))
    out, lse = attention._attention_op(*args)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    backward_args = (torch.randn_like(out), *(t.detach() for t in args[:3]), out.detach(), lse.detach(), cu, seed,
                     6, 0.25, 0.0)
    torch.library.opcheck(attention._attention_backward_op, backward_args, test_utils=("test_schema",
                                                                                       "test_faketensor"))


def test_compiled_attention_refuses_bad_offsets_naming_them():
    compiled = _compiled(_triton_attention)
    q, k, v, cu = packed([5, 3], dtype=torch.float32)
    compiled(q, k, v, cu, 5)
    with pytest.raises(ValueError, match="max_seqlen=4 is below the longest sample"):
        compiled(q, k, v, cu, 4)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        compiled(q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32), 5)  # 7 rows of 8


def test_compiled_encoder_equals_eager_in_one_graph():
    from helpers import random_batch, tiny_config
    from uniter_fast.model import UniterModel

    batch, _, _ = random_batch(5, seed=3)
    model = UniterModel(tiny_config(backend="triton")).eval()  # eval: nn.Dropout draws differ once compiled
    hidden = model.embed(batch).detach()
    grad = torch.randn_like(hidden)  # not out.pow(2): the last LayerNorm makes its gradient about 0
    compiled = _compiled(model.encoder)
    results = []
    for encoder in (compiled, model.encoder):
        x = hidden.clone().requires_grad_()
        out = encoder(x, batch.cu_seqlens, batch.max_seqlen)
        out.backward(grad)
        results.append((out, x.grad, model.encoder.layer[0].attention.self.qkv.weight.grad.clone()))
        model.zero_grad()
    for ours, eager in zip(*results):
        torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# CUDA: UNITER's shapes, the 16-bit dtypes, no host sync
# ---------------------------------------------------------------------------------------------------------


def uniter_lens(batch: int, seed: int = 0) -> list[int]:
    """Text 8..60 plus regions 10..100 per sample (reference/anchors.md), and a few empty and length-1 samples."""
    gen = torch.Generator().manual_seed(seed)
    lens = (torch.randint(8, 61, (batch,), generator=gen) + torch.randint(10, 101, (batch,), generator=gen)).tolist()
    return [0, 1] + lens[2:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, head_dim", [(12, 64), (16, 64), (4, 32), (2, 128)])
def test_cuda_matches_the_reference_at_uniter_shapes(dtype, heads, head_dim):
    q, k, v, cu = packed(uniter_lens(32), heads=heads, head_dim=head_dim, dtype=dtype, device="cuda")
    grad = torch.randn_like(q)
    exact = reference_and_grads(q, k, v, cu, grad)
    ours = triton_and_grads(q, k, v, cu, grad)
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    torch_out = reference.varlen_attention_ref(qr, kr, vr, cu, max(cu.diff().tolist()))
    torch_path = (torch_out, *torch.autograd.grad(torch_out, (qr, kr, vr), grad))
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    for name, o, t, e in zip(("out", "dq", "dk", "dv"), ours, torch_path, exact):
        assert o.dtype == dtype and bool(torch.isfinite(o).all()), name
        err, ref_err = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.2e} against the torch path's {ref_err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_dropout_matches_the_reference_under_the_kernels_mask(dtype):
    from uniter_fast.kernels import attention_triton

    lens = uniter_lens(16, seed=1)
    q, k, v, cu = packed(lens, heads=12, head_dim=64, dtype=dtype, device="cuda")
    grad = torch.randn_like(q)
    p, seed = 0.1, 99
    mask = attention_triton.dropout_keep_mask(cu, 12, max(lens), p, seed)
    exact = reference_and_grads(q, k, v, cu, grad, dropout_p=p, dropout_mask=mask)
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention._VarlenAttention.apply(qs, ks, vs, cu, max(lens), 64 ** -0.5, p, seed)
    ours = (out, *torch.autograd.grad(out, (qs, ks, vs), grad))
    for name, o, e in zip(("out", "dq", "dk", "dv"), ours, exact):
        rel = ((o.double() - e).norm() / e.norm()).item()
        assert rel < 2e-2, f"{name}: relative error {rel:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cuda_fused_delta_backward_matches_the_rule(dropout_p):
    """Launch(fused_delta=True), swept by tune_kernels: the backward that sums O * dO itself gives the gradients of
    the two-launch rule, up to the order of that fp32 sum."""
    from uniter_fast.kernels import attention_triton as kernels

    lens = uniter_lens(32, seed=3)
    q, k, v, cu = packed(lens, heads=12, head_dim=64, dtype=torch.bfloat16, device="cuda")
    grad, n, scale = torch.randn_like(q), max(lens), 64 ** -0.5
    out, lse = kernels.forward(q, k, v, cu, n, scale, dropout_p, 7)
    rule = kernels.backward(grad, q, k, v, out, lse, cu, n, scale, dropout_p, 7)
    launch = kernels.backward_launch(n, 64, q.dtype)
    fused = kernels.backward(grad, q, k, v, out, lse, cu, n, scale, dropout_p, 7,
                             kernels.Launch(launch.block_m, launch.block_n, launch.num_warps, launch.num_stages,
                                            fused_delta=True))
    for name, a, b in zip(("dq", "dk", "dv"), rule, fused):
        torch.testing.assert_close(b.float(), a.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
def test_cuda_graph_replays_draw_fresh_dropout_masks():
    """The seed is drawn on the device inside the captured call, so each replay of a CUDA graph draws anew."""
    lens = uniter_lens(8, seed=6)
    q, k, v, cu = packed(lens, heads=12, head_dim=64, dtype=torch.bfloat16, device="cuda")
    run = lambda: attention.varlen_attention(q, k, v, cu, max(lens), dropout_p=0.1, backend="triton")  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        run()  # compiled and loaded before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = run()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert bool(torch.isfinite(out.float()).all()) and not torch.equal(first, out)
    with torch.no_grad():
        plain = attention.varlen_attention(q, k, v, cu, max(lens), backend="triton")
    assert not torch.equal(first, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["three_tensors", "qkv"])
@pytest.mark.parametrize("mode", ["global", "thread_local"])
def test_cuda_graph_captures_the_autograd_call(mode, layout):
    """A training call (autograd.Function forward and backward, as an eager encoder makes it) captured in a CUDA
    graph: its replay gives the eager call's output and gradients, bit for bit (tests/graph_capture_check.py, in a
    process of its own: a failed capture would break the next tests of this one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(GRAPH_CAPTURE_CHECK), mode, layout], env=env, capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith(f"ok: {mode} {layout}"), done.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cuda_qkv_call_equals_the_three_tensor_call(dropout_p):
    """varlen_attention_qkv at UNITER-base shapes in bf16: the same kernels on qkv's strided views, so the same
    output and gradients as the call on contiguous q, k, v, bit for bit."""
    lens = uniter_lens(32, seed=4)
    q, k, v, cu = packed(lens, heads=12, head_dim=64, dtype=torch.bfloat16, device="cuda")
    grad, n = torch.randn_like(q), max(lens)
    qkv = torch.stack([q, k, v], 1).requires_grad_()
    torch.manual_seed(5)
    out = attention.varlen_attention_qkv(qkv, cu, n, attention.AttentionOptions(dropout_p, backend="triton"))
    (got,) = torch.autograd.grad(out, qkv, grad)
    views = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(5)
    ref = attention.varlen_attention(*views, cu, n, dropout_p=dropout_p, backend="triton")
    expected = torch.stack(torch.autograd.grad(ref, views, grad), 1)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.gpu
def test_cuda_call_path_never_syncs_with_the_host():
    lens = uniter_lens(16, seed=2)
    q, k, v, cu = packed(lens, heads=12, head_dim=64, dtype=torch.bfloat16, device="cuda")
    for t in (q, k, v):
        t.requires_grad_()
    attention.varlen_attention(q, k, v, cu, max(lens), dropout_p=0.1).sum().backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attention.varlen_attention(q, k, v, cu, max(lens), dropout_p=0.1)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_xformers_backend_runs_or_says_why():
    q, k, v, cu = packed([30, 0, 7, 90], heads=12, head_dim=64, dtype=torch.float16, device="cuda")
    try:
        out = attention.varlen_attention(q, k, v, cu, 90, backend="xformers")
    except backend.BackendUnavailable as err:  # the device's xformers was built for another torch
        assert "xformers" in str(err) and len(str(err)) > 60, str(err)
        print(f"xformers backend unavailable here: {err}")
        return
    torch.testing.assert_close(out, reference.varlen_attention_ref(q, k, v, cu, 90), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_cuda_compiled_encoder_matches_eager_in_bf16():
    """Inductor on CUDA: the compiled encoder (fused elementwise passes, our kernels as custom ops) in one graph
    equals eager, forward and gradient."""
    from uniter_fast.config import UniterConfig
    from uniter_fast.model.encoder import Encoder

    lens = uniter_lens(16, seed=3)
    config = UniterConfig.base(num_hidden_layers=1, backend="triton")  # one layer: the compile is most of the time
    encoder = Encoder(config).cuda().eval()
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.cuda()
    x = torch.randn(int(cu[-1]), config.hidden_size, device="cuda")
    grad = torch.randn_like(x)
    compiled = _compiled(encoder, backend="inductor")
    outs = []
    for fn in (compiled, encoder):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(xi, cu, max(lens))
        out.backward(grad.to(out.dtype))
        outs.append((out.float(), xi.grad))
    for name, ours, eager in zip(("out", "grad"), *outs):
        rel = ((ours - eager).norm() / eager.norm()).item()
        assert rel < 2e-2, f"{name}: compiled against eager, relative difference {rel:.2e}"
    # training mode (dropout in the graph and in our kernel) compiles again: bench_layer's ours_compile and
    # gpu_check's compiled pre-training run cover it
