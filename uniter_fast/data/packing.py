"""The one batch representation: a packed batch.

Every sample's text tokens, then its regions, concatenated with no padding; `cu_seqlens` marks the samples.
This is the original's compact `gather_index` layout (text then regions, padding only at the end of a row)
with the padding taken out, so any attention over it is the original's attention pattern.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from uniter_fast.kernels.reference import pad_rows

IMG_DIM = 2048


def box7(boxes: torch.Tensor) -> torch.Tensor:
    """[x1, y1, x2, y2, w, h] -> [x1, y1, x2, y2, w, h, w*h], as the original computes at load time."""
    return torch.cat([boxes, boxes[:, 4:5] * boxes[:, 5:6]], dim=1)


@dataclass
class PackedBatch:
    """Model inputs of B samples; sample b is rows cu_seqlens[b] .. cu_seqlens[b+1] of the encoder's input."""

    input_ids: torch.Tensor       # (total_text,) int64: every sample's [CLS] ... [SEP] tokens, concatenated
    position_ids: torch.Tensor    # (total_text,) int64: 0 .. L_b-1 within each sample
    token_type_ids: torch.Tensor  # (total_text,) int64: 0 unless a task says otherwise
    img_feat: torch.Tensor        # (total_regions, img_dim) float (fp16 as stored, or fp32)
    img_pos: torch.Tensor         # (total_regions, 7) float: [x1, y1, x2, y2, w, h, w*h]
    img_type_ids: torch.Tensor    # (total_regions,) int64: 1 unless a task says otherwise
    img_masks: torch.Tensor | None  # (total_regions,) bool: regions given the learned [MASK] feature
    text_lens: torch.Tensor       # (B,) int32
    region_lens: torch.Tensor     # (B,) int32
    cu_seqlens: torch.Tensor      # (B+1,) int32
    gather_index: torch.Tensor    # (total,) int64: packed row r = cat(text_embeddings, region_embeddings)[index[r]]
    text_rows: torch.Tensor       # (total_text,) int64: the packed row of each text token
    region_rows: torch.Tensor     # (total_regions,) int64: the packed row of each region
    max_seqlen: int
    max_text_len: int
    max_regions: int

    @property
    def batch_size(self) -> int:
        return self.text_lens.shape[0]

    @property
    def total_tokens(self) -> int:
        return self.gather_index.shape[0]

    @property
    def cls_rows(self) -> torch.Tensor:
        """The packed row of each sample's first token ([CLS]): what the pooler reads."""
        return self.cu_seqlens[:-1].long()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return PackedBatch(**moved)

    def pin_memory(self) -> "PackedBatch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return PackedBatch(**{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    # reading outputs back --------------------------------------------------------------------------------------
    def split(self, hidden: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(total, H) -> per sample (text rows (L_b, H), region rows (n_b, H)). Host sync: for inspection only."""
        out = []
        for start, tl, nr in zip(self.cu_seqlens[:-1].tolist(), self.text_lens.tolist(), self.region_lens.tolist()):
            out.append((hidden[start:start + tl], hidden[start + tl:start + tl + nr]))
        return out

    def pad_text(self, hidden: torch.Tensor) -> torch.Tensor:
        """(total, H) -> (B, max_text_len, H), zeros past each sample's text."""
        return pad_rows(hidden, self.cu_seqlens[:-1], self.text_lens, self.max_text_len)

    def pad_regions(self, hidden: torch.Tensor) -> torch.Tensor:
        """(total, H) -> (B, max_regions, H), zeros past each sample's regions."""
        return pad_rows(hidden, self.cu_seqlens[:-1] + self.text_lens, self.region_lens, self.max_regions)


@dataclass(frozen=True)
class PackedRegions:
    """Every sample's regions already concatenated in sample order (what RegionStore.gather returns): pack_batch
    takes them as they are instead of concatenating per-sample pieces again."""

    features: torch.Tensor   # (total_regions, img_dim)
    boxes: torch.Tensor      # (total_regions, 6 or 7)
    counts: Sequence[int]    # regions of each sample (0: a text-only sample)


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _as_array(x):
    """A tensor as it is, anything else as a numpy array: concatenated once per batch (_concat), not per sample."""
    return x if isinstance(x, (torch.Tensor, np.ndarray)) else np.asarray(x)


_NUMPY = {torch.long: np.int64, torch.bool: np.bool_}


def _concat(parts: list, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample 1-D tensors or arrays as one tensor of dtype (numpy arrays concatenated before conversion, each
    cast to dtype first as a tensor's would be: no promotion through float64 of ids past 2**53)."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return torch.from_numpy(np.concatenate(parts, dtype=_NUMPY[dtype], casting="unsafe"))
    return torch.cat([_as_tensor(p).to(dtype) for p in parts])


def pack_batch(
    text_ids: Sequence,
    regions: Sequence,
    *,
    token_type_ids: Sequence | None = None,
    img_type_ids: Sequence | None = None,
    img_masks: Sequence | None = None,
) -> PackedBatch:
    """Pack B samples.

    text_ids: per sample a 1-D sequence of token ids, [CLS] ... [SEP] included.
    regions: per sample (features (n, img_dim), boxes (n, 6) or (n, 7)) or None for a text-only sample; or one
        PackedRegions for the whole batch (used without a copy).
    token_type_ids / img_type_ids / img_masks: optional per-sample sequences matching the text / regions.
    """
    batch = len(text_ids)
    regions_given = len(regions.counts) if isinstance(regions, PackedRegions) else len(regions)
    if batch != regions_given:
        raise ValueError(f"pack_batch: {batch} texts but {regions_given} region entries")
    if batch == 0:
        raise ValueError("pack_batch: the batch is empty")
    if isinstance(regions, PackedRegions):
        counts, img_feat, img_pos = _packed_regions(regions)
    else:
        counts, img_feat, img_pos = _sample_regions(regions)
    ids, ttypes, itypes, masks = [], [], [], []
    for b in range(batch):
        t = _as_array(text_ids[b])
        if t.ndim != 1:
            raise ValueError(f"pack_batch: sample {b}: text ids must be 1-D, got shape {tuple(t.shape)}")
        ids.append(t)
        if t.shape[0] + counts[b] == 0:
            raise ValueError(f"pack_batch: sample {b} has neither text nor regions")
        if token_type_ids is not None:
            ttypes.append(_as_array(token_type_ids[b]))
            if tuple(ttypes[-1].shape) != tuple(t.shape):
                raise ValueError(f"pack_batch: sample {b}: token_type_ids shape {tuple(ttypes[-1].shape)} "
                                 f"does not match its text {tuple(t.shape)}")
        for name, given, parts in (("img_type_ids", img_type_ids, itypes), ("img_masks", img_masks, masks)):
            if given is not None:
                parts.append(_as_array(given[b]))
                if tuple(parts[-1].shape) != (counts[b],):
                    raise ValueError(f"pack_batch: sample {b}: {name} shape {tuple(parts[-1].shape)} does not match "
                                     f"its {counts[b]} regions")

    text_lens = torch.tensor([t.shape[0] for t in ids], dtype=torch.int32)
    region_lens = torch.tensor(counts, dtype=torch.int32)
    seq_lens = text_lens + region_lens
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(seq_lens, 0)
    total_text = int(text_lens.sum())
    total_regions = int(region_lens.sum())

    # where each text token and region lands in the packed sequence
    sample_of_text = torch.repeat_interleave(torch.arange(batch), text_lens.long())
    sample_of_region = torch.repeat_interleave(torch.arange(batch), region_lens.long())
    text_start = torch.cumsum(text_lens, 0) - text_lens
    region_start = torch.cumsum(region_lens, 0) - region_lens
    text_rows = cu_seqlens[:-1].long()[sample_of_text] + (torch.arange(total_text) - text_start[sample_of_text])
    region_rows = ((cu_seqlens[:-1] + text_lens).long()[sample_of_region]
                   + (torch.arange(total_regions) - region_start[sample_of_region]))
    gather_index = torch.empty(total_text + total_regions, dtype=torch.long)
    gather_index[text_rows] = torch.arange(total_text)
    gather_index[region_rows] = total_text + torch.arange(total_regions)

    return PackedBatch(
        input_ids=_concat(ids, torch.long),
        position_ids=torch.arange(total_text) - text_start.long()[sample_of_text],
        token_type_ids=(torch.zeros(total_text, dtype=torch.long) if token_type_ids is None
                        else _concat(ttypes, torch.long)),
        img_feat=img_feat,
        img_pos=img_pos,
        img_type_ids=(torch.ones(total_regions, dtype=torch.long) if img_type_ids is None
                      else _concat(itypes, torch.long)),
        img_masks=None if img_masks is None else _concat(masks, torch.bool),
        text_lens=text_lens,
        region_lens=region_lens,
        cu_seqlens=cu_seqlens,
        gather_index=gather_index,
        text_rows=text_rows,
        region_rows=region_rows,
        max_seqlen=int(seq_lens.max()),
        max_text_len=int(text_lens.max()),
        max_regions=int(region_lens.max()),
    )


def _packed_regions(packed: PackedRegions) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(regions of each sample, features, boxes with w*h) of regions packed already, checked as a whole."""
    counts = [int(n) for n in packed.counts]
    features, boxes = packed.features, packed.boxes
    if features.dim() != 2 or boxes.dim() != 2 or features.shape[0] != boxes.shape[0] \
            or sum(counts) != features.shape[0] or min(counts, default=0) < 0:
        raise ValueError(f"pack_batch: packed regions of features {tuple(features.shape)} and boxes "
                         f"{tuple(boxes.shape)} do not hold the counts {counts[:8]}{' ...' if len(counts) > 8 else ''}")
    if boxes.shape[1] not in (6, 7):
        raise ValueError(f"pack_batch: packed regions: boxes must have 6 or 7 columns, got {boxes.shape[1]}")
    return counts, features, boxes.float() if boxes.shape[1] == 7 else box7(boxes.float())


def _sample_regions(regions: Sequence) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(regions of each sample, features, boxes with w*h) of per-sample (features, boxes) or None, concatenated."""
    counts, feats, boxes = [], [], []
    img_dim = None
    for b, sample in enumerate(regions):
        if sample is None:
            counts.append(0)
            continue
        try:
            f, bx = sample
        except (TypeError, ValueError):
            raise ValueError(f"pack_batch: sample {b}: regions must be (features, boxes) or None") from None
        f, bx = _as_tensor(f), _as_tensor(bx)
        if f.dim() != 2 or bx.dim() != 2 or f.shape[0] != bx.shape[0]:
            raise ValueError(f"pack_batch: sample {b}: features {tuple(f.shape)} and boxes {tuple(bx.shape)} "
                             "must be (n, img_dim) and (n, 6 or 7)")
        if bx.shape[1] == 6:
            bx = box7(bx.float())
        elif bx.shape[1] != 7:
            raise ValueError(f"pack_batch: sample {b}: boxes must have 6 or 7 columns, got {bx.shape[1]}")
        if img_dim is not None and f.shape[1] != img_dim:
            raise ValueError(f"pack_batch: sample {b}: feature dim {f.shape[1]} differs from earlier samples' "
                             f"{img_dim}")
        img_dim = f.shape[1]
        counts.append(f.shape[0])
        feats.append(f)
        boxes.append(bx.float())
    dtype = next((f.dtype for f in feats if f.shape[0]), torch.float32)
    features = torch.cat([f.to(dtype) for f in feats]) if feats else torch.zeros(0, IMG_DIM)
    return counts, features, torch.cat(boxes) if boxes else torch.zeros(0, 7)
