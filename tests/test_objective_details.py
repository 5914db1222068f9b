"""Details of the pre-training objectives that the broader tests leave open: the masking rule's edges, the fp32
losses, the metrics, the model's WRA defaults and the ITM score (reference/uniter.md 1.8, 2.4, 3.1, 3.5, 8)."""
import math

import numpy as np
import pytest
import torch

from uniter_fast.data.packing import pack_batch
from uniter_fast.model import UniterForPretraining
from uniter_fast.objectives.itm import itm_loss
from uniter_fast.objectives.masking import mask_text
from uniter_fast.objectives.mlm import mlm_loss
from uniter_fast.objectives.mrm import mrc_loss, mrfr_loss
from uniter_fast.objectives.tasks import PretrainBatch
from uniter_fast.objectives.wra import wra_distances, wra_loss
from helpers import random_samples, tiny_config


# --- masking ---------------------------------------------------------------------------------------------------

def test_random_replacement_draws_every_id_of_the_range_including_its_first():
    """3.1: random ids are uniform over range(v_range[0], v_range[1]); v_range[0] (the id of '!') is drawn too."""
    rng = np.random.default_rng(0)
    tokens = np.full(6000, 50)  # outside the range, so a replacement is never mistaken for a kept word
    masked, labels = mask_text(tokens, rng, mask_id=3, vocab_range=(10, 13), prob=1.0)
    assert (labels == 50).all()
    replaced = masked[(masked != 3) & (masked != 50)]
    assert set(replaced.tolist()) == {10, 11, 12}
    counts = np.bincount(replaced - 10, minlength=3) / len(replaced)
    np.testing.assert_allclose(counts, 1 / 3, atol=0.06)


def test_an_empty_caption_masks_nothing():
    """Joint masking (no conditional masking) also masks the words of region tasks, whose captions may be empty:
    there is no first word to force, and nothing may fail."""
    masked, labels = mask_text(np.array([], dtype=np.int64), np.random.default_rng(0), mask_id=3,
                               vocab_range=(10, 20))
    assert masked.shape == (0,) and labels.shape == (0,)


def test_masked_words_and_labels_are_int64():
    """Labels feed cross-entropy targets, which must be int64, whatever integer type the caption came in."""
    masked, labels = mask_text(np.array([11, 12, 13], dtype=np.int32), np.random.default_rng(0), mask_id=3,
                               vocab_range=(10, 20), prob=0.5)
    assert masked.dtype == np.int64 and labels.dtype == np.int64


# --- losses in fp32 ----------------------------------------------------------------------------------------------

def _log_softmax64(x):
    x = x.double()
    return x - torch.logsumexp(x, -1, keepdim=True)


@pytest.mark.parametrize("task", ["mlm", "itm", "mrfr", "mrc", "mrckl"])
def test_losses_are_computed_in_fp32_from_bf16_head_outputs(task):
    """Under bf16 the heads give bf16 outputs; each loss must still be an fp32 computation (as apex O2's fp32
    losses in the original), not one rounded to bf16's 3 significant digits."""
    gen = torch.Generator().manual_seed(1)
    k, classes = 64, 11
    logits = (torch.randn(k, classes, generator=gen) * 3).bfloat16()
    if task in ("mlm", "itm"):
        n = 2 if task == "itm" else classes
        labels = torch.randint(0, n, (k,), generator=gen)
        loss, _ = (itm_loss if task == "itm" else mlm_loss)(logits[:, :n], labels)
        expected = -_log_softmax64(logits[:, :n])[torch.arange(k), labels].mean()
    elif task == "mrfr":
        pred = (torch.randn(k, 24, generator=gen) * 3).bfloat16()
        target = (torch.randn(k, 24, generator=gen) * 3).bfloat16()
        loss, _ = mrfr_loss(pred, target)
        expected = ((pred.double() - target.double()) ** 2).mean()
    else:
        soft = torch.rand(k, classes, generator=gen, dtype=torch.float64) ** 3
        soft = soft / soft.sum(1, keepdim=True)
        loss, _ = mrc_loss(logits, soft.float(), kl=task == "mrckl")
        p, logq = soft.float().double(), _log_softmax64(logits)
        if task == "mrckl":
            expected = (p * (p.log() - logq)).mean()
        else:
            expected = -logq[torch.arange(k), p[:, 1:].argmax(1) + 1].mean()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=2e-6)


# --- metrics -----------------------------------------------------------------------------------------------------

def test_mlm_accuracy_is_the_share_of_masked_words_predicted():
    """The logged accuracy is a mean over masked words, not a count."""
    logits = torch.full((4, 6), -1.0)
    logits[torch.arange(4), torch.tensor([2, 5, 0, 1])] = 3.0  # predictions 2, 5, 0, 1
    _, metrics = mlm_loss(logits, torch.tensor([2, 5, 4, 4]))
    assert metrics["acc"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_wra_metrics_stay_finite_when_a_batch_has_one_kind_of_pair(labels):
    """A small ITM batch can draw no negative (or no positive): the loss is still (sum pos - sum neg) / B and the
    empty group's mean is logged as 0, not NaN."""
    dist, labels = torch.tensor([0.3, 0.6, 0.9]), torch.tensor(labels)
    loss, metrics = wra_loss(dist, labels)
    sign = 1.0 if labels[0] == 1 else -1.0
    assert loss.item() == pytest.approx(sign * 1.8 / 3)
    present, absent = ("pos", "neg") if labels[0] == 1 else ("neg", "pos")
    assert metrics[present].item() == pytest.approx(0.6)
    assert metrics[absent].item() == 0.0


# --- the batch ---------------------------------------------------------------------------------------------------

def test_pretrain_batch_to_moves_every_tensor_and_keeps_the_task():
    """PretrainBatch.to is how the training loop puts a batch on the accelerator: targets and inputs alike."""
    texts, regions = random_samples(3, seed=0, allow_empty_regions=False)
    inputs = pack_batch(texts, regions)
    batch = PretrainBatch(task="mrckl", inputs=inputs, mrm_rows=inputs.region_rows[:2],
                          mrm_soft_labels=torch.rand(2, 11))
    moved = batch.to("meta")
    assert moved.task == "mrckl" and moved.mlm_rows is None
    assert moved.mrm_rows.device.type == "meta" and moved.mrm_soft_labels.device.type == "meta"
    assert moved.inputs.input_ids.device.type == "meta" and moved.inputs.img_feat.device.type == "meta"
    assert batch.mrm_rows.device.type == "cpu"  # the original stays where it was


# --- the model ---------------------------------------------------------------------------------------------------

def _itm_batch(seed=0):
    texts, regions = random_samples(4, seed=seed, allow_empty_regions=False)
    return PretrainBatch(task="itm", inputs=pack_batch(texts, regions), itm_labels=torch.tensor([1, 0, 0, 1]))


def _itm_cross_entropy(model, batch, hidden):
    """2-way CE on tanh(pooler.dense(h[CLS])), computed here from the weights."""
    pooled = torch.tanh(hidden[batch.inputs.cu_seqlens[:-1].long()] @ model.uniter.pooler.dense.weight.T
                        + model.uniter.pooler.dense.bias)
    logits = pooled @ model.itm_output.weight.T + model.itm_output.bias
    return -_log_softmax64(logits)[torch.arange(len(batch.itm_labels)), batch.itm_labels].mean(), logits


def _itm_run(seed: int = 0, **model_kwargs):
    """A tiny model without dropout on an ITM batch: (batch, its output, the last layer's rows, the ITM
    cross-entropy computed here from the weights)."""
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = UniterForPretraining(config, **model_kwargs).eval()
    batch = _itm_batch(seed)
    with torch.no_grad():
        out = model(batch)
        hidden = model.uniter(batch.inputs)
        ce, _ = _itm_cross_entropy(model, batch, hidden)
    return batch, out, hidden, ce


def test_the_default_model_adds_wra_with_the_originals_lambda_beta_and_iterations():
    """8.6: every original pre-training config adds 0.1 x WRA to ITM, with IPOT beta 0.5 and 50 iterations."""
    batch, out, hidden, ce = _itm_run()
    with torch.no_grad():
        dist = wra_distances(hidden, batch.inputs, beta=0.5, iterations=50, backend="torch")
        other = wra_distances(hidden, batch.inputs, beta=0.2, iterations=3, backend="torch")
    assert not torch.allclose(dist, other, rtol=1e-3)  # the settings show in the loss
    pos, neg = dist[batch.itm_labels == 1].sum(), dist[batch.itm_labels == 0].sum()
    expected = ce.item() + 0.1 * (pos - neg).item() / 4
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_a_model_given_other_ot_settings_uses_them():
    """ot_beta and ot_iterations reach the solver."""
    batch, out, hidden, ce = _itm_run(seed=1, itm_ot_lambda=1.0, ot_beta=0.2, ot_iterations=3)
    with torch.no_grad():
        dist = wra_distances(hidden, batch.inputs, beta=0.2, iterations=3, backend="torch")
    pos, neg = dist[batch.itm_labels == 1].sum(), dist[batch.itm_labels == 0].sum()
    assert out.loss.item() == pytest.approx(ce.item() + (pos - neg).item() / 4, rel=1e-5)


def test_itm_loss_metric_is_the_total_with_wra():
    """The logged ITM loss is what is back-propagated (CE + lambda x WRA), the parts logged beside it."""
    _, out, _, ce = _itm_run(itm_ot_lambda=0.5)
    assert out.metrics["loss"].item() == pytest.approx(out.loss.item(), rel=1e-6)
    assert out.metrics["loss"].item() == pytest.approx(ce.item() + 0.5 * out.metrics["ot_loss"].item(), rel=1e-5)


def test_lambda_zero_turns_wra_off():
    """With itm_ot_lambda = 0 (the original's CLI default) no transport is solved: plain ITM, no OT metrics."""
    _, out, _, ce = _itm_run(itm_ot_lambda=0.0)
    assert not any(k.startswith("ot_") for k in out.metrics)
    assert out.loss.item() == pytest.approx(ce.item(), rel=1e-6)


def test_itm_scores_are_the_matched_logit():
    """Zero-shot retrieval ranks by itm_output row 1 (the original's rank_output is initialised from it)."""
    model = UniterForPretraining(tiny_config()).eval()
    with torch.no_grad():
        model.itm_output.bias.copy_(torch.tensor([2.0, -2.0]))  # rows 0 and 1 told apart
        batch = _itm_batch(seed=2)
        scores = model.itm_scores(batch.inputs)
        _, logits = _itm_cross_entropy(model, batch, model.uniter(batch.inputs))
    torch.testing.assert_close(scores.double(), logits[:, 1].double(), rtol=1e-5, atol=1e-6)


def test_mlm_output_bias_starts_at_zero():
    """cls.predictions.bias is a separate vector initialised to zeros, as BERT's LM head."""
    model = UniterForPretraining(tiny_config())
    assert model.cls.predictions.bias.eq(0).all()
    assert model.cls.predictions.decoder.bias is None
    assert math.prod(model.cls.predictions.bias.shape) == model.config.vocab_size
