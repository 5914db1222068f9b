"""Run by test_launch.py in a process without TRITON_INTERPRET (the kernels must be JITFunctions): under
kernels.launch.DryRun, every direct launch must run the kernel Triton's own path runs for the same call, with the
arguments Triton hands it. Exits non-zero with the first difference."""
from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from uniter_fast.kernels import attention_triton, launch, ot_triton  # noqa: E402
from uniter_fast.kernels.ot_triton import Rows, Solve  # noqa: E402


@triton.jit(do_not_specialize=["seed"])
def _probe_kernel(X, Y, n, stride, scale, seed, flag, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs * stride, mask=offs < n)
    tl.store(Y + offs, x * scale + seed + flag + SHIFT, mask=offs < n)


def _launches(dry: launch.DryRun) -> list:
    return [(kernel, len(kernel.launches)) for kernel in dry.kernels]


def _new(dry: launch.DryRun, before: list) -> list:
    """(kernel, grid, args) of the launches since `before`, in the order the kernels were made, then launched."""
    counts = dict((id(k), n) for k, n in before)
    found = []
    for kernel in dry.kernels:
        for grid, args in kernel.launches[counts.get(id(kernel), 0):]:
            found.append((kernel, grid, args))
    return found


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


def check_probe(dry: launch.DryRun) -> int:
    """Calls that differ in each thing Triton specialises on: each must run its own kernel, with its own args."""
    base = torch.zeros(64, dtype=torch.float32)
    y = torch.zeros(64, dtype=torch.float32)
    variants = []
    for x in (base, base[1:], base.to(torch.float16), base[4:]):  # dtype; address mod 16 = 0, 4, 0
        for n in (1, 16, 17, 33, 48, 2**31 + 5):  # 17 and 33, 16 and 48: one kernel each, their own values
            for stride in (1, 3, 32):
                for seed in (0, 7, 2**40, 2**63 + 5):  # i32, i64, u64
                    for scale in (0.5, 2.0):
                        variants.append(((x, y, n, stride, scale, seed, True), dict(BLOCK=16, SHIFT=1)))
    for flag in (True, 1, False, 0):  # a bool is u1 to Triton; 1 a constant, 0 an i32
        variants.append(((base, y, 16, 1, 1.0, 3, flag), dict(BLOCK=16, SHIFT=1)))
    variants.append(((base, y, 16, 1, 1.0, 3, False), dict(BLOCK=16, SHIFT=2, num_warps=2)))
    variants.append(((base, y, 16, 1, 1.0, 3, False), dict(BLOCK=32, SHIFT=2)))
    variants.append(((base, y, 16, 1, 1.0, 3), dict(flag=False, BLOCK=32, SHIFT=2)))  # a runtime arg by keyword
    variants.append(((base, y, 16, 1, 1.0, 3), dict(flag=0, BLOCK=32, SHIFT=2)))
    grid = (2,)
    for args, kwargs in variants:
        before = _launches(dry)
        _probe_kernel[grid](*args, **kwargs)
        (triton_kernel, triton_grid, triton_args), = _new(dry, before)
        for _ in range(2):  # the first call may fill the entry through Triton; the second is direct
            before = _launches(dry)
            launch.launch(_probe_kernel, grid, *args, **kwargs)
            (kernel, got_grid, got_args), = _new(dry, before)
            assert kernel is triton_kernel, f"{args[2:]} {kwargs}: ran {kernel.key}, Triton ran {triton_kernel.key}"
            assert got_grid == triton_grid and len(got_args) == len(triton_args) and all(
                map(_same, got_args, triton_args)), f"{args[2:]} {kwargs}: args {got_args} != {triton_args}"
    entries = len(launch._direct_for(_probe_kernel).entries)
    assert 1 < entries <= len(dry.kernels), f"{entries} direct entries for {len(dry.kernels)} Triton kernels"
    return len(variants)


def check_bypasses(dry: launch.DryRun) -> None:
    """Triton's path serves calls with a launch hook attached (a profiler), and every call with the variable off."""
    from triton import knobs

    args, grid = (torch.zeros(16), torch.zeros(16), 16, 1, 1.0, 3, True), (1,)
    seen = []
    hook = seen.append
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(3):
            launch.launch(_probe_kernel, grid, *args, BLOCK=16, SHIFT=0)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 3, f"a launch hook saw {len(seen)} of 3 launches"
    os.environ[launch.ENV_VAR] = "0"
    launch.clear()
    launch.launch(_probe_kernel, grid, *args, BLOCK=16, SHIFT=0)
    assert launch._direct_for(_probe_kernel) is None, f"{launch.ENV_VAR}=0 left the direct path on"
    os.environ[launch.ENV_VAR] = "1"
    launch.clear()


def _layout(t):
    """A launch argument up to the identity of fresh outputs: tensors by shape, strides, dtype and, for inputs,
    address."""
    if isinstance(t, torch.Tensor):
        return ("tensor", tuple(t.shape), t.stride(), t.dtype)
    return t


def _compare_launchers(dry: launch.DryRun, name: str, call) -> int:
    """`call` through Triton's path, then twice through the direct path: the second call's launches must match."""
    os.environ[launch.ENV_VAR] = "0"
    launch.clear()
    before = _launches(dry)
    call()
    reference = _new(dry, before)
    os.environ[launch.ENV_VAR] = "1"
    launch.clear()
    call()
    before = _launches(dry)
    call()
    direct = _new(dry, before)
    assert direct and len(direct) == len(reference), f"{name}: {len(direct)} launches, Triton made {len(reference)}"
    for (k1, g1, a1), (k2, g2, a2) in zip(direct, reference):
        assert k1 is k2 and g1 == g2, f"{name}: ran {k1.name} {g1}, Triton ran {k2.name} {g2}"
        assert list(map(_layout, a1)) == list(map(_layout, a2)), f"{name}: arguments of {k1.name} differ"
    assert all(entry[1] is None or entry[1].entries for entry in launch._direct.values()), f"{name}: nothing cached"
    return len(direct)


def check_launchers(dry: launch.DryRun) -> int:
    torch.manual_seed(0)
    heads, dim = 2, 64
    lens = torch.tensor([0, 1, 17, 32])
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    total = int(cu[-1])
    q, k, v, g = (torch.randn(total, heads, dim, dtype=torch.bfloat16) for _ in range(4))
    checked = 0
    for dropout in (0.0, 0.1):
        out, lse = attention_triton.forward(q, k, v, cu, 32, 0.125, dropout, 5)
        checked += _compare_launchers(dry, "attention forward",
                                      lambda: attention_triton.forward(q, k, v, cu, 32, 0.125, dropout, 5))
        for fused in (False, True):
            rule = attention_triton.backward_launch(32, dim, q.dtype)
            tile = attention_triton.Launch(rule.block_m, rule.block_n, rule.num_warps, rule.num_stages, fused)
            checked += _compare_launchers(dry, f"attention backward fused={fused}", lambda: attention_triton.backward(
                g, q, k, v, out, lse, cu, 32, 0.125, dropout, 5, launch=tile))
    checked += _compare_launchers(dry, "keep mask", lambda: attention_triton.dropout_keep_mask(cu, heads, 32, 0.1, 9))

    batch, m, n, d = 5, 7, 11, 24
    text_lens = torch.tensor([1, 7, 3, 0, 5])
    region_lens = torch.tensor([11, 2, 1, 4, 0])
    cost = torch.rand(batch, m, n)
    for method in ("ipot", "sinkhorn_log", "ipot_log"):
        solve = Solve(method, 10.0, 5, k=2, tol=1e-3 if method == "ipot" else None)
        checked += _compare_launchers(dry, f"transport_cost {method}", lambda: ot_triton.transport_cost(
            cost, text_lens, region_lens, solve, want_plan=True))
    x, y = torch.randn(batch, m, d, dtype=torch.float16), torch.randn(batch, n, d, dtype=torch.float16)
    text, regions = Rows(x, None, m), Rows(y, None, n)
    stats = ot_triton.grad_stats(batch, m, n, x.device)
    solve = Solve("ipot", 2.0, 5)
    checked += _compare_launchers(dry, "transport_vectors", lambda: ot_triton.transport_vectors(
        text, regions, text_lens, region_lens, solve, want_plan=True, stats=stats))
    plan = torch.rand(batch, m, n)
    checked += _compare_launchers(dry, "cosine_backward", lambda: ot_triton.cosine_backward(
        text, regions, text_lens, region_lens, plan, stats, torch.ones(batch)))
    return checked


def main() -> None:
    with launch.DryRun() as dry:
        probes = check_probe(dry)
        check_bypasses(dry)
        launchers = check_launchers(dry)
    kernels = (_probe_kernel, attention_triton._fwd_kernel, attention_triton._bwd_kernel, ot_triton._transport_kernel)
    assert not any(launch.DRY_DEVICE in fn.device_caches for fn in kernels), "dry kernels left in Triton's caches"
    print(f"ok: {probes} probe calls, {launchers} launcher launches matched Triton's path (triton "
          f"{triton.__version__})")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        sys.exit(1)
