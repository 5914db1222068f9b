"""Every pre-training loss against a direct computation on a small case, and the masking rules' statistics."""
import numpy as np
import pytest
import torch

from uniter_fast.data.packing import pack_batch
from uniter_fast.kernels import ot
from uniter_fast.model import UniterForPretraining
from uniter_fast.objectives.itm import itm_loss
from uniter_fast.objectives.masking import mask_regions, mask_text
from uniter_fast.objectives.mlm import mlm_loss
from uniter_fast.objectives.mrm import mrc_loss, mrfr_loss
from uniter_fast.objectives.tasks import PretrainBatch
from uniter_fast.objectives.wra import wra_distances, wra_loss
from helpers import random_samples, tiny_config


def test_mlm_loss_is_mean_negative_log_likelihood():
    logits, labels = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    loss, metrics = mlm_loss(logits, labels)
    expected = -np.mean([np.log(np.exp(r) / np.exp(r).sum())[y] for r, y in zip(logits.numpy().astype(np.float64), labels)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["acc"].item() == pytest.approx(np.mean(logits.argmax(1).numpy() == labels.numpy()))


def test_mrfr_is_mean_squared_error_over_regions_and_dims():
    pred, target = torch.randn(3, 8), torch.randn(3, 8).half()
    loss, _ = mrfr_loss(pred, target)
    assert loss.item() == pytest.approx(((pred.double() - target.double()) ** 2).sum().item() / 24, rel=1e-5)


def test_mrc_kl_is_mean_elementwise_kl_and_mrc_ignores_background():
    logits = torch.randn(4, 6)
    soft = torch.rand(4, 6)
    soft[0, 0] = 5.0  # background the most likely class: MRC must still pick a foreground one
    soft = soft / soft.sum(1, keepdim=True)
    kl, _ = mrc_loss(logits, soft, kl=True)
    q = torch.log_softmax(logits.double(), -1)
    p = soft.double()
    assert kl.item() == pytest.approx((p * (p.log() - q)).sum().item() / 24, rel=1e-5)
    ce, metrics = mrc_loss(logits, soft, kl=False)
    hard = soft[:, 1:].argmax(1) + 1
    assert hard[0] != 0
    assert ce.item() == pytest.approx(-q[torch.arange(4), hard].mean().item(), rel=1e-5)
    assert metrics["acc"].item() == pytest.approx((logits[:, 1:].argmax(1) + 1 == hard).float().mean().item())


def test_itm_loss_is_two_way_cross_entropy():
    logits, labels = torch.randn(6, 2), torch.tensor([1, 0, 1, 1, 0, 0])
    loss, _ = itm_loss(logits, labels)
    assert loss.item() == pytest.approx(-torch.log_softmax(logits.double(), 1)[torch.arange(6), labels].mean().item(),
                                        rel=1e-6)


def test_itm_accuracy_is_the_share_of_pairs_whose_larger_logit_is_the_label():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [3.0, 0.5], [2.0, 1.0]])
    _, metrics = itm_loss(logits, torch.tensor([1, 0, 1, 0]))
    assert metrics["acc"].item() == pytest.approx(0.75)  # pairs 0, 1 and 3 right, pair 2 wrong


def test_wra_loss_pulls_matched_and_pushes_swapped_pairs():
    dist, labels = torch.tensor([0.2, 0.9, 0.4, 0.7]), torch.tensor([1, 0, 1, 0])
    loss, metrics = wra_loss(dist, labels)
    assert loss.item() == pytest.approx(((0.2 + 0.4) - (0.9 + 0.7)) / 4)
    assert metrics["pos"].item() == pytest.approx(0.3) and metrics["neg"].item() == pytest.approx(0.8)


def test_wra_metrics_average_matched_and_swapped_pairs_separately():
    dist, labels = torch.tensor([0.2, 0.9, 0.4, 0.6, 0.3]), torch.tensor([1, 0, 1, 1, 0])
    loss, metrics = wra_loss(dist, labels)
    assert loss.item() == pytest.approx(((0.2 + 0.4 + 0.6) - (0.9 + 0.3)) / 5)
    assert metrics["pos"].item() == pytest.approx(0.4) and metrics["neg"].item() == pytest.approx(0.6)


def test_wra_on_the_triton_backend_equals_the_reference():
    """The objective reads the packed rows through the fused kernel (the interpreter on the CPU)."""
    texts, regions = random_samples(5, seed=4)
    batch = pack_batch(texts, regions)
    hidden = torch.randn(batch.total_tokens, 16)
    results = {}
    for name in ("torch", "triton"):
        h = hidden.clone().requires_grad_(True)
        dist = wra_distances(h, batch, backend=name)
        (dist * torch.arange(1.0, 6.0)).sum().backward()
        results[name] = (dist.detach(), h.grad)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-4, atol=1e-6)


def test_wra_distance_per_sample_equals_a_single_problem():
    texts, regions = random_samples(4, seed=3, allow_empty_regions=False)
    batch = pack_batch(texts, regions)
    hidden = torch.randn(batch.total_tokens, 16, requires_grad=True)
    dist = wra_distances(hidden, batch)
    for b, (t, r) in enumerate(batch.split(hidden.detach())):
        tn = torch.nn.functional.normalize(t.double(), dim=-1, eps=1e-5)
        rn = torch.nn.functional.normalize(r.double(), dim=-1, eps=1e-5)
        cost = (1 - tn @ rn.T)[None]
        alone = ot.ipot(cost, torch.tensor([len(t)]), torch.tensor([len(r)]))
        assert dist[b].item() == pytest.approx(alone.item(), rel=1e-5)
    dist.sum().backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


def test_text_masking_statistics():
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 100, size=200_000)
    masked, labels = mask_text(tokens, rng, mask_id=3, vocab_range=(10, 100))
    chosen = labels != -1
    assert chosen.mean() == pytest.approx(0.15, abs=0.005)
    assert np.array_equal(labels[chosen], tokens[chosen])
    assert np.array_equal(masked[~chosen], tokens[~chosen])
    to_mask = (masked[chosen] == 3).mean()
    unchanged = (masked[chosen] == tokens[chosen]).mean()
    assert to_mask == pytest.approx(0.8, abs=0.01)
    # 10% kept, plus the random replacements that happen to draw the same id (1 in 90)
    assert unchanged == pytest.approx(0.1 + 0.1 / 90, abs=0.01)
    replaced = masked[chosen][(masked[chosen] != 3) & (masked[chosen] != tokens[chosen])]
    assert replaced.min() >= 10 and replaced.max() < 100


def test_text_masking_follows_the_given_probability():
    rng = np.random.default_rng(3)
    tokens = rng.integers(10, 100, size=50_000)
    for prob in (0.05, 0.5):
        _, labels = mask_text(tokens, rng, mask_id=3, vocab_range=(10, 100), prob=prob)
        assert (labels != -1).mean() == pytest.approx(prob, abs=0.01)


def test_at_least_one_word_and_one_region_masked():
    rng = np.random.default_rng(1)
    for _ in range(300):
        masked, labels = mask_text(np.array([11, 12]), rng, mask_id=3, vocab_range=(10, 20), prob=0.01)
        assert (labels != -1).sum() >= 1
        if (labels != -1).sum() == 1 and labels[0] != -1 and masked[0] != 3:
            assert masked[0] in range(10, 20)  # chosen by the draw itself, not by the fallback
        assert mask_regions(5, rng, prob=0.01).sum() >= 1
    masked, labels = mask_text(np.array([11, 12, 13]), rng, mask_id=3, vocab_range=(10, 20), prob=0.0)
    assert masked.tolist() == [3, 12, 13] and labels.tolist() == [11, -1, -1]
    assert mask_regions(0, rng).shape == (0,)


def test_the_forced_region_is_drawn_uniformly():
    """The original forces random.choice(range(num_bb)) when no region was drawn, not always the first."""
    rng = np.random.default_rng(4)
    forced = np.stack([mask_regions(4, rng, prob=0.0) for _ in range(4000)])
    assert (forced.sum(1) == 1).all()
    np.testing.assert_allclose(forced.mean(0), 0.25, atol=0.03)


def test_region_masking_rate():
    rng = np.random.default_rng(2)
    chosen = np.concatenate([mask_regions(100, rng) for _ in range(2000)])
    assert chosen.mean() == pytest.approx(0.15, abs=0.005)


def test_unknown_task_is_refused_by_name():
    texts, regions = random_samples(2, seed=0)
    with pytest.raises(ValueError, match="'mrm'"):
        PretrainBatch(task="mrm", inputs=pack_batch(texts, regions))


def _pretrain_batch(task: str, seed: int = 0):
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    texts, regions = random_samples(4, seed=seed, allow_empty_regions=False)
    masks = [torch.arange(r[0].shape[0]) % 2 == 0 for r in regions]
    batch = pack_batch(texts, regions, img_masks=masks if task != "mlm" else None)
    out = PretrainBatch(task=task, inputs=batch)
    if task == "mlm":
        out.mlm_rows = batch.text_rows[1::3]
        out.mlm_labels = batch.input_ids[1::3]
    elif task == "itm":
        out.itm_labels = torch.tensor([1, 0, 1, 0])
    else:
        chosen = torch.cat(masks)
        out.mrm_rows = batch.region_rows[chosen]
        out.mrm_feat = batch.img_feat[chosen]
        soft = torch.rand(int(chosen.sum()), config.img_label_dim)
        out.mrm_soft_labels = soft / soft.sum(1, keepdim=True)
    return config, out


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrckl", "itm"])
def test_pretraining_forward_reads_only_the_rows_each_head_needs(task):
    config, batch = _pretrain_batch(task)
    model = UniterForPretraining(config, itm_ot_lambda=0.1).eval()
    out = model(batch)
    hidden = model.uniter(batch.inputs)
    if task == "mlm":
        expected, _ = mlm_loss(model.cls(hidden[batch.mlm_rows]), batch.mlm_labels)
    elif task == "mrfr":
        net = model.feat_regress.net(hidden[batch.mrm_rows])
        expected, _ = mrfr_loss(net @ model.uniter.img_embeddings.img_linear.weight + model.feat_regress.bias,
                                batch.mrm_feat)
    elif task in ("mrc", "mrckl"):
        expected, _ = mrc_loss(model.region_classifier(hidden[batch.mrm_rows]), batch.mrm_soft_labels,
                               kl=task == "mrckl")
    else:
        pooled = torch.tanh(model.uniter.pooler.dense(hidden[batch.inputs.cu_seqlens[:-1].long()]))
        expected, _ = itm_loss(model.itm_output(pooled), batch.itm_labels)
        ot_loss, _ = wra_loss(wra_distances(hidden, batch.inputs), batch.itm_labels)
        expected = expected + 0.1 * ot_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mlm_head_uses_the_tied_word_embeddings():
    config, batch = _pretrain_batch("mlm")
    model = UniterForPretraining(config)
    model(batch).loss.backward()
    # the tied matrix gets gradient both as an embedding and as the decoder: all rows, not just the input ids
    grad_rows = (model.uniter.embeddings.word_embeddings.weight.grad.abs().sum(1) > 0).sum().item()
    assert grad_rows > len(set(batch.inputs.input_ids.tolist()))
