"""`uniter-fast env`: versions, the device, and which backend each op will use and why."""
from __future__ import annotations

import importlib
import os
import platform

import torch


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as err:  # a broken install is worth reporting, not crashing on
        return f"unavailable ({type(err).__name__}: {str(err).splitlines()[0][:80]})"


def op_backends(device: torch.device, backend: str | None = None) -> dict[str, tuple[str, str]]:
    """op -> (backend, why) for fp32 inputs on `device`."""
    from uniter_fast.kernels import attention, ot
    from uniter_fast.kernels.backend import BackendUnavailable, explain

    cost = (torch.empty(0, 60, 100, device="meta"),)  # UNITER's sizes: 60 words x 100 regions
    reasons = {
        "ipot": ot._triton_reason(cost, 60, 100),
        "sinkhorn": ot._triton_reason(cost, 60, 100),
        "wra_distance": ot._triton_reason(cost, 60, 100),
        "varlen_attention": attention._triton_reason(torch.empty(0, 1, 64, device="meta")),
    }
    out = {}
    for op, reason in reasons.items():
        try:
            out[op] = explain(op, backend, device, reason)
        except BackendUnavailable as err:
            out[op] = ("unavailable", str(err))
        except ValueError as err:  # no such backend (UNITER_FAST_BACKEND=cuda): the report says so, it does not crash
            out[op] = ("invalid", str(err))
    return out


def environment_report() -> str:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    lines = [
        f"python      {platform.python_version()} ({platform.machine()})",
        f"torch       {torch.__version__} (CUDA build {torch.version.cuda or 'none'})",
    ]
    for name in ("triton", "deepspeed", "numpy", "tokenizers", "safetensors", "xformers", "ot"):
        lines.append(f"{name:<11} {_version(name)}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device      {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"compute capability {props.major}.{props.minor}, {torch.cuda.device_count()} visible")
    else:
        lines.append(f"device      cpu ({os.cpu_count()} cores); no CUDA device")
    lines.append(f"backend     UNITER_FAST_BACKEND={os.environ.get('UNITER_FAST_BACKEND', '(unset: auto)')}, "
                 f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}")
    for op, (chosen, why) in op_backends(device).items():
        lines.append(f"  {op:<18} {chosen:<8} {why}")
    from uniter_fast.kernels import attention_xformers

    reason = attention_xformers.unavailable(torch.empty(0, device=device))
    lines.append(f"  {'xformers':<18} {'-' if reason else 'may run':<8} "
                 f"{reason or 'backend=xformers selects it for varlen_attention (its operators decide at the call)'}")
    return "\n".join(lines)
