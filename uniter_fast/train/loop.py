"""Pre-training: data, model and DeepSpeed engine; one task per update; validation, retrieval, checkpoint, plots."""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from uniter_fast.data.pretrain import PretrainCorpus, Vocab
from uniter_fast.data.sampler import TokenBucketSampler
from uniter_fast.data.synthetic import caption_tokenizer, make_world
from uniter_fast.data.text_corpus import read_text_corpus, tokenizer_from_meta
from uniter_fast.data.tokenizer import Tokenizer
from uniter_fast.eval.retrieval import recall_at_k, score_matrix
from uniter_fast.eval.validation import validate
from uniter_fast.model.checkpoint import save_checkpoint
from uniter_fast.model.pretrain import UniterForPretraining
from uniter_fast.objectives.tasks import TEXT_MASKED
from uniter_fast.train.batches import TaskStreams, training_batches
from uniter_fast.train.config import PretrainConfig
from uniter_fast.train.engine import build_engine, clear_stale_gradients, full_parameters, init_distributed
from uniter_fast.train.state import RESUME_DIR, RunState, load_state, newest_complete, save_state
from uniter_fast.train.tasks import TaskSampler

log = logging.getLogger("uniter_fast.train")


@dataclass
class PretrainData:
    tokenizer: Tokenizer | None       # None when the text corpora carry only ids (an original text DB)
    train: PretrainCorpus
    val: PretrainCorpus
    vocab_size: int
    retrieval_texts: list[np.ndarray]  # zero-shot retrieval: one held-out caption per image, with [CLS]/[SEP]
    retrieval_image_ids: list[str]     # its images, in val.images
    text_meta: dict | None = None      # the corpora's vocabulary meta (files only)


def build_synthetic_data(cfg: PretrainConfig) -> PretrainData:
    """The built-in world, a WordPiece vocabulary trained on its training captions, and both corpora."""
    world = make_world(cfg.data.world)
    tokenizer = caption_tokenizer(world["train"], cfg.data.vocab_size)
    vocab = Vocab(tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.vocab_range)
    ids = {name: tokenizer.encode_batch([c.text for c in split.captions]) for name, split in world.items()}

    def corpus(name: str) -> PretrainCorpus:
        captions = world[name].captions
        keep = [i for i, t in enumerate(ids[name]) if len(t) <= cfg.data.max_txt_len]
        return PretrainCorpus([ids[name][i] for i in keep], [captions[i].image_id for i in keep],
                              world[name].images, vocab, [captions[i].text_id for i in keep])

    texts, image_ids = _first_captions(ids["val"], [c.image_id for c in world["val"].captions], vocab)
    return PretrainData(tokenizer, corpus("train"), corpus("val"), tokenizer.vocab_size, texts, image_ids)


def _first_captions(texts, image_ids, vocab: Vocab) -> tuple[list[np.ndarray], list[str]]:
    """Each image's first caption with [CLS]/[SEP], images in order of first mention (retrieval's queries and
    gallery; unfiltered by max_txt_len, as before files were read)."""
    first: dict[str, np.ndarray] = {}
    for ids, image_id in zip(texts, image_ids):
        if image_id not in first:
            first[image_id] = np.array([vocab.cls_id, *ids, vocab.sep_id], dtype=np.int64)
    return list(first.values()), list(first)


def _read_corpora(paths, key: str) -> tuple[list, list, list, dict]:
    """Several corpus files read as one; they must share the vocabulary. Errors name the config key and file."""
    texts, image_ids, text_ids, meta, first = [], [], [], None, None
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.{key}: text corpus {path} does not exist")
        t, i, ids, m = read_text_corpus(path)
        vocab = {k: m.get(k) for k in ("CLS", "SEP", "MASK", "v_range", "vocab_size")}
        if meta is None:
            meta, first = m, (path, vocab)
        elif vocab != first[1]:
            raise ValueError(f"data.{key}: {path} has the vocabulary {vocab}, {first[0]} has {first[1]}: corpora "
                             "read together must share one")
        texts += t
        image_ids += i
        text_ids += ids
    return texts, image_ids, text_ids, meta


def build_file_data(cfg: PretrainConfig) -> PretrainData:
    """Regions from the configured region store, texts from the configured text corpora (DataOptions)."""
    from uniter_fast.data.region_store import RegionStore

    opts = cfg.data
    if not Path(opts.region_store).exists():
        raise FileNotFoundError(f"data.region_store: {opts.region_store} does not exist")
    store = RegionStore(opts.region_store)
    needs_soft = sorted(t for t in _all_tasks(cfg) if t in ("mrc", "mrckl"))
    if needs_soft and not store.has_soft_labels:
        raise ValueError(f"tasks {needs_soft} learn from soft labels, which the region store {opts.region_store} "
                         "does not hold (e.g. converted from a TSV): drop them from tasks and task_phases")
    splits = {}
    for key in ("text_corpus", "val_text_corpus"):
        texts, image_ids, text_ids, meta = _read_corpora(opts.corpus_paths(key), key)
        missing = sorted({i for i in image_ids if i not in store})
        if missing:
            raise KeyError(f"data.{key}: {len(missing)} images its texts refer to are not in the region store "
                           f"{opts.region_store}, e.g. {missing[:3]}")
        splits[key] = (texts, image_ids, text_ids, meta)
    train_meta, val_meta = splits["text_corpus"][3], splits["val_text_corpus"][3]
    if {k: train_meta.get(k) for k in ("CLS", "SEP", "MASK", "v_range", "vocab_size")} != \
            {k: val_meta.get(k) for k in ("CLS", "SEP", "MASK", "v_range", "vocab_size")}:
        raise ValueError("data.val_text_corpus: its vocabulary differs from data.text_corpus's")
    vocab = Vocab(train_meta["CLS"], train_meta["SEP"], train_meta["MASK"], tuple(train_meta["v_range"]))

    def corpus(texts, image_ids, text_ids) -> PretrainCorpus:
        keep = [i for i, t in enumerate(texts) if len(t) <= opts.max_txt_len]
        return PretrainCorpus([texts[i] for i in keep], [image_ids[i] for i in keep], store, vocab,
                              [text_ids[i] for i in keep])

    val_texts, val_images = splits["val_text_corpus"][:2]
    r_texts, r_images = _first_captions(val_texts, val_images, vocab)
    return PretrainData(tokenizer_from_meta(train_meta, f"data.text_corpus {opts.corpus_paths('text_corpus')[0]}"),
                        corpus(*splits["text_corpus"][:3]), corpus(*splits["val_text_corpus"][:3]),
                        int(train_meta["vocab_size"]), r_texts, r_images, train_meta)


def _all_tasks(cfg: PretrainConfig) -> list[str]:
    """Every task the run draws: its phases' and the mix's, in first-seen order."""
    return list(dict.fromkeys([*cfg.tasks, *(t for phase in cfg.task_phases for t in phase["tasks"])]))


def _check_region_widths(images, model_config, cfg: PretrainConfig) -> None:
    """A region store's feature and soft-label widths must be the model's (img_dim, img_label_dim)."""
    feature_dim, label_dim = getattr(images, "feature_dim", None), getattr(images, "label_dim", None)
    if feature_dim is not None and feature_dim != model_config.img_dim:
        raise ValueError(f"data.region_store {cfg.data.region_store} holds {feature_dim}-wide features but the model's "
                         f"img_dim is {model_config.img_dim}: set model.overrides.img_dim")
    uses_labels = any(t in ("mrc", "mrckl") for t in _all_tasks(cfg))
    if uses_labels and label_dim is not None and label_dim != model_config.img_label_dim:
        raise ValueError(f"data.region_store {cfg.data.region_store} holds {label_dim}-way soft labels but the "
                         f"model's img_label_dim is {model_config.img_label_dim}: set model.overrides.img_label_dim")


def build_data(cfg: PretrainConfig) -> PretrainData:
    """The configured pre-training data: files when data.region_store is set, else the synthetic world."""
    return build_file_data(cfg) if cfg.data.from_files else build_synthetic_data(cfg)


def _check_batching(data: PretrainData, cfg: PretrainConfig) -> None:
    """Both splits must batch with train_batch_size before training starts (the held-out one is batched only when
    validating, at the end of the run)."""
    for name, corpus in (("training", data.train), ("held-out", data.val)):
        if not len(corpus.lens):
            raise ValueError(f"the {name} split has no caption of at most data.max_txt_len ({cfg.data.max_txt_len}) "
                             "tokens: raise max_txt_len")
        try:
            TokenBucketSampler(corpus.lens, batch_tokens=cfg.train_batch_size)
        except ValueError as err:
            raise ValueError(f"train_batch_size {cfg.train_batch_size} is too small for the {name} split: "
                             f"{err}") from None


def _check_captions(data: PretrainData, tasks) -> None:
    """Masked-word modelling masks at least one word of every caption (the original's rule): a caption without
    words would stop training at its first MLM batch, so it is refused before training starts."""
    if not any(t in TEXT_MASKED for t in tasks):
        return
    for name, corpus in (("training", data.train), ("held-out", data.val)):
        empty = next((i for i, words in enumerate(corpus.texts) if not len(words)), None)
        if empty is not None:
            raise ValueError(f"the {name} split's caption {corpus.text_ids[empty]!r} has no words, and mlm masks at "
                             "least one word of each: remove it from the corpus or drop mlm from the tasks")


def retrieval_eval(model, data: PretrainData, num_images: int, device: torch.device) -> dict[str, float]:
    """Zero-shot retrieval on the held-out split: the first caption of each of the first `num_images` images."""
    image_ids = data.retrieval_image_ids[:num_images]
    texts = data.retrieval_texts[:num_images]
    was_training = model.training
    model.eval()
    scores = score_matrix(model, texts, [data.val.images[i] for i in image_ids], device=device)
    model.train(was_training)
    return recall_at_k(scores, list(range(len(image_ids))))


def pretrain(cfg: PretrainConfig, *, progress: bool = True, overwrite: bool = False, resume: bool = False) -> dict:
    """Run pre-training as configured. Rank 0 writes to output_dir the run's and the model's configs (before
    training), the checkpoint ckpt/model_step_{N}.pt at each validation and at the end (the original's), then
    metrics.json, history.json and curves.png; every rank saves its part of a resumable state at each validation
    and every save_steps updates (resume/step_{N}, state.py). output_dir must be empty or absent unless `overwrite`
    (then the run's files replace those of the same name) or `resume`: the run in output_dir continues from its
    newest complete state, with the same batches, random draws and updates as a run never stopped."""
    out_dir = Path(cfg.output_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in output_dir and --overwrite starts a new one there: give one")
    if resume:
        resume_from = newest_complete(out_dir)  # no state to resume from is an error before any set-up
    else:
        _claim_output_dir(out_dir, overwrite)
        shutil.rmtree(out_dir / RESUME_DIR, ignore_errors=True)  # an overwritten run's: --resume must not take them
    rank, world_size, device = init_distributed()
    torch.manual_seed(cfg.seed)
    data = build_data(cfg)
    _check_batching(data, cfg)
    _check_captions(data, _all_tasks(cfg))
    model_config = cfg.model.build_config(vocab_size=data.vocab_size)
    _check_region_widths(data.train.images, model_config, cfg)
    if cfg.model.init_checkpoint:
        model = UniterForPretraining.from_pretrained(cfg.model.init_checkpoint, model_config,
                                                     itm_ot_lambda=cfg.itm_ot_lambda)
    else:
        model = UniterForPretraining(model_config, itm_ot_lambda=cfg.itm_ot_lambda)
    if cfg.compile:
        # in place: the parameters keep their names; dynamic: every batch has its own token count
        model.uniter.encoder.compile(backend=cfg.compile, dynamic=True)
    engine = build_engine(model.to(device), cfg)
    tasks = _all_tasks(cfg)
    streams = TaskStreams(data.train.shard(rank, world_size), tasks, cfg, rank)
    sampler = TaskSampler(cfg.tasks, cfg.seed, cfg.task_phases)
    # last before training: it restores the random state the saved run had after its last update
    run = load_state(engine, resume_from, cfg.to_dict(), rank, world_size) if resume else RunState(0, 0, 0.0, [], {})
    streams.fast_forward(sampler, run.update)
    if resume and dict(streams.drawn) != run.drawn:
        raise ValueError(f"--resume: the tasks of updates 1-{run.update} drawn again give {dict(streams.drawn)} "
                         f"batches per task, the saved run trained on {run.drawn}: the task sampler has changed")
    if rank == 0:  # before training: a checkpoint written mid-run is loadable with these
        _write_run_files(out_dir, cfg, model, data)

    history, tokens, drawn = run.history, run.tokens, Counter(run.drawn)
    recent: dict[str, deque] = {t: deque([r["loss"] for r in history if r["task"] == t], maxlen=20) for t in tasks}
    pending: list[tuple[int, str, dict]] = []  # metrics still on the device, read every log_every updates
    started = time.time()
    ahead = cfg.prefetch_batches if cfg.prefetch_batches is not None else (2 if device.type == "cuda" else 0)
    batches = training_batches(streams, sampler, cfg, ahead, pin_to=device if device.type == "cuda" and ahead else None,
                               start=run.update)
    bar = tqdm(range(run.update, cfg.num_train_steps), initial=run.update, total=cfg.num_train_steps, desc="pretrain",
               disable=not progress or rank != 0, dynamic_ncols=True)

    def read_pending() -> dict[str, str]:
        for step, t, metrics in pending:
            row = {"step": step, "task": t, **{k: float(v) for k, v in metrics.items()}}
            history.append(row)
            recent[t].append(row["loss"])
        pending.clear()
        return {t: f"{np.mean(v):.3f}" for t, v in recent.items() if v}

    try:
        for update in bar:
            task = sampler.task_for(update)
            clear_stale_gradients(engine)  # the heads of the other tasks get no gradient in this update
            for _ in range(cfg.gradient_accumulation_steps):
                batch = next(batches)
                tokens += batch.inputs.total_tokens
                out = engine(batch.to(device, non_blocking=True))  # asynchronous from pinned memory
                engine.backward(out.loss, scale_wrt_gas=False)  # the original sums gradients over accumulation
                engine.step()
            drawn[task] += cfg.gradient_accumulation_steps
            pending.append((update + 1, task, out.metrics))
            done = update + 1
            if done % cfg.log_every == 0 or done == cfg.num_train_steps:
                postfix = read_pending()
                bar.set_postfix(postfix)
                if bar.disable and rank == 0:  # no bar (a launcher, a log file): one line per log interval
                    log.info("update %d/%d losses %s", done, cfg.num_train_steps, postfix)
            mid_run = done < cfg.num_train_steps  # the end validates and saves the model below
            validating = mid_run and cfg.eval.valid_steps and done % cfg.eval.valid_steps == 0
            saving = validating or (mid_run and cfg.save_steps and done % cfg.save_steps == 0)
            if saving:
                read_pending()  # the history the state holds is complete, in update order
            if validating:
                val = validate(engine.module, data.val, tasks, batch_tokens=cfg.train_batch_size,
                               num_batches=cfg.eval.val_batches, options=streams.options, device=device, seed=cfg.seed)
                history.append({"step": done, "task": "validation", "val": val})
                _save_model(engine.module, out_dir, done, rank)  # the original's checkpoint at each validation
            if saving:
                save_state(engine, out_dir, RunState(done, tokens, run.seconds + time.time() - started, history,
                                                     dict(drawn)), cfg.to_dict(), rank, world_size)
    finally:  # a step that fails leaves no thread making batches
        batches.close()
    elapsed = run.seconds + time.time() - started

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
        "chance": {"retrieval_r1": 100.0 / min(cfg.eval.retrieval_images, len(data.retrieval_image_ids)),
                   "itm_acc": 0.5, "mlm_acc": 1.0 / data.vocab_size},
    }
    _save_model(model, out_dir, cfg.num_train_steps, rank)
    if rank == 0:
        _write_results(out_dir, history, metrics)
    return metrics


def _claim_output_dir(out_dir: Path, overwrite: bool) -> None:
    """output_dir must be absent or empty unless overwrite: an earlier run's checkpoint and metrics are not written
    over by accident, and a path that cannot hold the outputs fails before training rather than after it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output_dir {out_dir} is a file, not a directory: choose another (--output-dir)")
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"output_dir {out_dir} is not empty (an earlier run's outputs would be written over): "
                              "remove it, choose another (--output-dir) or pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)


def _final_train(history: list[dict], tasks) -> dict:
    """Mean of the last 20 logged training updates of each task."""
    out = {}
    for task in tasks:
        rows = [r for r in history if r["task"] == task][-20:]
        if rows:
            out[task] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("step", "task")}
    return out


def _write_run_files(out_dir: Path, cfg: PretrainConfig, model, data: PretrainData) -> None:
    """What a checkpoint needs beside its weights (the model's config, the vocabulary) and the run's config."""
    (out_dir / "ckpt").mkdir(exist_ok=True)
    model.config.to_json(out_dir / "ckpt" / "config.json")
    if data.tokenizer is not None:
        data.tokenizer.save(out_dir / "ckpt" / "tokenizer.json")
    if data.text_meta is not None:  # the vocabulary's ids (an original text DB's meta.json carries no tokenizer)
        meta = {k: v for k, v in data.text_meta.items() if k != "tokenizer"}
        (out_dir / "ckpt" / "text_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "pretrain_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list) + "\n")


def _save_model(model, out_dir: Path, step: int, rank: int) -> None:
    """ckpt/model_step_{step}.pt, the original's name; every rank calls it (ZeRO-3 gathers the shards), rank 0
    writes."""
    with full_parameters(model):
        if rank == 0:
            save_checkpoint(model, out_dir / "ckpt" / f"model_step_{step}.pt")


def _write_results(out_dir: Path, history, metrics) -> None:
    from uniter_fast.viz.curves import plot_curves

    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "history.json").write_text(json.dumps(history) + "\n")
    plot_curves([r for r in history if r["task"] != "validation"], out_dir / "curves.png")
