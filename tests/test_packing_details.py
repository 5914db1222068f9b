"""Details of the packed batch (data/packing.py), the region batch buffers (data/region_batch.py) and the training
batch stream (train/batches.py) that the broader tests leave open: exact layouts worked out by hand, the dtypes the
docstrings promise, errors that name the sample, and what is moved, pinned, recycled or reused."""
from __future__ import annotations

import dataclasses
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import uniter_fast.data.region_batch as region_batch
from uniter_fast.data import RegionStore, RegionStoreWriter
from uniter_fast.data.packing import PackedBatch, PackedRegions, pack_batch
from uniter_fast.data.region_batch import BufferPool, RegionBatch, _big_enough, carve, carved_bytes
from uniter_fast.data.synthetic import WorldConfig
from uniter_fast.objectives.tasks import PretrainBatch
from uniter_fast.train.batches import BatchPlan, TaskStreams, training_batches
from uniter_fast.train.config import DataOptions, PretrainConfig
from uniter_fast.train.loop import build_synthetic_data
from uniter_fast.train.tasks import TaskSampler


# ---------------------------------------------------------------------------------------------------------------
# packing: one small batch whose layout is worked out by hand
# ---------------------------------------------------------------------------------------------------------------

def _hand_batch(**kwargs) -> PackedBatch:
    """Sample 0: 3 tokens + 2 regions; sample 1: 2 tokens, no regions; sample 2: 4 tokens + 1 region (img_dim 4).

    Packed rows: 0-2 text 0, 3-4 regions 0, 5-6 text 1, 7-10 text 2, 11 region 2."""
    texts = [torch.tensor([101, 7, 102]), torch.tensor([101, 102]), torch.tensor([101, 8, 9, 102])]
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.25, 0.5, 0.25]])
    regions = [(torch.arange(8.0).reshape(2, 4), boxes.repeat(2, 1)), None, (torch.ones(1, 4), boxes)]
    return pack_batch(texts, regions, **kwargs)


def test_hand_computed_layout_of_a_small_batch():
    batch = _hand_batch()
    assert batch.batch_size == 3
    assert batch.cu_seqlens.tolist() == [0, 5, 7, 12]
    assert batch.text_rows.tolist() == [0, 1, 2, 5, 6, 7, 8, 9, 10]
    assert batch.region_rows.tolist() == [3, 4, 11]
    # packed row r takes cat(9 text embeddings, 3 region embeddings)[gather_index[r]]
    assert batch.gather_index.tolist() == [0, 1, 2, 9, 10, 3, 4, 5, 6, 7, 8, 11]
    assert batch.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert (batch.max_seqlen, batch.max_text_len, batch.max_regions) == (5, 4, 2)
    # the area column: w * h = 0.5 * 0.25
    assert batch.img_pos[:, 6].tolist() == [0.125] * 3


def test_lengths_and_offsets_are_int32_as_documented():
    batch = _hand_batch()
    assert batch.text_lens.dtype == batch.region_lens.dtype == batch.cu_seqlens.dtype == torch.int32
    assert batch.text_lens.tolist() == [3, 2, 4] and batch.region_lens.tolist() == [2, 0, 1]


def test_maxima_are_per_sample_not_per_modality():
    """The longest sample (text + regions) is not the longest text plus the most regions."""
    batch = pack_batch([torch.tensor([1, 2, 3, 4, 5]), torch.tensor([1, 2])],
                       [None, (torch.zeros(4, 3), torch.zeros(4, 6))])
    assert (batch.max_seqlen, batch.max_text_len, batch.max_regions) == (6, 5, 4)
    assert batch.pad_text(torch.zeros(batch.total_tokens, 1)).shape == (2, 5, 1)
    assert batch.pad_regions(torch.zeros(batch.total_tokens, 1)).shape == (2, 4, 1)


def test_a_text_only_batch_has_empty_seven_column_positions():
    batch = pack_batch([torch.tensor([1, 2]), torch.tensor([1, 3, 2])], [None, None])
    assert batch.img_pos.shape == (0, 7) and batch.img_pos.dtype == torch.float32
    assert batch.img_feat.shape[0] == 0 and batch.region_rows.numel() == 0
    assert batch.gather_index.tolist() == list(range(5))


def test_seven_column_fp16_boxes_of_a_sample_become_fp32_positions():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.25]], dtype=torch.float16)
    batch = pack_batch([torch.tensor([1, 2])], [(torch.zeros(1, 3), boxes)])
    assert batch.img_pos.dtype == torch.float32 and batch.img_pos.tolist() == boxes.float().tolist()


class _Recorder(TorchFunctionMode):
    """Records Tensor.to / Tensor.pin_memory calls; pin_memory returns a clone (no pinned memory on a CPU box)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, dict]] = []
        self.pinned: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.pin_memory:
            self.pinned.append(args[0].clone())
            return self.pinned[-1]
        if func is torch.Tensor.to:
            self.calls.append(("to", kwargs))
        return func(*args, **kwargs)


def _tensor_fields(batch: PackedBatch) -> dict:
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor)}


def test_to_moves_every_tensor_and_passes_non_blocking_on():
    batch = _hand_batch(img_masks=[np.array([True, False]), np.zeros(0, bool), np.array([True])])
    with _Recorder() as recorder:
        moved = batch.to("meta", non_blocking=True)
    assert all(t.device.type == "meta" for t in _tensor_fields(moved).values())
    assert len(recorder.calls) == len(_tensor_fields(batch)) == 13  # the dataclass's 13 tensor fields
    assert all(kwargs.get("non_blocking") is True for _, kwargs in recorder.calls)
    assert (moved.max_seqlen, moved.max_text_len, moved.max_regions) == (5, 4, 2)


def test_pin_memory_pins_every_tensor_and_keeps_the_ints():
    batch = _hand_batch()
    with _Recorder() as recorder:
        pinned = batch.pin_memory()
    fields = _tensor_fields(pinned)
    assert len(recorder.pinned) == len(fields) == 12  # img_masks is None here
    assert all(any(t is p for p in recorder.pinned) for t in fields.values())
    assert pinned.img_masks is None and pinned.max_seqlen == 5


def test_sample_errors_name_the_sample_and_the_shapes():
    one = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"sample 1: text ids must be 1-D, got shape \(1, 2\)"):
        pack_batch([one, one[None]], [None, None])
    with pytest.raises(ValueError, match=r"sample 0: token_type_ids shape \(3,\) does not match its text \(2,\)"):
        pack_batch([one], [None], token_type_ids=[np.zeros(3, int)])
    region = (torch.zeros(2, 4), torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"sample 1: img_masks shape \(1,\) does not match its 2 regions"):
        pack_batch([one, one], [region, region], img_masks=[np.zeros(2, bool), np.zeros(1, bool)])
    with pytest.raises(ValueError, match=r"sample 0: img_type_ids shape \(2, 1\) does not match its 2 regions"):
        pack_batch([one], [region], img_type_ids=[np.ones((2, 1), int)])
    with pytest.raises(ValueError, match=r"sample 1: regions must be \(features, boxes\) or None"):
        pack_batch([one, one], [region, (*region, torch.zeros(2, 3))])
    with pytest.raises(ValueError, match=r"sample 0: regions must be \(features, boxes\) or None"):
        pack_batch([one], [3])
    with pytest.raises(ValueError, match=r"sample 1: features \(3, 4\) and boxes \(2, 6\) must be"):
        pack_batch([one, one], [region, (torch.zeros(3, 4), torch.zeros(2, 6))])
    with pytest.raises(ValueError, match=r"sample 0: features \(2,\) and boxes \(2, 6\) must be"):
        pack_batch([one], [(torch.zeros(2), torch.zeros(2, 6))])
    with pytest.raises(ValueError, match=r"packed regions of features \(3,\) and boxes \(3, 7\) do not hold"):
        pack_batch([one], PackedRegions(torch.zeros(3), torch.zeros(3, 7), [3]))


# ---------------------------------------------------------------------------------------------------------------
# region batches: buffers, the pool, carving, and the prefetch ring
# ---------------------------------------------------------------------------------------------------------------

MiB = 1 << 20
REGIONS = {"a": 2, "b": 3, "c": 1}  # regions of each stored image; every feature of image k is k + 1


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "store"
    with RegionStoreWriter(path, feature_dim=4, label_dim=3) as writer:
        for k, (image_id, n) in enumerate(REGIONS.items()):
            box = np.tile(np.array([0, 0, 0.5, 0.5, 0.5, 0.5], np.float16), (n, 1))
            writer.add(image_id, np.full((n, 4), k + 1, np.float16), box, np.ones(n, np.float16),
                       np.full((n, 3), 1 / 3, np.float16))
    return RegionStore(path)


def _features_of(ids) -> list[float]:
    """What column 0 of a gather of `ids` holds, from REGIONS alone."""
    names = list(REGIONS)
    return [float(names.index(i) + 1) for i in ids for _ in range(REGIONS[i])]


def test_can_pin_warns_once_and_only_where_pinning_is_missing(monkeypatch):
    for pin_ok, warnings_expected in ((False, 1), (True, 0)):
        monkeypatch.setattr(region_batch, "_PIN_OK", pin_ok)
        monkeypatch.setattr(region_batch, "_PIN_WARNED", False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert [region_batch.can_pin() for _ in range(3)] == [pin_ok] * 3
        assert len(caught) == warnings_expected, pin_ok


def test_empty_buffers_have_the_documented_shapes_and_dtypes(monkeypatch):
    monkeypatch.setattr(region_batch, "_PIN_OK", False)  # asked to pin where it cannot: ordinary memory, no error
    monkeypatch.setattr(region_batch, "_PIN_WARNED", True)
    batch = RegionBatch.empty(5, 3, feature_dim=4, label_dim=6, soft_labels=True, pin_memory=True)
    assert (batch.features.shape, batch.features.dtype) == ((5, 4), torch.float16)
    assert (batch.boxes.shape, batch.boxes.dtype) == ((5, 7), torch.float32)
    assert (batch.soft_labels.shape, batch.soft_labels.dtype) == ((5, 6), torch.float16)
    assert (batch.offsets.shape, batch.offsets.dtype) == ((4,), torch.int64)
    assert (batch.batch_size, batch.total_regions) == (3, 5) and not batch.features.is_pinned()
    with pytest.raises(ValueError, match="dtype must be torch.float16 or torch.float32, got torch.bfloat16"):
        RegionBatch.empty(5, 3, dtype=torch.bfloat16)


def test_region_batch_counts_regions_and_bytes():
    fp16 = torch.float16
    batch = RegionBatch(torch.zeros(5, 4, dtype=fp16), torch.zeros(5, 7), torch.zeros(5, 6, dtype=fp16),
                        torch.tensor([0, 2, 2, 5]))
    assert batch.batch_size == 3 and batch.num_regions.tolist() == [2, 0, 3]
    # features 5*4*2 + boxes 5*7*4 + offsets 4*8 + soft labels 5*6*2 bytes
    assert batch.nbytes == 40 + 140 + 32 + 60
    assert dataclasses.replace(batch, soft_labels=None).nbytes == 40 + 140 + 32
    with _Recorder() as recorder:
        moved = batch.to("meta", non_blocking=True)
    assert all(t.device.type == "meta" for t in (moved.features, moved.boxes, moved.soft_labels, moved.offsets))
    assert [kwargs.get("non_blocking") for _, kwargs in recorder.calls] == [True] * 4


def test_pool_buffers_are_whole_huge_pages_with_an_eighth_to_spare_and_fit_exactly():
    pool = BufferPool()
    # 2 MiB + 1/8 = 2.25 MiB, rounded up to whole 2 MiB pages; 16 MiB + 2 MiB is 18 MiB already
    assert pool.take(2 * MiB).nbytes == 4 * MiB
    buffer = pool.take(16 * MiB)
    assert buffer.nbytes == 18 * MiB
    address = buffer.ctypes.data
    del buffer
    assert pool.take(18 * MiB).ctypes.data == address  # a free buffer of exactly the size asked for is reused
    assert len(pool) == 2


@pytest.mark.parametrize("cap_mib, kept_mib", [(14, [6, 8]), (13, [8])])
def test_pool_drops_the_smallest_free_buffers_only_until_the_new_one_fits_the_cap(cap_mib, kept_mib):
    # free buffers of 2 MiB (asked 1) and 6 MiB (asked 4); asking 7 MiB allocates 8 (7 + 1/8 in whole 2 MiB pages):
    # under 14 MiB, 2 + 6 + 8 is over and 6 + 8 fits, so only the 2 goes; under 13 MiB the 6 goes as well (the
    # cap counts what is allocated, not what was asked: 6 + 7 would have fitted)
    pool = BufferPool(max_free_bytes=cap_mib * MiB)
    small, big = pool.take(1 * MiB), pool.take(4 * MiB)  # two buffers, both free again below
    del small, big
    pool.take(7 * MiB)
    assert sorted(b.nbytes for b in pool._buffers) == [k * MiB for k in kept_mib]


def test_carving_aligns_each_tensor_to_4_kib_and_carved_bytes_agrees():
    shapes = [((1024,), torch.float32), ((3, 5), torch.float16), ((3,), torch.int64)]
    assert carved_bytes(shapes) == 4096 + 4096 + 4096  # 4096 bytes exactly, then 30 and 24 rounded up
    buffer = np.zeros(carved_bytes(shapes), np.uint8)
    tensors = carve(buffer, shapes)
    assert [t.data_ptr() - buffer.ctypes.data for t in tensors] == [0, 4096, 8192]
    assert [(tuple(t.shape), t.dtype) for t in tensors] == [((1024,), torch.float32), ((3, 5), torch.float16),
                                                             ((3,), torch.int64)]


def test_ring_buffers_fit_exactly_and_leave_room_to_grow(small_store):
    exact = RegionBatch.empty(6, 3, feature_dim=4, label_dim=3)  # a, b, c: 6 regions, 3 images
    assert _big_enough(small_store, exact, ["a", "b", "c"], {}) is exact
    short = RegionBatch.empty(6, 2, feature_dim=4, label_dim=3)  # 3 offsets cannot hold 3 images
    assert _big_enough(small_store, short, ["a", "b", "c"], {}) is not short
    # new buffers for 4 images and 8 regions also take a quarter more (5 images, 10 regions) without replacing
    grown = _big_enough(small_store, None, ["a", "b", "c", "a"], {})
    assert grown.features.dtype == torch.float16 and grown.soft_labels is None
    assert _big_enough(small_store, grown, ["a", "b", "c", "a", "a"], {}) is grown


def test_ring_buffers_are_asked_pinned_when_the_gathers_are(small_store, monkeypatch):
    asked = []
    real_empty = RegionBatch.empty.__func__

    def empty(cls, *args, **kwargs):
        asked.append(kwargs.get("pin_memory"))
        return real_empty(cls, *args, **{**kwargs, "pin_memory": False})

    monkeypatch.setattr(RegionBatch, "empty", classmethod(empty))
    _big_enough(small_store, None, ["a"], {"pin_memory": True})
    _big_enough(small_store, None, ["a"], {})
    assert asked == [True, False]


@pytest.mark.parametrize("depth", [1, 2])
def test_reused_buffers_cycle_through_depth_plus_two_slots(small_store, depth):
    """One batch being consumed, `depth` queued, one being filled: batch k refills batch k - depth - 2's buffers."""
    batches = [["a", "b"], ["c", "a"], ["b", "c"]] * 3
    pointers = []
    for ids, got in zip(batches, small_store.prefetch(batches, depth=depth, reuse_buffers=True), strict=True):
        assert got.features.dtype == torch.float16 and got.features[:, 0].tolist() == _features_of(ids)
        pointers.append(got.features.data_ptr())
    ring = depth + 2
    assert len(set(pointers[:ring])) == ring
    assert pointers[ring:] == pointers[:len(batches) - ring]


def test_without_reuse_every_batch_has_memory_of_its_own(small_store):
    batches = [["a", "b"], ["c"], ["b"], ["a", "c"], ["b", "b"]]
    kept = list(small_store.prefetch(batches, depth=1))  # all held at once: none may be overwritten
    assert len({b.features.data_ptr() for b in kept}) == len(batches)
    assert [b.features[:, 0].tolist() for b in kept] == [_features_of(ids) for ids in batches]


def test_reused_buffers_take_batches_given_as_iterators(small_store):
    batches = [["a", "b"], ["c"], ["b", "a", "c"]]
    got = [b.features[:, 0].tolist() for b in small_store.prefetch((iter(ids) for ids in batches), depth=1,
                                                                      reuse_buffers=True)]
    assert got == [_features_of(ids) for ids in batches]


def test_prefetch_queues_depth_batches_and_makes_one_more(small_store, monkeypatch):
    calls = []
    real_gather = RegionStore.gather
    monkeypatch.setattr(RegionStore, "gather",
                        lambda self, ids, **kwargs: calls.append(ids) or real_gather(self, ids, **kwargs))
    for depth in (1, 3):
        calls.clear()
        iterator = small_store.prefetch([["a"]] * 20, depth=depth)
        next(iterator)
        for _ in range(500):  # until the thread has filled the queue and made the one after
            if len(calls) >= 1 + depth + 1:
                break
            time.sleep(0.01)
        time.sleep(0.1)
        assert len(calls) == 1 + depth + 1, depth  # the consumed one, `depth` queued, one waiting to be queued
        iterator.close()


# ---------------------------------------------------------------------------------------------------------------
# training batches: the masking options, the plan's seed, pinning
# ---------------------------------------------------------------------------------------------------------------

SMALL_RUN = PretrainConfig(data=DataOptions(world=WorldConfig(seed=1, num_train_images=8, num_val_images=2,
                                                              captions_per_image=2, max_regions=10), vocab_size=60),
                           train_batch_size=600, num_train_steps=3, gradient_accumulation_steps=1,
                           tasks={"mlm": 1, "mrfr": 1})


@pytest.fixture(scope="module")
def small_corpus():
    return build_synthetic_data(SMALL_RUN).train


def test_region_masking_follows_the_configured_mrm_prob(small_corpus):
    """mrm_prob 1 masks every region of an MRFR batch (the default 0.15 would leave most unmasked)."""
    streams = TaskStreams(small_corpus, ("mlm", "mrfr"), dataclasses.replace(SMALL_RUN, mrm_prob=1.0), rank=0)
    masks = streams.next("mrfr").inputs.img_masks
    assert masks.numel() > 10 and masks.all()


def test_the_run_seed_and_the_rank_both_change_a_batchs_masks(small_corpus):
    streams = TaskStreams(small_corpus, ("mlm", "mrfr"), SMALL_RUN, rank=0)
    plan = streams.plan("mlm")
    rows = streams.make(plan).mlm_rows.tolist()
    for changed in (0, 1):  # (run seed, rank, task, draw): the same examples, another run seed or rank
        seed = tuple(v + 1 if i == changed else v for i, v in enumerate(plan.seed))
        assert streams.make(BatchPlan("mlm", plan.indices, seed)).mlm_rows.tolist() != rows, changed


def test_batches_are_pinned_on_the_making_thread_after_choosing_its_gpu(small_corpus, monkeypatch):
    """No GPU needed: set_device and pin_memory are recorded, and which thread called set_device."""
    chosen, pinned = [], []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append((device, threading.current_thread())))
    monkeypatch.setattr(PretrainBatch, "pin_memory", lambda self: pinned.append(self) or self)
    device = torch.device("cuda", 3)
    streams = TaskStreams(small_corpus, ("mlm", "mrfr"), SMALL_RUN, rank=0)
    got = list(training_batches(streams, TaskSampler(SMALL_RUN.tasks, SMALL_RUN.seed), SMALL_RUN, 1, pin_to=device))
    assert len(got) == 3 and all(any(b is p for p in pinned) for b in got)
    assert [d for d, _ in chosen] == [device] and chosen[0][1] is not threading.main_thread()
