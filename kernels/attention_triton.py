"""Triton kernels for variable-length bidirectional attention over packed samples, and their launchers.

Layout: q, k, v, out are (total, heads, head_dim) with the last dim contiguous (head_dim <= 128, padded on chip to
a power of two >= 16); sample b owns rows cu_seqlens[b] .. cu_seqlens[b+1]. The grid is (query or key blocks of
the longest sample, samples, heads); a program past its sample's length returns at once, so nothing is computed
on padding and nothing crosses samples.
- Forward: FlashAttention-2's online softmax in base 2; saves only the log-sum-exp (base 2, fp32, (total, heads)).
- Backward: one program per (block, sample, head) computes dK and dV of its key block (looping over the query
  blocks), then dQ of its query block (looping over the key blocks): no atomics, so it is deterministic. Its
  rowsum(O dO) comes from a launch before it, or (Launch.fused_delta) from O beside each dO it reads.
- Dropout: Philox (tl.randint4x) keyed by seed + b * heads + h, counter i * ceil(max_seqlen / 8) + j // 8 for
  query i and keys j of the sample, a 16-bit draw per key: the backward and `dropout_keep_mask` regenerate the
  forward's mask exactly. The seed is read from an int64 in device memory, drawn there by the caller, so a call
  replayed from a CUDA graph draws a fresh mask.
Nothing here validates arguments or synchronises with the host: kernels/attention.py does the former. The
launchers work their launch rules out once per shape and launch through kernels/launch.py (host time).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .backend import cdiv, interpreting, next_pow2
from .launch import launch as launch_kernel

MAX_HEAD_DIM = 128  # padded to a power of two >= 16 (tl.dot's smallest); beyond 128 the tiles spill
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634


@triton.jit
def _seed(SEED, DROPOUT: tl.constexpr):
    """The call's Philox seed, read from device memory (one int64), so that a CUDA graph's replays draw afresh;
    unread without dropout."""
    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    return seed


@triton.jit
def _keep(seed, b, h, heads, offs_m, offs_n, max_seqlen, drop_threshold):
    """The dropout keep-mask of query rows offs_m x key columns offs_n of (sample b, head h); offs_n runs from a
    multiple of 8. One Philox call (tl.randint4x) gives four 32-bit words, eight 16-bit draws: the draws of 8
    adjacent keys. A key is kept when its draw is at least drop_threshold = round(p * 2**16) (_dropout_args).
    Instructions per key block on sm_90 against no dropout (cuobjdump, RESULTS.md): a Philox call per entry
    (tl.rand) 4.5x in the forward and 5.6x in the backward, four entries per call (tl.rand4x) 2.8x and 3.2x,
    these eight 2.2x and 2.7x."""
    BM: tl.constexpr = offs_m.shape[0]
    BN: tl.constexpr = offs_n.shape[0]
    group = tl.max(tl.reshape(offs_n, (BN // 8, 8)), axis=1) // 8  # key j draws with group j // 8
    counter = offs_m[:, None] * ((max_seqlen + 7) // 8) + group[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed + b * heads + h, counter)  # (BM, BN // 8) each
    # the 8 draws of a group in a fixed order, the same in every kernel
    halves = tl.join(tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16)),
                     tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16)))
    return tl.reshape(halves, (BM, BN)).to(tl.int32) >= drop_threshold


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, stride_qt, stride_kt, stride_vt, stride_ot, stride_lt,
                stride_qh, stride_kh, stride_vh, stride_oh, heads, max_seqlen, scale_log2, drop_threshold, keep_scale,
                SEED,
                head_dim, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(CU + b).to(tl.int64)
    length = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
    if pid_m * BLOCK_M >= length:
        return
    seed = _seed(SEED, DROPOUT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dcol = offs_d[None, :]
    dmask = dcol < head_dim  # columns beyond head_dim read as 0 and are never stored
    # the sample's first row in 64 bits once; rows within it in 32 (the launcher checks they fit)
    q_head = Q + start * stride_qt + h * stride_qh + dcol
    k_head = K + start * stride_kt + h * stride_kh + dcol
    v_head = V + start * stride_vt + h * stride_vh + dcol
    mask_m = offs_m < length
    q = tl.load(q_head + offs_m[:, None] * stride_qt, mask=mask_m[:, None] & dmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < length
        k = tl.load(k_head + offs_n[:, None] * stride_kt, mask=mask_n[:, None] & dmask, other=0.0)
        v = tl.load(v_head + offs_n[:, None] * stride_vt, mask=mask_n[:, None] & dmask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block holds at least one valid key
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the normaliser l_i counts every key; only the values see the dropped probabilities
            p = tl.where(_keep(seed, b, h, heads, offs_m, offs_n, max_seqlen, drop_threshold), p * keep_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    out_ptr = O + start * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + dcol
    tl.store(out_ptr, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & dmask)
    tl.store(LSE + start * stride_lt + h + offs_m * stride_lt, m_i + tl.math.log2(l_i), mask=mask_m)


@triton.jit
def _delta_kernel(O, DO, DELTA, total, stride_ot, stride_oh, stride_dot, stride_doh, head_dim,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """DELTA[t, h] = sum_d O[t, h, d] * DO[t, h, d] in fp32, reading the 16-bit rows once."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < total) & (cols[None, :] < head_dim)
    rows64 = rows.to(tl.int64)[:, None]
    o = tl.load(O + rows64 * stride_ot + h * stride_oh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows64 * stride_dot + h * stride_doh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows.to(tl.int64) * tl.num_programs(1) + h, tl.sum(o * do, 1), mask=rows < total)


@triton.jit
def _row_delta(o_head, stride_ot, do, offs, mask, dmask):
    """rowsum(O * dO) of rows offs, in fp32: FUSED_DELTA's way of reading DELTA (do: those rows of dO, loaded)."""
    o = tl.load(o_head + offs[:, None] * stride_ot, mask=mask[:, None] & dmask, other=0.0)
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)


@triton.jit
def _bwd_kernel(Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, CU, stride_qt, stride_kt, stride_vt, stride_ot, stride_dot,
                stride_lt, stride_qh, stride_kh, stride_vh, stride_oh, stride_doh, heads, max_seqlen, scale, scale_log2,
                drop_threshold, keep_scale, SEED,
                head_dim, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr, FUSED_DELTA: tl.constexpr):
    """dq, dk, dv share q's (contiguous) layout; LSE and DELTA = rowsum(out * dout) are (total, heads) fp32.
    FUSED_DELTA: each program sums O * dO of the rows it reads itself (DELTA unread), so the backward is one launch
    instead of two, for a load of O beside each load of dO."""
    pid, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(CU + b).to(tl.int64)
    length = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
    if pid * BLOCK >= length:
        return
    seed = _seed(SEED, DROPOUT)
    offs_d = tl.arange(0, BLOCK_D)
    dcol = offs_d[None, :]
    dmask = dcol < head_dim  # columns beyond head_dim read as 0 and are never stored
    # the sample's first row in 64 bits once; rows within it in 32 (the launcher checks they fit)
    q_head = Q + start * stride_qt + h * stride_qh + dcol
    k_head = K + start * stride_kt + h * stride_kh + dcol
    v_head = V + start * stride_vt + h * stride_vh + dcol
    do_head = DO + start * stride_dot + h * stride_doh + dcol
    o_head = O + start * stride_ot + h * stride_oh + dcol
    lse_head, delta_head = LSE + start * stride_lt + h, DELTA + start * stride_lt + h
    own = pid * BLOCK + tl.arange(0, BLOCK)  # this program's key block, then its query block
    mask_own = own < length

    # dK, dV of key block `own`: dV = P_drop^T dO, dS = P (dP - delta), dK = scale dS^T Q
    k = tl.load(k_head + own[:, None] * stride_kt, mask=mask_own[:, None] & dmask, other=0.0)
    v = tl.load(v_head + own[:, None] * stride_vt, mask=mask_own[:, None] & dmask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for m0 in range(0, length, BLOCK):
        offs_m = m0 + tl.arange(0, BLOCK)
        mask_m = offs_m < length
        q = tl.load(q_head + offs_m[:, None] * stride_qt, mask=mask_m[:, None] & dmask, other=0.0)
        do = tl.load(do_head + offs_m[:, None] * stride_dot, mask=mask_m[:, None] & dmask, other=0.0)
        if UPCAST:
            q, do = q.to(tl.float32), do.to(tl.float32)
        lse = tl.load(lse_head + offs_m * stride_lt, mask=mask_m, other=0.0)
        if FUSED_DELTA:
            delta = _row_delta(o_head, stride_ot, do, offs_m, mask_m, dmask)
        else:
            delta = tl.load(delta_head + offs_m * stride_lt, mask=mask_m, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        p = tl.where(mask_m[:, None] & mask_own[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _keep(seed, b, h, heads, offs_m, own, max_seqlen, drop_threshold)
            p_drop = tl.where(keep, p * keep_scale, 0.0)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        else:
            p_drop = p
        dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    first, rows = start * stride_qt + h * stride_qh, own[:, None] * stride_qt + dcol  # 64-bit once, 32-bit rows
    store_mask = mask_own[:, None] & dmask
    tl.store(DK + first + rows, (dk * scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + first + rows, dv.to(DV.dtype.element_ty), mask=store_mask)

    # dQ of query block `own`: dQ = scale dS K
    q = tl.load(q_head + own[:, None] * stride_qt, mask=mask_own[:, None] & dmask, other=0.0)
    do = tl.load(do_head + own[:, None] * stride_dot, mask=mask_own[:, None] & dmask, other=0.0)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(lse_head + own * stride_lt, mask=mask_own, other=0.0)
    if FUSED_DELTA:
        delta = _row_delta(o_head, stride_ot, do, own, mask_own, dmask)
    else:
        delta = tl.load(delta_head + own * stride_lt, mask=mask_own, other=0.0)
    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for n0 in range(0, length, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        mask_n = offs_n < length
        k = tl.load(k_head + offs_n[:, None] * stride_kt, mask=mask_n[:, None] & dmask, other=0.0)
        v = tl.load(v_head + offs_n[:, None] * stride_vt, mask=mask_n[:, None] & dmask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        p = tl.where(mask_own[:, None] & mask_n[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            dp = tl.where(_keep(seed, b, h, heads, own, offs_n, max_seqlen, drop_threshold), dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + first + rows, (dq * scale).to(DQ.dtype.element_ty), mask=store_mask)


@triton.jit
def _keep_mask_kernel(OUT, CU, heads, max_seqlen, drop_threshold, SEED, BLOCK: tl.constexpr):
    """OUT (B, heads, max_seqlen, max_seqlen) int8: the keep-mask the attention kernels draw, 0 beyond lengths."""
    pid_m, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seed = tl.load(SEED)
    length = tl.load(CU + b + 1) - tl.load(CU + b)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    base = OUT + ((b * heads + h) * max_seqlen).to(tl.int64) * max_seqlen
    for n0 in range(0, max_seqlen, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        keep = _keep(seed, b, h, heads, offs_m, offs_n, max_seqlen, drop_threshold)
        valid = (offs_m[:, None] < length) & (offs_n[None, :] < length)
        inside = (offs_m[:, None] < max_seqlen) & (offs_n[None, :] < max_seqlen)
        tl.store(base + offs_m[:, None] * max_seqlen + offs_n[None, :], (keep & valid).to(tl.int8), mask=inside)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------


def unsupported(q: torch.Tensor) -> str | None:
    """Why the kernels cannot serve q (and k, v of its shape and dtype), or None when they can."""
    if q.dtype not in DTYPES:
        return f"inputs of dtype {q.dtype}: the kernels take fp32, fp16 or bf16"
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]}: the kernels take 1 to {MAX_HEAD_DIM}"
    return None


@dataclass(frozen=True)
class Launch:
    """One kernel call's tile (query rows x key rows; the backward's is square), warps and pipeline stages;
    fused_delta (backward only): rowsum(O dO) inside the backward kernel rather than in a launch of its own."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int | None = None  # None: triton's default
    fused_delta: bool = False

    def kwargs(self) -> dict:
        return dict(num_warps=self.num_warps, **({} if self.num_stages is None else {"num_stages": self.num_stages}))


def _block(max_seqlen: int) -> int:
    """Tile side: the longest sample rounded up to a power of two, 16 to 64 (UNITER's rows are <= 160)."""
    return min(64, max(16, next_pow2(max(max_seqlen, 1))))


def _fma_launch(max_seqlen: int, dtype: torch.dtype) -> Launch | None:
    """fp32 inputs on a GPU take exact products on the FMA units, which hold their tiles in registers: 32 x 32
    tiles on 8 warps, where the 16-bit launches spilled 2.8 KB (backward, head_dim 64) to 17 KB (128) per thread
    on sm_90 (benchmarks/compile_check.py, Triton 3.6). Under the interpreter the launch changes nothing."""
    if dtype != torch.float32 or interpreting():
        return None
    block = min(32, _block(max_seqlen))
    return Launch(block, block, num_warps=8)


def forward_launch(max_seqlen: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> Launch:
    """Key blocks of 32 and 3 stages up to head_dim 64: at UNITER-base shapes on an H200 (tune_kernels.py,
    2026-11-26) 64 x 32 tiles ran 1.04-1.05x faster than 64 x 64 with 2 stages (two sweeps), 1.15x with 3 (one)."""
    fma = _fma_launch(max_seqlen, dtype)
    if fma is not None:
        return fma
    block = _block(max_seqlen)
    if head_dim <= 64:
        return Launch(block, min(block, 32), num_warps=4, num_stages=3)
    return Launch(block, block)


def backward_launch(max_seqlen: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> Launch:
    """One pipeline stage: 1.07x faster than triton's default at UNITER-base shapes on an H200
    (benchmarks/tune_kernels.py, 2026-11-26); 8 warps or 32-row blocks ran 1.2-1.8x slower (bf16)."""
    fma = _fma_launch(max_seqlen, dtype)
    if fma is not None:
        return fma
    block = _block(max_seqlen)
    return Launch(block, block, num_warps=4, num_stages=1)


def _block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    """(drop_threshold, keep_scale): a key is dropped when its 16-bit draw is below round(p * 2**16), so the rate
    is p to within 2**-17; kept values scale by 1 / (1 - that rate), so dropout leaves them unbiased."""
    threshold = round(dropout_p * 65536)
    return threshold, 65536 / (65536 - threshold) if threshold < 65536 else 0.0


def _flags(dtype: torch.dtype, dropout_p: float) -> dict:
    upcast = dtype == torch.bfloat16 and interpreting()  # the interpreter's bf16 dot gives NaN (numpy has no bf16)
    # fp32 inputs: exact products (tf32 would cost three digits); 16-bit operands ignore the setting
    precision = "ieee" if dtype == torch.float32 or upcast else "tf32"
    return dict(DROPOUT=dropout_p > 0.0, UPCAST=upcast, DOT_PRECISION=precision)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_row_offsets(max_seqlen: int, widest: int) -> None:
    """The kernels address rows within a sample in 32 bits (the sample's first row in 64); widest: the largest
    row stride of the call's tensors."""
    if (max_seqlen + 64) * widest >= 2**31:  # a block may reach past the longest sample by up to 63 rows
        raise ValueError(f"varlen_attention: max_seqlen={max_seqlen} rows of stride {widest} exceed the kernels' "
                         f"32-bit offsets within a sample (at most {2**31 // widest - 64} rows)")


@functools.lru_cache(maxsize=4096)
def _setup(backward: bool, max_seqlen: int, head_dim: int, dtype: torch.dtype, dropout_p: float,
           launch: Launch | None) -> tuple[int, int, float, dict]:
    """(query blocks, drop_threshold, keep_scale, keyword arguments) of a forward or backward call: its launch
    rule and flags, worked out once per shape and dtype (host time). Cached, it keeps the rule functions and
    TRITON_INTERPRET as they were at the first call of each shape: the kernels are fixed at import anyway."""
    launch = launch or (backward_launch if backward else forward_launch)(max_seqlen, head_dim, dtype)
    if backward:
        assert launch.block_m == launch.block_n, "the backward's program owns one key block and one query block"
        tiles = dict(BLOCK=launch.block_m, FUSED_DELTA=launch.fused_delta)
    else:
        tiles = dict(BLOCK_M=launch.block_m, BLOCK_N=launch.block_n)
    kwargs = dict(BLOCK_D=_block_d(head_dim), **tiles, **launch.kwargs(), **_flags(dtype, dropout_p))
    return cdiv(max(max_seqlen, 1), launch.block_m), *_dropout_args(dropout_p), kwargs


def _seed_pointer(seed: torch.Tensor | int | None, dropout_p: float, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """What the kernels' SEED points at: the seed tensor (an int64 on the inputs' device), an int filled into one
    there (tests and sweeps: a fill launch per call, no copy or sync), or, without dropout, cu_seqlens (unread)."""
    if dropout_p <= 0.0:
        return cu_seqlens
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != cu_seqlens.device:
            raise ValueError(f"varlen_attention: the dropout seed must be one int64 on {cu_seqlens.device}, got "
                             f"{seed.dtype} of shape {tuple(seed.shape)} on {seed.device}")
        return seed
    if seed is None or isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63:
        raise ValueError(f"varlen_attention: dropout_p > 0 needs a seed (an int64 tensor or int), got {seed!r}")
    return torch.full((1,), seed, dtype=torch.int64, device=cu_seqlens.device)


def forward(q, k, v, cu_seqlens, max_seqlen: int, softmax_scale: float, dropout_p: float,
            seed: torch.Tensor | int | None, launch: Launch | None = None):
    """(out, lse): out like q; lse (total, heads) fp32 in base 2 of the scaled scores. seed: dropout's (_seed_pointer).
    launch: forward_launch's rule unless given (benchmarks/tune_kernels.py sweeps it)."""
    q, k, v, cu_seqlens = _rows(q), _rows(k), _rows(v), cu_seqlens.contiguous()
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    _check_row_offsets(max_seqlen, max(sq[0], sk[0], sv[0]))
    total, heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    out = torch.empty_like(q)
    lse = torch.empty(total, heads, device=q.device, dtype=torch.float32)
    if batch == 0 or total == 0:
        return out, lse
    blocks, drop_threshold, keep_scale, kwargs = _setup(False, max_seqlen, head_dim, q.dtype, dropout_p, launch)
    so = out.stride()
    launch_kernel(
        _fwd_kernel, (blocks, batch, heads),
        q, k, v, out, lse, cu_seqlens, sq[0], sk[0], sv[0], so[0], heads, sq[1], sk[1], sv[1], so[1], heads,
        max_seqlen, softmax_scale * LOG2E, drop_threshold, keep_scale, _seed_pointer(seed, dropout_p, cu_seqlens),
        head_dim, **kwargs,
    )
    return out, lse


def backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen: int, softmax_scale: float, dropout_p: float,
             seed: torch.Tensor | int | None, launch: Launch | None = None, grads: tuple | None = None):
    """(dq, dk, dv), each like q. launch: backward_launch's rule unless given; its tile must be square.
    grads: (dq, dk, dv) to write, each with the strides of its input (views of one (total, 3, heads, head_dim)
    gradient, as q, k, v are of one projection); None: contiguous q, k, v and new gradients of their layout."""
    grad_out = grad_out.contiguous()
    if grads is None:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the gradients are written in q's layout
        grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    elif any(g.shape != t.shape or g.stride() != t.stride() or t.stride() != q.stride() or t.stride(-1) != 1
             for g, t in zip(grads, (q, k, v))):
        raise ValueError("varlen_attention backward: q, k, v and the gradients given must share one layout with "
                         "contiguous rows")
    out, cu_seqlens = _rows(out), cu_seqlens.contiguous()
    lse = lse.contiguous()  # the kernel reads DELTA (contiguous, (total, heads)) with lse's row stride
    sq, sk, sv, so, sg = q.stride(), k.stride(), v.stride(), out.stride(), grad_out.stride()
    _check_row_offsets(max_seqlen, max(sq[0], sk[0], sv[0], so[0], sg[0]))
    total, heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    dq, dk, dv = grads
    if batch == 0 or total == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    blocks, drop_threshold, keep_scale, kwargs = _setup(True, max_seqlen, head_dim, q.dtype, dropout_p, launch)
    if kwargs["FUSED_DELTA"]:
        delta = lse  # unread
    else:
        delta = torch.empty(total, heads, device=q.device, dtype=torch.float32)  # rowsum(O dO) = rowsum(P dP)
        launch_kernel(_delta_kernel, (cdiv(total, 64), heads), out, grad_out, delta, total, so[0], so[1], sg[0],
                      sg[1], head_dim, BLOCK_T=64, BLOCK_D=kwargs["BLOCK_D"])
    launch_kernel(
        _bwd_kernel, (blocks, batch, heads),
        q, k, v, out, grad_out, dq, dk, dv, lse, delta, cu_seqlens, sq[0], sk[0], sv[0], so[0], sg[0], lse.stride(0),
        sq[1], sk[1], sv[1], so[1], sg[1], heads, max_seqlen, softmax_scale, softmax_scale * LOG2E, drop_threshold,
        keep_scale, _seed_pointer(seed, dropout_p, cu_seqlens), head_dim, **kwargs,
    )
    return dq, dk, dv


def dropout_keep_mask(cu_seqlens: torch.Tensor, heads: int, max_seqlen: int, dropout_p: float,
                      seed: torch.Tensor | int) -> torch.Tensor:
    """(B, heads, max_seqlen, max_seqlen) bool: the keep-mask the kernels draw for these arguments."""
    batch, cu_seqlens = cu_seqlens.shape[0] - 1, cu_seqlens.contiguous()
    out = torch.zeros(batch, heads, max_seqlen, max_seqlen, dtype=torch.int8, device=cu_seqlens.device)
    if batch and max_seqlen:
        block = _block(max_seqlen)
        launch_kernel(
            _keep_mask_kernel, (cdiv(max_seqlen, block), batch, heads),
            out, cu_seqlens, heads, max_seqlen, _dropout_args(dropout_p)[0], _seed_pointer(seed, dropout_p, cu_seqlens),
            BLOCK=block)  # without dropout the seed read is cu_seqlens[0]: every key is kept anyway
    return out.bool()
