"""What every region-feature converter shares: checking one image's arrays, the original's region-count rule,
writing the store, and a progress bar.

The region-count rule (UNITER's `convert_imgdir.py` / `compute_num_bb`, reference/uniter.md 4.2): keep
nbb = min(max_bb, max(min_bb, #(conf > conf_th))) boxes, the most confident first (conf_th 0.2, 10..100 by
default). An image with fewer than min_bb boxes keeps all it has. It only makes sense where the source holds every
box the detector kept; which sources that is, each converter decides (docs/converters.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from tqdm import tqdm

BOX_POLICIES = ("auto", "rule", "keep")


class ConversionError(ValueError):
    """A bad source record: the message names the source file, the record and what is wrong."""

    def __init__(self, source, record: str | None, problem: str):
        self.source, self.record, self.problem = str(source), record, problem
        super().__init__(f"{source}: {record}: {problem}" if record else f"{source}: {problem}")


@dataclass(frozen=True)
class RegionRule:
    conf_th: float = 0.2
    max_bb: int = 100
    min_bb: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.min_bb <= self.max_bb:
            raise ValueError(f"region rule: need 1 <= min_bb <= max_bb, got min_bb={self.min_bb}, "
                             f"max_bb={self.max_bb}")

    def count(self, conf: np.ndarray) -> int:
        """How many boxes the original keeps for these confidences (never more than there are)."""
        nbb = min(self.max_bb, max(self.min_bb, int((np.asarray(conf) > self.conf_th).sum())))
        return min(nbb, len(conf))


@dataclass
class ImageRegions:
    """One image ready for the store: features (n, D), norm_bb (n, 6), conf (n,), soft_labels (n, C) or None."""

    features: np.ndarray
    norm_bb: np.ndarray
    conf: np.ndarray
    soft_labels: np.ndarray | None

    def __len__(self) -> int:
        return self.features.shape[0]

    def take(self, rows) -> "ImageRegions":
        return ImageRegions(self.features[rows], self.norm_bb[rows], self.conf[rows],
                            None if self.soft_labels is None else self.soft_labels[rows])


def check_regions(arrays: Mapping[str, np.ndarray], source, record: str) -> ImageRegions:
    """One image's arrays as the BUTD extractor names them, checked; conf (n, 1) -> (n,), norm_bb (n, 7) -> (n, 6).

    The 7th box column (w*h) is dropped because the store's reader computes it from w and h, as the original does.
    Features are converted to fp16 (the store's dtype) before the finiteness check, so values fp16 cannot hold
    are caught here rather than stored as inf.
    """
    for name in ("features", "norm_bb", "conf"):
        if name not in arrays:
            raise ConversionError(source, record, f"no {name!r} array (has {sorted(arrays)})")
    features, norm_bb, conf = (np.asarray(arrays[k]) for k in ("features", "norm_bb", "conf"))
    soft = arrays.get("soft_labels")
    soft = None if soft is None else np.asarray(soft)
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ConversionError(source, record, f"features must be (n, D) with n >= 1, got shape {features.shape}")
    n = features.shape[0]
    if conf.ndim == 2 and conf.shape[1] == 1:
        conf = conf[:, 0]
    if conf.shape != (n,):
        raise ConversionError(source, record, f"conf must be ({n},) or ({n}, 1) to match features, got {conf.shape}")
    if norm_bb.ndim != 2 or norm_bb.shape[0] != n or norm_bb.shape[1] not in (6, 7):
        raise ConversionError(source, record, f"norm_bb must be ({n}, 6) or ({n}, 7), got {norm_bb.shape}")
    if soft is not None and (soft.ndim != 2 or soft.shape[0] != n or soft.shape[1] == 0):
        raise ConversionError(source, record, f"soft_labels must be ({n}, C), got {soft.shape}")
    for name, arr in (("features", features), ("norm_bb", norm_bb), ("conf", conf), ("soft_labels", soft)):
        if arr is not None and arr.dtype.kind != "f":
            raise ConversionError(source, record, f"{name} must be floating point, got {arr.dtype}")
    with np.errstate(over="ignore"):  # an overflow to inf is reported just below, naming the record
        features = features.astype(np.float16, copy=False)
    for name, arr in (("features", features), ("norm_bb", norm_bb), ("conf", conf), ("soft_labels", soft)):
        if arr is not None and not np.isfinite(arr).all():
            raise ConversionError(source, record, f"{name} holds NaN or infinite values"
                                  + (" (beyond fp16's range)" if name == "features" else ""))
    return ImageRegions(features, norm_bb[:, :6], conf, soft)


def apply_rule(regions: ImageRegions, rule: RegionRule) -> ImageRegions:
    """The original's selection: sort by confidence (stable, most confident first) and keep rule.count boxes."""
    order = np.argsort(-regions.conf.astype(np.float64), kind="stable")
    return regions.take(order[: rule.count(regions.conf)])


@dataclass
class ConversionSummary:
    """What a converter wrote, for the command's closing report."""

    destination: str
    images: int = 0
    regions: int = 0
    rule_applied: int = 0         # images the region-count rule selected boxes for
    soft_labels: bool | None = None
    texts: int | None = None      # set by the text converter, which writes texts instead of regions
    tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if self.texts is not None:
            return [f"wrote {self.texts} texts ({self.tokens} tokens) about {self.images} images to "
                    f"{self.destination}", *self.notes]
        out = [f"wrote {self.images} images, {self.regions} regions "
               f"({self.regions / max(self.images, 1):.1f} per image) to {self.destination}"]
        if self.soft_labels is not None:
            out.append("soft labels: " + ("stored" if self.soft_labels else "none (the source has none)"))
        if self.rule_applied:
            out.append(f"region-count rule applied to {self.rule_applied} images")
        return out + self.notes


class StoreOutput:
    """The destination store, opened when the first image tells the feature and label widths.

    Every later image must have the same widths and the same presence of soft labels; an image id seen twice is
    an error naming both places it came from.
    """

    def __init__(self, path, *, append: bool = False, shard_bytes: int | None = None):
        self.path, self.append, self.shard_bytes = Path(path), append, shard_bytes
        self.summary = ConversionSummary(str(self.path))
        self._writer = None
        self._seen: dict[str, str] = {}
        self._dims: tuple[int, int | None] | None = None

    def add(self, image_id: str, regions: ImageRegions, source, record: str) -> None:
        if image_id in self._seen:
            raise ConversionError(source, record, f"image id {image_id!r} was already converted from "
                                  f"{self._seen[image_id]}")
        dims = (regions.features.shape[1], None if regions.soft_labels is None else regions.soft_labels.shape[1])
        if self._dims is None:
            self._open(*dims)
        elif dims != self._dims:
            raise ConversionError(source, record, f"(feature dim, soft-label dim) {dims} differs from the earlier "
                                  f"images' {self._dims}; a store holds one layout")
        self._seen[image_id] = f"{source}: {record}"
        self._writer.add(image_id, regions.features, regions.norm_bb, regions.conf, regions.soft_labels)
        self.summary.images += 1
        self.summary.regions += len(regions)

    def _open(self, feature_dim: int, label_dim: int | None) -> None:
        from uniter_fast.data.region_store import RegionStoreWriter

        self._dims = (feature_dim, label_dim)
        kwargs = {"feature_dim": feature_dim, "soft_labels": label_dim is not None, "append": self.append}
        if label_dim is not None:
            kwargs["label_dim"] = label_dim
        if self.shard_bytes is not None:
            kwargs["shard_bytes"] = self.shard_bytes
        self._writer = RegionStoreWriter(self.path, **kwargs)
        self.summary.soft_labels = label_dim is not None

    def close(self) -> ConversionSummary:
        if self._writer is None:
            raise ValueError(f"{self.path}: no image was converted: the source is empty")
        self._writer.close()
        return self.summary

    def __enter__(self) -> "StoreOutput":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if err is None or self._writer is None:
            return
        # the writer commits nothing of this session: no half-converted store that looks complete
        self._writer.abort()
        if self.append:
            err.add_note(f"nothing was added to the store at {self.path}: it keeps its earlier images")
        else:
            err.add_note(f"the store at {self.path} was not written ({self.summary.images} images were converted "
                         "before this error; fix the source and convert again)")


def progress_bar(*, total: int | None, desc: str, unit: str = "img", enabled: bool = True, **kwargs) -> tqdm:
    """The converters' progress bar: counts, rate and (when the total is known) time left, on stderr."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, smoothing=0.05,
                **kwargs)
