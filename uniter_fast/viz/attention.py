"""Attention maps, as the paper visualises them: per sample, every layer's and head's probabilities over its
text tokens then its regions, and a plot of one sample's heads with the text/region blocks marked."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from uniter_fast.data.packing import PackedBatch


@dataclass
class SampleAttention:
    probs: torch.Tensor  # (layers, heads, L, L) fp32: row i attends to column j; text rows first, then regions
    text_len: int        # rows 0 .. text_len-1 are text ([CLS] ... [SEP]), the rest regions


@torch.no_grad()
def attention_maps(model, batch: PackedBatch) -> list[SampleAttention]:
    """The attention probabilities of every sample of `batch` through `model` (a UniterModel), in eval mode.

    The hidden states come from the model's own backend; the probabilities from the reference path in fp32.
    """
    was_training = model.training
    model.eval()
    try:
        _, maps = model(batch, output_attentions=True)
    finally:
        model.train(was_training)
    text_lens = batch.text_lens.tolist()
    return [SampleAttention(torch.stack([layer[b] for layer in maps]).float(), text_lens[b])
            for b in range(batch.batch_size)]


def plot_attention(sample: SampleAttention, path: str | Path, layer: int = -1, tokens: list[str] | None = None,
                   max_heads: int = 16) -> None:
    """One layer's heads of one sample as heat maps; lines separate text from regions. tokens: the text rows'
    labels, [CLS] and [SEP] included (any beyond the text rows are left out)."""
    if tokens is not None and len(tokens) < sample.text_len:
        raise ValueError(f"tokens: {len(tokens)} labels for a sample of {sample.text_len} text rows: give one per "
                         "text row, [CLS] and [SEP] included")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = sample.probs[layer]
    heads = min(probs.shape[0], max_heads)
    cols = min(heads, 4)
    rows = (heads + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    length = probs.shape[-1]
    labels = (tokens or [])[:sample.text_len] + [f"r{i}" for i in range(length - sample.text_len)]
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        ax.imshow(probs[h].numpy(), cmap="viridis", vmin=0.0)
        ax.axhline(sample.text_len - 0.5, color="white", lw=0.8)
        ax.axvline(sample.text_len - 0.5, color="white", lw=0.8)
        ax.set_title(f"layer {layer % sample.probs.shape[0]}, head {h}", fontsize=9)
        if tokens and length <= 40:
            ax.set_xticks(range(length), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(length), labels, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("attention: text rows/columns first, then regions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
