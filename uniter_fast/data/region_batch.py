"""Region batches: the packed layout `RegionStore.gather` fills, the memory it fills, and prefetching.

Kept apart from the store itself: this is about buffers (reused, pinned or recycled) and threads, not about
the format.
"""
from __future__ import annotations

import collections.abc
import mmap
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import torch

from uniter_fast.data.ahead import Ahead

if TYPE_CHECKING:
    from uniter_fast.data.region_store import RegionStore

POOL_FREE_BYTES = 1 << 30  # batch buffers a store keeps for reuse once nothing references them

_PIN_OK: bool | None = None  # whether pinned host memory exists here, found out on first use
_PIN_WARNED = False


def can_pin() -> bool:
    """Whether pinned host memory exists here; warns once where it does not (as DataLoader does)."""
    global _PIN_OK, _PIN_WARNED
    if _PIN_OK is None:
        try:
            torch.empty(1, pin_memory=True)
            _PIN_OK = True
        except RuntimeError:
            _PIN_OK = False
    if not _PIN_OK and not _PIN_WARNED:
        warnings.warn("pin_memory=True but no accelerator is available: region batches use ordinary memory",
                      stacklevel=3)
        _PIN_WARNED = True
    return _PIN_OK


@dataclass
class RegionBatch:
    """A batch of images' regions, packed: image b's rows are offsets[b]:offsets[b+1].

    features (T, D) fp16/fp32, boxes (T, 7) fp32 ([x1, y1, x2, y2, w, h, w*h]), soft_labels (T, C) or None,
    offsets (B+1,) int64. Passed as `out=` to `RegionStore.gather`, its buffers are refilled in place (a batch
    returned by gather remembers the full buffers it was cut from, so it can be passed back as `out=`).
    """

    features: torch.Tensor
    boxes: torch.Tensor
    soft_labels: torch.Tensor | None
    offsets: torch.Tensor
    _buffers: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, max_regions: int, batch_size: int, *, feature_dim: int = 2048, label_dim: int = 1601,
              dtype: torch.dtype = torch.float16, soft_labels: bool = False,
              pin_memory: bool = False) -> "RegionBatch":
        """Buffers for batches of up to `batch_size` images and `max_regions` regions in all, to pass as `out=`."""
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
        pin = pin_memory and can_pin()
        features = torch.empty((max_regions, feature_dim), dtype=dtype, pin_memory=pin)
        boxes = torch.empty((max_regions, 7), dtype=torch.float32, pin_memory=pin)
        soft = torch.empty((max_regions, label_dim), dtype=dtype, pin_memory=pin) if soft_labels else None
        offsets = torch.empty(batch_size + 1, dtype=torch.int64, pin_memory=pin)
        return cls(features, boxes, soft, offsets)

    @property
    def batch_size(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def total_regions(self) -> int:
        return self.features.shape[0]

    @property
    def num_regions(self) -> torch.Tensor:
        """(B,) regions per image."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def nbytes(self) -> int:
        tensors = [self.features, self.boxes, self.offsets] + ([self.soft_labels] if self.soft_labels is not None
                                                               else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RegionBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return RegionBatch(move(self.features), move(self.boxes), move(self.soft_labels), move(self.offsets))

    def _full(self) -> tuple:
        return self._buffers if self._buffers is not None else (self.features, self.boxes, self.soft_labels,
                                                                self.offsets)


class BufferPool:
    """Memory for the batches `gather` returns when no `out=` is given, recycled once nothing refers to it.

    A fresh 20-200 MB tensor per batch costs more than the gather itself: every 4 KiB page faults and is
    zeroed on first write (about 1.3 GB/s here, against 8 GB/s into a reused buffer). So the memory comes
    from anonymous mappings advised to use huge pages, and a buffer is handed out again only when its
    reference count shows that no tensor, view or array made from it is alive: reuse without a contract.
    """

    def __init__(self, max_free_bytes: int = POOL_FREE_BYTES):
        self.max_free_bytes = max_free_bytes
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def _is_free(self, i: int) -> bool:
        # the list's reference and getrefcount's argument: nothing outside the pool holds the buffer
        return sys.getrefcount(self._buffers[i]) <= 2

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            free = [i for i in range(len(self._buffers)) if self._is_free(i)]
            fits = [i for i in free if self._buffers[i].nbytes >= nbytes]
            if fits:
                return self._buffers[min(fits, key=lambda i: self._buffers[i].nbytes)]
            size = _round_up(nbytes + nbytes // 8, 2 << 20)  # room for the next, slightly larger batch
            # keep the free buffers and the new one within the cap, dropping the smallest first (they fit fewer
            # batches)
            free.sort(key=lambda i: self._buffers[i].nbytes)
            kept_bytes = sum(self._buffers[i].nbytes for i in free)
            drop = set()
            for i in free:
                if kept_bytes + size <= self.max_free_bytes:
                    break
                drop.add(i)
                kept_bytes -= self._buffers[i].nbytes
            self._buffers = [b for i, b in enumerate(self._buffers) if i not in drop]
            memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                memory.madvise(mmap.MADV_HUGEPAGE)
            buffer = np.frombuffer(memory, dtype=np.uint8)
            self._buffers.append(buffer)
            return buffer

    def __len__(self) -> int:
        return len(self._buffers)


def _round_up(x: int, to: int) -> int:
    return (x + to - 1) // to * to


def carve(buffer: np.ndarray, shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Tensors of these shapes and dtypes laid out one after another in `buffer`, each 4 KiB aligned."""
    tensors, at = [], 0
    for shape, dtype in shapes:
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = int(np.prod(shape)) * itemsize
        view = buffer[at:at + nbytes].view(torch.empty((), dtype=dtype).numpy().dtype).reshape(shape)
        tensors.append(torch.from_numpy(view))
        at = _round_up(at + nbytes, 4096)
    return tensors


def carved_bytes(shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
    return sum(_round_up(int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size(), 4096)
               for shape, dtype in shapes)


class Prefetcher(Ahead):
    """The iterator `RegionStore.prefetch` returns: a thread gathers ahead into a bounded queue.

    close() (or leaving a `with` block, or dropping the iterator) stops the thread.
    """

    def __init__(self, store: "RegionStore", batches: Iterable[Sequence[str]], depth: int, reuse: bool,
                 gather_kwargs: dict):
        super().__init__(_gathered(store, iter(batches), depth + 2 if reuse else 0, gather_kwargs), depth,
                         "RegionStore.prefetch")


def _big_enough(store: "RegionStore", buffers: RegionBatch | None, ids: Sequence[str],
                gather_kwargs: dict) -> RegionBatch:
    """`buffers` if this batch fits in them, else new ones with some room to grow (a ring slot's buffers)."""
    total = int(store.region_counts(ids).sum())
    if buffers is not None:
        features, _, _, offsets = buffers._full()
        if features.shape[0] >= total and offsets.shape[0] >= len(ids) + 1:
            return buffers
    return RegionBatch.empty(total + total // 4 + 1, len(ids) + len(ids) // 4 + 1, feature_dim=store.feature_dim,
                             label_dim=store.label_dim, dtype=gather_kwargs.get("dtype", torch.float16),
                             soft_labels=gather_kwargs.get("soft_labels", False),
                             pin_memory=gather_kwargs.get("pin_memory", False))


def _gathered(store: "RegionStore", batches: Iterator, ring_size: int, gather_kwargs: dict) -> Iterator[RegionBatch]:
    # With reuse, a ring of depth + 2 buffer sets: one being consumed, `depth` queued, one being filled.
    ring: list[RegionBatch | None] = [None] * ring_size
    for k, ids in enumerate(batches):
        if not isinstance(ids, collections.abc.Sized):
            ids = list(ids)
        out = None
        if ring_size:
            out = _big_enough(store, ring[k % ring_size], ids, gather_kwargs)
        batch = store.gather(ids, out=out, **gather_kwargs)
        if ring_size:
            ring[k % ring_size] = batch
        yield batch
