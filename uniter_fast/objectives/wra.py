"""Word-region alignment: optimal transport between a caption's words and its image's regions (reference/uniter.md 2).

The transport runs on the last layer's outputs, text including [CLS] and [SEP], in fp32, with the plan held
constant for the gradient; the loss pulls matched pairs together and pushes swapped pairs apart.
"""
from __future__ import annotations

import torch

from uniter_fast.data.packing import PackedBatch
from uniter_fast.kernels import ot


def wra_distances(hidden: torch.Tensor, batch: PackedBatch, *, beta: float = 0.5, iterations: int = 50,
                  backend: str | None = None) -> torch.Tensor:
    """IPOT distance (B,) between each sample's word rows and region rows of the packed encoder output, under the
    cosine cost; the triton backend reads the packed rows in place and fuses the cost and its gradient."""
    starts = batch.cu_seqlens[:-1]
    return ot.wra_distance_packed(hidden, starts, batch.text_lens, starts + batch.text_lens, batch.region_lens,
                                  batch.max_text_len, batch.max_regions, beta=beta, iterations=iterations,
                                  backend=backend)


def wra_loss(distances: torch.Tensor, itm_labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of matched distances - sum of swapped distances) / batch size."""
    positive = itm_labels == 1
    pos_sum = torch.where(positive, distances, torch.zeros_like(distances)).sum()
    neg_sum = torch.where(positive, torch.zeros_like(distances), distances).sum()
    loss = (pos_sum - neg_sum) / distances.shape[0]
    n_pos = positive.sum().clamp(min=1)
    n_neg = (~positive).sum().clamp(min=1)
    return loss, {"loss": loss.detach(), "pos": (pos_sum / n_pos).detach(), "neg": (neg_sum / n_neg).detach()}
