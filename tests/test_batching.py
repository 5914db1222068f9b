"""Token-bucket batching, task sampling, the task collate, and retrieval recall."""
from dataclasses import dataclass
from collections import Counter

import numpy as np
import pytest
import torch

from uniter_fast.data.pretrain import MaskingOptions, PretrainCorpus, Vocab, make_task_batch
from uniter_fast.data.sampler import TokenBucketSampler
from uniter_fast.eval.retrieval import recall_at_k
from uniter_fast.train.tasks import TaskSampler


def test_token_buckets_respect_the_budget_and_cover_each_epoch():
    lens = np.random.default_rng(0).integers(10, 60, size=1000)
    sampler = TokenBucketSampler(lens, batch_tokens=1200, bucket_size=256, size_multiple=8, seed=3)
    batches = sampler.epoch(0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    for batch in batches:
        assert lens[batch].max() * len(batch) <= 1200
    full = [b for b in batches if len(b) % 8 == 0]
    assert len(full) >= len(batches) - 4  # only each bucket's last batch may be ragged (4 buckets)
    assert [b.tolist() for b in sampler.epoch(0)] == [b.tolist() for b in batches]  # deterministic per epoch
    assert [b.tolist() for b in sampler.epoch(1)] != [b.tolist() for b in batches]



def test_token_buckets_are_length_sorted_runs_served_in_shuffled_order():
    """One bucket: batches cut a longest-first sorting of the examples (little padding), then get shuffled."""
    lens = np.random.default_rng(1).integers(10, 60, size=400)
    batches = TokenBucketSampler(lens, batch_tokens=1200, bucket_size=1000, size_multiple=8, seed=2).epoch(0)
    maxima = [int(lens[b].max()) for b in batches]
    by_length = sorted(batches, key=lambda b: -int(lens[b].max()))
    for longer, shorter in zip(by_length, by_length[1:]):
        assert lens[longer].min() >= lens[shorter].max()
    assert maxima != sorted(maxima, reverse=True)  # served shuffled, not longest batch first


def test_the_seed_changes_the_order():
    lens = np.random.default_rng(0).integers(10, 60, size=200)
    order = lambda seed: [b.tolist() for b in TokenBucketSampler(lens, batch_tokens=1200, seed=seed).epoch(0)]
    assert order(3) == order(3) and order(3) != order(4)


def test_iterating_runs_epoch_after_epoch():
    """The endless stream is epoch 0, then epoch 1, ...: the position (epoch, batch) fixes every batch."""
    lens = np.random.default_rng(0).integers(10, 60, size=200)
    sampler = TokenBucketSampler(lens, batch_tokens=1200, seed=5)
    expected = sampler.epoch(0) + sampler.epoch(1) + sampler.epoch(2)[:1]
    stream = iter(sampler)
    got = [next(stream) for _ in expected]
    assert [b.tolist() for b in got] == [b.tolist() for b in expected]


def test_drop_last_drops_each_buckets_ragged_batch_only():
    lens = np.full(300, 10)
    kwargs = dict(batch_tokens=160, bucket_size=100, size_multiple=8, seed=1)
    kept = TokenBucketSampler(lens, **kwargs).epoch(0)
    assert len(kept) == 21 and sorted(np.concatenate(kept).tolist()) == list(range(300))
    assert sorted(len(b) for b in kept) == [4] * 3 + [16] * 18
    dropped = TokenBucketSampler(lens, drop_last=True, **kwargs).epoch(0)
    assert [len(b) for b in dropped] == [16] * 18
    assert len(set(np.concatenate(dropped).tolist())) == 288

def test_token_budget_too_small_is_refused():
    with pytest.raises(ValueError, match="cannot hold 8 examples"):
        TokenBucketSampler([100, 20], batch_tokens=500)


def test_task_sampler_follows_mix_ratios_and_is_a_function_of_the_update():
    sampler = TaskSampler({"itm": 2, "mlm": 2, "mrfr": 1, "mrckl": 1}, seed=42)
    counts = Counter(sampler.task_for(u) for u in range(12000))
    for task, share in (("itm", 1 / 3), ("mlm", 1 / 3), ("mrfr", 1 / 6), ("mrckl", 1 / 6)):
        assert counts[task] / 12000 == pytest.approx(share, abs=0.02)
    assert [sampler.task_for(u) for u in range(50)] == [TaskSampler(dict(itm=2, mlm=2, mrfr=1, mrckl=1), 42).task_for(u)
                                                        for u in range(50)]



def test_task_sampler_runs_its_phases_first():
    mix = {"itm": 2, "mlm": 2, "mrfr": 1, "mrckl": 1}
    phases = ({"steps": 30, "tasks": {"itm": 1}}, {"steps": 20, "tasks": {"mlm": 1, "mrfr": 1}})
    sampler = TaskSampler(mix, seed=42, phases=phases)
    assert {sampler.task_for(u) for u in range(30)} == {"itm"}
    assert {sampler.task_for(u) for u in range(30, 50)} == {"mlm", "mrfr"}
    plain = TaskSampler(mix, seed=42)
    assert [sampler.task_for(u) for u in range(50, 500)] == [plain.task_for(u) for u in range(50, 500)]

@dataclass
class _Image:
    features: np.ndarray
    norm_bb: np.ndarray
    soft_labels: np.ndarray


def _corpus(n_images=6, seed=0):
    rng = np.random.default_rng(seed)
    images = {}
    for i in range(n_images):
        n = int(rng.integers(3, 8))
        xy = rng.random((n, 2)) * 0.5
        wh = rng.random((n, 2)) * 0.4
        soft = rng.random((n, 9))
        images[f"img{i}"] = _Image(rng.standard_normal((n, 16)).astype(np.float16),
                                   np.concatenate([xy, xy + wh, wh], 1).astype(np.float16),
                                   (soft / soft.sum(1, keepdims=True)).astype(np.float16))
    texts = [rng.integers(10, 40, size=int(rng.integers(2, 9))) for _ in range(3 * n_images)]
    return PretrainCorpus(texts, [f"img{i % n_images}" for i in range(3 * n_images)], images,
                          Vocab(cls_id=1, sep_id=2, mask_id=3, vocab_range=(10, 40)))


def test_mlm_batch_masks_words_only_and_labels_point_at_them():
    corpus = _corpus()
    batch = make_task_batch(corpus, "mlm", list(range(8)), np.random.default_rng(0))
    inputs = batch.inputs
    assert inputs.img_masks is None
    assert batch.mlm_rows.numel() == batch.mlm_labels.numel() >= 8  # at least one per sample
    originals = torch.cat([torch.tensor([1, *corpus.texts[i], 2]) for i in range(8)])
    row_to_text = {r: j for j, r in enumerate(inputs.text_rows.tolist())}
    for row, label in zip(batch.mlm_rows.tolist(), batch.mlm_labels.tolist()):
        assert originals[row_to_text[row]].item() == label
        assert label not in (1, 2)  # never [CLS]/[SEP]
    unmasked = torch.ones(len(originals), dtype=torch.bool)
    unmasked[[row_to_text[r] for r in batch.mlm_rows.tolist()]] = False
    assert torch.equal(inputs.input_ids[unmasked], originals[unmasked])


@pytest.mark.parametrize("task", ["mrfr", "mrc", "mrckl"])
def test_region_batch_zeroes_masked_features_and_keeps_targets(task):
    corpus = _corpus()
    batch = make_task_batch(corpus, task, list(range(6)), np.random.default_rng(1))
    inputs = batch.inputs
    originals = torch.cat([torch.from_numpy(corpus.images[corpus.image_ids[i]].features) for i in range(6)])
    assert inputs.img_masks.any()
    assert inputs.img_feat[inputs.img_masks].eq(0).all()
    assert torch.equal(inputs.img_feat[~inputs.img_masks], originals[~inputs.img_masks])
    assert torch.equal(batch.mrm_rows, inputs.region_rows[inputs.img_masks])
    if task == "mrfr":
        assert torch.equal(batch.mrm_feat, originals[inputs.img_masks]) and batch.mrm_soft_labels is None
    else:
        soft = torch.cat([torch.from_numpy(corpus.images[corpus.image_ids[i]].soft_labels) for i in range(6)])
        assert torch.equal(batch.mrm_soft_labels, soft[inputs.img_masks]) and batch.mrm_feat is None
    texts = torch.cat([torch.tensor([1, *corpus.texts[i], 2]) for i in range(6)])
    assert torch.equal(inputs.input_ids, texts)  # conditional masking: text intact


def test_joint_masking_masks_both_modalities():
    corpus = _corpus()
    opts = MaskingOptions(conditional_masking=False)
    batch = make_task_batch(corpus, "mlm", list(range(6)), np.random.default_rng(2), opts)
    assert batch.inputs.img_masks.any() and batch.mlm_rows.numel() >= 6


def test_itm_swaps_images_for_negatives():
    corpus = _corpus()
    batch = make_task_batch(corpus, "itm", list(range(18)) * 20, np.random.default_rng(3))
    labels = batch.itm_labels
    assert 0.35 < labels.float().mean().item() < 0.65
    region_counts = batch.inputs.region_lens.tolist()
    for k, i in enumerate(list(range(18)) * 20):
        own = corpus.images[corpus.image_ids[i]].features.shape[0]
        if labels[k] == 1:
            assert region_counts[k] == own
    assert batch.inputs.img_masks is None and batch.mlm_rows is None


def test_corpus_errors_name_the_missing_image():
    with pytest.raises(KeyError, match="img9"):
        PretrainCorpus([np.array([5])], ["img9"], {}, Vocab(1, 2, 3, (4, 9)))


def test_recall_at_k_counts_hits_in_both_directions():
    # 3 texts, 3 images; text 0 -> image 0 ranked 1st, text 1 -> image 1 ranked 2nd, text 2 -> image 2 ranked 3rd
    scores = torch.tensor([[0.9, 0.1, 0.0],
                           [0.8, 0.5, 0.1],
                           [0.7, 0.6, 0.2]])
    r = recall_at_k(scores, [0, 1, 2], ks=(1, 2, 3))
    assert r["ir_r1"] == pytest.approx(100 / 3) and r["ir_r2"] == pytest.approx(200 / 3) and r["ir_r3"] == 100
    # images ranking texts: image 0's best text is text 0 (hit); image 1: text 2 (0.6) then text 1 (0.5);
    # image 2: text 2 first (hit)
    assert r["tr_r1"] == pytest.approx(200 / 3) and r["tr_r2"] == 100
