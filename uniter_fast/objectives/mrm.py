"""Masked region modelling: feature regression (MRFR), classification (MRC) and classification with KL (MRC-kl)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mrfr_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean squared error over the masked regions x feature dims, against the features before masking."""
    loss = F.mse_loss(pred.float(), target.float())
    return loss, {"loss": loss.detach()}


def mrc_loss(logits: torch.Tensor, soft_labels: torch.Tensor, *, kl: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MRC-kl: KL(detector distribution || prediction), mean over regions x classes, as the original.
    MRC: cross-entropy to the detector's most likely non-background class (background is never a target).
    """
    soft_labels = soft_labels.float()
    hard = soft_labels[:, 1:].argmax(-1) + 1
    if kl:
        loss = F.kl_div(F.log_softmax(logits.float(), dim=-1), soft_labels, reduction="none").mean()
    else:
        loss = F.cross_entropy(logits.float(), hard, ignore_index=0)
    acc = (logits.detach()[:, 1:].argmax(-1) + 1 == hard).float().mean()  # the most likely object class
    return loss, {"loss": loss.detach(), "acc": acc}
