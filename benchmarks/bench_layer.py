#!/usr/bin/env python
"""The encoder's forward+backward at UNITER's lengths: real tokens per second, ours against Hugging Face BERT.

Batch: B=128 samples of text 8..60 plus regions 10..100 tokens (seeded, as reference/anchors.md); bf16 autocast,
dropout on (training mode), a random gradient on the output. Models: base (12 x 768) and large (24 x 1024).
Implementations:
- ours_triton   uniter_fast.model.encoder.Encoder on the packed rows (total, hidden): every matrix product,
                LayerNorm and GELU on real tokens only, attention by our Triton kernel (dropout in the kernel);
- ours_compile  ours_triton under torch.compile (inductor fuses the bias, dropout, residual, LayerNorm and GELU
                passes around the matrix products; our attention kernels stay whole as custom ops);
- ours_graphs   the same compiled with mode="reduce-overhead" and static shapes: the step replayed from CUDA graphs,
                so the host's launches drop out (dropout's seeds are drawn on the device, afresh each replay); the
                note says whether inductor skipped the graphs, and why;
- ours_torch    the same encoder with the reference attention (pad, SDPA with a key mask, unpad inside each
                layer; the rest stays packed);
- hf_eager      transformers' BertModel (SDPA attention) on the padded batch with an attention mask, called with
                inputs_embeds (so it also adds position/type embeddings, one LayerNorm and the pooler: under 1%);
- hf_compile    the same under torch.compile (compiled once; the first call's time is printed).
Gradients flow into the parameters (accumulated, as in training) and the input. UNITER_FAST_BACKEND is ignored.
Reported: median time per forward+backward, real tokens/s (padding not counted), and the ratio of ours to each
peer, and each compiled encoder of ours' ratio to every peer. Rows are appended to benchmarks/results.csv.

    python benchmarks/bench_layer.py                   # base and large (about a minute on an H100 with compile)
    python benchmarks/bench_layer.py --quick           # base only, no compile
    python benchmarks/bench_layer.py --quick --profile # and where ours_triton's step goes (torch.profiler)
    python benchmarks/bench_layer.py --quick --host    # the host's time per step alone
    TRITON_INTERPRET=1 python benchmarks/bench_layer.py --cpu-smoke
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # before anything imports triton: the kernels run under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import contextlib
import time

import torch
from harness import (Skip, add_csv_options, against_ours, failure, host_times, median, open_run, quantile, ratio,
                     results_path, run_profiles)

from uniter_fast.config import UniterConfig
from uniter_fast.kernels import reference
from uniter_fast.model.encoder import Encoder

IMPLS = ("ours_triton", "ours_compile", "ours_graphs", "ours_torch", "hf_eager", "hf_compile")
COMPILED = ("ours_compile", "ours_graphs", "hf_compile")


def lengths(B: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(8, 61, (B,), generator=gen) + torch.randint(10, 101, (B,), generator=gen)).tolist()


def hf_bert(config: UniterConfig, device):
    try:
        from transformers import BertConfig, BertModel
    except Exception as err:
        raise Skip(f"transformers is not importable ({type(err).__name__}: {err})")
    bert_config = BertConfig(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                             num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
                             hidden_dropout_prob=config.hidden_dropout_prob,
                             attention_probs_dropout_prob=config.attention_probs_dropout_prob,
                             max_position_embeddings=512, attn_implementation="sdpa")
    return BertModel(bert_config, add_pooling_layer=True).to(device).train()


class Case:
    """One model size: the packed and padded inputs, and a builder per implementation."""

    def __init__(self, args, model: str, device):
        overrides = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128) \
            if args.cpu_smoke else {}
        self.config = UniterConfig.preset(model, **overrides)
        self.args, self.model, self.device = args, model, device
        self.lens = lengths(args.batch_size, args.seed)
        cu = torch.zeros(len(self.lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(self.lens).cumsum(0)
        self.cu, self.total, self.N = cu.to(device), int(cu[-1]), max(self.lens)
        gen = torch.Generator().manual_seed(args.seed)
        self.x = torch.randn(self.total, self.config.hidden_size, generator=gen).to(device)
        self.grad = torch.randn(self.total, self.config.hidden_size, generator=gen).to(device)
        starts, lens_t = self.cu[:-1], self.cu[1:] - self.cu[:-1]
        self.x_padded = reference.pad_rows(self.x, starts, lens_t, self.N)
        self.grad_padded = reference.pad_rows(self.grad, starts, lens_t, self.N)
        self.mask = (torch.arange(self.N, device=device)[None, :] < lens_t[:, None]).long()
        self.compile_notes: dict[str, str] = {}

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # the CPU smoke runs fp32

    def skip_compile(self):
        if self.args.no_compile or self.device.type != "cuda":
            raise Skip("--no-compile" if self.args.no_compile else "compiled implementations run on a GPU only")

    def first_call(self, impl: str, run) -> None:
        """Compile by calling once, and note how long that took."""
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        self.compile_notes[impl] = f"first_call_s={time.perf_counter() - start:.1f}"
        print(f"  [torch.compile] {self.model} {impl}: first call {time.perf_counter() - start:.1f} s")

    def ours(self, backend: str, compiled: bool = False, graphs: bool = False):
        if compiled:
            self.skip_compile()
        encoder = Encoder(self.config.replace(backend=backend)).to(self.device).train()
        if graphs:  # one batch shape here; training would bucket its token counts
            fn = torch.compile(encoder, mode="reduce-overhead", dynamic=False)
        else:
            fn = torch.compile(encoder, dynamic=True) if compiled else encoder  # as training compiles it (loop.py)
        x = self.x.detach().requires_grad_()

        def run():
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten now
            with self.autocast():
                out = fn(x, self.cu, self.N)
            out.backward(self.grad.to(out.dtype))
        if graphs:  # gradients that outlive a replay: autograd adds the graph's outputs into them in place
            for t in (*encoder.parameters(), x):
                t.grad = torch.zeros_like(t)
        if compiled:
            impl = "ours_graphs" if graphs else "ours_compile"
            skips = _cudagraph_skips()
            self.first_call(impl, run)
            if graphs:
                skipped = _cudagraph_skips() - skips
                self.compile_notes[impl] += f" cudagraph_skips={skipped}"
                if skipped:
                    print(f"  [torch.compile] {self.model} {impl}: inductor skipped CUDA graphs {skipped} time(s); "
                          "TORCH_LOGS=perf_hints says why")
        return run

    def hf(self, compiled: bool):
        if compiled:
            self.skip_compile()
        bert = hf_bert(self.config, self.device)
        fn = torch.compile(bert) if compiled else bert
        x = self.x_padded.detach().requires_grad_()

        def run():
            with self.autocast():
                out = fn(inputs_embeds=x, attention_mask=self.mask).last_hidden_state
            out.backward(self.grad_padded.to(out.dtype))
        if compiled:
            self.first_call("hf_compile", run)
        return run

    def build(self, impl: str):
        return {"ours_triton": lambda: self.ours("triton"), "ours_compile": lambda: self.ours("triton", True),
                "ours_graphs": lambda: self.ours("triton", True, graphs=True), "ours_torch": lambda: self.ours("torch"),
                "hf_eager": lambda: self.hf(False), "hf_compile": lambda: self.hf(True)}[impl]()


def _cudagraph_skips() -> int:
    """How many compiled graphs inductor has run without CUDA graphs so far (each skip logs its reason)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


# kernel-name fragments per kind, for the profile's summary (first match wins; the rest is "other")
KERNEL_KINDS = {
    "matrix products": ("gemm", "xmma", "nvjet", "cutlass", "cublas"),
    "our attention (Triton)": ("_fwd_kernel", "_bwd_kernel", "_delta_kernel"),
    "layer norm": ("layer_norm", "layernorm"),
    "dropout": ("dropout", "bernoulli"),
    "GELU": ("gelu",),
    "copies, casts, fills": ("copy", "cast", "fill", "cat"),
    "other elementwise": ("elementwise",),
    "reductions": ("reduce",),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["base", "large"], choices=["base", "large"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true",
                   help=f"skip {', '.join(COMPILED)} (30-75 s each per model to compile)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    p.add_argument("--quick", action="store_true", help="base only, no compile")
    p.add_argument("--cpu-smoke", action="store_true", help="a 2-layer toy on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--host", action="store_true",
                   help="time the host alone: each step issued from an idle GPU without waiting for it (a step whose "
                        "host time is below its GPU time is GPU-bound)")
    p.add_argument("--profile", action="store_true",
                   help="then profile ours_triton's and ours_compile's step: wall against kernel time, the costliest kernels and ops")
    add_csv_options(p)
    args = p.parse_args(argv)
    args.csv = results_path(args)
    args.impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown:
        p.error(f"--impls: unknown {unknown}; choose from {', '.join(IMPLS)}")
    if args.quick:
        args.models, args.no_compile = ["base"], True
    if args.cpu_smoke:
        args.models, args.batch_size, args.reps, args.no_compile = ["base"], 3, 5, True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, timer, writer = open_run("bench_layer", args)
    print(f"models {args.models}, B={args.batch_size}, {'fp32 (cpu smoke)' if args.cpu_smoke else 'bf16 autocast'}, "
          "dropout on, forward+backward")
    start, profiles = time.perf_counter(), []
    for model in args.models:
        case = Case(args, model, device)
        rows = []
        for impl in args.impls:
            times, note = None, ""
            try:
                run = case.build(impl)
                times = host_times(run, timer.reps, timer.warmup, timer.sync) if args.host else timer(run)
                note = case.compile_notes.get(impl, "")
            except Skip as why:
                note = f"skipped: {why}"
            except Exception as err:  # a peer that fails is reported, the others still run
                note = failure(err)
            rows.append((impl, times, note))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.profile:  # profiled after every timing (run_profiles)
            for impl in ("ours_triton", "ours_compile"):
                with contextlib.suppress(Skip):
                    profiles.append((f"{impl} {model}", case.build(impl)))
        tokens = sum(case.lens)
        mode = " (host time)" if args.host else ""
        print(f"\n== {model} ({case.config.num_hidden_layers} x {case.config.hidden_size}){mode}  B={len(case.lens)}  "
              f"{tokens} real tokens, padded {len(case.lens)} x {case.N} ({1 - tokens / (len(case.lens) * case.N):.0%} "
              "padding)")
        print(f"{'impl':<13}{'median_ms':>11}{'p20':>9}{'p80':>9}{'tokens/s':>11}  ours_triton's speed-up / note")
        for (impl, times, note), m, speedup, vs in against_ours(rows):
            if m is None:
                print(f"{impl:<13}{'-':>11}{'':>29}  {note}")
                continue
            print(f"{impl:<13}{m / 1e3:>11.2f}{quantile(times, 2) / 1e3:>9.2f}{quantile(times, 8) / 1e3:>9.2f}"
                  f"{tokens / m * 1e6:>11.0f}  {speedup} {note}".rstrip())
            if writer is not None:
                writer.write(dict(case=f"encoder_fwd_bwd{' host' if args.host else ''} {model}", impl=impl,
                                  B=len(case.lens),
                                  dtype="fp32" if args.cpu_smoke else "bf16-autocast", median_us=f"{m:.1f}",
                                  speedup_vs=vs, notes=f"tokens={tokens} N={case.N} tokens_per_s={tokens / m * 1e6:.0f} "
                                                       f"p20={quantile(times, 2):.0f} p80={quantile(times, 8):.0f} "
                                                       f"reps={len(times)} {note}".strip()))
        medians = {impl: median(times) for impl, times, _ in rows if times}
        for ours in ("ours_compile", "ours_graphs"):
            if ours in medians:
                print(f"{ours}'s speed-up: " + ", ".join(f"{ratio(medians[peer] / medians[ours])} {peer}"
                                                         for peer in IMPLS if peer in medians and peer != ours))
        sys.stdout.flush()
    run_profiles(profiles, device, KERNEL_KINDS)
    print(f"\nbench_layer: done in {time.perf_counter() - start:.0f} s"
          + (f"; {writer.count} rows appended to {writer.path}" if writer else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
