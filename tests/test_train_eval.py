"""What training and evaluation do with a step, a batch or a score: the original's optimizer groups and schedule per
update, DeepSpeed's settings, summed gradient accumulation, the run's task order, validation cadence and
metrics.json, validation's averaging, and the retrieval score matrix and recall (reference/uniter.md 3.3-3.5)."""
from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import tiny_config
from uniter_fast.data.pretrain import MaskingOptions
from uniter_fast.data.sampler import TokenBucketSampler
from uniter_fast.data.synthetic import WorldConfig
from uniter_fast.eval.retrieval import recall_at_k, score_matrix
from uniter_fast.eval.validation import validate
from uniter_fast.model import UniterForPretraining
from uniter_fast.objectives.wra import wra_loss
from uniter_fast.train import loop
from uniter_fast.train.config import DataOptions, EvalOptions, ModelOptions, PretrainConfig
from uniter_fast.train.engine import build_optimizer, deepspeed_config, parameter_groups
from uniter_fast.train.tasks import TaskSampler

# --- optimizer and schedule ------------------------------------------------------------------------------------


def test_no_decay_is_the_originals_substring_rule_by_name():
    """Hard-coded names, not the NO_DECAY constant: dropping "LayerNorm.weight" (or adding "layer_norm") from the
    rule must fail here."""
    model = UniterForPretraining(tiny_config())
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    layer_norm_weights = {"uniter.embeddings.LayerNorm.weight", "uniter.img_embeddings.LayerNorm.weight",
                          "cls.predictions.transform.LayerNorm.weight"} | {
        f"uniter.encoder.layer.{i}.{where}.LayerNorm.weight" for i in (0, 1) for where in ("attention.output", "output")}
    biases = {n for n in names.values() if n.endswith("bias")}
    assert "cls.predictions.bias" in biases and "feat_regress.bias" in biases
    assert not_decayed == biases | layer_norm_weights
    assert decayed == set(names.values()) - not_decayed
    # LayerNorms not literally named "LayerNorm" and the [MASK] embedding are decayed, as in the original
    assert {"uniter.img_embeddings.img_layer_norm.weight", "uniter.img_embeddings.pos_layer_norm.weight",
            "feat_regress.net.2.weight", "region_classifier.net.2.weight",
            "uniter.img_embeddings.mask_embedding.weight"} <= decayed
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)


def test_learning_rate_of_each_update_is_the_originals():
    """Update n (1-based) runs at lr * warmup_linear(n): n/warmup while warming up, then a linear decay that reaches
    0 at num_train_steps, where the 1e-8 floor takes over. Update 1 is not at lr 0 and the decay has no other floor."""
    cfg = PretrainConfig(learning_rate=1e-3, warmup_steps=4, num_train_steps=10, weight_decay=0.01)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer, schedule = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 for g in optimizer.param_groups)
    lrs = []
    for _ in range(12):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    expected = [1e-3 * f for f in (1 / 4, 2 / 4, 3 / 4, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6)] + [1e-8] * 3
    assert [a for a, b in lrs] == [b for a, b in lrs]  # both groups follow the schedule
    assert [a for a, _ in lrs] == pytest.approx(expected, rel=1e-9, abs=0)


@pytest.mark.parametrize("precision, enabled", [("fp32", []), ("bf16", ["bf16"]), ("fp16", ["fp16"])])
def test_deepspeed_config_carries_accumulation_clipping_and_precision(precision, enabled):
    ds = deepspeed_config(PretrainConfig(gradient_accumulation_steps=3, grad_norm=5.0, precision=precision,
                                         zero_stage=1))
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_clipping"] == 5.0 and ds["zero_optimization"] == {"stage": 1}
    assert [k for k in ("bf16", "fp16") if ds.get(k, {}).get("enabled")] == enabled
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling, as apex O2
    assert "gradient_clipping" not in deepspeed_config(PretrainConfig(grad_norm=-1))


# --- short runs through pretrain() -------------------------------------------------------------------------------

WORLD = WorldConfig(seed=5, num_train_images=40, num_val_images=12, captions_per_image=3, max_regions=14)
NO_DROPOUT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _run_config(tmp_path, **changes) -> PretrainConfig:
    out = "unused" if tmp_path is None else str(tmp_path / "run")
    changes = {"model": ModelOptions(overrides=NO_DROPOUT), **changes}
    return PretrainConfig(data=DataOptions(world=WORLD, vocab_size=150), output_dir=out, train_batch_size=600,
                          warmup_steps=2, **changes)


def test_gradients_are_summed_over_accumulation_steps(tmp_path, monkeypatch):
    """gradient_accumulation_steps=2 with the same micro-batch twice: at the update the gradient is twice one
    micro-batch's (the original sums, it does not average), and the run draws 2 micro-batches per update."""
    drawn, seen, captured = [], {}, []
    real_make, real_build = loop.TaskStreams.make, loop.build_engine

    def same_batch(self, plan):
        drawn.append(plan.task)
        if plan.task not in seen:
            seen[plan.task] = real_make(self, plan)
        return seen[plan.task]

    def spy_engine(model, cfg):
        seen["initial"] = copy.deepcopy(model)
        engine = real_build(model, cfg)
        step = engine.step

        def recording_step(*args, **kwargs):
            if engine.is_gradient_accumulation_boundary() and not captured:
                captured.append({n: p.grad.detach().clone() for n, p in engine.module.named_parameters()
                                 if p.grad is not None})
            return step(*args, **kwargs)

        engine.step = recording_step
        return engine

    monkeypatch.setattr(loop.TaskStreams, "make", same_batch)
    monkeypatch.setattr(loop, "build_engine", spy_engine)
    cfg = _run_config(tmp_path, tasks={"mlm": 1}, num_train_steps=2, gradient_accumulation_steps=2, zero_stage=0,
                      eval=EvalOptions(val_batches=1, retrieval_images=4))
    loop.pretrain(cfg, progress=False)
    assert drawn == ["mlm"] * 4
    assert len(captured) == 1, "no optimizer update after two micro-batches"
    reference = seen["initial"]
    reference.train()
    reference(seen["mlm"]).loss.backward()
    expected = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in reference.named_parameters()}
    assert set(captured[0]) == set(expected)  # heads MLM does not use hold zeros
    assert sum(bool(g.abs().sum() > 0) for g in expected.values()) > 20
    for name, grad in expected.items():
        torch.testing.assert_close(captured[0][name], 2 * grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_run_with_batches_made_ahead_trains_as_one_without(tmp_path):
    """Same batches, same dropout: a thread making the batches ahead changes nothing the run logs."""
    histories = []
    for ahead in (0, 2):
        cfg = _run_config(tmp_path / f"ahead{ahead}", tasks={"mlm": 1, "itm": 1, "mrfr": 1}, num_train_steps=4,
                          zero_stage=0, prefetch_batches=ahead, log_every=1,
                          eval=EvalOptions(val_batches=1, retrieval_images=4),
                          model=ModelOptions(overrides={**NO_DROPOUT, "hidden_dropout_prob": 0.1}))
        loop.pretrain(cfg, progress=False)
        histories.append(json.loads((tmp_path / f"ahead{ahead}" / "run" / "history.json").read_text()))
    assert len(histories[0]) == 4 and {row["task"] for row in histories[0]} >= {"mlm", "itm"}
    assert histories[0] == histories[1]


def test_a_failing_step_leaves_no_thread_making_batches(tmp_path, monkeypatch):
    """The run's error reaches the caller, and the batch thread stops even while the caller keeps the error (its
    traceback holding the loop's frame, and so the batch iterator, alive)."""
    real_build = loop.build_engine

    def failing_engine(model, cfg):
        engine = real_build(model, cfg)

        def step(*args, **kwargs):
            raise FloatingPointError("loss is nan at update 1")

        engine.step = step
        return engine

    monkeypatch.setattr(loop, "build_engine", failing_engine)
    cfg = _run_config(tmp_path, tasks={"mlm": 1}, num_train_steps=6, zero_stage=0, prefetch_batches=2,
                      eval=EvalOptions(val_batches=1, retrieval_images=4))
    with pytest.raises(FloatingPointError, match="loss is nan") as kept:
        loop.pretrain(cfg, progress=False)
    assert kept.value.__traceback__ is not None
    assert not any(t.name == "uniter-fast batches" and t.is_alive() for t in threading.enumerate())


def test_the_run_makes_batches_ahead_as_configured(tmp_path, monkeypatch):
    """prefetch_batches reaches the batch stream; unset, a CPU run makes none ahead; nothing is pinned on the CPU."""
    seen = []

    class Seen(Exception):
        pass

    def spy(streams, sampler, cfg, prefetch, pin_to=None, start=0):
        seen.append((prefetch, pin_to, start))
        raise Seen

    monkeypatch.setattr(loop, "training_batches", spy)
    for value in (None, 3, 0):
        cfg = _run_config(tmp_path / f"run{value}", tasks={"mlm": 1}, num_train_steps=1, zero_stage=0,
                          prefetch_batches=value)
        with pytest.raises(Seen):
            loop.pretrain(cfg, progress=False)
    assert seen == [(0, None, 0), (3, None, 0), (0, None, 0)]


@pytest.fixture(scope="module")
def phased_run(tmp_path_factory):
    """5 updates: 2 of ITM alone, then mlm/mrfr; validation every 2 updates; 20 retrieval images asked of 12."""
    tmp_path = tmp_path_factory.mktemp("phased")
    cfg = _run_config(tmp_path, tasks={"mlm": 1, "mrfr": 1}, task_phases=({"steps": 2, "tasks": {"itm": 1}},),
                      num_train_steps=5, log_every=2, seed=3,
                      eval=EvalOptions(valid_steps=2, val_batches=1, retrieval_images=20))
    metrics = loop.pretrain(cfg, progress=False)
    out = tmp_path / "run"
    return cfg, metrics, json.loads((out / "history.json").read_text()), json.loads((out / "metrics.json").read_text())


def test_run_trains_the_sampled_task_of_each_update(phased_run):
    cfg, _, history, _ = phased_run
    train = [r for r in history if r["task"] != "validation"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    tasks = [r["task"] for r in train]
    assert tasks[:2] == ["itm", "itm"] and set(tasks[2:]) <= {"mlm", "mrfr"}
    assert tasks == [TaskSampler(cfg.tasks, cfg.seed, cfg.task_phases).task_for(u) for u in range(5)]
    for row in train:  # each row has its own task's metrics
        assert ("ot_pos" in row) == (row["task"] == "itm") and ("acc" in row) == (row["task"] != "mrfr")


def test_validation_every_valid_steps_and_once_at_the_end(phased_run):
    _, metrics, history, _ = phased_run
    rows = [(r["step"], r["task"]) for r in history]
    assert [step for step, task in rows if task == "validation"] == [2, 4]  # not at 5: that one is metrics.json's
    assert rows.index((2, "validation")) == rows.index((2, "itm")) + 1
    for row in history:
        if row["task"] == "validation":
            assert list(row["val"]) == ["mlm", "mrfr", "itm"]  # every task of the run, mix then phases
    assert list(metrics["validation"]) == ["mlm", "mrfr", "itm"]
    assert set(metrics["validation"]["itm"]) == {"loss", "acc", "ot_loss", "ot_pos", "ot_neg"}


def test_a_checkpoint_at_each_validation_and_at_the_end(phased_run):
    """The original writes ckpt/model_step_{N}.pt at every validation: updates 2 and 4 here, and 5 at the end. Each
    loads whole with the config written before training, and each holds that update's weights (they differ)."""
    cfg, *_ = phased_run
    ckpt = Path(cfg.output_dir) / "ckpt"
    assert sorted(p.name for p in ckpt.glob("model_step_*.pt")) == ["model_step_2.pt", "model_step_4.pt",
                                                                    "model_step_5.pt"]
    weights = []
    for step in (2, 4, 5):
        model = UniterForPretraining.from_pretrained(ckpt / f"model_step_{step}.pt", ckpt / "config.json")
        weights.append(model.uniter.encoder.layer[0].attention.self.qkv.weight.detach())  # all tasks train it
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


def test_metrics_json_records_the_run(phased_run):
    cfg, metrics, history, written = phased_run
    assert written == json.loads(json.dumps(metrics))
    assert set(written) == {"num_train_steps", "train_seconds", "train_tokens_per_second", "final_train",
                            "validation", "zero_shot_retrieval", "chance"}
    assert written["num_train_steps"] == 5
    # 20 images asked for, 12 held out: retrieval ranks among 12, so chance R@1 is 1/12
    assert written["chance"] == {"retrieval_r1": pytest.approx(100 / 12), "itm_acc": 0.5,
                                 "mlm_acc": pytest.approx(1 / 150)}
    assert set(written["zero_shot_retrieval"]) == {f"{d}_r{k}" for d in ("ir", "tr") for k in (1, 5, 10)}
    assert written["zero_shot_retrieval"]["ir_r10"] >= written["zero_shot_retrieval"]["ir_r1"]
    itm_losses = [r["loss"] for r in history if r["task"] == "itm"]
    assert written["final_train"]["itm"]["loss"] == pytest.approx(np.mean(itm_losses))


def test_final_train_is_the_mean_of_each_tasks_last_20_updates():
    history = [{"step": s, "task": "mlm", "loss": float(s), "acc": 2.0 * s} for s in range(1, 26)]
    history.insert(3, {"step": 3, "task": "validation", "val": {}})
    history.append({"step": 26, "task": "itm", "loss": 0.5})
    out = loop._final_train(history, ["mlm", "itm", "mrfr"])
    assert out == {"mlm": {"loss": 15.5, "acc": 31.0}, "itm": {"loss": 0.5}}


# --- validation -------------------------------------------------------------------------------------------------


class _Recorder:
    """A model that records how validation calls it: the task, its mode and the batch's examples."""

    def __init__(self, training: bool):
        self.training, self.calls = training, []

    def eval(self):
        return self.train(False)

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def __call__(self, batch):
        items = {"mlm": batch.mlm_rows, "itm": batch.itm_labels}.get(batch.task, batch.mrm_rows).numel()
        self.calls.append((batch.task, self.training, batch.inputs.batch_size, items))
        return SimpleNamespace(metrics={"one": torch.tensor(1.0), "n": torch.tensor(float(len(self.calls)))})


@pytest.fixture(scope="module")
def val_corpus():
    return loop.build_synthetic_data(_run_config(None)).val


@pytest.mark.parametrize("training", [True, False])
def test_validation_runs_in_eval_mode_and_restores_the_mode(val_corpus, training):
    model = _Recorder(training)
    validate(model, val_corpus, ["itm", "mlm"], batch_tokens=600, num_batches=2, options=MaskingOptions(),
             device=torch.device("cpu"))
    assert model.training is training
    assert [(task, mode) for task, mode, _, _ in model.calls] == [("itm", False)] * 2 + [("mlm", False)] * 2


def test_validation_means_are_over_the_batches_it_has(val_corpus):
    """num_batches above what the split holds: every batch once per task, each task on the same batches, and means
    over the batches drawn (not divided by num_batches), each batch weighted by its masked regions or pairs, as
    the original divides its totals."""
    available = len(TokenBucketSampler(val_corpus.lens, batch_tokens=600, seed=0).epoch(0))
    assert 1 < available < 1000
    model = _Recorder(True)
    out = validate(model, val_corpus, ["mrfr", "itm"], batch_tokens=600, num_batches=1000,
                   options=MaskingOptions(), device=torch.device("cpu"))
    sizes = {task: [size for t, _, size, _ in model.calls if t == task] for task in ("mrfr", "itm")}
    assert len(sizes["mrfr"]) == available and sizes["mrfr"] == sizes["itm"]
    assert sum(sizes["itm"]) == len(val_corpus.lens)  # the whole split once
    regions = [items for t, _, _, items in model.calls if t == "mrfr"]
    assert len(set(regions)) > 1  # batches differ in masked regions: the weighting shows
    weighted = sum(n * items for n, items in enumerate(regions, start=1)) / sum(regions)
    assert out["mrfr"] == {"one": pytest.approx(1.0), "n": pytest.approx(weighted)}
    assert weighted != pytest.approx((available + 1) / 2)
    pairs = [items for t, _, size, items in model.calls if t == "itm"]
    assert pairs == sizes["itm"]  # ITM averages over pairs
    assert out["itm"]["n"] == pytest.approx(sum(n * k for n, k in enumerate(pairs, start=available + 1)) / sum(pairs))


def test_validation_ot_means_are_over_all_pairs(val_corpus):
    """The original's validate_itm reports ot_pos (ot_neg) as the distances of matched (swapped) pairs summed over
    the split, divided by all its pairs; a batch's mean over its matched pairs, weighted by all its pairs, is not."""
    pairs = []

    class _Distances(_Recorder):
        def __call__(self, batch):
            labels = batch.itm_labels
            distances = torch.rand(labels.shape[0], generator=torch.Generator().manual_seed(len(pairs)))
            pairs.append((labels.clone(), distances))
            _, metrics = wra_loss(distances, labels)
            return SimpleNamespace(metrics={f"ot_{k}": v for k, v in metrics.items()})

    out = validate(_Distances(False), val_corpus, ["itm"], batch_tokens=600, num_batches=3, options=MaskingOptions(),
                   device=torch.device("cpu"))["itm"]
    labels, distances = (torch.cat(x).double() for x in zip(*pairs))
    matched = distances[labels == 1].sum() / len(labels)
    swapped = distances[labels == 0].sum() / len(labels)
    assert len(pairs) == 3 and len({round(float(lab.double().mean()), 6) for lab, _ in pairs}) > 1  # unlike mixes
    assert out["ot_pos"] == pytest.approx(matched.item(), rel=1e-6)
    assert out["ot_neg"] == pytest.approx(swapped.item(), rel=1e-6)
    assert out["ot_loss"] == pytest.approx((matched - swapped).item(), rel=1e-6)


def test_validation_is_the_same_every_time(val_corpus):
    """Fixed masks and negatives for a seed, dropout off: the same numbers whatever the global RNGs hold."""
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config(vocab_size=150, img_dim=WORLD.img_dim,
                                             img_label_dim=WORLD.num_labels))
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        np.random.seed(seed)
        runs.append(validate(model, val_corpus, ["itm", "mlm"], batch_tokens=600, num_batches=2,
                             options=MaskingOptions(), device=torch.device("cpu"), seed=7))
    assert runs[0] == runs[1] and model.training
    assert 0.0 <= runs[0]["itm"]["acc"] <= 1.0 and runs[0]["mlm"]["loss"] > 0


def test_a_tasks_validation_does_not_depend_on_the_other_tasks(val_corpus):
    """An ablation validates mlm with or without other tasks on the same masks: its numbers compare across runs."""
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config(vocab_size=150, img_dim=WORLD.img_dim,
                                             img_label_dim=WORLD.num_labels))
    alone, mixed = (validate(model, val_corpus, tasks, batch_tokens=600, num_batches=2, options=MaskingOptions(),
                             device=torch.device("cpu"), seed=7) for tasks in (["mlm"], ["itm", "mrfr", "mlm"]))
    assert alone["mlm"] == mixed["mlm"]


# --- zero-shot retrieval ------------------------------------------------------------------------------------------


class _CodeScorer:
    """itm_scores = 10 * (text code, the token after [CLS]) + (image code, its first feature): every score says
    which pair the model was given."""

    def itm_scores(self, batch):
        text_start = torch.cumsum(batch.text_lens, 0) - batch.text_lens
        region_start = torch.cumsum(batch.region_lens, 0) - batch.region_lens
        return 10.0 * batch.input_ids[text_start + 1].float() + batch.img_feat[region_start.long(), 0].float()


def test_score_matrix_rows_are_texts_and_columns_images():
    texts = [np.array([1, code, 2]) for code in (7, 8, 9)]
    images = [SimpleNamespace(features=np.full((2 + j, 24), float(j), dtype=np.float32),
                              norm_bb=np.tile(np.array([0.1, 0.1, 0.5, 0.5, 0.4, 0.4], dtype=np.float32), (2 + j, 1)))
              for j in range(2)]
    scores = score_matrix(_CodeScorer(), texts, images, device=torch.device("cpu"), pairs_per_batch=4)
    assert scores.shape == (3, 2)
    assert scores.tolist() == [[70.0, 71.0], [80.0, 81.0], [90.0, 91.0]]


def test_text_retrieval_counts_any_caption_of_the_image():
    # 4 captions of 2 images: texts 0, 1 -> image 0, texts 2, 3 -> image 1
    scores = torch.tensor([[0.1, 0.9],
                           [0.8, 0.3],
                           [0.7, 0.6],
                           [0.2, 0.4]])
    r = recall_at_k(scores, [0, 0, 1, 1], ks=(1, 2))
    # texts ranking images: text 1 and text 3 find theirs first, texts 0 and 2 second
    assert r["ir_r1"] == 50.0 and r["ir_r2"] == 100.0
    # image 0 ranks texts 1, 2, 3, 0: text 1 is its caption (hit at 1); image 1 ranks texts 0, 2, 3, 1: its first
    # caption (text 2) comes second
    assert r["tr_r1"] == 50.0 and r["tr_r2"] == 100.0


def test_ties_count_as_broken_at_random_in_both_directions():
    """A constant score gives chance in both directions (image retrieval counted ties as hits, text retrieval
    as argsort ordered them); a partial tie counts the chance that a true item lands in the top k."""
    r = recall_at_k(torch.zeros(4, 4), [0, 1, 2, 3], ks=(1, 2, 4))
    assert r == {"ir_r1": 25.0, "ir_r2": 50.0, "ir_r4": 100.0, "tr_r1": 25.0, "tr_r2": 50.0, "tr_r4": 100.0}
    r = recall_at_k(torch.zeros(4, 2), [0, 0, 1, 1], ks=(1, 2))  # two captions among four tied texts
    assert r["ir_r1"] == 50.0 and r["tr_r1"] == 50.0 and r["tr_r2"] == pytest.approx(100 * 5 / 6)
    # text 0's image ties with one false image, below another: never first, second half the time
    r = recall_at_k(torch.tensor([[0.5, 0.9, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), [0, 1, 2], ks=(1, 2, 3))
    assert r["ir_r1"] == pytest.approx(200 / 3) and r["ir_r2"] == pytest.approx(250 / 3) and r["ir_r3"] == 100.0
