"""Builders shared by the tests: random packed batches and a tiny config."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from uniter_fast.config import UniterConfig
from uniter_fast.data.packing import pack_batch


def tiny_config(**overrides) -> UniterConfig:
    return UniterConfig.tiny(**{"vocab_size": 50, "hidden_size": 32, "num_attention_heads": 4,
                                "intermediate_size": 64, "img_dim": 24, "img_label_dim": 11, **overrides})


def random_samples(batch: int, *, img_dim: int = 24, vocab: int = 50, max_text: int = 7, max_regions: int = 6,
                   seed: int = 0, allow_empty_regions: bool = True):
    """Per-sample ([CLS] ... [SEP] ids, (features, boxes) or None) with random lengths."""
    rng = np.random.default_rng(seed)
    texts, regions = [], []
    for _ in range(batch):
        texts.append(torch.from_numpy(rng.integers(5, vocab, size=int(rng.integers(2, max_text + 1)))))
        n = int(rng.integers(0 if allow_empty_regions else 1, max_regions + 1))
        if n == 0:
            regions.append(None)
            continue
        xy = rng.random((n, 2)) * 0.5
        wh = rng.random((n, 2)) * 0.5
        boxes = np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float32)
        regions.append((torch.from_numpy(rng.standard_normal((n, img_dim)).astype(np.float32)), torch.from_numpy(boxes)))
    return texts, regions


def random_batch(batch: int = 4, **kwargs):
    texts, regions = random_samples(batch, **kwargs)
    return pack_batch(texts, regions), texts, regions


def assert_same_batch(a, b, where: str) -> None:
    """Two batches (dataclasses of tensors, nested) hold equal values of the same dtypes, field by field."""
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if dataclasses.is_dataclass(x):
            assert_same_batch(x, y, f"{where}.{field.name}")
        elif isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype, f"{where}.{field.name}: {x.dtype} vs {y}"
            assert torch.equal(x, y), f"{where}.{field.name} differs"
        else:
            assert x == y, f"{where}.{field.name}: {x!r} != {y!r}"
