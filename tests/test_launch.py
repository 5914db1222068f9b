"""kernels/launch.py: the direct launch runs the kernel Triton would run, with the arguments Triton would pass."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uniter_fast.kernels import launch

DRY_RUN = Path(__file__).with_name("launch_dry_run.py")


def test_direct_launch_matches_triton_path_in_a_dry_run():
    """In a process with JIT kernels (no interpreter) and Triton's dry driver: probe calls varying everything
    Triton specialises on, and every launcher of the OT and attention kernels."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", launch.ENV_VAR)}
    done = subprocess.run([sys.executable, str(DRY_RUN)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok:"), done.stdout


class _StandIn:
    """A test's stand-in kernel: not a JITFunction, so launch() must call it as fn[grid](...)."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_other_kernels_take_their_own_path():
    stand_in = _StandIn()
    launch.launch(stand_in, (3,), 1, torch.zeros(2), BLOCK=4)
    launch.launch(stand_in, (3,), 1, torch.zeros(2), BLOCK=4)
    assert [c[0] for c in stand_in.calls] == [(3,), (3,)] and stand_in.calls[0][2] == {"BLOCK": 4}
    assert launch._direct_for(stand_in) is None


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="JIT kernels here: the dry run covers them")
def test_interpreted_kernels_take_triton_path():
    from uniter_fast.kernels import attention_triton

    assert launch._direct_for(attention_triton._fwd_kernel) is None


def test_feature_keys_what_triton_specialises_on():
    assert launch._feature(16, launch.SPECIALISED) != launch._feature(17, launch.SPECIALISED)
    assert launch._feature(5, launch.FREE) == launch._feature(7, launch.FREE)  # do_not_specialize: the class only
    assert launch._feature(5, launch.FREE) != launch._feature(2**40, launch.FREE)  # i32 against i64
    assert launch._feature(0.5, launch.SPECIALISED) == launch._feature(2.0, launch.SPECIALISED)
    assert launch._feature(0.5, launch.CONSTEXPR) != launch._feature(2.0, launch.CONSTEXPR)
    x = torch.zeros(8)
    assert launch._feature(x, 0) != launch._feature(x[1:], 0)  # the address mod 16
    assert launch._feature(x, 0) != launch._feature(x.half(), 0)
    assert launch._feature(object(), 0) is launch._UNCACHEABLE


def _kernel_calls(seed: int):
    """The attention forward and backward and the WRA forward and backward launchers on CUDA, bf16."""
    from uniter_fast.kernels import attention_triton, ot_triton

    gen = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.tensor([0, 1, 37, 64, 100], device="cuda")
    cu = torch.zeros(6, dtype=torch.int32, device="cuda")
    cu[1:] = lens.cumsum(0)
    total = int(cu[-1])
    q, k, v, g = (torch.randn(total, 12, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    out, lse = attention_triton.forward(q, k, v, cu, 100, 0.125, 0.1, 1234)
    grads = attention_triton.backward(g, q, k, v, out, lse, cu, 100, 0.125, 0.1, 1234)
    x = torch.randn(4, 60, 768, device="cuda", dtype=torch.bfloat16, generator=gen)
    y = torch.randn(4, 100, 768, device="cuda", dtype=torch.bfloat16, generator=gen)
    text_lens = torch.tensor([1, 60, 17, 30], device="cuda")
    region_lens = torch.tensor([100, 1, 36, 50], device="cuda")
    text, regions = ot_triton.Rows(x), ot_triton.Rows(y)
    stats = ot_triton.grad_stats(4, 60, 100, x.device)
    dist, plan, _ = ot_triton.transport_vectors(text, regions, text_lens, region_lens, ot_triton.Solve("ipot", 2.0, 50),
                                                want_plan=True, stats=stats)
    wra_grads = ot_triton.cosine_backward(text, regions, text_lens, region_lens, plan, stats, torch.ones_like(dist))
    return out, lse, *grads, dist, plan, *wra_grads


@pytest.mark.gpu
def test_direct_launch_gives_triton_paths_results_on_cuda(monkeypatch):
    monkeypatch.setenv(launch.ENV_VAR, "0")
    launch.clear()
    expected = _kernel_calls(0)
    monkeypatch.setenv(launch.ENV_VAR, "1")
    launch.clear()
    _kernel_calls(0)  # each key's first call goes through Triton
    got = _kernel_calls(0)
    assert all(entry[1] is not None and entry[1].entries for entry in launch._direct.values())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    side = torch.cuda.Stream()  # launches follow the caller's stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = _kernel_calls(0)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(on_side, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
