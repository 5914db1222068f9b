"""Post-LN BERT encoder over packed rows (reference/uniter.md 1.6). Module names match the original's keys."""
from __future__ import annotations

import torch
from torch import nn

from uniter_fast.config import UniterConfig
from uniter_fast.kernels.attention import AttentionOptions, VarlenAttention


class SelfAttention(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.attend = VarlenAttention(AttentionOptions(dropout_p=config.attention_probs_dropout_prob,
                                                       backend=config.backend))  # no parameters: keys unchanged

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, probs: bool = False):
        """Packed rows in, packed rows out; probs=True also returns each sample's (heads, L_b, L_b) probabilities."""
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = self.query(x).view(shape), self.key(x).view(shape), self.value(x).view(shape)
        if not probs:
            return self.attend(q, k, v, cu_seqlens, max_seqlen).reshape(x.shape)
        out, maps = self.attend(q, k, v, cu_seqlens, max_seqlen, probs=True)
        return out.reshape(x.shape), maps


class SelfOutput(nn.Module):
    """LayerNorm(dropout(dense(h)) + residual)."""

    def __init__(self, config: UniterConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.self = SelfAttention(config)
        self.output = SelfOutput(config, config.hidden_size)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, probs: bool = False):
        if not probs:
            return self.output(self.self(x, cu_seqlens, max_seqlen), x)
        h, maps = self.self(x, cu_seqlens, max_seqlen, probs=True)
        return self.output(h, x), maps


class Intermediate(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()  # erf GELU, as the original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = SelfOutput(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, probs: bool = False):
        if not probs:
            x = self.attention(x, cu_seqlens, max_seqlen)
            return self.output(self.intermediate(x), x)
        x, maps = self.attention(x, cu_seqlens, max_seqlen, probs=True)
        return self.output(self.intermediate(x), x), maps


class Encoder(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, output_attentions: bool = False):
        """(total, hidden) packed rows; with output_attentions, also maps[layer][sample] = (heads, L_b, L_b)."""
        maps = []
        for layer in self.layer:
            if output_attentions:
                x, layer_maps = layer(x, cu_seqlens, max_seqlen, probs=True)
                maps.append(layer_maps)
            else:
                x = layer(x, cu_seqlens, max_seqlen)
        return (x, maps) if output_attentions else x
