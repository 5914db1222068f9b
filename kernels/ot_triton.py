"""Triton kernels for batched optimal transport (UNITER's word-region alignment) and their launchers.

One launch runs every iteration for the whole batch. Each program owns PROBS problems as one tile
(BLOCK_* = next powers of two of the longest text and region sides): the cost and the solver state stay on chip,
lengths are masked per problem, the state is fp32 whatever the input dtype. The tile's axes are
(problem, column // COL_LANES, row, column % COL_LANES): Triton's default layout spreads the last two axes over
a warp's lanes and the rows over its warps, so every thread holds whole row segments; a row sum is mostly adds
within a thread and a column sum mostly across a warp. The plain (problem, row, column) tile put every lane on
one row: each row sum then took 5 shuffles per thread and row (see _config for the counts). With one problem
per program, a problem no longer than half the block on a side runs on the half tile (SHRINK): at UNITER's
random lengths about half of the padded work.
Algorithms (reference/ot.md):
- "ipot": the original's linear IPOT (beta, iterations, k inner steps reusing the same Q);
- "ipot_log": IPOT in the log domain: iteration t runs k log-domain Sinkhorn steps on exp(-t C / beta),
  starting from the extrapolated text potential 2 f_{t-1} - f_{t-2}; the same iterates, never underflowing,
  though rounding t C / beta in fp32 costs about 1e-4 relative on the plan at t = 50 (the linear form 1e-7);
- "sinkhorn_log": log-domain Sinkhorn on exp(-C / eps), column potential first, as the reference.
The cost comes as a (B, M, N) tensor or is fused: C = 1 - cos(text_i, region_j) from the vectors, normalised
as F.normalize(eps=1e-5), padded (B, L, D) or packed (total, D) rows with per-problem starts; then each program
owns one problem (PROBS = 1) and its cosine is one 2-D matrix product of row-major tiles.
The backward kernel takes the plan as a constant (envelope) and returns the gradient of the vectors. It reads the
forward's inverse norms and plan-weighted cosine sums (grad_stats) instead of recomputing the cosine, so nothing
in it sums over D: each problem's dims split over several programs while the batch is too small to fill the GPU.
Nothing here validates arguments or synchronises with the host: kernels/ot.py does the former. The launch
rules are worked out once per shape (_rule, _backward_rule) and launches go through kernels/launch.py (host time).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .backend import cdiv, interpreting, next_pow2
from .launch import launch as launch_kernel

METHODS = {"ipot": 0, "ipot_log": 1, "sinkhorn_log": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TILE = 128 * 256  # the largest tile served (beyond 128 x 128 it spills registers on sm_90, correct still)
TILE_TARGET = 4096  # elements per program: small problems are packed together up to this
MAX_PROBS = 16
# lanes along a row of the tile: 32 with 4 warps or more, 16 with fewer (_config; tune_kernels.py, 2026-11-27)
WIDE_COL_LANES, NARROW_COL_LANES = 32, 16

_NORM_EPS = tl.constexpr(1e-5)  # F.normalize's eps in UNITER's cosine cost
_FOLD_RANGE = tl.constexpr(30.0)  # the factored IPOT plan's W drifts from T by at most exp(this)
_PAD_COST = tl.constexpr(1e20)  # scaled cost on pads in the log domain: exp(-t * 1e20) = 0, never inf - inf


@dataclass(frozen=True)
class Solve:
    """What the forward kernel solves: the kernel is exp(-scale * C), scale = 1/beta (IPOT) or 1/eps (Sinkhorn)."""

    method: str  # "ipot", "ipot_log" or "sinkhorn_log"
    scale: float
    iterations: int  # the count, or the most when tol is set
    k: int = 1  # inner Sinkhorn steps per IPOT iteration; Sinkhorn ignores it
    tol: float | None = None  # stop a problem once its column marginals are this close (L1) to 1/n


@dataclass(frozen=True)
class Rows:
    """Where problem b's vectors lie: rows 0 .. len_b of data[b] for padded data (B, L, D), or rows
    starts[b] .. starts[b] + len_b of packed data (total, D); max_len bounds len_b (packed only)."""

    data: torch.Tensor
    starts: torch.Tensor | None = None
    max_len: int | None = None

    @property
    def length(self) -> int:
        return self.data.shape[1] if self.starts is None else int(self.max_len)

    @property
    def strides(self) -> tuple[int, int, int]:
        """(per problem, per row, per dim) in elements; packed data has no per-problem stride."""
        return tuple(self.data.stride()) if self.starts is None else (0, *self.data.stride())


# ----------------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _problem_tile(pid, text_lens_ptr, region_lens_ptr, B,
                  PROBS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COL_LANES: tl.constexpr):
    """This program's problems as a (PROBS, BLOCK_N // COL_LANES, BLOCK_M, COL_LANES) tile: indices, lengths,
    row and column indices and masks (every per-problem value broadcastable to the tile)."""
    pb = pid * PROBS + tl.arange(0, PROBS)[:, None, None, None]
    inb = pb < B
    m = tl.load(text_lens_ptr + pb, mask=inb, other=0).to(tl.int32)
    n = tl.load(region_lens_ptr + pb, mask=inb, other=0).to(tl.int32)
    live = (m > 0) & (n > 0)  # an empty side moves no mass: the whole problem is padding
    m = tl.where(live, m, 0)
    n = tl.where(live, n, 0)
    rows = tl.arange(0, BLOCK_M)[None, None, :, None]
    cols = (tl.arange(0, BLOCK_N // COL_LANES)[None, :, None, None] * COL_LANES
            + tl.arange(0, COL_LANES)[None, None, None, :])
    return pb, inb, live, m, n, rows, cols, rows < m, cols < n


@triton.jit
def _tile_axes(x, COL_LANES: tl.constexpr):
    """(P, BM, BN) -> the tile's (P, BN // COL_LANES, BM, COL_LANES)."""
    P: tl.constexpr = x.shape[0]
    BM: tl.constexpr = x.shape[1]
    BN: tl.constexpr = x.shape[2]
    return tl.permute(tl.reshape(x, (P, BM, BN // COL_LANES, COL_LANES)), (0, 2, 1, 3))


@triton.jit
def _layout_barrier(x):
    """x (P, BM, BN) unchanged (+ 0 * 0 in a matrix product) where P * BM and BN are at least 16.

    Triton lays out the solver's loop like the load that feeds it: Triton 3.6 put a load's warps across each row
    (twice the instructions per iteration on sm_90). A matrix product's result is not propagated that way, so
    the loop takes the tile's default layout on Triton 3.6 and 3.9 alike, as the fused-cosine path does."""
    P: tl.constexpr = x.shape[0]
    BM: tl.constexpr = x.shape[1]
    BN: tl.constexpr = x.shape[2]
    if P * BM >= 16 and BN >= 16:
        flat = tl.dot(tl.zeros((P * BM, 16), tl.float32), tl.zeros((16, BN), tl.float32), tl.reshape(x, (P * BM, BN)),
                      input_precision="tf32")
        if P == 1:
            x = flat[None, :, :]  # not a reshape: that lays out the loop worse for the 64-row tiles (cuobjdump)
        else:
            x = tl.reshape(flat, (P, BM, BN))
    return x


@triton.jit
def _recip(x, valid):
    """1/x where valid, exactly 0 elsewhere, never dividing by a pad's 0."""
    return tl.where(valid, 1.0 / tl.where(valid, x, 1.0), 0.0)


@triton.jit
def _row_sum(x):
    """Each row's sum over its columns, (P, 1, BM, 1): the axis within a thread first, then across lanes."""
    return tl.expand_dims(tl.expand_dims(tl.sum(tl.sum(x, axis=1), axis=2), 1), 3)


@triton.jit
def _row_max(x):
    return tl.expand_dims(tl.expand_dims(tl.max(tl.max(x, axis=1), axis=2), 1), 3)


@triton.jit
def _col_sum(x):
    """Each column's sum over its rows, (P, BN // COL_LANES, 1, COL_LANES)."""
    return tl.expand_dims(tl.sum(x, axis=2), 2)


@triton.jit
def _col_max(x):
    return tl.expand_dims(tl.max(x, axis=2), 2)


@triton.jit
def _problem_sum(x):
    """Each problem's sum over its whole tile, (P,)."""
    return tl.sum(tl.sum(tl.sum(x, axis=1), axis=2), axis=1)


@triton.jit
def _lse_rows(x):
    """log-sum-exp of each row (pads hold -1e20-scale values and add nothing)."""
    top = _row_max(x)
    return tl.log(_row_sum(tl.exp(x - top))) + top


@triton.jit
def _lse_cols(x):
    """log-sum-exp of each column."""
    top = _col_max(x)
    return tl.log(_col_sum(tl.exp(x - top))) + top


@triton.jit
def _column_error(col_sums, nf, colv):
    """L1 distance of each problem's plan column sums to 1/n, (P, 1, 1, 1); rows are exact after every iteration."""
    miss = col_sums - _recip(nf, colv)
    return _row_sum(tl.where(colv, tl.abs(miss), 0.0))


@triton.jit
def _problem_base(starts_ptr, b, s_b, s_r, PACKED: tl.constexpr):
    """Element offset of problem b's first row (a scalar): starts[b] rows into packed data, or batch entry b."""
    if PACKED:
        base = tl.load(starts_ptr + b).to(tl.int64) * s_r
    else:
        base = b.to(tl.int64) * s_b
    return base


@triton.jit
def _vector_tile(ptr, base, s_r, s_d, idx, length, d, D):
    """Rows idx (R, 1) x dims d (1, BD) of one problem's vectors, 0 beyond its length and D: a coalesced load."""
    return tl.load(ptr + base + idx * s_r + d * s_d, mask=(idx < length) & (d < D), other=0.0)


@triton.jit
def _cosine(x_ptr, xb, s_xr, s_xd, y_ptr, yb, s_yr, s_yd, m, n, D,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One problem's cos(x_i, y_j) (BM, BN), 1/max(|x_i|, eps) (BM, 1) and 1/max(|y_j|, eps) (1, BN): one matrix
    product over D in BLOCK_D steps (tensor cores for 16-bit inputs), both sides read row-major."""
    rows = tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_N)[:, None]  # y's rows: the product takes y transposed
    d = tl.arange(0, BLOCK_D)[None, :]
    dots = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sq_x = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # squares summed over dims once, after the loop
    sq_y = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = _vector_tile(x_ptr, xb, s_xr, s_xd, rows, m, d0 + d, D)  # (BM, BD)
        y = _vector_tile(y_ptr, yb, s_yr, s_yd, cols, n, d0 + d, D)  # (BN, BD)
        if DOT_PRECISION == "ieee":  # exact fp32 products, fp16 inputs included
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        dots = tl.dot(x, tl.trans(y), dots, input_precision=DOT_PRECISION)  # raw products, normalised at the end
        x = x.to(tl.float32)
        y = y.to(tl.float32)
        sq_x += x * x
        sq_y += y * y
    inv_x = (1.0 / tl.maximum(tl.sqrt(tl.sum(sq_x, axis=1)), _NORM_EPS))[:, None]
    inv_y = (1.0 / tl.maximum(tl.sqrt(tl.sum(sq_y, axis=1)), _NORM_EPS))[None, :]
    return dots * inv_x * inv_y, inv_x, inv_y


# ----------------------------------------------------------------------------------------------------------
# solvers: all iterations of one tile of problems
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _ipot_linear(scaled, rowv, colv, valid, mf, nf, live, iterations, k, tol, USE_TOL: tl.constexpr):
    """UNITER's IPOT on K = exp(-scaled): returns the plan and how many iterations each problem ran.

    The plan is kept factored, T = diag(r) W diag(c). An iteration's Q = K * T is diag(r) (K * W) diag(c), and
    its new plan diag(s) Q diag(delta) is diag(s r) (K * W) diag(c delta): W becomes K * W and the scalings fold
    into r and c, so an entry costs one product and two multiply-adds (the sums), not five operations.
    W = T * K^j drifts from T by up to exp(j max|scaled|): every `fold` iterations W takes the scalings back
    (W = T, r = c = 1), fold keeping that drift within exp(_FOLD_RANGE), far inside fp32's exp(+-87).
    Pad rows and columns divide by 1 instead of their sums (0): their scalings stay finite, their W entries 0."""
    kernel = tl.where(valid, tl.exp(-scaled), 0.0)
    w = tl.where(valid, 1.0, 0.0)
    r = tl.where(rowv, 1.0, 1.0)
    c = tl.where(colv, 1.0, 1.0)
    sigma = _recip(mf, rowv)
    delta = c
    top = tl.max(tl.where(valid, tl.abs(scaled), 0.0))  # over the program's tile: one fold period for it
    fold = tl.minimum(tl.maximum(_FOLD_RANGE / tl.maximum(top, 1e-6), 1.0), 16.0).to(tl.int32)
    active = live
    done = tl.where(live, 0, 0)
    remaining = tl.sum(active.to(tl.int32))
    it = remaining * 0
    while (it < iterations) & (remaining > 0):
        v = kernel * w
        s = sigma
        for _ in range(k):  # inner steps reuse the same Q (the original's k > 1 crashes on a shape bug)
            delta = 1.0 / tl.where(colv, nf * c * _col_sum(v * (r * s)), 1.0)
            s = 1.0 / tl.where(rowv, mf * r * _row_sum(v * (c * delta)), 1.0)
        if USE_TOL:  # converged problems keep their state
            w = tl.where(active, v, w)
            r = tl.where(active, r * s, r)
            c = tl.where(active, c * delta, c)
            sigma = tl.where(active, s, sigma)
        else:
            w = v
            r = r * s
            c = c * delta
            sigma = s
        done += active.to(tl.int32)
        if USE_TOL:
            active = active & (_column_error(c * _col_sum(w * r), nf, colv) > tol)
            remaining = tl.sum(active.to(tl.int32))
        it += 1
        if it % fold == 0:
            w = r * w * c
            r = tl.where(rowv, 1.0, 1.0)
            c = tl.where(colv, 1.0, 1.0)
    return r * w * c, done


@triton.jit
def _log_domain(scaled, rowv, colv, valid, mf, nf, live, iterations, k, tol,
                EXTRAPOLATE: tl.constexpr, USE_TOL: tl.constexpr):
    """Sinkhorn on exp(-scaled) (EXTRAPOLATE False) or IPOT (True) with potentials f (rows) and g (columns).

    IPOT's plan after t iterations is exp(f_t + g_t - t scaled) (reference/ot.md): iteration t runs k Sinkhorn
    steps on exp(-t scaled) from the text potential 2 f_{t-1} - f_{t-2}, i.e. f_{t-1} + log of the last sigma.
    """
    far = tl.where(valid, scaled, _PAD_COST)
    log_mu = -tl.log(tl.maximum(mf, 1.0))
    log_nu = -tl.log(tl.maximum(nf, 1.0))
    f = tl.where(rowv, 0.0, 0.0)
    f_prev = tl.where(rowv, -log_mu, 0.0)  # f_{-1} = log m: the first extrapolation is log(1/m), IPOT's sigma_0
    g = tl.where(colv, 0.0, 0.0)
    log_kernel = -far
    active = live
    done = tl.where(live, 0, 0)
    remaining = tl.sum(active.to(tl.int32))
    it = remaining * 0
    while (it < iterations) & (remaining > 0):
        if EXTRAPOLATE:
            log_kernel = -(it + 1).to(tl.float32) * far
            u = 2.0 * f - f_prev
        else:
            u = f
        v = g
        for _ in range(k):
            v = tl.where(colv, log_nu - _lse_cols(u + log_kernel), 0.0)
            u = tl.where(rowv, log_mu - _lse_rows(log_kernel + v), 0.0)
        if USE_TOL:  # converged problems keep their state
            f_prev = tl.where(active, f, f_prev)
            f = tl.where(active, u, f)
            g = tl.where(active, v, g)
        else:
            f_prev = f
            f = u
            g = v
        done += active.to(tl.int32)
        if USE_TOL:
            plan = tl.where(valid, tl.exp(f + g + log_kernel), 0.0)
            active = active & (_column_error(_col_sum(plan), nf, colv) > tol)
            remaining = tl.sum(active.to(tl.int32))
        it += 1
    if EXTRAPOLATE:
        log_kernel = -done.to(tl.float32) * far  # each problem's own last t
    return tl.where(valid, tl.exp(f + g + log_kernel), 0.0), done


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _transport_kernel(
    cost_ptr, s_cb, s_cm, s_cn,
    x_ptr, x_starts_ptr, s_xb, s_xr, s_xd,
    y_ptr, y_starts_ptr, s_yb, s_yr, s_yd,
    text_lens_ptr, region_lens_ptr,
    dist_ptr, plan_ptr, s_pb, s_pm, s_pn, counts_ptr, stats_ptr,
    B, M, N, D, iterations, k, scale, tol,
    METHOD: tl.constexpr, FROM_VECTORS: tl.constexpr, PACKED: tl.constexpr,
    WRITE_PLAN: tl.constexpr, WRITE_STATS: tl.constexpr, USE_TOL: tl.constexpr,
    PROBS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    COL_LANES: tl.constexpr, SHRINK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Solves this program's problems. SHRINK (PROBS == 1): a problem no longer than half the block on a side
    runs on the half tile there, so a short pair costs a quarter of the longest one's work. WRITE_STATS (from
    vectors): also what the backward needs besides the plan (grad_stats)."""
    pid = tl.program_id(0)
    args = (cost_ptr, s_cb, s_cm, s_cn, x_ptr, x_starts_ptr, s_xb, s_xr, s_xd, y_ptr, y_starts_ptr, s_yb, s_yr, s_yd,
            text_lens_ptr, region_lens_ptr, dist_ptr, plan_ptr, s_pb, s_pm, s_pn, counts_ptr, stats_ptr,
            B, M, N, D, iterations, k, scale, tol)
    # the flags travel one by one: Triton drops the constexpr-ness of tuple items
    if SHRINK:
        if tl.load(text_lens_ptr + pid) <= BLOCK_M // 2:
            _shrink_columns(pid, args, region_lens_ptr, METHOD, FROM_VECTORS, PACKED, WRITE_PLAN, WRITE_STATS,
                            USE_TOL, PROBS, BLOCK_M // 2, BLOCK_N, BLOCK_D, COL_LANES, DOT_PRECISION)
        else:
            _shrink_columns(pid, args, region_lens_ptr, METHOD, FROM_VECTORS, PACKED, WRITE_PLAN, WRITE_STATS,
                            USE_TOL, PROBS, BLOCK_M, BLOCK_N, BLOCK_D, COL_LANES, DOT_PRECISION)
    else:
        _solve_tile(pid, args, METHOD, FROM_VECTORS, PACKED, WRITE_PLAN, WRITE_STATS, USE_TOL, PROBS, BLOCK_M,
                    BLOCK_N, BLOCK_D, COL_LANES, DOT_PRECISION)


@triton.jit
def _shrink_columns(pid, args, region_lens_ptr, METHOD: tl.constexpr, FROM_VECTORS: tl.constexpr,
                    PACKED: tl.constexpr, WRITE_PLAN: tl.constexpr, WRITE_STATS: tl.constexpr,
                    USE_TOL: tl.constexpr, PROBS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, COL_LANES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """_solve_tile on BLOCK_N // 2 columns when problem pid has no more regions than that."""
    if tl.load(region_lens_ptr + pid) <= BLOCK_N // 2:
        _solve_tile(pid, args, METHOD, FROM_VECTORS, PACKED, WRITE_PLAN, WRITE_STATS, USE_TOL, PROBS, BLOCK_M,
                    BLOCK_N // 2, BLOCK_D, COL_LANES, DOT_PRECISION)
    else:
        _solve_tile(pid, args, METHOD, FROM_VECTORS, PACKED, WRITE_PLAN, WRITE_STATS, USE_TOL, PROBS, BLOCK_M,
                    BLOCK_N, BLOCK_D, COL_LANES, DOT_PRECISION)


@triton.jit
def _solve_tile(pid, args, METHOD: tl.constexpr, FROM_VECTORS: tl.constexpr, PACKED: tl.constexpr,
                WRITE_PLAN: tl.constexpr, WRITE_STATS: tl.constexpr, USE_TOL: tl.constexpr, PROBS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, COL_LANES: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Reads program pid's problems into one tile, solves them and writes their distances (and plans, counts,
    the backward's statistics)."""
    (cost_ptr, s_cb, s_cm, s_cn, x_ptr, x_starts_ptr, s_xb, s_xr, s_xd, y_ptr, y_starts_ptr, s_yb, s_yr, s_yd,
     text_lens_ptr, region_lens_ptr, dist_ptr, plan_ptr, s_pb, s_pm, s_pn, counts_ptr, stats_ptr,
     B, M, N, D, iterations, k, scale, tol) = args
    pb, inb, live, m, n, rows, cols, rowv, colv = _problem_tile(pid, text_lens_ptr, region_lens_ptr, B,
                                                                PROBS, BLOCK_M, BLOCK_N, COL_LANES)
    valid = rowv & colv
    stats = stats_ptr + pid.to(tl.int64) * 2 * (M + N)  # WRITE_STATS: this problem's part of grad_stats
    if FROM_VECTORS:  # PROBS == 1 (the launcher's rule): problem pid, its cosine as one 2-D product
        xb = _problem_base(x_starts_ptr, pid, s_xb, s_xr, PACKED)
        yb = _problem_base(y_starts_ptr, pid, s_yb, s_yr, PACKED)
        cos, inv_x, inv_y = _cosine(x_ptr, xb, s_xr, s_xd, y_ptr, yb, s_yr, s_yd, tl.max(m), tl.max(n), D,
                                    BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        if WRITE_STATS:  # the norms now: kept to the end they would hold registers through the solve
            r2 = tl.arange(0, BLOCK_M)[:, None]
            c2 = tl.arange(0, BLOCK_N)[None, :]
            tl.store(stats + r2, inv_x, mask=r2 < M)
            tl.store(stats + M + c2, inv_y, mask=c2 < N)
        cost = tl.where(valid, 1.0 - _tile_axes(cos[None, :, :], COL_LANES), 0.0)
    else:
        p3 = tl.reshape(pb, (PROBS, 1, 1))
        r3 = tl.arange(0, BLOCK_M)[None, :, None]
        c3 = tl.arange(0, BLOCK_N)[None, None, :]
        cost = tl.load(cost_ptr + p3.to(tl.int64) * s_cb + r3 * s_cm + c3 * s_cn,
                       mask=(r3 < tl.reshape(m, (PROBS, 1, 1))) & (c3 < tl.reshape(n, (PROBS, 1, 1))), other=0.0)
        cost = _tile_axes(_layout_barrier(cost.to(tl.float32)), COL_LANES)
    mf = m.to(tl.float32)
    nf = n.to(tl.float32)
    if METHOD == 0:
        plan, done = _ipot_linear(cost * scale, rowv, colv, valid, mf, nf, live, iterations, k, tol, USE_TOL)
    else:
        plan, done = _log_domain(cost * scale, rowv, colv, valid, mf, nf, live, iterations, k, tol,
                                 METHOD == 1, USE_TOL)
    if not FROM_VECTORS:  # read again, not kept through the loop: 64 registers a thread at 4 warps (_config)
        cost = tl.load(cost_ptr + pb.to(tl.int64) * s_cb + rows * s_cm + cols * s_cn, mask=valid,
                       other=0.0).to(tl.float32)
    p1 = pid * PROBS + tl.arange(0, PROBS)
    moved = cost * plan
    tl.store(dist_ptr + p1, _problem_sum(moved), mask=p1 < B)
    if WRITE_STATS:  # FROM_VECTORS, one problem: the layout of grad_stats
        weighted = plan - moved  # T * cos on valid entries (the plan is 0 elsewhere)
        tl.store(stats + (M + N) + rows, _row_sum(weighted), mask=rows < M)
        tl.store(stats + (M + N) + M + cols, _col_sum(weighted), mask=cols < N)
    if USE_TOL:
        tl.store(counts_ptr + p1, _problem_sum(done), mask=p1 < B)
    if WRITE_PLAN:  # the tile's part of the (M, N) block, pads included: exact zeros there (the rest is zeroed)
        plan_ptrs = plan_ptr + pb.to(tl.int64) * s_pb + rows * s_pm + cols * s_pn
        tl.store(plan_ptrs, plan, mask=inb & (rows < M) & (cols < N))


@triton.jit
def _cosine_grad_kernel(
    x_ptr, x_starts_ptr, s_xb, s_xr, s_xd,
    y_ptr, y_starts_ptr, s_yb, s_yr, s_yd,
    gx_ptr, s_gxb, s_gxr, s_gxd,
    gy_ptr, s_gyb, s_gyr, s_gyd,
    text_lens_ptr, region_lens_ptr, plan_ptr, s_pb, s_pm, s_pn, stats_ptr, grad_ptr,
    M, N, D, SPLITS, dims_per_split,
    PACKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LOW_OPERANDS: tl.constexpr, EVEN_D: tl.constexpr,
):
    """d dist_b / d x and d y with the plan T constant: dist = sum T (1 - x^ . y^), through F.normalize:
        gx_i = g inv_x_i (rdot_i x^_i - sum_j T_ij y^_j),  gy_j = g inv_y_j (cdot_j y^_j - sum_i T_ij x^_i),
    with x^ = x inv_x, rdot_i = sum_j T_ij cos_ij, cdot_j likewise, from the forward (grad_stats); below eps the
    Jacobian is I / eps and the rdot term drops. Nothing sums over D: program (problem, split) owns
    dims_per_split dims of one problem, so a small batch still fills the GPU (the splits of a problem run
    side by side and share its plan through L2). LOW_OPERANDS: the norms are folded into the plan's weights
    once, sum_j T_ij y^_j = (T diag(inv_y)) y, and those weights rounded to the vectors' 16-bit dtype, so the
    products take the raw vectors on that dtype (half the shared memory and twice the tensor-core rate of
    tf32). bf16 keeps fp32's range; fp16 (a sweep's choice, never the rule) flushes weights below 6e-5 and
    overflows past 65504, as a near-zero vector's 1/eps norm can make them."""
    pid = tl.program_id(0)
    b = pid // SPLITS
    d_start = (pid % SPLITS) * dims_per_split
    m = tl.load(text_lens_ptr + b).to(tl.int32)
    n = tl.load(region_lens_ptr + b).to(tl.int32)
    live = (m > 0) & (n > 0)  # an empty side moves no mass: the gradient is 0
    m = tl.where(live, m, 0)
    n = tl.where(live, n, 0)
    xb = _problem_base(x_starts_ptr, b, s_xb, s_xr, PACKED)
    yb = _problem_base(y_starts_ptr, b, s_yb, s_yr, PACKED)
    gxb = _problem_base(x_starts_ptr, b, s_gxb, s_gxr, PACKED)
    gyb = _problem_base(y_starts_ptr, b, s_gyb, s_gyr, PACKED)
    rows = tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    y_rows = tl.arange(0, BLOCK_N)[:, None]
    g = tl.load(grad_ptr + b)
    w = g * tl.load(plan_ptr + b.to(tl.int64) * s_pb + rows * s_pm + cols * s_pn, mask=(rows < m) & (cols < n),
                    other=0.0)  # d loss / d C, (BM, BN)
    w_t = tl.trans(w)
    stats = stats_ptr + b.to(tl.int64) * 2 * (M + N)
    # the per-row values in w's own row and column layouts: loaded in a layout of their own they cost fp16's
    # exact backward 300 bytes of spill per thread on sm_90 (Triton 3.6)
    on_rows = tl.sum(w * 0.0, axis=1)[:, None]  # (BM, 1) zeros
    on_cols = tl.sum(w * 0.0, axis=0)[:, None]  # (BN, 1) zeros
    inv_x = on_rows + tl.load(stats + rows, mask=rows < m, other=0.0)
    inv_y = on_cols + tl.load(stats + M + y_rows, mask=y_rows < n, other=0.0)
    r = tl.where(inv_x < 1.0 / _NORM_EPS, g * tl.load(stats + (M + N) + rows, mask=rows < m, other=0.0), on_rows)
    c = tl.where(inv_y < 1.0 / _NORM_EPS, g * tl.load(stats + (M + N) + M + y_rows, mask=y_rows < n, other=0.0),
                 on_cols)
    if LOW_OPERANDS:  # the norms folded into the weights, rounded once: the products take the raw vectors
        w_y = (w * tl.trans(inv_y)).to(x_ptr.dtype.element_ty)  # T diag(inv_y) (BM, BN)
        w_x = (w_t * tl.trans(inv_x)).to(x_ptr.dtype.element_ty)  # T^T diag(inv_x) (BN, BM)
        rx = r * inv_x  # r x^ = (r inv_x) x
        cy = c * inv_y
    # padded rows: every row of the problem's block is stored, its pads as the zeros they compute to (x, the plan
    # and the stats read 0 there), so the gradients need no zeroing first; packed rows: the problem's rows only
    if PACKED:
        x_stored, y_stored = rows < m, y_rows < n
    else:
        x_stored, y_stored = rows < M, y_rows < N
    d = tl.arange(0, BLOCK_D)[None, :]
    x_read, y_read = rows < m, y_rows < n
    for d0 in range(d_start, tl.minimum(d_start + dims_per_split, D), BLOCK_D):
        x_at = x_ptr + xb + rows * s_xr + (d0 + d) * s_xd
        y_at = y_ptr + yb + y_rows * s_yr + (d0 + d) * s_yd
        if EVEN_D:  # no step crosses D: the rows' masks alone
            x = tl.load(x_at, mask=x_read, other=0.0)  # (BM, BD), the inputs' dtype
            y = tl.load(y_at, mask=y_read, other=0.0)  # (BN, BD)
        else:
            x = tl.load(x_at, mask=x_read & (d0 + d < D), other=0.0)
            y = tl.load(y_at, mask=y_read & (d0 + d < D), other=0.0)
        if LOW_OPERANDS:
            gx = (rx * x.to(tl.float32) - tl.dot(w_y, y, input_precision=DOT_PRECISION)) * inv_x  # (fp32 inputs)
            gy = (cy * y.to(tl.float32) - tl.dot(w_x, x, input_precision=DOT_PRECISION)) * inv_y
        else:
            x = x.to(tl.float32) * inv_x  # x^ (BM, BD)
            y = y.to(tl.float32) * inv_y  # y^ (BN, BD)
            gx = (r * x - tl.dot(w, y, input_precision=DOT_PRECISION)) * inv_x
            gy = (c * y - tl.dot(w_t, x, input_precision=DOT_PRECISION)) * inv_y
        gx_at = gx_ptr + gxb + rows * s_gxr + (d0 + d) * s_gxd
        gy_at = gy_ptr + gyb + y_rows * s_gyr + (d0 + d) * s_gyd
        if EVEN_D:
            tl.store(gx_at, gx.to(gx_ptr.dtype.element_ty), mask=x_stored)
            tl.store(gy_at, gy.to(gy_ptr.dtype.element_ty), mask=y_stored)
        else:
            tl.store(gx_at, gx.to(gx_ptr.dtype.element_ty), mask=x_stored & (d0 + d < D))
            tl.store(gy_at, gy.to(gy_ptr.dtype.element_ty), mask=y_stored & (d0 + d < D))


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------


def unsupported(tensors: tuple[torch.Tensor, ...], max_m: int, max_n: int) -> str | None:
    """Why the kernels cannot serve inputs of these dtypes and side lengths, or None when they can."""
    for t in tensors:
        if t.dtype not in DTYPES:
            return f"inputs of dtype {t.dtype}: the kernels take fp32, fp16 or bf16 (their state is fp32)"
    tile = next_pow2(max(max_m, 1)) * next_pow2(max(max_n, 1))
    if tile > MAX_TILE:
        return f"a {max_m} x {max_n} problem needs a tile of {tile} elements, more than the kernel's {MAX_TILE}"
    return None


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _config(batch: int, max_m: int, max_n: int, dim: int | None, elem_bytes: int = 4,
            device: torch.device = torch.device("cpu")) -> dict:
    """Tile sizes by a fixed rule: powers of two covering the longest sides (at least 16 where tl.dot needs it),
    COL_LANES lanes along a row, SHRINK (half tiles for short problems) wherever one problem has a program and
    both halves hold 16 rows and COL_LANES columns. Warp counts:
    - from a cost: as many problems per program as fit TILE_TARGET elements; 32 tile elements per thread while the
      batch fits one program per SM, 64 while it fits four, 128 beyond; 32 lanes along a row at 4 warps, 16 at 2.
      The 64 x 128 tile's sweep (tune_kernels.py, 2026-11-27; H100 / H200 in us):
        B=256:  32 lanes 4 warps 84.3 / 83.3, 16 lanes 4 warps 101.0 / 101.9, 16 lanes 2 warps 134.1 / 133.7
        B=1024: 16 lanes 2 warps 227.5 / 229.2, 32 lanes 4 warps 253.5 / 257.9, 32 lanes 2 warps - / 294.5
        B=4096: 16 lanes 2 warps 724.7 / 743.9, 32 lanes 4 warps 889.4 / 916.0, 32 lanes 2 warps - / 969.1
      and 8 warps 0.46-0.55x. A small batch waits on one iteration's chain (fewest instructions per thread), a
      large one on the SMs' issue rate (fewest instructions per problem);
    - from vectors: one problem per program, its cosine one 2-D matrix product; 16-bit inputs 4 warps, 32 dims
      per step and 32 lanes (the lanes: 1.15x at B=1024 and 1.16x at B=256 against 16 on an H200, 2026-11-27;
      the rest: 1.2x forward, 1.7x backward against 8 warps and 16 dims on an H200, 2026-11-26); fp32 products
      (fp32 inputs, and fp16's backward: elem_bytes 4) 8 warps, 16 dims and 16 lanes from the 64 x 128 tile up
      (without spilling on sm_90: cuobjdump, benchmarks/compile_check.py)."""
    floor = 1 if dim is None else 16
    block_m = max(next_pow2(max(max_m, 1)), floor)
    block_n = max(next_pow2(max(max_n, 1)), floor)
    if dim is not None:
        wide = elem_bytes == 4 and block_m * block_n >= 8192
        shrink = min(block_m, block_n) >= 32
        return dict(PROBS=1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=16 if wide else 32,
                    COL_LANES=_lanes(NARROW_COL_LANES if wide else WIDE_COL_LANES, block_n, shrink), SHRINK=shrink,
                    num_warps=8 if wide else 4)
    probs = max(1, min(TILE_TARGET // (block_m * block_n), MAX_PROBS, next_pow2(max(batch, 1))))
    elements = probs * block_m * block_n
    sms = _sm_count(device)
    per_thread = 32 if batch <= sms else 64 if batch <= 4 * sms else 128
    warps = min(max(elements // (32 * per_thread), 1), 16)
    shrink = probs == 1 and min(block_m, block_n) >= 32
    lanes = _lanes(WIDE_COL_LANES if warps >= 4 else NARROW_COL_LANES, block_n, shrink)
    return dict(PROBS=probs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=16, COL_LANES=lanes, SHRINK=shrink,
                num_warps=warps)


def _lanes(lanes: int, block_n: int, shrink: bool) -> int:
    """At most the tile's columns, or its half tile's where it shrinks."""
    return min(lanes, block_n // 2 if shrink else block_n)


def _tuned(rule: dict, tune: dict | None, dim: int | None) -> dict:
    """The rule's launch with tune's entries over it; the kernels index one problem per program from vectors."""
    config = {**rule, **(tune or {})}
    if dim is not None and config["PROBS"] != 1:
        raise ValueError(f"tune={tune}: from vectors each program solves one problem (PROBS=1)")
    lanes = config["COL_LANES"]
    if lanes not in (1, 2, 4, 8, 16, 32) or lanes > config["BLOCK_N"]:
        raise ValueError(f"tune={tune}: COL_LANES must be a power of two from 1 to min(32, BLOCK_N="
                         f"{config['BLOCK_N']})")
    if config.get("DOT_PRECISION", "ieee") not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"tune={tune}: DOT_PRECISION must be ieee, tf32 or tf32x3")
    _check_maxnreg(config, tune)
    smallest = 16 if dim is not None else 1  # tl.dot's least side
    if config["SHRINK"] and (config["PROBS"] != 1 or config["BLOCK_N"] // 2 < max(lanes, smallest)
                             or config["BLOCK_M"] // 2 < smallest):
        raise ValueError(f"tune={tune}: SHRINK needs PROBS=1 and half tiles of at least COL_LANES={lanes} "
                         f"columns and {smallest} rows")
    return config


def _check_maxnreg(config: dict, tune: dict) -> None:
    """maxnreg (Triton's option: registers per thread, ptxas spilling past them) caps a launch's registers so that
    more of its programs fit an SM: the solver holds its whole tile in registers, which capped occupancy at 12.5%
    (Nsight Compute, RESULTS.md). sm_90 allocates 24 to 255."""
    value = config.get("maxnreg")
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 24 <= value <= 255):
        raise ValueError(f"tune={tune}: maxnreg must be an int from 24 to 255 (registers per thread)")


def _dot_precision(dtype: torch.dtype, backward: bool) -> str:
    """fp32 inputs: exact products ("ieee"; tf32 would cost the cosine three digits; "tf32x3", three tensor-core
    products with about fp32's error, is swept by tune_kernels for the forward: 1.39x faster there at B=1024 on an
    H100, 2026-11-27, but the same precision crashed the backward's kernel, so it is not the rule).
    bf16: tensor cores, bf16 operands forward and, on a GPU, backward (backward_launch's LOW_OPERANDS); tf32
    where that is off (both finer than the bf16 result). fp16: fp16
    operands forward, exact backward (tf32 is no finer than the fp16 gradient it would feed)."""
    if dtype == torch.float32 or (backward and dtype == torch.float16):
        return "ieee"
    if dtype == torch.bfloat16 and interpreting():  # the interpreter's bf16 dot gives NaN (numpy has no bf16)
        return "ieee"
    return "tf32"


BACKWARD_KEYS = ("BLOCK_D", "SPLITS", "DOT_PRECISION", "LOW_OPERANDS", "num_warps", "num_stages",
                 "maxnreg")  # what tune= sets


def backward_launch(batch: int, max_m: int, max_n: int, dim: int, dtype: torch.dtype,
                    device: torch.device = torch.device("cpu")) -> tuple[dict, str]:
    """The cosine backward's launch rule and its products' precision: the forward's tile, dims and warps (exact
    products run on the FMA units like fp32 inputs', so they take fp32's launch: for fp16, 4 warps and 32 dims
    spilled 7.7 KB on sm_90), and each problem's dims split over SPLITS programs until the batch makes four
    programs per SM. One pipeline stage: 1.73x faster than three for bf16 at B=1024 on an H100 (tune_kernels.py,
    2026-11-27; two 1.34x, four 0.91x), and fp32's exact products take 127 registers against 255 (sm_90).
    bf16 vectors: the products on bf16 operands (LOW_OPERANDS; the kernel's doc), except in the interpreter, 64 dims
    per step. H200, 2026-11-27 (tune_kernels.py): bf16 operands 1.36x faster than tf32 at B=1024 (270.5 against
    367.7 us) and 1.28x at B=256 (83.3 against 106.6); then 64 dims 1.22x (221.2) and 1.17x (71.3) over 32."""
    precision = _dot_precision(dtype, True)
    elem_bytes = 4 if precision == "ieee" else dtype.itemsize
    rule = _config(batch, max_m, max_n, dim, elem_bytes, device)
    low = dtype == torch.bfloat16 and not interpreting()  # the interpreter's bf16 dot gives NaN
    block_d = 64 if low else rule["BLOCK_D"]
    chunks = cdiv(dim, block_d)
    splits = min(chunks, cdiv(4 * _sm_count(device), max(batch, 1)))
    return dict(BLOCK_M=rule["BLOCK_M"], BLOCK_N=rule["BLOCK_N"], BLOCK_D=block_d, SPLITS=splits,
                LOW_OPERANDS=low, num_warps=rule["num_warps"], num_stages=1), precision


# the rules once per shape (host time); their dicts are shared, so the launchers copy before changing one
_rule = functools.lru_cache(maxsize=4096)(_config)
_backward_rule = functools.lru_cache(maxsize=4096)(backward_launch)


def _tuned_backward(rule: dict, tune: dict | None, dtype: torch.dtype) -> dict:
    unknown = sorted(set(tune or {}) - set(BACKWARD_KEYS))
    if unknown:
        raise ValueError(f"tune={tune}: the cosine backward takes {', '.join(BACKWARD_KEYS)}, not {unknown}")
    config = {**rule, **(tune or {})}
    if config["BLOCK_D"] not in (16, 32, 64, 128) or not (isinstance(config["SPLITS"], int) and config["SPLITS"] >= 1):
        raise ValueError(f"tune={tune}: BLOCK_D must be 16, 32, 64 or 128 and SPLITS a positive int")
    if not isinstance(config["LOW_OPERANDS"], bool):
        raise ValueError(f"tune={tune}: LOW_OPERANDS must be True or False")
    _check_maxnreg(config, tune)
    if config["LOW_OPERANDS"] and dtype == torch.bfloat16 and interpreting():
        raise ValueError(f"tune={tune}: LOW_OPERANDS with bf16 vectors needs a GPU (the interpreter's bf16 products "
                         "give NaN)")
    if config.get("DOT_PRECISION", "ieee") not in ("ieee", "tf32"):
        # tf32x3 compiles, but its fp32 launch hit an illegal memory access on an H100 (Triton 3.6, 2026-11-27)
        raise ValueError(f"tune={tune}: the cosine backward's DOT_PRECISION must be ieee or tf32 (tf32x3 crashed "
                         f"its kernel on sm_90 with Triton 3.6)")
    return config


def _check_stats(stats: torch.Tensor, batch: int, max_m: int, max_n: int) -> None:
    """The kernels index grad_stats flat: refuse a buffer of another shape, dtype or layout."""
    if stats.shape != (batch, 2, max_m + max_n) or stats.dtype != torch.float32 or not stats.is_contiguous():
        raise ValueError(f"grad_stats buffer: expected a contiguous fp32 tensor of shape {(batch, 2, max_m + max_n)} "
                         f"(grad_stats(batch, max_m, max_n, device)), got {stats.dtype} {tuple(stats.shape)}")


def grad_stats(batch: int, max_m: int, max_n: int, device: torch.device) -> torch.Tensor:
    """The buffer transport_vectors fills for cosine_backward: per problem, [0] the inverse norms 1/max(|x|, eps)
    of its text rows then its region rows, [1] each row's and column's sum of T * cos."""
    return torch.empty(batch, 2, max_m + max_n, device=device, dtype=torch.float32)


def _rows_args(rows: Rows, lens: torch.Tensor) -> tuple:
    """(data, starts, strides) as the kernels take them; padded data passes lens where starts go (unread)."""
    return (rows.data, lens if rows.starts is None else rows.starts.contiguous(), *rows.strides)


def _forward(cost: torch.Tensor | None, text: Rows | None, regions: Rows | None, text_lens: torch.Tensor,
             region_lens: torch.Tensor, solve: Solve, want_plan: bool, tune: dict | None,
             stats: torch.Tensor | None = None):
    batch = text_lens.shape[0]
    max_m, max_n = (cost.shape[1], cost.shape[2]) if cost is not None else (text.length, regions.length)
    text_lens, region_lens = text_lens.contiguous(), region_lens.contiguous()  # the kernels index them flat
    device = text_lens.device
    dist = torch.empty(batch, device=device, dtype=torch.float32)
    counts = torch.empty(batch, device=device, dtype=torch.int32) if solve.tol is not None else None
    dim = None if cost is not None else text.data.shape[-1]
    data = cost if cost is not None else text.data
    rule = _rule(batch, max_m, max_n, dim, data.dtype.itemsize, data.device)
    config = _tuned(rule, tune, dim) if tune else rule  # the rule's dict is shared: never changed here
    # a shrunk tile writes only its part of the plan: the rest must be zeros already
    alloc = torch.zeros if config["SHRINK"] else torch.empty
    plan = alloc(batch, max_m, max_n, device=device, dtype=torch.float32) if want_plan else None
    if batch == 0:
        return dist, plan, counts
    if cost is not None:
        cost_args, x_args, y_args = (cost, *cost.stride()), (cost, text_lens, 0, 0, 0), (cost, text_lens, 0, 0, 0)
    else:
        cost_args, x_args, y_args = (dist, 0, 0, 0), _rows_args(text, text_lens), _rows_args(regions, region_lens)
    plan_args = (plan, *plan.stride()) if want_plan else (dist, 0, 0, 0)
    inner = 1 if solve.method == "sinkhorn_log" else solve.k
    grid = (cdiv(batch, config["PROBS"]),)
    launch_kernel(
        _transport_kernel, grid,
        *cost_args, *x_args, *y_args, text_lens, region_lens,
        dist, *plan_args, dist if counts is None else counts, dist if stats is None else stats,
        batch, max_m, max_n, dim or 0, solve.iterations, inner, float(solve.scale), float(solve.tol or 0.0),
        METHOD=METHODS[solve.method], FROM_VECTORS=cost is None, PACKED=text is not None and text.starts is not None,
        WRITE_PLAN=want_plan, WRITE_STATS=stats is not None, USE_TOL=solve.tol is not None,
        **(config if "DOT_PRECISION" in config else {**config, "DOT_PRECISION": _dot_precision(data.dtype, False)}),
    )
    return dist, plan, counts


def transport_cost(cost: torch.Tensor, text_lens: torch.Tensor, region_lens: torch.Tensor, solve: Solve,
                   *, want_plan: bool = False, tune: dict | None = None):
    """(dist (B,) fp32, plan (B, M, N) fp32 or None, counts (B,) int32 or None) from a cost (B, M, N).
    tune: launch parameters (PROBS, COL_LANES, SHRINK, DOT_PRECISION, num_warps...) over _config's rule
    (benchmarks/tune_kernels.py)."""
    return _forward(cost, None, None, text_lens, region_lens, solve, want_plan, tune)


def transport_vectors(text: Rows, regions: Rows, text_lens: torch.Tensor, region_lens: torch.Tensor, solve: Solve,
                      *, want_plan: bool = False, stats: torch.Tensor | None = None, tune: dict | None = None):
    """As transport_cost, with C = 1 - cos(text_i, region_j) computed in the kernel; both sides padded or packed.
    stats: a grad_stats buffer to fill for cosine_backward (which takes the plan too)."""
    assert (text.starts is None) == (regions.starts is None), "text and regions must both be padded or both packed"
    if stats is not None:
        _check_stats(stats, text_lens.shape[0], text.length, regions.length)
    return _forward(None, text, regions, text_lens, region_lens, solve, want_plan, tune, stats)


def cosine_backward(text: Rows, regions: Rows, text_lens: torch.Tensor, region_lens: torch.Tensor,
                    plan: torch.Tensor, stats: torch.Tensor, grad_dist: torch.Tensor, tune: dict | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum_b grad_dist[b] * dist_b into text.data and regions.data with the plan constant; stats:
    the grad_stats buffer of the forward that made the plan. Rows outside every problem get 0 (padded rows: the
    kernel writes them; packed rows: they are zeroed first)."""
    batch, dim = text_lens.shape[0], text.data.shape[-1]
    if batch == 0 or dim == 0:
        return torch.zeros_like(text.data), torch.zeros_like(regions.data)
    alloc = torch.zeros_like if text.starts is not None else torch.empty_like
    grad_text, grad_regions = alloc(text.data), alloc(regions.data)
    text_lens, region_lens = text_lens.contiguous(), region_lens.contiguous()
    max_m, max_n = text.length, regions.length
    if plan.shape != (batch, max_m, max_n):  # the kernel stores every row of the plan's blocks (padded rows)
        raise ValueError(f"cosine_backward: the plan must be (batch, text rows, region rows) = {(batch, max_m, max_n)}"
                         f" as its forward made it, got {tuple(plan.shape)}")
    _check_stats(stats, batch, max_m, max_n)
    rule, precision = _backward_rule(batch, max_m, max_n, dim, text.data.dtype, text.data.device)
    config = _tuned_backward(rule, tune, text.data.dtype) if tune else rule  # the rule's dict: never changed
    precision = config.get("DOT_PRECISION", precision)
    chunks = cdiv(dim, config["BLOCK_D"])
    per_split = cdiv(chunks, min(config["SPLITS"], chunks))  # BLOCK_D chunks per program
    splits = cdiv(chunks, per_split)  # none left empty
    gx = Rows(grad_text, text.starts, text.max_len)
    gy = Rows(grad_regions, regions.starts, regions.max_len)
    launch_kernel(
        _cosine_grad_kernel, (batch * splits,),
        *_rows_args(text, text_lens), *_rows_args(regions, region_lens),
        grad_text, *gx.strides, grad_regions, *gy.strides,
        text_lens, region_lens, plan, *plan.stride(), stats, grad_dist.float().contiguous(),
        max_m, max_n, dim, splits, per_split * config["BLOCK_D"], PACKED=text.starts is not None,
        DOT_PRECISION=precision, EVEN_D=dim % config["BLOCK_D"] == 0,
        **{k: v for k, v in config.items() if k not in ("SPLITS", "DOT_PRECISION")},
    )
    return grad_text, grad_regions
