"""Plain-PyTorch reference of every op: the path on any device and the oracle of the tests.

Packed layout: the rows of sample b are rows cu_seqlens[b] .. cu_seqlens[b+1] of a (total, ...) tensor.
Nothing here synchronises with the host: sizes that shape a tensor (max_seqlen, totals) come in as ints.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# packing helpers
# ----------------------------------------------------------------------------------------------------------


def pad_rows(x: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """Gather rows starts[b] .. starts[b]+lens[b] of x into (B, max_len, *x.shape[1:]), zeros beyond lens[b]."""
    pos = torch.arange(max_len, device=x.device)
    valid = pos[None, :] < lens[:, None]
    index = (starts[:, None].long() + pos[None, :]).clamp_(0, max(x.shape[0] - 1, 0))
    index = torch.where(valid, index, torch.zeros_like(index))
    if x.shape[0] == 0:  # nothing to gather from: every row is padding
        return x.new_zeros(lens.shape[0], max_len, *x.shape[1:])
    out = x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])  # backward: index_add, not index_put
    # where, not * valid: a non-finite row read for the pads (row 0) must not make them NaN (0 * inf, 0 * NaN)
    return torch.where(valid.view(*valid.shape, *([1] * (x.dim() - 1))), out, 0)


def zero_pads(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) with rows lens[b] onwards of entry b set to 0, whatever they held (NaN included): so that padding
    reaches no result and no gradient (0 * NaN would)."""
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < lens[:, None]
    return torch.where(valid.view(*valid.shape, *([1] * (x.dim() - 2))), x, 0)


def row_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed row: (sample index, position within its sample)."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    sample = torch.repeat_interleave(torch.arange(lens.shape[0], device=cu_seqlens.device), lens, output_size=total)
    return sample, torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[sample]


def unpad_rows(padded: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Inverse of pad_rows with starts = cu_seqlens[:-1]: (B, L, ...) -> (total, ...)."""
    sample, pos = row_positions(cu_seqlens, total)
    return padded[sample, pos]


# ----------------------------------------------------------------------------------------------------------
# variable-length attention
# ----------------------------------------------------------------------------------------------------------


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional attention within each packed sample: q, k, v (total, heads, head_dim) -> (total, heads, head_dim).

    Pads to (B, heads, max_seqlen, head_dim), runs scaled_dot_product_attention with a key-padding mask and
    unpads. A key-padding mask with -inf equals the original's additive -10000 in fp32 (exp underflows to 0).
    dropout_mask: (B, heads, max_seqlen, max_seqlen) bool keep-mask to apply instead of drawing one (the tests
    pass the triton kernels' mask); the probabilities kept are scaled by 1 / (1 - dropout_p).
    """
    total = q.shape[0]
    starts, lens = cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1]
    qp, kp, vp = (pad_rows(t, starts, lens, max_seqlen).transpose(1, 2) for t in (q, k, v))
    keys = torch.arange(max_seqlen, device=q.device)[None, :] < lens[:, None]
    keys = keys | (lens == 0)[:, None]  # an empty sample attends to its (zero) pads, not to nothing: no NaN
    if dropout_mask is None:
        out = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=keys[:, None, None, :], dropout_p=dropout_p, scale=softmax_scale
        )
    else:
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        scores = (qp @ kp.transpose(-1, -2) * scale).masked_fill(~keys[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1) * dropout_mask.to(scores.dtype) / (1.0 - dropout_p)
        out = probs @ vp
    return unpad_rows(out.transpose(1, 2), cu_seqlens, total)


def attention_probs_ref(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, *, softmax_scale: float | None = None
) -> list[torch.Tensor]:
    """The attention probabilities of each sample, (heads, L_b, L_b) in fp32 or finer: for maps and visualisation."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    bounds = cu_seqlens.tolist()
    probs = []
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 maps (fp64 for fp64 inputs)
    with torch.autocast(q.device.type, enabled=False):  # also inside a bf16 autocast region
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            scores = torch.einsum("qhd,khd->hqk", q[lo:hi].to(dtype), k[lo:hi].to(dtype)) * scale
            probs.append(scores.softmax(-1))
    return probs


# ---- optimal transport ----
# Orientation: cost and plan are (B, M, N) = text x regions; problem b uses the block [:m_b, :n_b], with
# m_b = text_lens[b] and n_b = region_lens[b]. Marginals are uniform: 1/m on valid rows, 1/n on valid columns.


def check_ot_args(
    cost: torch.Tensor,
    text_lens: torch.Tensor,
    region_lens: torch.Tensor,
    *,
    positive: dict[str, float] | None = None,
    counts: dict[str, int] | None = None,
) -> None:
    """Raise TypeError/ValueError naming the argument when an OT call's inputs are malformed.

    positive: finite real parameters that must be > 0 (beta, eps); counts: integers that must be >= 1.
    The lens' values are checked only on the CPU: reading them from an accelerator would sync with the host.
    """
    _check_float(cost, "cost", 3, "(batch, text, regions)")
    bounds = {"text_lens": (text_lens, cost.shape[1], "cost.shape[1]"),
              "region_lens": (region_lens, cost.shape[2], "cost.shape[2]")}
    _check_index_vectors(bounds, cost.shape[0], "cost's batch size", "cost", cost.device)
    _check_params(positive, counts)


def check_ot_vectors(
    text: torch.Tensor,
    regions: torch.Tensor,
    text_lens: torch.Tensor,
    region_lens: torch.Tensor,
    *,
    positive: dict[str, float] | None = None,
    counts: dict[str, int] | None = None,
) -> None:
    """check_ot_args for the padded vectors text (B, M, D) and regions (B, N, D) of a cosine-cost OT call."""
    _check_float(text, "text", 3, "(batch, words, dim)")
    _check_float(regions, "regions", 3, "(batch, regions, dim)")
    _check_same_source(text, regions, "text", "regions", (0, 2))
    bounds = {"text_lens": (text_lens, text.shape[1], "text.shape[1]"),
              "region_lens": (region_lens, regions.shape[1], "regions.shape[1]")}
    _check_index_vectors(bounds, text.shape[0], "text's batch size", "text", text.device)
    _check_params(positive, counts)


def check_ot_packed(
    hidden: torch.Tensor,
    text_starts: torch.Tensor,
    text_lens: torch.Tensor,
    region_starts: torch.Tensor,
    region_lens: torch.Tensor,
    max_text_len: int,
    max_regions: int,
    *,
    positive: dict[str, float] | None = None,
    counts: dict[str, int] | None = None,
) -> None:
    """check_ot_args for packed rows: problem b's text is rows text_starts[b] .. + text_lens[b] of hidden (total, D),
    its regions rows region_starts[b] .. + region_lens[b]; max_text_len and max_regions bound the lens."""
    _check_float(hidden, "hidden", 2, "(total rows, dim)")
    for name, value in (("max_text_len", max_text_len), ("max_regions", max_regions)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    total = hidden.shape[0]
    bounds = {"text_lens": (text_lens, max_text_len, "max_text_len"),
              "region_lens": (region_lens, max_regions, "max_regions"),
              "text_starts": (text_starts, total, "hidden.shape[0]"),
              "region_starts": (region_starts, total, "hidden.shape[0]")}
    batch = text_lens.shape[0] if isinstance(text_lens, torch.Tensor) and text_lens.dim() == 1 else -1
    _check_index_vectors(bounds, batch, "text_lens' length", "hidden", hidden.device)
    for side in ("text", "region"):
        starts, lens = bounds[f"{side}_starts"][0], bounds[f"{side}_lens"][0]
        if starts.device.type == "cpu" and batch > 0 and int((starts + lens).max()) > total:
            raise ValueError(f"{side}_starts + {side}_lens must be <= {total} (hidden.shape[0]), "
                             f"got up to {int((starts + lens).max())}")
    _check_params(positive, counts)


def _check_float(x: object, name: str, dim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_describe(x)}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {layout}, got shape {tuple(x.shape)}")


def _check_same_source(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str, dims: tuple[int, ...]) -> None:
    """b must match a in the given dims, dtype and device (the kernels read both with one set of types)."""
    for d in dims:
        if b.shape[d] != a.shape[d]:
            raise ValueError(f"{name_b}.shape[{d}] is {b.shape[d]} but {name_a}.shape[{d}] is {a.shape[d]}")
    if b.dtype != a.dtype:
        raise TypeError(f"{name_b} has dtype {b.dtype} but {name_a} has {a.dtype}")
    if b.device != a.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}")


def _check_index_vectors(
    bounds: dict[str, tuple[object, int, str]], batch: int, batch_desc: str, owner: str, device: torch.device
) -> None:
    """Each name -> (tensor, bound, what the bound is): integer tensors of shape (batch,) on device, values in
    [0, bound] (checked on the CPU only)."""
    for name, (x, bound, bound_desc) in bounds.items():
        integer = isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex())
        if not integer or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {_describe(x)}")
        if x.dim() != 1 or (batch >= 0 and x.shape[0] != batch):
            length = f" of length {batch} ({batch_desc})" if batch >= 0 else ""
            raise ValueError(f"{name} must be 1-D{length}, got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but {owner} is on {device}")
        if x.device.type == "cpu" and x.numel() and (int(x.min()) < 0 or int(x.max()) > bound):
            raise ValueError(
                f"{name} must lie in [0, {bound}] ({bound_desc}), got values from {int(x.min())} to {int(x.max())}"
            )


def _check_params(positive: dict[str, float] | None, counts: dict[str, int] | None) -> None:
    for name, value in (positive or {}).items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    for name, value in (counts or {}).items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")


def _describe(x: object) -> str:
    return f"a tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else f"{type(x).__name__}"


def _ot_masks(
    text_lens: torch.Tensor, region_lens: torch.Tensor, shape: torch.Size, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Valid text rows (B, M), valid region columns (B, N), and m, n as (B, 1) of `dtype`.

    A problem with an empty side has no mass to move: both its sides count as empty, so its plan is all zero.
    """
    empty = (text_lens == 0) | (region_lens == 0)
    m = torch.where(empty, 0, text_lens)
    n = torch.where(empty, 0, region_lens)
    rows = torch.arange(shape[1], device=m.device)[None, :] < m[:, None]
    cols = torch.arange(shape[2], device=n.device)[None, :] < n[:, None]
    return rows, cols, m[:, None].to(dtype), n[:, None].to(dtype)


def _masked_reciprocal(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1/x where valid, exactly 0 elsewhere, without computing 1/0 on the pads."""
    return torch.where(valid, 1 / torch.where(valid, x, 1), 0)


def _state_dtype(cost: torch.Tensor) -> torch.dtype:
    """fp32 state for fp16/bf16/fp32 costs (half precision loses most of the plan), fp64 for fp64."""
    return torch.promote_types(cost.dtype, torch.float32)


@torch.no_grad()
def ipot_plan_ref(
    cost: torch.Tensor,
    text_lens: torch.Tensor,
    region_lens: torch.Tensor,
    *,
    beta: float = 0.5,
    iterations: int = 50,
    k: int = 1,
) -> torch.Tensor:
    """IPOT transport plan (B, M, N), as the original UNITER computes it, with exact zeros on the pads.

    Per iteration: Q = A * T with A = exp(-C / beta); k times: delta = 1 / (n Q^T sigma) on valid regions,
    sigma = 1 / (m Q delta) on valid text; then T = diag(sigma) Q diag(delta). Rows therefore sum to 1/m;
    columns approach 1/n. The original's `+1e4 on pads` is replaced by masking; the result is the same.
    Valid cost entries with exp(-C / beta) underflowing for a whole row or column give inf/NaN, as in the
    original: keep C / beta well below ~80 (fp32) on valid entries.
    """
    check_ot_args(cost, text_lens, region_lens, positive={"beta": beta}, counts={"iterations": iterations, "k": k})
    dtype = _state_dtype(cost)
    rows, cols, m, n = _ot_masks(text_lens, region_lens, cost.shape, dtype)
    mask = rows[:, :, None] & cols[:, None, :]
    kernel = torch.where(mask, torch.exp(-cost.to(dtype) / beta), 0)  # pads of cost may hold anything
    plan = mask.to(dtype)
    sigma = _masked_reciprocal(m, rows)
    for _ in range(iterations):
        q = kernel * plan
        for _ in range(k):  # the same Q each inner step (the original's k > 1 crashes on a shape bug)
            delta = _masked_reciprocal(n * (sigma[:, None, :] @ q).squeeze(1), cols)
            sigma = _masked_reciprocal(m * (q @ delta[:, :, None]).squeeze(2), rows)
        plan = sigma[:, :, None] * q * delta[:, None, :]
    return plan


@torch.no_grad()
def sinkhorn_plan_ref(
    cost: torch.Tensor,
    text_lens: torch.Tensor,
    region_lens: torch.Tensor,
    *,
    eps: float,
    iterations: int,
) -> torch.Tensor:
    """Entropic OT plan (B, M, N) by log-domain Sinkhorn on the kernel exp(-C / eps), pads exactly 0.

    Potentials f (text), g (regions) start at 0; each iteration updates g then f, as POT's
    `sinkhorn_log` does, so rows sum to 1/m and columns approach 1/n. Pads carry -inf in the log kernel and
    in the potentials (never +inf, so no -inf + inf = NaN); an all-pad row's logsumexp is -inf, masked off.
    """
    check_ot_args(cost, text_lens, region_lens, positive={"eps": eps}, counts={"iterations": iterations})
    dtype = _state_dtype(cost)
    rows, cols, m, n = _ot_masks(text_lens, region_lens, cost.shape, dtype)
    log_kernel = torch.where(rows[:, :, None] & cols[:, None, :], -cost.to(dtype) / eps, -math.inf)
    log_a, log_b = -torch.log(m.clamp(min=1)), -torch.log(n.clamp(min=1))  # clamp: empty problems are masked
    f = torch.where(rows, 0.0, -math.inf).to(dtype)
    for _ in range(iterations):
        g = torch.where(cols, log_b - torch.logsumexp(log_kernel + f[:, :, None], dim=1), -math.inf)
        f = torch.where(rows, log_a - torch.logsumexp(log_kernel + g[:, None, :], dim=2), -math.inf)
    return torch.exp(log_kernel + f[:, :, None] + g[:, None, :])


def transport_distance_ref(cost: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """<C, T> per problem, (B,), with T held constant: d dist / d cost = plan. fp32 (fp64 for fp64 inputs).

    Only entries where the plan is nonzero contribute, so garbage (even NaN) on the pads of cost is ignored.
    """
    plan = plan.detach()
    dtype = torch.promote_types(_state_dtype(cost), plan.dtype)
    terms = cost.to(dtype) * plan.to(dtype)
    return torch.where(plan != 0, terms, 0).sum(dim=(1, 2))


# Normalisation floor of UNITER's cosine cost (F.normalize's eps in the original).
COSINE_EPS = 1e-5


def cosine_cost_ref(text: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """UNITER's WRA cost C = 1 - cos: (B, M, D), (B, N, D) -> (B, M, N), fp32 (fp64 for fp64 inputs).

    Vectors are normalised as F.normalize(eps=1e-5) does; zero (padding) vectors get cosine 0, cost 1.
    """
    dtype = _state_dtype(text)
    text = F.normalize(text.to(dtype), dim=-1, eps=COSINE_EPS)
    regions = F.normalize(regions.to(dtype), dim=-1, eps=COSINE_EPS)
    return 1 - text @ regions.transpose(1, 2)
