"""Validation: each task's loss and accuracy on held-out batches drawn the same way every time."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from uniter_fast.data.pretrain import MaskingOptions, PretrainCorpus, make_task_batch
from uniter_fast.data.sampler import TokenBucketSampler


@torch.no_grad()
def validate(model, corpus: PretrainCorpus, tasks, *, batch_tokens: int, num_batches: int, options: MaskingOptions,
             device: torch.device, seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean of each metric over `num_batches` batches per task (fixed masks and negatives for a seed)."""
    was_training = model.training
    model.eval()
    batches = TokenBucketSampler(corpus.lens, batch_tokens=batch_tokens, seed=seed).epoch(0)[:num_batches]
    results = {}
    for t, task in enumerate(tasks):
        rng = np.random.default_rng([seed, t])
        sums: dict[str, float] = defaultdict(float)
        for indices in batches:
            out = model(make_task_batch(corpus, task, indices, rng, options).to(device))
            for name, value in out.metrics.items():
                sums[name] += float(value)
        results[task] = {name: total / len(batches) for name, total in sums.items()}
    model.train(was_training)
    return results
