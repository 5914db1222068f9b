"""Pre-training from files: the synthetic world written as a region store + text corpora gives the same batches as
the in-memory world, a short run reads them through `uniter-fast pretrain`, and config errors name the key."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from helpers import assert_same_batch
from uniter_fast.cli import main
from uniter_fast.data.text_corpus import read_text_corpus
from uniter_fast.train.config import PretrainConfig
from uniter_fast.train.batches import TaskStreams, training_batches
from uniter_fast.train.loop import build_data, build_synthetic_data
from uniter_fast.train.tasks import TaskSampler

RegionStore = pytest.importorskip("uniter_fast.data.region_store").RegionStore

TASKS = ("mlm", "itm", "mrfr", "mrc", "mrckl")
CONFIG = {
    "model": {"preset": "tiny", "overrides": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                              "intermediate_size": 64, "img_dim": 64, "img_label_dim": 80}},
    "data": {"world": {"num_train_images": 40, "num_val_images": 12, "captions_per_image": 3, "max_regions": 14,
                       "img_dim": 64, "num_labels": 80}, "vocab_size": 150, "max_txt_len": 12},
    "eval": {"val_batches": 1, "retrieval_images": 6},
    "tasks": {"mlm": 1, "itm": 1, "mrfr": 1, "mrckl": 1}, "task_phases": [{"steps": 2, "tasks": {"mrc": 1}}],
    "train_batch_size": 400, "warmup_steps": 2, "num_train_steps": 6, "log_every": 2,
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The world of CONFIG written by `uniter-fast convert synthetic`; returns (directory, in-memory config)."""
    root = tmp_path_factory.mktemp("synthetic")
    (root / "config.json").write_text(json.dumps({**CONFIG, "output_dir": str(root / "run-memory")}))
    assert main(["convert", "synthetic", str(root / "files"), "--config", str(root / "config.json"),
                 "--no-progress"]) == 0
    return root / "files", PretrainConfig.from_json(root / "config.json")


@pytest.fixture
def same_vocabulary(exported, monkeypatch):
    """The in-memory run uses the exported corpus's tokenizer.

    Tokenizer.train (Hugging Face WordPiece) breaks ties differently from call to call, so two trainings on the same
    captions can give different vocabularies; the files carry the one they were written with.
    """
    import uniter_fast.train.loop as loop
    from uniter_fast.data.text_corpus import tokenizer_from_meta

    tokenizer = tokenizer_from_meta(read_text_corpus(exported[0] / "train.corpus.npz")[3])
    monkeypatch.setattr(loop, "caption_tokenizer", lambda split, vocab_size: tokenizer)
    return tokenizer


def test_export_writes_what_the_world_holds(exported, same_vocabulary):
    files, cfg = exported
    memory = build_synthetic_data(cfg)
    store = RegionStore(files / "regions")
    assert len(store) == 52
    image = memory.val.images["synth_val_000003"]
    got = store["synth_val_000003"]
    np.testing.assert_array_equal(np.asarray(got.features), image.features)
    np.testing.assert_array_equal(np.asarray(got.soft_labels), image.soft_labels)
    texts, image_ids, text_ids, meta = read_text_corpus(files / "train.corpus.npz")
    assert len(texts) == 120 and text_ids[:2] == ["synth_train_000000_0", "synth_train_000000_1"]
    assert meta["vocab_size"] == memory.tokenizer.vocab_size and meta["source"]["kind"] == "synthetic"
    assert json.loads((files / "pretrain.json").read_text())["data"]["region_store"] == str(files / "regions")


def test_corpus_tokenizer_must_agree_with_its_vocab_size(exported):
    from uniter_fast.data.text_corpus import tokenizer_from_meta

    meta = read_text_corpus(exported[0] / "train.corpus.npz")[3]
    assert tokenizer_from_meta(meta).vocab_size == meta["vocab_size"]
    with pytest.raises(ValueError, match=rf"c\.npz: meta\['tokenizer'\] has {meta['vocab_size']} ids but vocab_size "
                                         rf"is {meta['vocab_size'] + 1}"):
        tokenizer_from_meta({**meta, "vocab_size": meta["vocab_size"] + 1}, "c.npz")


def test_store_batches_equal_the_in_memory_batches(exported, same_vocabulary):
    files, cfg = exported
    from_files = PretrainConfig.from_json(files / "pretrain.json")
    assert from_files.data.from_files and not cfg.data.from_files
    memory, stored = build_synthetic_data(cfg), build_data(from_files)
    assert isinstance(stored.train.images, RegionStore)
    assert stored.train.text_ids == memory.train.text_ids and np.array_equal(stored.train.lens, memory.train.lens)
    assert stored.vocab_size == memory.vocab_size and stored.tokenizer.get_vocab() == memory.tokenizer.get_vocab()
    for a, b in zip(stored.retrieval_texts, memory.retrieval_texts):
        assert np.array_equal(a, b)
    assert stored.retrieval_image_ids == memory.retrieval_image_ids
    streams = TaskStreams(memory.train, TASKS, cfg, rank=0), TaskStreams(stored.train, TASKS, from_files, rank=0)
    for task in TASKS:
        for k in range(3):
            assert_same_batch(streams[0].next(task), streams[1].next(task), f"{task} batch {k}")


def test_batches_read_from_the_store_ahead_are_the_in_memory_batches(exported, same_vocabulary):
    """A thread reading the store (its C++ reader releasing the GIL) makes the in-memory world's batches."""
    files, cfg = exported
    from_files = PretrainConfig.from_json(files / "pretrain.json")
    memory, stored = build_synthetic_data(cfg), build_data(from_files)
    runs = []
    for corpus, run_cfg, ahead in ((memory.train, cfg, 0), (stored.train, from_files, 2)):
        run_cfg = run_cfg.replace(num_train_steps=16)
        sampler = TaskSampler(run_cfg.tasks, run_cfg.seed, run_cfg.task_phases)
        runs.append(list(training_batches(TaskStreams(corpus, TASKS, run_cfg, rank=0), sampler, run_cfg, ahead)))
    assert [b.task for b in runs[0]] == [b.task for b in runs[1]] and len(runs[0]) == 16
    assert {"mrc", "mrckl", "mrfr"} <= {b.task for b in runs[0]}  # the tasks that read the store's soft labels too
    for i, (a, b) in enumerate(zip(*runs)):
        assert_same_batch(a, b, f"update {i}")


def test_pretraining_from_files_runs_and_matches_memory(exported, same_vocabulary, tmp_path):
    """Same seed, same batches: the run from files logs the losses of the run from the world."""
    files, cfg = exported
    runs = {}
    for name, path in (("memory", None), ("files", files / "pretrain.json")):
        config = tmp_path / f"{name}.json"
        data = json.loads(path.read_text()) if path else {**CONFIG}
        config.write_text(json.dumps({**data, "output_dir": str(tmp_path / name)}))
        assert main(["pretrain", "--config", str(config), "--no-progress"]) == 0
        runs[name] = json.loads((tmp_path / name / "history.json").read_text())
    assert (tmp_path / "files" / "ckpt" / "tokenizer.json").is_file()
    losses = {name: [(r["step"], r["task"], r["loss"]) for r in history if "loss" in r]
              for name, history in runs.items()}
    assert len(losses["files"]) == 6
    for (s1, t1, l1), (s2, t2, l2) in zip(losses["files"], losses["memory"]):
        assert (s1, t1) == (s2, t2) and l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)


def test_data_config_errors_name_the_key(tmp_path, exported):
    files, _ = exported
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"data": {"region_store": str(files / "regions")}}))
    with pytest.raises(ValueError, match=r"bad\.json: data: region_store given without text_corpus, "
                                         r"val_text_corpus"):
        PretrainConfig.from_json(path)
    path.write_text(json.dumps({"data": {"region_store": 3, "text_corpus": "a", "val_text_corpus": "b"}}))
    with pytest.raises(ValueError, match=r"data: region_store must be a path"):
        PretrainConfig.from_json(path)
    path.write_text(json.dumps({"data": {"region_store": "s", "text_corpus": [], "val_text_corpus": "b"}}))
    with pytest.raises(ValueError, match=r"data: text_corpus: an empty list"):
        PretrainConfig.from_json(path)
    good = json.loads((files / "pretrain.json").read_text())
    for key, value, match in (
            ("region_store", str(tmp_path / "nowhere"), r"data\.region_store: .*nowhere does not exist"),
            ("text_corpus", [str(files / "train.corpus.npz"), str(tmp_path / "x.npz")],
             r"data\.text_corpus: text corpus .*x\.npz does not exist")):
        cfg = PretrainConfig.from_json(files / "pretrain.json")
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, **{key: value}))
        with pytest.raises(FileNotFoundError, match=match):
            build_data(cfg)
    assert good["data"]["val_text_corpus"].endswith("val.corpus.npz")


def test_tasks_needing_soft_labels_refuse_a_store_without_them(tmp_path, exported):
    from uniter_fast.data.region_store import RegionStoreWriter

    files, _ = exported
    store = RegionStore(files / "regions")
    with RegionStoreWriter(tmp_path / "plain", feature_dim=64, soft_labels=False) as writer:
        for image_id in store:
            r = store[image_id]
            writer.add(image_id, np.asarray(r.features), np.asarray(r.norm_bb), np.asarray(r.conf).reshape(-1))
    cfg = PretrainConfig.from_json(files / "pretrain.json")
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, region_store=str(tmp_path / "plain")))
    with pytest.raises(ValueError, match=r"tasks \['mrc', 'mrckl'\] learn from soft labels, which the region store "
                                         r".*plain does not hold"):
        build_data(cfg)
    build_data(cfg.replace(tasks={"mlm": 1, "itm": 1, "mrfr": 1}, task_phases=()))


def test_region_widths_must_match_the_model(exported):
    from uniter_fast.train.loop import _check_region_widths

    files, _ = exported
    cfg = PretrainConfig.from_json(files / "pretrain.json")
    store = RegionStore(files / "regions")
    _check_region_widths(store, cfg.model.build_config(), cfg)
    with pytest.raises(ValueError, match=r"holds 64-wide features but the model's img_dim is 2048"):
        _check_region_widths(store, cfg.model.build_config(img_dim=2048), cfg)
    with pytest.raises(ValueError, match=r"holds 80-way soft labels but the model's img_label_dim is 1601"):
        _check_region_widths(store, cfg.model.build_config(img_label_dim=1601), cfg)
