"""Details of the Triton OT kernels' bodies (kernels/ot_triton.py) that the broader kernel tests leave open.

Memory next to every buffer: the cost read through a view into a NaN-poisoned buffer, outputs allocated inside
sentinel-filled buffers (what a kernel writes outside its tensor, or a store whose mask is dropped, shows up
there), grad_stats pads poisoned; dims one past a dim step of the fused cosine; the linear IPOT's fold period for
costs of one sign; problems packed out of order for the backward. Expected values come from the fp64 references
(kernels/reference.py) and autograd through them. Runs under the Triton interpreter on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from helpers import lens_of
from uniter_fast.kernels import ot_triton as kernels
from uniter_fast.kernels import reference

SENTINEL = 12345.0  # a value no kernel computes: outputs' surroundings must keep it


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(2468)


def poisoned_view(shape: tuple[int, ...], inside: float, outside: float, dtype=torch.float32) -> torch.Tensor:
    """A (shape) view filled with `inside` at the corner of a buffer one larger in every dim (a few more in the
    last two) holding `outside`: strided like a slice, so a write or read one row, column or problem too far
    lands on `outside`."""
    extra = [1] * len(shape)
    if len(shape) >= 2:
        extra[-2:] = [3, 5]
    buf = torch.full([s + e for s, e in zip(shape, extra)], outside, dtype=dtype)
    view = buf[tuple(slice(0, s) for s in shape)]
    view.fill_(inside)
    return view


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """torch.empty / torch.zeros give views into sentinel buffers (empty: sentinel inside too, as uninitialised
    memory may hold anything). Returns the (view, buffer) pairs made, for checking what was written around them."""
    made = []

    def alloc(fill):
        def make(*shape, dtype=None, device=None, **_):
            shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
            dtype = dtype or torch.float32
            view = poisoned_view(shape, SENTINEL if fill is None else fill, SENTINEL, dtype)
            made.append((view, view._base))
            return view
        return make

    monkeypatch.setattr(torch, "empty", alloc(None))
    monkeypatch.setattr(torch, "zeros", alloc(0))
    return made


def assert_untouched_outside(made: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for view, buf in made:
        outside = torch.ones_like(buf, dtype=torch.bool)
        outside[tuple(slice(0, s) for s in view.shape)] = False
        assert bool((buf[outside] == SENTINEL).all()), f"a kernel wrote outside its {tuple(view.shape)} output"


# ---------------------------------------------------------------------------------------------------------
# the forward from a cost: reads and writes stay within each problem and each tensor
# ---------------------------------------------------------------------------------------------------------

# five problems: the rule packs them into one program of eight (a partial program), PROBS=2 into three
SIZES = [(7, 5), (1, 9), (6, 1), (0, 3), (9, 8)]


def poisoned_cost(sizes, gen: torch.Generator, lo: float = 0.0, hi: float = 2.0) -> torch.Tensor:
    """A (B, M, N) fp32 cost, uniform in [lo, hi) on each problem's block, NaN on its pads and all around it."""
    text_lens, region_lens = lens_of(sizes)
    shape = (len(sizes), int(text_lens.max()), int(region_lens.max()))
    cost = poisoned_view(shape, float("nan"), float("nan"))
    for b, (m, n) in enumerate(sizes):
        cost[b, :m, :n] = lo + (hi - lo) * torch.rand(m, n, generator=gen, dtype=torch.float64).float()
    return cost


def assert_pads_zero(plan: torch.Tensor, sizes) -> None:
    pads = torch.ones_like(plan, dtype=torch.bool)
    for b, (m, n) in enumerate(sizes):
        pads[b, :m, :n] = False
    assert bool((plan[pads] == 0).all())


def expected_plan(method: str, cost: torch.Tensor, text_lens, region_lens, scale: float, iterations: int):
    if method == "sinkhorn_log":
        return reference.sinkhorn_plan_ref(cost.double(), text_lens, region_lens, eps=1 / scale,
                                           iterations=iterations)
    return reference.ipot_plan_ref(cost.double(), text_lens, region_lens, beta=1 / scale, iterations=iterations)


@pytest.mark.parametrize("tune", [None, {"PROBS": 2}, {"PROBS": 1}])
@pytest.mark.parametrize("method", ["ipot", "ipot_log", "sinkhorn_log"])
def test_cost_kernel_keeps_to_its_problems_and_outputs(gen: torch.Generator, guarded, method: str, tune) -> None:
    """The cost is a view into NaN and its pads are NaN; dist, plan and counts lie inside sentinel buffers. The
    plan and distance are the reference's, pads exactly 0, and nothing is written around the outputs (the last
    program holds fewer problems than PROBS)."""
    cost = poisoned_cost(SIZES, gen)
    text_lens, region_lens = lens_of(SIZES)
    guarded.clear()  # only the kernel's outputs from here
    solve = kernels.Solve(method, scale=2.0, iterations=9, tol=1e-9)  # met only by a one-column problem's exact plan
    dist, plan, counts = kernels.transport_cost(cost, text_lens, region_lens, solve, want_plan=True, tune=tune)
    assert len(guarded) == 3  # dist, counts and plan came from the guarded allocators
    assert_untouched_outside(guarded)
    expected = expected_plan(method, cost, text_lens, region_lens, 2.0, 9)  # (6, 1) is exact from the first
    torch.testing.assert_close(plan.double(), expected.nan_to_num(), rtol=2e-4, atol=1e-7)
    assert_pads_zero(plan, SIZES)
    torch.testing.assert_close(dist.double(), reference.transport_distance_ref(cost.double(), expected),
                               rtol=1e-5, atol=1e-7)
    assert counts[[0, 3, 4]].tolist() == [9, 0, 9] and 1 <= int(counts[2]) <= 9


def test_half_tiles_keep_to_their_problems(gen: torch.Generator, guarded) -> None:
    """One problem a program on 64 x 64 tiles (SHRINK): half tiles on each side, both, or none; the plan comes
    zeroed with sentinel around it, the cost is a view into NaN. The plan is the reference's with exact 0 on the
    pads the half tiles never visit, and nothing is written around dist and plan."""
    sizes = [(3, 40), (40, 5), (33, 33), (32, 32), (0, 40)]
    cost = poisoned_cost(sizes, gen)
    text_lens, region_lens = lens_of(sizes)
    assert kernels._config(len(sizes), cost.shape[1], cost.shape[2], None)["SHRINK"]
    guarded.clear()
    dist, plan, _ = kernels.transport_cost(cost, text_lens, region_lens, kernels.Solve("ipot", 2.0, 4),
                                           want_plan=True)
    assert len(guarded) == 2
    assert_untouched_outside(guarded)
    expected = expected_plan("ipot", cost, text_lens, region_lens, 2.0, 4)
    torch.testing.assert_close(plan.double(), expected, rtol=1e-4, atol=1e-7)
    assert_pads_zero(plan, sizes)
    torch.testing.assert_close(dist.double(), reference.transport_distance_ref(cost.double(), expected),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lo, hi, expensive_row, scale", [(-1.0, 0.0, False, 20.0), (0.0, 0.1, True, 30.0)])
def test_linear_ipot_folds_by_the_largest_scaled_cost(gen: torch.Generator, lo, hi, expensive_row, scale) -> None:
    """The factored plan's W = T * K^j drifts by exp(j max |C| / beta): the fold period comes from the largest
    magnitude, so W is folded back every iteration before it leaves fp32's range. Costs all below 0 (kernel entries
    up to exp(20)), or one text row costing 2 against at most 0.1 elsewhere at beta = 1/30 (that row's entries
    exp(-60): two iterations unfolded would underflow to 0, then the row's scaling to inf)."""
    cost = poisoned_cost(SIZES, gen, lo=lo, hi=hi)
    if expensive_row:
        cost[0, 2, :5] = 2.0
    text_lens, region_lens = lens_of(SIZES)
    dist, plan, _ = kernels.transport_cost(cost, text_lens, region_lens, kernels.Solve("ipot", scale, 30),
                                           want_plan=True)
    expected = expected_plan("ipot", cost, text_lens, region_lens, scale, 30)
    assert bool(torch.isfinite(plan).all())
    torch.testing.assert_close(plan.double(), expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(dist.double(), reference.transport_distance_ref(cost.double(), expected),
                               rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# the forward from vectors: the fused cosine over dim steps, grad_stats
# ---------------------------------------------------------------------------------------------------------


def poisoned_vectors(sizes, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded text (B, M, dim) and regions (B, N, dim): views into NaN buffers, NaN on the pad rows too."""
    text_lens, region_lens = lens_of(sizes)
    sides = []
    for side_lens in (text_lens, region_lens):
        x = poisoned_view((len(sizes), int(side_lens.max()), dim), float("nan"), float("nan"))
        for b, length in enumerate(side_lens.tolist()):
            x[b, :length] = torch.randn(length, dim, generator=gen, dtype=torch.float64).float()
        sides.append(x)
    return sides[0], sides[1]


@pytest.mark.parametrize("dim, tune", [(33, None), (17, {"BLOCK_D": 16}), (32, None)])
def test_fused_cosine_reads_every_dim_and_fills_grad_stats(gen: torch.Generator, dim: int, tune) -> None:
    """Dims one past a dim step (33 in steps of 32, 17 in steps of 16) or a whole step: the fused cosine cost,
    plan and distance are the reference's, and grad_stats holds each problem's inverse norms 1/max(|x|, 1e-5) and
    the plan-weighted cosine sums of its rows and columns, written within its own part of the buffer."""
    text, regions = poisoned_vectors(SIZES, dim, gen)
    text_lens, region_lens = lens_of(SIZES)
    text[4, 2] = 0  # a zero vector: the norm's floor
    batch, max_m, max_n = len(SIZES), text.shape[1], regions.shape[1]
    assert kernels._tuned(kernels._config(batch, max_m, max_n, dim), tune, dim)["BLOCK_D"] in (16, 32)
    stats_buf = torch.full((batch + 1, 2, max_m + max_n), SENTINEL)
    stats = stats_buf[:batch]  # contiguous, with a problem's worth of sentinel after it
    dist, plan, _ = kernels.transport_vectors(kernels.Rows(text), kernels.Rows(regions), text_lens, region_lens,
                                              kernels.Solve("ipot", 2.0, 8), want_plan=True, stats=stats, tune=tune)
    assert bool((stats_buf[batch] == SENTINEL).all())
    cost = reference.cosine_cost_ref(text.double().nan_to_num(), regions.double().nan_to_num())
    expected = expected_plan("ipot", cost, text_lens, region_lens, 2.0, 8)
    torch.testing.assert_close(plan.double(), expected.nan_to_num(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(dist.double(), reference.transport_distance_ref(cost, expected), rtol=1e-5, atol=1e-7)
    weighted = plan.double() * (1 - cost)  # T * cos
    for b, (m, n) in enumerate(SIZES):
        if m == 0 or n == 0:
            continue
        inv = 1 / torch.cat([text[b, :m], regions[b, :n]]).double().norm(dim=-1).clamp(min=1e-5)
        torch.testing.assert_close(stats[b, 0, :m].double(), inv[:m], rtol=1e-5, atol=0)
        torch.testing.assert_close(stats[b, 0, max_m:max_m + n].double(), inv[m:], rtol=1e-5, atol=0)
        torch.testing.assert_close(stats[b, 1, :m].double(), weighted[b, :m].sum(1), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats[b, 1, max_m:max_m + n].double(), weighted[b, :, :n].sum(0), rtol=1e-4,
                                   atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# the cosine backward: reads only each problem's rows, writes only where it must
# ---------------------------------------------------------------------------------------------------------


def backward_case(sizes, dim: int, gen: torch.Generator):
    """Padded vectors, the forward's plan copied into a view whose surroundings are NaN, and grad_stats with NaN on
    every entry that belongs to no row of a problem; the fp64 gradients of sum_b w_b dist_b (plan constant)."""
    text, regions = poisoned_vectors(sizes, dim, gen)
    text, regions = text.nan_to_num(), regions.nan_to_num()  # padded inputs hold zeros; their pads get gradient 0
    text_lens, region_lens = lens_of(sizes)
    batch, max_m, max_n = len(sizes), text.shape[1], regions.shape[1]
    stats = kernels.grad_stats(batch, max_m, max_n, text.device)
    _, plan, _ = kernels.transport_vectors(kernels.Rows(text), kernels.Rows(regions), text_lens, region_lens,
                                           kernels.Solve("ipot", 2.0, 8), want_plan=True, stats=stats)
    guarded_plan = poisoned_view(plan.shape, float("nan"), float("nan"))
    guarded_plan.copy_(plan)
    for b, (m, n) in enumerate(sizes):
        for part in (0, 1):
            stats[b, part, m:max_m] = float("nan")
            stats[b, part, max_m + n:] = float("nan")
    weights = torch.randn(batch, generator=gen)
    text64, regions64 = text.double().requires_grad_(), regions.double().requires_grad_()
    dist = reference.transport_distance_ref(reference.cosine_cost_ref(text64, regions64), plan.double())
    expected = torch.autograd.grad((dist * weights.double()).sum(), (text64, regions64))
    return text, regions, text_lens, region_lens, guarded_plan, stats, weights, expected


@pytest.mark.parametrize("dim, tune", [(20, None), (40, {"SPLITS": 2, "BLOCK_D": 16}), (32, {"BLOCK_D": 16})])
def test_cosine_backward_reads_only_the_problems_rows(gen: torch.Generator, dim: int, tune) -> None:
    """The plan's surroundings and grad_stats' entries of no row are NaN: the gradients are the reference's,
    finite, exactly 0 on pad rows and empty problems (dims that the steps divide or not, split or not)."""
    text, regions, text_lens, region_lens, plan, stats, weights, expected = backward_case(SIZES, dim, gen)
    grads = kernels.cosine_backward(kernels.Rows(text), kernels.Rows(regions), text_lens, region_lens, plan, stats,
                                    weights, tune=tune)
    for got, want, side_lens in zip(grads, expected, (text_lens, region_lens)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
        for b, length in enumerate(side_lens.tolist()):
            empty = 0 in SIZES[b]
            assert bool((got[b, 0 if empty else length:] == 0).all())


def test_packed_backward_writes_only_each_problems_rows(gen: torch.Generator) -> None:
    """Packed rows out of problem order with gaps between them (a problem's rows may come before an earlier
    problem's): each problem's gradient lands on its own rows only, the gap rows get exactly 0."""
    text, regions, text_lens, region_lens, plan, stats, weights, expected = backward_case(SIZES, 20, gen)
    order = [4, 2, 0, 3, 1]  # problems laid out last first, a gap row after each side
    hidden, starts, row = [], {"text": [0] * len(SIZES), "region": [0] * len(SIZES)}, 0
    for b in order:
        for side, x, n in (("text", text, text_lens[b]), ("region", regions, region_lens[b])):
            starts[side][b] = row
            hidden += [x[b, :n], torch.full((1, x.shape[-1]), 7.0)]
            row += int(n) + 1
    hidden = torch.cat(hidden)
    rows = [kernels.Rows(hidden, torch.tensor(starts[side]), size) for side, size in
            (("text", text.shape[1]), ("region", regions.shape[1]))]
    grad_text, grad_regions = kernels.cosine_backward(*rows, text_lens, region_lens, plan, stats, weights,
                                                      tune={"SPLITS": 2, "BLOCK_D": 16})
    for side, grad, want, side_lens in (("text", grad_text, expected[0], text_lens),
                                        ("region", grad_regions, expected[1], region_lens)):
        owned = torch.zeros(hidden.shape[0], dtype=torch.bool)  # this side's rows of some problem
        for b, start in enumerate(starts[side]):
            n = int(side_lens[b])
            torch.testing.assert_close(grad[start:start + n].double(), want[b, :n], rtol=1e-4, atol=1e-6)
            owned[start:start + n] = True
        assert bool((grad[~owned] == 0).all())  # the other side's rows and the gaps
