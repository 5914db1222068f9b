"""Text and image embeddings, exactly as the original UNITER (reference/uniter.md 1.2-1.3), on packed rows."""
from __future__ import annotations

import torch
from torch import nn

from uniter_fast.config import UniterConfig


class TextEmbeddings(nn.Module):
    """LayerNorm(word + position + token type), then dropout. Keys: uniter.embeddings.*"""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        emb = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
               + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(emb))


class ImageEmbeddings(nn.Module):
    """LayerNorm(LN(img_linear(feat)) + LN(pos_linear(box7)) + type), then dropout. Keys: uniter.img_embeddings.*

    A masked region's features arrive zeroed and get the learned [MASK] vector (row 1 of mask_embedding; row 0 is
    the original's always-zero padding row). The type embedding comes from the *text* table, passed in.
    """

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.img_linear = nn.Linear(config.img_dim, config.hidden_size)
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pos_linear = nn.Linear(7, config.hidden_size)
        self.mask_embedding = nn.Embedding(2, config.img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, feat: torch.Tensor, pos: torch.Tensor, type_embeddings: torch.Tensor,
                img_masks: torch.Tensor | None = None) -> torch.Tensor:
        feat = feat.to(self.img_linear.weight.dtype)
        if img_masks is not None:
            feat = feat + img_masks.unsqueeze(1).to(feat.dtype) * self.mask_embedding.weight[1]
        emb = (self.img_layer_norm(self.img_linear(feat))
               + self.pos_layer_norm(self.pos_linear(pos.to(self.pos_linear.weight.dtype)))
               + type_embeddings)
        return self.dropout(self.LayerNorm(emb))
