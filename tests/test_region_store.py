"""The region store: the writer, the C++ reader (uniter_fast._regionstore) and the RegionStore API."""
from __future__ import annotations

import collections.abc
import gc
import os
import pickle
import struct
import threading
import zlib

import numpy as np
import pytest
import torch

from uniter_fast import _regionstore
from uniter_fast.data import CorruptRecordError, RegionBatch, RegionStore, RegionStoreError, RegionStoreWriter
from uniter_fast.data.region_store import FLAG_SOFT_LABELS, record_layout

D, C = 32, 7  # small dimensions keep the files tiny; one test uses the real 2048 / 1601


def make_image(rng: np.random.Generator, n: int, *, feature_dim: int = D, label_dim: int = C):
    xy = rng.random((n, 2)) * 0.5
    wh = rng.random((n, 2)) * 0.5
    return dict(features=rng.standard_normal((n, feature_dim)).astype(np.float16),
                norm_bb=np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float16),
                conf=rng.random(n).astype(np.float16),
                soft_labels=rng.dirichlet(np.ones(label_dim), size=n).astype(np.float16))


def write_store(path, images: dict, **kwargs):
    kwargs = {"feature_dim": D, "label_dim": C, **kwargs}
    soft = kwargs.get("soft_labels", True)
    with RegionStoreWriter(path, **kwargs) as writer:
        for image_id, arrays in images.items():
            writer.add(image_id, arrays["features"], arrays["norm_bb"], arrays["conf"],
                       arrays["soft_labels"] if soft else None)
    return path


def random_images(count: int, seed: int = 0, max_regions: int = 9, **dims) -> dict:
    rng = np.random.default_rng(seed)
    return {f"img_{seed}_{i}": make_image(rng, int(rng.integers(1, max_regions + 1)), **dims) for i in range(count)}


@pytest.fixture
def images():
    return random_images(24)


@pytest.fixture
def store_dir(tmp_path, images):
    return write_store(tmp_path / "store", images)


def expected(images: dict, ids, field: str, dtype=np.float32) -> np.ndarray:
    return np.concatenate([images[i][field] for i in ids]).astype(dtype)


def corrupt(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def rewrite(path, fmt: str, offset: int, value, *, checksum: tuple[int, int]) -> None:
    """Packs `value` at `offset` and recomputes the CRC-32 of bytes [checksum[0], checksum[1]) stored after them,
    so that the edit reads as written by a writer (negative positions count from the end)."""
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    start, end = (c % len(data) for c in checksum)
    struct.pack_into("<I", data, end, zlib.crc32(bytes(data[start:end])))
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gather_round_trip(store_dir, images, dtype):
    store = RegionStore(store_dir)
    ids = ["img_0_5", "img_0_0", "img_0_23", "img_0_5", "img_0_11"]  # any order, repeats allowed
    batch = store.gather(ids, dtype=dtype)
    counts = [len(images[i]["conf"]) for i in ids]
    assert batch.offsets.tolist() == np.concatenate([[0], np.cumsum(counts)]).tolist()
    assert batch.features.dtype == dtype and batch.features.shape == (sum(counts), D)
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    np.testing.assert_array_equal(batch.features.numpy(), expected(images, ids, "features", np_dtype))
    boxes = expected(images, ids, "norm_bb")
    assert batch.boxes.dtype == torch.float32 and batch.boxes.shape == (sum(counts), 7)
    np.testing.assert_array_equal(batch.boxes[:, :6].numpy(), boxes)
    np.testing.assert_array_equal(batch.boxes[:, 6].numpy(), boxes[:, 4] * boxes[:, 5])  # w*h in fp32
    assert batch.soft_labels is None  # only when asked
    assert batch.batch_size == len(ids) and batch.total_regions == sum(counts)
    assert batch.num_regions.tolist() == counts


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_soft_labels_only_when_asked(store_dir, images, dtype):
    store = RegionStore(store_dir)
    ids = ["img_0_3", "img_0_7"]
    batch = store.gather(ids, dtype=dtype, soft_labels=True)
    assert batch.soft_labels.dtype == dtype and batch.soft_labels.shape == (batch.total_regions, C)
    np.testing.assert_array_equal(batch.soft_labels.float().numpy(), expected(images, ids, "soft_labels"))


def test_getitem_returns_the_stored_arrays(store_dir, images):
    store = RegionStore(store_dir)
    for image_id, arrays in images.items():
        regions = store[image_id]
        assert regions.image_id == image_id and regions.num_regions == len(arrays["conf"])
        for field in ("features", "norm_bb", "conf", "soft_labels"):
            got = getattr(regions, field)
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, arrays[field])
    regions = store["img_0_1"]
    regions.features[0, 0] = 7  # copies, not views of the mapping: writable, and the store is unchanged
    assert store["img_0_1"].features[0, 0] == images["img_0_1"]["features"][0, 0]


def test_fp32_boxes_and_conf_and_no_soft_labels(tmp_path, images):
    path = write_store(tmp_path / "s", images, soft_labels=False, box_dtype="float32", conf_dtype=np.float32)
    store = RegionStore(path)
    assert not store.has_soft_labels
    regions = store["img_0_2"]
    assert regions.soft_labels is None and regions.norm_bb.dtype == np.float32 and regions.conf.dtype == np.float32
    np.testing.assert_array_equal(regions.norm_bb, images["img_0_2"]["norm_bb"].astype(np.float32))
    batch = store.gather(["img_0_2", "img_0_9"])
    boxes = expected(images, ["img_0_2", "img_0_9"], "norm_bb")
    np.testing.assert_array_equal(batch.boxes.numpy(), np.concatenate([boxes, boxes[:, 4:5] * boxes[:, 5:6]], 1))
    with pytest.raises(ValueError, match="without"):
        store.gather(["img_0_2"], soft_labels=True)


@pytest.mark.parametrize("box_dtype", ["float16", "float32"])
def test_many_regions_per_image(tmp_path, box_dtype):
    rng = np.random.default_rng(4)
    images = {"big": make_image(rng, 300), "small": make_image(rng, 1)}  # boxes convert in blocks of 128
    store = RegionStore(write_store(tmp_path / "s", images, box_dtype=box_dtype))
    batch = store.gather(["small", "big"], dtype=torch.float32, soft_labels=True)
    boxes = expected(images, ["small", "big"], "norm_bb")
    np.testing.assert_array_equal(batch.boxes.numpy(), np.concatenate([boxes, boxes[:, 4:5] * boxes[:, 5:6]], 1))
    np.testing.assert_array_equal(batch.soft_labels.numpy(), expected(images, ["small", "big"], "soft_labels"))


def test_real_dimensions_and_threads_agree(tmp_path):
    images = random_images(12, seed=3, max_regions=100, feature_dim=2048, label_dim=1601)
    store = RegionStore(write_store(tmp_path / "s", images, feature_dim=2048, label_dim=1601), threads=1)
    ids = list(images) * 2  # about 15 MB with soft labels: split over several threads
    one = store.gather(ids, dtype=torch.float32, soft_labels=True)
    threaded = RegionStore(store.path, threads=4).gather(ids, dtype=torch.float32, soft_labels=True)
    for a, b in ((one.features, threaded.features), (one.boxes, threaded.boxes),
                 (one.soft_labels, threaded.soft_labels), (one.offsets, threaded.offsets)):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(one.features.numpy(), expected(images, ids, "features"))


def test_empty_batch(store_dir):
    batch = RegionStore(store_dir).gather([], soft_labels=True)
    assert batch.offsets.tolist() == [0] and batch.features.shape == (0, D) and batch.soft_labels.shape == (0, C)


def test_several_shards(tmp_path, images):
    path = write_store(tmp_path / "s", images, shard_bytes=4096)
    shards = sorted(p.name for p in path.glob("shard-*.rgs"))
    assert len(shards) > 3
    store = RegionStore(path)
    assert len({store.location(i)[0] for i in images}) == len(shards)
    ids = list(images)[::-1]
    batch = store.gather(ids, soft_labels=True)
    np.testing.assert_array_equal(batch.features.numpy(), expected(images, ids, "features", np.float16))
    assert store.verify_all() == []


def test_one_record_larger_than_a_shard_gets_a_shard_of_its_own(tmp_path):
    images = random_images(3, seed=2, max_regions=40)
    path = write_store(tmp_path / "s", images, shard_bytes=64)
    assert len(list(path.glob("shard-*.rgs"))) == 3
    assert RegionStore(path).verify_all() == []


def test_a_record_that_fills_the_shard_exactly_stays_in_it(tmp_path):
    rng = np.random.default_rng(0)
    images = {name: make_image(rng, 4) for name in "abc"}
    nbytes = record_layout(4, 1, D, C, FLAG_SOFT_LABELS).nbytes
    store = RegionStore(write_store(tmp_path / "s", images, shard_bytes=64 + 2 * nbytes))
    assert [store.location(i)[0].name for i in images] == ["shard-00000.rgs"] * 2 + ["shard-00001.rgs"]


@pytest.mark.parametrize("box_dtype, conf_dtype", [("float32", "float16"), ("float16", "float32")])
def test_getitem_reads_boxes_and_conf_with_their_own_dtypes(tmp_path, images, box_dtype, conf_dtype):
    path = write_store(tmp_path / "s", images, box_dtype=box_dtype, conf_dtype=conf_dtype)
    regions = RegionStore(path)["img_0_4"]
    assert regions.norm_bb.dtype == np.dtype(box_dtype) and regions.conf.dtype == np.dtype(conf_dtype)
    np.testing.assert_array_equal(regions.norm_bb, images["img_0_4"]["norm_bb"].astype(box_dtype))
    np.testing.assert_array_equal(regions.conf, images["img_0_4"]["conf"].astype(conf_dtype))


# ---------------------------------------------------------------------------------------------------------
# appending and committing
# ---------------------------------------------------------------------------------------------------------


def test_append(tmp_path):
    first, second = random_images(10, seed=0), random_images(10, seed=1)
    path = write_store(tmp_path / "s", first, shard_bytes=8192)
    shards_before = len(list(path.glob("shard-*.rgs")))
    write_store(path, second, shard_bytes=8192, append=True)
    store = RegionStore(path)
    assert list(store) == list(first) + list(second)  # insertion order kept
    assert len(list(path.glob("shard-*.rgs"))) > shards_before
    both = {**first, **second}
    ids = list(both)
    batch = store.gather(ids, soft_labels=True)
    np.testing.assert_array_equal(batch.features.numpy(), expected(both, ids, "features", np.float16))
    assert store.verify_all() == []


def test_append_refuses_duplicates_and_other_dimensions(store_dir, images):
    with RegionStoreWriter(store_dir, feature_dim=D, label_dim=C, append=True) as writer:
        with pytest.raises(ValueError, match="img_0_4.*duplicate"):
            writer.add("img_0_4", **images["img_0_4"])
    with pytest.raises(ValueError, match="feature_dim=32"):
        RegionStoreWriter(store_dir, feature_dim=64, label_dim=C, append=True)
    with pytest.raises(ValueError, match="box_dtype=float16.*the writer was given.*box_dtype=float32"):
        RegionStoreWriter(store_dir, feature_dim=D, label_dim=C, append=True, box_dtype="float32")
    with pytest.raises(FileExistsError, match="append=True"):
        RegionStoreWriter(store_dir, feature_dim=D, label_dim=C)
    with pytest.raises(FileNotFoundError):
        RegionStoreWriter(store_dir.parent / "nothing", append=True)


def test_a_failed_session_commits_nothing_and_the_next_append_cuts_its_tail(store_dir, images):
    extra = random_images(3, seed=5)
    size_before = os.path.getsize(store_dir / "shard-00000.rgs")
    with pytest.raises(ValueError, match="img_5_bad"):
        with RegionStoreWriter(store_dir, feature_dim=D, label_dim=C, append=True) as writer:
            for image_id, arrays in extra.items():
                writer.add(image_id, **arrays)
            writer.add("img_5_bad", **{**arrays, "features": np.full((1, D), np.nan, np.float32)})
    assert os.path.getsize(store_dir / "shard-00000.rgs") > size_before  # written, but not committed
    assert list(RegionStore(store_dir)) == list(images)
    write_store(store_dir, extra, append=True)
    store = RegionStore(store_dir)
    assert list(store) == list(images) + list(extra)
    assert store.verify_all() == []


def test_append_refuses_a_truncated_last_shard(store_dir, images):
    ids = list(images)
    shard, offset, _ = RegionStore(store_dir).location(ids[-1])
    os.truncate(shard, offset + 10)
    with pytest.raises(RegionStoreError, match=r"shard-00000\.rgs: truncated: the index says it holds \d+ bytes, "
                                               rf"the file has {offset + 10}"):
        RegionStoreWriter(store_dir, feature_dim=D, label_dim=C, append=True)
    assert os.path.getsize(shard) == offset + 10  # left as it was: the damage still reads as a truncation
    with pytest.raises(CorruptRecordError, match=rf"'{ids[-1]}'.*truncated"):
        RegionStore(store_dir)[ids[-1]]


def test_append_cuts_the_uncommitted_tail_of_the_last_shard(store_dir):
    extra = random_images(3, seed=5)
    writer = RegionStoreWriter(store_dir, feature_dim=D, label_dim=C, append=True)
    for image_id, arrays in extra.items():
        writer.add(image_id, **arrays)
    writer.abort()  # written, not committed
    write_store(store_dir, {"late": extra["img_5_0"]}, append=True)  # shorter than the aborted session
    store = RegionStore(store_dir)
    shard, offset, nbytes = store.location("late")
    assert os.path.getsize(shard) == offset + nbytes == store._store.shard_sizes[-1]
    assert store.verify_all() == []


def test_append_refuses_a_last_shard_of_another_store(tmp_path, images):
    a, b = write_store(tmp_path / "a", images), write_store(tmp_path / "b", images)
    os.replace(b / "shard-00000.rgs", a / "shard-00000.rgs")
    size = os.path.getsize(a / "shard-00000.rgs")
    with pytest.raises(RegionStoreError, match=r"shard-00000\.rgs: not this store's shard"):
        RegionStoreWriter(a, feature_dim=D, label_dim=C, append=True)
    assert os.path.getsize(a / "shard-00000.rgs") == size


def test_flush_commits_midway(tmp_path, images):
    writer = RegionStoreWriter(tmp_path / "s", feature_dim=D, label_dim=C)
    items = list(images.items())
    for image_id, arrays in items[:5]:
        writer.add(image_id, **arrays)
    writer.flush()
    assert list(RegionStore(tmp_path / "s")) == [i for i, _ in items[:5]]
    for image_id, arrays in items[5:]:
        writer.add(image_id, **arrays)
    writer.close()
    writer.close()  # idempotent
    assert len(RegionStore(tmp_path / "s")) == len(items)
    with pytest.raises(ValueError, match="closed"):
        writer.add("late", **items[0][1])


def test_new_writer_clears_uncommitted_shards(tmp_path, images):
    writer = RegionStoreWriter(tmp_path / "s", feature_dim=D, label_dim=C)
    writer.add("a", **images["img_0_0"])
    writer.abort()
    with pytest.warns(UserWarning, match="uncommitted"):
        write_store(tmp_path / "s", {"b": images["img_0_1"]})
    assert list(RegionStore(tmp_path / "s")) == ["b"]


# ---------------------------------------------------------------------------------------------------------
# Mapping behaviour
# ---------------------------------------------------------------------------------------------------------


def test_mapping_behaviour(store_dir, images):
    store = RegionStore(store_dir)
    assert isinstance(store, collections.abc.Mapping)
    assert len(store) == len(images) and list(store) == list(images) and list(store.keys()) == list(images)
    assert "img_0_3" in store and "nope" not in store and 3 not in store
    assert store.get("nope") is None
    assert store.num_regions("img_0_3") == len(images["img_0_3"]["conf"])
    assert store.region_counts(["img_0_3", "img_0_1"]).tolist() == [len(images[i]["conf"])
                                                                     for i in ("img_0_3", "img_0_1")]
    assert store.region_counts().sum() == sum(len(a["conf"]) for a in images.values())
    with pytest.raises(KeyError, match=f"'nope'.*{store_dir.name}"):
        store["nope"]
    with pytest.raises(KeyError, match="'missing_one'"):
        store.gather(["img_0_1", "missing_one"])
    with pytest.raises(KeyError, match="'missing_one'"):
        store.num_regions("missing_one")
    with pytest.raises(TypeError, match="sequence"):
        store.gather("img_0_1")
    assert store == store and store != RegionStore(store_dir)


def test_pickle_reopens(store_dir, images):
    store = RegionStore(store_dir, verify="always", threads=2)
    clone = pickle.loads(pickle.dumps(store))
    assert clone.verify == "always" and clone.threads == 2 and list(clone) == list(store)
    assert torch.equal(clone.gather(["img_0_2"]).features, store.gather(["img_0_2"]).features)


def test_close_unmaps_and_reopens_on_use(store_dir, images):
    store = RegionStore(store_dir)
    store.gather(["img_0_2"])
    assert store._store.mapped_shards() == 1
    store.close()
    assert store._store.mapped_shards() == 0
    np.testing.assert_array_equal(store["img_0_2"].features, images["img_0_2"]["features"])


# ---------------------------------------------------------------------------------------------------------
# damage
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verify", ["always", "first"])
def test_corrupt_byte_is_reported_with_shard_and_image(store_dir, verify):
    shard, offset, _ = RegionStore(store_dir).location("img_0_6")
    corrupt(shard, offset + 65)  # a feature value (the features start at byte 64 for short ids)
    store = RegionStore(store_dir, verify=verify)
    for read in (lambda: store.gather(["img_0_1", "img_0_6"]), lambda: store["img_0_6"]):
        with pytest.raises(CorruptRecordError,
                           match=r"shard-00000\.rgs: image 'img_0_6'.*checksum mismatch in features"):
            read()
    assert issubclass(CorruptRecordError, RegionStoreError) and issubclass(RegionStoreError, ValueError)
    store.gather(["img_0_1", "img_0_7"])  # the other records still read
    problems = store.verify_all()
    assert [image_id for image_id, _ in problems] == ["img_0_6"] and "checksum mismatch" in problems[0][1]


def test_of_two_threads_failing_the_earliest_damaged_record_is_reported(tmp_path):
    """16 images of 2 MiB split over two copy threads, 0-7 and 8-15: record 8, first in the second thread's run,
    fails at once, and record 7, the first thread's last, fails later. The error is record 7's every time: a
    failure stops only the work after it (it used to stop the first thread before it reached record 7)."""
    rng = np.random.default_rng(0)
    images = {f"big_{i}": make_image(rng, 500, feature_dim=2048) for i in range(16)}
    path = write_store(tmp_path / "store", images, feature_dim=2048)
    for image_id in ("big_7", "big_8"):
        shard, offset, _ = RegionStore(path).location(image_id)
        corrupt(shard, offset + 65)
    store = RegionStore(path, verify="always", threads=2)
    for _ in range(10):
        with pytest.raises(CorruptRecordError, match=r"image 'big_7'"):
            store.gather(list(images))


def test_verify_never_does_not_check_and_first_checks_once(store_dir, images):
    shard, offset, _ = RegionStore(store_dir).location("img_0_6")
    first = RegionStore(store_dir, verify="first")
    first.gather(["img_0_6"])  # verified now, in this process
    corrupt(shard, offset + 65)  # the mapping is shared: the change shows through
    assert not np.array_equal(first.gather(["img_0_6"]).features.numpy(), images["img_0_6"]["features"])
    never = RegionStore(store_dir, verify="never")
    batch = never.gather(["img_0_6"])
    assert not np.array_equal(batch.features.numpy(), images["img_0_6"]["features"])  # damage came through
    with pytest.raises(CorruptRecordError, match="img_0_6"):
        RegionStore(store_dir, verify="always").gather(["img_0_6"])


@pytest.mark.parametrize("verify", ["always", "first"])
def test_soft_label_damage_matters_only_when_soft_labels_are_read(store_dir, images, verify):
    shard, offset, _ = RegionStore(store_dir).location("img_0_8")
    n = len(images["img_0_8"]["conf"])
    corrupt(shard, offset + record_layout(n, len("img_0_8"), D, C, FLAG_SOFT_LABELS).soft_labels + 1)
    store = RegionStore(store_dir, verify=verify)
    batch = store.gather(["img_0_8"])  # features and boxes have their own checksum, and it holds
    np.testing.assert_array_equal(batch.features.numpy(), images["img_0_8"]["features"])
    with pytest.raises(CorruptRecordError, match="image 'img_0_8'.*checksum mismatch in soft labels"):
        store.gather(["img_0_8"], soft_labels=True)
    with pytest.raises(CorruptRecordError, match="img_0_8"):
        store["img_0_8"]


def test_verify_always_checks_every_read(store_dir):
    shard, offset, _ = RegionStore(store_dir).location("img_0_6")
    store = RegionStore(store_dir, verify="always")
    store.gather(["img_0_6"])  # verified once: "always" checks again all the same
    corrupt(shard, offset + 65)
    with pytest.raises(CorruptRecordError, match="image 'img_0_6'.*checksum mismatch in features"):
        store.gather(["img_0_6"])
    with pytest.raises(CorruptRecordError, match="image 'img_0_6'.*checksum mismatch in features"):
        store["img_0_6"]


def test_verify_all_rechecks_records_read_before(store_dir):
    shard, offset, _ = RegionStore(store_dir).location("img_0_6")
    store = RegionStore(store_dir)  # verify="first"
    store.gather(["img_0_6"], soft_labels=True)  # verified in this process
    corrupt(shard, offset + 65)
    problems = store.verify_all()
    assert [image_id for image_id, _ in problems] == ["img_0_6"] and "checksum mismatch" in problems[0][1]


def test_verify_all_lists_the_records_a_truncation_lost(store_dir, images):
    ids = list(images)
    shard, offset, _ = RegionStore(store_dir).location(ids[-3])
    os.truncate(shard, offset + 100)
    problems = RegionStore(store_dir).verify_all()  # reports, does not raise
    assert [image_id for image_id, _ in problems] == ids[-3:]
    assert all("shard-00000.rgs" in message and "truncated" in message for _, message in problems)


def test_header_damage_is_caught_even_without_checksums(store_dir):
    shard, offset, _ = RegionStore(store_dir).location("img_0_9")
    corrupt(shard, offset + 16)  # the record's region count
    with pytest.raises(CorruptRecordError, match="img_0_9.*disagrees with the index"):
        RegionStore(store_dir, verify="never").gather(["img_0_9"])
    corrupt(shard, offset + 16)
    corrupt(shard, offset + 1)  # the record magic
    with pytest.raises(CorruptRecordError, match="img_0_9.*bad magic"):
        RegionStore(store_dir, verify="never")["img_0_9"]


@pytest.mark.parametrize("at, message", [
    (4, "checksums in the record header"),          # crc
    (28, "checksums in the record header"),         # crc_soft
    (24, "record header disagrees with the index"),  # flags
    (33, "the record holds another image's id"),    # a byte of the image id
])
def test_record_header_fields_are_checked_against_the_index_without_checksums(store_dir, at, message):
    shard, offset, _ = RegionStore(store_dir).location("img_0_9")
    corrupt(shard, offset + at)
    store = RegionStore(store_dir, verify="never")
    with pytest.raises(CorruptRecordError, match=rf"shard-00000\.rgs: image 'img_0_9'.*{message}"):
        store.gather(["img_0_9"])
    with pytest.raises(CorruptRecordError, match=rf"image 'img_0_9'.*{message}"):
        store["img_0_9"]


def test_truncated_shard(store_dir, images):
    store = RegionStore(store_dir)
    ids = list(images)
    shard, offset, _ = store.location(ids[-3])
    os.truncate(shard, offset + 100)
    store = RegionStore(store_dir)
    store.gather(ids[:3])  # records before the cut still read
    with pytest.raises(CorruptRecordError, match=rf"shard-00000\.rgs: image '{ids[-3]}'.*truncated"):
        store.gather(ids[:3] + [ids[-3]])
    with pytest.raises(CorruptRecordError, match=f"'{ids[-1]}'.*truncated"):
        store[ids[-1]]
    os.truncate(shard, 10)
    with pytest.raises(CorruptRecordError, match="truncated.*shorter than its header.*reading image"):
        RegionStore(store_dir).gather(ids[:1])


def test_missing_files(tmp_path, images):
    path = write_store(tmp_path / "s", images, shard_bytes=4096)
    with pytest.raises(FileNotFoundError, match="index.rsi"):
        RegionStore(tmp_path / "nowhere")
    store = RegionStore(path)
    (path / "shard-00001.rgs").unlink()
    victim = next(i for i in images if store.location(i)[0].name == "shard-00001.rgs")
    with pytest.raises(FileNotFoundError, match=rf"shard-00001\.rgs: missing shard file.*'{victim}'"):
        store.gather([victim])  # opened before the file went: the lazy open names shard and image
    with pytest.raises(FileNotFoundError, match=r"shard-00001\.rgs: missing shard file"):
        RegionStore(path)
    (path / "index.rsi").unlink()
    with pytest.raises(FileNotFoundError, match="index.rsi"):
        RegionStore(path)


def test_damaged_index(store_dir):
    index = store_dir / "index.rsi"
    data = bytearray(index.read_bytes())
    data[-10] ^= 1
    index.write_bytes(bytes(data))
    with pytest.raises(RegionStoreError, match="index.rsi: checksum mismatch"):
        RegionStore(store_dir)
    index.write_bytes(bytes(data[:40]))
    with pytest.raises(RegionStoreError, match="index.rsi: truncated"):
        RegionStore(store_dir)


def test_index_header_checksum_version_and_flags_are_checked(store_dir):
    index = store_dir / "index.rsi"
    good = index.read_bytes()
    corrupt(index, 16)  # feature_dim, header checksum left as it was
    with pytest.raises(RegionStoreError, match="index.rsi: header checksum mismatch"):
        RegionStore(store_dir)
    for offset, value, message in ((8, 2, "format version 2, this reader knows 1"),
                                   (24, FLAG_SOFT_LABELS | 8, "unknown flags 0x00000009")):
        index.write_bytes(good)
        rewrite(index, "<I", offset, value, checksum=(0, 60))
        with pytest.raises(RegionStoreError, match=f"index.rsi: {message}"):
            RegionStore(store_dir)


def test_index_entry_naming_a_shard_that_does_not_exist(store_dir):
    index = store_dir / "index.rsi"
    rewrite(index, "<I", 64 + 8 + 16, 1, checksum=(64, -4))  # entry 0's shard number; the store has one shard
    with pytest.raises(RegionStoreError, match=r"index.rsi: entry 0 \('img_0_0'\): shard 1 does not exist"):
        RegionStore(store_dir)


def test_shard_headers_are_checked_against_the_index(tmp_path, images):
    path = write_store(tmp_path / "s", images, shard_bytes=4096)
    first = next(iter(images))
    zero, one = path / "shard-00000.rgs", path / "shard-00001.rgs"
    good = zero.read_bytes()
    zero.write_bytes(one.read_bytes())  # shard 1's bytes under shard 0's name: same store, same uuid
    with pytest.raises(CorruptRecordError, match=rf"shard-00000\.rgs: header says it is shard 1.*'{first}'"):
        RegionStore(path).gather([first])
    zero.write_bytes(good)
    rewrite(zero, "<I", 20, C + 1, checksum=(0, 60))  # label_dim, header checksum made to match
    with pytest.raises(CorruptRecordError, match=r"shard-00000\.rgs: header disagrees with the index"):
        RegionStore(path).gather([first])


def test_shard_from_another_store(tmp_path, images):
    a = write_store(tmp_path / "a", images)
    b = write_store(tmp_path / "b", images)
    os.replace(b / "shard-00000.rgs", a / "shard-00000.rgs")
    with pytest.raises(CorruptRecordError, match="another store"):
        RegionStore(a).gather(["img_0_0"])


# ---------------------------------------------------------------------------------------------------------
# bad writer input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"features": np.zeros((3, D + 1), np.float16)}, "features have 33 columns"),
    ({"features": np.zeros((3,), np.float16)}, "features has shape"),
    ({"features": np.zeros((3, D), np.int32)}, "features must be floating point"),
    ({"features": np.zeros((0, D), np.float16)}, "no regions"),
    ({"norm_bb": np.zeros((2, 6), np.float16)}, r"norm_bb has shape \(2, 6\), expected \(3, 6\)"),
    ({"norm_bb": np.full((3, 6), np.nan, np.float32)}, "norm_bb has NaN"),
    ({"conf": np.zeros((4,), np.float16)}, "conf has shape"),
    ({"soft_labels": np.zeros((3, C + 1), np.float16)}, "soft_labels has shape"),
    ({"soft_labels": None}, "keeps soft labels, none were given"),
    ({"features": np.full((3, D), 1e6, np.float32)}, "beyond float16's range"),
    ({"norm_bb": np.where(np.arange(18).reshape(3, 6) == 16, np.nan, 0.1)}, "norm_bb has NaN.*first in row 2"),
    ({"features": [[0.0] * D, [0.0] * (D - 1), [0.0] * D]}, "features is not a numeric array"),
    ({"norm_bb": [[0.0] * 6, [0.0] * 6, [0.0]]}, "norm_bb is not a numeric array"),
])
def test_bad_writer_input_names_the_image(tmp_path, change, message):
    rng = np.random.default_rng(0)
    arrays = {**make_image(rng, 3), **change}
    with RegionStoreWriter(tmp_path / "s", feature_dim=D, label_dim=C) as writer:
        with pytest.raises(ValueError, match=rf"image 'bad_one'.*{message}"):
            writer.add("bad_one", **arrays)
        writer.add("good", **make_image(rng, 3))
        assert "bad_one" not in writer and len(writer) == 1


def test_writer_rejects_bad_ids_and_unwanted_soft_labels(tmp_path):
    arrays = make_image(np.random.default_rng(0), 2)
    with RegionStoreWriter(tmp_path / "s", feature_dim=D, label_dim=C, soft_labels=False) as writer:
        with pytest.raises(ValueError, match="non-empty"):
            writer.add("", **{k: v for k, v in arrays.items() if k != "soft_labels"})
        with pytest.raises(ValueError, match="image 'x'.*soft_labels=False"):
            writer.add("x", **arrays)
        writer.add("x", arrays["features"], arrays["norm_bb"], arrays["conf"][:, None])  # (n, 1) conf accepted
    assert RegionStore(tmp_path / "s")["x"].conf.shape == (2,)


# ---------------------------------------------------------------------------------------------------------
# processes, buffers, prefetching
# ---------------------------------------------------------------------------------------------------------


class _GatherDataset(torch.utils.data.Dataset):
    def __init__(self, store: RegionStore, batches: list[list[str]]):
        self.store, self.batches = store, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        batch = self.store.gather(self.batches[i], dtype=torch.float32, soft_labels=True)
        return os.getpid(), batch.features, batch.soft_labels, batch.offsets


def test_forked_dataloader_workers(store_dir, images):
    store = RegionStore(store_dir, verify="always")
    ids = list(images)
    batches = [ids[i:i + 3] for i in range(0, len(ids), 3)]
    store.gather(ids)  # the parent maps the shard before the workers fork
    loader = torch.utils.data.DataLoader(_GatherDataset(store, batches), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    pids = set()
    for got, ids_b in zip(loader, batches):
        pid, features, soft, offsets = got
        pids.add(pid)
        np.testing.assert_array_equal(features.numpy(), expected(images, ids_b, "features"))
        np.testing.assert_array_equal(soft.numpy(), expected(images, ids_b, "soft_labels"))
        assert offsets[-1] == features.shape[0]
    assert os.getpid() not in pids and len(pids) == 2
    assert torch.equal(store.gather(ids[:2]).features, torch.from_numpy(expected(images, ids[:2], "features",
                                                                                  np.float16)))


def test_concurrent_gathers_from_python_threads(store_dir, images):
    store = RegionStore(store_dir, verify="first", threads=2)
    ids = list(images)
    failures = []

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(20):
            batch_ids = list(rng.choice(ids, size=5))
            got = store.gather(batch_ids, dtype=torch.float32, soft_labels=True)
            if not (np.array_equal(got.features.numpy(), expected(images, batch_ids, "features"))
                    and np.array_equal(got.soft_labels.numpy(), expected(images, batch_ids, "soft_labels"))):
                failures.append(batch_ids)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_reused_buffers(store_dir, images):
    store = RegionStore(store_dir)
    ids = list(images)
    buffers = RegionBatch.empty(500, 16, feature_dim=D, label_dim=C, dtype=torch.float32, soft_labels=True)
    address = buffers.features.data_ptr()
    batch = store.gather(ids[:2], dtype=torch.float32, soft_labels=True, out=buffers)
    assert batch.features.data_ptr() == address and batch.total_regions < 500
    for k in range(2, 10):  # a returned batch goes back in as out=, larger batches still fit
        batch = store.gather(ids[:k], dtype=torch.float32, soft_labels=True, out=batch)
        assert batch.features.data_ptr() == address
        np.testing.assert_array_equal(batch.features.numpy(), expected(images, ids[:k], "features"))
        np.testing.assert_array_equal(batch.soft_labels.numpy(), expected(images, ids[:k], "soft_labels"))
    assert store.gather(ids[:3], dtype=torch.float32, out=batch).soft_labels is None
    with pytest.raises(ValueError, match="float32.*float16 was asked"):
        store.gather(ids[:2], dtype=torch.float16, out=buffers)
    with pytest.raises(ValueError, match="cannot hold"):
        store.gather(ids[:2], dtype=torch.float32, out=RegionBatch.empty(1, 16, feature_dim=D, dtype=torch.float32))
    with pytest.raises(ValueError, match="soft_labels None cannot hold"):
        store.gather(ids[:2], dtype=torch.float32, soft_labels=True,
                     out=RegionBatch.empty(100, 16, feature_dim=D, dtype=torch.float32))


def test_reader_refuses_outputs_that_are_not_c_contiguous(store_dir, images):
    store = RegionStore(store_dir)
    image_id = next(i for i, arrays in images.items() if len(arrays["conf"]) > 1)
    n = store.num_regions(image_id)
    features = np.empty((D, n), np.float16).T  # the right shape, column-major
    with pytest.raises(ValueError, match="features: the buffer must be C-contiguous"):
        store._store.gather(store.positions([image_id]), features, np.empty((n, 7), np.float32),
                            np.empty(2, np.int64), None, 1, 1)


def test_new_batches_recycle_memory_only_when_nothing_refers_to_it(store_dir, images):
    store = RegionStore(store_dir)
    ids = list(images)
    first = store.gather(ids[:4], dtype=torch.float32, soft_labels=True)
    kept_view = first.features[1:3]  # a view alone keeps the memory in use
    address = first.features.data_ptr()
    del first
    second = store.gather(ids[4:8], dtype=torch.float32, soft_labels=True)
    assert second.features.data_ptr() != address
    np.testing.assert_array_equal(kept_view.numpy(), expected(images, ids[:4], "features")[1:3])  # untouched
    del kept_view, second
    third = store.gather(ids[8:10], dtype=torch.float32, soft_labels=True)
    assert third.features.data_ptr() in {b.ctypes.data for b in store._pool._buffers}  # recycled, not new
    np.testing.assert_array_equal(third.features.numpy(), expected(images, ids[8:10], "features"))
    np.testing.assert_array_equal(third.soft_labels.numpy(), expected(images, ids[8:10], "soft_labels"))
    assert third.offsets.dtype == torch.int64 and third.boxes.shape == (third.total_regions, 7)
    assert len(store._pool) == 2


def test_pin_memory(store_dir, images):
    store = RegionStore(store_dir)
    if torch.cuda.is_available():
        batch = store.gather(["img_0_1"], pin_memory=True)
        assert batch.features.is_pinned()
    else:
        with pytest.warns(UserWarning, match="no accelerator"):
            import uniter_fast.data.region_batch as module
            module._PIN_WARNED = False
            batch = store.gather(["img_0_1"], pin_memory=True)
    np.testing.assert_array_equal(batch.features.numpy(), images["img_0_1"]["features"])


@pytest.mark.parametrize("reuse", [False, True])
def test_prefetch_keeps_order(store_dir, images, reuse):
    store = RegionStore(store_dir)
    ids = list(images)
    rng = np.random.default_rng(1)
    batches = [list(rng.choice(ids, size=int(rng.integers(1, 6)))) for _ in range(15)]
    seen = 0
    for got, ids_b in zip(store.prefetch(batches, depth=2, reuse_buffers=reuse, dtype=torch.float32,
                                         soft_labels=True), batches, strict=True):
        np.testing.assert_array_equal(got.features.numpy(), expected(images, ids_b, "features"))
        np.testing.assert_array_equal(got.soft_labels.numpy(), expected(images, ids_b, "soft_labels"))
        seen += 1
    assert seen == len(batches)


def test_prefetch_raises_at_the_failing_batch_and_stops(store_dir):
    store = RegionStore(store_dir)
    batches = [["img_0_1"], ["img_0_2"], ["not_there"], ["img_0_3"]]
    iterator = store.prefetch(batches, depth=1)
    assert next(iterator).total_regions == store.num_regions("img_0_1")
    assert next(iterator).total_regions == store.num_regions("img_0_2")
    with pytest.raises(KeyError, match="not_there"):
        next(iterator)
    with pytest.raises(StopIteration):
        next(iterator)
    with pytest.raises(TypeError, match="reuse_buffers"):
        store.prefetch(batches, out=None)


def test_prefetch_stops_its_thread_when_dropped(store_dir):
    store = RegionStore(store_dir)
    before = threading.active_count()
    endless = ([f"img_0_{i % 24}"] for i in range(10 ** 9))
    iterator = store.prefetch(endless, depth=2)
    next(iterator)
    with store.prefetch(endless, depth=2) as other:
        next(other)
    del iterator
    gc.collect()
    for thread in threading.enumerate():
        if thread.name == "RegionStore.prefetch":
            thread.join(timeout=5)
    assert threading.active_count() == before


# ---------------------------------------------------------------------------------------------------------
# the C++ pieces on their own
# ---------------------------------------------------------------------------------------------------------


def test_crc32_matches_zlib():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    for length in list(range(0, 200)) + [1023, 4096, 4999]:
        for start in (0, 3):
            chunk = data[start:start + length]
            for seed in (0, 0xDEADBEEF):
                assert _regionstore.crc32(chunk, seed) == zlib.crc32(chunk, seed)
                assert _regionstore.crc32_portable(chunk, seed) == zlib.crc32(chunk, seed)


def test_crc32_copy_copies_and_checksums():
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 9100, dtype=np.uint8)
    for length in (0, 1, 15, 63, 64, 65, 200, 4096, 8999):
        for src_at, dst_at in ((0, 0), (3, 0), (0, 5), (16, 48)):
            for stream in (False, True):
                src = data[src_at:src_at + length]
                dst = np.zeros(length + 64, dtype=np.uint8)
                crc = _regionstore.crc32_copy(src, dst[dst_at:dst_at + length], 7, stream)
                assert crc == zlib.crc32(src.tobytes(), 7)
                np.testing.assert_array_equal(dst[dst_at:dst_at + length], src)
                assert not dst[:dst_at].any() and not dst[dst_at + length:].any()


def test_half_to_float_is_exact_for_every_half():
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    for start, stop in ((0, 1 << 16), (5, 1000), (7, 22)):  # the vector and the scalar tails
        out = np.empty(stop - start, dtype=np.float32)
        _regionstore.half_to_float(halves[start:stop], out)
        reference = halves[start:stop].astype(np.float32)
        nan = np.isnan(reference)
        assert np.isnan(out[nan]).all()
        np.testing.assert_array_equal(out[~nan].view(np.uint32), reference[~nan].view(np.uint32))
