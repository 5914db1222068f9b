"""The task collate's options and the corpus it reads: masking rates, ITM negatives, lengths and sharding
(reference/uniter.md 3.1, 3.2, 3.6)."""
import numpy as np
import pytest
import torch

from uniter_fast.data.pretrain import MaskingOptions, PretrainCorpus, Vocab, make_task_batch

MASK_ID = 3


class _Image:
    def __init__(self, features, norm_bb, soft_labels):
        self.features, self.norm_bb, self.soft_labels = features, norm_bb, soft_labels


def _corpus(n_images=4, regions=30, words=20, captions_per_image=3, seed=0):
    rng = np.random.default_rng(seed)
    box = np.array([0.1, 0.1, 0.5, 0.5, 0.4, 0.4], np.float16)
    images = {f"img{i}": _Image(rng.standard_normal((regions + i, 8)).astype(np.float16), np.tile(box, (regions + i, 1)),
                                np.full((regions + i, 5), 0.2, np.float16)) for i in range(n_images)}
    n = n_images * captions_per_image
    texts = [rng.integers(10, 40, size=words + i % 3) for i in range(n)]
    return PretrainCorpus(texts, [f"img{i % n_images}" for i in range(n)], images,
                          Vocab(cls_id=1, sep_id=2, mask_id=MASK_ID, vocab_range=(10, 40)),
                          [f"t{i}" for i in range(n)])


def test_joint_masking_masks_words_in_region_tasks_too():
    """Table 2 row 12 (no conditional masking): an MRM batch also has masked words."""
    corpus = _corpus()
    for task in ("mrfr", "mrc", "mrckl"):
        batch = make_task_batch(corpus, task, list(range(6)), np.random.default_rng(0),
                                MaskingOptions(conditional_masking=False))
        assert batch.inputs.img_masks.any(), task
        assert (batch.inputs.input_ids == MASK_ID).any(), task


def test_word_and_region_masking_use_their_own_probabilities():
    corpus = _corpus()
    options = MaskingOptions(mlm_prob=0.6, mrm_prob=0.1)
    indices = list(range(len(corpus))) * 10
    mlm = make_task_batch(corpus, "mlm", indices, np.random.default_rng(1), options)
    words = sum(len(corpus.texts[i]) for i in indices)
    assert mlm.mlm_rows.numel() / words == pytest.approx(0.6, abs=0.05)
    mrfr = make_task_batch(corpus, "mrfr", indices, np.random.default_rng(2), options)
    assert mrfr.mrm_rows.numel() / mrfr.inputs.img_masks.numel() == pytest.approx(0.1, abs=0.03)


@pytest.mark.parametrize("neg_prob", [0.0, 0.2, 1.0])
def test_itm_negative_share_follows_itm_neg_prob(neg_prob):
    corpus = _corpus()
    batch = make_task_batch(corpus, "itm", list(range(len(corpus))) * 40, np.random.default_rng(3),
                            MaskingOptions(itm_neg_prob=neg_prob))
    assert 1 - batch.itm_labels.float().mean().item() == pytest.approx(neg_prob, abs=0.05)


def test_negatives_come_from_every_other_image_alike():
    corpus = _corpus(n_images=5)
    rng = np.random.default_rng(4)
    drawn = [corpus.negative_image("img2", rng) for _ in range(4000)]
    assert "img2" not in drawn
    counts = {i: drawn.count(i) for i in ("img0", "img1", "img3", "img4")}
    assert all(abs(c / 4000 - 0.25) < 0.03 for c in counts.values()), counts


def test_lengths_are_words_plus_regions_without_cls_and_sep():
    """3.6: the sampler buckets by txt_len (no [CLS]/[SEP]) + nbb."""
    corpus = _corpus()
    expected = [len(t) + corpus.images[i].features.shape[0] for t, i in zip(corpus.texts, corpus.image_ids)]
    assert corpus.lens.tolist() == expected


def test_shard_is_every_world_size_th_example_with_its_text_ids():
    """3.2: each rank keeps ids[rank::world_size]."""
    corpus = _corpus()
    shards = [corpus.shard(rank, 3) for rank in range(3)]
    for rank, shard in enumerate(shards):
        assert shard.text_ids == corpus.text_ids[rank::3]
        assert shard.image_ids == corpus.image_ids[rank::3]
        assert all(np.array_equal(a, b) for a, b in zip(shard.texts, corpus.texts[rank::3]))
        assert shard.lens.tolist() == corpus.lens[rank::3].tolist()
    assert sum(len(s) for s in shards) == len(corpus)


def test_mlm_batch_with_an_empty_caption_names_it():
    """The original's "at least one masked word" fails on a caption without words; ours says which one."""
    base = _corpus()
    corpus = PretrainCorpus([base.texts[4], np.zeros(0, dtype=np.int64)], base.image_ids[4:6], base.images,
                            base.vocab, ["t4", "t5"])
    with pytest.raises(ValueError, match="'t5'"):
        make_task_batch(corpus, "mlm", [0, 1], np.random.default_rng(5))
    batch = make_task_batch(corpus, "mrfr", [0, 1], np.random.default_rng(5))  # other tasks need no words
    assert batch.inputs.text_lens.tolist() == [len(base.texts[4]) + 2, 2]


def test_a_store_that_gathers_other_counts_than_its_index_is_refused():
    """batch_regions trusts the store's index for the masks: a gather that disagrees is a bad store, named as such."""
    from types import SimpleNamespace

    from uniter_fast.data.pretrain import batch_regions

    class Disagreeing(dict):
        def gather(self, image_ids, soft_labels=False):
            return SimpleNamespace(offsets=torch.tensor([0, 3]), features=torch.zeros(3, 4),
                                   boxes=torch.zeros(3, 7), soft_labels=None)

    with pytest.raises(ValueError, match=r"the store gave \[3\] regions for \['img1'\], its index \[2\]"):
        batch_regions(Disagreeing(), ["img1"], [np.zeros(2, dtype=bool)], False, False)
