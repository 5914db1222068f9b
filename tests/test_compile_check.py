"""The kernels compile for a GPU (sm_90) on a machine without one: the interpreter runs the kernels' Python, not
Triton's compiler, so only this catches a kernel that the compiler rejects before a device session does.
One variant of each kernel in its main launch, through benchmarks/compile_check.py."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_check.py"
VARIANTS = ["ot cost ipot warps=4", "ot vectors bf16 packed", "ot cosine backward fp16",
            "attention forward bf16 d=64 dropout", "attention backward bf16 d=64 dropout", "attention keep mask"]


@pytest.mark.slow
def test_main_kernel_variants_compile_for_sm90():
    args = [sys.executable, str(SCRIPT), "--arch", "90"] + [a for v in VARIANTS for a in ("--match", v)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    done = re.search(r"compile_check: (\d+) of (\d+) compiled", run.stdout)
    assert done and done[1] == done[2] and int(done[1]) >= len(VARIANTS), run.stdout[-3000:]  # a name may match two
    assert "regs" in run.stdout  # cuobjdump read the compiled code
