"""Backend choice (kernels/backend.py) and the environment report (uniter_fast/env.py), against DESIGN.md's rules:
auto picks triton for CUDA tensors and torch otherwise; UNITER_FAST_BACKEND overrides the argument; a backend that
cannot serve a call says why, and auto falls back and logs it once."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from uniter_fast import env
from uniter_fast.kernels import backend

OPS = ("ipot", "sinkhorn", "wra_distance", "varlen_attention")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # explain reads only the device's type: no GPU needed


@pytest.fixture
def fresh_log(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """No fall-back logged yet, and the kernels' log captured at INFO."""
    monkeypatch.setattr(backend, "_fallbacks_logged", set())
    caplog.set_level(logging.INFO, logger=backend.log.name)
    return caplog


def test_environment_variable_wins_over_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend.requested_backend(None) == "auto"
    assert backend.requested_backend("triton") == "triton"
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.requested_backend("triton") == "torch"
    assert backend.explain("ipot", "triton", CUDA, None) == ("torch", "requested")
    monkeypatch.setenv(backend.ENV_VAR, "")  # set but empty: as if unset
    assert backend.requested_backend("triton") == "triton"


def test_unknown_backend_names_where_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="backend argument is 'cuda'; expected one of auto, torch, triton"):
        backend.requested_backend("cuda")
    monkeypatch.setenv(backend.ENV_VAR, "tritn")
    with pytest.raises(ValueError, match=f"environment variable {backend.ENV_VAR} is 'tritn'"):
        backend.requested_backend("torch")


def test_explain_picks_by_device_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.explain("ipot", None, CUDA, None) == ("triton", "auto: a kernel serves this call")
    assert backend.explain("ipot", "triton", CUDA, None) == ("triton", "requested")
    assert backend.explain("ipot", "torch", CUDA, None) == ("torch", "requested")
    chosen, why = backend.explain("ipot", "auto", CPU, None)  # auto never takes the interpreter
    assert chosen == "torch" and why.startswith("auto: ") and "cpu" in why
    assert backend.explain("ipot", None, CUDA, "head_dim 200") == ("torch", "auto: head_dim 200")
    with pytest.raises(backend.BackendUnavailable, match="sinkhorn: the triton backend cannot serve this call: dt"):
        backend.explain("sinkhorn", "triton", CUDA, "dtype torch.float64")


@pytest.mark.parametrize("value", ["0", ""])
def test_explicit_triton_on_the_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", value)
    with pytest.raises(backend.BackendUnavailable, match="ipot: .*inputs on cpu"):
        backend.explain("ipot", "triton", CPU, None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.explain("ipot", "triton", CPU, None) == ("triton", "requested")


def test_fallback_is_logged_once_per_op_and_reason(fresh_log: pytest.LogCaptureFixture) -> None:
    for _ in range(3):
        assert backend.choose("ipot", None, CPU, None) == "torch"
    assert len(fresh_log.records) == 1
    assert "ipot" in fresh_log.records[0].getMessage() and "inputs on cpu" in fresh_log.records[0].getMessage()
    backend.choose("sinkhorn", None, CPU, None)  # another op: its own message
    backend.choose("ipot", None, CUDA, "inputs of dtype torch.float64")  # another reason: said once too
    backend.choose("ipot", None, CUDA, "inputs of dtype torch.float64")
    messages = [r.getMessage() for r in fresh_log.records]
    assert len(messages) == 3, messages
    assert "sinkhorn" in messages[1] and "float64" in messages[2]


def test_no_log_without_a_fallback(fresh_log: pytest.LogCaptureFixture) -> None:
    assert backend.choose("ipot", "torch", CPU, None) == "torch"  # asked for: not a fall-back
    assert backend.choose("ipot", "torch", CUDA, "head_dim 200") == "torch"
    assert backend.choose("ipot", None, CUDA, None) == "triton"
    assert fresh_log.records == []


def test_launch_arithmetic() -> None:
    for n in range(-1, 300):
        power = 1
        while power < n:
            power *= 2
        assert backend.next_pow2(n) == power, n
    for a in range(0, 70):
        for b in range(1, 17):
            assert backend.cdiv(a, b) == math.ceil(a / b), (a, b)


# ---------------------------------------------------------------------------------------------------------
# `uniter-fast env`
# ---------------------------------------------------------------------------------------------------------


def test_op_backends_follow_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 inputs at UNITER's sizes: auto takes triton on CUDA for every op and torch on the CPU (saying so);
    an explicit backend is reported as requested, and one that cannot serve as unavailable, with the reason."""
    assert env.op_backends(CUDA) == {op: ("triton", "auto: a kernel serves this call") for op in OPS}
    assert env.op_backends(CUDA, "torch") == {op: ("torch", "requested") for op in OPS}
    assert env.op_backends(CUDA, "triton") == {op: ("triton", "requested") for op in OPS}
    cpu = env.op_backends(CPU)
    assert set(cpu) == set(OPS)
    for op, (chosen, why) in cpu.items():
        assert chosen == "torch" and why.startswith("auto: inputs on cpu"), (op, why)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for op, (chosen, why) in env.op_backends(CPU, "triton").items():
        assert chosen == "unavailable" and why.startswith(f"{op}: the triton backend cannot serve"), (op, why)


def test_env_report_names_each_ops_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    lines = env.environment_report().splitlines()
    assert any(line.startswith(f"backend     {backend.ENV_VAR}=torch,") for line in lines), lines
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    for op in OPS:
        assert rows[op] == ["torch", "requested"], (op, rows.get(op))
    monkeypatch.delenv(backend.ENV_VAR)
    lines = env.environment_report().splitlines()
    assert any(line.startswith(f"backend     {backend.ENV_VAR}=(unset: auto),") for line in lines), lines
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    for op in OPS:
        expected = ["triton", "auto:"] if torch.cuda.is_available() else ["torch", "auto:", "inputs", "on", "cpu:"]
        assert rows[op][:len(expected)] == expected, (op, rows[op])


def test_env_report_survives_an_unknown_backend_and_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt UNITER_FAST_BACKEND is what the report is run to find: it reports it for each op, not a traceback."""
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    report = env.environment_report()
    assert f"{backend.ENV_VAR}=cuda" in report and "torch " in report  # the versions are still there
    rows = {line.split()[0]: line for line in report.splitlines() if line.startswith("  ")}
    for op in OPS:
        assert f"environment variable {backend.ENV_VAR} is 'cuda'; expected one of" in rows[op], rows[op]
