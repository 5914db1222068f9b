"""The original UNITER image DB (reference/uniter.md 4.2) -> region store.

An image DB is an LMDB directory inside an image-set directory, e.g. `/img/coco_train2014/feat_th0.2_max100_min10`
beside `nbb_th0.2_max100_min10.json`. Keys are the per-image .npz file names (what text DBs' `img_fname` holds);
each value is either a msgpack dict of msgpack-numpy arrays, or (the `_compressed` DBs) the bytes of an
`np.savez_compressed` file. A `__keys__` entry holds a JSON list of the image keys.

How many regions each image keeps follows the original's reader, decided by the DB's name:
- `feat_th{T}_max{MAX}_min{MIN}`: the side JSON `nbb_th{T}_max{MAX}_min{MIN}.json` gives each image's count; the
  original's converter truncated every record to it, so a record of another length is an error.
- `all`: every box is stored; the region-count rule (common.RegionRule) selects, as the original's reader does.
- `feat_numbb{N}`: the first N rows (fewer when a record has fewer), as the original slices them.
`boxes="rule"` / `"keep"` override the name: apply the rule to every record, or keep every stored row.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import lmdb
import msgpack
import numpy as np

from uniter_fast.data.convert.common import (
    ConversionError, ConversionSummary, RegionRule, StoreOutput, apply_rule, check_regions, progress_bar,
)

KEYS_ENTRY = b"__keys__"
_NPZ_MAGIC = b"PK\x03\x04"  # a .npz is a zip file
_FEAT_TH = re.compile(r"^feat_th(?P<th>[-0-9.]+)_max(?P<max>\d+)_min(?P<min>\d+)(?:_compressed)?$")
_NUMBB = re.compile(r"^feat_numbb(?P<n>\d+)(?:_compressed)?$")
_ALL = re.compile(r"^all(?:_compressed)?$")


# ---- values -------------------------------------------------------------------------------------------------

def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _msgpack_numpy_hook(obj: dict):
    """msgpack-numpy's array encoding, {nd: True, type: dtype str, kind, shape, data}, back to an array.

    Keys are bytes in the encoder's output (b'nd', ...); older versions and raw=True unpacking give str or bytes
    values, so both are accepted.
    """
    keys = {_text(k): v for k, v in obj.items()}
    if "nd" not in keys:
        return {_text(k): v for k, v in obj.items()}
    missing = [k for k in ("type", "data") if k not in keys]
    if missing:
        raise ValueError(f"a msgpack-numpy entry lacks {missing}")
    if _text(keys.get("kind", b"")) == "V":
        raise ValueError("structured (void) msgpack-numpy arrays are not image features")
    dtype = np.dtype(_text(keys["type"]))
    data = keys["data"]
    if not keys["nd"]:   # a numpy scalar
        return np.frombuffer(data, dtype=dtype)[0]
    shape = tuple(keys.get("shape", ()))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"an array of shape {shape} {dtype} needs {expected} bytes, the record holds {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def decode_msgpack_numpy(value: bytes) -> dict:
    """A msgpack dict of msgpack-numpy arrays (the uncompressed image DB's values), without msgpack_numpy."""
    record = msgpack.unpackb(value, raw=False, object_hook=_msgpack_numpy_hook, strict_map_key=False)
    if not isinstance(record, dict):
        raise ValueError(f"expected a dict of arrays, got {type(record).__name__}")
    return {_text(k): v for k, v in record.items()}


def decode_npz(value: bytes) -> dict:
    """The bytes of an np.savez(_compressed) file. The original wrote an extra `allow_pickle` member; ignored."""
    with np.load(io.BytesIO(value), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def decode_value(value: bytes) -> dict:
    """Either encoding, told apart by the zip magic at the start of an npz."""
    if bytes(value[:4]) == _NPZ_MAGIC:
        return decode_npz(bytes(value))
    return decode_msgpack_numpy(bytes(value))


# ---- the DB -------------------------------------------------------------------------------------------------

def find_lmdb(src: str | Path) -> Path:
    """`src` itself when it is an LMDB directory, else its only LMDB sub-directory."""
    src = Path(src)
    if (src / "data.mdb").is_file():
        return src
    if not src.is_dir():
        raise FileNotFoundError(f"image DB {src} does not exist")
    found = sorted(p for p in src.iterdir() if (p / "data.mdb").is_file())
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise ValueError(f"image DB {src}: expected an LMDB directory (with data.mdb) or a directory holding exactly "
                         f"one; found {names}: pass the LMDB directory itself")
    return found[0]


def _read_keys(txn, db: Path) -> list[str]:
    """The image keys in __keys__ order, checked against the keys the DB really holds."""
    stored = set()
    with txn.cursor() as cursor:
        for key in cursor.iternext(keys=True, values=False):
            if bytes(key) != KEYS_ENTRY:
                try:
                    stored.add(bytes(key).decode("utf-8"))
                except UnicodeDecodeError:
                    raise ConversionError(db, f"key {bytes(key)!r}", "is not UTF-8: not an image file name") from None
    listed = txn.get(KEYS_ENTRY)
    if listed is None:  # the original's converter always writes it; without it, the DB's own order
        return sorted(stored)
    try:
        keys = json.loads(bytes(listed).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(db, "__keys__", f"is not a JSON list: {err}") from None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ConversionError(db, "__keys__", "is not a JSON list of image names")
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ConversionError(db, "__keys__", f"lists {dup!r} twice")
    absent = [k for k in keys if k not in stored]
    if absent:
        raise ConversionError(db, f"image {absent[0]!r}", f"is listed in __keys__ but has no record "
                              f"({len(absent)} such images)")
    unlisted = sorted(stored - set(keys))
    if unlisted:
        raise ConversionError(db, f"image {unlisted[0]!r}", f"has a record but is not listed in __keys__ "
                              f"({len(unlisted)} such images)")
    return keys


def _read_nbb(path: Path) -> dict[str, int]:
    try:
        counts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(path, None, f"cannot read the region-count JSON: {err}") from None
    if not isinstance(counts, dict):
        raise ConversionError(path, None, "expected a JSON object {image name: region count}")
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConversionError(path, f"image {name!r}", f"region count must be a positive integer, got {n!r}")
    return counts


def _plan(db: Path, nbb_json: str | Path | None, boxes: str, rule: RegionRule, num_bb: int | None):
    """(mode, counts or N): how rows are selected for this DB, from its name unless told otherwise."""
    told = [what for what, given in ((f"boxes={boxes!r}", boxes != "auto"), ("nbb_json (--nbb)", nbb_json is not None),
                                     ("num_bb (--num-bb)", num_bb is not None)) if given]
    if len(told) > 1:  # one would be ignored without a word
        raise ValueError(f"image DB {db}: {' and '.join(told)} each say how many regions to keep: pass one of them")
    if num_bb is not None and (isinstance(num_bb, bool) or not isinstance(num_bb, int) or num_bb < 1):
        raise ValueError(f"image DB {db}: num_bb must be a positive integer, got {num_bb!r}")
    if boxes == "rule":
        return "rule", None
    if boxes == "keep":
        return "keep", None
    if nbb_json is not None:
        return "nbb", Path(nbb_json)
    if num_bb is not None:
        return "first", num_bb
    if m := _FEAT_TH.match(db.name):
        path = db.parent / f"nbb_th{m['th']}_max{m['max']}_min{m['min']}.json"
        if not path.is_file():
            raise FileNotFoundError(f"image DB {db}: its region counts {path} do not exist; pass nbb_json (--nbb), "
                                    "or boxes='rule' (--all-boxes) to apply the region-count rule to the stored boxes")
        return "nbb", path
    if m := _NUMBB.match(db.name):
        return "first", int(m["n"])
    if _ALL.match(db.name):
        return "rule", None
    raise ValueError(f"image DB {db}: the name {db.name!r} is none of feat_th*_max*_min*, feat_numbb*, all "
                     "(optionally _compressed), so how many regions to keep is unknown: pass nbb_json (--nbb), "
                     "num_bb (--num-bb), boxes='rule' (--all-boxes) or boxes='keep' (--keep-boxes)")


def convert_image_db(src: str | Path, dst: str | Path, *, nbb_json: str | Path | None = None, boxes: str = "auto",
                     rule: RegionRule = RegionRule(), num_bb: int | None = None, append: bool = False,
                     shard_bytes: int | None = None, progress: bool = True) -> ConversionSummary:
    """Convert an original image DB into the region store `dst`; see the module docstring for region counts."""
    if boxes not in ("auto", "rule", "keep"):
        raise ValueError(f"boxes must be auto, rule or keep, got {boxes!r}")
    db = find_lmdb(src)
    mode, arg = _plan(db, nbb_json, boxes, rule, num_bb)
    counts = _read_nbb(arg) if mode == "nbb" else None
    env = lmdb.open(str(db), readonly=True, lock=False, readahead=False, subdir=True, max_readers=8)
    try:
        with env.begin(buffers=True) as txn, StoreOutput(dst, append=append, shard_bytes=shard_bytes) as out:
            keys = _read_keys(txn, db)
            if counts is not None:
                missing = [k for k in keys if k not in counts]
                if missing:
                    raise ConversionError(arg, f"image {missing[0]!r}", f"has a record in {db} but no region count "
                                          f"({len(missing)} such images)")
                extra = sorted(set(counts) - set(keys))
                if extra:
                    raise ConversionError(arg, f"image {extra[0]!r}", f"has a region count but no record in {db} "
                                          f"({len(extra)} such images)")
            with progress_bar(total=len(keys), desc=f"convert {db.name}", enabled=progress) as bar:
                for key in keys:
                    record = f"image {key!r}"
                    try:
                        arrays = decode_value(txn.get(key.encode("utf-8")))
                    except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile,
                            msgpack.UnpackException) as err:
                        raise ConversionError(db, record, f"corrupt value (neither a msgpack-numpy dict nor an npz "
                                              f"that decodes): {type(err).__name__}: {err}") from None
                    regions = check_regions(arrays, db, record)
                    if mode == "nbb":
                        if len(regions) != counts[key]:
                            raise ConversionError(db, record, f"holds {len(regions)} regions but {arg.name} says "
                                                  f"{counts[key]}: the DB and the JSON do not belong together")
                    elif mode == "first":
                        regions = regions.take(slice(0, arg))
                    elif mode == "rule":
                        regions = apply_rule(regions, rule)
                        out.summary.rule_applied += 1
                    out.add(key, regions, db, record)
                    bar.update(1)
                    bar.set_postfix(regions=out.summary.regions, refresh=False)
            summary = out.close()
    finally:
        env.close()
    summary.notes.append({"nbb": f"region counts from {arg}", "first": f"first {arg} regions of each record",
                          "rule": f"region-count rule: conf > {rule.conf_th}, {rule.min_bb}..{rule.max_bb} boxes",
                          "keep": "every stored region kept"}[mode])
    return summary
