"""The synthetic world written as files: a region store, text corpora and a config that pre-trains from them.

`export_synthetic(cfg, dst)` writes, for the world and vocabulary `cfg.data` describes:
  dst/regions/            the region store: every train and val image, with soft labels
  dst/train.corpus.npz    the training captions, tokenised (all of them: max_txt_len applies when read)
  dst/val.corpus.npz      the held-out captions
  dst/pretrain.json       `cfg` with data.region_store / text_corpus / val_text_corpus pointing at them
The ids and arrays equal what the in-memory run builds (same tokenizer, same world), so pre-training from these
files gives the same batches as pre-training from the world (tests/test_store_pretrain.py checks it).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from uniter_fast.data.convert.common import ConversionSummary, StoreOutput, check_regions, progress_bar
from uniter_fast.data.synthetic import caption_tokenizer, make_world
from uniter_fast.data.text_corpus import corpus_meta_from_tokenizer, write_text_corpus

STORE_NAME, TRAIN_NAME, VAL_NAME, CONFIG_NAME = "regions", "train.corpus.npz", "val.corpus.npz", "pretrain.json"


def export_synthetic(cfg, dst: str | Path, *, progress: bool = True) -> ConversionSummary:
    """Write the world of `cfg` (a PretrainConfig) under `dst`; returns what was written."""
    dst = Path(dst)
    existing = [str(dst / name) for name in (STORE_NAME, TRAIN_NAME, VAL_NAME, CONFIG_NAME) if (dst / name).exists()]
    if existing:  # checked before writing anything: an earlier export is never partly replaced
        raise FileExistsError(f"export to {dst}: {', '.join(existing)} already exist; remove them or choose another "
                              "destination")
    world = make_world(cfg.data.world)
    tokenizer = caption_tokenizer(world["train"], cfg.data.vocab_size)
    total = sum(len(split.images) for split in world.values())
    with StoreOutput(dst / STORE_NAME) as out, progress_bar(total=total, desc="write regions",
                                                           enabled=progress) as bar:
        for split in world.values():
            for image_id, image in split.images.items():
                record = f"image {image_id!r}"
                out.add(image_id, check_regions(image.arrays(), "synthetic world", record), "synthetic world", record)
                bar.update(1)
        summary = out.close()
    source = {"kind": "synthetic", "world": dataclasses.asdict(cfg.data.world)}
    meta = corpus_meta_from_tokenizer(tokenizer, source)
    for name, split in ((TRAIN_NAME, world["train"]), (VAL_NAME, world["val"])):
        captions = split.captions
        write_text_corpus(dst / name, tokenizer.encode_batch([c.text for c in captions]),
                          [c.image_id for c in captions], [c.text_id for c in captions], meta)
    data = dataclasses.replace(cfg.data, region_store=str((dst / STORE_NAME).resolve()),
                               text_corpus=str((dst / TRAIN_NAME).resolve()),
                               val_text_corpus=str((dst / VAL_NAME).resolve()))
    config = dst / CONFIG_NAME
    config.write_text(json.dumps(cfg.replace(data=data).to_dict(), indent=2, default=list) + "\n")
    texts = sum(len(split.captions) for split in world.values())
    summary.notes += [f"wrote {texts} captions to {dst / TRAIN_NAME} and {dst / VAL_NAME}",
                      f"wrote {config}: uniter-fast pretrain --config {config}"]
    return summary
