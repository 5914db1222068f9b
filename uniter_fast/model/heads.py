"""Pre-training heads (reference/uniter.md 1.8). Each head reads only the rows it is given."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uniter_fast.config import UniterConfig


def _mlp_layers(config: UniterConfig) -> list[nn.Module]:
    """Linear(H, H) -> GELU -> LayerNorm: the transform the MRFR and MRC heads share (as `net.0/1/2`)."""
    return [nn.Linear(config.hidden_size, config.hidden_size), nn.GELU(),
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)]


class PredictionHeadTransform(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictionHead(nn.Module):
    """decoder.weight is tied to the word embeddings; its bias is the separate `bias` vector."""

    def __init__(self, config: UniterConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = PredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


class MLMHead(nn.Module):
    """Keys: cls.predictions.*"""

    def __init__(self, config: UniterConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = LMPredictionHead(config, word_embeddings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


class RegionFeatureRegression(nn.Module):
    """MRFR: net(x) projected back to the feature space with img_linear's weight transposed, own bias."""

    def __init__(self, config: UniterConfig, img_linear_weight: nn.Parameter):
        super().__init__()
        self.net = nn.Sequential(*_mlp_layers(config))
        self.weight = img_linear_weight  # tied: (hidden, img_dim)
        self.bias = nn.Parameter(torch.zeros(config.img_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.net(x), self.weight.t(), self.bias)


class RegionClassification(nn.Module):
    """MRC / MRC-kl: net(x) -> 1601 detector classes (background at 0)."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.net = nn.Sequential(*_mlp_layers(config), nn.Linear(config.hidden_size, config.img_label_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
