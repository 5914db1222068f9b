"""Pre-training: data, model and DeepSpeed engine; one task per update; validation, retrieval, checkpoint, plots."""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from uniter_fast.data.pretrain import MaskingOptions, PretrainCorpus, Vocab, make_task_batch
from uniter_fast.data.sampler import TokenBucketSampler
from uniter_fast.data.synthetic import WorldSplit, make_world
from uniter_fast.data.tokenizer import Tokenizer
from uniter_fast.eval.retrieval import recall_at_k, score_matrix
from uniter_fast.eval.validation import validate
from uniter_fast.model.checkpoint import save_checkpoint
from uniter_fast.model.pretrain import UniterForPretraining
from uniter_fast.train.config import PretrainConfig
from uniter_fast.train.engine import build_engine, full_parameters, init_distributed
from uniter_fast.train.tasks import TaskSampler

log = logging.getLogger("uniter_fast.train")


@dataclass
class PretrainData:
    tokenizer: Tokenizer
    train: PretrainCorpus
    val: PretrainCorpus
    val_split: WorldSplit


def build_synthetic_data(cfg: PretrainConfig) -> PretrainData:
    """The built-in world, a WordPiece vocabulary trained on its training captions, and both corpora."""
    world = make_world(cfg.data.world)
    tokenizer = Tokenizer.train([c.text for c in world["train"].captions], vocab_size=cfg.data.vocab_size)
    vocab = Vocab(tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.vocab_range)

    def corpus(split: WorldSplit) -> PretrainCorpus:
        ids = tokenizer.encode_batch([c.text for c in split.captions])
        keep = [i for i, t in enumerate(ids) if len(t) <= cfg.data.max_txt_len]
        return PretrainCorpus([ids[i] for i in keep], [split.captions[i].image_id for i in keep], split.images,
                              vocab, [split.captions[i].text_id for i in keep])

    return PretrainData(tokenizer, corpus(world["train"]), corpus(world["val"]), world["val"])


def retrieval_eval(model, data: PretrainData, num_images: int, device: torch.device) -> dict[str, float]:
    """Zero-shot retrieval on the held-out split: the first caption of each of the first `num_images` images."""
    image_ids = list(data.val_split.images)[:num_images]
    first_caption = {}
    for caption in data.val_split.captions:
        first_caption.setdefault(caption.image_id, caption.text)
    tok = data.tokenizer
    texts = [np.array([tok.cls_id, *tok.encode(first_caption[i]), tok.sep_id]) for i in image_ids]
    was_training = model.training
    model.eval()
    scores = score_matrix(model, texts, [data.val_split.images[i] for i in image_ids], device=device)
    model.train(was_training)
    return recall_at_k(scores, list(range(len(image_ids))))


class TaskStreams:
    """One endless token-bucket stream of batches per task over this rank's shard (the original's loaders)."""

    def __init__(self, corpus: PretrainCorpus, tasks, cfg: PretrainConfig, rank: int):
        self.corpus, self.cfg, self.rank = corpus, cfg, rank
        self.options = MaskingOptions(mrm_prob=cfg.mrm_prob, itm_neg_prob=cfg.itm_neg_prob,
                                      conditional_masking=cfg.conditional_masking)
        self.task_index = {t: i for i, t in enumerate(tasks)}
        self.iters = {t: iter(TokenBucketSampler(corpus.lens, batch_tokens=cfg.train_batch_size,
                                                 seed=cfg.seed * 1000 + i)) for t, i in self.task_index.items()}
        self.drawn = defaultdict(int)  # batches drawn per task: with the seed, fixes each batch's masks

    def next(self, task: str):
        indices = next(self.iters[task])
        rng = np.random.default_rng([self.cfg.seed, self.rank, self.task_index[task], self.drawn[task]])
        self.drawn[task] += 1
        return make_task_batch(self.corpus, task, indices, rng, self.options)


def pretrain(cfg: PretrainConfig, *, progress: bool = True) -> dict:
    """Run pre-training as configured; rank 0 writes the checkpoint, metrics.json and curves.png to output_dir."""
    rank, world_size, device = init_distributed()
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    data = build_synthetic_data(cfg)
    model_config = cfg.model.build_config(vocab_size=data.tokenizer.vocab_size)
    if cfg.model.init_checkpoint:
        model = UniterForPretraining.from_pretrained(cfg.model.init_checkpoint, model_config,
                                                     itm_ot_lambda=cfg.itm_ot_lambda)
    else:
        model = UniterForPretraining(model_config, itm_ot_lambda=cfg.itm_ot_lambda)
    engine = build_engine(model.to(device), cfg)
    tasks = list(dict.fromkeys([*cfg.tasks, *(t for phase in cfg.task_phases for t in phase["tasks"])]))
    streams = TaskStreams(data.train.shard(rank, world_size), tasks, cfg, rank)
    sampler = TaskSampler(cfg.tasks, cfg.seed, cfg.task_phases)

    history: list[dict] = []
    recent: dict[str, deque] = {t: deque(maxlen=20) for t in tasks}
    pending: list[tuple[int, str, dict]] = []  # metrics still on the device, read every log_every updates
    started = time.time()
    tokens = 0
    bar = tqdm(range(cfg.num_train_steps), desc="pretrain", disable=not progress or rank != 0, dynamic_ncols=True)
    for update in bar:
        task = sampler.task_for(update)
        for _ in range(cfg.gradient_accumulation_steps):
            batch = streams.next(task)
            tokens += batch.inputs.total_tokens
            out = engine(batch.to(device))
            engine.backward(out.loss, scale_wrt_gas=False)  # the original sums gradients over accumulation
            engine.step()
        pending.append((update + 1, task, out.metrics))
        if (update + 1) % cfg.log_every == 0 or update + 1 == cfg.num_train_steps:
            for step, t, metrics in pending:
                row = {"step": step, "task": t, **{k: float(v) for k, v in metrics.items()}}
                history.append(row)
                recent[t].append(row["loss"])
            pending.clear()
            postfix = {t: f"{np.mean(v):.3f}" for t, v in recent.items() if v}
            bar.set_postfix(postfix)
            if bar.disable and rank == 0:  # no bar (a launcher, a log file): one line per log interval
                log.info("update %d/%d losses %s", update + 1, cfg.num_train_steps, postfix)
        if cfg.eval.valid_steps and (update + 1) % cfg.eval.valid_steps == 0 and update + 1 < cfg.num_train_steps:
            val = validate(engine.module, data.val, tasks, batch_tokens=cfg.train_batch_size,
                           num_batches=cfg.eval.val_batches, options=streams.options, device=device, seed=cfg.seed)
            history.append({"step": update + 1, "task": "validation", "val": val})
    elapsed = time.time() - started

    model = engine.module
    metrics = {
        "num_train_steps": cfg.num_train_steps,
        "train_seconds": elapsed,
        "train_tokens_per_second": tokens / elapsed,
        "final_train": _final_train(history, tasks),
        "validation": validate(model, data.val, tasks, batch_tokens=cfg.train_batch_size,
                               num_batches=cfg.eval.val_batches, options=streams.options, device=device,
                               seed=cfg.seed),
        "zero_shot_retrieval": retrieval_eval(model, data, cfg.eval.retrieval_images, device),
        "chance": {"retrieval_r1": 100.0 / min(cfg.eval.retrieval_images, len(data.val_split.images)),
                   "itm_acc": 0.5, "mlm_acc": 1.0 / data.tokenizer.vocab_size},
    }
    with full_parameters(model):  # ZeRO-3 keeps a shard per rank: gather before writing the checkpoint
        if rank == 0:
            _write_outputs(out_dir, cfg, model, data.tokenizer, history, metrics)
    return metrics


def _final_train(history: list[dict], tasks) -> dict:
    """Mean of the last 20 logged training updates of each task."""
    out = {}
    for task in tasks:
        rows = [r for r in history if r["task"] == task][-20:]
        if rows:
            out[task] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("step", "task")}
    return out


def _write_outputs(out_dir: Path, cfg: PretrainConfig, model, tokenizer: Tokenizer, history, metrics) -> None:
    from uniter_fast.viz.curves import plot_curves

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ckpt").mkdir(exist_ok=True)
    save_checkpoint(model, out_dir / "ckpt" / f"model_step_{cfg.num_train_steps}.pt")
    model.config.to_json(out_dir / "ckpt" / "config.json")
    tokenizer.save(out_dir / "ckpt" / "tokenizer.json")
    (out_dir / "pretrain_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "history.json").write_text(json.dumps(history) + "\n")
    plot_curves([r for r in history if r["task"] != "validation"], out_dir / "curves.png")
