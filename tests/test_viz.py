"""The plots: what data each axis is drawn from (recorded at the matplotlib call), and attention_maps' mode."""
import matplotlib.axes
import numpy as np
import pytest
import torch

from uniter_fast.model import UniterModel
from uniter_fast.viz.attention import SampleAttention, attention_maps, plot_attention
from uniter_fast.viz.curves import plot_curves
from helpers import random_batch, tiny_config

LOSS_TITLE, ACC_TITLE = "training loss (moving average)", "training accuracy (moving average)"


def _record(monkeypatch, method: str) -> list:
    """Calls of matplotlib Axes.<method> as (axes, args, kwargs); the call itself still happens."""
    calls, original = [], getattr(matplotlib.axes.Axes, method)

    def recording(self, *args, **kwargs):
        calls.append((self, args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, method, recording)
    return calls


def test_attention_plot_shows_the_asked_layers_heads_and_the_text_region_border(tmp_path, monkeypatch):
    probs = torch.rand(3, 2, 5, 5)   # layers, heads, rows, columns
    sample = SampleAttention(probs, text_len=3)
    shown, ticks, borders = (_record(monkeypatch, m) for m in ("imshow", "set_xticks", "axhline"))
    plot_attention(sample, tmp_path / "map.png", layer=1, tokens=["[CLS]", "dog", "[SEP]"])
    assert [args[0].tolist() for _, args, _ in shown] == [probs[1, 0].tolist(), probs[1, 1].tolist()]
    assert [list(args[1]) for _, args, _ in ticks] == [["[CLS]", "dog", "[SEP]", "r0", "r1"]] * 2
    assert [args[0] for _, args, _ in borders] == [2.5, 2.5]   # between the last text row and the first region
    shown.clear()
    plot_attention(sample, tmp_path / "last.png")   # default: the last layer
    assert [args[0].tolist() for _, args, _ in shown] == [probs[2, 0].tolist(), probs[2, 1].tolist()]


@pytest.mark.parametrize("training", [True, False])
def test_attention_maps_are_taken_in_eval_mode_and_restore_the_mode(training):
    batch, _, _ = random_batch(3, seed=1)
    model = UniterModel(tiny_config(backend="torch", hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5))
    model.train(training)
    first, second = attention_maps(model, batch), attention_maps(model, batch)
    assert model.training is training
    for a, b in zip(first, second):   # dropout off: the same maps twice
        torch.testing.assert_close(a.probs, b.probs, rtol=0, atol=0)


def test_curves_plot_each_tasks_moving_average_at_the_windows_last_update(tmp_path, monkeypatch):
    history = [{"step": s, "task": "mlm", "loss": float(s), "acc": 1.0 / s} for s in range(1, 21)]
    history += [{"step": s, "task": "mrfr", "loss": 100.0 + s} for s in range(21, 41)]
    plotted = _record(monkeypatch, "plot")
    plot_curves(history, tmp_path / "curves.png", window=4)
    lines = {(ax.get_title(), kwargs["label"]): (ax, args) for ax, args, kwargs in plotted}
    assert set(lines) == {(LOSS_TITLE, "mlm"), (LOSS_TITLE, "mrfr"), (ACC_TITLE, "mlm")}  # mrfr has no accuracy
    ax, (x, y) = lines[(LOSS_TITLE, "mlm")]
    assert list(x) == list(range(4, 21)) and ax.get_yscale() == "log"
    np.testing.assert_allclose(y, np.arange(4, 21) - 1.5)   # mean of updates s-3 .. s
    ax, (x, y) = lines[(ACC_TITLE, "mlm")]
    assert list(x) == list(range(4, 21)) and ax.get_yscale() == "linear"
    np.testing.assert_allclose(y, [np.mean(1.0 / np.arange(s - 3, s + 1)) for s in range(4, 21)])
    _, (x, y) = lines[(LOSS_TITLE, "mrfr")]
    assert list(x) == list(range(24, 41)) and np.allclose(y, np.arange(24, 41) + 100 - 1.5)


def test_curves_keep_a_loss_below_zero_on_a_symmetric_log_axis(tmp_path, monkeypatch):
    """ITM's loss includes 0.1 x WRA's and goes below 0 late in training: a log axis dropped those points."""
    history = [{"step": s, "task": "itm", "loss": 0.5 - 0.05 * s, "acc": 0.5} for s in range(1, 21)]
    plotted = _record(monkeypatch, "plot")
    plot_curves(history, tmp_path / "curves.png", window=1)
    ax = next(ax for ax, _, _ in plotted if ax.get_title() == LOSS_TITLE)
    assert ax.get_yscale() == "symlog"
    bottom, top = ax.get_ylim()
    assert bottom < 0.5 - 0.05 * 20 and top >= 0.45


def test_attention_plot_refuses_fewer_token_labels_than_text_rows(tmp_path):
    # matplotlib's own error ("FixedLocator locations") did not say which argument was short
    sample = SampleAttention(torch.rand(1, 2, 5, 5), text_len=3)
    with pytest.raises(ValueError, match=r"tokens: 2 labels for a sample of 3 text rows"):
        plot_attention(sample, tmp_path / "a.png", tokens=["dog", "runs"])
    assert not (tmp_path / "a.png").exists()
