"""Region batch buffers on their own (data/region_batch.py): which pooled buffer is handed out, what the pool keeps,
and when a prefetch ring slot's buffers are replaced. The store-level tests are in test_region_store.py."""
import numpy as np
import torch

from uniter_fast.data.region_batch import BufferPool, RegionBatch, _big_enough


def test_buffer_pool_hands_out_only_free_buffers_smallest_fit_first():
    pool = BufferPool()
    big, small = pool.take(20 << 20), pool.take(3 << 20)
    assert big.nbytes >= 20 << 20 and small.nbytes >= 3 << 20 and len(pool) == 2
    big_at, small_at = big.ctypes.data, small.ctypes.data
    assert big_at != small_at
    del big, small
    first = pool.take(1 << 20)
    assert first.ctypes.data == small_at  # the smallest free buffer that fits
    second = pool.take(1 << 20)
    assert second.ctypes.data == big_at  # `first` is still referenced: never handed out twice
    third = pool.take(1 << 20)
    assert len(pool) == 3 and third.ctypes.data not in (big_at, small_at)


def test_buffer_pool_drops_free_buffers_beyond_its_cap():
    capped = BufferPool(max_free_bytes=8 << 20)
    held = capped.take(4 << 20)
    del held
    kept = capped.take(16 << 20)  # the free 6 MiB buffer is too small, and keeping it would pass the cap
    assert len(capped) == 1 and kept.nbytes >= 16 << 20
    roomy = BufferPool(max_free_bytes=1 << 30)
    held = roomy.take(4 << 20)
    del held
    roomy.take(16 << 20)
    assert len(roomy) == 2


class _Store:
    """What _big_enough reads from a RegionStore."""
    feature_dim, label_dim = 4, 3

    def __init__(self, counts):
        self.counts = counts

    def region_counts(self, ids):
        return np.array([self.counts[i] for i in ids], dtype=np.int64)


def test_ring_buffers_are_replaced_when_regions_or_images_do_not_fit():
    store = _Store({"big": 40, **{f"one{i}": 1 for i in range(5)}})
    kwargs = {"dtype": torch.float32, "soft_labels": True}
    buffers = RegionBatch.empty(50, 2, feature_dim=4, label_dim=3, dtype=torch.float32, soft_labels=True)
    assert _big_enough(store, buffers, ["big", "one0"], kwargs) is buffers
    many = [f"one{i}" for i in range(5)]  # 5 regions fit, 5 images' offsets do not
    new = _big_enough(store, buffers, many, kwargs)
    assert new is not buffers and new.offsets.shape[0] >= 6 and new.features.shape[0] >= 5
    larger = _big_enough(store, buffers, ["big", "big"], kwargs)
    assert larger is not buffers and larger.features.shape[0] >= 80
    for batch in (new, larger, _big_enough(store, None, ["big"], kwargs)):
        assert batch.features.dtype == torch.float32 and batch.features.shape[1] == 4
        assert batch.soft_labels is not None and batch.soft_labels.shape[1] == 3
