#!/usr/bin/env python
"""The IPOT kernel's launches for a profiler: what limits it, measured (issue 3 asks for that where a goal is missed).

Runs IPOT from an fp32 cost (UNITER's 60 x 100, random lengths, 50 iterations, the launch rule) once at each
--sizes B; with --capped, then tune_kernels' first register-capped launch (8 warps, maxnreg 128) too. Under Nsight Compute, which times each launch alone with the caches flushed, so the launch that
compiled serves (benchmarks/gpu_check.sh --goals runs it so):

    ncu --kernel-name regex:_transport_kernel --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section SchedulerStats python benchmarks/profile_ipot.py --sizes 256 1024 --capped
"""
from __future__ import annotations

import argparse
import sys

import torch
from bench_ot import UNITER, make_problem
from tune_kernels import OT_COST_CAPPED

from uniter_fast.kernels import ot_triton as ot


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--capped", action="store_true", help="also launch the first register-capped launch at each size")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_ipot: needs a CUDA device (it launches the kernels for a profiler)", file=sys.stderr)
        return 2
    solve = ot.Solve("ipot", scale=2.0, iterations=50)  # beta 0.5, as the original
    for B in args.sizes:
        prob = make_problem("fwd_cost", UNITER, B, torch.float32, 0, torch.device("cuda"))
        rule = ot._config(B, UNITER.M, UNITER.N, None, 4, prob.cost.device)
        for tune in [None] + (OT_COST_CAPPED[:1] if args.capped else []):
            ot.transport_cost(prob.cost, prob.text_lens, prob.region_lens, solve, tune=tune)
            torch.cuda.synchronize()
            print(f"profile_ipot: B={B} launched, rule {rule}" + (f" with {tune}" if tune else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
