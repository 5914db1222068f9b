"""Host time of the kernel launchers on any machine, a GPU or none: Triton's dry run (kernels.launch.DryRun)
stands in for the GPU, so each call does all of its host work (our launcher's arithmetic and allocations,
Triton's launch path) and launches nothing. Each launcher is timed through the direct launch (kernels/launch.py,
the default) and through Triton's own `fn[grid](...)` (UNITER_FAST_DIRECT_LAUNCH=0), alternately, in one run.

Shapes are UNITER's longest sides with small batches: the launch rules see UNITER-base's tiles, and the CPU's
allocations (the GPU's would be asynchronous) stay small. Time per call: the least, over repeats, of a block's
mean (host time on a shared CPU is noisy; the least-disturbed block is the one to compare).

    python benchmarks/bench_host.py              # all launchers, rows appended to results.csv
    python benchmarks/bench_host.py --no-csv
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions: set before triton loads

import torch  # noqa: E402
from harness import CsvWriter, add_csv_options, cpu_label, results_path, triton_version  # noqa: E402

from uniter_fast.kernels import attention_triton, launch, ot_triton  # noqa: E402

REPEATS = 7


def attention_calls():
    """UNITER-base attention: 12 heads of 64, samples up to 157 rows (anchors.md), four of them."""
    lens = torch.tensor([157, 90, 61, 120])
    cu = torch.zeros(5, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    q, k, v, g = (torch.randn(int(cu[-1]), 12, 64, dtype=torch.bfloat16) for _ in range(4))
    seed = torch.ones(1, dtype=torch.int64)  # as varlen_attention draws it: a tensor beside the inputs
    out, lse = attention_triton.forward(q, k, v, cu, 157, 0.125, 0.1, seed)
    yield "attention_forward", "bf16", lambda: attention_triton.forward(q, k, v, cu, 157, 0.125, 0.1, seed)
    yield "attention_backward", "bf16", lambda: attention_triton.backward(g, q, k, v, out, lse, cu, 157, 0.125, 0.1,
                                                                          seed)


def ot_calls():
    """WRA at UNITER's sides (60 words, 100 regions, 768 dims), padded, four problems; IPOT from an fp32 cost."""
    batch, m, n, d = 4, 60, 100, 768
    text_lens, region_lens = torch.tensor([60, 12, 33, 1]), torch.tensor([100, 36, 10, 57])
    text = ot_triton.Rows(torch.randn(batch, m, d, dtype=torch.bfloat16))
    regions = ot_triton.Rows(torch.randn(batch, n, d, dtype=torch.bfloat16))
    stats = ot_triton.grad_stats(batch, m, n, torch.device("cpu"))
    solve = ot_triton.Solve("ipot", 2.0, 50)
    _, plan, _ = ot_triton.transport_vectors(text, regions, text_lens, region_lens, solve, want_plan=True,
                                             stats=stats)
    grad = torch.ones(batch)
    cost = torch.rand(batch, m, n)
    yield "ipot_from_cost", "fp32", lambda: ot_triton.transport_cost(cost, text_lens, region_lens, solve)
    yield "wra_forward", "bf16", lambda: ot_triton.transport_vectors(text, regions, text_lens, region_lens, solve,
                                                                     want_plan=True, stats=stats)
    yield "wra_backward", "bf16", lambda: ot_triton.cosine_backward(text, regions, text_lens, region_lens, plan,
                                                                    stats, grad)


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def time_both(fn, calls: int) -> dict:
    """{path: least block mean in us}, the two paths alternating block by block."""
    best = {"direct": float("inf"), "triton": float("inf")}
    for _ in range(REPEATS):
        for path, flag in (("direct", "1"), ("triton", "0")):
            os.environ[launch.ENV_VAR] = flag
            launch.clear()
            fn()  # the direct path's first call of a key goes through Triton
            best[path] = min(best[path], per_call_us(fn, calls))
    os.environ.pop(launch.ENV_VAR, None)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per timed block")
    add_csv_options(parser)
    args = parser.parse_args(argv)
    csv_path = results_path(args)
    label = f"{cpu_label()} (dry run)"
    writer = CsvWriter(csv_path, "bench_host", torch.device("cpu"), device_label=label) if csv_path else None
    print(f"bench_host: {label}, torch {torch.__version__}, triton {triton_version()}; host us per launcher call, "
          f"least of {REPEATS} blocks of {args.calls}")
    print(f"{'launcher':<22}{'direct':>9}{'triton':>9}{'speed-up':>10}")
    with launch.DryRun():
        for case, dtype, fn in (*attention_calls(), *ot_calls()):
            fn()
            best = time_both(fn, args.calls)
            speedup = best["triton"] / best["direct"]
            print(f"{case:<22}{best['direct']:9.1f}{best['triton']:9.1f}{speedup:9.2f}x")
            if writer:
                writer.write(dict(case=case, impl="direct", B=4, dtype=dtype, median_us=f"{best['direct']:.1f}",
                                  speedup_vs=f"triton={speedup:.2f}", notes="least block mean; dry run"))
                writer.write(dict(case=case, impl="triton", B=4, dtype=dtype, median_us=f"{best['triton']:.1f}",
                                  notes="least block mean; dry run"))
    if writer:
        print(f"{writer.count} rows appended to {csv_path}")


if __name__ == "__main__":
    sys.exit(main())
