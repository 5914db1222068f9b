"""Pre-training data: a corpus of (caption, image) pairs and the task collate that turns examples into a task batch.

One modality is masked per task (conditional masking): MLM masks words, MRFR/MRC/MRC-kl mask regions, ITM masks
nothing and swaps the image of a sample with probability itm_neg_prob. `conditional_masking=False` masks both
modalities in the MLM and MRM tasks (the paper's joint-masking ablation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch

from uniter_fast.data.packing import PackedRegions, pack_batch
from uniter_fast.objectives.masking import MASK_PROB, mask_regions, mask_text
from uniter_fast.objectives.tasks import REGIONS_MASKED, TEXT_MASKED, PretrainBatch


class Regions(Protocol):
    """One image's regions as the BUTD extractor writes them (reference/loader.md).

    `PretrainCorpus.images` maps image ids to these: a dict of in-memory records (the synthetic world) or a
    RegionStore (uniter_fast.data.region_store), whose `num_regions` and `gather` the collate then uses.
    """

    features: np.ndarray     # (n, img_dim) fp16
    norm_bb: np.ndarray      # (n, 6) [x1, y1, x2, y2, w, h] normalised
    soft_labels: np.ndarray  # (n, img_label_dim) detector class distribution


@dataclass(frozen=True)
class MaskingOptions:
    mlm_prob: float = MASK_PROB
    mrm_prob: float = MASK_PROB
    itm_neg_prob: float = 0.5
    conditional_masking: bool = True

    def __post_init__(self) -> None:
        for name in ("mlm_prob", "mrm_prob", "itm_neg_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)!r}")


@dataclass
class Vocab:
    """The token ids the collate needs."""

    cls_id: int
    sep_id: int
    mask_id: int
    vocab_range: tuple[int, int]  # random replacements are drawn from [lo, hi)


class PretrainCorpus:
    """Captions as token ids (no [CLS]/[SEP]) with their image ids, and the images' regions by id."""

    def __init__(self, texts: Sequence[np.ndarray], image_ids: Sequence[str], images: Mapping[str, Regions],
                 vocab: Vocab, text_ids: Sequence[str] | None = None):
        if len(texts) != len(image_ids):
            raise ValueError(f"PretrainCorpus: {len(texts)} texts but {len(image_ids)} image ids")
        missing = sorted({i for i in image_ids if i not in images})
        if missing:
            raise KeyError(f"PretrainCorpus: captions refer to images with no regions: {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")
        self.texts = [np.asarray(t, dtype=np.int64) for t in texts]
        self.image_ids = list(image_ids)
        self.text_ids = list(text_ids) if text_ids is not None else [str(i) for i in range(len(texts))]
        self.images = images
        self.vocab = vocab
        self.all_image_ids = sorted(set(self.image_ids))
        # the original buckets by words (no specials) + regions
        counts = {i: region_count(images, i) for i in self.all_image_ids}
        self.lens = np.array([len(t) + counts[i] for t, i in zip(self.texts, self.image_ids)], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def shard(self, rank: int, world_size: int) -> "PretrainCorpus":
        """This rank's examples, ids[rank::world_size], as the original's datasets shard themselves."""
        keep = range(rank, len(self), world_size)
        return PretrainCorpus([self.texts[i] for i in keep], [self.image_ids[i] for i in keep], self.images,
                              self.vocab, [self.text_ids[i] for i in keep])

    def negative_image(self, image_id: str, rng: np.random.Generator) -> str:
        """A random image other than `image_id`, from the images this corpus refers to."""
        if len(self.all_image_ids) < 2:
            raise ValueError("ITM needs at least two images to draw a negative from")
        while True:
            other = self.all_image_ids[rng.integers(len(self.all_image_ids))]
            if other != image_id:
                return other


def region_count(images: Mapping[str, Regions], image_id: str) -> int:
    """Regions of one image; a region store answers from its index without reading the record."""
    count = getattr(images, "num_regions", None)
    return int(count(image_id)) if count is not None else int(images[image_id].features.shape[0])


def batch_regions(images: Mapping[str, Regions], image_ids: Sequence[str], region_masks: Sequence[np.ndarray],
                  feature_targets: bool, soft_targets: bool):
    """The batch's regions with masked rows zeroed, as pack_batch takes them, and the masked rows' original features
    and soft labels (concatenated in sample order) when asked for.

    A region store gathers the whole batch in one call (its C++ reader, into one fresh buffer that is then zeroed in
    place and handed to pack_batch as PackedRegions, uncopied); any other Mapping is read image by image, per sample
    (features, boxes), without copying what is not masked.
    """
    gather = getattr(images, "gather", None)
    if gather is not None:
        got = gather(list(image_ids), soft_labels=soft_targets)
        counts = (got.offsets[1:] - got.offsets[:-1]).tolist()
        if counts != [len(m) for m in region_masks]:
            raise ValueError(f"batch_regions: the store gave {counts} regions for {list(image_ids)}, its index "
                             f"{[len(m) for m in region_masks]}")
        # by row index: a boolean index over the whole (T, 2048) buffer took 16 ms a batch, even with no row masked
        rows = torch.from_numpy(np.flatnonzero(np.concatenate(region_masks)))
        feats = got.features.index_select(0, rows) if feature_targets else None
        soft = got.soft_labels.index_select(0, rows) if soft_targets else None
        got.features.index_fill_(0, rows, 0)  # masked regions arrive zeroed; the model adds the learned [MASK] feature
        return PackedRegions(got.features, got.boxes, counts), feats, soft
    regions, feats, soft = [], [], []
    for image_id, mask in zip(image_ids, region_masks):
        image = images[image_id]
        array = np.asarray(image.features)
        if feature_targets:
            feats.append(array[mask])
        if soft_targets:  # soft labels (44% of the bytes): only the masked rows are read
            soft.append(np.asarray(image.soft_labels)[mask])
        features = torch.from_numpy(array)
        if mask.any():
            features = features.masked_fill(torch.from_numpy(mask)[:, None], 0)
        regions.append((features, torch.from_numpy(np.asarray(image.norm_bb, dtype=np.float32))))
    return (regions, torch.from_numpy(np.concatenate(feats)) if feature_targets else None,
            torch.from_numpy(np.concatenate(soft)) if soft_targets else None)


def make_task_batch(corpus: PretrainCorpus, task: str, indices: Sequence[int], rng: np.random.Generator,
                    options: MaskingOptions = MaskingOptions()) -> PretrainBatch:
    """Collate examples `indices` of `corpus` into one packed batch for `task`, with its targets.

    Random draws happen per sample in a fixed order (words, ITM swap, regions), before any region is read, so a
    batch depends only on (corpus, indices, rng state), whichever Mapping holds the regions.
    """
    mask_words = task in TEXT_MASKED or (not options.conditional_masking and task in REGIONS_MASKED)
    mask_boxes = task in REGIONS_MASKED or (not options.conditional_masking and task in TEXT_MASKED)
    vocab = corpus.vocab
    text_ids, image_ids, region_masks, word_labels, itm_labels = [], [], [], [], []
    for index in indices:
        words, image_id = corpus.texts[index], corpus.image_ids[index]
        labels = np.full(len(words), -1)
        if task in TEXT_MASKED and not len(words):  # the original's "at least one masked word" fails here too
            raise ValueError(f"make_task_batch: caption {corpus.text_ids[index]!r} has no words for {task} to mask")
        if mask_words:
            words, labels = mask_text(words, rng, mask_id=vocab.mask_id, vocab_range=vocab.vocab_range,
                                      prob=options.mlm_prob)
        if task == "itm":
            matched = rng.random() >= options.itm_neg_prob
            itm_labels.append(int(matched))
            if not matched:
                image_id = corpus.negative_image(image_id, rng)
        text_ids.append(np.concatenate([[vocab.cls_id], words, [vocab.sep_id]]))
        word_labels.append(np.concatenate([[-1], labels, [-1]]))
        n = region_count(corpus.images, image_id)
        region_masks.append(mask_regions(n, rng, prob=options.mrm_prob) if mask_boxes else np.zeros(n, dtype=bool))
        image_ids.append(image_id)

    regions, mrm_feat, mrm_soft = batch_regions(corpus.images, image_ids, region_masks, task == "mrfr",
                                                task in REGIONS_MASKED and task != "mrfr")

    inputs = pack_batch(text_ids, regions, img_masks=region_masks if mask_boxes else None)
    batch = PretrainBatch(task=task, inputs=inputs)
    if task in TEXT_MASKED:
        labels = torch.from_numpy(np.concatenate(word_labels))
        batch.mlm_rows = inputs.text_rows[labels != -1]
        batch.mlm_labels = labels[labels != -1]
    if task in REGIONS_MASKED:
        batch.mrm_rows = inputs.region_rows[torch.from_numpy(np.concatenate(region_masks))]
        batch.mrm_feat, batch.mrm_soft_labels = mrm_feat, mrm_soft
    if task == "itm":
        batch.itm_labels = torch.tensor(itm_labels, dtype=torch.long)
    return batch
