#!/usr/bin/env python
"""Region-feature loading: the original UNITER loader, faithfully reimplemented, against our region store.

Same data, same machine, one run. For 36 and 100 regions per image, with and without soft labels, warm and
cold page cache, every loader goes through the same batches (batch 128, a fixed random permutation of the
images) and yields the same values (checked once per region count before timing).

Loaders:
- original_w0 / original_w2
      the original's image path (UNITER data/data.py) over an LMDB image DB written here with msgpack-numpy
      style values (the field dict of fp16 arrays, each array as {nd, type, kind, shape, data}; encoded and
      decoded by hand, as msgpack_numpy does): per sample an LMDB get (buffers=True) and a msgpack decode of
      every field; the feature path (`DetectFeatLmdb.__getitem__`) makes torch tensors of features and boxes
      and calls .float(), the soft-label path (`get_dump`, used by MRC) converts every fp16 field to fp32 in
      numpy; w*h is appended with torch.cat; the collate pads with `pad_tensors` in a Python loop. A torch
      DataLoader with 0 or 2 worker processes (fork). The LMDB environment is opened lazily in each process
      (the original opens it before the workers fork, which LMDB forbids).
- ours_t1 / ours_t2
      RegionStore.gather with 1 or 2 copy threads, verify="first", into reused buffers (out=), fp32 (what
      the original yields) and fp16 (what the model consumes); "ours_t2_newbuf" asks for new tensors every batch
      (no out=: they come from the store's recycled buffers); "ours_t2_always" checks every record's checksum
      on every read (verify="always").
Measures: samples/s and GB/s over whole epochs (from creating the iterator to its last batch: the worker
start-up the original pays every epoch is included; median/p20/p80 of the time each batch took to arrive).
GB/s counts the bytes each image delivers as stored in fp16:
n * (2048 * 2 + 6 * 2 [+ 1601 * 2 with soft labels]). "warm": the files are read into the page cache first
and in-process loaders run one untimed epoch; "cold": the files are evicted from the page cache with
os.posix_fadvise(POSIX_FADV_DONTNEED) after every mapping of them is closed, before each timed epoch.
Speed-up: each of our rows over the faster original loader of the same block. "cores": CPU seconds the loader
(with its workers) used per wall second; on a shared machine, how much of the 2 cores it actually got.
torch runs with one intra-op thread (--torch-threads): on a shared 2-core machine OpenMP's second thread
waits for a busy core and made the original's in-process loader 5-7x slower; one thread is its best case here
(DataLoader workers use one thread anyway; our reader does not use torch's threads).

    python benchmarks/bench_loader.py            # the full run (a few minutes on 2 cores, ~4.5 GB in /tmp)
    python benchmarks/bench_loader.py --quick    # 512 images, one epoch each: indicative only
Rows go to benchmarks/results.csv with bench_ot.py's columns (samples/s and GB/s in notes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import msgpack
import numpy as np
import torch
from harness import CsvWriter, add_csv_options, cpu_label, results_path
from torch.utils.data import DataLoader, Dataset

from uniter_fast.data import RegionStore, RegionStoreWriter

FEATURE_DIM, LABEL_DIM = 2048, 1601


# ----------------------------------------------------------------------------------------------------------
# the original's image DB: LMDB of msgpack-numpy values
# ----------------------------------------------------------------------------------------------------------


def encode_ndarray(obj):
    """msgpack `default` hook: an ndarray as msgpack_numpy writes it."""
    if isinstance(obj, np.ndarray):
        return {b"nd": True, b"type": obj.dtype.str, b"kind": b"", b"shape": obj.shape,
                b"data": obj.tobytes() if not obj.flags["C_CONTIGUOUS"] else obj.data}
    raise TypeError(f"cannot encode {type(obj)}")


def decode_ndarray(obj):
    """msgpack `object_hook`: the inverse (a read-only array over the decoded bytes, as msgpack_numpy gives)."""
    if b"nd" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"type"]), shape=obj[b"shape"])
    return obj


def _fp16_to_fp32(feat_dict):
    return {k: arr.astype(np.float32) if arr.dtype == np.float16 else arr for k, arr in feat_dict.items()}


class OriginalImageDb:
    """DetectFeatLmdb (uncompressed), with the environment opened lazily in each process."""

    def __init__(self, path: str, name2nbb: dict):
        self.path, self.name2nbb = path, name2nbb
        self._pid, self.env, self.txn = None, None, None

    def _open(self):
        if self._pid != os.getpid():
            self.env = lmdb.open(self.path, readonly=True, create=False, readahead=True)
            self.txn = self.env.begin(buffers=True)
            self._pid = os.getpid()

    def close(self):
        if self.env is not None and self._pid == os.getpid():
            self.txn.abort()
            self.env.close()
        self._pid, self.env, self.txn = None, None, None

    def get_dump(self, file_name):  # the MRC path: every field to fp32 in numpy
        self._open()
        dump = self.txn.get(file_name.encode("utf-8"))
        nbb = self.name2nbb[file_name]
        img_dump = msgpack.loads(dump, raw=False, object_hook=decode_ndarray)
        img_dump = _fp16_to_fp32(img_dump)
        return {k: arr[:nbb, ...] for k, arr in img_dump.items()}

    def __getitem__(self, file_name):  # the feature path
        self._open()
        dump = self.txn.get(file_name.encode("utf-8"))
        nbb = self.name2nbb[file_name]
        img_dump = msgpack.loads(dump, raw=False, object_hook=decode_ndarray)
        img_feat = torch.tensor(img_dump["features"][:nbb, :]).float()
        img_bb = torch.tensor(img_dump["norm_bb"][:nbb, :]).float()
        return img_feat, img_bb


class OriginalImageDataset(Dataset):
    """The image half of DetectFeatTxtTokDataset / MrcDataset: `_get_img_feat` per sample."""

    def __init__(self, db: OriginalImageDb, image_ids: list[str], soft_labels: bool):
        self.db, self.image_ids, self.soft_labels = db, image_ids, soft_labels

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, i):
        fname = self.image_ids[i]
        if not self.soft_labels:
            img_feat, bb = self.db[fname]
            img_bb = torch.cat([bb, bb[:, 4:5] * bb[:, 5:]], dim=-1)
            return img_feat, img_bb, None
        img_dump = self.db.get_dump(fname)
        img_feat = torch.tensor(img_dump["features"])
        bb = torch.tensor(img_dump["norm_bb"])
        img_bb = torch.cat([bb, bb[:, 4:5] * bb[:, 5:]], dim=-1)
        img_soft_label = torch.tensor(img_dump["soft_labels"])
        return img_feat, img_bb, img_soft_label


def pad_tensors(tensors, lens=None, pad=0):
    """B x [T, ...] -> (B, max T, ...), the original's Python loop."""
    if lens is None:
        lens = [t.size(0) for t in tensors]
    max_len = max(lens)
    bs = len(tensors)
    hid = tensors[0].size(-1)
    dtype = tensors[0].dtype
    output = torch.zeros(bs, max_len, hid, dtype=dtype)
    if pad:
        output.data.fill_(pad)
    for i, (t, l) in enumerate(zip(tensors, lens)):
        output.data[i, :l, ...] = t.data
    return output


def original_collate(inputs):
    img_feats, img_pos_feats, img_soft_labels = map(list, zip(*inputs))
    num_bbs = [f.size(0) for f in img_feats]
    img_feat = pad_tensors(img_feats, num_bbs)
    img_pos_feat = pad_tensors(img_pos_feats, num_bbs)
    soft = pad_tensors(img_soft_labels, num_bbs) if img_soft_labels[0] is not None else None
    return img_feat, img_pos_feat, soft, num_bbs


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------


class Data:
    """One region count's data set in both formats."""

    def __init__(self, root: Path, regions: int, images: int):
        self.root, self.regions, self.images = root / f"regions{regions}_images{images}", regions, images
        self.lmdb_dir = self.root / "feat_th0.2_max100_min10"
        self.store_dir = self.root / "store"
        self.ids = [f"COCO_train2014_{i:012d}.jpg" for i in range(images)]
        self.name2nbb = {i: regions for i in self.ids}

    def build(self) -> float:
        if (self.root / "done").exists():
            return 0.0
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        start = time.perf_counter()
        n = self.regions
        rng = np.random.default_rng(n)
        pool = 8  # distinct random images, stamped with their index: generating 2048 x 1601 x 100 values is slow
        base = [dict(features=np.abs(rng.standard_normal((n, FEATURE_DIM))).astype(np.float16),
                     norm_bb=rng.random((n, 6)).astype(np.float16),
                     conf=np.sort(rng.random(n))[::-1].astype(np.float16),
                     soft_labels=rng.dirichlet(np.ones(LABEL_DIM), size=n).astype(np.float16)) for _ in range(pool)]
        record_bytes = sum(a.nbytes for a in base[0].values())
        env = lmdb.open(str(self.lmdb_dir), map_size=int(record_bytes * self.images * 1.5) + (64 << 20))
        with RegionStoreWriter(self.store_dir, feature_dim=FEATURE_DIM, label_dim=LABEL_DIM) as writer:
            txn = env.begin(write=True)
            for k, image_id in enumerate(self.ids):
                arrays = {name: a.copy() for name, a in base[k % pool].items()}
                arrays["features"][0, :4] = np.frombuffer(np.int64(k).tobytes(), np.float16)  # unique records
                txn.put(image_id.encode(), msgpack.dumps(arrays, default=encode_ndarray, use_bin_type=True))
                writer.add(image_id, **arrays)
                if k % 256 == 255:
                    txn.commit()
                    txn = env.begin(write=True)
            txn.put(b"__keys__", msgpack.dumps(self.ids, use_bin_type=True))
            txn.commit()
        env.close()
        (self.root / "nbb_th0.2_max100_min10.json").write_text(json.dumps(self.name2nbb))
        (self.root / "done").write_text("ok")
        return time.perf_counter() - start

    def files(self) -> list[Path]:
        return [p for d in (self.lmdb_dir, self.store_dir) for p in sorted(d.iterdir()) if p.is_file()]

    def bytes_per_sample(self, soft: bool) -> int:
        return self.regions * (FEATURE_DIM * 2 + 6 * 2 + (LABEL_DIM * 2 if soft else 0))


def read_into_cache(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------


def timed_epoch(make_iterator) -> tuple[float, list[float]]:
    """(seconds for the whole epoch, start-up included; the time each batch took to arrive)."""
    start = last = time.perf_counter()
    gaps = []
    for _ in make_iterator():
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return last - start, gaps


class Runner:
    def __init__(self, data: Data, batches: list[list[str]], soft: bool, cache: str, epochs: int):
        self.data, self.batches, self.soft, self.cache, self.epochs = data, batches, soft, cache, epochs
        self.index = {image_id: i for i, image_id in enumerate(data.ids)}

    def original(self, workers: int):
        db = OriginalImageDb(str(self.data.lmdb_dir), self.data.name2nbb)
        dataset = OriginalImageDataset(db, self.data.ids, self.soft)
        sampler = [[self.index[i] for i in b] for b in self.batches]

        def epoch():
            return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=original_collate,
                              multiprocessing_context="fork" if workers else None)
        try:
            return self._run(epoch, warm_untimed=workers == 0, before_cold=db.close)
        finally:
            db.close()

    def ours(self, threads: int, dtype: torch.dtype, reuse: bool = True, verify: str = "first"):
        state = {"out": None, "store": RegionStore(self.data.store_dir, threads=threads, verify=verify)}

        def epoch():
            store = state["store"]
            for ids in self.batches:
                if reuse:
                    state["out"] = store.gather(ids, dtype=dtype, soft_labels=self.soft, out=state["out"])
                    yield state["out"]
                else:
                    yield store.gather(ids, dtype=dtype, soft_labels=self.soft)

        def reopen():  # a cold start: nothing mapped, nothing verified yet
            state["store"].close()
            state["store"] = RegionStore(self.data.store_dir, threads=threads, verify=verify)
        try:
            return self._run(epoch, warm_untimed=True, before_cold=reopen)
        finally:
            state["store"].close()

    def _run(self, make_epoch, warm_untimed: bool, before_cold) -> dict:
        seconds, gaps, cpu = 0.0, [], 0.0
        if self.cache == "warm":
            if warm_untimed:
                timed_epoch(make_epoch)
            for _ in range(self.epochs):
                c = cpu_seconds()
                s, g = timed_epoch(make_epoch)
                seconds, gaps, cpu = seconds + s, gaps + g, cpu + cpu_seconds() - c
        else:
            for _ in range(self.epochs):
                before_cold()
                evict(self.data.files())
                c = cpu_seconds()
                s, g = timed_epoch(make_epoch)
                seconds, gaps, cpu = seconds + s, gaps + g, cpu + cpu_seconds() - c
        samples = sum(len(b) for b in self.batches) * self.epochs
        rate = samples / seconds
        q = statistics.quantiles(gaps, n=5) if len(gaps) >= 2 else [gaps[0]] * 4
        return dict(samples_s=rate, gb_s=rate * self.data.bytes_per_sample(self.soft) / 1e9, cores=cpu / seconds,
                    median_us=statistics.median(gaps) * 1e6, p20_us=q[0] * 1e6, p80_us=q[3] * 1e6)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers, joined each epoch)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def check_same_values(data: Data, batch_ids: list[str]) -> None:
    """The original loader's padded batch and our packed one hold the same numbers."""
    db = OriginalImageDb(str(data.lmdb_dir), data.name2nbb)
    index = {image_id: i for i, image_id in enumerate(data.ids)}
    dataset = OriginalImageDataset(db, data.ids, soft_labels=True)
    feat, pos, soft, num_bbs = original_collate([dataset[index[i]] for i in batch_ids])
    db.close()
    ours = RegionStore(data.store_dir).gather(batch_ids, dtype=torch.float32, soft_labels=True)
    rows = torch.cat([torch.arange(n) + b * feat.shape[1] for b, n in enumerate(num_bbs)])
    for name, padded, packed in (("features", feat, ours.features), ("boxes", pos, ours.boxes),
                                 ("soft labels", soft, ours.soft_labels)):
        if not torch.equal(padded.reshape(-1, padded.shape[-1])[rows], packed):
            raise SystemExit(f"the loaders disagree on {name}: the comparison would be meaningless")


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 images, one epoch per measurement")
    parser.add_argument("--images", type=int, default=None, help="images per data set (default 2048, quick 512)")
    parser.add_argument("--regions", type=int, nargs="+", default=[36, 100])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs per measurement (default 2, quick 1)")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the data sets here (reused if present)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache blocks")
    parser.add_argument("--only", nargs="+", default=None, help="run only loaders whose name starts with these")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (see the docstring)")
    add_csv_options(parser)
    args = parser.parse_args(argv)
    args.csv = results_path(args)
    torch.set_num_threads(args.torch_threads)
    images = args.images or (512 if args.quick else 2048)
    epochs = args.epochs or (1 if args.quick else 2)
    device = cpu_label()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    writer = None if args.csv is None else CsvWriter(args.csv, "bench_loader", torch.device("cpu"), device_label=device)
    print(f"# bench_loader  {date}  {device}  torch {torch.__version__} ({torch.get_num_threads()} thread)  "
          f"images={images} batch={args.batch} epochs={epochs}")
    print("# cold = page cache evicted with os.posix_fadvise(POSIX_FADV_DONTNEED) on every file before each "
          "timed epoch; warm = files read first, in-process loaders after one untimed epoch")
    print("# samples/s and GB/s over whole epochs; GB/s = fp16 bytes delivered (features + boxes [+ soft labels]); "
          "cores = CPU seconds the loader got per second (below its thread count: other jobs held the cores)")
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine is shared)")
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        for regions in args.regions:
            data = Data(root, regions, images)
            built = data.build()
            if built:
                print(f"# built {regions}-region data sets (LMDB + store, {images} images) in {built:.1f} s")
            rng = np.random.default_rng(0)
            order = [data.ids[i] for i in rng.permutation(images)]
            batches = [order[k:k + args.batch] for k in range(0, images - args.batch + 1, args.batch)]
            check_same_values(data, batches[0][:8])
            for soft in (False, True):
                for cache in ("warm",) + (() if args.no_cold else ("cold",)):
                    if cache == "warm":
                        read_into_cache(data.files())
                    run_block(Runner(data, batches, soft, cache, epochs), writer, args.batch, args.only)
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def run_block(runner: Runner, writer: CsvWriter | None, batch: int, only: list[str] | None) -> None:
    case = f"regions{runner.data.regions}_{'soft' if runner.soft else 'nosoft'}_{runner.cache}"
    measurements = [
        ("original_w0", "fp32", lambda: runner.original(0)),
        ("original_w2", "fp32", lambda: runner.original(2)),
        ("ours_t1", "fp32", lambda: runner.ours(1, torch.float32)),
        ("ours_t2", "fp32", lambda: runner.ours(2, torch.float32)),
        ("ours_t1", "fp16", lambda: runner.ours(1, torch.float16)),
        ("ours_t2", "fp16", lambda: runner.ours(2, torch.float16)),
        ("ours_t2_newbuf", "fp16", lambda: runner.ours(2, torch.float16, reuse=False)),
        ("ours_t2_always", "fp16", lambda: runner.ours(2, torch.float16, verify="always")),
    ]
    results = []
    for impl, dtype, run in measurements:
        if only is None or any(impl.startswith(prefix) for prefix in only):
            results.append((impl, dtype, run()))
    peers = {impl: r["samples_s"] for impl, _, r in results if impl.startswith("original")}
    best_peer = max(peers.values(), default=float("nan"))
    print(f"\n## {case}  ({runner.data.images} images, batch {batch})")
    print(f"{'impl':<16}{'dtype':<6}{'samples/s':>11}{'GB/s':>8}{'cores':>7}{'median ms':>11}{'p20':>8}{'p80':>8}"
          f"{'speed-up':>10}")
    for impl, dtype, r in results:
        speedup = r["samples_s"] / best_peer
        print(f"{impl:<16}{dtype:<6}{r['samples_s']:>11.0f}{r['gb_s']:>8.2f}{r['cores']:>7.2f}"
              f"{r['median_us'] / 1e3:>11.2f}{r['p20_us'] / 1e3:>8.2f}{r['p80_us'] / 1e3:>8.2f}{speedup:>9.1f}x")
        if writer is not None:
            writer.write(dict(case=case, impl=impl, B=batch, dtype=dtype, median_us=f"{r['median_us']:.1f}",
                              speedup_vs=";".join(f"{p}={r['samples_s'] / v:.2f}" for p, v in peers.items()),
                              notes=f"samples_s={r['samples_s']:.0f} GB_s={r['gb_s']:.2f} cores={r['cores']:.2f} "
                                    f"p20_us={r['p20_us']:.1f} p80_us={r['p80_us']:.1f} "
                                    f"images={runner.data.images} cache={runner.cache}"))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
