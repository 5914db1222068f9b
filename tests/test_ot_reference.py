"""The optimal-transport reference (kernels.reference) and its functional API (kernels.ot), on the CPU.

Oracles: a per-problem transcription of UNITER's IPOT (paper Algorithm 1, image x text as in the original),
POT's log-domain Sinkhorn, and POT's exact EMD. None of the expected numbers comes from the code under test.
"""
from __future__ import annotations

import math

import numpy as np
import ot as pot
import pytest
import torch
import torch.nn.functional as F

from helpers import ipot_single
from uniter_fast.kernels import backend, ot, reference


def cosine_cost(m: int, n: int, dim: int = 6, *, gen: torch.Generator) -> torch.Tensor:
    """UNITER's cost 1 - cos(w_i, v_j) for random text/region vectors, float64 (m, n); low dim for contrast."""
    w = torch.randn(m, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return 1 - F.normalize(w, dim=1) @ F.normalize(v, dim=1).T


def padded_batch(
    sizes: list[tuple[int, int]], *, gen: torch.Generator, pad_value: float = float("nan")
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (B, M, N) float64 cosine cost with the given (m, n) per problem; pads hold pad_value."""
    big_m = max(m for m, _ in sizes) + 1  # one row/column of padding even for the largest problem
    big_n = max(n for _, n in sizes) + 1
    cost = torch.full((len(sizes), big_m, big_n), pad_value, dtype=torch.float64)
    for b, (m, n) in enumerate(sizes):
        cost[b, :m, :n] = cosine_cost(m, n, gen=gen)
    lens = torch.tensor(sizes, dtype=torch.long)
    return cost, lens[:, 0], lens[:, 1]


def uniform(size: int) -> np.ndarray:
    return np.full(size, 1.0 / size)


def pad_mask(plan: torch.Tensor, text_lens: torch.Tensor, region_lens: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(plan.shape[1])[None, :] < text_lens[:, None]
    cols = torch.arange(plan.shape[2])[None, :] < region_lens[:, None]
    return ~(rows[:, :, None] & cols[:, None, :])


SIZES = [(1, 1), (1, 7), (6, 1), (9, 12), (4, 3), (10, 5)]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------------------------------------------------
# IPOT against the per-problem transcription
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("iterations", [1, 7, 50])
def test_ipot_matches_per_problem_algorithm(gen: torch.Generator, iterations: int, k: int) -> None:
    cost, text_lens, region_lens = padded_batch(SIZES, gen=gen)
    plan = reference.ipot_plan_ref(cost, text_lens, region_lens, beta=0.5, iterations=iterations, k=k)
    assert plan.dtype == torch.float64 and plan.shape == cost.shape
    for b, (m, n) in enumerate(SIZES):
        expected = ipot_single(cost[b, :m, :n].numpy(), 0.5, iterations, k)
        np.testing.assert_allclose(plan[b, :m, :n].numpy(), expected, rtol=1e-12, atol=1e-300)
    pads = plan[pad_mask(plan, text_lens, region_lens)]
    assert pads.numel() > 0 and bool((pads == 0).all())  # exactly 0, although the cost's pads are NaN


def test_ipot_beta_is_used(gen: torch.Generator) -> None:
    cost, text_lens, region_lens = padded_batch([(5, 6)], gen=gen)
    plan = reference.ipot_plan_ref(cost, text_lens, region_lens, beta=0.1, iterations=5)
    np.testing.assert_allclose(plan[0, :5, :6].numpy(), ipot_single(cost[0, :5, :6].numpy(), 0.1, 5, 1), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# marginals, mass, empty problems
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_marginals_and_mass(gen: torch.Generator, solver: str) -> None:
    cost, text_lens, region_lens = padded_batch(SIZES, gen=gen)
    if solver == "ipot":
        plan = reference.ipot_plan_ref(cost, text_lens, region_lens, iterations=1000)
    else:
        plan = reference.sinkhorn_plan_ref(cost, text_lens, region_lens, eps=0.05, iterations=1000)
    for b, (m, n) in enumerate(SIZES):
        block = plan[b, :m, :n]
        # the last update of each iteration rescales the text rows: their sums are 1/m up to rounding
        np.testing.assert_allclose(block.sum(1).numpy(), uniform(m), rtol=1e-12)
        np.testing.assert_allclose(block.sum(0).numpy(), uniform(n), rtol=1e-6)
        assert block.sum().item() == pytest.approx(1.0, rel=1e-12)
    assert bool((plan >= 0).all())


@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_empty_problems_give_zero(gen: torch.Generator, solver: str) -> None:
    sizes = [(0, 4), (3, 0), (0, 0), (3, 4)]
    cost, text_lens, region_lens = padded_batch(sizes, gen=gen, pad_value=0.0)
    fn = ot.ipot if solver == "ipot" else lambda *a, **kw: ot.sinkhorn(*a, eps=0.1, **kw)
    dist, plan = fn(cost, text_lens, region_lens, return_plan=True)
    assert bool(torch.isfinite(plan).all()) and bool(torch.isfinite(dist).all())
    assert bool((plan[:3] == 0).all()) and bool((dist[:3] == 0).all())
    # the nonempty problem is unaffected by its empty neighbours
    alone = fn(cost[3:], text_lens[3:], region_lens[3:], return_plan=True)[1]
    torch.testing.assert_close(plan[3:], alone, rtol=0, atol=0)
    assert plan[3].sum().item() == pytest.approx(1.0)


def test_no_host_sync() -> None:
    # meta tensors have no values: .item(), .tolist() or boolean indexing on the solver path would raise
    cost = torch.empty(3, 5, 4, device="meta")
    lens_t = torch.empty(3, dtype=torch.long, device="meta")
    lens_r = torch.empty(3, dtype=torch.long, device="meta")
    assert reference.ipot_plan_ref(cost, lens_t, lens_r, k=2).shape == (3, 5, 4)
    assert reference.sinkhorn_plan_ref(cost, lens_t, lens_r, eps=0.1, iterations=3).shape == (3, 5, 4)
    assert ot.ipot(cost, lens_t, lens_r).shape == (3,)


# ---------------------------------------------------------------------------------------------------------
# inner steps
# ---------------------------------------------------------------------------------------------------------


def test_k_changes_the_iterates_but_not_the_limit(gen: torch.Generator) -> None:
    cost, text_lens, region_lens = padded_batch([(5, 7), (8, 6)], gen=gen)
    few = [reference.ipot_plan_ref(cost, text_lens, region_lens, iterations=3, k=k) for k in (1, 3)]
    assert (few[0] - few[1]).abs().max().item() > 1e-4
    many = [reference.ipot_plan_ref(cost, text_lens, region_lens, iterations=2000, k=k) for k in (1, 3)]
    torch.testing.assert_close(many[0], many[1], rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# precision: fp32 state whatever the input
# ---------------------------------------------------------------------------------------------------------


def test_fp32_matches_fp64(gen: torch.Generator) -> None:
    cost, text_lens, region_lens = padded_batch([(20, 30), (7, 36), (12, 12), (1, 5)], gen=gen, pad_value=0.0)
    d32, p32 = ot.ipot(cost.float(), text_lens, region_lens, return_plan=True)
    d64 = ot.ipot(cost.float().double(), text_lens, region_lens)
    assert d32.dtype == p32.dtype == torch.float32 and d64.dtype == torch.float64
    torch.testing.assert_close(d32.double(), d64, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_fp32_state(gen: torch.Generator, dtype: torch.dtype) -> None:
    cost, text_lens, region_lens = padded_batch([(20, 30), (7, 36), (1, 5)], gen=gen, pad_value=0.0)
    half = cost.to(dtype)
    dist, plan = ot.ipot(half, text_lens, region_lens, return_plan=True)
    assert dist.dtype == plan.dtype == torch.float32
    assert bool(torch.isfinite(plan).all()) and bool(torch.isfinite(dist).all())
    # fp32 state: only the input rounding remains (a half-precision state is off by ~1e-2)
    oracle = reference.ipot_plan_ref(half.double(), text_lens, region_lens)
    torch.testing.assert_close(plan.double(), oracle, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Sinkhorn against POT
# ---------------------------------------------------------------------------------------------------------


def pot_sinkhorn(cost: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    m, n = cost.shape
    return pot.sinkhorn(
        uniform(m), uniform(n), cost, reg=eps, method="sinkhorn_log", numItermax=iterations, stopThr=0, warn=False
    )


@pytest.mark.parametrize("eps,iterations", [(0.1, 5), (0.05, 200), (0.01, 300)])
def test_sinkhorn_matches_pot_single(gen: torch.Generator, eps: float, iterations: int) -> None:
    for m, n in [(6, 9), (13, 4), (1, 3)]:
        cost = cosine_cost(m, n, gen=gen)
        lens_t, lens_r = torch.tensor([m]), torch.tensor([n])
        plan = reference.sinkhorn_plan_ref(cost[None], lens_t, lens_r, eps=eps, iterations=iterations)
        np.testing.assert_allclose(plan[0].numpy(), pot_sinkhorn(cost.numpy(), eps, iterations), rtol=1e-9, atol=1e-300)


def test_sinkhorn_matches_pot_padded_batch(gen: torch.Generator) -> None:
    cost, text_lens, region_lens = padded_batch(SIZES, gen=gen)
    plan = reference.sinkhorn_plan_ref(cost, text_lens, region_lens, eps=0.05, iterations=30)
    for b, (m, n) in enumerate(SIZES):
        np.testing.assert_allclose(
            plan[b, :m, :n].numpy(), pot_sinkhorn(cost[b, :m, :n].numpy(), 0.05, 30), rtol=1e-9, atol=1e-300
        )
    assert bool((plan[pad_mask(plan, text_lens, region_lens)] == 0).all())


# ---------------------------------------------------------------------------------------------------------
# both approach the exact EMD
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,n", [(5, 7), (8, 6), (12, 20)])
def test_approach_exact_emd(gen: torch.Generator, m: int, n: int) -> None:
    cost = cosine_cost(m, n, gen=gen)
    emd = pot.emd2(uniform(m), uniform(n), cost.numpy())
    args = (cost[None], torch.tensor([m]), torch.tensor([n]))
    # UNITER's setting (50 iterations) is already close; IPOT converges to the exact optimum itself
    # (the distance, not necessarily the plan: with near-ties among optimal vertices the plan lags)
    assert ot.ipot(*args).item() == pytest.approx(emd, rel=0.02)
    assert ot.ipot(*args, iterations=3000).item() == pytest.approx(emd, rel=1e-6)
    # Sinkhorn's entropic bias shrinks with eps
    assert ot.sinkhorn(*args, eps=0.005, iterations=2000).item() == pytest.approx(emd, rel=0.01)
    assert ot.sinkhorn(*args, eps=0.05, iterations=500).item() > emd


# ---------------------------------------------------------------------------------------------------------
# gradient: the plan is a constant
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_gradient_is_the_plan(gen: torch.Generator, solver: str) -> None:
    cost, text_lens, region_lens = padded_batch(SIZES, gen=gen, pad_value=0.5)
    cost = cost.float().requires_grad_()
    kwargs = {"eps": 0.1} if solver == "sinkhorn" else {}
    dist, plan = getattr(ot, solver)(cost, text_lens, region_lens, return_plan=True, **kwargs)
    assert not plan.requires_grad
    (grad,) = torch.autograd.grad(dist.sum(), cost)
    torch.testing.assert_close(grad, plan, rtol=0, atol=0)
    assert bool((grad[pad_mask(plan, text_lens, region_lens)] == 0).all())
    torch.testing.assert_close(dist, (cost * plan).sum((1, 2)), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# argument validation
# ---------------------------------------------------------------------------------------------------------

_C = torch.zeros(2, 3, 4)
_T = torch.tensor([3, 1])
_R = torch.tensor([4, 2])


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((_C[0], _T, _R), {}, ValueError, "cost must be 3-D"),
        ((_C.long(), _T, _R), {}, TypeError, "cost must be a floating-point"),
        ((_C, _T.float(), _R), {}, TypeError, "text_lens must be an integer"),
        ((_C, _T, _R > 0), {}, TypeError, "region_lens must be an integer"),
        ((_C, [3, 1], _R), {}, TypeError, "text_lens must be an integer tensor"),
        ((_C, _T[:1], _R), {}, ValueError, "text_lens must be 1-D of length 2"),
        ((_C, _T, _R[None]), {}, ValueError, "region_lens must be 1-D of length 2"),
        ((_C, torch.tensor([4, 1]), _R), {}, ValueError, r"text_lens must lie in \[0, 3\]"),
        ((_C, _T, torch.tensor([-1, 2])), {}, ValueError, r"region_lens must lie in \[0, 4\]"),
        ((_C, _T, _R), {"beta": -0.5}, ValueError, "beta must be finite and > 0"),
        ((_C, _T, _R), {"beta": 0.0}, ValueError, "beta"),
        ((_C, _T, _R), {"beta": "0.5"}, TypeError, "beta must be a real number"),
        ((_C, _T, _R), {"iterations": 0}, ValueError, "iterations must be >= 1"),
        ((_C, _T, _R), {"iterations": 2.0}, TypeError, "iterations must be an integer"),
        ((_C, _T, _R), {"k": 0}, ValueError, "k must be >= 1"),
    ],
)
def test_ipot_validation(args: tuple, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ot.ipot(*args, **kwargs)
    with pytest.raises(error, match=match):
        reference.ipot_plan_ref(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"eps": 0.0}, "eps"), ({"eps": float("nan")}, "eps"), ({"eps": 0.1, "iterations": 0}, "iterations"),
     ({"eps": 0.1, "tol": 0.0}, "tol must be finite and > 0")],
)
def test_sinkhorn_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ot.sinkhorn(_C, _T, _R, **kwargs)


@pytest.mark.parametrize("tol,error", [(0.0, ValueError), (-1e-3, ValueError), (float("inf"), ValueError),
                                       ("1e-3", TypeError)])
def test_ipot_tolerance_validation(tol: object, error: type) -> None:
    # a tolerance the kernel would compare against without complaint (tol <= 0: it never stops)
    with pytest.raises(error, match="tol must be"):
        ot.ipot(_C, _T, _R, tol=tol)
    with pytest.raises(error, match="tol must be"):
        ot.ipot(_C, _T, _R, tol=tol, log_domain=True, backend="torch")


def test_reference_counts_are_int32_per_problem(gen: torch.Generator) -> None:
    """The torch backend runs every iteration and reports it like the kernels: int32 (B,), 0 for empty problems."""
    sizes = [(3, 4), (0, 2), (2, 0), (1, 1)]
    cost, text_lens, region_lens = padded_batch(sizes, gen=gen, pad_value=0.0)
    for dist, counts in (ot.ipot(cost, text_lens, region_lens, iterations=7, tol=1e-3, backend="torch"),
                         ot.sinkhorn(cost, text_lens, region_lens, eps=0.1, iterations=7, tol=1e-3, backend="torch")):
        assert counts.dtype == torch.int32 and counts.tolist() == [7, 0, 0, 7]
        assert dist.shape == (4,)


def test_pad_rows_gathers_and_zeroes_beyond_lens(gen: torch.Generator) -> None:
    """pad_rows (the torch path of the packed WRA): rows starts[b] .. + lens[b], zeros beyond (although the rows
    after a sample's own are other samples' rows), and gradients only into the gathered rows."""
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    starts, lens = torch.tensor([0, 4, 9, 2]), torch.tensor([3, 5, 1, 0])
    out = reference.pad_rows(x, starts, lens, 5)
    assert out.shape == (4, 5, 3)
    expected = torch.zeros(4, 5, 3, dtype=torch.float64)
    for b, (start, n) in enumerate(zip(starts.tolist(), lens.tolist())):
        expected[b, :n] = x.detach()[start:start + n]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    weights = torch.randn(4, 5, 3, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    want = torch.zeros(10, 3, dtype=torch.float64)
    for b, (start, n) in enumerate(zip(starts.tolist(), lens.tolist())):
        want[start:start + n] += weights[b, :n]
    torch.testing.assert_close(grad, want, rtol=0, atol=0)
    empty = reference.pad_rows(x[:0], torch.tensor([0, 0]), torch.tensor([0, 0]), 2)
    assert empty.shape == (2, 2, 3) and bool((empty == 0).all())


def test_lens_on_another_device() -> None:
    with pytest.raises(ValueError, match="text_lens is on meta but cost is on cpu"):
        ot.ipot(_C, _T.to("meta"), _R)


# ---------------------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["auto", "torch"])
def test_auto_and_torch_serve_with_the_reference(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator, choice: str
) -> None:
    monkeypatch.setenv(backend.ENV_VAR, choice)
    cost, text_lens, region_lens = padded_batch(SIZES, gen=gen, pad_value=0.0)
    dist, plan = ot.ipot(cost, text_lens, region_lens, return_plan=True, backend="triton")  # the env var wins
    torch.testing.assert_close(plan, reference.ipot_plan_ref(cost, text_lens, region_lens), rtol=0, atol=0)
    torch.testing.assert_close(dist, (cost * plan).sum((1, 2)), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "solver,kwargs,error,match",
    [
        ("ipot", {"k": 0}, ValueError, "k must be >= 1"),
        ("ipot", {"iterations": 0}, ValueError, "iterations must be >= 1"),
        ("ipot", {"beta": float("inf")}, ValueError, "beta must be finite and > 0"),
        ("ipot", {"beta": True}, TypeError, "beta must be a real number"),
        ("ipot", {"iterations": True}, TypeError, "iterations must be an integer"),
        ("sinkhorn", {"eps": 0.1, "iterations": 0}, ValueError, "iterations must be >= 1"),
        ("sinkhorn", {"eps": -0.1}, ValueError, "eps must be finite and > 0"),
        ("sinkhorn", {"eps": 0.1, "iterations": False}, TypeError, "iterations must be an integer"),
    ],
)
@pytest.mark.parametrize("choice", ["torch", "triton"])
def test_parameters_are_checked_whatever_the_backend(solver: str, kwargs: dict, error: type, match: str,
                                                     choice: str) -> None:
    with pytest.raises(error, match=match):
        getattr(ot, solver)(_C, _T, _R, backend=choice, **kwargs)


def test_distance_reads_the_cost_only_where_the_plan_moves_mass() -> None:
    """<C, T> by hand: 0.25 * 0.2 + 0.75 * 0.6 = 0.5; the pads' NaN and inf costs are never read."""
    nan, inf = float("nan"), float("inf")
    cost = torch.tensor([[[0.2, 0.6, nan], [inf, -inf, nan]]], dtype=torch.float64)
    plan = torch.tensor([[[0.25, 0.75, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    dist = reference.transport_distance_ref(cost, plan)
    assert dist.shape == (1,) and dist.item() == pytest.approx(0.5, rel=1e-15)


def test_distance_of_an_fp64_cost_stays_fp64() -> None:
    """fp64 cost with an fp32 plan: the sum runs in fp64 (an fp32 sum of these thirds is off by ~1e-8)."""
    cost = torch.full((1, 30, 30), 1 / 3, dtype=torch.float64) + torch.arange(900.0, dtype=torch.float64).view(1, 30, 30)
    plan = torch.full((1, 30, 30), 1 / 900, dtype=torch.float32)
    dist = reference.transport_distance_ref(cost, plan)
    assert dist.dtype == torch.float64
    expected = math.fsum((cost[0] * plan[0].double()).flatten().tolist())
    assert dist.item() == pytest.approx(expected, rel=1e-14)


def test_cosine_cost_floors_the_norm_at_eps() -> None:
    """F.normalize(eps=1e-5) by hand: x / max(|x|, 1e-5). A vector of norm 5e-6 becomes x / 1e-5 (norm 0.5), a zero
    (padding) vector stays 0 (cost 1), a long one becomes unit."""
    text = torch.tensor([[[3e-6, 4e-6], [0.0, 0.0], [3.0, 4.0]]], dtype=torch.float64)
    regions = torch.tensor([[[1.0, 0.0], [0.0, 2e-6]]], dtype=torch.float64)
    # normalised: text (0.3, 0.4), (0, 0), (0.6, 0.8); regions (1, 0), (0, 0.2)
    expected = torch.tensor([[[1 - 0.3, 1 - 0.08], [1.0, 1.0], [1 - 0.6, 1 - 0.16]]], dtype=torch.float64)
    assert reference.COSINE_EPS == 1e-5
    torch.testing.assert_close(reference.cosine_cost_ref(text, regions), expected, rtol=0, atol=1e-12)
