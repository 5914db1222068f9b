"""One task per optimizer update, drawn with the configured mix ratios (the original's MetaLoader), optionally
after phases with mixes of their own (e.g. ITM alone first, so matching leaves its plateau before the mix)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


class TaskSampler:
    """task_for(update) is a pure function of (seed, update): every rank draws the same task without a broadcast,
    and a resumed run draws the same sequence.

    phases: ({"steps": n, "tasks": mix}, ...) run in order from update 0; `mix` serves every update after them.
    """

    def __init__(self, mix: dict[str, int], seed: int, phases: Sequence[dict] = ()):
        self.ends = np.cumsum([phase["steps"] for phase in phases]).tolist()
        self.pools = [_pool(phase["tasks"]) for phase in phases] + [_pool(mix)]
        self.seed = seed

    def task_for(self, update: int) -> str:
        pool = self.pools[int(np.searchsorted(self.ends, update, side="right"))]
        return pool[np.random.default_rng([self.seed, update]).integers(len(pool))]


def _pool(mix: dict[str, int]) -> list[str]:
    return [task for task, ratio in mix.items() for _ in range(ratio)]
