#!/usr/bin/env python
"""Variable-length attention at UNITER's lengths: our Triton kernel against every peer, in the same run.

Batches (B=128, head_dim 64): "uniter" lengths are text 8..60 plus regions 10..100 per sample (seeded, as
reference/anchors.md), padded to the longest; "L=<n>" gives every sample n tokens (n in --lengths, 32..160).
Heads: base 12, large 16. Passes: fwd (no autograd) and fwd_bwd (forward, then backward of a random gradient).
Implementations (the peers get padded (B, heads, N, d) inputs made outside the timing, ours the packed rows):
- ours_triton       kernels.attention.varlen_attention(backend="triton") on (total, heads, d) with cu_seqlens;
- ours_kernels      the same kernels through their launchers alone (attention_triton.forward / backward): no
                    validation, dispatch or autograd, so ours_triton's excess over it is the wrapper's host time;
- sdpa_mask         torch SDPA with a boolean key-padding mask (the memory-efficient / cuDNN kernels);
- sdpa_padded       SDPA over the padded batch with no mask (flash; a wrong result: the padded-compute reference);
- flex              FlexAttention under torch.compile with a padding BlockMask (built outside the timing; its build
                    time is printed), compiled once per shape;
- xformers          memory_efficient_attention with BlockDiagonalMask on the packed rows (the mask built outside
                    the timing, as Flex's), where xformers runs;
- torch_ref         our reference path: pad, SDPA with the key mask, unpad (kernels.reference).
--dropout p: attention dropout as in training (UNITER: 0.1) for ours, SDPA, xformers and the reference (Flex has
none); outputs are then random, so err is not computed.
Backward passes use torch.autograd.grad (no accumulation into .grad). UNITER_FAST_BACKEND is ignored here: each
implementation names its backend. Useful TFLOP/s count real tokens only: 4 * sum(L_b^2) * d * heads forward, 3.5x that forward+backward.
"err" is the largest |out - out_fp32| of each implementation against the fp32 reference on the same inputs
(sdpa_padded's is large on purpose). Rows are appended to benchmarks/results.csv.

    python benchmarks/bench_attention.py                 # the default run (about a minute on an H100)
    python benchmarks/bench_attention.py --quick
    python benchmarks/bench_attention.py --quick --graph --batches uniter   # GPU time alone, host time removed
    python benchmarks/bench_attention.py --quick --host --batches uniter    # host time alone (issuing each call)
    python benchmarks/bench_attention.py --quick --dropout 0.1 --batches uniter   # training's attention
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --cpu-smoke   # code paths on the CPU, tiny sizes
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # before anything imports triton: the kernels run under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from harness import (Skip, Timer, add_csv_options, against_ours, cuda_graph, failure, host_times, open_run,
                     in_grad_mode, quantile, results_path, run_profiles)

from uniter_fast.kernels import attention, attention_triton, attention_xformers, reference

HEADS = {"base": 12, "large": 16}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEERS = ("ours_kernels", "sdpa_mask", "sdpa_padded", "flex", "xformers", "torch_ref")


@dataclass
class Batch:
    """One batch's inputs in both layouts, shared by every implementation."""

    lens: list[int]
    heads: int
    packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # (total, heads, d) each
    padded: tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # (B, heads, N, d) each
    cu_seqlens: torch.Tensor
    key_mask: torch.Tensor                                    # (B, 1, 1, N) bool, True on real keys
    grad_packed: torch.Tensor
    grad_padded: torch.Tensor
    expected: torch.Tensor = field(default=None)              # fp32 reference output, packed

    @property
    def max_len(self) -> int:
        return max(self.lens)

    def useful_flop(self, backward: bool) -> float:
        d = self.packed[0].shape[-1]
        return 4.0 * sum(n * n for n in self.lens) * d * self.heads * (3.5 if backward else 1.0)


def make_batch(name: str, B: int, heads: int, d: int, dtype, device, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    if name == "uniter":
        lens = (torch.randint(8, 61, (B,), generator=gen) + torch.randint(10, 101, (B,), generator=gen)).tolist()
    else:
        lens = [int(name.split("=")[1])] * B
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    total, N = int(cu[-1]), max(lens)
    packed = tuple(torch.randn(total, heads, d, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    cu = cu.to(device)
    starts, lens_t = cu[:-1], cu[1:] - cu[:-1]
    padded = tuple(reference.pad_rows(t, starts, lens_t, N).transpose(1, 2).contiguous() for t in packed)
    key_mask = (torch.arange(N, device=device)[None, :] < lens_t[:, None])[:, None, None, :]
    grad_packed = torch.randn(total, heads, d, generator=gen).to(device=device, dtype=dtype)
    grad_padded = reference.pad_rows(grad_packed, starts, lens_t, N).transpose(1, 2).contiguous()
    batch = Batch(lens, heads, packed, padded, cu, key_mask, grad_packed, grad_padded)
    q, k, v = (t.float() for t in packed)
    batch.expected = reference.varlen_attention_ref(q, k, v, cu, N)
    return batch


# kernel-name fragments per kind, for --profile's summary (first match wins; the rest is "other")
KERNEL_KINDS = {"our attention (Triton)": ("_fwd_kernel", "_bwd_kernel", "_delta_kernel"),
                "fills, copies": ("fill", "copy"), "other elementwise": ("elementwise",)}

# ----------------------------------------------------------------------------------------------------------
# implementations: each returns (run, output_as_packed); run(backward) does one call
# ----------------------------------------------------------------------------------------------------------


def _with_grad(tensors, backward: bool):
    return tuple(t.detach().requires_grad_(backward) for t in tensors)


def _backward(out, inputs, grad, backward: bool):
    """out, after its backward into inputs when asked (gradients returned, not accumulated)."""
    if backward:
        torch.autograd.grad(out, inputs, grad)
    return out


def ours(batch: Batch, backward: bool, dropout: float):
    q, k, v = _with_grad(batch.packed, backward)

    def run():
        out = attention.varlen_attention(q, k, v, batch.cu_seqlens, batch.max_len, dropout_p=dropout,
                                         backend="triton")
        return _backward(out, (q, k, v), batch.grad_packed, backward)
    return run, run


def ours_kernels(batch: Batch, backward: bool, dropout: float):
    """Our forward (and backward) launchers called directly, the backward from a forward made outside the timing."""
    q, k, v = batch.packed
    seed = torch.tensor([1234], dtype=torch.int64, device=q.device)  # on the device, as varlen_attention draws it
    args = (batch.cu_seqlens, batch.max_len, q.shape[-1] ** -0.5, dropout, seed)
    out, lse = attention_triton.forward(q, k, v, *args)

    def run():
        if not backward:
            return attention_triton.forward(q, k, v, *args)[0]
        attention_triton.forward(q, k, v, *args)
        return attention_triton.backward(batch.grad_packed, q, k, v, out, lse, *args)
    return run, lambda: out


def _unpad(batch: Batch, out_padded: torch.Tensor) -> torch.Tensor:
    return reference.unpad_rows(out_padded.transpose(1, 2), batch.cu_seqlens, batch.packed[0].shape[0])


def sdpa(batch: Batch, backward: bool, masked: bool, dropout: float):
    import torch.nn.functional as F

    q, k, v = _with_grad(batch.padded, backward)
    mask = batch.key_mask if masked else None

    def run():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return _backward(out, (q, k, v), batch.grad_padded, backward)
    return run, lambda: _unpad(batch, run())


class Flex:
    """FlexAttention compiled once; a padding BlockMask built per batch (outside the timing)."""

    def __init__(self):
        self.fn = None
        self.note = ""

    def __call__(self, batch: Batch, backward: bool, name: str, allowed: list[str], dropout: float):
        if dropout:
            raise Skip("FlexAttention has no attention dropout")
        if name not in allowed:
            raise Skip(f"batch {name} not in --flex-batches (each shape compiles again)")
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as err:
            raise Skip(f"no FlexAttention in torch {torch.__version__}: {err}")
        if batch.packed[0].device.type != "cuda":
            raise Skip("FlexAttention's compiled kernels need a GPU")
        if self.fn is None:
            self.fn = torch.compile(flex_attention, dynamic=False)
        lens = batch.cu_seqlens.diff()
        N = batch.max_len

        def keep(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]
        start = time.perf_counter()
        block_mask = create_block_mask(keep, B=len(batch.lens), H=None, Q_LEN=N, KV_LEN=N,
                                       device=batch.cu_seqlens.device)
        torch.cuda.synchronize()
        self.note = f"block_mask_build_us={(time.perf_counter() - start) * 1e6:.0f}"
        q, k, v = _with_grad(batch.padded, backward)

        def run():
            out = self.fn(q, k, v, block_mask=block_mask)
            return _backward(out, (q, k, v), batch.grad_padded, backward)
        return run, lambda: _unpad(batch, run())


def xformers(batch: Batch, backward: bool, dropout: float):
    reason = attention_xformers.unavailable(batch.packed[0])
    if reason:
        raise Skip(reason)
    q, k, v = _with_grad(batch.packed, backward)
    mask = attention_xformers.block_diagonal_mask(batch.cu_seqlens)
    scale = q.shape[-1] ** -0.5

    def run():
        out = attention_xformers.attend(q, k, v, mask, dropout_p=dropout, softmax_scale=scale)
        return _backward(out, (q, k, v), batch.grad_packed, backward)
    return run, run


def torch_ref(batch: Batch, backward: bool, dropout: float):
    q, k, v = _with_grad(batch.packed, backward)

    def run():
        out = reference.varlen_attention_ref(q, k, v, batch.cu_seqlens, batch.max_len, dropout_p=dropout)
        return _backward(out, (q, k, v), batch.grad_packed, backward)
    return run, run


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--batches", nargs="+", default=None,
                   help="'uniter' (random UNITER lengths) and/or L=<n> (every sample n tokens); default uniter and "
                        "L=32..160 in steps of 32 (uniter and L=160 with --quick)")
    p.add_argument("--flex-batches", nargs="+", default=["uniter"],
                   help="batches FlexAttention runs on (it compiles for every shape, 10-30 s each)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--passes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.0, help="attention dropout (training: 0.1); default none")
    p.add_argument("--graph", action="store_true",
                   help="time every implementation replayed from a CUDA graph: GPU time without the host's (a call "
                        "that cannot be captured says why in its row)")
    p.add_argument("--host", action="store_true",
                   help="time the host alone: each call issued with no synchronisation, the GPU running behind")
    p.add_argument("--quick", action="store_true", help="base only (and uniter and L=160 unless --batches)")
    p.add_argument("--profile", action="store_true",
                   help="then profile ours_triton's call in each block (torch.profiler): its wall time against its "
                        "kernels', and the ops that take the host's time")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    add_csv_options(p)
    args = p.parse_args(argv)
    args.csv = results_path(args)
    if args.batches is None:
        args.batches = ["uniter", "L=160"] if args.quick else ["uniter", "L=32", "L=64", "L=96", "L=128", "L=160"]
    if args.quick:  # base only; the batches given are kept
        args.models = ["base"]
    if args.cpu_smoke:
        args.models, args.batches, args.batch_size, args.dtype, args.reps = ["base"], ["uniter", "L=32"], 3, "fp32", 5
    if args.graph and args.cpu_smoke:
        p.error("--graph needs a GPU (CUDA graphs)")
    if args.graph and args.host:
        p.error("--graph and --host time different things: choose one")
    return args


def run_block(args, timer: Timer, writer, flex: Flex, model: str, name: str, pass_: str, device,
              profiles: list) -> None:
    backward = pass_ == "fwd_bwd"
    batch = make_batch(name, args.batch_size, HEADS[model], args.head_dim, DTYPES[args.dtype], device, args.seed)
    p = args.dropout
    builders: dict[str, Callable] = {
        "ours_triton": lambda b, bw: ours(b, bw, p), "ours_kernels": lambda b, bw: ours_kernels(b, bw, p),
        "sdpa_mask": lambda b, bw: sdpa(b, bw, True, p),
        "sdpa_padded": lambda b, bw: sdpa(b, bw, False, p),
        "flex": lambda b, bw: flex(b, bw, name, args.flex_batches, p), "xformers": lambda b, bw: xformers(b, bw, p),
        "torch_ref": lambda b, bw: torch_ref(b, bw, p)}
    rows = []
    for impl, build in builders.items():
        times, err, note = None, "", ""
        try:
            run, output = build(batch, backward)
            with torch.enable_grad() if backward else torch.no_grad():
                out = output()
                err = "random" if p else f"{(out.float() - batch.expected).abs().max().item():.1e}"
                del out  # its autograd graph would keep the inputs' AccumulateGrad nodes, which breaks --graph
                if args.profile and impl == "ours_triton":  # profiled after every timing (run_profiles)
                    profiles.append((f"{impl} {pass_} {model} {name}", in_grad_mode(backward, run)))
                if args.host:
                    times = host_times(run, timer.reps, timer.warmup, timer.sync)
                else:
                    times = timer(cuda_graph(run) if args.graph else run)
            note = flex.note if impl == "flex" else ""
        except Skip as why:
            note = f"skipped: {why}"
        except Exception as err_:  # a peer that fails is reported, the others still run
            note = failure(err_)
        rows.append((impl, times, err, note))
    flop = batch.useful_flop(backward)
    pad = 1 - sum(batch.lens) / (len(batch.lens) * batch.max_len)
    mode = (" (CUDA graph replay)" if args.graph else " (host time)" if args.host else "") + \
        (f" dropout {p}" if p else "")
    print(f"\n== {pass_}{mode}  {model} ({batch.heads} heads x {args.head_dim})  B={len(batch.lens)}  {name}  "
          f"N={batch.max_len} ({pad:.0%} padding)  {args.dtype}")
    print(f"{'impl':<14}{'median_us':>11}{'p20':>10}{'p80':>10}{'TFLOP/s':>9}{'err':>10}  speed-up of ours / note")
    for (impl, times, err, note), m, speedup, vs in against_ours(rows):
        if m is None:
            print(f"{impl:<14}{'-':>11}{'':>29}{err:>10}  {note}")
            continue
        print(f"{impl:<14}{m:>11.1f}{quantile(times, 2):>10.1f}{quantile(times, 8):>10.1f}{flop / m / 1e6:>9.1f}"
              f"{err:>10}  {speedup} {note}".rstrip())
        if writer is not None:
            tag = " graph" if args.graph else " host" if args.host else ""
            writer.write(dict(case=f"{pass_}{tag}{f' dropout={p}' if p else ''} {model} "
                                   f"{name}", impl=impl,
                              B=len(batch.lens), dtype=args.dtype,
                              median_us=f"{m:.2f}", speedup_vs=vs,
                              notes=f"heads={batch.heads} d={args.head_dim} N={batch.max_len} tokens={sum(batch.lens)} "
                                    f"p20={quantile(times, 2):.1f} p80={quantile(times, 8):.1f} reps={len(times)} "
                                    f"tflops={flop / m / 1e6:.2f} err={err} {note}".strip()))
    sys.stdout.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    device, timer, writer = open_run("bench_attention", args)
    print(f"models {args.models}, batches {args.batches}, B={args.batch_size}, {args.dtype}, passes {args.passes}")
    if args.cpu_smoke:
        print("cpu smoke: tiny sizes, interpreter, times mean nothing")
    start = time.perf_counter()
    flex, profiles = Flex(), []
    for model in args.models:
        for name in args.batches:
            for pass_ in args.passes:
                run_block(args, timer, writer, flex, model, name, pass_, device, profiles)
    run_profiles(profiles, device, KERNEL_KINDS)
    print(f"\nbench_attention: done in {time.perf_counter() - start:.0f} s"
          + (f"; {writer.count} rows appended to {writer.path}" if writer else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
