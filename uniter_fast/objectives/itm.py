"""Image-text matching: 2-way cross-entropy on the pooled [CLS] (the original's code, not the paper's sigmoid)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.detach().argmax(-1) == labels).float().mean()
    return loss, {"loss": loss.detach(), "acc": acc}
