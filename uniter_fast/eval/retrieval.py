"""Image-text retrieval by the ITM score of every (text, image) pair: recall at 1, 5 and 10, both directions."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from uniter_fast.data.packing import pack_batch


@torch.no_grad()
def score_matrix(model, texts: Sequence[np.ndarray], images: Sequence, *, device: torch.device,
                 pairs_per_batch: int = 512) -> torch.Tensor:
    """(n_texts, n_images) matching scores from `model.itm_scores` over packed batches of pairs.

    texts: token ids with [CLS]/[SEP]; images: records with `features` and `norm_bb`.
    """
    regions = [(torch.from_numpy(np.asarray(im.features)), torch.from_numpy(np.asarray(im.norm_bb, dtype=np.float32)))
               for im in images]
    pairs = [(t, i) for t in range(len(texts)) for i in range(len(images))]
    scores = torch.empty(len(pairs))
    for lo in range(0, len(pairs), pairs_per_batch):
        chunk = pairs[lo:lo + pairs_per_batch]
        batch = pack_batch([texts[t] for t, _ in chunk], [regions[i] for _, i in chunk]).to(device)
        scores[lo:lo + len(chunk)] = model.itm_scores(batch).float().cpu()
    return scores.view(len(texts), len(images))


def recall_at_k(scores: torch.Tensor, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image retrieval (each text ranks the images) and text retrieval (each image ranks the texts; a hit is any of
    its captions), as percentages. Ties are broken at random, in expectation: a query whose true items tie with
    false ones counts the probability that a true one lands in the top k (so a constant score gives chance, in
    both directions alike)."""
    scores = scores.double()
    gt = torch.as_tensor(text_to_image)
    n_texts, n_images = scores.shape
    true_image = scores.gather(1, gt[:, None])  # (n_texts, 1)
    image_counts = ((scores > true_image).sum(1), (scores == true_image).sum(1) - 1, torch.ones(n_texts))
    caption = gt[None, :] == torch.arange(n_images)[:, None]  # (n_images, n_texts)
    by_image = scores.t()
    best = torch.where(caption, by_image, -torch.inf).max(1, keepdim=True).values  # each image's best caption
    text_counts = (((by_image > best) & ~caption).sum(1), ((by_image == best) & ~caption).sum(1),
                   ((by_image == best) & caption).sum(1))
    out = {}
    for k in ks:
        out[f"ir_r{k}"] = 100.0 * _hit_probability(*image_counts, k).mean().item()
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * _hit_probability(*text_counts, k).mean().item()
    return out


def _hit_probability(above: torch.Tensor, tied_false: torch.Tensor, tied_true: torch.Tensor, k: int) -> torch.Tensor:
    """Per query, the chance that a true item ranks in the top k: `above` false items score higher than its best
    true item, `tied_false` false and `tied_true` true items share that score, in random order. A miss fills the
    top k's remaining slots with tied false items only: prod_i (tied_false - i) / (tied_false + tied_true - i)."""
    tied_false, tied_true = tied_false.double(), tied_true.double()
    slots = (k - above).clamp(min=0)
    miss = torch.ones(above.shape, dtype=torch.float64)
    for i in range(k):
        factor = (tied_false - i).clamp(min=0) / (tied_false + tied_true - i).clamp(min=1)
        miss = torch.where(i < slots, miss * factor, miss)
    return torch.where(tied_true > 0, 1.0 - miss, 0.0)  # an image without captions never hits
