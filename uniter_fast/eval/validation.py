"""Validation: each task's loss and accuracy on held-out batches drawn the same way every time."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from uniter_fast.data.pretrain import MaskingOptions, PretrainCorpus, make_task_batch
from uniter_fast.data.sampler import TokenBucketSampler
from uniter_fast.objectives.tasks import TASKS


@torch.no_grad()
def validate(model, corpus: PretrainCorpus, tasks, *, batch_tokens: int, num_batches: int, options: MaskingOptions,
             device: torch.device, seed: int = 0) -> dict[str, dict[str, float]]:
    """Each metric over up to `num_batches` batches per task (fixed masks and negatives for a seed), averaged as the
    original's validation divides: over the masked words (MLM), masked regions (MRFR, MRC, MRC-kl) or pairs (ITM)
    of all batches, each batch's mean weighted by its count. WRA's ot_pos and ot_neg are the original's too: the
    distances of matched (swapped) pairs summed over all batches, divided by all pairs."""
    was_training = model.training
    model.eval()
    batches = TokenBucketSampler(corpus.lens, batch_tokens=batch_tokens, seed=seed).epoch(0)[:num_batches]
    results = {}
    for task in tasks:
        # seeded by the task's own name, not its place in the list: an ablation with other tasks validates each
        # task on the same masks and negatives, so the numbers compare across runs
        rng = np.random.default_rng([seed, TASKS.index(task)])
        sums: dict[str, float] = defaultdict(float)
        items = 0
        for indices in batches:
            batch = make_task_batch(corpus, task, indices, rng, options)
            count = _items(batch)
            weights = _pair_weights(batch, count)
            out = model(batch.to(device))
            for name, value in out.metrics.items():
                sums[name] += float(value) * weights.get(name, count)
            items += count
        results[task] = {name: total / items for name, total in sums.items()}
    model.train(was_training)
    return results


def _items(batch) -> int:
    """What a task's per-batch means average over: masked words (MLM), masked regions (MRFR, MRC, MRC-kl) or
    pairs (ITM)."""
    return next(rows for rows in (batch.mlm_rows, batch.mrm_rows, batch.itm_labels) if rows is not None).numel()


def _pair_weights(batch, count: int) -> dict[str, int]:
    """ot_pos and ot_neg are a batch's means over its matched or swapped pairs: weighted by those pairs, each gives
    the batch's sum of distances."""
    if batch.itm_labels is None:
        return {}
    matched = int((batch.itm_labels == 1).sum())
    return {"ot_pos": matched, "ot_neg": count - matched}
