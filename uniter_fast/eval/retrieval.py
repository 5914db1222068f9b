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
    its captions), as percentages."""
    gt = torch.as_tensor(text_to_image)
    image_rank = (scores > scores.gather(1, gt[:, None])).sum(1)  # images scored above the true one
    out = {}
    for k in ks:
        out[f"ir_r{k}"] = 100.0 * (image_rank < k).float().mean().item()
    by_image = scores.t()  # (n_images, n_texts)
    order = by_image.argsort(dim=1, descending=True)
    hits = gt[order] == torch.arange(scores.shape[1])[:, None]  # (n_images, n_texts): is the ranked text a caption
    first_hit = torch.where(hits.any(1), hits.float().argmax(1), torch.full((scores.shape[1],), scores.shape[0]))
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * (first_hit < k).float().mean().item()
    return out
