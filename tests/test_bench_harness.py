"""The benchmarks' shared profiling helpers (benchmarks/harness.py): the kernels' grouping by kind, and profiles that
run after the timings and report a failure without stopping the others."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402


def _kernel(name: str, us: float, count: int) -> SimpleNamespace:
    return SimpleNamespace(key=name, self_device_time_total=us, count=count)


def test_kernel_kinds_groups_by_the_first_matching_fragment():
    kinds = {"ours": ("_transport_kernel", "_cosine_grad"), "fills": ("fill",), "any copy": ("copy", "fill")}
    kernels = [_kernel("_transport_kernel", 600.0, 3), _kernel("_cosine_grad_kernel", 300.0, 3),
               _kernel("vectorized_elementwise_kernel<FillFunctor>", 30.0, 6), _kernel("CatArrayBatchedCopy", 9.0, 3),
               _kernel("reduce_kernel", 3.0, 3)]
    grouped = harness.kernel_kinds(kernels, kinds, steps=3)
    assert list(grouped) == ["ours", "fills", "any copy", "other"]  # the costliest first
    assert grouped["ours"] == (300.0, 2)
    assert grouped["fills"] == (10.0, 2)  # "fill" matched its first kind, not "any copy"
    assert grouped["any copy"] == (3.0, 1)  # "Copy": the name is matched in lower case
    assert grouped["other"] == (1.0, 1)
    assert harness.kernel_kinds(kernels, {}, steps=1) == {"other": (942.0, 18)}


def test_run_profiles_reports_a_failure_and_runs_the_rest(capsys):
    def broken():
        raise RuntimeError("no such kernel")

    x = torch.ones(8, requires_grad=True)
    profiles = [("broken", broken), ("sum", harness.in_grad_mode(False, lambda: (x * 2).sum()))]
    harness.run_profiles(profiles, torch.device("cpu"))
    out = capsys.readouterr().out
    assert "== profile of broken: failed: RuntimeError: no such kernel" in out
    assert "== profile of sum (3 calls)" in out and "aten::mul" in out


def test_in_grad_mode_calls_with_autograd_as_asked():
    x = torch.ones(2, requires_grad=True)
    with torch.no_grad():
        assert harness.in_grad_mode(True, lambda: x * 2)().requires_grad
    assert not harness.in_grad_mode(False, lambda: x * 2)().requires_grad
