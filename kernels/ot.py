"""Optimal transport between text tokens and image regions: UNITER's word-region alignment (WRA).

Inputs are batched and padded: cost (B, M, N) = text x regions, with valid lengths text_lens (B,) and
region_lens (B,), integer tensors on cost's device. Problem b moves uniform mass 1/m_b from its m_b text
rows to its n_b region columns; entries beyond the lengths are padding and get exactly 0 in the plan. A
problem with m_b = 0 or n_b = 0 has an all-zero plan and distance 0.

- `ipot`: the Inexact Proximal point OT (Xie et al. 2018) that UNITER trains with; `beta` is the proximal
  step, `k` the inner Sinkhorn steps per iteration. Defaults are the original's (0.5, 50, 1). `log_domain`
  runs the same iterates on log potentials (never underflows, but in fp32 it rounds t C / beta: about 1e-4 relative
  on the plan at the original's 50 iterations; triton backend, the reference runs the linear form).
- `sinkhorn`: entropic OT with regularisation `eps`, in the log domain; biased by eps, offered for comparison.
- `wra_distance`: the cost 1 - cos(text_i, region_j) from the vectors (B, M, D), (B, N, D), fused with the
  solver on the triton backend; `wra_distance_packed` reads the rows of a packed (total, D) encoder output.
  `method` picks the solver: "ipot", "ipot_log" or "sinkhorn_log" (which needs eps).

All return dist (B,) = sum_ij C_ij T_ij, in fp32 (fp64 for fp64 inputs on the torch backend); with return_plan
also the plan T (B, M, N), fp32 (fp64 for fp64); with a tolerance `tol` also, last, the iterations each problem
ran (B,) int32. The solver state is fp32 whatever the input dtype; fp64 inputs are served by the torch backend.

Gradient: the plan is a constant (envelope), as in the original (which solves under no_grad): d dist / d cost
= T, hence 0 on the pads; through the cosine cost into the vectors (a fused kernel on the triton backend).
wra_distance(grad="unrolled") differentiates through the iterations instead: it runs the torch reference loop
under autograd whatever the backend (memory iterations x B x M x N; IPOT methods only, both forms running the
linear loop). Early stopping: `tol` stops each problem once the L1 distance of its plan's column sums to 1/n
is below tol, checked on the device every iteration (triton); the torch reference runs every iteration.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import reference
from .backend import choose

METHODS = ("ipot", "ipot_log", "sinkhorn_log")
GRADS = ("envelope", "unrolled")

# A solver: (method, cost, text_lens, region_lens, params, want_plan, tol) -> (dist, plan or None, counts or None),
# params being the reference's keyword arguments (beta, iterations, k; or eps, iterations).
Solver = Callable[..., tuple]


def _kernels():
    """The Triton module, imported on first use: the package imports without triton and before TRITON_INTERPRET."""
    from . import ot_triton

    return ot_triton


def _reference_counts(text_lens: torch.Tensor, region_lens: torch.Tensor, iterations: int) -> torch.Tensor:
    """The reference never stops early: every nonempty problem runs all iterations."""
    return torch.where((text_lens > 0) & (region_lens > 0), iterations, 0).to(torch.int32)


def _torch_solve(method, cost, text_lens, region_lens, params, want_plan, tol):
    # the linear IPOT loop serves both IPOT forms: they are the same iterates
    plan_ref = reference.sinkhorn_plan_ref if method == "sinkhorn_log" else reference.ipot_plan_ref
    plan = plan_ref(cost, text_lens, region_lens, **params)
    counts = None if tol is None else _reference_counts(text_lens, region_lens, params["iterations"])
    return reference.transport_distance_ref(cost, plan), plan, counts


def _options(method: str, params: dict, tol: float | None):
    """The kernels' Solve options from the reference's keyword arguments."""
    scale = 1.0 / (params["eps"] if method == "sinkhorn_log" else params["beta"])
    return _kernels().Solve(method, scale, params["iterations"], params.get("k", 1), tol)


def _triton_solve(method, cost, text_lens, region_lens, params, want_plan, tol):
    return _kernels().transport_cost(cost, text_lens, region_lens, _options(method, params, tol), want_plan=want_plan)


# Solvers by backend: backend.choose picks "triton" where _triton_reason finds no obstacle.
_SOLVERS: dict[str, Solver] = {"torch": _torch_solve, "triton": _triton_solve}


def _triton_reason(tensors: tuple[torch.Tensor, ...], max_m: int, max_n: int) -> str | None:
    try:
        kernels = _kernels()
    except ImportError as err:
        return f"triton is not available ({err})"
    return kernels.unsupported(tensors, max_m, max_n)


def _result(dist: torch.Tensor, plan: torch.Tensor | None, counts: torch.Tensor | None):
    """dist, then the plan when asked for, then the counts when a tolerance was given."""
    extra = tuple(t for t in (plan, counts) if t is not None)
    return (dist, *extra) if extra else dist


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------------------
# autograd: the plan held constant
# ----------------------------------------------------------------------------------------------------------


class _CostEnvelope(torch.autograd.Function):
    """(dist, plan, counts) = solve(cost), with d dist / d cost = plan (the envelope gradient)."""

    @staticmethod
    def forward(ctx, cost, solve):
        dist, plan, counts = solve(cost.detach())
        ctx.cost_dtype = cost.dtype
        ctx.save_for_backward(plan)
        ctx.mark_non_differentiable(*(t for t in (plan, counts) if t is not None))
        return dist, plan, counts

    @staticmethod
    def backward(ctx, grad_dist, *_):
        (plan,) = ctx.saved_tensors
        return (grad_dist[:, None, None].to(plan.dtype) * plan).to(ctx.cost_dtype), None


class _VectorEnvelope(torch.autograd.Function):
    """(dist, plan, counts) from text and region rows through the fused cosine cost; backward by the kernel,
    with the plan held constant (and the forward's norms and plan-weighted cosine sums: grad_stats)."""

    @staticmethod
    def forward(ctx, text_data, region_data, text_starts, region_starts, text_lens, region_lens, sizes, solve,
                want_plan, want_grad):
        kernels = _kernels()
        text = kernels.Rows(text_data, text_starts, sizes[0])
        regions = kernels.Rows(region_data, region_starts, sizes[1])
        stats = kernels.grad_stats(text_lens.shape[0], *sizes, text_data.device) if want_grad else None
        dist, plan, counts = kernels.transport_vectors(text, regions, text_lens, region_lens, solve,
                                                       want_plan=want_plan, stats=stats)
        ctx.sizes = sizes
        ctx.save_for_backward(text_data, region_data, text_starts, region_starts, text_lens, region_lens, plan, stats)
        ctx.mark_non_differentiable(*(t for t in (plan, counts) if t is not None))
        return dist, plan, counts

    @staticmethod
    def backward(ctx, grad_dist, *_):
        text_data, region_data, text_starts, region_starts, text_lens, region_lens, plan, stats = ctx.saved_tensors
        kernels = _kernels()
        grads = kernels.cosine_backward(kernels.Rows(text_data, text_starts, ctx.sizes[0]),
                                        kernels.Rows(region_data, region_starts, ctx.sizes[1]),
                                        text_lens, region_lens, plan, stats, grad_dist)
        return (grads[0] if ctx.needs_input_grad[0] else None, grads[1] if ctx.needs_input_grad[1] else None,
                *([None] * 8))


# ----------------------------------------------------------------------------------------------------------
# cost input
# ----------------------------------------------------------------------------------------------------------


def _solve_cost(chosen: str, method: str, cost, text_lens, region_lens, params: dict, return_plan: bool, tol):
    want_plan = return_plan or _wants_grad(cost)  # the backward needs the plan
    solve = functools.partial(_SOLVERS[chosen], method, text_lens=text_lens, region_lens=region_lens,
                              params=params, want_plan=want_plan, tol=tol)
    dist, plan, counts = _CostEnvelope.apply(cost, solve)
    return _result(dist, plan if return_plan else None, counts)


def _choose_for_cost(op: str, cost: torch.Tensor, backend: str | None) -> str:
    return choose(op, backend, cost.device, _triton_reason((cost,), cost.shape[1], cost.shape[2]))


def _tol_arg(tol: float | None) -> dict[str, float]:
    return {} if tol is None else {"tol": tol}


def ipot(
    cost: torch.Tensor,
    text_lens: torch.Tensor,
    region_lens: torch.Tensor,
    *,
    beta: float = 0.5,
    iterations: int = 50,
    k: int = 1,
    log_domain: bool = False,
    tol: float | None = None,
    return_plan: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """IPOT distance (B,), [plan], [iterations run when tol]; gradient into cost with the plan constant."""
    # Validate before choosing a backend, so a bad call reads as a bad call whatever serves it.
    reference.check_ot_args(cost, text_lens, region_lens, positive={"beta": beta, **_tol_arg(tol)},
                            counts={"iterations": iterations, "k": k})
    params = {"beta": beta, "iterations": iterations, "k": k}
    chosen = _choose_for_cost("ipot", cost, backend)
    method = "ipot_log" if log_domain else "ipot"
    return _solve_cost(chosen, method, cost, text_lens, region_lens, params, return_plan, tol)


def sinkhorn(
    cost: torch.Tensor,
    text_lens: torch.Tensor,
    region_lens: torch.Tensor,
    *,
    eps: float,
    iterations: int = 100,
    tol: float | None = None,
    return_plan: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Entropic OT distance <C, T_eps> (B,), [plan], [iterations run when tol]; gradient with the plan constant."""
    reference.check_ot_args(cost, text_lens, region_lens, positive={"eps": eps, **_tol_arg(tol)},
                            counts={"iterations": iterations})
    params = {"eps": eps, "iterations": iterations}
    chosen = _choose_for_cost("sinkhorn", cost, backend)
    return _solve_cost(chosen, "sinkhorn_log", cost, text_lens, region_lens, params, return_plan, tol)


# ----------------------------------------------------------------------------------------------------------
# vector input: the cosine cost fused
# ----------------------------------------------------------------------------------------------------------


def _method_params(method: str, beta: float, eps: float | None, iterations: int, k: int, grad: str,
                   tol: float | None) -> tuple[dict, dict, dict]:
    """(reference keyword arguments, positive reals, counts) for a vector call; raises on a bad method/grad/eps."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {', '.join(GRADS)}, got {grad!r}")
    if method == "sinkhorn_log":
        if eps is None:
            raise ValueError("method 'sinkhorn_log' needs eps (the entropic regularisation)")
        if grad == "unrolled":
            # the reference's log-sum-exp over all-pad columns has NaN derivatives
            raise ValueError("grad='unrolled' is offered for the IPOT methods ('ipot', 'ipot_log') only")
        return {"eps": eps, "iterations": iterations}, {"eps": eps, **_tol_arg(tol)}, {"iterations": iterations}
    return ({"beta": beta, "iterations": iterations, "k": k}, {"beta": beta, **_tol_arg(tol)},
            {"iterations": iterations, "k": k})


def _unrolled(method: str, cost, text_lens, region_lens, params: dict, return_plan: bool, tol):
    """The torch reference loop under autograd: the gradient flows through every iteration."""
    plan = reference.ipot_plan_ref.__wrapped__(cost, text_lens, region_lens, **params)  # without its no_grad
    dist = (cost * plan).sum(dim=(1, 2))  # the plan is exactly 0 on the pads
    counts = None if tol is None else _reference_counts(text_lens, region_lens, params["iterations"])
    return _result(dist, plan if return_plan else None, counts)


def _wra(text_data, region_data, text_starts, region_starts, text_lens, region_lens, sizes, method, params,
         return_plan, grad, tol, backend):
    """Shared by the padded (starts None) and the packed layouts."""
    if grad == "unrolled" or _choose_vectors(text_data, region_data, sizes, backend) == "torch":
        # padding rows zeroed, as the kernel never reads them: NaN there must not reach the gradient (0 * NaN)
        text = (reference.zero_pads(text_data, text_lens) if text_starts is None
                else reference.pad_rows(text_data, text_starts, text_lens, sizes[0]))
        regions = (reference.zero_pads(region_data, region_lens) if region_starts is None
                   else reference.pad_rows(region_data, region_starts, region_lens, sizes[1]))
        cost = reference.cosine_cost_ref(text, regions)
        if grad == "unrolled":
            return _unrolled(method, cost, text_lens, region_lens, params, return_plan, tol)
        return _solve_cost("torch", method, cost, text_lens, region_lens, params, return_plan, tol)
    want_grad = _wants_grad(text_data, region_data)
    dist, plan, counts = _VectorEnvelope.apply(text_data, region_data, text_starts, region_starts, text_lens,
                                               region_lens, sizes, _options(method, params, tol),
                                               return_plan or want_grad, want_grad)
    return _result(dist, plan if return_plan else None, counts)


def _choose_vectors(text_data, region_data, sizes, backend) -> str:
    return choose("wra_distance", backend, text_data.device, _triton_reason((text_data, region_data), *sizes))


def wra_distance(
    text: torch.Tensor,
    regions: torch.Tensor,
    text_lens: torch.Tensor,
    region_lens: torch.Tensor,
    *,
    beta: float = 0.5,
    iterations: int = 50,
    k: int = 1,
    method: str = "ipot",
    eps: float | None = None,
    return_plan: bool = False,
    grad: str = "envelope",
    tol: float | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """UNITER's WRA distance (B,) between text (B, M, D) and regions (B, N, D) under C = 1 - cos.

    Returns dist, [plan (B, M, N) when return_plan], [iterations run (B,) when tol]. grad: "envelope" (the plan
    held constant, the original's) or "unrolled" (through the iterations, on the torch reference).
    """
    reference_kw, positive, counts = _method_params(method, beta, eps, iterations, k, grad, tol)
    reference.check_ot_vectors(text, regions, text_lens, region_lens, positive=positive, counts=counts)
    sizes = (text.shape[1], regions.shape[1])
    return _wra(text, regions, None, None, text_lens, region_lens, sizes, method, reference_kw, return_plan, grad,
                tol, backend)


def wra_distance_packed(
    hidden: torch.Tensor,
    text_starts: torch.Tensor,
    text_lens: torch.Tensor,
    region_starts: torch.Tensor,
    region_lens: torch.Tensor,
    max_text_len: int,
    max_regions: int,
    *,
    beta: float = 0.5,
    iterations: int = 50,
    k: int = 1,
    method: str = "ipot",
    eps: float | None = None,
    return_plan: bool = False,
    grad: str = "envelope",
    tol: float | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """wra_distance on packed rows: problem b's words are rows text_starts[b] .. + text_lens[b] of hidden
    (total, D), its regions rows region_starts[b] .. + region_lens[b]; the triton path reads them in place.

    max_text_len, max_regions: host ints bounding the lens (a PackedBatch's max_text_len, max_regions); the plan
    is (B, max_text_len, max_regions). For a PackedBatch: text_starts = cu_seqlens[:-1], region_starts =
    cu_seqlens[:-1] + text_lens. The fused gradient assumes no row belongs to two problems on the same side
    (true of a packed batch).
    """
    reference_kw, positive, counts = _method_params(method, beta, eps, iterations, k, grad, tol)
    reference.check_ot_packed(hidden, text_starts, text_lens, region_starts, region_lens, max_text_len, max_regions,
                              positive=positive, counts=counts)
    return _wra(hidden, hidden, text_starts, region_starts, text_lens, region_lens, (max_text_len, max_regions),
                method, reference_kw, return_plan, grad, tol, backend)


# ----------------------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransportOptions:
    """How WRA solves its transport; the defaults are the original's (IPOT, beta 0.5, 50 iterations, k 1)."""

    method: str = "ipot"  # "ipot", "ipot_log" or "sinkhorn_log"
    beta: float = 0.5
    iterations: int = 50
    k: int = 1
    eps: float | None = None  # sinkhorn_log only
    grad: str = "envelope"  # or "unrolled"
    tol: float | None = None


class WordRegionDistance(nn.Module):
    """wra_distance_packed as a layer: the transport distance (B,) between each sample's word rows and region
    rows of a packed encoder output (then the iterations run, when options.tol is set)."""

    def __init__(self, options: TransportOptions = TransportOptions(), backend: str | None = None):
        super().__init__()
        self.options, self.backend = options, backend

    def forward(self, hidden: torch.Tensor, text_starts: torch.Tensor, text_lens: torch.Tensor,
                region_starts: torch.Tensor, region_lens: torch.Tensor, max_text_len: int,
                max_regions: int) -> torch.Tensor:
        return wra_distance_packed(hidden, text_starts, text_lens, region_starts, region_lens, max_text_len,
                                   max_regions, **dataclasses.asdict(self.options), backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.options}, backend={self.backend!r}"
