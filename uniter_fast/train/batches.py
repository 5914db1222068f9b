"""The training batches, in update order, made when asked for or ahead on a thread of their own.

A batch is a pure function of its plan (task, example indices, random seed), and the plans are drawn in update
order from the per-task token-bucket streams: made ahead or not, the run sees the same batches in the same order.
Ahead, the masking, the region reads and the packing of the next batches run while the step waits on the GPU.
A thread, not the original's DataLoader worker processes: a worker hands each tensor over through a file descriptor
of its own (0.45 ms apiece on this project's CPU, 7 ms for a batch's 14 tensors) in fresh shared memory (30 ms of
page faults for a 23 MB batch), where the collate itself takes 6-14 ms (benchmarks/bench_collate.py).
"""
from __future__ import annotations

import itertools
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from uniter_fast.data.ahead import Ahead
from uniter_fast.data.pretrain import MaskingOptions, PretrainCorpus, make_task_batch
from uniter_fast.data.sampler import TokenBucketSampler
from uniter_fast.objectives.tasks import PretrainBatch
from uniter_fast.train.config import PretrainConfig
from uniter_fast.train.tasks import TaskSampler


@dataclass(frozen=True)
class BatchPlan:
    """Everything a batch depends on besides the corpus and the masking options."""

    task: str
    indices: tuple[int, ...]  # examples of the corpus
    seed: tuple[int, ...]     # of the batch's masks and negatives: (run seed, rank, task, batches drawn of it)


class TaskStreams:
    """One endless token-bucket stream of batches per task over this rank's shard (the original's loaders)."""

    def __init__(self, corpus: PretrainCorpus, tasks, cfg: PretrainConfig, rank: int):
        self.corpus, self.cfg, self.rank = corpus, cfg, rank
        self.options = MaskingOptions(mrm_prob=cfg.mrm_prob, itm_neg_prob=cfg.itm_neg_prob,
                                      conditional_masking=cfg.conditional_masking)
        self.task_index = {t: i for i, t in enumerate(tasks)}
        self.iters = {t: iter(TokenBucketSampler(corpus.lens, batch_tokens=cfg.train_batch_size,
                                                 seed=cfg.seed * 1000 + i)) for t, i in self.task_index.items()}
        self.drawn = defaultdict(int)  # batches drawn per task: with the seed, fixes each batch's masks

    def plan(self, task: str) -> BatchPlan:
        """The task's next batch, drawn but not made."""
        indices = tuple(int(i) for i in next(self.iters[task]))
        seed = (self.cfg.seed, self.rank, self.task_index[task], self.drawn[task])
        self.drawn[task] += 1
        return BatchPlan(task, indices, seed)

    def fast_forward(self, sampler: TaskSampler, updates: int) -> None:
        """Draw the batches of the first `updates` updates without planning or making them: a resumed run's data
        position (each task's stream is its own, so only how many each task drew matters)."""
        for task, count in Counter(sampler.task_for(u) for u in range(updates)).items():
            count *= self.cfg.gradient_accumulation_steps
            deque(itertools.islice(self.iters[task], count), maxlen=0)
            self.drawn[task] += count

    def make(self, plan: BatchPlan) -> PretrainBatch:
        return make_task_batch(self.corpus, plan.task, list(plan.indices), np.random.default_rng(list(plan.seed)),
                               self.options)

    def next(self, task: str) -> PretrainBatch:
        return self.make(self.plan(task))


def training_batches(streams: TaskStreams, sampler: TaskSampler, cfg: PretrainConfig, prefetch: int,
                     pin_to: torch.device | None = None, start: int = 0) -> Iterator[PretrainBatch]:
    """The run's micro-batches in order from update `start` (streams already fast-forwarded to it):
    gradient_accumulation_steps of sampler.task_for(update) per update.

    prefetch 0: each made when asked for. Otherwise a thread makes them ahead (`prefetch` ready, one more being
    made) while the caller waits on its step (the store's reads, index copies and pinning release the GIL).
    pin_to (a GPU): each batch is also copied into page-locked memory, so the step's copy to it is asynchronous.
    An error making a batch is raised here, when that batch is asked for; close() stops the thread.
    """
    plans = (streams.plan(sampler.task_for(update)) for update in range(start, cfg.num_train_steps)
             for _ in range(cfg.gradient_accumulation_steps))
    made = (streams.make(plan) for plan in plans)  # a generator: close() ends it, as it does Ahead
    if pin_to is not None:
        made = _pinned(made, pin_to)
    return made if prefetch == 0 else Ahead(made, prefetch, "uniter-fast batches")


def _pinned(batches: Iterator[PretrainBatch], device: torch.device) -> Iterator[PretrainBatch]:
    # on the thread that runs it: a new thread's current GPU is 0, and pinning there would give every rank of a
    # multi-GPU run a CUDA context (hundreds of MB) on GPU 0
    torch.cuda.set_device(device)
    for batch in batches:
        yield batch.pin_memory()
