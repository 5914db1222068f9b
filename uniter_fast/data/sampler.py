"""Batching by tokens, as the original's TokenBucketSampler (reference/uniter.md 3.6), deterministic per epoch."""
from __future__ import annotations

from typing import Iterator

import numpy as np


class TokenBucketSampler:
    """Batches of example indices whose padded size (longest example x count) stays within `batch_tokens`.

    Per epoch: shuffle; cut into buckets of `bucket_size`; sort each bucket by length, longest first; fill batches
    in chunks of `size_multiple` examples; shuffle the batches. The order depends only on (seed, epoch), so a
    run can resume at any (epoch, batch) position.
    """

    def __init__(self, lens, *, batch_tokens: int, bucket_size: int = 8192, size_multiple: int = 8,
                 seed: int = 0, drop_last: bool = False):
        self.lens = np.asarray(lens, dtype=np.int64)
        if self.lens.ndim != 1 or self.lens.shape[0] == 0:
            raise ValueError("TokenBucketSampler: lens must be a non-empty 1-D sequence of example lengths")
        if self.lens.max() * size_multiple > batch_tokens:
            raise ValueError(f"TokenBucketSampler: batch_tokens={batch_tokens} cannot hold {size_multiple} examples of "
                             f"the longest length {int(self.lens.max())}; raise it or lower size_multiple")
        self.batch_tokens, self.bucket_size, self.size_multiple = batch_tokens, bucket_size, size_multiple
        self.seed, self.drop_last = seed, drop_last

    def epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        ids = rng.permutation(self.lens.shape[0])
        batches: list[np.ndarray] = []
        for lo in range(0, ids.shape[0], self.bucket_size):
            bucket = ids[lo:lo + self.bucket_size]
            bucket = bucket[np.argsort(-self.lens[bucket], kind="stable")]
            current: list[np.ndarray] = []
            longest = 0
            for c in range(0, bucket.shape[0], self.size_multiple):
                chunk = bucket[c:c + self.size_multiple]
                chunk_longest = int(self.lens[chunk].max())
                count = sum(len(x) for x in current)
                if current and max(longest, chunk_longest) * (count + len(chunk)) > self.batch_tokens:
                    batches.append(np.concatenate(current))
                    current, longest = [], 0
                current.append(chunk)
                longest = max(longest, chunk_longest)
            if current and not self.drop_last:  # the original drops each bucket's last batch when asked
                batches.append(np.concatenate(current))
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[np.ndarray]:
        """Batches forever, epoch after epoch (the original's loaders cycle)."""
        epoch = 0
        while True:
            yield from self.epoch(epoch)
            epoch += 1
