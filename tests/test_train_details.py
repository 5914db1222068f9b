"""Training-loop details the other tests leave open: the default recipe, config bounds, the fp16 loss scaler, task
sampling's seed and phase boundaries, the loop's validation cadence, logging and throughput (on a fake engine, no
DeepSpeed), the outputs it writes, and retrieval's queries (reference/uniter.md 3.3-3.5)."""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import tiny_config
from uniter_fast.data.pretrain import Vocab
from uniter_fast.data.synthetic import WorldConfig, caption_tokenizer, make_world
from uniter_fast.model import UniterForPretraining
from uniter_fast.train import loop
from uniter_fast.train.config import DataOptions, EvalOptions, PretrainConfig
from uniter_fast.train.engine import build_optimizer, deepspeed_config, warmup_linear
from uniter_fast.train.tasks import TaskSampler

# --- the default recipe and config bounds -------------------------------------------------------------------------


def test_defaults_are_the_originals_indomain_base_recipe():
    """reference 3.4 (indomain-base-8gpu) and 3.5: a config that sets nothing trains with the original's numbers."""
    cfg = PretrainConfig()
    assert (cfg.learning_rate, cfg.warmup_steps, cfg.num_train_steps) == (5e-5, 10000, 200000)
    assert tuple(cfg.betas) == (0.9, 0.98) and cfg.adam_eps == 1e-6 and cfg.weight_decay == 0.01
    assert cfg.grad_norm == 5.0 and cfg.seed == 42
    assert (cfg.mrm_prob, cfg.itm_neg_prob, cfg.itm_ot_lambda) == (0.15, 0.5, 0.1)
    # mix [2, 2, 1, 1] over itm, mlm, mrfr, mrckl: ITM 33.3, MLM 33.3, MRFR 16.7, MRC-kl 16.7 %
    total = sum(cfg.tasks.values())
    shares = {t: r / total for t, r in cfg.tasks.items()}
    assert shares == pytest.approx({"itm": 1 / 3, "mlm": 1 / 3, "mrfr": 1 / 6, "mrckl": 1 / 6})


@pytest.mark.parametrize("changes, match", [
    ({"betas": [0.9, 1.0]}, r"betas must be two numbers in \[0, 1\)"),  # Adam's bias correction 1 - 1**t = 0
    ({"zero_stage": 4}, r"zero_stage 4: expected 0, 1, 2 or 3"),
    ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps must be a positive integer, got 0"),
    ({"precision": "fp8"}, r"precision 'fp8': expected fp32, bf16 or fp16"),
    ({"mrm_prob": 1.5}, r"mrm_prob must be a probability in \[0, 1\], got 1\.5"),
    ({"task_phases": [{"steps": 0, "tasks": {"itm": 1}}]}, r"task_phases\[0\]\.steps must be a positive integer"),
    ({"tasks": {"mlm": 0}}, r"tasks: the mix ratio of 'mlm' must be a positive integer, got 0"),
    ({"adam_eps": 0}, r"adam_eps must be a number > 0, got 0"),  # 0/0 for a parameter whose gradient is 0
    ({"data": {"max_txt_len": 0}}, r"data: max_txt_len must be a positive integer, got 0"),
])
def test_out_of_range_values_are_refused(tmp_path, changes, match):
    """Each would pass silently and fail (or train nothing) later: nan updates, a ZeRO stage DeepSpeed lacks, an
    update with no micro-batch, a phase of no updates, a task never drawn, a corpus with every caption dropped."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(changes))
    with pytest.raises(ValueError, match=r"bad\.json: " + match):
        PretrainConfig.from_json(path)


def test_boundary_values_are_accepted_and_mean_what_they_say():
    """weight_decay 0 turns decay off; warmup_steps 0 starts at the full learning rate and decays linearly."""
    cfg = PretrainConfig(weight_decay=0, warmup_steps=0, num_train_steps=4, learning_rate=1e-3)
    optimizer, schedule = build_optimizer(torch.nn.Linear(2, 2), cfg)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0, 0.0]
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # update n of 4 without warm-up: lr * (4 - n) / 4, the last at the 1e-8 floor
    assert lrs == pytest.approx([1e-3 * 3 / 4, 1e-3 * 2 / 4, 1e-3 * 1 / 4, 1e-8], rel=1e-9, abs=0)
    # the decay reaches 0 at num_train_steps even when the warm-up fills the whole run
    assert warmup_linear(10, 10, 10) == 0.0 and warmup_linear(9, 10, 10) == pytest.approx(0.9)


def test_fp16_loss_scaler_is_dynamic_from_apexs_initial_scale():
    """apex amp O2 (the original) starts its dynamic scaler at 2**16: a larger start skips the first updates as
    overflows, a static one never adapts."""
    ds = deepspeed_config(PretrainConfig(precision="fp16"))
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert "bf16" not in ds and deepspeed_config(PretrainConfig(precision="bf16"))["bf16"] == {"enabled": True}


# --- task sampling ----------------------------------------------------------------------------------------------


def test_the_seed_chooses_the_task_sequence():
    """A different seed draws a different task order (the run's seed must reach the sampler); the same seed the
    same."""
    mix = {"itm": 2, "mlm": 2, "mrfr": 1, "mrckl": 1}
    seqs = {seed: [TaskSampler(mix, seed).task_for(u) for u in range(200)] for seed in (0, 1, 42)}
    assert seqs[0] != seqs[1] and seqs[0] != seqs[42] and seqs[1] != seqs[42]
    assert seqs[42] == [TaskSampler(mix, 42).task_for(u) for u in range(200)]


def test_phases_follow_one_another_by_cumulative_steps():
    """Phases of 3, 5 and 2 updates: updates 0-2 the first, 3-7 the second, 8-9 the third, then the mix."""
    phases = ({"steps": 3, "tasks": {"itm": 1}}, {"steps": 5, "tasks": {"mlm": 1}}, {"steps": 2, "tasks": {"mrfr": 1}})
    sampler = TaskSampler({"mrckl": 1}, seed=0, phases=phases)
    expected = ["itm"] * 3 + ["mlm"] * 5 + ["mrfr"] * 2 + ["mrckl"] * 5
    assert [sampler.task_for(u) for u in range(15)] == expected


# --- the loop, on a fake engine ----------------------------------------------------------------------------------


class _FakeEngine:
    """Records each micro-batch's backward; the loss of its n-th forward is n."""

    def __init__(self, model):
        self.module = model
        self.calls = 0
        self.backwards = []

    def __call__(self, batch):
        self.calls += 1
        loss = torch.tensor(float(self.calls))
        return SimpleNamespace(loss=loss, metrics={"loss": loss})

    def backward(self, loss, scale_wrt_gas=True):
        self.backwards.append(scale_wrt_gas)

    def step(self):
        pass

    def zero_optimization_stage(self):
        return 2


class _Batch:
    def __init__(self, tokens):
        self.inputs = SimpleNamespace(total_tokens=tokens)

    def to(self, device, non_blocking=False):
        return self


def _fake_run(tmp_path, monkeypatch, clock=None, rank=(0, 1), **changes):
    """pretrain() with everything but the loop replaced: returns (metrics, what the fakes saw)."""
    seen = {"validate": [], "tokens": [], "seed": [], "streams": [], "saved": [], "states": []}
    data = SimpleNamespace(train=SimpleNamespace(shard=lambda r, w: ("shard", r, w), images={}), val=None,
                           vocab_size=50, retrieval_image_ids=["a", "b"], retrieval_texts=[])

    def batches(streams, sampler, cfg, ahead, pin_to=None, start=0):
        for n in range(cfg.num_train_steps * cfg.gradient_accumulation_steps):
            seen["tokens"].append(100 + 7 * n)
            yield _Batch(100 + 7 * n)

    def engine(model, cfg):
        seen["engine"] = _FakeEngine(model)
        return seen["engine"]

    def model(config, itm_ot_lambda):
        seen["seed"].append(torch.initial_seed())
        return torch.nn.Linear(1, 1)

    def validate(model, corpus, tasks, **kwargs):
        seen["validate"].append(kwargs)
        return {t: {"loss": 0.0} for t in tasks}

    def streams(corpus, *rest):
        seen["streams"].append(corpus)
        return SimpleNamespace(options=None, fast_forward=lambda sampler, updates: None)

    for name, value in (("init_distributed", lambda: (*rank, torch.device("cpu"))), ("build_data", lambda cfg: data),
                        ("_check_batching", lambda d, c: None), ("_check_captions", lambda d, t: None),
                        ("_check_region_widths", lambda *a: None), ("UniterForPretraining", model),
                        ("build_engine", engine), ("TaskStreams", streams),
                        ("training_batches", batches), ("validate", validate),
                        ("retrieval_eval", lambda *a: {"ir_r1": 0.0}), ("full_parameters", lambda m: nullcontext()),
                        ("_write_run_files", lambda *a: seen.setdefault("run_files", a)),
                        ("_save_model", lambda model, out, step, rank: seen["saved"].append((step, rank))),
                        ("save_state", lambda engine, out, run, *a: seen["states"].append(run.update)),
                        ("_write_results", lambda *a: seen.setdefault("written", a))):
        monkeypatch.setattr(loop, name, value)
    if clock is not None:
        monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: next(clock)))
    cfg = PretrainConfig(output_dir=str(tmp_path / "run"), **changes)
    return loop.pretrain(cfg, progress=False), seen, cfg


def test_validation_in_the_loop_skips_the_last_update(tmp_path, monkeypatch):
    """valid_steps 3 of 6 updates: validation after update 3 in the history; update 6's is the final one, in
    metrics.json, run once (not twice), with the configured number of batches each time."""
    metrics, seen, _ = _fake_run(tmp_path, monkeypatch, tasks={"mlm": 1}, num_train_steps=6, warmup_steps=1,
                                 eval=EvalOptions(valid_steps=3, val_batches=5))
    history = seen["written"][1]
    assert [r["step"] for r in history if r["task"] == "validation"] == [3]
    assert seen["saved"] == [(3, 0), (6, 0)]  # a checkpoint at each validation, the original's, and at the end
    assert seen["states"] == [3]  # a state to resume from at each validation, none at the end
    assert len(seen["validate"]) == 2 and all(kw["num_batches"] == 5 for kw in seen["validate"])
    assert metrics["validation"] == {"mlm": {"loss": 0.0}}


def test_throughput_counts_every_micro_batchs_tokens(tmp_path, monkeypatch):
    """train_tokens_per_second = all tokens of all micro-batches / the training time; 2 updates x 3 micro-batches,
    all scaled as a sum (not an average) over the accumulation."""
    clock = iter([100.0, 104.0])
    metrics, seen, _ = _fake_run(tmp_path, monkeypatch, clock=clock, tasks={"mlm": 1}, num_train_steps=2,
                                 warmup_steps=1, gradient_accumulation_steps=3)
    assert len(seen["tokens"]) == 6 and seen["engine"].calls == 6
    assert seen["engine"].backwards == [False] * 6
    assert metrics["train_seconds"] == 4.0
    assert metrics["train_tokens_per_second"] == pytest.approx(sum(seen["tokens"]) / 4.0)


def test_without_a_bar_each_log_interval_is_one_log_line(tmp_path, monkeypatch, caplog):
    """progress=False (a launcher, a log file): a line at every log_every-th update and at the last, naming the update
    and each task's mean loss over its last 20 logged updates."""
    caplog.set_level(logging.INFO, logger="uniter_fast.train")
    _, seen, cfg = _fake_run(tmp_path, monkeypatch, tasks={"mlm": 1, "itm": 1}, num_train_steps=5, warmup_steps=1,
                             log_every=2, seed=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "uniter_fast.train"]
    assert [line.split(" losses ")[0] for line in lines] == ["update 2/5", "update 4/5", "update 5/5"]
    tasks = [TaskSampler(cfg.tasks, cfg.seed).task_for(u) for u in range(5)]
    for line, upto in zip(lines, (2, 4, 5)):  # update n's loss is n (the fake engine's n-th forward)
        for task in set(tasks[:upto]):
            mean = np.mean([n + 1 for n in range(upto) if tasks[n] == task])
            assert f"'{task}': '{mean:.3f}'" in line, (line, task)
    history = seen["written"][1]
    assert [(r["step"], r["task"], r["loss"]) for r in history] == [(n + 1, tasks[n], n + 1.0) for n in range(5)]


def test_the_logged_mean_is_over_each_tasks_last_20_updates(tmp_path, monkeypatch, caplog):
    """24 updates logged at once: the line's mean is of updates 5..24 (losses 5..24), not of fewer or more."""
    caplog.set_level(logging.INFO, logger="uniter_fast.train")
    _fake_run(tmp_path, monkeypatch, tasks={"mlm": 1}, num_train_steps=24, warmup_steps=1, log_every=24)
    lines = [r.getMessage() for r in caplog.records if r.name == "uniter_fast.train"]
    assert lines == [f"update 24/24 losses {{'mlm': '{np.mean(np.arange(5, 25)):.3f}'}}"]


def test_a_rank_other_than_0_trains_on_its_shard_and_writes_nothing(tmp_path, monkeypatch, caplog):
    """Rank 1 of 2 reads only its own shard of the training texts (the original shards by rank), logs no lines and
    leaves the outputs to rank 0 (it takes part in gathering the checkpoint, which ZeRO-3 needs of every rank)."""
    caplog.set_level(logging.INFO, logger="uniter_fast.train")
    _, seen, _ = _fake_run(tmp_path, monkeypatch, rank=(1, 2), tasks={"mlm": 1}, num_train_steps=2, warmup_steps=1,
                           log_every=1)
    assert seen["streams"] == [("shard", 1, 2)]
    assert "written" not in seen and "run_files" not in seen and seen["saved"] == [(2, 1)]
    assert not [r for r in caplog.records if r.name == "uniter_fast.train"]


def test_the_run_seeds_torch_before_building_the_model(tmp_path, monkeypatch):
    """The model's initial weights follow the config's seed, so two runs of one config start alike."""
    _, seen, _ = _fake_run(tmp_path, monkeypatch, tasks={"mlm": 1}, num_train_steps=1, warmup_steps=1, seed=1234)
    assert seen["seed"] == [1234]


# --- outputs and retrieval ----------------------------------------------------------------------------------------


def test_outputs_name_the_step_drop_the_tokenizer_from_text_meta_and_round_trip_the_config(tmp_path):
    """The checkpoint is ckpt/model_step_{N}.pt (the original's name), text_meta.json keeps the vocabulary's ids but
    not the tokenizer, and pretrain_config.json loads back as the run's config."""
    model = UniterForPretraining(tiny_config())
    cfg = PretrainConfig(num_train_steps=7, warmup_steps=2, betas=(0.9, 0.98), output_dir=str(tmp_path),
                         task_phases=({"steps": 2, "tasks": {"itm": 1}},),
                         data=DataOptions(world=WorldConfig(seed=3, num_train_images=10)))
    meta = {"CLS": 1, "SEP": 2, "MASK": 3, "v_range": [5, 50], "vocab_size": 50, "tokenizer": {"model": "x"}}
    data = SimpleNamespace(tokenizer=None, text_meta=meta)
    history = [{"step": 1, "task": "mlm", "loss": 2.0}, {"step": 2, "task": "itm", "loss": 0.7}]
    loop._write_run_files(tmp_path, cfg, model, data)
    loop._save_model(model, tmp_path, 7, 0)
    loop._write_results(tmp_path, history, {"num_train_steps": 7})
    state = torch.load(tmp_path / "ckpt" / "model_step_7.pt", weights_only=True)
    assert torch.equal(state["itm_output.weight"], model.itm_output.weight)
    assert json.loads((tmp_path / "ckpt" / "text_meta.json").read_text()) == \
        {k: v for k, v in meta.items() if k != "tokenizer"}
    assert PretrainConfig.from_json(tmp_path / "pretrain_config.json") == cfg
    assert json.loads((tmp_path / "history.json").read_text()) == history


def test_retrieval_queries_are_each_images_first_caption_in_order_of_first_mention():
    vocab = Vocab(cls_id=1, sep_id=2, mask_id=3, vocab_range=(5, 50))
    texts = [np.array([10]), np.array([11]), np.array([12, 13]), np.array([14]), np.array([15])]
    image_ids = ["b", "a", "b", "c", "a"]
    queries, images = loop._first_captions(texts, image_ids, vocab)
    assert images == ["b", "a", "c"]
    assert [q.tolist() for q in queries] == [[1, 10, 2], [1, 11, 2], [1, 14, 2]]


def test_retrieval_eval_ranks_the_first_num_images_and_restores_the_mode(monkeypatch):
    """num_images 2 of 3: 2 texts against their 2 images, in order (text i matches image i)."""
    seen = {}

    def scores(model, texts, images, device):
        seen["texts"], seen["images"] = [t.tolist() for t in texts], list(images)
        return torch.eye(len(texts), len(images))

    monkeypatch.setattr(loop, "score_matrix", scores)
    data = SimpleNamespace(retrieval_image_ids=["x", "y", "z"], retrieval_texts=[np.array([1]), np.array([2]),
                                                                                   np.array([3])],
                           val=SimpleNamespace(images={"x": "X", "y": "Y", "z": "Z"}))
    model = torch.nn.Linear(1, 1).train()
    out = loop.retrieval_eval(model, data, 2, torch.device("cpu"))
    assert seen == {"texts": [[1], [2]], "images": ["X", "Y"]}
    assert out["ir_r1"] == 100.0 and out["tr_r1"] == 100.0 and model.training


def test_max_txt_len_keeps_captions_of_exactly_that_many_tokens():
    """data.max_txt_len: captions *longer* than it are dropped (the original's rule); one of exactly that length
    stays."""
    world_cfg = WorldConfig(seed=2, num_train_images=12, num_val_images=4, captions_per_image=2, max_regions=10)
    world = make_world(world_cfg)
    tokenizer = caption_tokenizer(world["train"], 120)
    lens = [len(t) for t in tokenizer.encode_batch([c.text for c in world["train"].captions])]
    limit = sorted(lens)[len(lens) // 2]
    data = loop.build_synthetic_data(PretrainConfig(data=DataOptions(world=world_cfg, vocab_size=120,
                                                                     max_txt_len=limit)))
    kept = [len(t) for t in data.train.texts]
    assert limit in kept and max(kept) == limit
    assert len(kept) == sum(n <= limit for n in lens)


def test_soft_label_width_is_checked_only_when_a_task_learns_from_soft_labels():
    """A store's feature width must match img_dim always; its label width matters only to mrc/mrckl, so a
    store with another detector's label count still trains mlm/itm/mrfr."""
    config = tiny_config()  # img_dim 24, img_label_dim 11
    store = SimpleNamespace(feature_dim=24, label_dim=99)
    loop._check_region_widths(store, config, PretrainConfig(tasks={"mlm": 1, "itm": 1, "mrfr": 1}))
    with pytest.raises(ValueError, match="99-way soft labels but the model's img_label_dim is 11"):
        loop._check_region_widths(store, config, PretrainConfig(tasks={"mlm": 1},
                                                                task_phases=({"steps": 1, "tasks": {"mrckl": 1}},)))
    with pytest.raises(ValueError, match="30-wide features but the model's img_dim is 24"):
        loop._check_region_widths(SimpleNamespace(feature_dim=30, label_dim=None), config, PretrainConfig())
