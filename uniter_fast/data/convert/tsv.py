"""BUTD / LXMERT feature TSV -> region store.

One line per image, tab-separated, no header. LXMERT's fields, in order (the default):
`img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features`, where the
arrays are base64 of raw little-endian buffers: objects_id/attrs_id int64 (num_boxes,), objects_conf/attrs_conf
float32 (num_boxes,), boxes float32 (num_boxes, 4) absolute pixels x1, y1, x2, y2, features float32
(num_boxes, D). Another column order can be named with `fields` (the names above; image_id/image_h/image_w are
accepted for img_*).

What is stored: features (fp16), norm_bb = [x1/W, y1/H, x2/W, y2/H, (x2-x1)/W, (y2-y1)/H], conf = objects_conf.
No soft labels: the TSV keeps only each box's top class and its confidence, not the 1601-way distribution
MRC-kl learns from; a one-hot made from objects_id would be invented data, so the store has none and the MRC
tasks refuse it. objects_id and the attributes have no place in the store and are not kept.

Region count: a TSV is normally a finished selection (36 boxes, or 10..100 by confidence), kept as it is.
With boxes="rule" (--all-boxes) the original's rule selects from every image's boxes; with "auto" (the default)
it selects only for an image with more than rule.max_bb boxes, which no selection of the original can hold.
"""
from __future__ import annotations

import base64
import binascii
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from uniter_fast.data.convert.common import (
    BOX_POLICIES, ConversionError, ConversionSummary, RegionRule, StoreOutput, apply_rule, check_regions,
    progress_bar,
)

LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
                 "boxes", "features")
_ALIASES = {"image_id": "img_id", "image_h": "img_h", "image_w": "img_w"}
_NEEDED = ("img_id", "img_h", "img_w", "num_boxes", "boxes", "features", "objects_conf")


def _fields(fields: Sequence[str]) -> tuple[str, ...]:
    names = tuple(_ALIASES.get(f, f) for f in fields)
    missing = [f for f in _NEEDED if f not in names]
    if missing:
        extra = " (confidences: the original BUTD layout without them cannot give the store's conf)" \
            if "objects_conf" in missing else ""
        raise ValueError(f"TSV fields {list(fields)} lack {missing}{extra}")
    if len(set(names)) != len(names):
        raise ValueError(f"TSV fields {list(fields)} name a column twice")
    return names


def _decode(text: str, dtype, count: int, name: str, source, record: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ConversionError(source, record, f"{name} is not valid base64: {err}") from None
    itemsize = np.dtype(dtype).itemsize
    if count is not None and len(raw) != count * itemsize:
        raise ConversionError(source, record, f"{name} holds {len(raw)} bytes, {count} {np.dtype(dtype).name} "
                              f"values need {count * itemsize}")
    if len(raw) % itemsize:
        raise ConversionError(source, record, f"{name} holds {len(raw)} bytes, not a whole number of "
                              f"{np.dtype(dtype).name} values")
    return np.frombuffer(raw, dtype=dtype)


def _positive(value: str, name: str, source, record: str, kind=int):
    try:
        number = kind(value)
    except ValueError:
        raise ConversionError(source, record, f"{name} {value!r} is not a number") from None
    if number <= 0:
        raise ConversionError(source, record, f"{name} must be positive, got {value!r}")
    if not math.isfinite(number):  # float("inf") and float("nan") parse: they would scale every box to 0 or NaN
        raise ConversionError(source, record, f"{name} must be finite, got {value!r}")
    return number


def parse_line(line: str, fields: Sequence[str], source, line_no: int, feature_dtype=np.float32):
    """(image id, checked regions) of one TSV line; errors name the file, the line and the image."""
    columns = line.rstrip("\r\n").split("\t")
    record = f"line {line_no}"
    if len(columns) != len(fields):
        raise ConversionError(source, record, f"{len(columns)} tab-separated fields, expected {len(fields)} "
                              f"({', '.join(fields)})")
    row = dict(zip(fields, columns))
    image_id = row["img_id"]
    if not image_id:
        raise ConversionError(source, record, "empty img_id")
    record = f"line {line_no} (image {image_id!r})"
    height = _positive(row["img_h"], "img_h", source, record, float)
    width = _positive(row["img_w"], "img_w", source, record, float)
    n = _positive(row["num_boxes"], "num_boxes", source, record)
    boxes = _decode(row["boxes"], np.float32, 4 * n, "boxes", source, record).reshape(n, 4).astype(np.float64)
    conf = _decode(row["objects_conf"], np.float32, n, "objects_conf", source, record)
    raw_features = _decode(row["features"], feature_dtype, None, "features", source, record)
    if raw_features.size == 0 or raw_features.size % n:
        raise ConversionError(source, record, f"features hold {raw_features.size} values, not num_boxes={n} rows")
    if not np.isfinite(boxes).all():
        raise ConversionError(source, record, "boxes hold NaN or infinite values")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        bad = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
        raise ConversionError(source, record, f"box {bad} {boxes[bad].tolist()} has x2 < x1 or y2 < y1")
    scale = np.array([width, height, width, height])
    norm = boxes / scale
    norm_bb = np.concatenate([norm, norm[:, 2:] - norm[:, :2]], axis=1).astype(np.float32)
    arrays = {"features": raw_features.reshape(n, -1), "norm_bb": norm_bb, "conf": conf}
    return image_id, check_regions(arrays, source, record)


def convert_tsv(src: str | Path | Sequence[str | Path], dst: str | Path, *, fields: Sequence[str] = LXMERT_FIELDS,
                boxes: str = "auto", rule: RegionRule = RegionRule(), feature_dtype: str = "float32",
                append: bool = False, shard_bytes: int | None = None, progress: bool = True) -> ConversionSummary:
    """Convert one or several feature TSV files into the region store `dst` (see the module docstring)."""
    if boxes not in BOX_POLICIES:
        raise ValueError(f"boxes must be one of {BOX_POLICIES}, got {boxes!r}")
    names = _fields(fields)
    files = [Path(src)] if isinstance(src, (str, Path)) else [Path(s) for s in src]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"TSV file {path} does not exist")
    dtype = np.dtype(feature_dtype)
    total = sum(p.stat().st_size for p in files)
    with StoreOutput(dst, append=append, shard_bytes=shard_bytes) as out, \
            progress_bar(total=total, desc="convert tsv", unit="B", unit_scale=True, enabled=progress) as bar:
        for path in files:
            with open(path, "rb") as f:  # decoded line by line, so that bad bytes are reported with their line
                for line_no, raw in enumerate(f, start=1):
                    bar.update(len(raw))
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise ConversionError(path, f"line {line_no}", f"is not UTF-8 text ({err}): not a feature "
                                              "TSV, or a damaged one") from None
                    if not line.strip():
                        continue
                    image_id, regions = parse_line(line, names, path, line_no, dtype)
                    if boxes == "rule" or (boxes == "auto" and len(regions) > rule.max_bb):
                        regions = apply_rule(regions, rule)
                        out.summary.rule_applied += 1
                    out.add(image_id, regions, path, f"line {line_no} (image {image_id!r})")
                    bar.set_postfix(images=out.summary.images, refresh=False)
        summary = out.close()
    summary.notes.append("MRC and MRC-kl need soft labels: pre-train from this store without those tasks")
    return summary
