"""Launch compiled Triton kernels without JITFunction.run's per-call binding (host time).

`fn[grid](*args, **kwargs)` binds and specialises every argument, builds a cache key from them and looks the
compiled kernel up on every call: 24 us of host time on this project's 2-core CPU for the attention forward
(Triton 3.6, 21 arguments; `benchmarks/bench_host.py`). `launch(fn, grid, *args, **kwargs)` keeps a cache per
kernel keyed by what Triton specialises on, or finer: for each positional int, whether it is 1, whether 16
divides it and its 32/64-bit type (a do_not_specialize int: its type alone); each bool's value; each tensor's
dtype and address mod 16; each float's type; the device; every keyword argument (constexprs and launch options)
by value. So one entry never serves calls Triton would compile apart. A key's first call goes through Triton,
which compiles or finds the kernel and launches it; later calls hand that kernel's launcher the call's own
positional arguments, as Triton would.

Triton's own path serves every call this cannot vouch for: the interpreter, launch and stages-inspection hooks
(profilers), pre-run hooks, a grid function, a runtime argument by keyword, arguments of other types, and
UNITER_FAST_DIRECT_LAUNCH=0. Unlike Triton's path, a cached entry does not re-check the kernel's global
constants (ours never change) or Triton's debug, instrumentation and fpsan knobs: after changing those,
`clear()` drops the entries.

`DryRun` runs Triton's host path without a GPU: its driver answers for a device of its own, an sm_90, and
compiling gives a `DryKernel` that records its launches. Tests check the direct path against Triton's with it;
benchmarks/bench_host.py times both.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

ENV_VAR = "UNITER_FAST_DIRECT_LAUNCH"
MAX_ENTRIES = 1024  # per kernel: a key per launch rule and alignment seen; cleared when full

_UNCACHEABLE = object()  # an argument whose type this does not key: Triton's path serves the call
SPECIALISED, FREE, CONSTEXPR = 0, 1, 2  # a parameter's kind: plain, do_not_specialize, tl.constexpr


def _feature(arg, kind_of_param: int):
    """What Triton specialises on in one positional argument, or finer."""
    if kind_of_param == CONSTEXPR:
        return arg  # its value is compiled in
    kind = type(arg)
    if kind is int:
        # Triton: == 1 and divisibility by 16 unless do_not_specialize; the type (i32, i64, u64) by range in any
        # case. Not the value: a token count that changes every batch must not miss every time. One small int
        # per class (cheaper to make and hash than a tuple); a position's kind is fixed, so codes never mix.
        if -2**31 <= arg < 2**31:
            if kind_of_param == FREE:
                return 0
            return 1 if arg == 1 else 2 if arg % 16 == 0 else 3
        wide = 4 if arg < 2**63 else 6
        return wide if kind_of_param == FREE else wide + 8 + (arg % 16 == 0)
    if kind is float:
        return float  # passed as fp32, never specialised
    if kind is bool:
        return bool, arg  # not 1 or 0: Triton types a bool u1
    if arg is None:
        return None
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() & 15
    return _UNCACHEABLE


class _Direct:
    """One kernel's cache: key -> (compiled kernel, its launcher, function and packed metadata, the arguments after
    the positional ones in the kernel's parameter order: constexprs and defaults, which the key fixes)."""

    def __init__(self, fn):
        self.fn = fn
        self.params = fn.params
        self.kinds = tuple(CONSTEXPR if p.is_constexpr else FREE if p.do_not_specialize else SPECIALISED
                           for p in fn.params)
        # runtime parameters: passed by keyword, their values are not in the key, so Triton's path serves the call
        self.runtime_names = frozenset(p.name for p in fn.params if not p.is_constexpr)
        self.entries: dict = {}

    def __call__(self, grid, args: tuple, kwargs: dict):
        if not self.runtime_names.isdisjoint(kwargs):
            self.fn[grid](*args, **kwargs)
            return
        active = driver.active
        device = active.get_current_device()
        key = (device, *kwargs.items(), *map(_feature, args, self.kinds))  # keywords: constexprs and options
        try:
            entry = self.entries.get(key)
        except TypeError:  # an unhashable keyword value
            self.fn[grid](*args, **kwargs)
            return
        if entry is None:
            self._first(grid, args, kwargs, key)
            return
        _, run, function, metadata, tail = entry
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        run(grid[0], g1, g2, active.get_current_stream(device), function, metadata, None, None, None, *args, *tail)

    def _first(self, grid, args: tuple, kwargs: dict, key: tuple) -> None:
        compiled = self.fn[grid](*args, **kwargs)
        tail = self._tail(len(args), kwargs)
        if compiled is None or tail is None or _UNCACHEABLE in key[len(kwargs) + 1:]:
            return  # Triton's path serves every such call
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.clear()
        # the compiled kernel is kept: Triton 3.9 unloads its module when it is collected
        self.entries[key] = (compiled, compiled.run, compiled.function, compiled.packed_metadata, tail)

    def _tail(self, positional: int, kwargs: dict) -> tuple | None:
        values = []
        for p in self.params[positional:]:
            if p.name in kwargs:
                values.append(kwargs[p.name])
            elif p.has_default:
                values.append(p.default)
            else:
                return None
        return tuple(values)


_direct: dict = {}  # id(fn) -> (fn, its _Direct or None where Triton's path serves every call)
# (by id: a JITFunction hashes its source's cache key, 2 us a call)


def _direct_for(fn) -> _Direct | None:
    entry = _direct.get(id(fn))
    if entry is None or entry[0] is not fn:
        # a JITFunction: not an InterpretedFunction, nor a test's stand-in
        on = os.environ.get(ENV_VAR, "1") != "0" and type(fn) is JITFunction
        entry = _direct[id(fn)] = (fn, _Direct(fn) if on else None)
    return entry[1]


def _hooked(fn) -> bool:
    """Launch hooks (Triton 3.6: HookChains, empty unless a profiler attached), pre-run hooks, or Triton 3.9's
    stages inspection hook (part of its cache key)."""
    runtime = knobs.runtime
    hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    return (bool(getattr(fn, "pre_run_hooks", None)) or any(h is not None and getattr(h, "calls", True) for h in hooks)
            or getattr(runtime, "add_stages_inspection_hook", None) is not None)


def launch(fn, grid, *args, **kwargs) -> None:
    """fn[grid](*args, **kwargs), through the compiled kernel itself where that is safe (the module's doc)."""
    direct = _direct_for(fn)
    if direct is None or callable(grid) or _hooked(fn):
        fn[grid](*args, **kwargs)
    else:
        direct(grid, args, kwargs)


def clear() -> None:
    """Drop every cached entry (and each kernel's on/off decision: UNITER_FAST_DIRECT_LAUNCH is read again)."""
    _direct.clear()


# ----------------------------------------------------------------------------------------------------------
# dry runs: Triton's host path without a GPU
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DryKernel:
    """Stands for one compiled specialisation; `launches` records (grid, args) of each launch."""

    name: str
    key: str
    launches: list = field(default_factory=list)
    function = None
    packed_metadata = None

    def launch_metadata(self, *args):
        return None

    @property
    def run(self):
        return self._run

    def _run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, exit, *args):
        self.launches.append(((g0, g1, g2), args))
        for hook in (enter, exit):  # as Triton's launcher calls them
            if hook is not None:
                hook(launch_metadata)


DRY_DEVICE = "dry"  # the dry driver's device: its cache entries never meet a GPU's


class _DryDriver:
    def get_current_device(self):
        return DRY_DEVICE

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


class DryRun:
    """with DryRun() as dry: ... -- Triton launches through a driver with no GPU; `dry.kernels` lists the
    DryKernel of each specialisation compiled (nothing is compiled). Kernels must be JITFunctions: import them
    without TRITON_INTERPRET=1."""

    def __enter__(self):
        self.kernels: list[DryKernel] = []
        self._touched: set = set()
        self._saved = (driver._active, JITFunction._do_compile)
        driver.set_active(_DryDriver())

        def dry_compile(fn, key, signature, device, constexprs, options, attrs, warmup):
            kernel = DryKernel(fn.fn.__name__, str(key))
            fn.device_caches[device][0][key] = kernel
            self.kernels.append(kernel)
            self._touched.add(fn)
            return kernel

        JITFunction._do_compile = dry_compile
        clear()
        return self

    def __exit__(self, *exc):
        driver._active, JITFunction._do_compile = self._saved
        for fn in self._touched:  # no dry kernel stays behind
            fn.device_caches.pop(DRY_DEVICE, None)
        clear()
        return False
