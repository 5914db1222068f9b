"""Masked language modelling: cross-entropy over the masked words only."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logits (k, vocab) of the k masked words, labels (k,): mean cross-entropy and accuracy."""
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.detach().argmax(-1) == labels).float().mean()
    return loss, {"loss": loss.detach(), "acc": acc}
