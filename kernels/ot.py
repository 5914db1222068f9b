"""Optimal transport between text tokens and image regions: UNITER's word-region alignment (WRA).

Inputs are batched and padded: cost (B, M, N) = text x regions, with valid lengths text_lens (B,) and
region_lens (B,), integer tensors on cost's device. Problem b moves uniform mass 1/m_b from its m_b text
rows to its n_b region columns; entries beyond the lengths are padding and get exactly 0 in the plan. A
problem with m_b = 0 or n_b = 0 has an all-zero plan and distance 0.

- `ipot`: the Inexact Proximal point OT (Xie et al. 2018) that UNITER trains with; `beta` is the proximal
  step, `k` the inner Sinkhorn steps per iteration. Defaults are the original's (0.5, 50, 1).
- `sinkhorn`: entropic OT with regularisation `eps`, in the log domain; biased by eps, offered for comparison.

Both return dist (B,) = sum_ij C_ij T_ij, in fp32 (fp64 for fp64 costs), and with return_plan also the plan T
(B, M, N) in the same dtype. The solver state is fp32 whatever the cost's dtype.

Gradient: the plan is a constant, as in the original (which solves under no_grad): d dist / d cost = T, hence
0 on the pads. The solver itself is never differentiated.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import reference
from .backend import choose

PlanFn = Callable[..., torch.Tensor]

# Plan solvers by backend; a Triton kernel registers under "triton" beside the reference.
_IPOT_PLAN: dict[str, PlanFn] = {"torch": reference.ipot_plan_ref}
_SINKHORN_PLAN: dict[str, PlanFn] = {"torch": reference.sinkhorn_plan_ref}


def _triton_reason(op: str, solvers: dict[str, PlanFn]) -> str | None:
    return None if "triton" in solvers else f"no triton kernel for {op} in this version"


def _transport(
    op: str,
    solvers: dict[str, PlanFn],
    cost: torch.Tensor,
    text_lens: torch.Tensor,
    region_lens: torch.Tensor,
    return_plan: bool,
    backend: str | None,
    **params: float,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    plan = solvers[choose(op, backend, cost.device, _triton_reason(op, solvers))](cost.detach(), text_lens, region_lens, **params)
    dist = reference.transport_distance_ref(cost, plan)
    return (dist, plan) if return_plan else dist


def ipot(
    cost: torch.Tensor,
    text_lens: torch.Tensor,
    region_lens: torch.Tensor,
    *,
    beta: float = 0.5,
    iterations: int = 50,
    k: int = 1,
    return_plan: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """IPOT distance (B,), or (distance, plan) when return_plan; gradient into cost with the plan constant."""
    # Validate before choosing a backend, so a bad call reads as a bad call whatever serves it.
    reference.check_ot_args(
        cost, text_lens, region_lens, positive={"beta": beta}, counts={"iterations": iterations, "k": k}
    )
    return _transport(
        "ipot", _IPOT_PLAN, cost, text_lens, region_lens, return_plan, backend, beta=beta, iterations=iterations, k=k
    )


def sinkhorn(
    cost: torch.Tensor,
    text_lens: torch.Tensor,
    region_lens: torch.Tensor,
    *,
    eps: float,
    iterations: int = 100,
    return_plan: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Entropic OT distance <C, T_eps> (B,), or (distance, plan); gradient into cost with the plan constant."""
    reference.check_ot_args(cost, text_lens, region_lens, positive={"eps": eps}, counts={"iterations": iterations})
    return _transport(
        "sinkhorn", _SINKHORN_PLAN, cost, text_lens, region_lens, return_plan, backend, eps=eps, iterations=iterations
    )
