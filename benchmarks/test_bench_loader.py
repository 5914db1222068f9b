"""pytest-benchmark cases for region loading: one batch of 128 images, the original's way and ours.

Not part of the test suite (tests/ is the default test path); run them explicitly:

    pytest benchmarks/test_bench_loader.py                      # timings in pytest-benchmark's table
    pytest benchmarks/test_bench_loader.py --benchmark-disable  # only check that they run

benchmarks/bench_loader.py is the full comparison (DataLoader workers, cold cache, 100 regions); these cases
time the per-batch work on a warm 36-region data set, in-process.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_loader  # noqa: E402

from uniter_fast.data import RegionStore  # noqa: E402

IMAGES, REGIONS, BATCH = 256, 36, 128


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data = bench_loader.Data(tmp_path_factory.mktemp("bench_loader"), REGIONS, IMAGES)
    data.build()
    bench_loader.read_into_cache(data.files())
    return data


@pytest.fixture(scope="module")
def batch_ids(data):
    order = np.random.default_rng(0).permutation(IMAGES)
    return [data.ids[i] for i in order[:BATCH]]


@pytest.fixture
def one_torch_thread():
    """As bench_loader.py runs the original: OpenMP's second thread stalls on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("soft", [False, True], ids=["features", "soft_labels"])
def test_original_batch(benchmark, data, batch_ids, soft, one_torch_thread):
    db = bench_loader.OriginalImageDb(str(data.lmdb_dir), data.name2nbb)
    dataset = bench_loader.OriginalImageDataset(db, data.ids, soft_labels=soft)
    index = {image_id: i for i, image_id in enumerate(data.ids)}
    positions = [index[i] for i in batch_ids]
    feat, _, soft_labels, _ = benchmark(lambda: bench_loader.original_collate([dataset[i] for i in positions]))
    db.close()
    assert feat.shape == (BATCH, REGIONS, bench_loader.FEATURE_DIM) and (soft_labels is not None) == soft


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("soft", [False, True], ids=["features", "soft_labels"])
def test_region_store_gather(benchmark, data, batch_ids, soft, dtype, threads):
    store = RegionStore(data.store_dir, threads=threads)
    out = store.gather(batch_ids, dtype=dtype, soft_labels=soft)  # buffers reused, records verified once
    batch = benchmark(lambda: store.gather(batch_ids, dtype=dtype, soft_labels=soft, out=out))
    assert batch.features.shape == (BATCH * REGIONS, bench_loader.FEATURE_DIM) and batch.features.dtype == dtype
    store.close()
