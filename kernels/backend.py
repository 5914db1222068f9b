"""Which implementation serves a call: the plain-PyTorch reference ("torch") or a Triton kernel ("triton").

The choice comes from the caller's `backend` argument (usually the model config), overridden by the
environment variable UNITER_FAST_BACKEND. "auto" takes triton for CUDA tensors when a kernel can serve the
call, and torch otherwise, saying once in the log why it fell back; an explicit "triton" also runs on the CPU
under the Triton interpreter (TRITON_INTERPRET=1), and raises when it cannot serve the call.
"""
from __future__ import annotations

import logging
import os

import torch

BACKENDS = ("auto", "torch", "triton", "xformers")  # xformers serves attention only (kernels/attention.py)
ENV_VAR = "UNITER_FAST_BACKEND"

log = logging.getLogger("uniter_fast.kernels")
_fallbacks_logged: set[tuple[str, str]] = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve this call."""


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the environment variable wins over the argument."""
    env = os.environ.get(ENV_VAR)
    choice = env if env else (backend or "auto")
    if choice not in BACKENDS:
        source = f"environment variable {ENV_VAR}" if env else "backend argument"
        raise ValueError(f"{source} is {choice!r}; expected one of {', '.join(BACKENDS)}")
    return choice


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# host-side launch arithmetic on plain ints (triton's cdiv and next_power_of_2 are constexpr functions, several
# microseconds a call on the launch path)
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def explain(op: str, backend: str | None, device: torch.device, triton_reason: str | None) -> tuple[str, str]:
    """(chosen backend, why) for one call of `op` on `device`.

    triton_reason: why the triton kernel cannot serve this call (dtype, head size, no kernel built), or None.
    """
    choice = requested_backend(backend)
    if choice == "xformers":  # it names attention's backend; an op without an xformers path chooses automatically
        choice = "auto"
    if choice == "torch":
        return "torch", "requested"
    if triton_reason is None and device.type != "cuda" and not (choice == "triton" and interpreting()):
        triton_reason = f"inputs on {device.type}: triton kernels run on CUDA (or on the CPU with TRITON_INTERPRET=1)"
    if triton_reason is None:
        return "triton", "requested" if choice == "triton" else "auto: a kernel serves this call"
    if choice == "triton":
        raise BackendUnavailable(f"{op}: the triton backend cannot serve this call: {triton_reason}")
    return "torch", f"auto: {triton_reason}"


def choose(op: str, backend: str | None, device: torch.device, triton_reason: str | None) -> str:
    """Pick "torch" or "triton" for one call of `op`; an automatic fall-back is logged once per reason."""
    chosen, why = explain(op, backend, device, triton_reason)
    if chosen == "torch" and why.startswith("auto") and (op, why) not in _fallbacks_logged:
        _fallbacks_logged.add((op, why))
        log.info("%s: using the torch reference (%s)", op, why[len("auto: "):])
    return chosen
