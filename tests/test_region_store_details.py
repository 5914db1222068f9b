"""Region store details the broader tests leave open: the on-disk layout at its alignment boundaries, the
writer's argument checks and append rules, the reader's argument checks, lookups and buffer rules, index and
shard fields the C++ reader must refuse, "first" verification of soft labels, and Ahead's queue bound.

Expected byte offsets are computed by hand from docs/region-store.md; expected arrays are the numpy arrays
given to the writer (converted with numpy), never values read back through the code under test.
"""
from __future__ import annotations

import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch

import uniter_fast.data.region_store as region_store
from uniter_fast.data import CorruptRecordError, RegionBatch, RegionStore, RegionStoreError, RegionStoreWriter
from uniter_fast.data.ahead import Ahead

D, C = 16, 5  # tiny widths: every test writes a store of a few KiB


def _arrays(n: int, seed: int = 0, soft: bool = True) -> list:
    """features (n, D) fp16, norm_bb (n, 6) [x1, y1, x2, y2, w, h], conf (n,), soft labels (n, C) or nothing."""
    rng = np.random.default_rng(seed)
    corner = rng.random((n, 2), dtype=np.float32) * 0.5
    size = rng.random((n, 2), dtype=np.float32) * 0.4 + 0.05
    arrays = [rng.standard_normal((n, D)).astype(np.float16), np.hstack([corner, corner + size, size]),
              rng.random(n, dtype=np.float32)]
    return arrays + [rng.dirichlet(np.ones(C), size=n).astype(np.float16)] if soft else arrays


def _write(path, images: dict, **kwargs):
    """A store of `images` (id -> _arrays(...)), closed; returns its path."""
    with RegionStoreWriter(path, **{"feature_dim": D, "label_dim": C, **kwargs}) as writer:
        for image_id, arrays in images.items():
            writer.add(image_id, *arrays)
    return path


def _small_store(tmp_path, count: int = 4, **kwargs):
    """`count` images of 1 to 4 regions named im0, im1, ...; returns (path, images)."""
    images = {f"im{i}": _arrays(i % 4 + 1, seed=i, soft=kwargs.get("soft_labels", True)) for i in range(count)}
    return _write(tmp_path / "store", images, **kwargs), images


def _patch(path, offset: int, fmt: str, value, crc_span: tuple[int, int] | None = None) -> None:
    """Writes `value` at `offset`; with crc_span=(start, at), stores zlib.crc32(bytes[start:at]) at `at` (a
    negative `at` counts from the end) so the edit passes the file's own checksum."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
        if crc_span is not None:
            f.seek(0)
            data = f.read()
            at = crc_span[1] % len(data)
            f.seek(at)
            f.write(struct.pack("<I", zlib.crc32(data[crc_span[0]:at])))


# ---------------------------------------------------------------------------------------------------------
# the layout on disk
# ---------------------------------------------------------------------------------------------------------


def test_a_record_is_laid_out_as_the_format_document_says_at_the_alignment_boundaries(tmp_path):
    # n = 40, a 32-byte id (header + id end exactly on 64), fp16 boxes, fp32 conf, soft labels. By hand:
    # features F = align(32 + 32) = 64; boxes B = align(64 + 2*40*16 = 1344) = 1344;
    # conf K = align(1344 + 40*6*2 = 1824) = 1856; conf ends at 1856 + 40*4 = 2016;
    # soft labels S = align(2016) = 2048, ending at 2048 + 2*40*5 = 2448; record size align(2448) = 2496.
    image_id = "x" * 32
    features, norm_bb, conf, soft = _arrays(40, seed=1)
    path = _write(tmp_path / "s", {image_id: [features, norm_bb, conf, soft]}, conf_dtype="float32")
    shard, offset, nbytes = RegionStore(path).location(image_id)
    assert (offset, nbytes) == (64, 2496)  # the first record follows the 64-byte shard header
    record = shard.read_bytes()[offset:offset + nbytes]
    assert record[32:64] == image_id.encode()
    np.testing.assert_array_equal(np.frombuffer(record, np.float16, 40 * D, 64).reshape(40, D), features)
    np.testing.assert_array_equal(np.frombuffer(record, np.float16, 40 * 6, 1344).reshape(40, 6),
                                  norm_bb.astype(np.float16))
    np.testing.assert_array_equal(np.frombuffer(record, np.float32, 40, 1856), conf)
    np.testing.assert_array_equal(np.frombuffer(record, np.float16, 40 * C, 2048).reshape(40, C), soft)
    regions = RegionStore(path)[image_id]
    np.testing.assert_array_equal(regions.conf, conf)
    np.testing.assert_array_equal(regions.soft_labels, soft)


# ---------------------------------------------------------------------------------------------------------
# the writer's arguments and input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"feature_dim": 0}, "feature_dim must be a positive integer, got 0"),
    ({"label_dim": 2.5}, "label_dim must be a positive integer, got 2.5"),
    ({"shard_bytes": -1}, "shard_bytes must be a positive integer"),
    ({"box_dtype": "float64"}, "box_dtype must be float16 or float32, got float64"),
    ({"conf_dtype": np.int32}, "conf_dtype must be float16 or float32, got int32"),
])
def test_writer_refuses_bad_dimensions_and_dtypes_naming_the_argument(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        RegionStoreWriter(tmp_path / "s", **{"feature_dim": D, "label_dim": C, **kwargs})


def test_writer_refuses_ids_that_are_not_strings_and_repeats_within_one_session(tmp_path):
    with RegionStoreWriter(tmp_path / "s", feature_dim=D, label_dim=C) as writer:
        for bad in (7, b"bytes_id"):
            with pytest.raises(ValueError, match="image ids are non-empty strings"):
                writer.add(bad, *_arrays(2))
        writer.add("a", *_arrays(2))
        assert "a" in writer and "b" not in writer
        with pytest.raises(ValueError, match="image 'a' is already in the store"):
            writer.add("a", *_arrays(3, seed=1))
    assert len(RegionStore(tmp_path / "s")) == 1


def test_a_column_of_boxes_is_a_shape_error_naming_the_image(tmp_path):
    # only conf may come as (n, 1) (the original's dumps): other (n, 1) arrays get the shape message
    features, norm_bb, conf, soft = _arrays(3)
    with RegionStoreWriter(tmp_path / "s", feature_dim=D, label_dim=C) as writer:
        with pytest.raises(ValueError, match=r"image 'odd': norm_bb has shape \(3, 1\), expected \(3, 6\)"):
            writer.add("odd", features, norm_bb[:, :1], conf, soft)


def test_non_finite_fp32_boxes_are_not_blamed_on_float16_range(tmp_path):
    features, norm_bb, conf = _arrays(3, soft=False)
    norm_bb[1, 2] = np.inf
    with RegionStoreWriter(tmp_path / "s", feature_dim=D, label_dim=C, soft_labels=False,
                           box_dtype="float32") as writer:
        with pytest.raises(ValueError, match=r"image 'inf': norm_bb has NaN or infinite values, first in row 1"):
            writer.add("inf", features, norm_bb, conf)


def test_flush_after_close_is_refused(tmp_path):
    writer = RegionStoreWriter(tmp_path / "s", feature_dim=D, label_dim=C)
    writer.add("a", *_arrays(1))
    writer.close()
    assert writer.closed
    with pytest.raises(ValueError, match="the writer is closed"):
        writer.flush()


def test_a_new_writer_removes_every_uncommitted_shard(tmp_path):
    writer = RegionStoreWriter(tmp_path / "s", feature_dim=D, label_dim=C, shard_bytes=64)
    for i in range(3):  # one record per shard: three shard files, no index
        writer.add(f"old{i}", *_arrays(2, seed=i))
    writer.abort()
    assert len(list((tmp_path / "s").glob("shard-*.rgs"))) == 3
    with pytest.warns(UserWarning, match="removing 3 uncommitted shard file"):
        _write(tmp_path / "s", {"new": _arrays(1)})
    assert sorted(p.name for p in (tmp_path / "s").glob("shard-*.rgs")) == ["shard-00000.rgs"]


# ---------------------------------------------------------------------------------------------------------
# appending
# ---------------------------------------------------------------------------------------------------------


def test_appending_without_soft_labels_ignores_the_writers_label_dim(tmp_path):
    # label_dim means nothing in a store without soft labels: the writer's default (1601) must not clash
    path, images = _small_store(tmp_path, soft_labels=False)
    with RegionStoreWriter(path, feature_dim=D, soft_labels=False, append=True) as writer:
        writer.add("late", *_arrays(2, seed=9, soft=False))
    store = RegionStore(path)
    assert store.label_dim == C and list(store) == list(images) + ["late"]
    assert store.verify_all() == []
    np.testing.assert_array_equal(store["late"].features, _arrays(2, seed=9, soft=False)[0])


def test_append_refuses_a_last_shard_one_byte_short_and_names_the_store(tmp_path):
    path, _ = _small_store(tmp_path)
    shard = path / "shard-00000.rgs"
    size = os.path.getsize(shard)
    os.truncate(shard, size - 1)
    with pytest.raises(RegionStoreError, match=rf"truncated: the index says it holds {size} bytes, the file has "
                                               rf"{size - 1}"):
        RegionStoreWriter(path, feature_dim=D, label_dim=C, append=True)
    with pytest.raises(ValueError, match=rf"^{path}: the store has feature_dim={D}"):
        RegionStoreWriter(path, feature_dim=D + 1, label_dim=C, append=True)


# ---------------------------------------------------------------------------------------------------------
# the reader's arguments, lookups and buffers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"verify": ""}, "verify must be one of"),
    ({"verify": None}, "verify must be one of"),
    ({"threads": 0}, "threads must be at least 1, got 0"),
])
def test_reader_refuses_bad_verify_and_threads(tmp_path, kwargs, message):
    path, _ = _small_store(tmp_path)
    with pytest.raises(ValueError, match=message):
        RegionStore(path, **kwargs)


def test_default_copy_threads_are_the_usable_cores_at_most_four_and_one_in_a_worker(tmp_path, monkeypatch):
    path, _ = _small_store(tmp_path)
    store, given = RegionStore(path), RegionStore(path, threads=3)
    assert store.threads == min(4, len(os.sched_getaffinity(0)))
    assert store._copy_threads() == store.threads and given._copy_threads() == 3
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as inside a DataLoader worker
    assert store._copy_threads() == 1 and given._copy_threads() == 3  # asked for explicitly: kept


def test_a_pickled_store_keeps_its_thread_setting_and_its_worker_default(tmp_path, monkeypatch):
    path, _ = _small_store(tmp_path)
    given = pickle.loads(pickle.dumps(RegionStore(path, threads=3)))
    default = pickle.loads(pickle.dumps(RegionStore(path)))  # as sent to a spawned DataLoader worker
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    assert given.threads == 3 and given._copy_threads() == 3
    assert default._copy_threads() == 1  # the default stays "1 inside a DataLoader worker"


def test_repr_names_path_size_and_settings(tmp_path):
    path, _ = _small_store(tmp_path, count=3)
    assert repr(RegionStore(path, verify="never")) == (f"RegionStore('{path}', 3 images, feature_dim={D}, "
                                                       f"soft_labels=True, verify='never')")


def test_lookups_take_any_iterable_and_unhashable_ids_are_key_errors(tmp_path):
    path, images = _small_store(tmp_path)
    store = RegionStore(path)
    wanted = ["im3", "im0", "im3"]
    expected_counts = [len(images[i][2]) for i in wanted]
    assert store.positions(iter(wanted)).tolist() == [3, 0, 3]
    assert store.region_counts(i for i in wanted).tolist() == expected_counts
    with pytest.raises(KeyError, match=r"image '\['im0'\]' is not in the region store"):
        store[["im0"]]


def test_region_counts_is_a_copy(tmp_path):
    path, images = _small_store(tmp_path)
    store = RegionStore(path)
    counts = store.region_counts()
    counts[:] = 99
    assert store.num_regions("im2") == len(images["im2"][2])
    assert store.region_counts().tolist() == [len(arrays[2]) for arrays in images.values()]


def test_gather_refuses_other_dtypes_by_name(tmp_path):
    path, _ = _small_store(tmp_path)
    with pytest.raises(ValueError, match="dtype must be torch.float16 or torch.float32, got torch.float64"):
        RegionStore(path).gather(["im1"], dtype=torch.float64)


def test_out_buffers_of_exactly_the_batch_size_are_filled(tmp_path):
    path, images = _small_store(tmp_path)
    ids = ["im1", "im3"]
    total = sum(len(images[i][2]) for i in ids)
    out = RegionBatch.empty(total, len(ids), feature_dim=D, label_dim=C, dtype=torch.float32, soft_labels=True)
    batch = RegionStore(path).gather(ids, dtype=torch.float32, soft_labels=True, out=out)
    assert batch.features.data_ptr() == out.features.data_ptr()
    for got, field in ((batch.features, 0), (batch.soft_labels, 3)):
        np.testing.assert_array_equal(got.numpy(), np.concatenate([images[i][field] for i in ids]).astype(np.float32))


def test_out_buffers_off_the_cpu_are_refused_by_name(tmp_path):
    path, _ = _small_store(tmp_path)
    out = RegionBatch.empty(8, 2, feature_dim=D, label_dim=C)
    out = RegionBatch(out.features.to("meta"), out.boxes, None, out.offsets)
    with pytest.raises(ValueError, match=r"gather\(out=...\): features must be a contiguous CPU tensor"):
        RegionStore(path).gather(["im1"], out=out)


def test_pinned_batches_keep_the_asked_dtype(tmp_path, monkeypatch):
    # the pinned branch, taken on any machine by saying pinning works (RegionBatch.empty then pins if it can)
    path, images = _small_store(tmp_path)
    monkeypatch.setattr(region_store, "can_pin", lambda: True)
    monkeypatch.setattr("uniter_fast.data.region_batch._PIN_WARNED", True)
    batch = RegionStore(path).gather(["im2"], dtype=torch.float32, soft_labels=True, pin_memory=True)
    assert batch.features.dtype == torch.float32 and batch.soft_labels.dtype == torch.float32
    np.testing.assert_array_equal(batch.features.numpy(), images["im2"][0].astype(np.float32))


def test_prefetch_depth_must_be_positive(tmp_path):
    path, _ = _small_store(tmp_path)
    with pytest.raises(ValueError, match="depth must be at least 1, got 0"):
        RegionStore(path).prefetch([["im0"]], depth=0)


def test_verify_all_checks_only_the_ids_given(tmp_path):
    path, _ = _small_store(tmp_path)
    store = RegionStore(path)
    shard, offset, _ = store.location("im2")
    _patch(shard, offset + 64, "<H", 0x7BFF)  # a feature value (features start at byte 64): im2 is damaged
    assert store.verify_all(["im0", "im3"]) == []
    assert [image_id for image_id, _ in store.verify_all(iter(["im3", "im2"]))] == ["im2"]


# ---------------------------------------------------------------------------------------------------------
# index and shard fields the reader refuses (index: 64-byte header, S u64 shard sizes, 40-byte rows
# [offset u64, nbytes u64, shard, n, crc, crc_soft, id_len, reserved], the ids, CRC-32 of [64, end - 4))
# ---------------------------------------------------------------------------------------------------------

ROWS = 64 + 8  # where the record table starts in a one-shard index; the ids follow its 4 rows


def _extend_index(path) -> None:
    """Eight zero bytes between the id table and the trailing checksum, the checksum made to match."""
    body = (path / "index.rsi").read_bytes()[:-4] + bytes(8)
    (path / "index.rsi").write_bytes(body + struct.pack("<I", zlib.crc32(body[64:])))


@pytest.mark.parametrize("edit, message", [
    (lambda path: _patch(path / "index.rsi", 64, "<Q", os.path.getsize(path / "shard-00000.rgs") - 64,
                         crc_span=(64, -4)),  # shard 0 commits one line less than its last record needs
     r"index.rsi: entry 3 \('im3'\): inconsistent offset/size"),
    (lambda path: _patch(path / "index.rsi", ROWS + 40 + 36, "<I", 1, crc_span=(64, -4)),  # row 1's reserved
     r"index.rsi: entry 1 \('im1'\): reserved fields are not zero"),
    (_extend_index, "index.rsi: the id table does not end where the file does"),
    (lambda path: _patch(path / "index.rsi", ROWS + 4 * 40 + 3, "3s", b"im0", crc_span=(64, -4)),  # im1 -> im0
     "index.rsi: the index lists an image id twice"),
], ids=["beyond-committed-size", "reserved-field", "bytes-after-ids", "duplicate-id"])
def test_inconsistent_index_is_refused_naming_file_and_entry(tmp_path, edit, message):
    path, _ = _small_store(tmp_path)
    edit(path)
    with pytest.raises(RegionStoreError, match=message):
        RegionStore(path)


def test_shard_of_another_format_version_is_refused_naming_it(tmp_path):
    path, _ = _small_store(tmp_path)
    _patch(path / "shard-00000.rgs", 8, "<I", 2, crc_span=(0, 60))
    with pytest.raises(CorruptRecordError, match=r"shard-00000\.rgs: format version 2, this reader knows 1 "
                                                 r"\(reading image 'im1'\)"):
        RegionStore(path).gather(["im1"])


def test_record_id_length_is_checked_against_the_index_without_checksums(tmp_path):
    path, _ = _small_store(tmp_path)
    store = RegionStore(path, verify="never")
    shard, offset, _ = store.location("im2")
    _patch(shard, offset + 20, "<I", 2)
    with pytest.raises(CorruptRecordError, match="image 'im2'.*record header disagrees with the index"):
        store.gather(["im2"])


def test_a_shard_cut_inside_its_last_line_still_reads_as_truncated(tmp_path):
    path, _ = _small_store(tmp_path)
    shard = path / "shard-00000.rgs"
    os.truncate(shard, os.path.getsize(shard) - 10)  # within the last record's zero padding
    store = RegionStore(path, verify="never")
    store.gather(["im0"])
    for read in (lambda: store.gather(["im3"]), lambda: store["im3"]):
        with pytest.raises(CorruptRecordError, match=r"image 'im3'.*truncated: the record ends at byte"):
            read()


def test_native_gather_checks_positions_and_every_output_dimension(tmp_path):
    path, images = _small_store(tmp_path)
    native = RegionStore(path)._store
    n = len(images["im1"][2])

    def gather(positions, boxes_width=7, features_width=D):
        native.gather(np.array(positions, np.int64), np.empty((n, features_width), np.float16),
                      np.empty((n, boxes_width), np.float32), np.empty(len(positions) + 1, np.int64), None, 1, 1)

    with pytest.raises(IndexError, match="position 4 outside the store's 4 records"):
        gather([4])
    with pytest.raises(IndexError, match="position 4 outside"):
        native.read_record(4, np.empty(64, np.uint8), 1)
    with pytest.raises(ValueError, match=rf"boxes: expected shape \({n}, 7\), got \({n}, 6\)"):
        gather([1], boxes_width=6)
    with pytest.raises(ValueError, match=rf"features: expected shape \({n}, {D}\), got \({n}, {D + 1}\)"):
        gather([1], features_width=D + 1)


# ---------------------------------------------------------------------------------------------------------
# verification state
# ---------------------------------------------------------------------------------------------------------


def test_first_verifies_soft_labels_once_per_process(tmp_path):
    path, images = _small_store(tmp_path)
    store = RegionStore(path, verify="first")
    store.gather(["im3"], soft_labels=True)  # both checksums verified now
    shard, offset, _ = store.location("im3")
    # n = 4, id "im3": features at 64 (128 bytes), boxes at align(192) = 192 (48 bytes), conf at align(240) = 256
    # (8 bytes), soft labels at align(264) = 320
    _patch(shard, offset + 320, "<H", 0x3C00)  # soft label [0, 0] := 1.0; the shared mapping shows it
    assert images["im3"][3][0, 0] != 1.0
    again = store.gather(["im3"], soft_labels=True)  # not checked again: the changed value comes through
    assert again.soft_labels[0, 0].item() == 1.0
    with pytest.raises(CorruptRecordError, match="image 'im3'.*checksum mismatch in soft labels"):
        RegionStore(path, verify="first").gather(["im3"], soft_labels=True)


# ---------------------------------------------------------------------------------------------------------
# Ahead
# ---------------------------------------------------------------------------------------------------------


def test_ahead_queues_at_most_depth_items_and_waits_for_a_slow_consumer():
    drawn: list = []

    def items():
        for i in range(6):
            drawn.append(i)
            yield i

    with Ahead(items(), 1, "test depth") as ahead:
        assert next(ahead) == 0
        for _ in range(200):  # until the producer waits for room
            if ahead._queue.full():
                break
            ahead._thread.join(0.01)
        ahead._thread.join(0.5)  # the consumer is slow: longer than one wait for room
        assert ahead._thread.is_alive()  # still waiting to hand over its item, not gone
        assert ahead._queue.qsize() == 1 and len(drawn) <= 3  # one consumed, one queued, one waiting
        assert list(ahead) == [1, 2, 3, 4, 5]
