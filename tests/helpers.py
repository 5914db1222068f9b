"""Builders shared by the tests: random packed batches, a tiny model config, a small pre-training config."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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


def lens_of(sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_lens, region_lens) of transport problems given as (m, n) pairs."""
    lens = torch.tensor(sizes, dtype=torch.long)
    return lens[:, 0], lens[:, 1]


def cu_seqlens_of(lens) -> torch.Tensor:
    """int32 (B + 1,) offsets of packed samples of these lengths: 0, then the running totals."""
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(list(lens), dtype=torch.int64).cumsum(0)
    return cu


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


def original_keys(H=768, I=3072, V=28996, layers=12, img_dim=2048, labels=1601, heads=True) -> dict[str, tuple]:
    """The original UniterForPretraining state dict (reference/uniter.md 1.9), key -> shape."""
    keys = {
        "uniter.embeddings.word_embeddings.weight": (V, H),
        "uniter.embeddings.position_embeddings.weight": (512, H),
        "uniter.embeddings.token_type_embeddings.weight": (2, H),
        "uniter.embeddings.LayerNorm.weight": (H,), "uniter.embeddings.LayerNorm.bias": (H,),
        "uniter.img_embeddings.img_linear.weight": (H, img_dim), "uniter.img_embeddings.img_linear.bias": (H,),
        "uniter.img_embeddings.img_layer_norm.weight": (H,), "uniter.img_embeddings.img_layer_norm.bias": (H,),
        "uniter.img_embeddings.pos_layer_norm.weight": (H,), "uniter.img_embeddings.pos_layer_norm.bias": (H,),
        "uniter.img_embeddings.pos_linear.weight": (H, 7), "uniter.img_embeddings.pos_linear.bias": (H,),
        "uniter.img_embeddings.mask_embedding.weight": (2, img_dim),
        "uniter.img_embeddings.LayerNorm.weight": (H,), "uniter.img_embeddings.LayerNorm.bias": (H,),
        "uniter.pooler.dense.weight": (H, H), "uniter.pooler.dense.bias": (H,),
    }
    for i in range(layers):
        p = f"uniter.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            keys[p + name + ".weight"], keys[p + name + ".bias"] = (H, H), (H,)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            keys[p + name + ".weight"], keys[p + name + ".bias"] = (H,), (H,)
        keys[p + "intermediate.dense.weight"], keys[p + "intermediate.dense.bias"] = (I, H), (I,)
        keys[p + "output.dense.weight"], keys[p + "output.dense.bias"] = (H, I), (H,)
    if heads:
        keys.update({
            "cls.predictions.bias": (V,),
            "cls.predictions.transform.dense.weight": (H, H), "cls.predictions.transform.dense.bias": (H,),
            "cls.predictions.transform.LayerNorm.weight": (H,), "cls.predictions.transform.LayerNorm.bias": (H,),
            "cls.predictions.decoder.weight": (V, H),
            "feat_regress.weight": (H, img_dim), "feat_regress.bias": (img_dim,),
            "feat_regress.net.0.weight": (H, H), "feat_regress.net.0.bias": (H,),
            "feat_regress.net.2.weight": (H,), "feat_regress.net.2.bias": (H,),
            "region_classifier.net.0.weight": (H, H), "region_classifier.net.0.bias": (H,),
            "region_classifier.net.2.weight": (H,), "region_classifier.net.2.bias": (H,),
            "region_classifier.net.3.weight": (labels, H), "region_classifier.net.3.bias": (labels,),
            "itm_output.weight": (2, H), "itm_output.bias": (2,),
        })
    return keys


def ipot_single(cost_text_region: np.ndarray, beta: float, iterations: int, k: int) -> np.ndarray:
    """Paper Algorithm 1 for one unpadded problem, in the original's image x text orientation; returns text x image."""
    c = cost_text_region.T  # (n regions, m words)
    n, m = c.shape
    a = np.exp(-c / beta)
    t = np.ones((n, m))
    sigma = np.full(m, 1.0 / m)
    for _ in range(iterations):
        q = a * t
        for _ in range(k):
            delta = 1.0 / (n * (q @ sigma))
            sigma = 1.0 / (m * (q.T @ delta))
        t = delta[:, None] * q * sigma[None, :]
    return t.T


def pretrain_config_file(tmp_path, **changes) -> Path:
    """tmp_path/config.json: a small pre-training run on the CPU, writing to tmp_path/run; `changes` replace keys."""
    data = {
        "model": {"preset": "tiny", "overrides": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                  "intermediate_size": 128}},
        "data": {"world": {"num_train_images": 120, "num_val_images": 20, "captions_per_image": 3,
                           "max_regions": 14}, "vocab_size": 200},
        "eval": {"val_batches": 2, "retrieval_images": 10},
        "train_batch_size": 800, "learning_rate": 2e-3, "warmup_steps": 10, "num_train_steps": 80,
        "log_every": 5, "output_dir": str(tmp_path / "run"), **changes,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path
