"""Details of the pre-training data (uniter_fast.data.pretrain) and the synthetic world (uniter_fast.data.synthetic)
that the broader tests leave open.

Pre-training data: the masking options' defaults and checks (reference/uniter.md 3.1, 3.2, 3.4), the corpus checks
and its ITM negative pool, joint masking's reach (never ITM, only the task's own targets), the documented draw
order, and a region store as the image mapping (index lookups, stores without soft labels, swapped negatives).
Synthetic world: the config's boundary values, and the geometry, confidences, labels and grammar its docstrings
promise. Expected values come from those documents, not from running the code under test.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import re

import numpy as np
import pytest
import torch

import uniter_fast.data.synthetic as synthetic
from uniter_fast.data.pretrain import MaskingOptions, PretrainCorpus, Vocab, make_task_batch
from uniter_fast.data.region_store import RegionStore, RegionStoreWriter
from uniter_fast.data.synthetic import COUNT_WORDS, STUFF_NAMES, WorldConfig, make_world
from uniter_fast.objectives.masking import mask_regions, mask_text

VOCAB = Vocab(cls_id=1, sep_id=2, mask_id=3, vocab_range=(10, 40))
# A tiny world: small features and the fewest labels its 4 classes allow (1 background + 4 classes + 8 stuff).
TINY = WorldConfig(seed=5, num_train_images=6, num_val_images=1, captions_per_image=3, num_classes=4,
                   num_colours=2, img_dim=16, num_labels=13)


@pytest.fixture(scope="module")
def tiny_images():
    return make_world(TINY)["train"].images


def _corpus(images, captions_per_image=3, words=6, seed=0, image_ids=None):
    """Random captions (ids in VOCAB's range) for `image_ids` (default: every image), in image order."""
    rng = np.random.default_rng(seed)
    ids = [i for i in (image_ids or list(images)) for _ in range(captions_per_image)]
    texts = [rng.integers(*VOCAB.vocab_range, size=words) for _ in ids]
    return PretrainCorpus(texts, ids, images, VOCAB)


def _write_store(path, images, soft_labels=True):
    with RegionStoreWriter(path, feature_dim=TINY.img_dim, label_dim=TINY.num_labels,
                           soft_labels=soft_labels) as writer:
        for image_id, image in images.items():
            writer.add(image_id, image.features, image.norm_bb, image.conf,
                       image.soft_labels if soft_labels else None)
    return RegionStore(path)


def _region_rows(batch, b):
    """Sample b's region rows of the packed img_feat."""
    start = int(batch.inputs.region_lens[:b].sum())
    return slice(start, start + int(batch.inputs.region_lens[b]))


# ---- masking options -----------------------------------------------------------------------------------------

def test_masking_defaults_are_the_original_pretraining_recipe():
    """3.1/3.4: 15% of words or regions, half of the ITM pairs negative, one modality masked per task."""
    options = MaskingOptions()
    assert (options.mlm_prob, options.mrm_prob, options.itm_neg_prob) == (0.15, 0.15, 0.5)
    assert options.conditional_masking is True


@pytest.mark.parametrize("name", ["mlm_prob", "mrm_prob", "itm_neg_prob"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_probabilities_outside_zero_one_are_refused_naming_the_option(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be a probability"):
        MaskingOptions(**{name: value})


# ---- the corpus ----------------------------------------------------------------------------------------------

def test_corpus_refuses_texts_and_image_ids_of_different_lengths(tiny_images):
    with pytest.raises(ValueError, match="2 texts but 3 image ids"):
        PretrainCorpus([np.array([11]), np.array([12])], list(tiny_images)[:3], tiny_images, VOCAB)


def test_missing_images_are_listed_five_at_most_then_an_ellipsis():
    ids = [f"gone{i}" for i in range(7)]
    with pytest.raises(KeyError) as error:
        PretrainCorpus([np.array([11])] * 7, ids, {}, VOCAB)
    message = str(error.value)
    assert all(i in message for i in ids[:5]) and "gone5" not in message and message.rstrip("'\"").endswith(" ...")


def test_captions_without_text_ids_are_named_by_their_position(tiny_images):
    corpus = _corpus(tiny_images, captions_per_image=1)
    assert corpus.text_ids == [str(i) for i in range(len(tiny_images))]


def test_negatives_come_only_from_images_the_captions_refer_to(tiny_images):
    """3.2: a negative image is drawn from the images referenced by this (rank's) text shard."""
    used = list(tiny_images)[:3]
    corpus = _corpus(tiny_images, image_ids=used)
    rng = np.random.default_rng(0)
    assert {corpus.negative_image(used[0], rng) for _ in range(200)} == set(used[1:])


class _CountingRng:
    """Always draws index 0; fails the test instead of looping forever."""

    def __init__(self):
        self.calls = 0

    def integers(self, high):
        self.calls += 1
        assert self.calls < 100, "negative_image kept drawing the only image"
        return 0


def test_a_negative_needs_a_second_image(tiny_images):
    only = list(tiny_images)[0]
    corpus = _corpus(tiny_images, image_ids=[only])
    with pytest.raises(ValueError, match="at least two images"):
        corpus.negative_image(only, _CountingRng())


def test_corpus_takes_region_counts_from_a_stores_index_without_reading_records(tiny_images):
    """region_count: a store answers num_regions from its index; its records stay unread."""

    class IndexOnly(collections.abc.Mapping):
        def __getitem__(self, image_id):
            raise AssertionError(f"record {image_id} was read")

        def __iter__(self):
            return iter(tiny_images)

        def __len__(self):
            return len(tiny_images)

        def __contains__(self, image_id):
            return image_id in tiny_images

        def num_regions(self, image_id):
            return tiny_images[image_id].features.shape[0]

    corpus = _corpus(IndexOnly(), captions_per_image=1, words=4)
    assert corpus.lens.tolist() == [4 + image.features.shape[0] for image in tiny_images.values()]


# ---- the task collate ----------------------------------------------------------------------------------------

def _captions_with_specials(corpus, indices):
    return torch.cat([torch.tensor([VOCAB.cls_id, *corpus.texts[i], VOCAB.sep_id]) for i in indices])


def test_joint_masking_leaves_itm_pairs_unmasked(tiny_images):
    """Joint masking (Table 2 row 12) masks both modalities of the MLM and MRM tasks; ITM masks nothing."""
    corpus = _corpus(tiny_images)
    indices = list(range(len(corpus)))
    batch = make_task_batch(corpus, "itm", indices, np.random.default_rng(0),
                            MaskingOptions(conditional_masking=False))
    assert torch.equal(batch.inputs.input_ids, _captions_with_specials(corpus, indices))
    assert batch.inputs.img_masks is None
    assert batch.mlm_rows is None and batch.mrm_rows is None


@pytest.mark.parametrize("task, others", [("mlm", ("mrm_rows", "mrm_feat", "mrm_soft_labels")),
                                          ("mrfr", ("mlm_rows", "mlm_labels")),
                                          ("mrckl", ("mlm_rows", "mlm_labels"))])
def test_joint_masking_batches_carry_only_their_own_tasks_targets(tiny_images, task, others):
    """Both modalities are masked, but the loss (and validation's per-item weighting) is the task's own."""
    corpus = _corpus(tiny_images)
    batch = make_task_batch(corpus, task, list(range(len(corpus))), np.random.default_rng(1),
                            MaskingOptions(conditional_masking=False))
    assert batch.inputs.img_masks.any() and (batch.inputs.input_ids == VOCAB.mask_id).any()
    assert all(getattr(batch, name) is None for name in others), task


def test_joint_masking_region_task_needs_no_words(tiny_images):
    """Only MLM needs a word to mask; a region task's caption may be empty under joint masking too."""
    base = _corpus(tiny_images)
    corpus = PretrainCorpus([base.texts[0], np.zeros(0, dtype=np.int64)], base.image_ids[:2], tiny_images, VOCAB)
    batch = make_task_batch(corpus, "mrfr", [0, 1], np.random.default_rng(2),
                            MaskingOptions(conditional_masking=False))
    assert batch.inputs.text_lens.tolist() == [len(base.texts[0]) + 2, 2]
    assert batch.mrm_rows.numel() >= 2


def test_masked_words_become_mask_or_a_random_id_from_the_vocab_range(tiny_images):
    """3.1: of the chosen words 80% become [MASK], 10% a random id in [v_range[0], v_range[1]), 10% stay."""
    corpus = _corpus(tiny_images, words=60)
    batch = make_task_batch(corpus, "mlm", list(range(len(corpus))), np.random.default_rng(3),
                            MaskingOptions(mlm_prob=1.0))
    shown = batch.inputs.input_ids[torch.isin(batch.inputs.text_rows, batch.mlm_rows)]   # rows ascend in both
    assert batch.mlm_rows.numel() == len(corpus) * 60   # every word chosen
    assert (shown == VOCAB.mask_id).float().mean().item() == pytest.approx(0.8, abs=0.04)
    replaced = shown[(shown != VOCAB.mask_id) & (shown != batch.mlm_labels)]
    assert replaced.numel() > 50
    low, high = VOCAB.vocab_range
    assert ((replaced >= low) & (replaced < high)).all(), replaced[(replaced < low) | (replaced >= high)]


@pytest.mark.parametrize("task, target", [("mlm", "mlm_labels"), ("itm", "itm_labels")])
def test_class_targets_are_int64_as_cross_entropy_needs(tiny_images, task, target):
    batch = make_task_batch(_corpus(tiny_images), task, list(range(6)), np.random.default_rng(0))
    labels = getattr(batch, target)
    assert labels.dtype == torch.int64
    torch.nn.functional.cross_entropy(torch.zeros(labels.numel(), 50), labels)   # accepted as targets

def test_a_masked_word_with_id_zero_keeps_its_label(tiny_images):
    """Labels are -1 where nothing is masked; 0 is a token id like any other (meta accepts special ids from 0)."""
    corpus = PretrainCorpus([np.array([0, 11, 0])], list(tiny_images)[:1], tiny_images, VOCAB)
    batch = make_task_batch(corpus, "mlm", [0], np.random.default_rng(0), MaskingOptions(mlm_prob=1.0))
    assert batch.mlm_labels.tolist() == [0, 11, 0]
    assert batch.mlm_rows.tolist() == [1, 2, 3]   # after [CLS]


def test_float32_boxes_of_in_memory_regions_are_kept_exactly():
    """A Regions mapping may hold float32 boxes (a store can too: box_dtype): no rounding through float16."""
    boxes = np.array([[0.1, 0.2, 0.7001, 0.9003, 0.6001, 0.7003]], dtype=np.float32)
    image = dataclasses.make_dataclass("Image", ["features", "norm_bb", "soft_labels"])(
        np.ones((1, 4), np.float16), boxes, np.full((1, 3), 1 / 3, np.float16))
    corpus = PretrainCorpus([np.array([11, 12])], ["only"], {"only": image}, VOCAB)
    pos = make_task_batch(corpus, "mrfr", [0], np.random.default_rng(0)).inputs.img_pos
    assert pos.dtype == torch.float32
    assert torch.equal(pos[0, :6], torch.from_numpy(boxes[0]))
    assert pos[0, 6].item() == pytest.approx(0.6001 * 0.7003, rel=1e-6)   # the area, w * h

def test_draws_follow_the_documented_order_words_then_regions(tiny_images):
    """A batch is a function of the rng state: per sample the words are drawn first, then the regions."""
    corpus = _corpus(tiny_images)
    indices = [0, 4, 8, 13]
    batch = make_task_batch(corpus, "mlm", indices, np.random.default_rng(4), MaskingOptions(conditional_masking=False))
    rng = np.random.default_rng(4)
    words, regions = [], []
    for i in indices:
        masked, _ = mask_text(corpus.texts[i], rng, mask_id=VOCAB.mask_id, vocab_range=VOCAB.vocab_range, prob=0.15)
        words.append(torch.tensor([VOCAB.cls_id, *masked, VOCAB.sep_id]))
        regions.append(torch.from_numpy(mask_regions(len(tiny_images[corpus.image_ids[i]].features), rng, prob=0.15)))
    assert torch.equal(batch.inputs.input_ids, torch.cat(words))
    assert torch.equal(batch.inputs.img_masks, torch.cat(regions))


# ---- a region store as the image mapping ---------------------------------------------------------------------

@pytest.mark.parametrize("task", ["mrfr", "mrckl"])
def test_store_region_batches_zero_masked_rows_and_keep_their_targets(tiny_images, tmp_path, task):
    store = _write_store(tmp_path / "store", tiny_images)
    corpus = _corpus(store)
    batch = make_task_batch(corpus, task, list(range(len(corpus))), np.random.default_rng(5))
    masks = batch.inputs.img_masks
    feats = torch.cat([torch.from_numpy(tiny_images[i].features) for i in corpus.image_ids])
    soft = torch.cat([torch.from_numpy(tiny_images[i].soft_labels) for i in corpus.image_ids])
    assert masks.any() and (~masks).any()
    assert batch.inputs.img_feat[masks].eq(0).all()
    assert torch.equal(batch.inputs.img_feat[~masks], feats[~masks])
    if task == "mrfr":
        assert torch.equal(batch.mrm_feat, feats[masks]) and batch.mrm_soft_labels is None
    else:
        assert torch.equal(batch.mrm_soft_labels, soft[masks]) and batch.mrm_feat is None


@pytest.mark.parametrize("task", ["mlm", "mrfr", "itm"])
def test_a_store_without_soft_labels_serves_the_tasks_that_do_not_read_them(tiny_images, tmp_path, task):
    """Soft labels are MRC's targets only: a store written without them still feeds MLM, MRFR and ITM."""
    store = _write_store(tmp_path / "store", tiny_images, soft_labels=False)
    corpus = _corpus(store)
    batch = make_task_batch(corpus, task, list(range(len(corpus))), np.random.default_rng(6))
    assert batch.inputs.img_feat.shape == (int(batch.inputs.region_lens.sum()), TINY.img_dim)


def test_itm_negatives_read_from_a_store_carry_the_swapped_images_regions(tiny_images, tmp_path):
    store = _write_store(tmp_path / "store", tiny_images)
    corpus = _corpus(store)
    indices = list(range(len(corpus))) * 3
    batch = make_task_batch(corpus, "itm", indices, np.random.default_rng(7))
    labels = batch.itm_labels.tolist()
    assert 0 < sum(labels) < len(labels)
    for k, i in enumerate(indices):
        shown = batch.inputs.img_feat[_region_rows(batch, k)].numpy()
        matches = [image_id for image_id, image in tiny_images.items()
                   if image.features.shape == shown.shape and np.array_equal(image.features, shown)]
        assert len(matches) == 1 and (matches[0] == corpus.image_ids[i]) == bool(labels[k]), (k, matches)


# ---- the synthetic world: config boundaries ------------------------------------------------------------------

def test_config_accepts_its_documented_boundaries():
    """Six objects (the largest count word), NUM_CONFUSABLE + 1 = 4 classes, one label per class and stuff kind
    plus background, and a fixed region count (min == max, like the original's num_bb=36 option)."""
    config = WorldConfig(seed=2, num_train_images=8, num_val_images=1, max_objects=6, min_regions=12,
                         max_regions=12, num_classes=4, img_dim=8, num_labels=1 + 4 + len(STUFF_NAMES))
    world = make_world(config)
    assert {image.features.shape[0] for split in world.values() for image in split.images.values()} == {12}


@pytest.mark.parametrize("changes, message", [
    ({"max_objects": 7}, r"WorldConfig\.max_objects must be in \[1, 6\], got 7$"),
    ({"num_classes": 3}, r"WorldConfig\.num_classes must be in \[4, 24\], got 3$"),
    ({"num_classes": 4, "num_labels": 12}, r"WorldConfig\.num_labels must be >= 13, got 12$"),
])
def test_config_refuses_the_first_value_past_a_bound_stating_the_bound(changes, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**changes)


# ---- the synthetic world: regions ----------------------------------------------------------------------------

WORLD = WorldConfig(seed=11, num_train_images=150, num_val_images=2, img_dim=32)


@pytest.fixture(scope="module")
def world_pair():
    """The same world with and without feature noise: noise changes only the features (same draws)."""
    return make_world(WORLD)["train"], make_world(dataclasses.replace(WORLD, feature_noise=0.0))["train"]


def _objects_rows(split):
    """(image, scene, object index, that object's rows, tight row first) of every object."""
    for image_id, image in split.images.items():
        scene = split.scenes[image_id]
        for j in range(len(scene.objects)):
            yield image, scene, j, np.flatnonzero(scene.region_object == j)


def test_counts_cover_the_configured_ranges(world_pair):
    """1..max_objects objects, min..max_regions regions per image, and 0-2 part regions per object."""
    split = world_pair[0]
    objects = {len(scene.objects) for scene in split.scenes.values()}
    regions = {image.features.shape[0] for image in split.images.values()}
    parts = {len(rows) - 1 for _, _, _, rows in _objects_rows(split)}
    assert objects == set(range(WORLD.min_objects, WORLD.max_objects + 1))
    assert min(regions) == WORLD.min_regions and max(regions) == WORLD.max_regions
    assert parts == {0, 1, 2}


def test_every_region_passes_butds_confidence_threshold(world_pair):
    """BUTD keeps boxes with confidence >= 0.2 (reference/uniter.md 4.1: conf_th 0.2)."""
    conf = np.concatenate([image.conf[:, 0] for image in world_pair[0].images.values()])
    assert conf.min() >= np.float16(0.2)


def test_part_boxes_cover_half_to_all_of_each_side_of_their_objects_box(world_pair):
    tol = 2e-3   # fp16 storage of the boxes
    seen = 0
    for image, scene, j, rows in _objects_rows(world_pair[0]):
        x1, y1, x2, y2 = scene.objects[j].box
        for r in rows[1:]:
            px1, py1, px2, py2 = image.norm_bb[r, :4].astype(np.float64)
            assert px1 >= x1 - tol and py1 >= y1 - tol and px2 <= x2 + tol and py2 <= y2 + tol
            assert px2 - px1 >= 0.5 * (x2 - x1) - tol and py2 - py1 >= 0.5 * (y2 - y1) - tol
            seen += 1
    assert seen > 50


def test_parts_are_noisier_views_of_their_object_than_the_tight_region(world_pair):
    """Against the noise-free features of the same world: parts deviate more (noise x1.5) than tight regions."""
    noisy, clean = world_pair
    deviation = {"tight": [], "part": []}
    for (image, _, _, rows), (clean_image, _, _, _) in zip(_objects_rows(noisy), _objects_rows(clean)):
        diff = (image.features.astype(np.float32) - clean_image.features.astype(np.float32)) ** 2
        deviation["tight"].append(diff[rows[0]].mean())
        deviation["part"] += list(diff[rows[1:]].mean(axis=1))
    assert np.mean(deviation["part"]) > 1.5 * np.mean(deviation["tight"])


def _top_label_names(split):
    """(region is clutter, name of its most likely non-background label) for every region."""
    for image_id, image in split.images.items():
        top = np.argmax(image.soft_labels[:, 1:].astype(np.float32), axis=1) + 1
        for is_clutter, label in zip(split.scenes[image_id].region_object < 0, top):
            yield bool(is_clutter), split.label_names.get(int(label))


def test_clutter_is_detected_as_stuff_and_every_top_label_has_a_name(world_pair):
    names = list(_top_label_names(world_pair[0]))
    assert all(name is not None for _, name in names)
    clutter = {name for is_clutter, name in names if is_clutter}
    assert clutter and clutter <= set(STUFF_NAMES)


def test_noise_free_clutter_of_one_stuff_kind_shares_features(world_pair):
    clean = world_pair[1]
    by_kind = {}
    for image_id, image in clean.images.items():
        top = np.argmax(image.soft_labels[:, 1:].astype(np.float32), axis=1) + 1
        for r in np.flatnonzero(clean.scenes[image_id].region_object < 0):
            by_kind.setdefault(clean.label_names[int(top[r])], set()).add(image.features[r].tobytes())
    assert len(by_kind) == len(STUFF_NAMES)
    assert all(len(features) == 1 for features in by_kind.values())
    assert len({next(iter(features)) for features in by_kind.values()}) == len(STUFF_NAMES)


def test_with_the_fewest_labels_every_label_id_is_used_once_and_zero_is_background(tiny_images):
    split = make_world(TINY)["val"]
    assert sorted(split.label_names) == list(range(TINY.num_labels))
    assert split.label_names[0] == "__background__"
    assert set(split.label_names.values()) == {"__background__", *synthetic.CLASS_NAMES[:4], *STUFF_NAMES}


def test_clutter_soft_labels_mix_a_class_with_two_of_its_confusables(world_pair):
    """Object regions spread mass over their class's 3 confusables; clutter over a random class and 2 of its."""
    split = world_pair[0]
    confusables, clutter = {}, []
    for image_id, image in split.images.items():
        owner = split.scenes[image_id].region_object
        for r, row in enumerate(image.soft_labels[:, 1:].astype(np.float32)):
            top = int(np.argmax(row)) + 1
            others = set((np.flatnonzero(row) + 1).tolist()) - {top}
            if owner[r] >= 0:
                confusables[top] = others
            else:
                clutter.append(others)
    assert len(confusables) == WORLD.num_classes and all(len(c) == 3 for c in confusables.values())
    assert clutter and all(any(len(others) == 3 and others - {c} <= confusables[c] for c in others)
                           for others in clutter)

def test_features_do_not_depend_on_the_scratch_block_size(monkeypatch):
    """_CHUNK only bounds scratch memory: blocks of 37 rows give the same bytes as one block."""
    config = WorldConfig(seed=4, num_train_images=12, num_val_images=1, img_dim=8)
    whole = make_world(config)["train"]
    monkeypatch.setattr(synthetic, "_CHUNK", 37)
    blocks = make_world(config)["train"]
    assert all(whole.images[i].features.tobytes() == blocks.images[i].features.tobytes() for i in whole.images)


# ---- the synthetic world: caption grammar --------------------------------------------------------------------

@pytest.fixture(scope="module")
def crowded():
    """Many objects of few classes: counted plurals ('two buses') and long lists are common."""
    config = WorldConfig(seed=8, num_train_images=120, num_val_images=1, min_objects=4, max_objects=6,
                         num_classes=6, img_dim=8, captions_per_image=5)
    return make_world(config)["train"]


@pytest.fixture(scope="module")
def crowded_captions(crowded):
    return [c.text for c in crowded.captions]


def test_plurals_of_nouns_ending_in_s_take_es(crowded_captions):
    """'bus' -> 'buses' (the sixth class); the other first six classes take a plain -s."""
    text = " ".join(crowded_captions).lower()
    assert "buses" in text and "buss" not in text
    assert re.search(r"\b(two|three|four|five|six) (?:\w+ )?dogs\b", text)


def test_lists_read_a_b_and_c(crowded_captions):
    """Items of a list are joined by commas, with 'and' before the last one only."""
    assert any(", " in text for text in crowded_captions)
    assert all(text.count(" and ") <= 1 for text in crowded_captions)


def test_there_is_before_one_object_and_there_are_before_a_count(crowded_captions):
    counts = "|".join(COUNT_WORDS[2:])
    for text in crowded_captions:
        if text.startswith("There is "):
            assert re.match(r"There is an? ", text), text
        elif text.startswith("There are "):
            assert re.match(rf"There are ({counts}) ", text), text
    assert any(text.startswith("There are ") for text in crowded_captions)



def test_a_list_can_name_every_class_of_its_image(crowded):
    """'Some of the image's classes': from one up to all of them (only lists name three or more)."""
    names = {image_id: {o.name for o in scene.objects} for image_id, scene in crowded.scenes.items()}
    assert any(len(names[c.image_id]) >= 3 and all(re.search(rf"\b{n}", c.text.lower()) for n in names[c.image_id])
               for c in crowded.captions)


def test_an_images_caption_ids_are_listed_in_caption_order(crowded):
    for image_id, text_ids in crowded.img2txts.items():
        assert text_ids == [c.text_id for c in crowded.captions if c.image_id == image_id]
