"""A directory of per-image .npz files (what the BUTD extractor writes) -> region store.

Each `{name}.npz` holds `features` (n, D), `norm_bb` (n, 6), `conf` (n, 1) and usually `soft_labels` (n, 1601),
fp16 or fp32 (fp32 is stored as fp16, as the original's converter does). Other members are ignored. The image
id is the file name with its `.npz`, as the original image DB keys it and text DBs' `img_fname` refer to it.

Region count: these files are the input of the original's `convert_imgdir.py`, which applies the region-count rule
to every image (the extractor saves up to 100 boxes), so boxes="rule" is the default here; boxes="keep"
(--keep-boxes) stores every box, e.g. for fixed 36-box features; "auto" applies the rule only to images with
more than rule.max_bb boxes.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from uniter_fast.data.convert.common import (
    BOX_POLICIES, ConversionError, ConversionSummary, RegionRule, StoreOutput, apply_rule, check_regions,
    progress_bar,
)

FIELDS = ("features", "norm_bb", "conf", "soft_labels")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of one file (soft_labels when present); errors name the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in FIELDS if name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ConversionError(path, None, f"corrupt or unreadable .npz: {type(err).__name__}: {err}") from None


def convert_npz_dir(src: str | Path, dst: str | Path, *, boxes: str = "rule", rule: RegionRule = RegionRule(),
                    append: bool = False, shard_bytes: int | None = None, progress: bool = True) -> ConversionSummary:
    """Convert every `*.npz` directly inside `src` (sorted by name) into the region store `dst`."""
    if boxes not in BOX_POLICIES:
        raise ValueError(f"boxes must be one of {BOX_POLICIES}, got {boxes!r}")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"npz directory {src} does not exist")
    files = sorted(p for p in src.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        raise ValueError(f"npz directory {src} holds no .npz files")
    with StoreOutput(dst, append=append, shard_bytes=shard_bytes) as out, \
            progress_bar(total=len(files), desc=f"convert {src.name}", enabled=progress) as bar:
        for path in files:
            regions = check_regions(read_npz(path), path, "arrays")
            if boxes == "rule" or (boxes == "auto" and len(regions) > rule.max_bb):
                regions = apply_rule(regions, rule)
                out.summary.rule_applied += 1
            out.add(path.name, regions, path, "arrays")
            bar.update(1)
            bar.set_postfix(regions=out.summary.regions, refresh=False)
        summary = out.close()
    if boxes != "keep":
        summary.notes.append(f"region-count rule: conf > {rule.conf_th}, {rule.min_bb}..{rule.max_bb} boxes")
    return summary
