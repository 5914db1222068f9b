#!/usr/bin/env python
"""The pre-training batch on the host: make_task_batch per task, from a region store at UNITER's sizes.

Unless prefetch_batches makes them ahead, the training loop builds each batch on the training thread before the
step that uses it (uniter_fast/train/loop.py), so on a GPU this time comes on top of the step's unless the GPU is
still busy with the previous one. Per task:
the whole collate (masking, the store's gather, pack_batch, targets) and, inside the same calls, the time its
two largest parts took: the store's gather and pack_batch. Then the hand-over: the training loop's batch stream
(uniter_fast/train/batches.py, the original's task mix) consumed by a stand-in step of --step-ms, made when asked
for and 2 ahead on a thread: what each batch costs the loop beyond the step. The step either waits (sleeps: a
host blocked on the GPU, the GIL free) or is busy in Python (a host launching kernels all along, the GIL held,
so the thread's Python parts take turns with it).

Data: a store written here of `--images` images with 10..100 regions (2048-d fp16 features, boxes, 1601 soft
labels), and captions of 8..60 random word ids, the lengths of anchors.md. Batches come from the original's
TokenBucketSampler at its UNITER-base size (10240 tokens); the first pass over the batches (every record's checksum
verified once, the buffer pool filled) is not timed.

    python benchmarks/bench_collate.py            # about a minute on 2 cores, ~1 GB in /tmp
    python benchmarks/bench_collate.py --quick
Rows go to benchmarks/results.csv with bench_ot.py's columns (samples/s and real tokens/s in notes).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import CsvWriter, add_csv_options, cpu_label, median, quantile, results_path

from uniter_fast.data import RegionStore, RegionStoreWriter
from uniter_fast.data import pretrain
from uniter_fast.data.pretrain import PretrainCorpus, Vocab, make_task_batch
from uniter_fast.data.region_store import INDEX_NAME
from uniter_fast.data.sampler import TokenBucketSampler
from uniter_fast.train.batches import TaskStreams, training_batches
from uniter_fast.train.config import PretrainConfig
from uniter_fast.train.tasks import TaskSampler

TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")
VOCAB = Vocab(cls_id=101, sep_id=102, mask_id=103, vocab_range=(999, 28996))  # BERT-base uncased's ids
WORDS, REGIONS = (8, 60), (10, 100)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 images and 10 batches a task: indicative only")
    parser.add_argument("--images", type=int, default=None, help="images in the store (default 1024, quick 256)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per task (default 40, quick 10)")
    parser.add_argument("--batch-tokens", type=int, default=10240, help="the sampler's padded tokens per batch")
    parser.add_argument("--threads", type=int, default=2, help="the store's copy threads")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--step-ms", type=float, default=20.0, help="the stand-in step's sleep (hand-over block)")
    parser.add_argument("--prefetch", type=int, nargs="+", default=[0, 2], help="batches made ahead (hand-over block)")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the store here (reused if present)")
    add_csv_options(parser)
    args = parser.parse_args(argv)
    args.images = args.images or (256 if args.quick else 1024)
    args.batches = args.batches or (10 if args.quick else 40)
    return args


def write_store(path: Path, images: int, rng: np.random.Generator) -> None:
    with RegionStoreWriter(path) as writer:
        for i in range(images):
            n = int(rng.integers(REGIONS[0], REGIONS[1] + 1))
            writer.add(f"img{i}", rng.standard_normal((n, 2048)).astype(np.float16),
                       rng.random((n, 6)).astype(np.float32), rng.random(n).astype(np.float32),
                       rng.dirichlet(np.ones(1601), n).astype(np.float16))


def make_corpus(store: RegionStore, images: int, rng: np.random.Generator) -> PretrainCorpus:
    captions = 5 * images  # COCO's five captions an image
    texts = [rng.integers(*VOCAB.vocab_range, int(rng.integers(WORDS[0], WORDS[1] + 1))) for _ in range(captions)]
    return PretrainCorpus(texts, [f"img{i % images}" for i in range(captions)], store, VOCAB)


class Stopwatch:
    """fn, recording how long each call took (ms)."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.times.append((time.perf_counter() - start) * 1e3)


def timed_collate(corpus: PretrainCorpus, store: RegionStore, task: str, plan: list) -> dict[str, list[float]]:
    """Per batch of the plan: the collate's time, and its gather's and pack_batch's inside it."""
    collate, gather, pack = Stopwatch(make_task_batch), Stopwatch(store.gather), Stopwatch(pretrain.pack_batch)
    store.gather, pretrain.pack_batch = gather, pack
    try:
        for ids, rng in plan:
            collate(corpus, task, ids, rng)
    finally:
        del store.gather  # the method again
        pretrain.pack_batch = pack.fn
    return {"collate": collate.times, "gather": gather.times, "pack_batch": pack.times}


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the collate's tensors are small; a second OpenMP thread waits for a busy core here
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process (a test)


def run(args: argparse.Namespace) -> None:
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="bench_collate_"))
    path = root / f"store-{args.images}"
    rng = np.random.default_rng(0)
    if not (path / INDEX_NAME).exists():  # written last, on close: a store whose writing stopped has none
        shutil.rmtree(path, ignore_errors=True)
        write_store(path, args.images, rng)
    store = RegionStore(path, threads=args.threads)
    corpus = make_corpus(store, args.images, rng)
    sampler = iter(TokenBucketSampler(corpus.lens, batch_tokens=args.batch_tokens, seed=0))
    label = cpu_label()
    csv_path = results_path(args)
    writer = CsvWriter(csv_path, "bench_collate", torch.device("cpu"), label) if csv_path else None
    print(f"bench_collate: {label}, torch {torch.__version__}; {args.images} images, {args.batches} batches of "
          f"{args.batch_tokens} padded tokens a task, {args.threads} copy threads (ms per batch: median, p20-p80)")
    print(f"{'task':<7}{'collate':>18}{'gather':>16}{'pack_batch':>16}{'samples':>9}{'samples/s':>11}"
          f"{'real tokens/s':>15}")
    for task in args.tasks:
        plan = [(list(next(sampler)), np.random.default_rng([1, i])) for i in range(args.batches)]
        made = [make_task_batch(corpus, task, ids, rng) for ids, rng in plan]  # untimed: checksums, buffer pool
        tokens = sum(b.inputs.total_tokens for b in made) / len(made)
        del made  # its buffers back to the store's pool before the timed pass
        plan = [(ids, np.random.default_rng([2, i])) for i, (ids, _) in enumerate(plan)]
        times = timed_collate(corpus, store, task, plan)
        collate, gather, pack = times["collate"], times["gather"], times["pack_batch"]
        samples = sum(len(ids) for ids, _ in plan) / len(plan)
        ms = median(collate)
        print(f"{task:<7}{_cell(collate):>18}{_cell(gather):>16}{_cell(pack):>16}{samples:>9.0f}"
              f"{samples / ms * 1e3:>11.0f}{tokens / ms * 1e3:>15.0f}")
        if writer:
            writer.write(dict(case=task, impl="make_task_batch", B=round(samples), dtype="fp16",
                              median_us=f"{ms * 1e3:.1f}",
                              notes=f"samples/s={samples / ms * 1e3:.0f} real_tokens/s={tokens / ms * 1e3:.0f} "
                                    f"gather_us={median(gather) * 1e3:.1f} pack_batch_us={median(pack) * 1e3:.1f}"))
    handover(corpus, args, writer)
    if args.data_dir is None:
        shutil.rmtree(root, ignore_errors=True)


STEPS = {  # how the stand-in step spends its time
    "waiting": lambda seconds: time.sleep(seconds),  # the host blocked on the GPU (the GIL released)
    "busy": lambda seconds: _spin(seconds),  # the host in Python all along, launching kernels (the GIL held)
}


def handover(corpus: PretrainCorpus, args: argparse.Namespace, writer: CsvWriter | None) -> None:
    """What each batch costs the loop beyond a stand-in step: the wait for it, and the time the step loses to the
    thread making the next ones (the GIL), as (step's wall time - its length)."""
    cfg = PretrainConfig(train_batch_size=args.batch_tokens, num_train_steps=args.batches + 4)
    print(f"\nhand-over: the original's task mix, a {args.step_ms:.0f} ms stand-in step; ms each batch costs the loop "
          "beyond the step (median, p20-p80), the first 4 batches untimed")
    for kind, step in STEPS.items():
        for ahead in args.prefetch:
            sampler = TaskSampler(cfg.tasks, cfg.seed)
            batches = training_batches(TaskStreams(corpus, list(cfg.tasks), cfg, rank=0), sampler, cfg, ahead)
            costs = []
            for i in range(cfg.num_train_steps):
                start = time.perf_counter()
                batch = next(batches)
                step(args.step_ms / 1e3)
                del batch
                if i >= 4:
                    costs.append((time.perf_counter() - start) * 1e3 - args.step_ms)
            print(f"  {kind} step, {ahead} ahead: {_cell(costs)}")
            if writer:
                writer.write(dict(case=f"handover {kind} step={args.step_ms:g}ms", impl=f"prefetch={ahead}", B="",
                                  dtype="fp16", median_us=f"{median(costs) * 1e3:.1f}",
                                  notes="each batch's cost to the loop beyond the step"))


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _cell(times: list[float]) -> str:
    return f"{median(times):.1f} ({quantile(times, 2):.1f}-{quantile(times, 8):.1f})"


if __name__ == "__main__":
    main()
