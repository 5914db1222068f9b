"""The region store: every image's BUTD region features in a few memory-mapped shard files.

`RegionStoreWriter` writes the format (docs/region-store.md), `RegionStore` reads it: a Mapping from image id
to that image's arrays, plus `gather`, which copies a batch of images straight into the packed batch layout
(features (T, D), boxes (T, 7), soft labels (T, C), offsets (B+1,)) with the C++ reader
`uniter_fast._regionstore`, the GIL released, on a few threads.

Why this shape: the original loader spends its time in LMDB gets, msgpack decoding, numpy fp16 -> fp32 and Python
collate loops (reference/loader.md). Here a batch is one call that memcpys (or converts, for fp32) from the page
cache into buffers the caller may reuse or pin; ids are resolved to positions in Python once per batch.
"""
from __future__ import annotations

import collections.abc
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.utils.data

from uniter_fast.data.region_batch import BufferPool, Prefetcher, RegionBatch, can_pin, carve, carved_bytes
from uniter_fast.files import replacing

__all__ = ["RegionStore", "RegionStoreWriter", "RegionBatch", "StoredRegions", "RegionStoreError",
           "CorruptRecordError", "record_layout", "FORMAT_VERSION"]

# ---- the format (docs/region-store.md; csrc/format.h is the same in C++) ----
FORMAT_VERSION = 1
INDEX_NAME = "index.rsi"
SHARD_NAME = "shard-{:05d}.rgs"
ALIGN = 64
HEADER_BYTES = 64
RECORD_HEADER_BYTES = 32
SHARD_MAGIC = b"UFREGSHD"
INDEX_MAGIC = b"UFREGIDX"
RECORD_MAGIC = b"UFRR"
FLAG_SOFT_LABELS = 1
FLAG_BOXES_FP32 = 2
FLAG_CONF_FP32 = 4
INDEX_ENTRY = np.dtype([("offset", "<u8"), ("nbytes", "<u8"), ("shard", "<u4"), ("n", "<u4"), ("crc", "<u4"),
                        ("crc_soft", "<u4"), ("id_len", "<u4"), ("reserved", "<u4")])
_SHARD_HEADER = struct.Struct("<8sIIIIIII16s8x")     # + crc32 of these 60 bytes
_INDEX_HEADER = struct.Struct("<8sIIIIIIQ16sI")      # + crc32 of these 60 bytes
_RECORD_HEADER = struct.Struct("<4sIQIIII")          # magic, crc, nbytes, n, id_len, flags, crc_soft
VERIFY = {"never": 0, "first": 1, "always": 2}
MAX_DEFAULT_THREADS = 4


try:  # the C++ reader; its exception classes are the ones raised for damaged stores
    from uniter_fast import _regionstore
    RegionStoreError = _regionstore.RegionStoreError
    CorruptRecordError = _regionstore.CorruptRecordError
    _IMPORT_ERROR: ImportError | None = None
except ImportError as _exc:  # pragma: no cover - only without a build: uniter_fast.data still imports
    _regionstore = None
    _IMPORT_ERROR = _exc

    class RegionStoreError(ValueError):
        """A region store is malformed."""

    class CorruptRecordError(RegionStoreError):
        """One record is damaged, truncated or not what the index says."""


def _native():
    if _regionstore is None:  # pragma: no cover
        raise ImportError("uniter_fast._regionstore (the C++ region store reader) is not built: reinstall with "
                          "`pip install -e .` (needs a C++17 compiler and pybind11)") from _IMPORT_ERROR
    return _regionstore


@dataclass(frozen=True)
class RecordLayout:
    """Byte offsets of a record's sections from the record's start, and its padded size."""

    features: int
    norm_bb: int
    conf: int
    soft_labels: int  # 0 when the store has none
    main_end: int     # the first checksum covers [8, main_end); the soft labels' covers [soft_labels, nbytes)
    nbytes: int


def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


def record_layout(n: int, id_len: int, feature_dim: int, label_dim: int, flags: int) -> RecordLayout:
    features = _align(RECORD_HEADER_BYTES + id_len)
    norm_bb = _align(features + n * feature_dim * 2)
    conf = _align(norm_bb + n * 6 * (4 if flags & FLAG_BOXES_FP32 else 2))
    end = conf + n * (4 if flags & FLAG_CONF_FP32 else 2)
    soft = 0
    if flags & FLAG_SOFT_LABELS:
        soft = _align(end)
        end = soft + n * label_dim * 2
    nbytes = _align(end)
    return RecordLayout(features, norm_bb, conf, soft, soft if flags & FLAG_SOFT_LABELS else nbytes, nbytes)


def _float_dtype(name: str, value: Any) -> np.dtype:
    dtype = np.dtype(value)
    if dtype not in (np.float16, np.float32):
        raise ValueError(f"{name} must be float16 or float32, got {dtype}")
    return dtype


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------


class RegionStoreWriter:
    """Writes images into a region store directory; a context manager.

    The index is the commit point: `flush()` and `close()` (and leaving the `with` block normally) write it
    atomically, and only records it lists exist for readers. Leaving the block with an exception commits
    nothing of this session (a new store is left without an index; an appended one keeps its previous index,
    and the next append cuts the uncommitted tail off). One writer at a time per store.

    `append=True` adds to an existing store (its dimensions and dtypes must match the arguments); without it
    the directory must not hold a store yet. Shards roll over at `shard_bytes` (a record is never split).
    `box_dtype` and `conf_dtype` are how norm_bb and conf are stored (float16 as in the original's image DB,
    or float32); features and soft labels are always float16.
    """

    def __init__(self, path: str | os.PathLike, *, feature_dim: int = 2048, label_dim: int = 1601,
                 soft_labels: bool = True, shard_bytes: int = 1 << 30, append: bool = False,
                 box_dtype: Any = "float16", conf_dtype: Any = "float16"):
        for name, value in (("feature_dim", feature_dim), ("label_dim", label_dim), ("shard_bytes", shard_bytes)):
            if int(value) <= 0 or int(value) != value:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.path = Path(path)
        self.feature_dim, self.label_dim, self.soft_labels = int(feature_dim), int(label_dim), bool(soft_labels)
        self.shard_bytes = int(shard_bytes)
        self.box_dtype = _float_dtype("box_dtype", box_dtype)
        self.conf_dtype = _float_dtype("conf_dtype", conf_dtype)
        self.flags = ((FLAG_SOFT_LABELS if self.soft_labels else 0)
                      | (FLAG_BOXES_FP32 if self.box_dtype == np.float32 else 0)
                      | (FLAG_CONF_FP32 if self.conf_dtype == np.float32 else 0))
        self._file = None
        self._closed = False
        self._entries: list[tuple[int, ...]] = []
        self._ids: list[bytes] = []
        self._known: set[str] = set()
        self._shard_sizes: list[int] = []
        if append:
            self._open_existing()
        else:
            self._create()

    # ---- set-up ----

    def _create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / INDEX_NAME).exists():
            raise FileExistsError(f"{self.path}: a region store is already here; pass append=True (convert "
                                  f"--append) to add to it or choose another directory")
        leftovers = sorted(self.path.glob("shard-*.rgs"))
        if leftovers:  # an earlier writer stopped before its first commit: nothing references these files
            warnings.warn(f"{self.path}: removing {len(leftovers)} uncommitted shard file(s) of an earlier, "
                          f"unfinished write", stacklevel=3)
            for leftover in leftovers:
                leftover.unlink()
        self._uuid = os.urandom(16)

    def _open_existing(self) -> None:
        store = _native().Store(os.fspath(self.path))  # checks the index (FileNotFoundError if there is none)
        theirs = (store.feature_dim, store.label_dim, store.flags)
        if theirs != (self.feature_dim, self.label_dim if self.soft_labels else store.label_dim, self.flags):
            raise ValueError(
                f"{self.path}: the store has feature_dim={store.feature_dim}, label_dim={store.label_dim}, "
                f"soft_labels={bool(store.flags & FLAG_SOFT_LABELS)}, "
                f"box_dtype={'float32' if store.flags & FLAG_BOXES_FP32 else 'float16'}, "
                f"conf_dtype={'float32' if store.flags & FLAG_CONF_FP32 else 'float16'}; the writer was given "
                f"feature_dim={self.feature_dim}, label_dim={self.label_dim}, soft_labels={self.soft_labels}, "
                f"box_dtype={self.box_dtype}, conf_dtype={self.conf_dtype}")
        self.label_dim = store.label_dim
        self._uuid = bytes(store.uuid)
        self._shard_sizes = list(store.shard_sizes)
        entries = np.frombuffer(store.entries_bytes(), dtype=INDEX_ENTRY)
        self._entries = [tuple(int(v) for v in row) for row in entries.tolist()]
        ids = store.image_ids()
        self._ids = [i.encode("utf-8") for i in ids]
        self._known = set(ids)
        if self._shard_sizes:  # continue the last shard, cutting off anything written after its last commit
            last = len(self._shard_sizes) - 1
            shard = self.path / SHARD_NAME.format(last)
            if not shard.exists():
                raise FileNotFoundError(f"{shard}: missing shard file of the store being appended to")
            f = open(shard, "r+b")
            header = f.read(HEADER_BYTES)
            if len(header) < HEADER_BYTES or header[:8] != SHARD_MAGIC or header[36:52] != self._uuid:
                f.close()
                raise RegionStoreError(f"{shard}: not this store's shard (bad header or another store's uuid)")
            size = os.fstat(f.fileno()).st_size
            if size < self._shard_sizes[last]:  # cut off: extending it would hide the damage under new records
                f.close()
                raise RegionStoreError(f"{shard}: truncated: the index says it holds {self._shard_sizes[last]} bytes, "
                                       f"the file has {size}; RegionStore.verify_all() names the images lost")
            f.truncate(self._shard_sizes[last])
            f.seek(self._shard_sizes[last])
            self._file = f

    # ---- writing ----

    def add(self, image_id: str, features, norm_bb, conf, soft_labels=None) -> None:
        """Appends one image: features (n, D), norm_bb (n, 6) [x1, y1, x2, y2, w, h], conf (n,) or (n, 1),
        soft_labels (n, C) when the store has them. Floating-point numpy arrays (or array-likes), finite."""
        if self._closed:
            raise ValueError(f"{self.path}: the writer is closed")
        if not isinstance(image_id, str) or not image_id:
            raise ValueError(f"{self.path}: image ids are non-empty strings, got {image_id!r}")
        if image_id in self._known:
            raise ValueError(f"{self.path}: image '{image_id}' is already in the store (duplicate id)")
        try:
            key = image_id.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{self.path}: image id {image_id!r} is not valid UTF-8 text") from exc

        features = self._field(image_id, "features", features, np.float16, ndim=2)
        n = features.shape[0]
        if n == 0:
            raise ValueError(f"{self.path}: image '{image_id}' has no regions (n == 0)")
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"{self.path}: image '{image_id}': features have {features.shape[1]} columns, the "
                             f"store's feature_dim is {self.feature_dim}")
        norm_bb = self._field(image_id, "norm_bb", norm_bb, self.box_dtype, shape=(n, 6))
        conf = self._field(image_id, "conf", conf, self.conf_dtype, shape=(n,))
        if self.soft_labels:
            if soft_labels is None:
                raise ValueError(f"{self.path}: image '{image_id}': the store keeps soft labels, none were given")
            soft_labels = self._field(image_id, "soft_labels", soft_labels, np.float16, shape=(n, self.label_dim))
        elif soft_labels is not None:
            raise ValueError(f"{self.path}: image '{image_id}': soft labels given, but the store was created with "
                             f"soft_labels=False")

        layout = record_layout(n, len(key), self.feature_dim, self.label_dim, self.flags)
        record = np.zeros(layout.nbytes, dtype=np.uint8)
        record[RECORD_HEADER_BYTES:RECORD_HEADER_BYTES + len(key)] = np.frombuffer(key, dtype=np.uint8)
        for offset, array in ((layout.features, features), (layout.norm_bb, norm_bb), (layout.conf, conf),
                              (layout.soft_labels, soft_labels)):
            if array is not None:
                record[offset:offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        view = memoryview(record)
        crc_soft = zlib.crc32(view[layout.soft_labels:]) if self.soft_labels else 0
        _RECORD_HEADER.pack_into(record, 0, RECORD_MAGIC, 0, layout.nbytes, n, len(key), self.flags, crc_soft)
        crc = zlib.crc32(view[8:layout.main_end])  # covers crc_soft too
        struct.pack_into("<I", record, 4, crc)

        if self._file is None or (self._shard_sizes[-1] > HEADER_BYTES
                                  and self._shard_sizes[-1] + layout.nbytes > self.shard_bytes):
            self._start_shard()
        shard = len(self._shard_sizes) - 1
        offset = self._shard_sizes[shard]
        self._file.write(memoryview(record))
        self._shard_sizes[shard] = offset + layout.nbytes
        self._entries.append((offset, layout.nbytes, shard, n, crc, crc_soft, len(key), 0))
        self._ids.append(key)
        self._known.add(image_id)

    def _field(self, image_id: str, name: str, value, dtype: np.dtype, *, ndim: int | None = None,
               shape: tuple[int, ...] | None = None) -> np.ndarray:
        where = f"{self.path}: image '{image_id}': {name}"
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as err:  # e.g. rows of different lengths
            raise ValueError(f"{where} is not a numeric array: {err}") from None
        if array.dtype.kind != "f":
            raise ValueError(f"{where} must be floating point, got dtype {array.dtype}")
        if shape is not None and name == "conf" and array.shape == (shape[0], 1):
            array = array.reshape(shape)  # the original's conf is (n, 1) in some dumps
        if shape is not None and array.shape != shape:
            raise ValueError(f"{where} has shape {array.shape}, expected {shape}")
        if ndim is not None and array.ndim != ndim:
            raise ValueError(f"{where} has shape {array.shape}, expected {ndim} dimensions")
        with np.errstate(over="ignore"):  # an overflow to inf is reported below, naming the image
            stored = np.ascontiguousarray(array, dtype=dtype)
        finite = np.isfinite(stored)
        if not finite.all():
            row = int(np.argwhere(~finite)[0][0])
            beyond = " (or values beyond float16's range, 65504)" if dtype == np.float16 else ""
            raise ValueError(f"{where} has NaN or infinite values{beyond}, first in row {row}")
        return stored

    def _start_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        number = len(self._shard_sizes)
        self._file = open(self.path / SHARD_NAME.format(number), "wb")
        header = _SHARD_HEADER.pack(SHARD_MAGIC, FORMAT_VERSION, HEADER_BYTES, self.feature_dim, self.label_dim,
                                    self.flags, ALIGN, number, self._uuid)
        self._file.write(header + struct.pack("<I", zlib.crc32(header)))
        self._shard_sizes.append(HEADER_BYTES)

    # ---- committing ----

    def flush(self) -> None:
        """Commits what was added so far: shards synced to disk, then the index replaced atomically."""
        if self._closed:
            raise ValueError(f"{self.path}: the writer is closed")
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        entries = np.array(self._entries, dtype=INDEX_ENTRY) if self._entries else np.zeros(0, INDEX_ENTRY)
        body = b"".join([np.asarray(self._shard_sizes, dtype="<u8").tobytes(), entries.tobytes(),
                         b"".join(self._ids)])
        header = _INDEX_HEADER.pack(INDEX_MAGIC, FORMAT_VERSION, HEADER_BYTES, self.feature_dim, self.label_dim,
                                    self.flags, len(self._shard_sizes), len(self._entries), self._uuid, 0)
        index = self.path / INDEX_NAME
        with replacing(index) as tmp, open(tmp, "wb") as f:
            f.write(header + struct.pack("<I", zlib.crc32(header)))
            f.write(body)
            f.write(struct.pack("<I", zlib.crc32(body)))
            f.flush()
            os.fsync(f.fileno())
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        """Commits and closes; a second call does nothing."""
        if self._closed:
            return
        self.flush()
        self.abort()

    def abort(self) -> None:
        """Closes without committing what was added since the last commit."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._known

    def __enter__(self) -> "RegionStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StoredRegions:
    """One image's arrays as stored (copies, writable): what `pretrain.Regions` reads."""

    image_id: str
    features: np.ndarray              # (n, D) float16
    norm_bb: np.ndarray               # (n, 6) float16 or float32 [x1, y1, x2, y2, w, h]
    conf: np.ndarray                  # (n,) float16 or float32
    soft_labels: np.ndarray | None    # (n, C) float16, None when the store has none

    @property
    def num_regions(self) -> int:
        return self.features.shape[0]


def _default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_THREADS, cores))


class RegionStore(collections.abc.Mapping):
    """A region store opened for reading: image id -> `StoredRegions`, and batch `gather`.

    verify: "first" checks each record's CRC-32 the first time this process reads it, "always" on every read,
    "never" not at all (the record header is checked against the index in every mode). A damaged, truncated or
    missing record raises CorruptRecordError / FileNotFoundError naming the shard file and the image id.
    threads: copy threads per gather (default: the usable cores, at most 4, and 1 inside a DataLoader worker;
    small batches use fewer).

    Shards are memory-mapped lazily, per process: a store opened before DataLoader workers fork maps its files
    again in each worker. Pickling reopens from the path (spawned workers).
    """

    def __init__(self, path: str | os.PathLike, *, verify: str = "first", threads: int | None = None):
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {sorted(VERIFY)}, got {verify!r}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be at least 1, got {threads!r}")
        self.path = Path(path)
        self.verify = verify
        self.threads = _default_threads() if threads is None else int(threads)
        self._threads_given = threads is not None
        if not (self.path / INDEX_NAME).exists():
            raise FileNotFoundError(f"{self.path / INDEX_NAME}: no region store index here (is {self.path} a "
                                    f"region store directory, and was its writer closed?)")
        self._store = _native().Store(os.fspath(self.path))
        self.feature_dim: int = self._store.feature_dim
        self.label_dim: int = self._store.label_dim
        flags = self._store.flags
        self.has_soft_labels = bool(flags & FLAG_SOFT_LABELS)
        self.box_dtype = np.dtype(np.float32 if flags & FLAG_BOXES_FP32 else np.float16)
        self.conf_dtype = np.dtype(np.float32 if flags & FLAG_CONF_FP32 else np.float16)
        self._flags = flags
        self._ids: list[str] = self._store.image_ids()
        self._positions = {image_id: i for i, image_id in enumerate(self._ids)}
        if len(self._positions) != len(self._ids):
            raise RegionStoreError(f"{self._store.index_path}: the index lists an image id twice")
        entries = np.frombuffer(self._store.entries_bytes(), dtype=INDEX_ENTRY)
        self._num_regions = entries["n"].astype(np.int64)
        self._record_bytes = entries["nbytes"].astype(np.int64)
        self._id_len = entries["id_len"].astype(np.int64)
        self._shard = entries["shard"].astype(np.int64)
        self._offset = entries["offset"].astype(np.int64)
        self._pool = BufferPool()

    # ---- Mapping ----

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._positions

    def __getitem__(self, image_id: str) -> StoredRegions:
        pos = self._position(image_id)
        record = np.empty(int(self._record_bytes[pos]), dtype=np.uint8)
        self._store.read_record(pos, record, VERIFY[self.verify])
        n = int(self._num_regions[pos])
        layout = record_layout(n, int(self._id_len[pos]), self.feature_dim, self.label_dim, self._flags)

        def section(offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
            count = int(np.prod(shape))
            return record[offset:offset + count * dtype.itemsize].view(dtype).reshape(shape)

        soft = (section(layout.soft_labels, np.dtype(np.float16), (n, self.label_dim)) if self.has_soft_labels
                else None)
        return StoredRegions(image_id, section(layout.features, np.dtype(np.float16), (n, self.feature_dim)),
                             section(layout.norm_bb, self.box_dtype, (n, 6)),
                             section(layout.conf, self.conf_dtype, (n,)), soft)

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:  # Mapping's would read every record and compare arrays
        return self is other

    def __repr__(self) -> str:
        return (f"RegionStore('{self.path}', {len(self)} images, feature_dim={self.feature_dim}, "
                f"soft_labels={self.has_soft_labels}, verify='{self.verify}')")

    # ---- lookups ----

    def _position(self, image_id: str) -> int:
        try:
            return self._positions[image_id]
        except (KeyError, TypeError):
            raise KeyError(f"image '{image_id}' is not in the region store {self.path}") from None

    def positions(self, image_ids: Iterable[str]) -> np.ndarray:
        """(B,) int64 index positions of these image ids (KeyError naming the first missing one)."""
        if isinstance(image_ids, (str, bytes)):
            raise TypeError("image_ids must be a sequence of ids, not one string")
        ids = image_ids if isinstance(image_ids, collections.abc.Sized) else list(image_ids)
        try:
            return np.fromiter(map(self._positions.__getitem__, ids), dtype=np.int64, count=len(ids))
        except (KeyError, TypeError):
            for image_id in ids:
                self._position(image_id)  # raises, naming the first id that is not here
            raise

    def num_regions(self, image_id: str) -> int:
        return int(self._num_regions[self._position(image_id)])

    def location(self, image_id: str) -> tuple[Path, int, int]:
        """(shard file, byte offset, bytes) of the image's record: where to look when it is reported damaged."""
        pos = self._position(image_id)
        return (Path(self._store.shard_path(int(self._shard[pos]))), int(self._offset[pos]),
                int(self._record_bytes[pos]))

    def region_counts(self, image_ids: Iterable[str] | None = None) -> np.ndarray:
        """Regions per image, int64: for `image_ids`, or for every image in iteration order. Reads no records."""
        if image_ids is None:
            return self._num_regions.copy()
        return self._num_regions[self.positions(image_ids)]

    # ---- batches ----

    def gather(self, image_ids: Sequence[str], *, dtype: torch.dtype = torch.float16, soft_labels: bool = False,
               out: RegionBatch | None = None, pin_memory: bool = False) -> RegionBatch:
        """The images' regions packed into one RegionBatch (in the order given; repeats allowed).

        dtype: of features and soft labels (float16 as stored, or float32). soft_labels: copy them too (only
        the tasks that read them should ask). out: buffers to fill in place (see RegionBatch.empty); otherwise
        new tensors, pinned when pin_memory and an accelerator exists.
        """
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
        if soft_labels and not self.has_soft_labels:
            raise ValueError(f"{self.path}: soft labels were asked for, but this store was written without them")
        positions = self.positions(image_ids)
        total = int(self._num_regions[positions].sum())
        batch = len(positions)
        if out is None and pin_memory and can_pin():  # torch's pinned allocator caches and recycles safely
            result = RegionBatch.empty(total, batch, feature_dim=self.feature_dim, label_dim=self.label_dim,
                                       dtype=dtype, soft_labels=soft_labels, pin_memory=True)
        elif out is None:
            shapes = [((total, self.feature_dim), dtype), ((total, 7), torch.float32), ((batch + 1,), torch.int64)]
            if soft_labels:
                shapes.append(((total, self.label_dim), dtype))
            tensors = carve(self._pool.take(carved_bytes(shapes)), shapes)
            result = RegionBatch(tensors[0], tensors[1], tensors[3] if soft_labels else None, tensors[2])
        else:
            result = self._cut(out, total, batch, dtype, soft_labels)
        self._store.gather(positions, result.features.numpy(), result.boxes.numpy(), result.offsets.numpy(),
                           result.soft_labels.numpy() if soft_labels else None, VERIFY[self.verify],
                           self._copy_threads())
        return result

    def _copy_threads(self) -> int:
        # Inside a DataLoader worker the workers already share the cores: one copy thread each, unless asked.
        if not self._threads_given and torch.utils.data.get_worker_info() is not None:
            return 1
        return self.threads

    def _cut(self, out: RegionBatch, total: int, batch: int, dtype: torch.dtype, soft_labels: bool) -> RegionBatch:
        """Views of `out`'s buffers sized for this batch, after checking they fit."""
        features, boxes, soft, offsets = out._full()
        problems = []
        if features.dtype != dtype:
            problems.append(f"features are {features.dtype}, {dtype} was asked for")
        if features.dim() != 2 or features.shape[1] != self.feature_dim or features.shape[0] < total:
            problems.append(f"features {tuple(features.shape)} cannot hold ({total}, {self.feature_dim})")
        if boxes.dtype != torch.float32 or boxes.dim() != 2 or boxes.shape[1] != 7 or boxes.shape[0] < total:
            problems.append(f"boxes {tuple(boxes.shape)} {boxes.dtype} cannot hold ({total}, 7) float32")
        if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.shape[0] < batch + 1:
            problems.append(f"offsets {tuple(offsets.shape)} {offsets.dtype} cannot hold ({batch + 1},) int64")
        if soft_labels and (soft is None or soft.dtype != dtype or soft.dim() != 2
                            or soft.shape[1] != self.label_dim or soft.shape[0] < total):
            problems.append(f"soft_labels {None if soft is None else tuple(soft.shape)} cannot hold "
                            f"({total}, {self.label_dim}) {dtype}")
        for name, t in (("features", features), ("boxes", boxes), ("offsets", offsets), ("soft_labels", soft)):
            if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
                problems.append(f"{name} must be a contiguous CPU tensor")
        if problems:
            raise ValueError("gather(out=...): " + "; ".join(problems))
        return RegionBatch(features[:total], boxes[:total], soft[:total] if soft_labels else None,
                           offsets[:batch + 1], _buffers=(features, boxes, soft, offsets))

    def prefetch(self, batches_of_ids: Iterable[Sequence[str]], *, depth: int = 2, reuse_buffers: bool = False,
                 **gather_kwargs) -> "Prefetcher":
        """Iterates gather(ids, **gather_kwargs) over `batches_of_ids` in order, `depth` batches ahead on a
        background thread (the copies release the GIL). Errors surface at the batch that raised them.

        reuse_buffers: cycle through depth + 2 sets of buffers instead of allocating each batch; then a batch
        stays valid only until the next one is requested (copy it, or finish asynchronous device copies, first).
        """
        if "out" in gather_kwargs:
            raise TypeError("prefetch manages its own buffers: pass reuse_buffers=True instead of out=")
        if int(depth) < 1:
            raise ValueError(f"depth must be at least 1, got {depth!r}")
        return Prefetcher(self, batches_of_ids, int(depth), reuse_buffers, gather_kwargs)

    # ---- maintenance ----

    def verify_all(self, image_ids: Iterable[str] | None = None) -> list[tuple[str, str]]:
        """Checks records (all by default) with their checksums; returns [(image_id, what is wrong)], empty
        when all are sound. Does not raise for damaged records."""
        positions = np.arange(len(self), dtype=np.int64) if image_ids is None else self.positions(image_ids)
        return [(self._ids[p], message) for p, message in self._store.check_records(positions)]

    def close(self) -> None:
        """Unmaps the shards now (they are mapped again if the store is used afterwards)."""
        self._store.close()

    def __enter__(self) -> "RegionStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        # a default thread count stays a default: the clone still copies on one thread in a DataLoader worker
        return (_reopen, (os.fspath(self.path), self.verify, self.threads if self._threads_given else None))


def _reopen(path: str, verify: str, threads: int | None) -> RegionStore:
    return RegionStore(path, verify=verify, threads=threads)
