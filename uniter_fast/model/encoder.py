"""Post-LN BERT encoder over packed rows (reference/uniter.md 1.6). Module names match the original's keys; the
fused query/key/value projection presents the original's three (SelfAttention)."""
from __future__ import annotations

import torch
from torch import nn

from uniter_fast.config import UniterConfig
from uniter_fast.kernels.attention import AttentionOptions, VarlenAttention


QKV_PARTS = ("query", "key", "value")  # the original's projections: SelfAttention.qkv's row blocks, in order


class SelfAttention(nn.Module):
    """Query, key and value from one (3 * hidden, hidden) product: one matrix product, one cast and one bias
    forward, and one of each for the input's gradient, where three Linear layers made three. Its state dict keeps
    the original's keys: `state_dict()` gives the row blocks as `query`, `key` and `value` (detached views of the
    fused parameter, with keep_vars too: copying into one writes qkv) and `load_state_dict` joins them again.
    Dicts named after the parameters (`named_parameters`, DeepSpeed's files) have `qkv`: checkpoint.py splits it."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.attend = VarlenAttention(AttentionOptions(dropout_p=config.attention_probs_dropout_prob,
                                                       backend=config.backend))  # no parameters: keys unchanged
        self.register_state_dict_post_hook(_qkv_as_original)
        self.register_load_state_dict_pre_hook(_qkv_from_original)

    def projections(self, x: torch.Tensor) -> torch.Tensor:
        """(total, 3, heads, head_dim): each row's query, key and value."""
        return self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, probs: bool = False):
        """Packed rows in, packed rows out; probs=True also returns each sample's (heads, L_b, L_b) probabilities."""
        qkv = self.projections(x)
        if not probs:
            return self.attend.from_qkv(qkv, cu_seqlens, max_seqlen).reshape(x.shape)
        out, maps = self.attend.from_qkv(qkv, cu_seqlens, max_seqlen, probs=True)
        return out.reshape(x.shape), maps


def _qkv_as_original(module: SelfAttention, state_dict, prefix: str, local_metadata) -> None:
    """state_dict(): qkv.weight and qkv.bias (the last keys so far) become query.*, key.*, value.*, the original's
    keys in its order. A ZeRO-3 placeholder (not 3 * hidden rows here) stays fused: it holds no values."""
    fused = {kind: state_dict.get(f"{prefix}qkv.{kind}") for kind in ("weight", "bias")}
    if any(t is None or t.shape[:1] != (module.qkv.out_features,) for t in fused.values()):
        return
    for kind in fused:
        del state_dict[f"{prefix}qkv.{kind}"]
    blocks = {kind: t.detach().chunk(3) for kind, t in fused.items()}  # views: copying into one writes qkv
    for i, part in enumerate(QKV_PARTS):
        for kind in fused:
            state_dict[f"{prefix}{part}.{kind}"] = blocks[kind][i]


def _qkv_from_original(module: SelfAttention, state_dict, prefix: str, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    """load_state_dict(): the original's query.*, key.* and value.* joined into qkv.* (a fused key loads as is)."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{part}.{kind}" for part in QKV_PARTS]
        present = [k for k in keys if k in state_dict]
        plural = {"weight": "weights", "bias": "biases"}[kind]
        fused = f"{prefix}qkv.{kind}"
        if len(present) == 3 and fused not in state_dict:
            state_dict[fused] = torch.cat([state_dict.pop(k) for k in keys])
        elif present and fused in state_dict:
            error_msgs.append(f"{prefix}: the attention's {plural} are given twice, as {fused} and as "
                              f"{', '.join(present)}: keep one of them")
        elif present:
            error_msgs.append(f"{prefix}: the attention's query, key and value {plural} load together; got only "
                              f"{', '.join(present)}")


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
