"""What one pre-training step consumes (a task batch) and returns (a task output)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from uniter_fast.data.packing import PackedBatch

# The original's task names: masked language modelling, masked region feature regression, masked region
# classification (hard label / KL to the detector's distribution), image-text matching (with WRA when enabled).
TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")
TEXT_MASKED = ("mlm",)
REGIONS_MASKED = ("mrfr", "mrc", "mrckl")


@dataclass
class PretrainBatch:
    """A packed batch for one task plus that task's targets; rows index the packed encoder output."""

    task: str
    inputs: PackedBatch
    mlm_rows: torch.Tensor | None = None         # (k,) packed rows of the masked words
    mlm_labels: torch.Tensor | None = None       # (k,) their original token ids
    mrm_rows: torch.Tensor | None = None         # (k,) packed rows of the masked regions
    mrm_feat: torch.Tensor | None = None         # (k, img_dim) their original features (MRFR targets)
    mrm_soft_labels: torch.Tensor | None = None  # (k, img_label_dim) detector class distributions (MRC targets)
    itm_labels: torch.Tensor | None = None       # (B,) 1 = the caption's own image, 0 = a swapped image

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown pre-training task {self.task!r}; expected one of {', '.join(TASKS)}")

    def to(self, device, non_blocking: bool = False) -> "PretrainBatch":
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if hasattr(value, "to") else value
        return PretrainBatch(**moved)

    def pin_memory(self) -> "PretrainBatch":
        """A copy in page-locked memory, for asynchronous copies to a GPU (DataLoader's pin_memory calls this)."""
        pinned = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in pinned.items():
            if hasattr(value, "pin_memory"):
                pinned[name] = value.pin_memory()
        return PretrainBatch(**pinned)


@dataclass
class TaskOutput:
    """loss: the scalar to back-propagate; metrics: detached scalars for logging (read them off the device lazily)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
