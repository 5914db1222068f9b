"""Training curves: per-task loss (and accuracy where the task has one) against the update number."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np


def _smooth(values: list[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_curves(history: list[dict], path: str | Path, window: int = 10) -> None:
    """history: one dict per update with "step", "task" and metric values (e.g. "loss", "acc")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_task: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for row in history:
        for key in ("loss", "acc"):
            if key in row:
                per_task[row["task"]][key].append((row["step"], row[key]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lowest = np.inf
    for ax, key, title in ((axes[0], "loss", "training loss"), (axes[1], "acc", "training accuracy")):
        for task, series in sorted(per_task.items()):
            if not series[key]:
                continue
            steps, values = zip(*series[key])
            w = max(1, min(window, len(values) // 5))
            smooth = _smooth(list(values), w)
            ax.plot(steps[w - 1:], smooth, label=task)
            if key == "loss":
                lowest = min(lowest, float(smooth.min()))
        ax.set_xlabel("update")
        ax.set_title(f"{title} (moving average)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    # ITM's loss adds 0.1 x WRA's, which goes below 0 once matched pairs are closer than swapped ones: a log axis
    # would drop those points, a symmetric-log one keeps them
    if lowest > 0:
        axes[0].set_yscale("log")
    else:
        axes[0].set_yscale("symlog", linthresh=1e-2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
