#!/usr/bin/env python
"""Sweep the launch parameters of our Triton kernels at UNITER's shapes, against the rule each launcher uses.

What it times (kernel calls only, no validation or autograd; harness.Timer, L2 flushed before each call):
- attention forward and backward, base shapes (B=128, 12 heads x 64, UNITER lengths, bf16), for each
  attention_triton.Launch in ATTN_FORWARD / ATTN_BACKWARD;
- OT: IPOT (50 iterations) from an fp32 cost at B in --ot-sizes, the fused-cosine forward and the cosine
  backward from bf16 vectors (D=768) at B=1024 and 256, for each override of ot_triton._config's rule in OT_*,
  and from fp32 vectors with exact products against tf32x3 (OT_FP32).
Each row prints the median, the ratio to the rule's own launch ("rule") and the largest difference of the
result from the rule's (a launch that breaks the kernel shows there). Nothing is written to results.csv: the
chosen rule is measured by bench_attention.py and bench_ot.py.

    python benchmarks/tune_kernels.py                    # about 110 s on an H100 or H200 (2026-11-27)
    TRITON_INTERPRET=1 python benchmarks/tune_kernels.py --cpu-smoke
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # before anything imports triton: the kernels run under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import time
from typing import Callable

import torch
from bench_attention import make_batch
from bench_ot import SMOKE, UNITER, make_problem
from harness import Timer, failure, median, open_run

from uniter_fast.kernels import attention_triton as attn
from uniter_fast.kernels import ot_triton as ot
from uniter_fast.kernels.attention_triton import Launch

ATTN_FORWARD = [Launch(64, 32, 4, 3), Launch(64, 64, 4, None), Launch(64, 32, 4, 2), Launch(64, 32, 4, 4),
                Launch(64, 32, 8, 3), Launch(128, 32, 8, 3), Launch(32, 32, 4, 3)]
ATTN_BACKWARD = [Launch(64, 64, 4, 1), Launch(64, 64, 4, 1, fused_delta=True), Launch(64, 64, 4, 2),
                 Launch(32, 32, 4, 1)]
# each list starts with the rule ({}); the overrides are the alternatives the last sweeps left close (H100 and
# H200, 2026-11-27: the numbers are in ot_triton._config's docstring)
# Register-capped launches (maxnreg): twice or four times the warps per problem in the registers of the rule's
# programs, so that a batch still runs in one wave. The solver is latency-bound at the occupancy its registers
# allow (Nsight Compute, RESULTS.md); uncapped, 8 warps took 184 registers, one program per SM (0.46-0.55x).
# Capped, ptxas spills at most 24 bytes at 128 and 104 at 64 (compile_check.py, sm_90, Triton 3.6). The rule's
# 4 warps capped at 168 fit three programs per SM, not two, and spill nowhere in the solver's loop (the cost is
# read again after it, 2026-11-27): for B >= 1024, where the rule's 2 warps spill inside the loop.
OT_COST_CAPPED = [{"num_warps": 8, "COL_LANES": 32, "maxnreg": 128}, {"num_warps": 8, "COL_LANES": 16, "maxnreg": 128},
                  {"num_warps": 16, "COL_LANES": 32, "maxnreg": 64}, {"num_warps": 16, "COL_LANES": 16, "maxnreg": 64},
                  {"num_warps": 4, "COL_LANES": 32, "maxnreg": 168}]
OT_VECTORS_CAPPED = [{"num_warps": 8, "maxnreg": 128}, {"num_warps": 16, "maxnreg": 64},
                     {"num_warps": 4, "maxnreg": 168}]
OT_BACKWARD_CAPPED = [{"num_warps": 8, "maxnreg": 128}]  # 8 warps uncapped take 254 registers (no spill)
OT_COST = [{}, {"COL_LANES": 32, "num_warps": 4}, {"COL_LANES": 16, "num_warps": 2}, {"COL_LANES": 32},
           {"COL_LANES": 16}, {"num_warps": 8}, {"SHRINK": False}, *OT_COST_CAPPED]
OT_VECTORS = [{}, {"COL_LANES": 16}, {"num_warps": 2, "COL_LANES": 16}, {"num_warps": 2}, {"BLOCK_D": 64},
              {"num_stages": 2}, {"SHRINK": False}, *OT_VECTORS_CAPPED]
OT_VECTORS_SMALL = [*OT_VECTORS[:3], *OT_VECTORS_CAPPED]  # B=256
OT_BACKWARD = [{}, {"LOW_OPERANDS": False, "BLOCK_D": 32}, {"BLOCK_D": 32}, {"num_stages": 2},
               {"num_stages": 2, "SPLITS": 1}, {"num_warps": 8}, {"num_warps": 2}, {"BLOCK_D": 16}, {"SPLITS": 1},
               {"SPLITS": 2}, {"SPLITS": 8}, *OT_BACKWARD_CAPPED]
# (the second: bf16's rule before 2026-11-27, tf32 products and 32 dims)
OT_FP32 = [{}, {"DOT_PRECISION": "tf32x3"}]  # fp32 vectors: exact products against three tensor-core ones
# (tf32x3 crashed the fp32 backward's kernel with an illegal memory access: the launcher refuses it)
OT_FP32_BACKWARD = [{}, {"num_stages": 3}, {"num_warps": 4}, {"BLOCK_D": 32}]
# "occupancy": the rule against the register-capped launches alone, in each of the first three sweeps
OT_SWEEPS = ("cost", "vectors", "backward", "fp32", "occupancy")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["attention", "ot"], choices=["attention", "ot"])
    p.add_argument("--ot-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--ot-sweeps", nargs="+", default=list(OT_SWEEPS), choices=list(OT_SWEEPS),
                   help="which OT sweeps run: IPOT from a cost (at --ot-sizes), the fused forward from vectors, the "
                        "cosine backward (bf16, B=1024 and 256), fp32 vectors (B=1024); 'occupancy': the rule and "
                        "the register-capped launches alone in the first three")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, two launches each, under the interpreter")
    args = p.parse_args(argv)
    args.csv = None
    if args.cpu_smoke:
        args.ot_sizes, args.reps = [3], 5
    return args


def sweep(title: str, timer: Timer, launches: list, call: Callable[[object], torch.Tensor | tuple]) -> None:
    """Times call(launch) for each launch; the first launch is the rule's (None passed), the others override it."""
    print(f"\n== {title}")
    print(f"{'launch':<58}{'median_us':>11}{'vs rule':>9}{'max diff':>10}")
    base_out, base_us = None, None
    for i, launch in enumerate(launches):
        label = "rule" if i == 0 else str(launch)
        try:
            out = call(None if i == 0 else launch)
            outs = out if isinstance(out, tuple) else (out,)
            if base_out is None:
                base_out, diff = outs, ""
            else:
                diff = f"{max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, base_out)):.1e}"
            us = median(timer(lambda: call(None if i == 0 else launch)))
            base_us = base_us or us
            print(f"{label:<58}{us:>11.1f}{base_us / us:>8.2f}x{diff:>10}")
        except Exception as err:  # a launch the kernel cannot take (registers, shared memory) is reported
            print(f"{label:<58}{'-':>11}{'':>9}{'':>10}  {failure(err)}")
        sys.stdout.flush()


def tune_attention(args, timer: Timer, device) -> None:
    B, dtype = (3, torch.float32) if args.cpu_smoke else (128, torch.bfloat16)
    batch = make_batch("uniter", B, 12, 64, dtype, device, seed=0)
    q, k, v = batch.packed
    cu, N, scale = batch.cu_seqlens, batch.max_len, 64 ** -0.5
    forwards = ATTN_FORWARD[:2] if args.cpu_smoke else ATTN_FORWARD
    backwards = ATTN_BACKWARD[:2] if args.cpu_smoke else ATTN_BACKWARD
    sweep(f"attention forward  B={B} 12x64 N={N} {dtype}  rule {attn.forward_launch(N, 64)}", timer, forwards,
          lambda launch: attn.forward(q, k, v, cu, N, scale, 0.0, 0, launch)[0])
    out, lse = attn.forward(q, k, v, cu, N, scale, 0.0, 0)
    sweep(f"attention backward  rule {attn.backward_launch(N, 64)}", timer, backwards,
          lambda launch: attn.backward(batch.grad_packed, q, k, v, out, lse, cu, N, scale, 0.0, 0, launch))


def _launches(args, full: list, capped: list, name: str) -> list:
    """A sweep's launches: all of `full` where --ot-sweeps names it, else the rule and `capped` for 'occupancy', else
    none (the sweep does not run); the first two under --cpu-smoke."""
    if name in args.ot_sweeps:
        launches = full
    elif "occupancy" in args.ot_sweeps and capped:
        launches = [{}, *capped]
    else:
        return []
    return launches[:2] if args.cpu_smoke else launches


def tune_ot(args, timer: Timer, device) -> None:
    shape = SMOKE if args.cpu_smoke else UNITER
    solve = ot.Solve("ipot", scale=2.0, iterations=50)  # beta 0.5, as the original
    costs = _launches(args, OT_COST, OT_COST_CAPPED, "cost")
    for B in args.ot_sizes if costs else ():
        prob = make_problem("fwd_cost", shape, B, torch.float32, 0, device)
        rule = ot._config(B, shape.M, shape.N, None, 4, device)
        sweep(f"ot ipot from a cost  B={B} fp32  rule {rule}", timer, costs,
              lambda tune: ot.transport_cost(prob.cost, prob.text_lens, prob.region_lens, solve, tune=tune)[0])
    # (B, dtype, forward launches, backward launches): bf16 is training's; B=256 splits each problem's dims
    cases = [(args.ot_sizes[-1], torch.float32, _launches(args, OT_VECTORS, [], "vectors"),
              _launches(args, OT_BACKWARD, [], "backward"))] if args.cpu_smoke else [
        (1024, torch.bfloat16, _launches(args, OT_VECTORS, OT_VECTORS_CAPPED, "vectors"),
         _launches(args, OT_BACKWARD, OT_BACKWARD_CAPPED, "backward")),
        (256, torch.bfloat16, _launches(args, OT_VECTORS_SMALL, OT_VECTORS_CAPPED, "vectors"),
         _launches(args, OT_BACKWARD, OT_BACKWARD_CAPPED, "backward")),
        (1024, torch.float32, _launches(args, OT_FP32, [], "fp32"), _launches(args, OT_FP32_BACKWARD, [], "fp32"))]
    for B, dtype, vectors, backwards in cases:
        if not (vectors or backwards):
            continue
        prob = make_problem("wra_fwd", shape, B, dtype, 0, device)
        text, regions = ot.Rows(prob.text), ot.Rows(prob.regions)
        rule = ot._config(B, shape.M, shape.N, shape.D, prob.text.element_size(), device)
        if vectors:
            sweep(f"ot ipot from vectors (fused cosine)  B={B} D={shape.D} {dtype}  rule {rule}", timer, vectors,
                  lambda tune: ot.transport_vectors(text, regions, prob.text_lens, prob.region_lens, solve,
                                                    tune=tune)[0])
        if not backwards:
            continue
        stats = ot.grad_stats(B, prob.text.shape[1], prob.regions.shape[1], device)
        _, plan, _ = ot.transport_vectors(text, regions, prob.text_lens, prob.region_lens, solve, want_plan=True,
                                          stats=stats)
        sweep(f"ot cosine backward  B={B} D={shape.D} {dtype}  rule "
              f"{ot.backward_launch(B, shape.M, shape.N, shape.D, dtype, device)}", timer, backwards,
              lambda tune: ot.cosine_backward(text, regions, prob.text_lens, prob.region_lens, plan, stats,
                                              prob.signs, tune=tune))


def main(argv=None) -> int:
    args = parse_args(argv)
    device, timer, _ = open_run("tune_kernels", args)
    print(f"parts {args.parts}")
    start = time.perf_counter()
    with torch.no_grad():
        if "attention" in args.parts:
            tune_attention(args, timer, device)
        if "ot" in args.parts:
            tune_ot(args, timer, device)
    print(f"\ntune_kernels: done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
