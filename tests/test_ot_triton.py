"""The Triton OT kernels (kernels.ot_triton) behind kernels.ot, against the fp64 reference (kernels.reference).

On the CPU they run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1): fp32, small odd
sizes, few iterations. Tests marked gpu run on CUDA at UNITER's sizes in fp32, fp16 and bf16.
"""
from __future__ import annotations

import pytest
import torch

from helpers import lens_of
from uniter_fast.kernels import backend, ot, reference

# (text, regions) lengths: odd sizes, length 1 and empty sides; pads beyond them in every problem
SIZES = [(13, 11), (1, 5), (7, 1), (3, 0), (0, 4)]
SIZES_B = [(3, 11), (13, 1), (1, 1), (7, 5), (0, 0)]
DIM = 6  # low dimension: cosines spread over [-1, 1]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(4321)


def vectors(sizes, *, gen: torch.Generator, dim: int = DIM, dtype=torch.float64):
    """text (B, M, D), regions (B, N, D) with random values on the pads too (the kernels must ignore them)."""
    big_m, big_n = max(m for m, _ in sizes) + 1, max(n for _, n in sizes) + 1
    text = torch.randn(len(sizes), big_m, dim, generator=gen, dtype=torch.float64).to(dtype)
    regions = torch.randn(len(sizes), big_n, dim, generator=gen, dtype=torch.float64).to(dtype)
    return text, regions, *lens_of(sizes)


def cost_batch(sizes, *, gen: torch.Generator):
    """A float64 cosine cost (B, M, N) with NaN on the pads (never read), and the lens."""
    text, regions, text_lens, region_lens = vectors(sizes, gen=gen)
    cost = reference.cosine_cost_ref(text, regions)
    pads = pad_mask(cost, text_lens, region_lens)
    return cost.masked_fill(pads, float("nan")), text_lens, region_lens


def pad_mask(x: torch.Tensor, text_lens: torch.Tensor, region_lens: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(x.shape[1])[None, :] < text_lens[:, None]
    cols = torch.arange(x.shape[2])[None, :] < region_lens[:, None]
    return ~(rows[:, :, None] & cols[:, None, :])


def assert_plan(plan: torch.Tensor, expected: torch.Tensor, text_lens, region_lens, rtol=1e-4, atol=1e-7) -> None:
    assert plan.dtype == torch.float32 and bool(torch.isfinite(plan).all())
    assert bool((plan[pad_mask(plan, text_lens, region_lens)] == 0).all())  # exactly 0 on the pads
    torch.testing.assert_close(plan.double(), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------------
# the three algorithms against the reference, cost input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [SIZES, SIZES_B])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("log_domain", [False, True])
def test_ipot_matches_reference(gen: torch.Generator, sizes, k: int, log_domain: bool) -> None:
    cost, text_lens, region_lens = cost_batch(sizes, gen=gen)
    dist, plan = ot.ipot(cost.float(), text_lens, region_lens, iterations=12, k=k, log_domain=log_domain,
                         return_plan=True, backend="triton")
    expected = reference.ipot_plan_ref(cost.float().double(), text_lens, region_lens, iterations=12, k=k)
    assert_plan(plan, expected, text_lens, region_lens)
    assert dist.dtype == torch.float32
    torch.testing.assert_close(dist.double(), reference.transport_distance_ref(cost.float().double(), expected),
                               rtol=1e-5, atol=1e-7)
    empty = (text_lens == 0) | (region_lens == 0)
    assert bool((dist[empty] == 0).all())


def test_ipot_log_equals_ipot_at_the_original_setting(gen: torch.Generator) -> None:
    cost, text_lens, region_lens = cost_batch(SIZES, gen=gen)
    cost = cost.float()
    linear = ot.ipot(cost, text_lens, region_lens, return_plan=True, backend="triton")
    logged = ot.ipot(cost, text_lens, region_lens, log_domain=True, return_plan=True, backend="triton")
    # t C / beta reaches 200 at t = 50: fp32 rounding of the log-kernel costs up to about 1e-4 relative
    torch.testing.assert_close(logged[1], linear[1], rtol=2e-4, atol=1e-8)
    torch.testing.assert_close(logged[0], linear[0], rtol=1e-5, atol=1e-8)


def test_ipot_marginals(gen: torch.Generator) -> None:
    cost, text_lens, region_lens = cost_batch(SIZES_B, gen=gen)
    for log_domain, rtol in ((False, 1e-5), (True, 1e-4)):  # the log form rounds t C / beta, up to 400 here
        plan = ot.ipot(cost.float(), text_lens, region_lens, iterations=100, log_domain=log_domain,
                       return_plan=True, backend="triton")[1]
        for b, (m, n) in enumerate(SIZES_B):
            if m == 0 or n == 0:
                assert bool((plan[b] == 0).all())
                continue
            block = plan[b, :m, :n].double()
            torch.testing.assert_close(block.sum(1), torch.full((m,), 1 / m, dtype=torch.float64), rtol=rtol, atol=0)
            torch.testing.assert_close(block.sum(0), torch.full((n,), 1 / n, dtype=torch.float64), rtol=2e-2, atol=0)
            assert block.sum().item() == pytest.approx(1.0, rel=rtol)



@pytest.mark.parametrize("beta", [0.05, 0.5, 20.0])  # folds every iteration, every 7, every 16
@pytest.mark.parametrize("shift", [0.0, -1.0])  # costs in [-1, 1]: kernel entries above 1, W grows
def test_factored_plan_folds_at_every_scale(gen: torch.Generator, beta: float, shift: float) -> None:
    """Linear IPOT keeps T = diag(r) W diag(c) and folds the scalings back into W every few iterations: across
    many folds the plan stays the reference's, at every cost scale."""
    cost, text_lens, region_lens = cost_batch(SIZES, gen=gen)
    cost = (cost + shift).float()
    dist, plan = ot.ipot(cost, text_lens, region_lens, beta=beta, iterations=40, return_plan=True, backend="triton")
    expected = reference.ipot_plan_ref(cost.double(), text_lens, region_lens, beta=beta, iterations=40)
    assert_plan(plan, expected, text_lens, region_lens)
    torch.testing.assert_close(dist.double(), reference.transport_distance_ref(cost.double(), expected),
                               rtol=1e-5, atol=1e-7)

@pytest.mark.parametrize("eps", [0.1, 0.02])
def test_sinkhorn_log_matches_reference(gen: torch.Generator, eps: float) -> None:
    cost, text_lens, region_lens = cost_batch(SIZES, gen=gen)
    dist, plan = ot.sinkhorn(cost.float(), text_lens, region_lens, eps=eps, iterations=15, return_plan=True,
                             backend="triton")
    expected = reference.sinkhorn_plan_ref(cost.float().double(), text_lens, region_lens, eps=eps, iterations=15)
    assert_plan(plan, expected, text_lens, region_lens)
    torch.testing.assert_close(dist.double(), reference.transport_distance_ref(cost.float().double(), expected),
                               rtol=1e-5, atol=1e-7)


def test_extreme_costs_and_empty_batches() -> None:
    # costs at both ends of [0, 2], one problem of length 1, an empty one: finite everywhere, for every method
    cost = torch.stack([torch.zeros(3, 4), torch.full((3, 4), 2.0), torch.eye(3, 4) * 2, torch.ones(3, 4)])
    text_lens, region_lens = torch.tensor([3, 3, 1, 0]), torch.tensor([4, 4, 1, 2])
    for result in (ot.ipot(cost, text_lens, region_lens, return_plan=True, backend="triton"),
                   ot.ipot(cost, text_lens, region_lens, log_domain=True, return_plan=True, backend="triton"),
                   ot.sinkhorn(cost, text_lens, region_lens, eps=0.01, return_plan=True, backend="triton")):
        dist, plan = result
        assert bool(torch.isfinite(plan).all()) and bool(torch.isfinite(dist).all())
        assert dist[0].item() == 0 and dist[3].item() == 0 and bool((plan[3] == 0).all())
        assert dist[1].item() == pytest.approx(2.0, rel=1e-5) and dist[2].item() == pytest.approx(2.0, rel=1e-5)
        assert plan[2, 0, 0].item() == pytest.approx(1.0, rel=1e-6)
    none = ot.ipot(torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                   return_plan=True, backend="triton")
    assert none[0].shape == (0,) and none[1].shape == (0, 3, 4)


def test_fp16_cost_keeps_fp32_state(gen: torch.Generator) -> None:
    cost, text_lens, region_lens = cost_batch(SIZES, gen=gen)
    half = cost.half()
    dist, plan = ot.ipot(half, text_lens, region_lens, iterations=10, return_plan=True, backend="triton")
    assert_plan(plan, reference.ipot_plan_ref(half.double(), text_lens, region_lens, iterations=10),
                text_lens, region_lens)


def test_cost_gradient_is_the_plan(gen: torch.Generator) -> None:
    cost, text_lens, region_lens = cost_batch(SIZES, gen=gen)
    cost = cost.float().requires_grad_()
    dist, plan = ot.ipot(cost, text_lens, region_lens, iterations=8, return_plan=True, backend="triton")
    assert not plan.requires_grad
    weights = torch.randn(len(SIZES), generator=gen)
    (grad,) = torch.autograd.grad((dist * weights).sum(), cost)
    torch.testing.assert_close(grad, weights[:, None, None] * plan, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# vectors: the cosine cost fused, its gradient
# ---------------------------------------------------------------------------------------------------------

METHOD_ARGS = {"ipot": {"k": 2}, "ipot_log": {}, "sinkhorn_log": {"eps": 0.1}}


def reference_plan(method: str, cost: torch.Tensor, text_lens, region_lens, iterations: int) -> torch.Tensor:
    if method == "sinkhorn_log":
        return reference.sinkhorn_plan_ref(cost, text_lens, region_lens, eps=0.1, iterations=iterations)
    return reference.ipot_plan_ref(cost, text_lens, region_lens, iterations=iterations,
                                   k=METHOD_ARGS[method].get("k", 1))


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_fused_cosine_and_envelope_gradient(gen: torch.Generator, method: str) -> None:
    text, regions, text_lens, region_lens = vectors(SIZES_B, gen=gen, dim=20)
    text[3, 2] = 0  # a zero vector: F.normalize's eps branch
    text32 = text.float().requires_grad_()
    regions32 = regions.float().requires_grad_()
    dist, plan = ot.wra_distance(text32, regions32, text_lens, region_lens, iterations=10, method=method,
                                 return_plan=True, backend="triton", **METHOD_ARGS[method])
    # oracle: cosine cost and plan in fp64 from the same fp32 vectors, the plan detached
    text64 = text.float().double().requires_grad_()
    regions64 = regions.float().double().requires_grad_()
    cost = reference.cosine_cost_ref(text64, regions64)
    expected = reference_plan(method, cost.detach(), text_lens, region_lens, 10)
    expected_dist = reference.transport_distance_ref(cost, expected)
    assert_plan(plan, expected, text_lens, region_lens)
    torch.testing.assert_close(dist.double(), expected_dist, rtol=1e-5, atol=1e-7)

    weights = torch.randn(len(SIZES_B), generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((dist * weights.float()).sum(), (text32, regions32))
    expected_grads = torch.autograd.grad((expected_dist * weights).sum(), (text64, regions64))
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert bool((grads[0][0, 13:] == 0).all()) and bool((grads[1][4] == 0).all())  # pads and empty problems


def test_launch_overrides_give_the_same_result(gen: torch.Generator) -> None:
    """benchmarks/tune_kernels.py overrides the launch rule: other problem packings give the same answers, and a
    packing the vector kernels cannot take is refused."""
    from uniter_fast.kernels import ot_triton as kernels

    cost, text_lens, region_lens = cost_batch(SIZES_B, gen=gen)
    cost = cost.float()
    solve = kernels.Solve("ipot", scale=2.0, iterations=10)
    dist, plan, _ = kernels.transport_cost(cost, text_lens, region_lens, solve, want_plan=True)
    for tune in ({"PROBS": 1}, {"PROBS": 4, "num_warps": 2}, {"COL_LANES": 1}, {"COL_LANES": 2, "PROBS": 2},
                 {"num_warps": 8, "maxnreg": 128}):
        dist2, plan2, _ = kernels.transport_cost(cost, text_lens, region_lens, solve, want_plan=True, tune=tune)
        torch.testing.assert_close(dist2, dist, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(plan2, plan, rtol=1e-6, atol=1e-9)
    text, regions, text_lens, region_lens = vectors(SIZES_B, gen=gen, dim=20, dtype=torch.float32)
    rows = kernels.Rows(text), kernels.Rows(regions)
    dist, _, _ = kernels.transport_vectors(*rows, text_lens, region_lens, solve)
    for tune in ({"BLOCK_D": 16}, {"COL_LANES": 1}, {"DOT_PRECISION": "tf32x3"}):
        dist2, _, _ = kernels.transport_vectors(*rows, text_lens, region_lens, solve, tune=tune)
        torch.testing.assert_close(dist2, dist, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="PROBS=1"):
        kernels.transport_vectors(*rows, text_lens, region_lens, solve, tune={"PROBS": 2})
    with pytest.raises(ValueError, match="DOT_PRECISION"):
        kernels.transport_vectors(*rows, text_lens, region_lens, solve, tune={"DOT_PRECISION": "fp8"})
    with pytest.raises(ValueError, match="COL_LANES"):
        kernels.transport_cost(cost, text_lens, region_lens, solve, tune={"COL_LANES": 3})
    for bad in (16, 256, 128.0, True):
        with pytest.raises(ValueError, match="maxnreg must be an int from 24 to 255"):
            kernels.transport_cost(cost, text_lens, region_lens, solve, tune={"maxnreg": bad})



def test_cost_is_read_through_its_strides_and_dtype(gen: torch.Generator) -> None:
    """The kernel reads the cost twice (the solve, then the distance: not kept in registers through the loop).
    A transposed view and a 16-bit cost read as their contiguous fp32 copy, one problem or several a program."""
    from uniter_fast.kernels import ot_triton as kernels

    cost, text_lens, region_lens = cost_batch(SIZES, gen=gen)
    solve = kernels.Solve("ipot", scale=2.0, iterations=10)
    half = cost.to(torch.bfloat16)
    for source in (cost.float(), half):
        strided = source.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, strides (M N, 1, M)
        assert not strided.is_contiguous()
        for tune in ({"PROBS": 1}, {"PROBS": 4}):
            dist, plan, _ = kernels.transport_cost(source.float(), text_lens, region_lens, solve, want_plan=True,
                                                   tune=tune)
            for same in (source, strided):
                dist2, plan2, _ = kernels.transport_cost(same, text_lens, region_lens, solve, want_plan=True,
                                                         tune=tune)
                assert torch.equal(dist2, dist) and torch.equal(plan2, plan)


def test_launch_rule_is_a_launch_the_kernels_take() -> None:
    """_config's rule passes _tuned's checks for every side length and batch (lanes within the half tile where it
    shrinks), and its lanes follow its warps as tune_kernels.py's sweeps chose."""
    from uniter_fast.kernels import ot_triton as kernels

    for batch in (1, 3, 5):  # on the CPU one SM: one program per SM, within four, beyond
        for m in (1, 2, 7, 16, 33, 60, 100, 128):
            for n in (1, 3, 16, 31, 40, 64, 100, 128):
                for dim, elem in ((None, 4), (768, 2), (768, 4)):
                    rule = kernels._config(batch, m, n, dim, elem)
                    config = kernels._tuned(rule, None, dim)
                    assert config["COL_LANES"] <= config["BLOCK_N"] // (2 if config["SHRINK"] else 1), config
                    if dim is None:  # from a cost
                        wanted = 32 if config["num_warps"] >= 4 else 16
                    else:  # from vectors: 16-bit 4 warps and 32 lanes, fp32's widest tiles 8 warps and 16 lanes
                        wanted = 16 if config["num_warps"] == 8 else 32
                    assert config["COL_LANES"] == min(wanted, config["BLOCK_N"] // (2 if config["SHRINK"] else 1))
    uniter = [kernels._config(b, 60, 100, None, 4) for b in (1, 3, 5)]
    assert [(c["num_warps"], c["COL_LANES"]) for c in uniter] == [(8, 32), (4, 32), (2, 16)]


# sides past 32 (64 x 64 tiles, one problem per program): each of the four half/full tiles serves a problem
SIZES_LONG = [(3, 40), (20, 5), (33, 2), (2, 2), (40, 50), (0, 40)]


@pytest.mark.parametrize("method", ["ipot", "ipot_log"])
def test_shrunk_tiles_match_the_full_tile_and_the_reference(gen: torch.Generator, method: str) -> None:
    """A short problem runs on a half tile (SHRINK, the rule for one problem per program): the same plan and
    distance as on the full tile and as the reference, exact zeros on the pads the half tile never writes."""
    from uniter_fast.kernels import ot_triton as kernels

    cost, text_lens, region_lens = cost_batch(SIZES_LONG, gen=gen)
    cost = cost.float()
    solve = kernels.Solve(method, scale=2.0, iterations=8)
    assert kernels._config(len(SIZES_LONG), cost.shape[1], cost.shape[2], None)["SHRINK"]
    dist, plan, _ = kernels.transport_cost(cost, text_lens, region_lens, solve, want_plan=True)
    full, full_plan, _ = kernels.transport_cost(cost, text_lens, region_lens, solve, want_plan=True,
                                                tune={"SHRINK": False})
    torch.testing.assert_close(dist, full, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(plan, full_plan, rtol=1e-5, atol=1e-9)  # another summation order
    for lanes in (16, 32):  # both rules' lanes on the half tiles (32: all of a 64-column half tile's)
        dist_l, plan_l, _ = kernels.transport_cost(cost, text_lens, region_lens, solve, want_plan=True,
                                                   tune={"COL_LANES": lanes, "num_warps": 4})
        torch.testing.assert_close(dist_l, dist, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(plan_l, plan, rtol=1e-5, atol=1e-9)
    expected = reference.ipot_plan_ref(cost.double(), text_lens, region_lens, beta=0.5, iterations=8)
    assert_plan(plan, expected, text_lens, region_lens, rtol=1e-3 if method == "ipot_log" else 1e-4)

    text, regions, text_lens, region_lens = vectors(SIZES_LONG, gen=gen, dtype=torch.float32)
    rows = kernels.Rows(text), kernels.Rows(regions)
    dist, plan, _ = kernels.transport_vectors(*rows, text_lens, region_lens, solve, want_plan=True)
    full, full_plan, _ = kernels.transport_vectors(*rows, text_lens, region_lens, solve, want_plan=True,
                                                   tune={"SHRINK": False})
    torch.testing.assert_close(dist, full, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(plan, full_plan, rtol=1e-5, atol=1e-9)  # another summation order
    for lanes in (16, 32):
        lanes_dist, _, _ = kernels.transport_vectors(*rows, text_lens, region_lens, solve,
                                                     tune={"COL_LANES": lanes})
        torch.testing.assert_close(lanes_dist, dist, rtol=1e-5, atol=1e-9)
    assert bool((plan[pad_mask(plan, text_lens, region_lens)] == 0).all())
    # with a tolerance, each problem stops on its own iteration on either tile
    tol_solve = kernels.Solve(method, scale=2.0, iterations=30, tol=1e-3)
    dist, _, counts = kernels.transport_vectors(*rows, text_lens, region_lens, tol_solve)
    full, _, full_counts = kernels.transport_vectors(*rows, text_lens, region_lens, tol_solve, tune={"SHRINK": False})
    assert torch.equal(counts, full_counts) and int(counts.max()) < 30
    torch.testing.assert_close(dist, full, rtol=1e-5, atol=1e-9)
    # packed rows, as the encoder's output: the same problems on their half tiles
    packed = [torch.cat([side[b, :n] for b, n in enumerate(lens)]) for side, lens in ((text, text_lens),
                                                                                      (regions, region_lens))]
    starts = [torch.cumsum(lens, 0) - lens for lens in (text_lens, region_lens)]
    packed_rows = (kernels.Rows(packed[0], starts[0], text.shape[1]),
                   kernels.Rows(packed[1], starts[1], regions.shape[1]))
    dist, _, counts = kernels.transport_vectors(*packed_rows, text_lens, region_lens, tol_solve)
    assert torch.equal(counts, full_counts)
    torch.testing.assert_close(dist, full, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="SHRINK needs PROBS=1"):
        kernels.transport_cost(cost, text_lens, region_lens, solve, tune={"PROBS": 2})


def test_half_tile_boundary_on_each_side(gen: torch.Generator) -> None:
    """SHRINK takes a half tile on a side only while the problem fits it: 32 rows or columns of the 64 x 64 tile do,
    33 do not (the row or column past the half tile would be dropped), on either side."""
    from uniter_fast.kernels import ot_triton as kernels

    sizes = [(32, 33), (33, 32), (32, 32), (33, 33), (5, 40)]
    cost, text_lens, region_lens = cost_batch(sizes, gen=gen)
    cost = cost.float()
    assert kernels._config(len(sizes), cost.shape[1], cost.shape[2], None)["SHRINK"]
    solve = kernels.Solve("ipot", scale=2.0, iterations=6)
    dist, plan, _ = kernels.transport_cost(cost, text_lens, region_lens, solve, want_plan=True)
    expected = reference.ipot_plan_ref(cost.double(), text_lens, region_lens, beta=0.5, iterations=6)
    assert_plan(plan, expected, text_lens, region_lens)
    torch.testing.assert_close(dist.double(), reference.transport_distance_ref(cost.double(), expected),
                               rtol=1e-5, atol=1e-7)


def envelope_case(text, regions, text_lens, region_lens, gen: torch.Generator) -> tuple:
    """For the cosine backward: the vectors' Rows, the forward's plan and grad_stats (IPOT, 8 iterations), random
    fp32 weights per problem, and the fp64 gradients of sum_b weight_b dist_b with that plan held constant."""
    from uniter_fast.kernels import ot_triton as kernels

    rows = kernels.Rows(text), kernels.Rows(regions)
    stats = kernels.grad_stats(len(text_lens), text.shape[1], regions.shape[1], text.device)
    solve = kernels.Solve("ipot", scale=2.0, iterations=8)
    _, plan, _ = kernels.transport_vectors(*rows, text_lens, region_lens, solve, want_plan=True, stats=stats)
    weights = torch.randn(len(text_lens), generator=gen, dtype=torch.float64)
    text64, regions64 = text.double().requires_grad_(), regions.double().requires_grad_()
    dist = reference.transport_distance_ref(reference.cosine_cost_ref(text64, regions64), plan.double())
    return rows, plan, stats, weights.float(), torch.autograd.grad((dist * weights).sum(), (text64, regions64))


@pytest.mark.parametrize("dim", [70, 64, 48])
def test_cosine_backward_over_split_dims_and_half_tiles(gen: torch.Generator, monkeypatch, dim: int) -> None:
    """The backward reads the forward's norms and plan-weighted cosine sums (grad_stats, written on half tiles
    too) and splits each problem's dims over programs: every split and dim step gives the fp64 gradient, pads
    included (its padded gradients start as NaN here: the kernel must write every element), with the norms
    folded into the weights (LOW_OPERANDS, here on fp32) or not, and dims that the steps divide (64, 48) or not;
    at 48 dims in steps of 16 over 2 splits, the second split's nominal range (32..64) runs past D."""
    from uniter_fast.kernels import ot_triton as kernels

    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))

    text, regions, text_lens, region_lens = vectors(SIZES_LONG, gen=gen, dim=dim, dtype=torch.float32)
    regions[0, 3] = 0  # a zero vector: F.normalize's eps branch, on the region side this time
    rows, plan, stats, weights, expected = envelope_case(text, regions, text_lens, region_lens, gen)
    for tune in ({}, {"SPLITS": 1}, {"SPLITS": 2, "BLOCK_D": 16}, {"SPLITS": 3, "BLOCK_D": 16},
                 {"SPLITS": 9, "BLOCK_D": 16}, {"BLOCK_D": 64, "num_warps": 8}, {"LOW_OPERANDS": True},
                 {"LOW_OPERANDS": True, "SPLITS": 3, "BLOCK_D": 16},
                 {"LOW_OPERANDS": True, "SPLITS": 2, "BLOCK_D": 16}, {"num_warps": 8, "maxnreg": 128}):
        grads = kernels.cosine_backward(*rows, text_lens, region_lens, plan, stats, weights, tune=tune)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6, msg=lambda m: f"tune={tune}: {m}")
    with pytest.raises(ValueError, match="SPLITS a positive int"):
        kernels.cosine_backward(*rows, text_lens, region_lens, plan, stats, weights, tune={"SPLITS": 0})
    with pytest.raises(ValueError, match=r"the plan must be \(batch, text rows, region rows\)"):
        kernels.cosine_backward(*rows, text_lens, region_lens, plan[:, :-1], stats, weights)
    with pytest.raises(ValueError, match="tf32x3 crashed"):
        kernels.cosine_backward(*rows, text_lens, region_lens, plan, stats, weights,
                                tune={"DOT_PRECISION": "tf32x3"})
    with pytest.raises(ValueError, match="LOW_OPERANDS with bf16 vectors needs a GPU"):
        b16 = kernels.Rows(text.bfloat16()), kernels.Rows(regions.bfloat16())
        kernels.cosine_backward(*b16, text_lens, region_lens, plan, stats, weights, tune={"LOW_OPERANDS": True})
    with pytest.raises(ValueError, match="LOW_OPERANDS must be True or False"):
        kernels.cosine_backward(*rows, text_lens, region_lens, plan, stats, weights, tune={"LOW_OPERANDS": 1})
    with pytest.raises(ValueError, match="maxnreg must be an int"):
        kernels.cosine_backward(*rows, text_lens, region_lens, plan, stats, weights, tune={"maxnreg": 300})
    with pytest.raises(ValueError, match=r"not \['PROBS'\]"):
        kernels.cosine_backward(*rows, text_lens, region_lens, plan, stats, weights, tune={"PROBS": 2})
    with pytest.raises(ValueError, match=r"grad_stats buffer: expected a contiguous fp32 tensor of shape \(6, 2, "):
        kernels.cosine_backward(*rows, text_lens, region_lens, plan, stats[:, :, 1:], weights)
    with pytest.raises(ValueError, match="grad_stats buffer"):
        kernels.transport_vectors(*rows, text_lens, region_lens, kernels.Solve("ipot", scale=2.0, iterations=8),
                                  want_plan=True, stats=stats.double())


def test_cosine_backward_below_the_norm_floor(gen: torch.Generator) -> None:
    """A vector shorter than F.normalize's eps (1e-5) but not zero: its normalisation is x / eps, a linear map, so the
    plan-weighted cosine term (rdot x^) drops from its gradient; the fp64 autograd of the reference says so."""
    from uniter_fast.kernels import ot_triton as kernels

    text, regions, text_lens, region_lens = vectors(SIZES_B, gen=gen, dim=20, dtype=torch.float32)
    text[0, 1] *= 1e-7  # norms about 4e-7: far below the floor, far above fp32's smallest normal
    regions[3, 2] *= 1e-7
    rows, plan, stats, weights, expected = envelope_case(text, regions, text_lens, region_lens, gen)
    assert stats[0, 0, 1].item() == pytest.approx(1e5)  # the forward's inverse norm is 1 / eps there
    grads = kernels.cosine_backward(*rows, text_lens, region_lens, plan, stats, weights)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # those rows' gradients are the large -g T y^ / eps, not zero: the case is not vacuous
    assert expected[0][0, 1].abs().max().item() > 1.0 and expected[1][3, 2].abs().max().item() > 1.0


def test_unrolled_gradient_gradcheck(gen: torch.Generator) -> None:
    text, regions, text_lens, region_lens = vectors([(3, 2), (2, 3), (1, 2)], gen=gen, dim=4)
    text.requires_grad_()
    regions.requires_grad_()

    def dist(t, r):
        return ot.wra_distance(t, r, text_lens, region_lens, iterations=4, grad="unrolled", backend="torch")

    assert torch.autograd.gradcheck(dist, (text, regions))
    # and it is not the envelope gradient
    unrolled = torch.autograd.grad(dist(text, regions).sum(), text)[0]
    envelope = torch.autograd.grad(ot.wra_distance(text, regions, text_lens, region_lens, iterations=4,
                                                   backend="torch").sum(), text)[0]
    assert (unrolled - envelope).abs().max().item() > 1e-3


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_tolerance_stops_each_problem_early(gen: torch.Generator, method: str) -> None:
    text, regions, text_lens, region_lens = vectors(SIZES, gen=gen)
    args = (text.float(), regions.float(), text_lens, region_lens)
    kwargs = dict(method=method, return_plan=True, backend="triton", **METHOD_ARGS[method])
    dist, plan, counts = ot.wra_distance(*args, iterations=60, tol=1e-3, **kwargs)
    assert counts.dtype == torch.int32
    empty = (text_lens == 0) | (region_lens == 0)
    assert bool((counts[empty] == 0).all()) and bool((counts[~empty] >= 1).all())
    assert bool((counts < 60).any())  # someone stopped early ...
    for count in counts[~empty].unique().tolist():  # ... exactly where a run of that many iterations ends
        fixed = ot.wra_distance(*args, iterations=count, **kwargs)
        chosen = (counts == count).nonzero().flatten()
        torch.testing.assert_close(plan[chosen], fixed[1][chosen], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(dist[chosen], fixed[0][chosen], rtol=1e-6, atol=1e-9)
        if count < 60:  # stopped: the column marginals are within tol
            for b in chosen.tolist():
                m, n = SIZES[b]
                assert (plan[b, :m, :n].sum(0) - 1 / n).abs().sum().item() <= 1e-3
    # the reference runs every iteration and says so
    counts_ref = ot.wra_distance(*args, iterations=7, tol=1e-3, method=method, backend="torch",
                                 **METHOD_ARGS[method])[1]
    assert counts_ref.tolist() == [0 if e else 7 for e in empty.tolist()]


def test_unrolled_gradient_on_the_triton_backend(gen: torch.Generator) -> None:
    """grad='unrolled' runs the reference loop under autograd whatever the backend: backend='triton' must not
    quietly give the envelope gradient."""
    text, regions, text_lens, region_lens = vectors([(3, 2), (2, 3), (1, 2)], gen=gen, dim=4, dtype=torch.float32)
    grads = {}
    for name, grad in (("triton", "unrolled"), ("torch", "unrolled"), ("triton", "envelope")):
        t, r = text.clone().requires_grad_(), regions.clone().requires_grad_()
        dist = ot.wra_distance(t, r, text_lens, region_lens, iterations=4, grad=grad, backend=name)
        grads[name, grad] = torch.autograd.grad(dist.sum(), (t, r))
    for got, want in zip(grads["triton", "unrolled"], grads["torch", "unrolled"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (grads["triton", "unrolled"][0] - grads["triton", "envelope"][0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_tolerance_with_several_problems_per_program(gen: torch.Generator, method: str) -> None:
    """From a cost, one program solves the whole batch: a problem that converged keeps its state while its
    neighbours iterate on, and every nonempty problem stops (a single row or column is exact after one iteration)."""
    from uniter_fast.kernels import ot_triton as kernels

    cost, text_lens, region_lens = cost_batch(SIZES_B, gen=gen)
    cost = cost.float()
    assert kernels._config(len(SIZES_B), cost.shape[1], cost.shape[2], None)["PROBS"] >= len(SIZES_B)

    def solve(**kwargs):
        if method == "sinkhorn_log":
            return ot.sinkhorn(cost, text_lens, region_lens, eps=0.1, return_plan=True, backend="triton", **kwargs)
        return ot.ipot(cost, text_lens, region_lens, log_domain=method == "ipot_log", return_plan=True,
                       backend="triton", **kwargs)

    dist, plan, counts = solve(iterations=60, tol=1e-3)
    assert counts.dtype == torch.int32
    assert counts[[1, 2, 4]].tolist() == [1, 1, 0]  # (13, 1) and (1, 1) exact at once; (0, 0) empty
    assert 1 < int(counts[0]) < 60 and 1 < int(counts[3]) < 60 and int(counts[0]) != int(counts[3])
    for b, count in enumerate(counts.tolist()):
        fixed_dist, fixed_plan = solve(iterations=max(count, 1))
        torch.testing.assert_close(plan[b], fixed_plan[b], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(dist[b], fixed_dist[b], rtol=1e-6, atol=1e-9)


def test_gradient_into_one_side_only(gen: torch.Generator) -> None:
    """Frozen text (or regions), trained other side: the fused backward still runs, with the same gradient as
    when both sides ask for one."""
    text, regions, text_lens, region_lens = vectors(SIZES_B, gen=gen, dtype=torch.float32)
    weights = torch.randn(len(SIZES_B), generator=gen)

    def grads(text_grad: bool, region_grad: bool):
        t, r = text.clone().requires_grad_(text_grad), regions.clone().requires_grad_(region_grad)
        dist = ot.wra_distance(t, r, text_lens, region_lens, iterations=6, backend="triton")
        wanted = [x for x in (t, r) if x.requires_grad]
        return torch.autograd.grad((dist * weights).sum(), wanted)

    both = grads(True, True)
    torch.testing.assert_close(grads(False, True)[0], both[1], rtol=0, atol=0)
    torch.testing.assert_close(grads(True, False)[0], both[0], rtol=0, atol=0)


def test_packed_starts_may_be_strided(gen: torch.Generator) -> None:
    """Starts taken as columns of one (B, 2) tensor are strided views: the kernels index starts flat, so the
    launchers must make them contiguous (forward and backward)."""
    text_lens, region_lens = lens_of(SIZES)
    offsets, row = [], 0
    for m, n in SIZES:
        offsets.append((row, row + m))
        row += m + n + 1
    offsets = torch.tensor(offsets)
    assert not offsets[:, 0].is_contiguous()
    hidden = torch.randn(row, 12, generator=gen)
    results = []
    for starts in ((offsets[:, 0], offsets[:, 1]), (offsets[:, 0].contiguous(), offsets[:, 1].contiguous())):
        h = hidden.clone().requires_grad_()
        dist = ot.wra_distance_packed(h, starts[0], text_lens, starts[1], region_lens, 14, 12, iterations=6,
                                      backend="triton")
        results.append((dist, torch.autograd.grad(dist.sum(), h)[0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


def test_dot_precision_rule() -> None:
    """The products' precision per dtype (kernels' doc): exact fp32 products for fp32 inputs and for fp16's backward
    (tf32 would cost the cosine three digits; the interpreter cannot tell them apart, so the rule is checked
    here), fp16 operands forward; bf16 on tensor cores except in the interpreter (its bf16 dot gives NaN)."""
    from uniter_fast.kernels import ot_triton as kernels

    assert kernels._dot_precision(torch.float32, False) == "ieee"
    assert kernels._dot_precision(torch.float32, True) == "ieee"
    assert kernels._dot_precision(torch.float16, False) == "tf32"
    assert kernels._dot_precision(torch.float16, True) == "ieee"
    assert kernels._dot_precision(torch.bfloat16, False) == ("ieee" if backend.interpreting() else "tf32")
    # fp16's exact backward takes fp32's launch
    fp16_rule, fp16_precision = kernels.backward_launch(64, 60, 100, 768, torch.float16)
    fp32_rule, fp32_precision = kernels.backward_launch(64, 60, 100, 768, torch.float32)
    assert fp16_precision == fp32_precision == "ieee" and fp16_rule == fp32_rule


def test_sinkhorn_ignores_inner_steps(gen: torch.Generator) -> None:
    """Solve.k is IPOT's: a Sinkhorn solve given k runs one update of each potential per iteration."""
    from uniter_fast.kernels import ot_triton as kernels

    cost, text_lens, region_lens = cost_batch(SIZES, gen=gen)
    one = kernels.transport_cost(cost.float(), text_lens, region_lens, kernels.Solve("sinkhorn_log", 10.0, 6),
                                 want_plan=True)
    three = kernels.transport_cost(cost.float(), text_lens, region_lens, kernels.Solve("sinkhorn_log", 10.0, 6, k=3),
                                   want_plan=True)
    torch.testing.assert_close(three[1], one[1], rtol=0, atol=0)
    torch.testing.assert_close(three[0], one[0], rtol=0, atol=0)


def test_packed_equals_padded(gen: torch.Generator) -> None:
    text_lens, region_lens = lens_of(SIZES)
    # a packed layout as the encoder's: each sample's words, then its regions, then a gap row
    text_starts, region_starts, row = [], [], 0
    for m, n in SIZES:
        text_starts.append(row)
        region_starts.append(row + m)
        row += m + n + 1
    text_starts, region_starts = torch.tensor(text_starts), torch.tensor(region_starts)
    hidden = torch.randn(row, 12, generator=gen).requires_grad_()
    max_m, max_n = 14, 12
    packed = ot.wra_distance_packed(hidden, text_starts, text_lens, region_starts, region_lens, max_m, max_n,
                                    iterations=8, return_plan=True, backend="triton")
    grad_packed = torch.autograd.grad(packed[0].sum(), hidden)[0]
    text = reference.pad_rows(hidden, text_starts, text_lens, max_m)
    regions = reference.pad_rows(hidden, region_starts, region_lens, max_n)
    padded = ot.wra_distance(text, regions, text_lens, region_lens, iterations=8, return_plan=True, backend="triton")
    grad_padded = torch.autograd.grad(padded[0].sum(), hidden)[0]
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad_packed, grad_padded, rtol=1e-5, atol=1e-7)
    assert bool((grad_packed[text_starts[0] + 13 + 11] == 0).all())  # the gap row belongs to no problem
    # the reference path pads the same rows
    reference_dist = ot.wra_distance_packed(hidden, text_starts, text_lens, region_starts, region_lens, max_m, max_n,
                                            iterations=8, backend="torch")
    torch.testing.assert_close(reference_dist, padded[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["ipot", "sinkhorn_log"])
def test_module_equals_the_functional(gen: torch.Generator, method: str) -> None:
    texts, regions = (torch.randn(4, 6, 8, generator=gen), torch.randn(4, 9, 8, generator=gen))
    hidden = torch.cat([texts.flatten(0, 1), regions.flatten(0, 1)])
    text_lens, region_lens = torch.tensor([6, 1, 0, 4]), torch.tensor([9, 3, 5, 9])
    text_starts, region_starts = torch.arange(4) * 6, 24 + torch.arange(4) * 9
    options = ot.TransportOptions(method=method, iterations=9, **METHOD_ARGS[method])
    layer = ot.WordRegionDistance(options, backend="triton")
    got = layer(hidden, text_starts, text_lens, region_starts, region_lens, 6, 9)
    want = ot.wra_distance(texts, regions, text_lens, region_lens, method=method, iterations=9, backend="torch",
                           **METHOD_ARGS[method])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert "iterations=9" in repr(layer)


def test_backward_products_on_16_bit_operands(gen: torch.Generator) -> None:
    """LOW_OPERANDS, the backward's rule for bf16 on a GPU (the interpreter cannot run bf16 products): the weights
    T diag(inv_y) rounded once to the inputs' 16-bit dtype, the products on it. Here on fp16: its gradients'
    error against fp64 is within twice the exact products' (fp16's rule) plus the rounding of the weights."""
    from uniter_fast.kernels import ot_triton as kernels

    text, regions, text_lens, region_lens = vectors(SIZES_LONG, gen=gen, dim=48, dtype=torch.float16)
    text[4, 7] = 0  # a zero vector: F.normalize's eps branch
    rows, plan, stats, weights, expected = envelope_case(text, regions, text_lens, region_lens, gen)
    exact = kernels.cosine_backward(*rows, text_lens, region_lens, plan, stats, weights)
    low = kernels.cosine_backward(*rows, text_lens, region_lens, plan, stats, weights,
                                  tune={"LOW_OPERANDS": True})
    for got, ref, want in zip(low, exact, expected):
        assert got.dtype == torch.float16 and bool(torch.isfinite(got).all())
        error, ref_error = (got.double() - want).abs().max().item(), (ref.double() - want).abs().max().item()
        assert error <= 2 * ref_error + 1e-3 * want.abs().max().item(), (error, ref_error)
        assert not torch.equal(got, ref)  # the 16-bit products ran


def test_bf16_vectors_on_the_cpu(gen: torch.Generator) -> None:
    """bf16 inputs, fp32 state: the distance and gradients of the bf16-rounded vectors (the interpreter upcasts
    the dot; the GPU's bf16 tensor-core path is the gpu-marked tests' to check)."""
    text, regions = torch.randn(3, 7, 16, generator=gen), torch.randn(3, 11, 16, generator=gen)
    text_lens, region_lens = torch.tensor([7, 3, 1]), torch.tensor([11, 5, 2])
    results = {}
    for name, dtype in (("triton", torch.bfloat16), ("torch", torch.float32)):
        t = text.bfloat16().to(dtype).requires_grad_()
        r = regions.bfloat16().to(dtype).requires_grad_()
        dist = ot.wra_distance(t, r, text_lens, region_lens, iterations=10, backend=name)
        dist.sum().backward()
        results[name] = (dist.float(), t.grad.float(), r.grad.float())
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------------------------------------------------
# arguments and backends
# ---------------------------------------------------------------------------------------------------------

_X = torch.randn(2, 3, 4)
_Y = torch.randn(2, 5, 4)
_T = torch.tensor([3, 1])
_R = torch.tensor([5, 2])


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((_X[0], _Y, _T, _R), {}, ValueError, r"text must be 3-D \(batch, words, dim\)"),
        ((_X, _Y.long(), _T, _R), {}, TypeError, "regions must be a floating-point tensor"),
        ((_X, _Y[:1], _T, _R), {}, ValueError, r"regions.shape\[0\] is 1 but text.shape\[0\] is 2"),
        ((_X, _Y[..., :3], _T, _R), {}, ValueError, r"regions.shape\[2\] is 3 but text.shape\[2\] is 4"),
        ((_X, _Y.double(), _T, _R), {}, TypeError, "regions has dtype torch.float64 but text has torch.float32"),
        ((_X, _Y, torch.tensor([4, 1]), _R), {}, ValueError, r"text_lens must lie in \[0, 3\] \(text.shape\[1\]\)"),
        ((_X, _Y, _T, _R[:1]), {}, ValueError, "region_lens must be 1-D of length 2"),
        ((_X, _Y, _T, _R), {"method": "emd"}, ValueError, "method must be one of ipot, ipot_log, sinkhorn_log"),
        ((_X, _Y, _T, _R), {"method": "sinkhorn_log"}, ValueError, "needs eps"),
        ((_X, _Y, _T, _R), {"method": "sinkhorn_log", "eps": 0.1, "grad": "unrolled"}, ValueError, "IPOT methods"),
        ((_X, _Y, _T, _R), {"grad": "implicit"}, ValueError, "grad must be one of envelope, unrolled"),
        ((_X, _Y, _T, _R), {"tol": 0.0}, ValueError, "tol must be finite and > 0"),
        ((_X, _Y, _T, _R), {"k": 0}, ValueError, "k must be >= 1"),
        ((_X, _Y.to("meta"), _T, _R), {}, ValueError, "regions is on meta but text is on cpu"),
        ((_X, _Y, _T, torch.tensor([5, 6])), {}, ValueError,
         r"region_lens must lie in \[0, 5\] \(regions.shape\[1\]\)"),
    ],
)
def test_wra_validation(args: tuple, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ot.wra_distance(*args, **kwargs)


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"hidden": torch.randn(2, 3, 4)}, ValueError, r"hidden must be 2-D \(total rows, dim\)"),
        ({"text_starts": torch.tensor([0.0, 3.0])}, TypeError, "text_starts must be an integer tensor"),
        ({"region_starts": torch.tensor([3, 9])}, ValueError, r"region_starts \+ region_lens must be <= 10"),
        ({"max_text_len": 2}, ValueError, r"text_lens must lie in \[0, 2\] \(max_text_len\)"),
        ({"max_regions": -1}, ValueError, "max_regions must be >= 0"),
        ({"max_text_len": 3.0}, TypeError, "max_text_len must be an integer, got 3.0"),
        ({"max_regions": True}, TypeError, "max_regions must be an integer, got True"),
        ({"region_lens": torch.tensor([4])}, ValueError, r"region_lens must be 1-D of length 2 \(text_lens' length\)"),
    ],
)
def test_packed_validation(change: dict, error: type, match: str) -> None:
    args = {"hidden": torch.randn(10, 4), "text_starts": torch.tensor([0, 5]), "text_lens": torch.tensor([3, 2]),
            "region_starts": torch.tensor([3, 7]), "region_lens": torch.tensor([2, 3]), "max_text_len": 3,
            "max_regions": 3}
    args.update(change)
    with pytest.raises(error, match=match):
        ot.wra_distance_packed(**args)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"k": 0}, ValueError, "k must be >= 1"),
        ({"beta": 0.0}, ValueError, "beta must be finite and > 0"),
        ({"beta": True}, TypeError, "beta must be a real number"),
        ({"iterations": 0}, ValueError, "iterations must be >= 1"),
        ({"method": "sinkhorn_log", "eps": 0.0}, ValueError, "eps must be finite and > 0"),
        ({"method": "sinkhorn_log", "eps": 0.1, "iterations": 0}, ValueError, "iterations must be >= 1"),
        ({"method": "sinkhorn_log", "eps": 0.1, "tol": 0.0}, ValueError, "tol must be finite and > 0"),
        ({"method": "ipot_log", "tol": float("nan")}, ValueError, "tol must be finite and > 0"),
    ],
)
@pytest.mark.parametrize("choice", ["torch", "triton"])
def test_wra_parameters_are_checked_whatever_the_backend(kwargs: dict, error: type, match: str, choice: str) -> None:
    with pytest.raises(error, match=match):
        ot.wra_distance(_X, _Y, _T, _R, backend=choice, **kwargs)
    hidden = torch.cat([_X.flatten(0, 1), _Y.flatten(0, 1)])
    with pytest.raises(error, match=match):
        ot.wra_distance_packed(hidden, torch.tensor([0, 3]), _T, torch.tensor([6, 11]), _R, 3, 5, backend=choice,
                               **kwargs)


def test_explicit_triton_refuses_fp64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    with pytest.raises(backend.BackendUnavailable, match="ipot.*dtype torch.float64"):
        ot.ipot(torch.zeros(2, 3, 4, dtype=torch.float64), _T, _R.clamp(max=4))
    with pytest.raises(backend.BackendUnavailable, match="wra_distance.*float64"):
        ot.wra_distance(_X.double(), _Y.double(), _T, _R)


def test_auto_on_cpu_uses_the_reference(gen: torch.Generator) -> None:
    cost, text_lens, region_lens = cost_batch(SIZES, gen=gen)
    cost = cost.nan_to_num(0.5).float()
    dist, plan = ot.ipot(cost, text_lens, region_lens, return_plan=True)  # auto: no interpreter for auto
    torch.testing.assert_close(plan, reference.ipot_plan_ref(cost, text_lens, region_lens), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# CUDA at UNITER's sizes
# ---------------------------------------------------------------------------------------------------------


def uniter_batch(dtype: torch.dtype, dim: int = 768, batch: int = 64, device: str = "cuda"):
    """UNITER-sized vectors: up to 60 words and 100 regions, a length-1 text and an empty region side."""
    gen = torch.Generator().manual_seed(7)
    max_m, max_n = 60, 100
    text_lens = torch.randint(1, max_m + 1, (batch,), generator=gen)
    region_lens = torch.randint(10, max_n + 1, (batch,), generator=gen)
    text_lens[0], region_lens[1] = 1, 0
    text = torch.randn(batch, max_m, dim, generator=gen).to(dtype)
    regions = torch.randn(batch, max_n, dim, generator=gen).to(dtype)
    return text.to(device), regions.to(device), text_lens.to(device), region_lens.to(device)


def error_against(got: torch.Tensor, exact: torch.Tensor) -> float:
    return (got.double() - exact).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_cuda_cost_input_at_uniter_size(dtype: torch.dtype, method: str) -> None:
    text, regions, text_lens, region_lens = uniter_batch(torch.float32)
    cost = reference.cosine_cost_ref(text, regions).to(dtype)
    exact = reference_plan(method, cost.double(), text_lens, region_lens, 50)
    same_dtype_reference = reference_plan(method, cost, text_lens, region_lens, 50)
    if method == "sinkhorn_log":
        dist, plan = ot.sinkhorn(cost, text_lens, region_lens, eps=0.1, iterations=50, return_plan=True)
    else:
        dist, plan = ot.ipot(cost, text_lens, region_lens, iterations=50, k=METHOD_ARGS[method].get("k", 1),
                             log_domain=method == "ipot_log", return_plan=True)
    assert plan.dtype == torch.float32 and bool(torch.isfinite(plan).all()) and bool(torch.isfinite(dist).all())
    assert bool((plan[pad_mask(plan.cpu(), text_lens.cpu(), region_lens.cpu()).to(plan.device)] == 0).all())
    # DESIGN: at most twice the reference path's own error in the same dtype; the log form also rounds
    # t C / beta (up to 200) in fp32, about 1e-4 of the largest entry
    slack = 2e-4 * exact.abs().max().item() if method == "ipot_log" else 1e-7
    assert error_against(plan, exact) <= 2 * error_against(same_dtype_reference, exact) + slack


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_fused_wra_at_uniter_size(dtype: torch.dtype) -> None:
    text, regions, text_lens, region_lens = uniter_batch(dtype)
    text.requires_grad_()
    regions.requires_grad_()
    dist, plan = ot.wra_distance(text, regions, text_lens, region_lens, return_plan=True)
    weights = torch.randn(text.shape[0], device=text.device)
    grads = torch.autograd.grad((dist * weights).sum(), (text, regions))
    # oracle: fp64 from the same rounded vectors
    t64, r64 = text.detach().double().requires_grad_(), regions.detach().double().requires_grad_()
    cost = reference.cosine_cost_ref(t64, r64)
    exact = reference.ipot_plan_ref(cost.detach(), text_lens, region_lens)
    exact_dist = reference.transport_distance_ref(cost, exact)
    exact_grads = torch.autograd.grad((exact_dist * weights.double()).sum(), (t64, r64))
    # the reference path in the same dtype
    t_ref, r_ref = text.detach().clone().requires_grad_(), regions.detach().clone().requires_grad_()
    ref_dist, ref_plan = ot.wra_distance(t_ref, r_ref, text_lens, region_lens, return_plan=True, backend="torch")
    ref_grads = torch.autograd.grad((ref_dist * weights).sum(), (t_ref, r_ref))
    assert bool(torch.isfinite(plan).all()) and bool(torch.isfinite(dist).all())
    assert error_against(plan, exact) <= 2 * error_against(ref_plan, exact) + 1e-7
    assert error_against(dist, exact_dist) <= 2 * error_against(ref_dist, exact_dist) + 1e-6
    for got, ref, want in zip(grads, ref_grads, exact_grads):
        assert got.dtype == dtype and bool(torch.isfinite(got).all())
        assert error_against(got, want) <= 2 * error_against(ref, want) + 1e-4 * want.abs().max().item()


@pytest.mark.gpu
def test_cuda_tolerance_and_packed() -> None:
    text, regions, text_lens, region_lens = uniter_batch(torch.bfloat16, dim=64)
    dist, plan, counts = ot.wra_distance(text, regions, text_lens, region_lens, iterations=200, tol=1e-3,
                                         return_plan=True)
    assert counts.device == text.device and int(counts[1]) == 0 and 1 <= int(counts[0]) < 200
    columns = plan.sum(1) - torch.where(region_lens > 0, 1 / region_lens.clamp(min=1), 0)[:, None]
    columns = torch.where(torch.arange(plan.shape[2], device=plan.device) < region_lens[:, None], columns, 0)
    assert bool((columns.abs().sum(1)[counts < 200] <= 1e-3 + 1e-5).all())
    chosen = int(counts.max())  # the problems that ran longest match a fixed run of that many iterations
    fixed = ot.wra_distance(text, regions, text_lens, region_lens, iterations=chosen)
    torch.testing.assert_close(dist[counts == chosen], fixed[counts == chosen], rtol=1e-6, atol=1e-7)
    # packed: the padded rows laid end to end
    batch, dim = text.shape[0], text.shape[2]
    hidden = torch.cat([text.reshape(-1, dim), regions.reshape(-1, dim)])
    text_starts = torch.arange(batch, device=text.device) * text.shape[1]
    region_starts = batch * text.shape[1] + torch.arange(batch, device=text.device) * regions.shape[1]
    packed = ot.wra_distance_packed(hidden, text_starts, text_lens, region_starts, region_lens, text.shape[1],
                                    regions.shape[1])
    torch.testing.assert_close(packed, ot.wra_distance(text, regions, text_lens, region_lens), rtol=1e-6, atol=1e-7)
