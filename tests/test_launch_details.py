"""Details of kernels/launch.py's direct launch that the dry-run comparison does not reach: the exact integer and
alignment classes Triton compiles apart, the cache's bounds and bypasses (uncacheable arguments, hooks, grid
functions, kernels Triton hands back no compiled kernel for), and the dry driver itself.
Expected classes come from Triton's own signature rules: i32 for -2**31 .. 2**31 - 1, u64 from 2**63, i64 between,
divisibility by 16 for every specialised int, and 16-byte alignment of pointers."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs

from uniter_fast.kernels import launch

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.experimental.gluon  # noqa: F401  (imported while interpreting: it checks the mode at import)


@pytest.fixture
def jit_kernel(monkeypatch):
    """A JITFunction (not an interpreted one) made with TRITON_INTERPRET off, under DryRun's driver."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(launch.ENV_VAR, raising=False)

    @triton.jit(do_not_specialize=["seed"])
    def kernel(X, n, seed, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), n + seed)

    with launch.DryRun() as dry:
        yield kernel, dry


def _ran(dry, call) -> tuple:
    """(the kernel object, its args) of the one launch `call` makes."""
    before = {id(k): len(k.launches) for k in dry.kernels}
    call()
    new = [(k, args) for k in dry.kernels for _, args in k.launches[before.get(id(k), 0):]]
    assert len(new) == 1
    return new[0]


@pytest.mark.parametrize("x_offset, n, seed", [
    (0, 2**31, 3), (0, 2**31 - 16, 3),  # i64 against i32, both divisible by 16
    (0, 2**32 + 1, 3), (0, 2**32, 3),  # a wide int keeps its divisibility
    (0, 16, 2**63), (0, 16, 2**63 - 1),  # a do_not_specialize int: u64 against i64
    (2, 16, 3), (0, 16, 3),  # 8-byte against 16-byte aligned pointers
])
def test_direct_launch_runs_tritons_kernel_at_type_and_alignment_boundaries(jit_kernel, x_offset, n, seed):
    kernel, dry = jit_kernel
    base = torch.zeros(64)
    x = base[x_offset:]
    # fill the cache with the neighbouring class first, so a key too coarse would reuse its kernel
    for warm in ((base, 2**31 - 16, 2**63 - 1), (base, 2**32, 3), (base[2:], 16, 3), (base, 16, 2**62)):
        for _ in range(2):
            launch.launch(kernel, (1,), *warm, BLOCK=16)
    expected, _ = _ran(dry, lambda: kernel[(1,)](x, n, seed, BLOCK=16))
    for _ in range(2):  # the first call may go through Triton, the second is direct
        got, args = _ran(dry, lambda: launch.launch(kernel, (1,), x, n, seed, BLOCK=16))
        assert got is expected, f"ran {got.key}, Triton ran {expected.key}"
        assert args[1:3] == (n, seed)


def test_feature_int_classes_match_triton_types():
    f, S, F = launch._feature, launch.SPECIALISED, launch.FREE
    assert f(2**31, S) != f(2**31 - 16, S) and f(2**31, F) != f(2**31 - 1, F)  # i64 from 2**31
    assert f(2**63, F) != f(2**63 - 1, F) and f(2**63, S) != f(2**63 - 16, S)  # u64 from 2**63
    assert f(2**32, S) != f(2**32 + 1, S)  # divisibility of a wide int
    x = torch.zeros(8)
    assert f(x[2:], S) != f(x, S)  # 8 bytes off a 16-byte boundary


class _Fake:
    """A kernel stand-in for _Direct: params like a JITFunction's; fn[grid](...) records the call and hands back
    `compiled` (a DryKernel, or None as Triton's warmup-less paths may)."""

    def __init__(self, *params, compiled="dry"):
        self.params = [SimpleNamespace(name=name, is_constexpr=name.isupper(), do_not_specialize=False,
                                       has_default=default is not None, default=default) for name, default in params]
        self.compiled = launch.DryKernel("fake", "k") if compiled == "dry" else compiled
        self.calls = []

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.calls.append((args, kwargs))
            return self.compiled
        return call


@pytest.fixture
def dry_driver():
    with launch.DryRun():
        yield


def test_uncacheable_first_argument_always_takes_tritons_path(dry_driver):
    fake = _Fake(("x", None), ("n", None))
    direct = launch._Direct(fake)
    for _ in range(3):
        direct((1,), (object(), 4), {})
    assert len(fake.calls) == 3 and not direct.entries and not fake.compiled.launches


def test_unhashable_keyword_still_launches(dry_driver):
    fake = _Fake(("x", None), ("BLOCK", None))
    direct = launch._Direct(fake)
    direct((1,), (4,), {"BLOCK": [16]})
    assert len(fake.calls) == 1


def test_kernel_without_compiled_result_is_not_cached(dry_driver):
    fake = _Fake(("x", None), compiled=None)
    direct = launch._Direct(fake)
    for _ in range(2):
        direct((1,), (4,), {})
    assert len(fake.calls) == 2 and not direct.entries


def test_direct_launch_passes_parameter_defaults_after_the_keywords(dry_driver):
    fake = _Fake(("x", None), ("BLOCK", None), ("EXTRA", 7))
    direct = launch._Direct(fake)
    for _ in range(2):
        direct((3,), (5,), {"BLOCK": 16})
    assert len(fake.calls) == 1  # the second call is direct
    assert fake.compiled.launches == [((3, 1, 1), (5, 16, 7))]


def test_cache_is_cleared_when_full(dry_driver, monkeypatch):
    monkeypatch.setattr(launch, "MAX_ENTRIES", 2)
    fake = _Fake(("x", None), ("BLOCK", None))
    direct = launch._Direct(fake)
    for block in (16, 32, 64):
        direct((1,), (4,), {"BLOCK": block})
        assert len(direct.entries) <= 2
    assert len(direct.entries) == 1  # cleared, then the new key


def test_stale_entry_of_a_reused_id_is_replaced():
    stand_in = _Fake(("x", None))
    launch._direct[id(stand_in)] = (object(), "stale")  # another object's entry under the same id
    try:
        assert launch._direct_for(stand_in) is None  # a stand-in: Triton's path, not the stale entry
    finally:
        launch.clear()


def test_hooks_send_calls_through_triton(monkeypatch):
    plain = SimpleNamespace(pre_run_hooks=[])
    assert not launch._hooked(plain)
    assert launch._hooked(SimpleNamespace(pre_run_hooks=[print]))
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", print)  # a plain callable, no HookChain
    assert launch._hooked(plain)
    monkeypatch.undo()
    monkeypatch.setattr(knobs.runtime, "add_stages_inspection_hook", print)
    assert launch._hooked(plain)


def test_grid_function_takes_tritons_path(jit_kernel):
    kernel, dry = jit_kernel
    x = torch.zeros(16)
    for _ in range(2):
        got, _ = _ran(dry, lambda: launch.launch(kernel, lambda meta: (2,), x, 16, 3, BLOCK=16))
    assert got.launches[-1][0] == (2, 1, 1)


def test_dry_driver_is_an_sm90():
    with launch.DryRun():
        target = triton.runtime.driver.active.get_current_target()
    assert (target.backend, target.arch, target.warp_size) == ("cuda", 90, 32)


# ---------------------------------------------------------------- the OT launchers' rules and checks (docstrings)

from uniter_fast.kernels import attention_triton as att  # noqa: E402
from uniter_fast.kernels import ot_triton as ot  # noqa: E402


def test_ot_unsupported_checks_every_tensor_and_names_the_dtype():
    x = torch.zeros(2)
    reason = ot.unsupported((x, x.double()), 4, 4)
    assert reason is not None and "torch.float64" in reason
    assert "3 x 20000" in ot.unsupported((x,), 3, 20000)  # 4 * 32768 elements


def test_ot_rule_for_vectors_follows_its_documented_launch():
    # tl.dot needs 16 on a side; fp32 products from the 64 x 128 tile: 8 warps, 16 dims, 16 lanes
    assert ot._config(1, 3, 3, 64)["BLOCK_M"] == 16 and ot._config(1, 3, 3, 64)["BLOCK_N"] == 16
    wide = ot._config(1, 64, 128, 64, 4)
    assert (wide["num_warps"], wide["BLOCK_D"], wide["COL_LANES"]) == (8, 16, 16)
    for narrow in (ot._config(1, 64, 64, 64, 4), ot._config(1, 64, 128, 64, 2)):
        assert (narrow["num_warps"], narrow["BLOCK_D"], narrow["COL_LANES"]) == (4, 32, 32)


def test_ot_rule_for_a_cost_sizes_warps_by_batch_per_sm():
    # on the CPU one "SM": a 64 x 64 tile (one problem a program) takes 32 elements a thread at batch 1
    # (4 warps, 32 lanes), 64 up to batch 4 (2 warps, 16 lanes), 128 beyond (1 warp)
    got = [(c["PROBS"], c["num_warps"], c["COL_LANES"]) for c in (ot._config(b, 64, 64, None) for b in (1, 4, 5))]
    assert got == [(1, 4, 32), (1, 2, 16), (1, 1, 16)]


def test_ot_lanes_fit_the_half_tile_when_shrinking():
    assert ot._lanes(32, 32, True) == 16 and ot._lanes(32, 32, False) == 32


@pytest.mark.parametrize("value, ok", [(24, True), (255, True), (23, False), (256, False), (True, False)])
def test_maxnreg_range_is_sm90s(value, ok):
    check = lambda: ot._check_maxnreg({"maxnreg": value}, {"maxnreg": value})  # noqa: E731
    if ok:
        check()
    else:
        with pytest.raises(ValueError, match="maxnreg"):
            check()


@pytest.mark.parametrize("m, n, dim, tune, match", [
    (8, 8, None, {"COL_LANES": 16}, "COL_LANES"),  # 8 columns only
    (64, 16, 64, {"SHRINK": True}, "SHRINK"),  # half of 16 columns is under tl.dot's 16
    (64, 16, 64, {"SHRINK": True, "COL_LANES": 4}, "SHRINK"),  # narrow lanes: still 8 columns, under 16
    (16, 64, 64, {"SHRINK": True, "COL_LANES": 4}, "SHRINK"),  # 8 rows in the half tile, under 16
    (16, 16, 64, {"PROBS": 2}, "PROBS=1"),  # from vectors: one problem a program
    (16, 16, None, {"DOT_PRECISION": "bf16"}, "DOT_PRECISION"),
])
def test_tuned_refuses_launches_the_kernels_cannot_run(m, n, dim, tune, match):
    with pytest.raises(ValueError, match=match):
        ot._tuned(ot._config(1, m, n, dim), tune, dim)


def test_cosine_backward_rule_splits_dims_until_four_programs_per_sm(monkeypatch):
    rule, _ = ot.backward_launch(1, 8, 8, 768, torch.float32)  # 768 / 32 dims = 24 chunks, batch 1: 4 programs
    assert (rule["SPLITS"], rule["num_stages"]) == (4, 1)
    assert ot.backward_launch(1, 8, 8, 32, torch.float32)[0]["SPLITS"] == 1  # one chunk: nothing to split
    monkeypatch.setattr(ot, "interpreting", lambda: False)  # on a GPU: bf16 operands, 64 dims a step
    rule, _ = ot.backward_launch(1024, 60, 100, 768, torch.bfloat16)
    assert rule["LOW_OPERANDS"] and rule["BLOCK_D"] == 64


@pytest.mark.parametrize("tune, match", [({"BLOCK_X": 1}, "not"), ({"SPLITS": 0}, "SPLITS"),
                                         ({"LOW_OPERANDS": 1}, "LOW_OPERANDS must be True or False"),
                                         ({"LOW_OPERANDS": True}, "GPU"),
                                         ({"DOT_PRECISION": "tf32x3"}, "tf32x3")])
def test_cosine_backward_tune_checks(tune, match):
    rule, _ = ot.backward_launch(2, 8, 8, 64, torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        ot._tuned_backward(rule, tune, torch.bfloat16)


@pytest.mark.parametrize("stats", [torch.zeros(2, 4, 2).transpose(1, 2), torch.zeros(2, 2, 5),
                                   torch.zeros(2, 2, 4, dtype=torch.float64)])
def test_check_stats_refuses_other_layouts(stats):
    with pytest.raises(ValueError, match="grad_stats buffer"):
        ot._check_stats(stats, 2, 1, 3)


# ---------------------------------------------------------------- the attention launchers' rules and checks


def test_attention_serves_head_dims_up_to_128_with_power_of_two_blocks():
    assert att.unsupported(torch.zeros(1, 1, 128)) is None and att.unsupported(torch.zeros(1, 1, 129))
    assert "torch.float64" in att.unsupported(torch.zeros(1, 1, 8, dtype=torch.float64))
    assert [att._block_d(d) for d in (1, 40, 64, 100)] == [16, 64, 64, 128]
    assert [att._block(n) for n in (1, 17, 64, 160)] == [16, 32, 64, 64]


def test_attention_launch_rules_follow_their_docstrings(monkeypatch):
    assert att.forward_launch(160, 64) == att.Launch(64, 32, 4, 3)  # key blocks of 32, 3 stages up to d=64
    assert att.forward_launch(160, 65) == att.Launch(64, 64)
    assert att.backward_launch(160, 64) == att.Launch(64, 64, 4, 1)
    assert att.Launch(16, 16, 2, 3).kwargs() == {"num_warps": 2, "num_stages": 3}
    assert att._fma_launch(160, torch.float32) is None  # under the interpreter: nothing to change
    monkeypatch.setattr(att, "interpreting", lambda: False)
    assert att.forward_launch(160, 64, torch.float32) == att.Launch(32, 32, num_warps=8)


def test_dropout_threshold_rounds_and_rescales_by_the_true_rate():
    threshold, scale = att._dropout_args(0.1)  # 0.1 * 65536 = 6553.6
    assert threshold == 6554 and scale == pytest.approx(65536 / (65536 - 6554), rel=1e-12)
    assert att._flags(torch.float16, 0.0)["DROPOUT"] is False


def test_row_offset_check_counts_the_block_past_the_longest_sample():
    att._check_row_offsets(2**31 // 768 - 64 - 1, 768)
    with pytest.raises(ValueError, match=f"at most {2**31 // 768 - 64} rows"):
        att._check_row_offsets(2**31 // 768 - 60, 768)


@pytest.mark.parametrize("seed", [torch.zeros(2, dtype=torch.int64), True, 2**63])
def test_dropout_seed_must_be_one_int64(seed):
    cu = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="seed"):
        att._seed_pointer(seed, 0.1, cu)
    assert att._seed_pointer(seed, 0.0, cu) is cu  # no dropout: never read


@pytest.fixture
def recorded(monkeypatch):
    """The attention launchers' launches, recorded instead of run: (kernel, grid, keywords)."""
    calls = []
    monkeypatch.setattr(att, "launch_kernel", lambda fn, grid, *args, **kwargs: calls.append((fn, grid, kwargs)))
    return calls


def _qkv(total=64, heads=2, dim=16):
    cu = torch.tensor([0, total], dtype=torch.int32)
    return [torch.zeros(total, heads, dim) for _ in range(4)], cu


def test_forward_grid_counts_query_blocks(recorded):
    (q, k, v, _), cu = _qkv()
    att.forward(q, k, v, cu, 64, 0.25, 0.0, None, launch=att.Launch(16, 64))
    (fn, grid, kwargs), = recorded
    assert fn is att._fwd_kernel and grid == (4, 1, 2) and (kwargs["BLOCK_M"], kwargs["BLOCK_N"]) == (16, 64)


def test_backward_fused_delta_is_one_launch_and_needs_a_square_tile(recorded):
    (q, k, v, g), cu = _qkv()
    lse = torch.zeros(64, 2)
    att.backward(g, q, k, v, q, lse, cu, 64, 0.25, 0.0, None, launch=att.Launch(16, 16, fused_delta=True))
    assert [(fn, kw["FUSED_DELTA"]) for fn, _, kw in recorded] == [(att._bwd_kernel, True)]
    recorded.clear()
    att.backward(g, q, k, v, q, lse, cu, 64, 0.25, 0.0, None, launch=att.Launch(32, 32))
    assert [fn for fn, _, _ in recorded] == [att._delta_kernel, att._bwd_kernel]
    with pytest.raises(AssertionError, match="one key block and one query block"):
        att.backward(g, q, k, v, q, lse, cu, 64, 0.25, 0.0, None, launch=att.Launch(16, 32))


@pytest.fixture
def nan_empty(monkeypatch):
    """Fresh float buffers hold NaN: torch.empty and empty_like promise no contents, so launchers must not rely
    on the zeros a new allocation often happens to hold."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(real_empty_like(*a, **kw)))


def test_backward_refuses_inputs_of_different_layouts_even_with_matching_gradients(recorded):
    # the kernel stores dq, dk and dv with q's strides: k of its own layout would get its gradient misplaced
    (q, _, v, g), cu = _qkv()
    k = torch.zeros(64, 2, 32)[..., :16]  # rows 64 elements apart against q's 32, still unit-stride
    grads = (torch.zeros_like(q), torch.zeros(64, 2, 32)[..., :16], torch.zeros_like(v))  # each like its input
    with pytest.raises(ValueError, match="share one layout"):
        att.backward(g, q, k, v, q, torch.zeros(64, 2), cu, 64, 0.25, 0.0, None, grads=grads)
    assert not recorded


def test_backward_row_offset_check_counts_the_rows_of_out(recorded):
    # one row whose out has a row stride of 2**26: (1 + 64) * 2**26 > 2**31 even though q, k, v are narrow
    (q, k, v, g), cu = _qkv(total=1, heads=1)
    out = torch.zeros(16).as_strided((1, 1, 16), (2**26, 16, 1))
    with pytest.raises(ValueError, match="32-bit offsets"):
        att.backward(g, q, k, v, out, torch.zeros(1, 1), torch.tensor([0, 1], dtype=torch.int32), 1, 0.25, 0.0,
                     None)
    assert not recorded


@pytest.mark.parametrize("given", [False, True])
def test_backward_without_samples_gives_zero_gradients(recorded, nan_empty, given):
    # rows of no sample take no part in the loss: their gradient is 0 whatever the buffers held, with no launch
    (q, k, v, g), _ = _qkv(total=2)
    grads = tuple(torch.ones_like(t) for t in (q, k, v)) if given else None
    got = att.backward(g, q, k, v, q, torch.zeros(2, 2), torch.zeros(1, dtype=torch.int32), 4, 0.25, 0.0, None,
                       grads=grads)
    assert all(bool((t == 0).all()) and t.shape == q.shape for t in got) and not recorded


def test_dropout_seed_message_names_the_device():
    with pytest.raises(ValueError, match="one int64 on cpu, got torch.int32"):
        att._seed_pointer(torch.zeros(1, dtype=torch.int32), 0.1, torch.zeros(2, dtype=torch.int32))


# ---------------------------------------------------------------- the OT launchers' tunes


@pytest.fixture
def ot_recorded(monkeypatch):
    """The OT launchers' launches, recorded instead of run: (kernel, grid, keywords)."""
    calls = []
    monkeypatch.setattr(ot, "launch_kernel", lambda fn, grid, *args, **kwargs: calls.append((fn, grid, kwargs)))
    return calls


def test_tuned_dot_precision_reaches_both_ot_launches(ot_recorded):
    # fp32 vectors take "ieee" by rule (_dot_precision); a tune's DOT_PRECISION replaces it, forward and backward
    text, regions = ot.Rows(torch.zeros(2, 3, 48)), ot.Rows(torch.zeros(2, 4, 48))
    lens, tune = (torch.tensor([3, 2]), torch.tensor([4, 1])), {"DOT_PRECISION": "tf32"}
    ot.transport_vectors(text, regions, *lens, ot.Solve("ipot", 2.0, 3), tune=tune)
    ot.cosine_backward(text, regions, *lens, torch.zeros(2, 3, 4), ot.grad_stats(2, 3, 4, torch.device("cpu")),
                       torch.ones(2), tune=tune)
    (_, _, forward), (_, _, backward) = ot_recorded
    assert forward["DOT_PRECISION"] == "tf32" and backward["DOT_PRECISION"] == "tf32"
