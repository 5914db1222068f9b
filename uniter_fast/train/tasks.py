"""One task per optimizer update, drawn with the configured mix ratios (the original's MetaLoader)."""
from __future__ import annotations

import numpy as np


class TaskSampler:
    """task_for(update) is a pure function of (seed, update): every rank draws the same task without a broadcast,
    and a resumed run draws the same sequence."""

    def __init__(self, mix: dict[str, int], seed: int):
        self.pool = [task for task, ratio in mix.items() for _ in range(ratio)]
        self.seed = seed

    def task_for(self, update: int) -> str:
        return self.pool[np.random.default_rng([self.seed, update]).integers(len(self.pool))]
