"""The UNITER trunk: embeddings, encoder and pooler over a packed batch."""
from __future__ import annotations

import torch
from torch import nn

from uniter_fast.config import UniterConfig
from uniter_fast.data.packing import PackedBatch
from uniter_fast.model.embeddings import ImageEmbeddings, TextEmbeddings
from uniter_fast.model.encoder import Encoder


class Pooler(nn.Module):
    """tanh(dense(h[CLS]))."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_hidden))


def init_weights(module: nn.Module, std: float) -> None:
    """The original's initialisation: N(0, std) weights, zero biases, LayerNorm 1/0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class UniterModel(nn.Module):
    """forward(batch) -> packed hidden states (total_tokens, hidden); `pool(hidden, batch)` -> (B, hidden)."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.img_embeddings = ImageEmbeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config)
        self.apply(lambda m: init_weights(m, config.initializer_range))
        with torch.no_grad():
            self.img_embeddings.mask_embedding.weight[0].zero_()

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        if batch.max_text_len > self.config.max_position_embeddings:
            raise ValueError(f"a text of {batch.max_text_len} tokens exceeds max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        text = self.embeddings(batch.input_ids, batch.position_ids, batch.token_type_ids)
        types = self.embeddings.token_type_embeddings(batch.img_type_ids)
        feat = batch.img_feat
        if feat.shape[0] == 0 and feat.shape[1] != self.config.img_dim:  # a text-only batch: the packer took a
            feat = feat.new_zeros(0, self.config.img_dim)                 # default width, not knowing the model's
        regions = self.img_embeddings(feat, batch.img_pos, types, batch.img_masks)
        return torch.cat([text, regions.to(text.dtype)]).index_select(0, batch.gather_index)

    def forward(self, batch: PackedBatch, output_attentions: bool = False):
        """Packed hidden states; with output_attentions, (hidden, maps) with maps[layer][sample] = (heads, L_b, L_b)
        attention probabilities from the reference path (each sample's text rows first, then its regions)."""
        return self.encoder(self.embed(batch), batch.cu_seqlens, batch.max_seqlen, output_attentions)

    def pool(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        return self.pooler(hidden.index_select(0, batch.cls_rows))

    @classmethod
    def from_pretrained(cls, source, config: UniterConfig | None = None, *, strict: bool = True):
        """Load an original UNITER checkpoint (trunk keys, heads ignored) or a Hugging Face BERT checkpoint.

        Returns the model, or (model, LoadReport) when strict=False. See model/checkpoint.py.
        """
        from uniter_fast.model.checkpoint import load_pretrained
        return load_pretrained(cls, source, config, strict=strict)
