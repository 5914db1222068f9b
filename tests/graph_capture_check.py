"""Run by test_attention.py's graph-capture test in a process of its own, on CUDA: a failed capture leaves the CUDA
generator capturing, which would fail the next tests of the same process. Captures one training call of
varlen_attention (autograd forward and backward) in a CUDA graph and checks its replay against an eager call, bit
for bit. Arguments: the capture mode (global or thread_local), then qkv or three_tensors. Exits non-zero with the
difference or the error."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_attention import packed, uniter_lens  # noqa: E402

from uniter_fast.kernels import attention  # noqa: E402


def main(mode: str, layout: str) -> None:
    torch.manual_seed(0)  # the gradient below: the same in every run
    lens = uniter_lens(8, seed=7)
    q, k, v, cu = packed(lens, heads=12, head_dim=64, dtype=torch.bfloat16, device="cuda")
    grad, n = torch.randn_like(q), max(lens)
    inputs = (torch.stack([q, k, v], 1),) if layout == "qkv" else (q, k, v)
    inputs = tuple(t.detach().requires_grad_() for t in inputs)

    def run():
        if layout == "qkv":
            out = attention.varlen_attention_qkv(inputs[0], cu, n, attention.AttentionOptions(backend="triton"))
        else:
            out = attention.varlen_attention(*inputs, cu, n, backend="triton")
        # no graph kept: an earlier call's graph would keep the inputs' AccumulateGrad nodes of the stream it ran
        # on, and torch would then sync the legacy stream with the capturing one, which fails the capture
        return tuple(t.detach() for t in (out, *torch.autograd.grad(out, inputs, grad)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiled and loaded before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=mode):
        captured = run()
    graph.replay()
    expected = run()
    assert len(captured) == len(expected) == 1 + len(inputs)
    for i, (got, want) in enumerate(zip(captured, expected)):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m: f"output {i} (0: out, then grads): {m}")
    print(f"ok: {mode} {layout}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
