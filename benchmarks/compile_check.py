#!/usr/bin/env python
"""Compile the kernels' launch variants for a GPU without one: compile errors, registers and spills.

A device session is short, and a kernel that does not compile there (another Triton, another target) costs one.
This compiles each variant the launchers produce at UNITER's shapes for --arch (sm_90 by default) with the
Triton on the path (put another Triton first on PYTHONPATH to check that one: the device machine has 3.6),
pointers 16-byte aligned and the integers that are multiples of 16 at those shapes (strides of 768-wide rows, head
dims) marked so, as a launch specialises them. It prints registers, spill stack and shared memory per variant (from
cuobjdump, shipped with Triton) and exits 1 if any variant fails to compile. --sass also prints, per loop of the
compiled code (a backward branch and its body), the instructions in it and the most frequent opcodes: the counts
in RESULTS.md come from there.

    python benchmarks/compile_check.py                  # every variant (a few minutes on 2 cores)
    python benchmarks/compile_check.py --only attention
    python benchmarks/compile_check.py --match "attention forward bf16" --match "ot cost ipot warps=4"
    python benchmarks/compile_check.py --match "attention forward bf16 d=64" --sass
    PYTHONPATH=/tmp/triton-3.6 python benchmarks/compile_check.py
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)  # before triton loads: compiling needs its JIT, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from uniter_fast.kernels import attention_triton as attn  # noqa: E402
from uniter_fast.kernels import ot_triton as ot  # noqa: E402
from tune_kernels import OT_BACKWARD_CAPPED, OT_COST_CAPPED, OT_VECTORS_CAPPED  # noqa: E402

UNITER_M, UNITER_N, UNITER_D, UNITER_L = 60, 100, 768, 160  # words, regions, region dims, longest sample
H100_SMS = 132
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOATS = {"scale", "tol", "scale_log2", "keep_scale"}  # fp32 scalars; every other non-pointer is an int
# integers a UNITER launch passes as multiples of 16 (Triton specialises those): row strides of 768-wide rows,
# per-head strides and head dims (attention), the vectors' width and row strides (OT)
MULTIPLES_OF_16 = {"stride_qt", "stride_kt", "stride_vt", "stride_ot", "stride_dot", "stride_qh", "stride_kh",
                   "stride_vh", "stride_oh", "stride_doh", "head_dim", "D", "s_xr", "s_yr", "s_gxr", "s_gyr"}


@dataclass
class Variant:
    name: str
    kernel: object  # a triton.JITFunction
    pointers: dict[str, str]  # pointer parameter -> element type ("fp32", "bf16", ...)
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    options: dict = field(default_factory=dict)


def signature(v: Variant) -> tuple[dict, dict, dict]:
    params = list(inspect.signature(v.kernel.fn).parameters)
    sig = {}
    for p in params:
        if p in v.constexprs:
            sig[p] = "constexpr"
        elif p in v.pointers:
            sig[p] = "*" + v.pointers[p]
        else:
            sig[p] = "fp32" if p in FLOATS else "i32"
    constexprs = {(params.index(k),): value for k, value in v.constexprs.items() if k in params}
    specialised = [p for p in params if (p in v.pointers or p in MULTIPLES_OF_16) and p not in v.constexprs]
    aligned = {(params.index(p),): [["tt.divisibility", 16]] for p in specialised}
    return sig, constexprs, aligned


def cuobjdump(cubin: bytes, flag: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def resources(cubin: bytes) -> str:
    found = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", cuobjdump(cubin, "--dump-resource-usage")))
    return f"regs {found.get('REG', '?'):>3}  stack {found.get('STACK', '?'):>5}"


def loops(cubin: bytes) -> list[tuple[int, Counter]]:
    """(instructions, opcode counts) of each loop: the code from a backward branch's target to the branch. A branch
    back across several loops' code (as around the half-tile branches) counts as a loop too: read with the source."""
    code = []  # (address, opcode)
    for line in cuobjdump(cubin, "-sass").splitlines():
        found = re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if found:
            code.append((int(found.group(1), 16), found.group(2)))
    out = []
    for line in cuobjdump(cubin, "-sass").splitlines():
        branch = re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA (0x[0-9a-f]+)", line)
        if branch and int(branch.group(2), 16) < int(branch.group(1), 16):
            start, end = int(branch.group(2), 16), int(branch.group(1), 16)
            body = Counter(op for address, op in code if start <= address <= end)
            out.append((sum(body.values()), body))
    return out


def _on_h100(rule, *args):
    """rule(*args) as on an H100: the OT rules size launches by the SM count, which is 1 without a GPU."""
    saved = ot._sm_count
    ot._sm_count = lambda device: H100_SMS
    try:
        return rule(*args)
    finally:
        ot._sm_count = saved


def ot_variants() -> list[Variant]:
    out = []
    lens = dict(text_lens_ptr="i64", region_lens_ptr="i64", x_starts_ptr="i64", y_starts_ptr="i64")
    cost_ptrs = dict(cost_ptr="fp32", x_ptr="fp32", y_ptr="fp32", dist_ptr="fp32", plan_ptr="fp32", counts_ptr="i32",
                     stats_ptr="fp32", **lens)
    for batch in (256, 4096):  # below and above four programs per SM: 4 warps and 32 lanes, 2 and 16
        rule = _on_h100(ot._config, batch, UNITER_M, UNITER_N, None, 4)
        for method, tol in (("ipot", False), ("ipot", True), ("ipot_log", False), ("sinkhorn_log", False)):
            out.append(Variant(
                f"ot cost {method}{' tol' if tol else ''} warps={rule['num_warps']}", ot._transport_kernel, cost_ptrs,
                dict(METHOD=ot.METHODS[method], FROM_VECTORS=False, PACKED=False, WRITE_PLAN=True, WRITE_STATS=False,
                     USE_TOL=tol, DOT_PRECISION="ieee", **_launch(rule)), rule["num_warps"]))
    rule = _on_h100(ot._config, 256, UNITER_M, UNITER_N, None, 4)
    for capped in OT_COST_CAPPED:  # tune_kernels' register-capped launches
        launch = {**rule, **capped}
        out.append(Variant(
            f"ot cost ipot warps={launch['num_warps']} lanes={launch['COL_LANES']} maxnreg={launch['maxnreg']}",
            ot._transport_kernel, cost_ptrs,
            dict(METHOD=0, FROM_VECTORS=False, PACKED=False, WRITE_PLAN=True, WRITE_STATS=False, USE_TOL=False,
                 DOT_PRECISION="ieee", **_launch(launch)), launch["num_warps"], options={"maxnreg": launch["maxnreg"]}))
    for dtype in ("fp32", "fp16", "bf16"):
        rule = ot._config(1024, UNITER_M, UNITER_N, UNITER_D, DTYPES[dtype].itemsize)
        vector_ptrs = dict(cost_ptr="fp32", x_ptr=dtype, y_ptr=dtype, dist_ptr="fp32", plan_ptr="fp32",
                           counts_ptr="i32", stats_ptr="fp32", **lens)
        launches = [("", rule)] + ([(f" warps={c['num_warps']} maxnreg={c['maxnreg']}", {**rule, **c})
                                    for c in OT_VECTORS_CAPPED] if dtype == "bf16" else [])
        for packed in (False, True) if dtype == "bf16" else (False,):
            for label, launch in launches[:1] if packed else launches:
                out.append(Variant(
                    f"ot vectors {dtype}{' packed' if packed else ''}{label}", ot._transport_kernel, vector_ptrs,
                    dict(METHOD=0, FROM_VECTORS=True, PACKED=packed, WRITE_PLAN=True, WRITE_STATS=True, USE_TOL=False,
                         DOT_PRECISION=ot._dot_precision(DTYPES[dtype], False), **_launch(launch)),
                    launch["num_warps"], options=_options(launch)))
        grad_rule, precision = ot.backward_launch(1024, UNITER_M, UNITER_N, UNITER_D, DTYPES[dtype])
        grad_rule = {k: v for k, v in grad_rule.items() if k != "SPLITS"}
        stages = grad_rule.pop("num_stages")
        grad_ptrs = dict(x_ptr=dtype, y_ptr=dtype, gx_ptr=dtype, gy_ptr=dtype, plan_ptr="fp32", stats_ptr="fp32",
                         grad_ptr="fp32", **lens)
        # bf16: the rule's 16-bit products (64 dims a step), the tf32 ones they replaced (32 dims), and the rule
        # register-capped
        launches = [("", grad_rule)]
        if grad_rule["LOW_OPERANDS"]:
            launches += [(" tf32", {**grad_rule, "LOW_OPERANDS": False, "BLOCK_D": 32})]
            launches += [(f" warps={c['num_warps']} maxnreg={c['maxnreg']}", {**grad_rule, **c})
                         for c in OT_BACKWARD_CAPPED]
        for label, launch in launches:
            out.append(Variant(
                f"ot cosine backward {dtype}{label}", ot._cosine_grad_kernel, grad_ptrs,
                dict(PACKED=False, DOT_PRECISION=precision, EVEN_D=True, **_launch(launch)),
                launch["num_warps"], stages, options=_options(launch)))
    return out


def _launch(rule: dict) -> dict:
    """A launch's constexprs: what is not a compile option."""
    return {k: v for k, v in rule.items() if k not in ("num_warps", "maxnreg")}


def _options(launch: dict) -> dict:
    return {"maxnreg": launch["maxnreg"]} if "maxnreg" in launch else {}


def attention_variants() -> list[Variant]:
    out = []
    for dtype in ("fp32", "fp16", "bf16"):
        for head_dim in (32, 64, 128):
            for dropout in (False, True):
                fwd = attn.forward_launch(UNITER_L, head_dim, DTYPES[dtype])
                bwd = attn.backward_launch(UNITER_L, head_dim, DTYPES[dtype])
                flags = dict(BLOCK_D=attn._block_d(head_dim), **attn._flags(DTYPES[dtype], 0.1 if dropout else 0.0))
                tag = f"{dtype} d={head_dim}{' dropout' if dropout else ''}"
                seed = "i64" if dropout else "i32"  # the seed, or cu_seqlens (unread) without dropout
                out.append(Variant(
                    f"attention forward {tag}", attn._fwd_kernel,
                    dict(Q=dtype, K=dtype, V=dtype, O=dtype, LSE="fp32", CU="i32", SEED=seed),
                    dict(BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, **flags), fwd.num_warps, fwd.num_stages or 3))
                for fused in (False, True) if dtype == "bf16" and head_dim == 64 else (bwd.fused_delta,):
                    out.append(Variant(
                        f"attention backward {tag}{' fused delta' if fused else ''}", attn._bwd_kernel,
                        dict(Q=dtype, K=dtype, V=dtype, O=dtype, DO=dtype, DQ=dtype, DK=dtype, DV=dtype, LSE="fp32",
                             DELTA="fp32", CU="i32", SEED=seed),
                        dict(BLOCK=bwd.block_m, FUSED_DELTA=fused, **flags), bwd.num_warps, bwd.num_stages or 3))
        out.append(Variant(f"attention delta {dtype}", attn._delta_kernel,
                           dict(O=dtype, DO=dtype, DELTA="fp32"), dict(BLOCK_T=64, BLOCK_D=64)))
    out.append(Variant("attention keep mask", attn._keep_mask_kernel, dict(OUT="i8", CU="i32", SEED="i64"),
                       dict(BLOCK=attn._block(UNITER_L))))
    return out


def compile_one(v: Variant, arch: int, sass: bool = False) -> str:
    sig, constexprs, aligned = signature(v)
    src = ASTSource(fn=v.kernel, signature=sig, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=v.num_warps, num_stages=v.num_stages, **v.options))
    report = f"{resources(compiled.asm['cubin'])}  shared {compiled.metadata.shared:>6}"
    if sass:
        for count, body in loops(compiled.asm["cubin"]):
            top = ", ".join(f"{op} {n}" for op, n in body.most_common(8))
            report += f"\n    loop of {count} instructions: {top}"
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100, H200)")
    p.add_argument("--only", choices=["ot", "attention"], default=None)
    p.add_argument("--match", action="append", default=[], help="only variants whose name contains this (repeatable)")
    p.add_argument("--sass", action="store_true", help="also each loop's instruction count and commonest opcodes")
    args = p.parse_args(argv)
    variants = ([] if args.only == "attention" else ot_variants()) + ([] if args.only == "ot" else attention_variants())
    if args.match:
        variants = [v for v in variants if any(m in v.name for m in args.match)]
        if not variants:
            p.error(f"no variant matches {args.match}")
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}), sm_{args.arch}, "
          f"{len(variants)} variants")
    failed, start = [], time.perf_counter()
    for v in variants:
        t = time.perf_counter()
        try:
            result = compile_one(v, args.arch, args.sass)
        except Exception as err:  # every variant is tried; the failures are listed at the end
            failed.append(v.name)
            result = f"FAILED: {type(err).__name__}: {str(err).strip().splitlines()[-1][:150]}"
            traceback.print_exc(limit=1)
        print(f"{v.name:<44} warps {v.num_warps}  {result}  ({time.perf_counter() - t:.1f} s)")
        sys.stdout.flush()
    print(f"\ncompile_check: {len(variants) - len(failed)} of {len(variants)} compiled in "
          f"{time.perf_counter() - start:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
