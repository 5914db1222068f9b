"""Details of the OT API (kernels.ot, kernels.reference, the launchers' checks) that the other OT tests leave open:
the defaults of every entry point, the outputs of the unrolled option, which kernel a flag picks, what the layer
forwards, and edge cases of the argument checks.

Oracles: the numpy IPOT of tests/helpers.py (paper Algorithm 1) and of log-domain Sinkhorn, one unpadded problem at a
time, on a numpy cosine cost; none of the expected values comes from the code under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import ipot_single
from uniter_fast.kernels import backend, ot, reference

# (text, regions) per problem: odd sizes, a length-1 side and an empty problem; padding beyond them
SIZES = [(4, 5), (3, 2), (0, 3), (5, 1)]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(2024)


def lse(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def sinkhorn_np(cost: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    """Log-domain Sinkhorn from zero potentials, column potential first (POT's sinkhorn_log order)."""
    m, n = cost.shape
    log_k = -cost / eps
    f = np.zeros(m)
    for _ in range(iterations):
        g = -np.log(n) - lse(log_k + f[:, None], 0)
        f = -np.log(m) - lse(log_k + g[None, :], 1)
    return np.exp(log_k + f[:, None] + g[None, :])


def cosine_np(w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """1 - cos with F.normalize's floor: x / max(|x|, 1e-5)."""
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-5)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-5)
    return 1 - w @ v.T


def padded_vectors(sizes, gen: torch.Generator, dim: int = 5, dtype=torch.float64):
    """text (B, M, D), regions (B, N, D) with random values on the pads too, and the lens."""
    big_m, big_n = max(m for m, _ in sizes) + 1, max(n for _, n in sizes) + 1
    text = torch.randn(len(sizes), big_m, dim, generator=gen, dtype=torch.float64).to(dtype)
    regions = torch.randn(len(sizes), big_n, dim, generator=gen, dtype=torch.float64).to(dtype)
    lens = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
    return text, regions, lens[:, 0], lens[:, 1]


def packed_layout(text, regions, text_lens, region_lens):
    """The same rows packed as the encoder lays them out: each sample's words, then its regions."""
    rows, text_starts, region_starts, row = [], [], [], 0
    for b, (m, n) in enumerate(zip(text_lens.tolist(), region_lens.tolist())):
        text_starts.append(row)
        region_starts.append(row + m)
        rows += [text[b, :m], regions[b, :n]]
        row += m + n
    return torch.cat(rows), torch.tensor(text_starts), torch.tensor(region_starts)


def expected_wra(text, regions, sizes, *, beta=0.5, iterations=50, k=1):
    """Per problem: (numpy plan, distance) of IPOT on the numpy cosine cost; empty problems: None, 0."""
    out = []
    for b, (m, n) in enumerate(sizes):
        if m == 0 or n == 0:
            out.append((None, 0.0))
            continue
        cost = cosine_np(text[b, :m].double().numpy(), regions[b, :n].double().numpy())
        plan = ipot_single(cost, beta, iterations, k)
        out.append((plan, float((cost * plan).sum())))
    return out


# ---------------------------------------------------------------------------------------------------------
# defaults: the original's IPOT (beta 0.5, 50 iterations, k 1) at every entry point
# ---------------------------------------------------------------------------------------------------------


def test_vector_entry_points_default_to_the_originals_ipot(gen: torch.Generator) -> None:
    """wra_distance, wra_distance_packed and WordRegionDistance() with no solver arguments run UNITER's IPOT."""
    text, regions, text_lens, region_lens = padded_vectors(SIZES, gen)
    want = torch.tensor([d for _, d in expected_wra(text, regions, SIZES)], dtype=torch.float64)
    hidden, text_starts, region_starts = packed_layout(text, regions, text_lens, region_lens)
    max_m, max_n = text.shape[1], regions.shape[1]
    results = {
        "wra_distance": ot.wra_distance(text, regions, text_lens, region_lens, backend="torch"),
        "wra_distance_packed": ot.wra_distance_packed(hidden, text_starts, text_lens, region_starts, region_lens,
                                                      max_m, max_n, backend="torch"),
        "WordRegionDistance": ot.WordRegionDistance(backend="torch")(hidden, text_starts, text_lens, region_starts,
                                                                     region_lens, max_m, max_n),
    }
    for name, got in results.items():
        assert isinstance(got, torch.Tensor) and got.shape == (len(SIZES),), name  # no tol: the distance alone
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda msg: f"{name}: {msg}")


def test_sinkhorn_defaults_to_100_iterations() -> None:
    """ot.sinkhorn without iterations runs its signature's 100 (eps 0.02: not converged, so the count shows)."""
    cost = torch.tensor(cosine_np(np.random.default_rng(1).standard_normal((6, 4)),
                                  np.random.default_rng(2).standard_normal((7, 4))))[None]
    got = ot.sinkhorn(cost, torch.tensor([6]), torch.tensor([7]), eps=0.02, return_plan=True, backend="torch")[1]
    np.testing.assert_allclose(got[0].numpy(), sinkhorn_np(cost[0].numpy(), 0.02, 100), rtol=1e-9, atol=1e-300)


# ---------------------------------------------------------------------------------------------------------
# the unrolled gradient's outputs
# ---------------------------------------------------------------------------------------------------------


def test_unrolled_returns_plan_and_counts_like_the_envelope(gen: torch.Generator) -> None:
    """grad='unrolled' keeps the documented outputs: dist, plan when return_plan, the iterations run when tol (the
    reference runs them all, 0 for empty problems); only the gradient differs."""
    text, regions, text_lens, region_lens = padded_vectors(SIZES, gen)
    dist, plan, counts = ot.wra_distance(text, regions, text_lens, region_lens, iterations=7, grad="unrolled",
                                         return_plan=True, tol=1e-3, backend="torch")
    assert counts.dtype == torch.int32 and counts.tolist() == [0 if m * n == 0 else 7 for m, n in SIZES]
    for b, ((m, n), (want_plan, want_dist)) in enumerate(zip(SIZES, expected_wra(text, regions, SIZES, iterations=7))):
        assert bool((plan[b, m:] == 0).all()) and bool((plan[b, :, n:] == 0).all())
        if want_plan is not None:
            np.testing.assert_allclose(plan[b, :m, :n].detach().numpy(), want_plan, rtol=1e-10, atol=1e-300)
        assert dist[b].item() == pytest.approx(want_dist, rel=1e-10, abs=1e-300)
    # without return_plan and tol: the distance alone
    alone = ot.wra_distance(text, regions, text_lens, region_lens, iterations=7, grad="unrolled", backend="torch")
    assert isinstance(alone, torch.Tensor) and torch.equal(alone, dist)


# ---------------------------------------------------------------------------------------------------------
# what the flags and the layer hand on
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_domain,kernel", [(False, "ipot"), (True, "ipot_log")])
def test_log_domain_picks_the_log_domain_kernel(monkeypatch: pytest.MonkeyPatch, log_domain: bool,
                                                kernel: str) -> None:
    """ipot(log_domain=...) reaches the triton launcher as that method, with scale 1/beta, k and tol: the two forms
    agree to ~1e-4, so a swap would pass any tolerance-based comparison."""
    from uniter_fast.kernels import ot_triton

    seen = []
    launcher = ot_triton.transport_cost

    def spy(cost, text_lens, region_lens, solve, **kwargs):
        seen.append(solve)
        return launcher(cost, text_lens, region_lens, solve, **kwargs)

    monkeypatch.setattr(ot_triton, "transport_cost", spy)
    cost = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)) * 2
    ot.ipot(cost, torch.tensor([3, 2]), torch.tensor([4, 1]), beta=0.25, iterations=3, k=2, tol=1e-2,
            log_domain=log_domain, backend="triton")
    assert seen == [ot_triton.Solve(kernel, 4.0, 3, 2, 1e-2)]


def test_layer_forwards_its_backend_and_options() -> None:
    """WordRegionDistance hands its backend on: an explicit 'triton' layer refuses fp64 rows as the functional does
    (it must not quietly fall back to the reference)."""
    hidden = torch.randn(7, 4, dtype=torch.float64)
    args = (torch.tensor([0, 3]), torch.tensor([3, 1]), torch.tensor([3, 4]), torch.tensor([0, 3]), 3, 3)
    with pytest.raises(backend.BackendUnavailable, match="float64"):
        ot.WordRegionDistance(backend="triton")(hidden, *args)
    layer = ot.WordRegionDistance(ot.TransportOptions(iterations=5, tol=1e-3), backend="torch")
    dist, counts = layer(hidden, *args)
    assert counts.tolist() == [0, 5]
    assert "backend='torch'" in repr(layer)


# ---------------------------------------------------------------------------------------------------------
# argument checks: what they must let through, and what the reference and the launchers must refuse
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["torch", "triton"])
def test_packed_accepts_a_text_only_batch_and_an_empty_batch(choice: str) -> None:
    """max_regions = 0 (no sample has an image) and a batch of no samples are valid calls: distance 0, shape (B,)."""
    hidden = torch.randn(7, 4)
    text_starts, text_lens = torch.tensor([0, 3]), torch.tensor([3, 4])
    dist = ot.wra_distance_packed(hidden, text_starts, text_lens, torch.tensor([3, 7]), torch.tensor([0, 0]), 4, 0,
                                  backend=choice)
    assert dist.tolist() == [0.0, 0.0]
    none = torch.zeros(0, dtype=torch.long)
    assert ot.wra_distance_packed(hidden, none, none, none, none, 0, 0, backend=choice).shape == (0,)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"eps": 0.0, "iterations": 3}, ValueError, "eps must be finite and > 0"),
    ({"eps": 0.1, "iterations": 0}, ValueError, "iterations must be >= 1"),
    ({"eps": 0.1, "iterations": 3.0}, TypeError, "iterations must be an integer"),
])
def test_reference_sinkhorn_checks_its_arguments(kwargs: dict, error: type, match: str) -> None:
    """The reference solver is public: it refuses bad parameters itself (as ipot_plan_ref does), not only ot.sinkhorn."""
    with pytest.raises(error, match=match):
        reference.sinkhorn_plan_ref(torch.zeros(1, 2, 2), torch.tensor([2]), torch.tensor([2]), **kwargs)


def test_triton_serves_up_to_its_largest_tile() -> None:
    """The kernels serve tiles up to MAX_TILE elements: 128 x 256 sides are served, one more text row is not."""
    from uniter_fast.kernels import ot_triton

    assert ot_triton.MAX_TILE == 128 * 256
    x = torch.zeros(1)
    assert ot_triton.unsupported((x,), 128, 256) is None and ot_triton.unsupported((x,), 256, 128) is None
    assert "129 x 256" in ot_triton.unsupported((x,), 129, 256)


def test_vector_launcher_refuses_a_strided_stats_buffer(gen: torch.Generator) -> None:
    """The kernels index grad_stats flat: a buffer of the right shape and dtype but not contiguous is refused."""
    from uniter_fast.kernels import ot_triton

    text, regions, text_lens, region_lens = padded_vectors([(2, 3)], gen, dtype=torch.float32)
    stats = torch.zeros(text.shape[1] + regions.shape[1], 2, 1).permute(2, 1, 0)  # (1, 2, M + N), strided
    assert stats.shape == (1, 2, text.shape[1] + regions.shape[1]) and not stats.is_contiguous()
    with pytest.raises(ValueError, match="grad_stats buffer: expected a contiguous fp32"):
        ot_triton.transport_vectors(ot_triton.Rows(text), ot_triton.Rows(regions), text_lens, region_lens,
                                    ot_triton.Solve("ipot", 2.0, 2), stats=stats)


def test_packed_gradient_is_exactly_zero_on_rows_of_no_problem(gen: torch.Generator,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed rows that belong to no problem (gaps, trailing rows) get gradient 0, whatever the fresh buffers held:
    the kernel writes only the problems' rows."""
    hidden = torch.randn(9, 6, generator=gen).requires_grad_()
    text_starts, text_lens = torch.tensor([0, 5]), torch.tensor([2, 1])
    region_starts, region_lens = torch.tensor([2, 6]), torch.tensor([2, 2])  # rows 4 and 8 belong to no problem
    dist = ot.wra_distance_packed(hidden, text_starts, text_lens, region_starts, region_lens, 2, 2, iterations=3,
                                  backend="triton")
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real_empty_like(t, **kw).fill_(float("nan")))
    (grad,) = torch.autograd.grad(dist.sum(), hidden)
    assert bool((grad[[4, 8]] == 0).all())
    assert bool(torch.isfinite(grad).all()) and bool((grad[[0, 1, 2, 3, 5, 6, 7]] != 0).any(dim=1).all())


@pytest.mark.parametrize("choice", ["torch", "triton"])
def test_zero_dimensional_vectors(choice: str) -> None:
    """D = 0: every vector is zero, cosine 0, cost 1; the distance is the moved mass (1, or 0 if empty) and the
    gradients are empty tensors of the inputs' shapes."""
    text = torch.zeros(2, 3, 0, requires_grad=True)
    regions = torch.zeros(2, 4, 0, requires_grad=True)
    dist = ot.wra_distance(text, regions, torch.tensor([3, 1]), torch.tensor([4, 0]), iterations=3, backend=choice)
    torch.testing.assert_close(dist, torch.tensor([1.0, 0.0]))
    grads = torch.autograd.grad(dist.sum(), (text, regions))
    assert grads[0].shape == text.shape and grads[1].shape == regions.shape


# ---------------------------------------------------------------------------------------------------------
# envelope gradient from a cost, in the common call: no plan asked for
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_cost_gradient_without_return_plan_on_triton(solver: str) -> None:
    """The usual training call asks for the distance only: the backward still needs the plan, so the kernel must
    produce it whenever the cost requires a gradient. d(sum_b w_b dist_b)/dC = w_b T_b (the oracle's plan)."""
    rng = np.random.default_rng(5)
    sizes = [(3, 4), (2, 1)]
    cost = torch.zeros(2, 3, 4, dtype=torch.float32)
    for b, (m, n) in enumerate(sizes):
        cost[b, :m, :n] = torch.from_numpy(cosine_np(rng.standard_normal((m, 4)), rng.standard_normal((n, 4))))
    cost.requires_grad_()
    weights = torch.tensor([0.7, -1.3])
    kwargs = {"eps": 0.1} if solver == "sinkhorn" else {}
    dist = getattr(ot, solver)(cost, torch.tensor([3, 2]), torch.tensor([4, 1]), iterations=5, backend="triton",
                               **kwargs)
    assert isinstance(dist, torch.Tensor) and dist.shape == (2,)
    (grad,) = torch.autograd.grad((dist * weights).sum(), cost)
    for b, (m, n) in enumerate(sizes):
        block = cost.detach()[b, :m, :n].double().numpy()
        plan = sinkhorn_np(block, 0.1, 5) if solver == "sinkhorn" else ipot_single(block, 0.5, 5, 1)
        np.testing.assert_allclose(grad[b, :m, :n].numpy(), weights[b].item() * plan, rtol=1e-4, atol=1e-7)
        assert bool((grad[b, m:] == 0).all()) and bool((grad[b, :, n:] == 0).all())


# ---------------------------------------------------------------------------------------------------------
# padding rows hold anything
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_nan_in_padding_rows_reaches_no_distance_or_gradient(gen: torch.Generator, grad: str) -> None:
    """Padded vectors may hold anything beyond the lengths (an encoder's pad rows, uninitialised memory): every
    backend gives the distances and gradients of the same vectors with zero padding, finite."""
    text, regions, text_lens, region_lens = padded_vectors(SIZES, gen, dtype=torch.float32)
    clean = [x.clone() for x in (text, regions)]
    for x, lens in ((text, text_lens), (regions, region_lens)):
        for b, n in enumerate(lens.tolist()):
            x[b, n:] = float("nan")
    for c, lens in zip(clean, (text_lens, region_lens)):
        for b, n in enumerate(lens.tolist()):
            c[b, n:] = 0.0
    choices = ["torch", "triton"] if grad == "envelope" else ["torch"]  # unrolled runs the reference loop
    results = {}
    for choice in choices:
        for name, (t, r) in (("nan", (text, regions)), ("zero", clean)):
            t, r = t.clone().requires_grad_(), r.clone().requires_grad_()
            dist = ot.wra_distance(t, r, text_lens, region_lens, iterations=5, grad=grad, backend=choice)
            grads = torch.autograd.grad(dist.sum(), (t, r))
            results[choice, name] = (dist, *grads)
    for choice in choices:
        for got, want in zip(results[choice, "nan"], results[choice, "zero"]):
            assert bool(torch.isfinite(got).all()), choice
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
