"""What every benchmark script shares: per-call timing, CUDA graph capture, results.csv rows, ratio formatting.

Times are per call in microseconds: CUDA events around each call with the L2 cache flushed before it on a GPU
(GPU time; the host runs ahead), perf_counter on the CPU. Reps adapt to about TARGET_S per measurement.
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

CSV_FIELDS = ["date", "device", "torch", "triton", "bench", "case", "impl", "B", "dtype", "median_us", "speedup_vs",
              "notes"]
RESULTS_CSV = Path(__file__).resolve().parent / "results.csv"
MIN_REPS = 5
TARGET_S = 0.15  # time per measurement the reps adapt to
FLUSH_BYTES = 256 << 20  # larger than the H100's 50 MB L2


def add_csv_options(parser) -> None:
    """--csv PATH / --no-csv; resolve them after parsing with results_path(args)."""
    parser.add_argument("--csv", type=Path, default=None,
                        help="append rows here (default benchmarks/results.csv; not written with --cpu-smoke unless "
                             "given)")
    parser.add_argument("--no-csv", action="store_true", help="append nothing")


def results_path(args) -> Path | None:
    """Where rows go: --csv, else results.csv, except for --no-csv and CPU smoke runs (their times mean nothing)."""
    if args.no_csv or (getattr(args, "cpu_smoke", False) and args.csv is None):
        return None
    return args.csv or RESULTS_CSV


class Skip(Exception):
    """An implementation that cannot run here; the message says why."""


def median(times: list[float]) -> float:
    return statistics.median(times)


def quantile(times: list[float], tenths: int) -> float:
    """tenths: 2 -> p20, 8 -> p80."""
    return statistics.quantiles(times, n=10, method="inclusive")[tenths - 1] if len(times) > 1 else times[0]


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def cpu_label() -> str:
    """This machine's processor and the cores this process may use, for rows timed on the CPU."""
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {name}, {cores} cores"


def open_run(bench: str, args) -> "tuple[torch.device, Timer, CsvWriter | None]":
    """A GPU benchmark's device, timer and results file (args: cpu_smoke, reps, warmup, csv); prints the header's
    start. Without CUDA and without --cpu-smoke it says why and exits with status 2. UNITER_FAST_BACKEND is
    cleared: it would override the backend each implementation names."""
    os.environ.pop("UNITER_FAST_BACKEND", None)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print(f"{bench}: no CUDA device here; pass --cpu-smoke (with TRITON_INTERPRET=1) to check the code paths on "
              "the CPU.", file=sys.stderr)
        raise SystemExit(2)
    writer = CsvWriter(args.csv, bench, device) if args.csv is not None else None
    print(f"{bench}: {device_name(device)}, torch {torch.__version__}, triton {triton_version()}", end="; ")
    return device, Timer(device, args.reps, args.warmup), writer


def failure(err: Exception) -> str:
    """One line for a table: a peer that fails is reported and the others still run."""
    return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


class Timer:
    """Per-call times in us: CUDA events on a GPU (L2 flushed before each call), perf_counter on the CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        estimate = time.perf_counter() - start
        reps = max(MIN_REPS, min(self.reps, int(TARGET_S / max(estimate, 1e-9))))
        if not self.cuda:
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e6)
            return times
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            self.flush.zero_()
            begin.record()
            fn()
            end.record()
        self.sync()
        return [begin.elapsed_time(end) * 1e3 for begin, end in events]


def host_times(fn: Callable[[], object], reps: int, warmup: int, sync: Callable[[], None]) -> list[float]:
    """Per-call host time in us: each call starts on an idle GPU and is timed without waiting for the GPU, so the
    time is what the host spends issuing it (unless one call issues more launches than the GPU's queue holds,
    about a thousand)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    sync()
    return times


def cuda_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in one CUDA graph (warmed up on a side stream first); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def profile_calls(name: str, run: Callable[[], object], device: torch.device, kinds: dict | None = None,
                  steps: int = 3) -> None:
    """Where one call (or step) of `run` goes, under torch.profiler: its wall time against the sum of its kernels'
    time (a call far longer than its kernels waits on the host), the kernels' time by kind (kinds: name ->
    kernel-name fragments, first match wins), then the ops and kernels that take the most."""
    from torch.autograd import DeviceType

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    run()  # warm
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run()
        sync()
        wall_us = (time.perf_counter() - start) / steps * 1e6
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # kernels only: ops would count them again
    kernels_us = sum(e.self_device_time_total for e in kernels) / steps
    print(f"\n== profile of {name} ({steps} calls): wall {wall_us:.1f} us per call under the profiler, "
          f"kernels {kernels_us:.1f} us ({kernels_us / wall_us:.0%} of the wall)")
    for kind, (us, launches) in kernel_kinds(kernels, kinds or {}, steps).items():
        print(f"  {kind:<28}{us:>10.1f} us  {us / kernels_us:>5.0%}  {launches:>5} launches per call")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    if device.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=15))


def kernel_kinds(kernels, kinds: dict[str, tuple[str, ...]], steps: int) -> dict[str, tuple[float, int]]:
    """Kernel events (key, self_device_time_total, count) grouped by kind: the first kind with a fragment in the
    kernel's name (lower case), else "other"; each kind's (us, launches) per call, the costliest first."""
    totals: dict[str, list] = {}
    for e in kernels:
        kind = next((k for k, frags in kinds.items() if any(f in e.key.lower() for f in frags)), "other")
        total = totals.setdefault(kind, [0.0, 0])
        total[0] += e.self_device_time_total / steps
        total[1] += e.count // steps
    return {kind: (us, launches) for kind, (us, launches) in sorted(totals.items(), key=lambda kv: -kv[1][0])}


def in_grad_mode(enabled: bool, run: Callable[[], object]) -> Callable[[], object]:
    """run, called with autograd on or off (as it was timed), wherever it is called later."""
    def call():
        with torch.set_grad_enabled(enabled):
            return run()
    return call


def run_profiles(profiles: list, device: torch.device, kinds: dict | None = None) -> None:
    """profile_calls for each (name, run) of `profiles`, after a script's timings (a profiler run may leave the
    CUDA tracing machinery loaded, which slows later calls); one that fails says why and the others still run."""
    for name, run in profiles:
        try:
            profile_calls(name, run, device, kinds)
        except Exception as err:  # a profile that fails is reported, the others still run
            print(f"\n== profile of {name}: {failure(err)}")


class CsvWriter:
    """Appends rows to results.csv, keeping the columns of a file that already has a header."""

    def __init__(self, path: Path, bench: str, device: torch.device, device_label: str | None = None):
        self.path = path
        self.common = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                           device=device_label or device_name(device), torch=torch.__version__,
                           triton=triton_version(), bench=bench)
        fields = None
        if path.exists() and path.stat().st_size:
            with path.open(newline="") as f:
                fields = next(csv.reader(f), None)
        self.fields = fields or CSV_FIELDS
        self.new = fields is None
        self.count = 0

    def write(self, row: dict) -> None:
        row = {**self.common, **row}
        extra = {k: v for k, v in row.items() if k not in self.fields and v != ""}
        if extra and "notes" in self.fields:  # a file with other columns: keep what does not fit in its notes
            row["notes"] = " ".join([row.get("notes", "")] + [f"{k}={v}" for k, v in extra.items()
                                                              if k != "notes"]).strip()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if self.new:
                writer.writeheader()
                self.new = False
            writer.writerow(row)
        self.count += 1


def against_ours(rows):
    """rows: (impl, times or None, ...) with ours first. Yields (row, median or None when untimed, the speed-up of
    ours over that row as printed ("" on ours' own), results.csv's speedup_vs ("" except on ours' row))."""
    ours_median = median(rows[0][1]) if rows and rows[0][1] else None
    for i, row in enumerate(rows):
        if not row[1]:
            yield row, None, "", ""
            continue
        m = median(row[1])
        speedup = ratio(m / ours_median) if ours_median and i else ""
        yield row, m, speedup, speedup_vs([(r[0], r[1]) for r in rows[1:]], m) if i == 0 else ""


def speedup_vs(peers, ours_median_us: float) -> str:
    """results.csv's speedup_vs: peer=ratio of each timed peer's median to ours. peers: (name, times or None)."""
    return ";".join(f"{name}={median(times) / ours_median_us:.2f}" for name, times in peers if times)


def fraction(x: float) -> str:
    return f"{x:.1%}" if x >= 0.001 else f"{x:.0e}"


def ratio(x: float) -> str:
    return f"{x:.1f}x" if x >= 1 else f"{x:.2g}x"
