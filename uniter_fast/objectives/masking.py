"""Conditional masking (reference/uniter.md 3.1): the original's per-token and per-region Bernoulli rules."""
from __future__ import annotations

import numpy as np

MASK_PROB = 0.15


def mask_text(tokens: np.ndarray, rng: np.random.Generator, *, mask_id: int, vocab_range: tuple[int, int],
              prob: float = MASK_PROB) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of words (no [CLS]/[SEP]): returns (masked tokens, labels with -1 where not masked).

    Each token is chosen with probability `prob`; a chosen token becomes [MASK] 80% of the time, a random id in
    [vocab_range[0], vocab_range[1]) 10%, and stays 10%. If none is chosen, the first token is masked.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    chosen = rng.random(tokens.shape[0]) < prob
    action = rng.random(tokens.shape[0])
    random_ids = rng.integers(vocab_range[0], vocab_range[1], size=tokens.shape[0])
    masked = np.where(chosen & (action < 0.8), mask_id, tokens)
    masked = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    if tokens.shape[0] and not chosen.any():  # the original's "at least one": the first word becomes [MASK]
        chosen[0] = True
        masked[0] = mask_id
    return masked, np.where(chosen, tokens, -1)


def mask_regions(num_regions: int, rng: np.random.Generator, *, prob: float = MASK_PROB) -> np.ndarray:
    """Bernoulli(prob) per region, at least one (a uniformly chosen region) when there are any."""
    chosen = rng.random(num_regions) < prob
    if num_regions and not chosen.any():
        chosen[rng.integers(num_regions)] = True
    return chosen
