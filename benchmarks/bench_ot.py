#!/usr/bin/env python
"""Batched optimal transport for WRA: our Triton kernels against every peer, in the same run.

Cases (M=60 words x N=100 regions, random lengths text 8..60 and regions 10..100, seeded; 50 iterations,
beta 0.5, k 1; Sinkhorn eps 0.05):
- fwd_cost     the distance (B,) from a cost (B, M, N) (a cosine cost of random vectors, in the input dtype);
- wra_fwd      the WRA distance from the text and region vectors (B, M, D), (B, N, D), D=768 (the cosine
               cost included), no autograd;
- wra_fwd_bwd  forward and backward of the WRA loss (sum of +-dist_b / B, as positive and negative ITM pairs)
               into the vectors, the plan held constant.
Implementations:
- ref_eager    the original algorithm as a plain PyTorch loop: kernels.reference (cosine_cost_ref, ipot_plan_ref,
               transport_distance_ref; under autograd for the backward, the plan constant), fp32 state;
- ref_graph    the same captured in one CUDA graph;
- ref_compile  the same under torch.compile (fwd_cost, fp32 only; batch dimension dynamic so that one compile
               serves every size; the first call's time, the compile, is printed; --no-compile skips it);
- pot_log_sinkhorn, pot_proximal
               POT's ot.solve_batch (reg=eps, and reg=0 with inner_reg=beta, inner_iter=k), on the padded cost
               with zero-weight pads, fp32 (the cast inside the timing), tol=0 so every iteration runs (it still
               syncs with the host every 10). POT 0.9.7's proximal has a sign error and gives NaN with
               zero-weight pads (reference/ot.md): timed anyway, its error column shows it;
- triton_ipot, triton_ipot_log, triton_sinkhorn_log
               ours: kernels.ot.ipot / ipot(log_domain=True) / sinkhorn on a cost, kernels.ot.wra_distance(method=...)
               on vectors, backend="triton".
Timing: median (and p20/p80) of CUDA-event times around single calls after a warm-up, the L2 cache flushed
before each call (the host runs ahead, so host overhead shorter than the flush is hidden: it is GPU time; the
eager loops stay launch-bound; --graph replays ours from a CUDA graph, the backward included: GPU time alone;
--host times the host alone). Reps adapt to about 0.15 s per measurement, between 5 and --reps.
Bytes floor at --bandwidth: fwd_cost reads the cost once and writes an fp32 plan once (the issue's floor);
wra_fwd reads the vectors once; wra_fwd_bwd reads the vectors once and writes their gradients once.
"floor" in the table is floor / median. "err" is the largest |dist - dist_ref| over the batch against the same
algorithm in fp64 (kernels.reference on the same inputs upcast; IPOT for ipot*, proximal and the reference
peers, Sinkhorn with the same eps for the Sinkhorn ones); for wra_fwd_bwd also the relative L2 error of the
gradients.

Rows are appended to benchmarks/results.csv (--csv); speed-ups of ours over each peer measured in the same
block go to its speedup_vs column as peer=ratio pairs.

    python benchmarks/bench_ot.py                      # the default run (aimed at about 90 s on an H100)
    python benchmarks/bench_ot.py --quick --no-compile # smoke test on a GPU
    python benchmarks/bench_ot.py --host --no-compile --sizes 256 --cases wra_fwd,wra_fwd_bwd   # host time alone
    python benchmarks/bench_ot.py --graph --impls triton_ipot --sizes 256,1024 --cases wra_fwd,wra_fwd_bwd --dtypes bf16
    python benchmarks/bench_ot.py --impls ref_graph,triton_ipot --sizes 256,1024,4096   # ours and one peer
    TRITON_INTERPRET=1 python benchmarks/bench_ot.py --cpu-smoke   # code paths on the CPU, tiny sizes
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # before anything imports triton: the kernels run under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch
from harness import (MIN_REPS, TARGET_S, CsvWriter, Skip, Timer, add_csv_options, cuda_graph, device_name, failure,
                     fraction, host_times, in_grad_mode, median, quantile, ratio, results_path, run_profiles,
                     triton_version)

from uniter_fast.kernels import ot as uot
from uniter_fast.kernels import reference

CASES = ("fwd_cost", "wra_fwd", "wra_fwd_bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OURS = ("ipot", "ipot_log", "sinkhorn_log")
# kernel-name fragments per kind, for --profile's summary (first match wins; the rest is "other")
KERNEL_KINDS = {"our transport (Triton)": ("_transport_kernel",), "our cosine backward (Triton)": ("_cosine_grad",),
                "fills, copies": ("fill", "copy"), "other elementwise": ("elementwise",), "reductions": ("reduce",)}
IMPLS = ("ref_eager", "ref_graph", "ref_compile", "pot_log_sinkhorn", "pot_proximal",
         *(f"triton_{method}" for method in OURS))
BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12}  # data-sheet B/s, matched in this order
COST_DIM = 8  # the fwd_cost case's cost is a cosine cost of low-dimensional vectors: spread over [0, 2]


@dataclass(frozen=True)
class Shape:
    M: int
    N: int
    D: int
    text_lens: tuple[int, int]  # inclusive range of the random lengths
    region_lens: tuple[int, int]


UNITER = Shape(60, 100, 768, (8, 60), (10, 100))
SMOKE = Shape(12, 20, 32, (1, 12), (2, 20))  # tiny, for the interpreter; length 1 included
DEFAULT_SIZES = (32, 256, 1024, 4096)
SMOKE_SIZES = (2, 5)


@dataclass
class Result:
    impl: str
    algo: str  # which fp64 reference its err compares to: "ipot" or "sinkhorn"
    ours: bool
    times_us: list[float] | None = None
    err: str = ""
    note: str = ""  # a skip or failure reason, or extra facts (compile time)

    @property
    def median(self) -> float:
        return median(self.times_us)

    def quantile(self, tenths: int) -> float:
        return quantile(self.times_us, tenths)


# ----------------------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_ints, default=None,
                   help=f"batch sizes B, comma-separated (default {','.join(map(str, DEFAULT_SIZES))}; "
                        f"{','.join(map(str, SMOKE_SIZES))} with --cpu-smoke)")
    p.add_argument("--dtypes", type=_names(DTYPES), default=["fp32", "bf16"],
                   help="input dtypes, comma-separated from fp32,bf16,fp16 (default fp32,bf16)")
    p.add_argument("--cases", type=_names(CASES), default=list(CASES),
                   help=f"what to time, comma-separated from {','.join(CASES)} (default all)")
    p.add_argument("--impls", type=_names(IMPLS), default=list(IMPLS),
                   help=f"which implementations run, comma-separated from {','.join(IMPLS)} (default all; the wra "
                        "cases have no compile or POT peers)")
    p.add_argument("--reps", type=int, default=50,
                   help=f"the most timed calls per measurement (at least {MIN_REPS}; fewer for slow ones: "
                        f"about {TARGET_S} s each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (compiles, captures) (default 3)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (about 20 s to compile)")
    p.add_argument("--host", action="store_true",
                   help="time the host alone: each call issued with no synchronisation, the GPU running behind "
                        "(the floor and x fwd columns then compare host times)")
    p.add_argument("--graph", action="store_true",
                   help="time ours replayed from a CUDA graph, autograd's backward included: GPU time without the "
                        "host's (ref_graph is the peer; the eager, compiled and POT peers are skipped)")
    p.add_argument("--quick", action="store_true", help="the smallest size only, few reps: a smoke test")
    p.add_argument("--profile", action="store_true",
                   help="then profile triton_ipot's call in each block (torch.profiler): its wall time against its "
                        "kernels', by kernel, and the ops that take the host's time")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: tiny sizes on the CPU, our kernels under TRITON_INTERPRET=1, no CUDA graph or "
                        "compile peers, times meaningless; checks the code paths")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="memory bandwidth for the bytes floor, B/s (default: the card's data-sheet figure, "
                        f"{', '.join(f'{k} {v:.3g}' for k, v in BANDWIDTH.items())}; else the H100's)")
    p.add_argument("--iterations", type=int, default=50, help="solver iterations (default 50, the original's)")
    p.add_argument("--beta", type=float, default=0.5, help="IPOT proximal step (default 0.5)")
    p.add_argument("--eps", type=float, default=0.05, help="Sinkhorn regularisation (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    add_csv_options(p)
    args = p.parse_args(argv)
    if args.reps < MIN_REPS:
        p.error(f"--reps must be >= {MIN_REPS}")
    if args.graph and args.host:
        p.error("--graph and --host time different things: choose one")
    if args.graph and args.cpu_smoke:
        p.error("--graph needs a GPU (CUDA graphs)")
    if args.sizes is None:
        args.sizes = list(SMOKE_SIZES if args.cpu_smoke else DEFAULT_SIZES)
    if args.quick:
        args.sizes = [min(args.sizes)]
        args.reps, args.warmup = MIN_REPS, min(args.warmup, 2)
    if args.cpu_smoke:
        args.reps, args.warmup = MIN_REPS, 1
    args.csv = results_path(args)
    return args


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated, got {text!r}")
    return values


def _names(allowed) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected names from {','.join(allowed)}, got {text!r}")
        return names
    return parse


def load_pot():
    """(POT module, None) or (None, why it is skipped)."""
    try:
        import ot as pot
    except Exception as err:  # absent, or broken against this numpy/torch
        return None, (f"POT is not importable ({type(err).__name__}: {err}); on the H100 install its wheel: "
                      "bash ../shared/device/prepare.sh, then pip install --no-index --no-deps --target /tmp/site "
                      ".whl/pot-*.whl and PYTHONPATH=/tmp/site")
    if not hasattr(pot, "solve_batch"):
        return None, f"POT {pot.__version__} has no ot.solve_batch (added in 0.9.6)"
    return pot, None


# ----------------------------------------------------------------------------------------------------------
# inputs and fp64 references
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One (B, dtype) block's inputs, shared by every implementation."""

    B: int
    dtype: torch.dtype
    text_lens: torch.Tensor
    region_lens: torch.Tensor
    cost: torch.Tensor | None = None  # (B, M, N), fwd_cost
    text: torch.Tensor | None = None  # (B, M, D), wra cases
    regions: torch.Tensor | None = None
    signs: torch.Tensor | None = None  # +-1/B: the WRA loss's positive and negative pairs


def _lengths(shape: Shape, B: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.randint(shape.text_lens[0], shape.text_lens[1] + 1, (B,), generator=gen, device=device)
    regions = torch.randint(shape.region_lens[0], shape.region_lens[1] + 1, (B,), generator=gen, device=device)
    return text, regions


def _zero_pads(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    return x * (torch.arange(x.shape[1], device=x.device)[None, :] < lens[:, None])[..., None].to(x.dtype)


def make_problem(case: str, shape: Shape, B: int, dtype: torch.dtype, seed: int, device) -> Problem:
    """The same lengths for every case and dtype at a given B (the generator is seeded by B)."""
    gen = torch.Generator(device=device).manual_seed(seed * 100003 + B)
    text_lens, region_lens = _lengths(shape, B, gen, device)
    prob = Problem(B, dtype, text_lens, region_lens)
    if case == "fwd_cost":
        words = torch.randn(B, shape.M, COST_DIM, generator=gen, device=device)
        regions = torch.randn(B, shape.N, COST_DIM, generator=gen, device=device)
        prob.cost = reference.cosine_cost_ref(words, regions).to(dtype)  # pads hold 1 (never read)
    else:
        prob.text = _zero_pads(torch.randn(B, shape.M, shape.D, generator=gen, device=device), text_lens).to(dtype)
        prob.regions = _zero_pads(torch.randn(B, shape.N, shape.D, generator=gen, device=device),
                                  region_lens).to(dtype)
        prob.signs = torch.where(torch.arange(B, device=device) < (B + 1) // 2, 1.0, -1.0) / B
    return prob


class Oracle:
    """fp64 reference results for one block, computed once on first use: dist (and grads) per algorithm."""

    def __init__(self, case: str, prob: Problem, args: argparse.Namespace):
        self.case, self.prob, self.args, self.cache = case, prob, args, {}

    def _plan(self, algo: str, cost: torch.Tensor) -> torch.Tensor:
        a, p = self.args, self.prob
        if algo == "sinkhorn":
            return reference.sinkhorn_plan_ref(cost, p.text_lens, p.region_lens, eps=a.eps, iterations=a.iterations)
        return reference.ipot_plan_ref(cost, p.text_lens, p.region_lens, beta=a.beta, iterations=a.iterations)

    def get(self, algo: str):
        if algo not in self.cache:
            p = self.prob
            if self.case == "fwd_cost":
                cost = p.cost.double()
                self.cache[algo] = (reference.transport_distance_ref(cost, self._plan(algo, cost)), None)
            else:
                backward = self.case == "wra_fwd_bwd"
                with torch.enable_grad():
                    text = p.text.detach().double().requires_grad_(backward)
                    regions = p.regions.detach().double().requires_grad_(backward)
                    cost = reference.cosine_cost_ref(text, regions)
                    dist = reference.transport_distance_ref(cost, self._plan(algo, cost.detach()))
                    grads = (torch.autograd.grad((dist * p.signs.double()).sum(), (text, regions)) if backward
                             else None)
                self.cache[algo] = (dist.detach(), grads)
        return self.cache[algo]

    def error(self, algo: str, dist: torch.Tensor, grads=None) -> str:
        ref_dist, ref_grads = self.get(algo)
        dist_err = (dist.detach().double() - ref_dist).abs().max().item()
        text = f"{dist_err:.1e}"
        if grads is not None:
            rel = max(((g.double() - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads))
            text += f" g{rel:.0e}"
        return text


# ----------------------------------------------------------------------------------------------------------
# implementations: each builder returns (fn to time, fn giving (dist, grads or None) to check) or raises Skip
# ----------------------------------------------------------------------------------------------------------


def _ref_distance(args, prob: Problem) -> Callable[..., torch.Tensor]:
    def run(cost, text_lens, region_lens):
        plan = reference.ipot_plan_ref(cost, text_lens, region_lens, beta=args.beta, iterations=args.iterations)
        return reference.transport_distance_ref(cost, plan)
    return run


def _ref_wra(args, prob: Problem, backward: bool):
    """The reference WRA: cosine cost, IPOT plan (no_grad inside), distance; autograd through the cost only."""
    def run():
        cost = reference.cosine_cost_ref(prob.text, prob.regions)
        plan = reference.ipot_plan_ref(cost.detach(), prob.text_lens, prob.region_lens, beta=args.beta,
                                       iterations=args.iterations)
        dist = reference.transport_distance_ref(cost, plan)
        if not backward:
            return dist, None
        return dist.detach(), torch.autograd.grad((dist * prob.signs).sum(), (prob.text, prob.regions))
    return run


def _ours_wra(args, prob: Problem, method: str, backward: bool):
    eps = args.eps if method == "sinkhorn_log" else None

    def run():
        dist = uot.wra_distance(prob.text, prob.regions, prob.text_lens, prob.region_lens, beta=args.beta,
                                iterations=args.iterations, method=method, eps=eps, backend="triton")
        if not backward:
            return dist, None
        return dist.detach(), torch.autograd.grad((dist * prob.signs).sum(), (prob.text, prob.regions))
    return run


def _ours_cost(args, prob: Problem, method: str):
    p = prob
    if method == "sinkhorn_log":
        return lambda: (uot.sinkhorn(p.cost, p.text_lens, p.region_lens, eps=args.eps, iterations=args.iterations,
                                     backend="triton"), None)
    return lambda: (uot.ipot(p.cost, p.text_lens, p.region_lens, beta=args.beta, iterations=args.iterations,
                             log_domain=method == "ipot_log", backend="triton"), None)


def _pot(pot, args, prob: Problem, method: str):
    p = prob
    rows = (torch.arange(p.cost.shape[1], device=p.cost.device)[None, :] < p.text_lens[:, None]).float()
    cols = (torch.arange(p.cost.shape[2], device=p.cost.device)[None, :] < p.region_lens[:, None]).float()
    a = rows / p.text_lens[:, None].float()  # zero weight on the pads
    b = cols / p.region_lens[:, None].float()
    if method == "log_sinkhorn":
        kwargs = dict(reg=args.eps, method="log_sinkhorn")
    else:  # IPOT: the proximal point step beta is POT's inner_reg, with no entropic term
        kwargs = dict(reg=None, method="proximal", inner_reg=args.beta, inner_iter=1)

    def run():
        res = pot.solve_batch(p.cost.float(), a=a, b=b, max_iter=args.iterations, tol=0.0, grad="detach", **kwargs)
        return res.value_linear, None
    return run


class Block:
    """One (case, B, dtype): builds every implementation, times it, checks it, prints and records the table."""

    def __init__(self, ctx: "Context", case: str, B: int, dtype_name: str):
        self.ctx, self.case, self.B, self.dtype_name = ctx, case, B, dtype_name
        self.dtype = DTYPES[dtype_name]
        self.prob = make_problem(case, ctx.shape, B, self.dtype, ctx.args.seed, ctx.device)
        self.oracle = Oracle(case, self.prob, ctx.args)
        self.results: list[Result] = []

    # -- the implementations of this case ------------------------------------------------------------------

    def plan(self) -> list[tuple[str, str, bool, Callable]]:
        """(impl, algo, ours, builder) in the order they run; a builder returns (timed fn, checked fn)."""
        ctx, args, prob = self.ctx, self.ctx.args, self.prob
        backward = self.case == "wra_fwd_bwd"
        items = []
        if self.case == "fwd_cost":
            ref = _ref_distance(args, prob)
            eager = lambda: (ref(prob.cost, prob.text_lens, prob.region_lens), None)  # noqa: E731
            items += [("ref_eager", "ipot", False, lambda: (eager, eager)),
                      ("ref_graph", "ipot", False, lambda: (self._graph(eager), eager)),
                      ("ref_compile", "ipot", False, lambda: ctx.compiled(self)),
                      ("pot_log_sinkhorn", "sinkhorn", False, lambda: self._pot("log_sinkhorn")),
                      ("pot_proximal", "ipot", False, lambda: self._pot("proximal"))]
            for method in OURS:
                items.append((f"triton_{method}", _algo(method), True,
                              lambda m=method: self._ours(_ours_cost(args, prob, m))))
        else:
            if backward:
                prob.text.requires_grad_(True)
                prob.regions.requires_grad_(True)
            ref = _ref_wra(args, prob, backward)
            items += [("ref_eager", "ipot", False, lambda: (ref, ref)),
                      ("ref_graph", "ipot", False, lambda: (self._graph(ref), ref))]
            for method in OURS:
                items.append((f"triton_{method}", _algo(method), True,
                              lambda m=method: self._ours(_ours_wra(args, prob, m, backward))))
        return [item for item in items if item[0] in args.impls]

    def _graph(self, fn):
        if self.ctx.device.type != "cuda":
            raise Skip("CUDA graphs need a GPU")
        return cuda_graph(fn)

    def _replayed(self, impl: str, timed: Callable) -> Callable:
        """--graph: ours captured in a CUDA graph (GPU time alone); ref_graph is one already; the other peers skip."""
        if impl == "ref_graph":
            return timed
        if not impl.startswith("triton_"):
            raise Skip("--graph times ours and ref_graph (POT syncs with the host; ref_graph is ref_eager replayed)")
        return cuda_graph(timed)

    def _pot(self, method: str):
        if self.ctx.pot is None:
            raise Skip(self.ctx.pot_reason)
        fn = _pot(self.ctx.pot, self.ctx.args, self.prob, method)
        return fn, fn

    def _ours(self, fn):
        if os.environ.get("TRITON_INTERPRET") == "1" and self.dtype == torch.bfloat16:
            # DESIGN.md: the interpreter has no bf16 (triton 3.9's runs the cost kernel, but the fused cosine gives NaN)
            raise Skip("bf16 under the Triton interpreter")
        return fn, fn

    # -- running -------------------------------------------------------------------------------------------

    def run(self) -> None:
        grad_ctx = torch.enable_grad() if self.case == "wra_fwd_bwd" else torch.no_grad()
        with grad_ctx:
            for impl, algo, ours, build in self.plan():
                result = Result(impl, algo, ours)
                self.results.append(result)
                try:
                    timed, checked = build()
                    if self.ctx.args.graph:
                        timed = self._replayed(impl, timed)
                    dist, grads = checked()
                    result.err = self.oracle.error(algo, dist, grads)
                    timer = self.ctx.timer
                    result.times_us = (host_times(timed, timer.reps, timer.warmup, timer.sync) if self.ctx.args.host
                                       else timer(timed))
                except Skip as why:
                    result.note = f"skipped: {why}"
                except Exception as err:  # a peer that fails is reported, the others still run
                    result.note = failure(err)
                if self.ctx.args.profile and impl == "triton_ipot" and result.times_us:  # after every timing
                    self.ctx.profiles.append((f"{impl} {self.case} B={self.B} {self.dtype_name}",
                                              in_grad_mode(self.case == "wra_fwd_bwd", timed)))
                if impl == "ref_compile" and self.ctx.compile_note:
                    result.note = (result.note + " " + self.ctx.compile_note).strip()
                    self.ctx.compile_note = ""
        self.print()
        self.record()
        self.prob = self.oracle = None

    # -- output --------------------------------------------------------------------------------------------

    def floor_bytes(self) -> tuple[float, str]:
        s, B = self.ctx.shape, self.B
        elem = torch.empty((), dtype=self.dtype).element_size()
        if self.case == "fwd_cost":
            return B * s.M * s.N * (elem + 4), "read the cost once + write an fp32 plan once"
        vectors = B * (s.M + s.N) * s.D * elem
        if self.case == "wra_fwd":
            return vectors, "read the vectors once"
        return 2 * vectors, "read the vectors once + write their gradients once"

    def floor_us(self) -> float:
        return self.floor_bytes()[0] / self.ctx.args.bandwidth * 1e6

    def timed(self, ours: bool) -> list[Result]:
        return [r for r in self.results if r.ours == ours and r.times_us]

    def speedups(self, result: Result) -> list[tuple[str, float]]:
        return [(peer.impl, peer.median / result.median) for peer in self.timed(False)]

    def print(self) -> None:
        s, args = self.ctx.shape, self.ctx.args
        nbytes, what = self.floor_bytes()
        print(f"\n== {self.case}{self.ctx.mode_tag}  B={self.B}  {self.dtype_name}  M={s.M} N={s.N}"
              f"{'' if self.case == 'fwd_cost' else f' D={s.D}'}  it={args.iterations}  "
              f"floor {self.floor_us():.1f} us ({what}: {nbytes / 1e6:.1f} MB at {args.bandwidth / 1e12:.2f} TB/s)")
        fwd = self.ctx.forward_medians
        print(f"{'impl':<21}{'median_us':>11}{'p20':>10}{'p80':>10}{'floor':>8}{'reps':>6}  {'err vs fp64':<28}"
              + ("x fwd" if self.case == "wra_fwd_bwd" else ""))
        for r in self.results:
            err = f"{r.err} ({r.algo})" if r.err else ""
            if not r.times_us:
                print(f"{r.impl:<21}{'-':>11}{'':>34}  {err:<28}{r.note}")
                continue
            extra = ""
            key = (r.impl, self.B, self.dtype_name)
            if self.case == "wra_fwd":
                fwd[key] = r.median
            elif self.case == "wra_fwd_bwd" and key in fwd:
                extra = f"{r.median / fwd[key]:.2f}"
            print(f"{r.impl:<21}{r.median:>11.1f}{r.quantile(2):>10.1f}{r.quantile(8):>10.1f}"
                  f"{fraction(self.floor_us() / r.median):>8}{len(r.times_us):>6}  {err:<28}{extra}"
                  + (f"  {r.note}" if r.note else ""))
        peers, ours = self.timed(False), self.timed(True)
        if peers and ours:
            print(f"{'speed-up of ours':<21}" + "".join(f"{p.impl:>18}" for p in peers))
            for r in ours:
                print(f"{r.impl:<21}" + "".join(f"{ratio(x):>18}" for _, x in self.speedups(r)))
        sys.stdout.flush()

    def record(self) -> None:
        if self.ctx.writer is None:
            return
        s, args = self.ctx.shape, self.ctx.args
        shape = f"M={s.M} N={s.N}" + ("" if self.case == "fwd_cost" else f" D={s.D}")
        for r in self.results:
            if not r.times_us:
                continue
            notes = [shape, f"it={args.iterations}", f"beta={args.beta}" if r.algo == "ipot" else f"eps={args.eps}",
                     f"p20={r.quantile(2):.1f}", f"p80={r.quantile(8):.1f}", f"reps={len(r.times_us)}",
                     f"floor_us={self.floor_us():.3g}", f"floor_frac={self.floor_us() / r.median:.3g}",
                     f"err={r.err.replace(' ', '/')}"] + ([r.note] if r.note else [])
            forward = self.ctx.forward_medians.get((r.impl, self.B, self.dtype_name))
            if self.case == "wra_fwd_bwd" and forward:
                notes.append(f"x_fwd={r.median / forward:.2f}")
            speedup = ";".join(f"{name}={ratio:.2f}" for name, ratio in self.speedups(r)) if r.ours else ""
            self.ctx.writer.write(dict(case=self.case + self.ctx.csv_tag, impl=r.impl, B=self.B,
                                       dtype=self.dtype_name,
                                       median_us=f"{r.median:.2f}", speedup_vs=speedup, notes=" ".join(notes)))


def _algo(method: str) -> str:
    return "sinkhorn" if method == "sinkhorn_log" else "ipot"


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------


class Context:
    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.shape = SMOKE if args.cpu_smoke else UNITER
        self.timer = Timer(device, args.reps, args.warmup)
        self.pot, self.pot_reason = load_pot()
        self.forward_medians: dict = {}
        self.compiled_fn = None
        self.compile_note = ""
        self.profiles: list = []  # (name, call) for --profile, run after every timing
        self.device_name = device_name(device)
        self.mode_tag = " (host time)" if args.host else " (CUDA graph replay)" if args.graph else ""
        self.csv_tag = " host" if args.host else " graph" if args.graph else ""
        self.writer = CsvWriter(args.csv, "bench_ot", device) if args.csv is not None else None

    def compiled(self, block: Block):
        """The reference loop under torch.compile, the batch dimension dynamic: one compile serves every size."""
        if self.args.no_compile:
            raise Skip("--no-compile")
        if self.device.type != "cuda":
            raise Skip("torch.compile peer runs on a GPU only")
        if block.dtype != torch.float32:
            raise Skip("fp32 only (the reference upcasts to fp32 anyway; each dtype would compile again, ~20 s)")
        prob = block.prob
        if self.compiled_fn is None:
            self.compiled_fn = torch.compile(_ref_distance(self.args, prob))
        mark = getattr(torch._dynamo, "maybe_mark_dynamic", torch._dynamo.mark_dynamic)
        for t in (prob.cost, prob.text_lens, prob.region_lens):
            mark(t, 0)
        start = time.perf_counter()
        fn = lambda: (self.compiled_fn(prob.cost, prob.text_lens, prob.region_lens), None)  # noqa: E731
        fn()
        torch.cuda.synchronize(self.device)
        first = time.perf_counter() - start
        self.compile_note = f"first_call_s={first:.1f}"
        if first > 1.0:
            print(f"  [torch.compile] first call at B={block.B}: {first:.1f} s (compiling the 50-iteration loop)")
        return fn, fn


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("note: TRITON_INTERPRET is not 1; our kernels need it on the CPU")
    else:
        if not torch.cuda.is_available():
            print("bench_ot: no CUDA device here. This benchmark times GPU kernels; run it on a CUDA machine, or pass "
                  "--cpu-smoke (with TRITON_INTERPRET=1) to check its code paths on the CPU.", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("warning: TRITON_INTERPRET=1 on a GPU run: our kernels run in the interpreter, times mean nothing")
        device = torch.device("cuda", torch.cuda.current_device())
    if args.bandwidth is None:
        name = device_name(device)
        args.bandwidth = next((bw for card, bw in BANDWIDTH.items() if card in name), BANDWIDTH["H100"])
    ctx = Context(args, device)
    pot_version = ctx.pot.__version__ if ctx.pot is not None else "absent"
    print(f"bench_ot: {ctx.device_name}, torch {torch.__version__}, triton {triton_version()}, POT {pot_version}; "
          f"sizes {args.sizes}, dtypes {args.dtypes}, cases {args.cases}, reps <= {args.reps}, warm-up {args.warmup}; "
          f"iterations {args.iterations}, beta {args.beta}, eps {args.eps}; bandwidth {args.bandwidth:.3g} B/s")
    if ctx.pot is None:
        print(f"POT peers skipped: {ctx.pot_reason}")
    elif ctx.pot.__version__.startswith("0.9.7"):
        print("note: POT 0.9.7's proximal method has a sign error (POT issue 842) and gives NaN with zero-weight pads: "
              "timed, but its answer is wrong")
    if args.cpu_smoke:
        print("cpu smoke: tiny sizes, interpreter, no CUDA graph or compile peers: times mean nothing")
    start = time.perf_counter()
    for case in args.cases:
        for B in args.sizes:
            for dtype_name in args.dtypes:
                Block(ctx, case, B, dtype_name).run()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    run_profiles(ctx.profiles, device, KERNEL_KINDS)
    print(f"\nbench_ot: done in {time.perf_counter() - start:.0f} s"
          + (f"; {ctx.writer.count} rows appended to {ctx.writer.path}" if ctx.writer else "; no rows written"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
