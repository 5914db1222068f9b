"""Each pre-training loss against an independent transcription of the original's computation, written from
reference/uniter.md (1.8 head table, 2.1-2.4 WRA, 3.1-3.2 data), not from the code under test.

The trunk is shared (its faithfulness is tested elsewhere); from its packed output the oracles read every head
weight by the original's state-dict key and rebuild the original's padded tensors where it used them.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniter_fast.data.packing import pack_batch
from uniter_fast.data.pretrain import PretrainCorpus, Vocab, make_task_batch
from uniter_fast.model import UniterForPretraining
from uniter_fast.objectives.tasks import PretrainBatch
from uniter_fast.objectives.wra import wra_distances, wra_loss
from helpers import random_samples, tiny_config


def _gelu(x):  # erf GELU, the original's model/layer.py
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _ln(x, sd, key):
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-12)


def _lin(x, sd, key):
    return x @ sd[f"{key}.weight"].T + sd[f"{key}.bias"]


def _model(config, itm_ot_lambda=0.1):
    model = UniterForPretraining(config, itm_ot_lambda=itm_ot_lambda).double().eval()
    with torch.no_grad():  # non-trivial LayerNorm gains/biases and head biases, so the order of ops shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "net.2" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _batch(task, config, seed=0):
    texts, regions = random_samples(5, seed=seed, allow_empty_regions=False, img_dim=config.img_dim,
                                    vocab=config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.rand(r[0].shape[0], generator=gen) < 0.5 for r in regions]
    for m in masks:
        m[0] = True
    regions = [(f.double(), b) for f, b in regions]
    inputs = pack_batch(texts, regions, img_masks=masks if task in ("mrfr", "mrc", "mrckl") else None)
    batch = PretrainBatch(task=task, inputs=inputs)
    if task == "mlm":
        batch.mlm_rows = inputs.text_rows[1::2]
        batch.mlm_labels = torch.randint(0, config.vocab_size, (batch.mlm_rows.numel(),), generator=gen)
    elif task == "itm":
        batch.itm_labels = torch.tensor([1, 0, 0, 1, 0])
    else:
        chosen = torch.cat(masks)
        batch.mrm_rows = inputs.region_rows[chosen]
        batch.mrm_feat = torch.randn(int(chosen.sum()), config.img_dim, generator=gen, dtype=torch.float64)
        soft = torch.rand(int(chosen.sum()), config.img_label_dim, generator=gen, dtype=torch.float64) ** 4
        soft[:, 0] += 2.0  # background the most likely class: never the MRC target
        soft[0, 3] = 0.0   # a zero-probability class: KL's 0 log 0 = 0
        batch.mrm_soft_labels = soft / soft.sum(1, keepdim=True)
    return batch


def _original_ipot_distance(txt_emb, img_emb, txt_pad, img_pad, beta=0.5, iterations=50):
    """reference/uniter.md 2.2-2.3: cosine cost (normalize eps 1e-5), C[pad] = 0, IPOT in the image x text
    orientation with the +1e4 pad terms, k = 1, plan constant; dist = sum_ij C[b,i,j] T[b,j,i]."""
    cost = 1 - F.normalize(txt_emb, dim=-1, eps=1e-5) @ F.normalize(img_emb, dim=-1, eps=1e-5).transpose(1, 2)
    joint_pad = txt_pad[:, :, None] | img_pad[:, None, :]
    cost = cost.masked_fill(joint_pad, 0)
    m = (~txt_pad).sum(1).to(cost.dtype)
    n = (~img_pad).sum(1).to(cost.dtype)
    with torch.no_grad():
        c = cost.detach()
        pad_t = joint_pad.transpose(1, 2)                               # (B, N, M)
        a = torch.exp(-c.transpose(1, 2) / beta).masked_fill(pad_t, 0)
        t = torch.ones_like(a).masked_fill(pad_t, 0)
        sigma = (1 / m)[:, None].expand(-1, c.shape[1]).masked_fill(txt_pad, 0)  # (B, M)
        for _ in range(iterations):
            q = a * t
            delta = 1 / (n[:, None] * (q @ sigma[:, :, None]).squeeze(2) + 1e4 * img_pad.to(c.dtype))
            sigma = 1 / (m[:, None] * (q.transpose(1, 2) @ delta[:, :, None]).squeeze(2)
                         + 1e4 * txt_pad.to(c.dtype))
            t = delta[:, :, None] * q * sigma[:, None, :]
        t = t.masked_fill(pad_t, 0)
    return torch.diagonal(cost @ t, dim1=1, dim2=2).sum(1)


def _original_wra_inputs(hidden, inputs):
    """The original's compact (B, out_size, H) trunk output scattered back to padded text / image (2.1)."""
    tl, nb = inputs.text_lens.tolist(), inputs.region_lens.tolist()
    b, h = len(tl), hidden.shape[1]
    max_tl, max_nbb = max(tl), max(nb)
    out_size = max(t + r for t, r in zip(tl, nb))
    seq = hidden.new_zeros(b, out_size, h)
    scatter = torch.arange(out_size).repeat(b, 1)
    for i, start in enumerate(inputs.cu_seqlens[:-1].tolist()):
        seq[i, :tl[i] + nb[i]] = hidden[start:start + tl[i] + nb[i]]
        scatter[i, tl[i]:] = torch.arange(max_tl, max_tl + out_size - tl[i])
    width = max(int(scatter.max()) + 1, max_tl + max_nbb)
    ctx = hidden.new_zeros(b, width, h).scatter(1, scatter[:, :, None].expand(-1, -1, h), seq)
    txt_pad = torch.arange(max_tl)[None, :] >= torch.tensor(tl)[:, None]
    img_pad = torch.arange(max_nbb)[None, :] >= torch.tensor(nb)[:, None]
    return ctx[:, :max_tl], ctx[:, max_tl:max_tl + max_nbb], txt_pad, img_pad


def test_wra_loss_and_gradient_equal_the_original_padded_ipot():
    """2.1-2.4: last-layer outputs, text incl. [CLS]/[SEP], (sum pos - sum neg) / (n_pos + n_neg), plan constant."""
    texts, regions = random_samples(6, seed=7, allow_empty_regions=False)
    inputs = pack_batch(texts, regions)
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    hidden = torch.randn(inputs.total_tokens, 16, dtype=torch.float64)
    ours_h = hidden.clone().requires_grad_(True)
    ours, _ = wra_loss(wra_distances(ours_h, inputs, backend="torch"), labels)
    ours.backward()
    theirs_h = hidden.clone().requires_grad_(True)
    dist = _original_ipot_distance(*_original_wra_inputs(theirs_h, inputs))
    theirs = (dist[labels == 1].sum() - dist[labels == 0].sum()) / (int((labels == 1).sum()) + int((labels == 0).sum()))
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(ours_h.grad, theirs_h.grad, rtol=1e-7, atol=1e-10)


def test_wra_distances_use_the_given_beta_and_iterations():
    """IPOT's beta and iteration count reach the solver (the model's ot_beta / ot_iterations)."""
    texts, regions = random_samples(4, seed=8, allow_empty_regions=False)
    inputs = pack_batch(texts, regions)
    hidden = torch.randn(inputs.total_tokens, 16, dtype=torch.float64)
    ours = wra_distances(hidden, inputs, beta=0.2, iterations=3, backend="torch")
    theirs = _original_ipot_distance(*_original_wra_inputs(hidden, inputs), beta=0.2, iterations=3)
    default = _original_ipot_distance(*_original_wra_inputs(hidden, inputs))
    assert not torch.allclose(theirs, default, rtol=1e-4)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrckl", "itm"])
def test_task_losses_equal_the_original_heads_and_reductions(task):
    """1.8 / 3.5: each head rebuilt from its state-dict keys, losses with the original's reductions."""
    config = tiny_config()
    model = _model(config)
    batch = _batch(task, config)
    out = model(batch)
    sd = model.state_dict()
    hidden = model.uniter(batch.inputs)
    if task == "mlm":
        x = _ln(_gelu(_lin(hidden[batch.mlm_rows], sd, "cls.predictions.transform.dense")), sd,
                "cls.predictions.transform.LayerNorm")
        logits = x @ sd["uniter.embeddings.word_embeddings.weight"].T + sd["cls.predictions.bias"]
        expected = F.cross_entropy(logits, batch.mlm_labels, reduction="none").mean()
    elif task == "mrfr":
        x = _ln(_gelu(_lin(hidden[batch.mrm_rows], sd, "feat_regress.net.0")), sd, "feat_regress.net.2")
        pred = F.linear(x, sd["uniter.img_embeddings.img_linear.weight"].T, sd["feat_regress.bias"])
        expected = F.mse_loss(pred, batch.mrm_feat, reduction="none").mean()        # regions x 2048
    elif task in ("mrc", "mrckl"):
        x = _ln(_gelu(_lin(hidden[batch.mrm_rows], sd, "region_classifier.net.0")), sd, "region_classifier.net.2")
        logits = _lin(x, sd, "region_classifier.net.3")
        p = batch.mrm_soft_labels
        if task == "mrckl":  # KL(detector || prediction), mean over regions x classes
            logq = torch.log_softmax(logits, -1)
            expected = torch.where(p > 0, p * (torch.log(p) - logq), torch.zeros_like(p)).mean()
        else:  # hard target: most likely non-background class
            target = p[:, 1:].argmax(-1) + 1
            assert (target != p.argmax(-1)).any()
            expected = F.cross_entropy(logits, target, reduction="none").mean()
    else:
        cls_rows = batch.inputs.cu_seqlens[:-1].long()
        pooled = torch.tanh(_lin(hidden[cls_rows], sd, "uniter.pooler.dense"))
        expected = F.cross_entropy(_lin(pooled, sd, "itm_output"), batch.itm_labels, reduction="none").mean()
        dist = _original_ipot_distance(*_original_wra_inputs(hidden, batch.inputs))
        pos, neg = dist[batch.itm_labels == 1], dist[batch.itm_labels == 0]
        expected = expected + 0.1 * (pos.sum() - neg.sum()) / (pos.numel() + neg.numel())
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)  # the losses run in fp32


def test_the_two_ties_share_storage_and_gradient():
    """1.9: cls.predictions.decoder.weight is the word embedding, feat_regress.weight is img_linear.weight."""
    model = UniterForPretraining(tiny_config())
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is model.uniter.img_embeddings.img_linear.weight
    sd = model.state_dict()
    assert sd["feat_regress.weight"].shape == sd["uniter.img_embeddings.img_linear.weight"].shape


class _Image:
    def __init__(self, features, norm_bb, soft_labels):
        self.features, self.norm_bb, self.soft_labels = features, norm_bb, soft_labels


def test_itm_negatives_take_another_images_regions():
    """3.2: a negative keeps its text and takes a different image's regions."""
    rng = np.random.default_rng(0)
    images = {f"img{i}": _Image(rng.standard_normal((4, 8)).astype(np.float16),
                                np.tile(np.array([0.1, 0.1, 0.5, 0.5, 0.4, 0.4], np.float16), (4, 1)),
                                np.full((4, 5), 0.2, np.float16)) for i in range(5)}
    texts = [rng.integers(10, 40, size=4) for _ in range(10)]
    corpus = PretrainCorpus(texts, [f"img{i % 5}" for i in range(10)], images, Vocab(1, 2, 3, (10, 40)))
    indices = list(range(10)) * 30
    batch = make_task_batch(corpus, "itm", indices, np.random.default_rng(5))
    assert 0.38 < batch.itm_labels.float().mean().item() < 0.62  # itm_neg_prob = 0.5
    feats = batch.inputs.img_feat.reshape(len(indices), 4, 8)
    for k, i in enumerate(indices):
        own = torch.from_numpy(images[corpus.image_ids[i]].features)
        assert torch.equal(feats[k], own) == bool(batch.itm_labels[k])
        text = torch.tensor([1, *texts[i], 2])
        assert torch.equal(batch.inputs.input_ids[k * 6:(k + 1) * 6], text)  # text never swapped
