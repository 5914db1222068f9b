"""The training batches: planned in update order, made alike when asked for and ahead on a thread."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from helpers import assert_same_batch
from uniter_fast.data.synthetic import WorldConfig
from uniter_fast.data.sampler import TokenBucketSampler
from uniter_fast.train.batches import BatchPlan, TaskStreams, training_batches
from uniter_fast.train.config import DataOptions, PretrainConfig
from uniter_fast.train.loop import build_synthetic_data
from uniter_fast.train.tasks import TaskSampler

WORLD = WorldConfig(seed=3, num_train_images=30, num_val_images=6, captions_per_image=2, max_regions=10)
CFG = PretrainConfig(data=DataOptions(world=WORLD, vocab_size=120), train_batch_size=600, num_train_steps=5,
                     gradient_accumulation_steps=2, tasks={"mlm": 1, "itm": 1, "mrfr": 1, "mrckl": 1},
                     task_phases=({"steps": 1, "tasks": {"mrc": 1}},))
TASKS = ("mrc", "mlm", "itm", "mrfr", "mrckl")


@pytest.fixture(scope="module")
def corpus():
    return build_synthetic_data(CFG).train


def _batches(corpus, prefetch: int) -> list:
    streams = TaskStreams(corpus, TASKS, CFG, rank=0)
    sampler = TaskSampler(CFG.tasks, CFG.seed, CFG.task_phases)
    return list(training_batches(streams, sampler, CFG, prefetch))


def test_micro_batches_follow_the_task_sampler(corpus):
    batches = _batches(corpus, 0)
    sampler = TaskSampler(CFG.tasks, CFG.seed, CFG.task_phases)
    assert [b.task for b in batches] == [sampler.task_for(u) for u in range(5) for _ in range(2)]
    assert batches[0].task == "mrc"  # the phase
    # an update's micro-batches are two draws of its task's stream, not one batch twice
    assert batches[0].inputs.input_ids.shape != batches[1].inputs.input_ids.shape or \
        not (batches[0].inputs.input_ids == batches[1].inputs.input_ids).all()


@pytest.mark.parametrize("start", [1, 3, 5])
def test_from_an_update_on_the_plans_are_those_of_a_run_from_the_start(corpus, start, monkeypatch):
    """A resumed run's data position: streams fast-forwarded over `start` updates (two micro-batches each, tasks
    mixed after a phase) plan the batches a run from update 0 plans from there, with the same draws counted."""
    def plans(first: int) -> tuple[list, dict]:
        streams = TaskStreams(corpus, TASKS, CFG, rank=0)
        sampler = TaskSampler(CFG.tasks, CFG.seed, CFG.task_phases)
        streams.fast_forward(sampler, first)
        made = []
        monkeypatch.setattr(streams, "make", lambda plan: made.append(plan) or plan)
        list(training_batches(streams, sampler, CFG, 0, start=first))
        return made, dict(streams.drawn)

    straight, drawn = plans(0)
    resumed, drawn_resumed = plans(start)
    assert resumed == straight[2 * start:] and drawn_resumed == drawn


def test_a_planned_batch_is_the_batch_next_makes(corpus):
    planned, direct = TaskStreams(corpus, TASKS, CFG, rank=0), TaskStreams(corpus, TASKS, CFG, rank=0)
    for task in ("mlm", "itm", "mrckl", "mlm"):
        plan = planned.plan(task)
        assert plan.seed[2] == TASKS.index(task)
        assert_same_batch(planned.make(plan), direct.next(task), task)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_batches_made_ahead_are_the_batches_made_when_asked_for(corpus, prefetch):
    expected, got = _batches(corpus, 0), _batches(corpus, prefetch)
    assert len(got) == len(expected) == 10
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_same_batch(a, b, f"micro-batch {i}, {prefetch} ahead")


def test_an_error_making_a_batch_ahead_is_raised_where_that_batch_is_asked_for(corpus, monkeypatch):
    made = []
    real_make = TaskStreams.make

    def make(self, plan):
        if len(made) == 3:
            raise ValueError("record img7 of shard-00000.rgs is damaged")
        made.append(plan)
        return real_make(self, plan)

    monkeypatch.setattr(TaskStreams, "make", make)
    streams = TaskStreams(corpus, TASKS, CFG, rank=0)
    batches = training_batches(streams, TaskSampler(CFG.tasks, CFG.seed, CFG.task_phases), CFG, 2)
    got = [next(batches) for _ in range(3)]
    assert [b.task for b in got] == [p.task for p in made]
    with pytest.raises(ValueError, match="record img7 of shard-00000.rgs is damaged"):
        next(batches)


def test_a_consumer_that_stops_early_stops_the_thread(corpus):
    streams = TaskStreams(corpus, TASKS, CFG, rank=0)
    batches = training_batches(streams, TaskSampler(CFG.tasks, CFG.seed, CFG.task_phases), CFG, 1)
    next(batches)
    batches.close()
    for _ in range(50):
        if not any(t.name == "uniter-fast batches" for t in threading.enumerate()):
            break
        time.sleep(0.1)
    assert not any(t.name == "uniter-fast batches" for t in threading.enumerate())
    assert sum(streams.drawn.values()) <= 3  # the one consumed, at most one queued and one being made


@pytest.mark.gpu
def test_batches_arrive_pinned_for_asynchronous_copies(corpus):
    streams = TaskStreams(corpus, TASKS, CFG, rank=0)
    sampler = TaskSampler(CFG.tasks, CFG.seed, CFG.task_phases)
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # the last GPU: its thread must not pin on GPU 0
    batches = list(training_batches(streams, sampler, CFG, 2, pin_to=device))
    expected = _batches(corpus, 0)
    for i, (a, b) in enumerate(zip(batches, expected)):
        assert a.inputs.img_feat.is_pinned() and a.inputs.input_ids.is_pinned(), f"micro-batch {i} is not pinned"
        assert_same_batch(a.to(device, non_blocking=True).to("cpu"), b, f"micro-batch {i}")


def test_each_batch_has_its_own_seed_from_the_run_rank_task_and_draw(corpus):
    """A task's k-th batch on a rank masks with seed (run seed, rank, task, k): no two batches share masks, and
    ranks differ; each task's stream batches with its own sampler seed (run seed * 1000 + task)."""
    for rank in (0, 1):
        streams = TaskStreams(corpus, TASKS, CFG, rank=rank)
        plans = [streams.plan(task) for task in ("mlm", "itm", "mlm", "mlm", "itm")]
        assert [p.seed for p in plans] == [(CFG.seed, rank, TASKS.index(t), k) for t, k in
                                           (("mlm", 0), ("itm", 0), ("mlm", 1), ("mlm", 2), ("itm", 1))]
        for task in ("mlm", "itm"):
            first = TokenBucketSampler(corpus.lens, batch_tokens=CFG.train_batch_size,
                                       seed=CFG.seed * 1000 + TASKS.index(task)).epoch(0)[0]
            assert next(p for p in plans if p.task == task).indices == tuple(first.tolist()), task


def test_a_batch_follows_its_plan_seed_and_order_and_the_masking_options(corpus):
    streams = TaskStreams(corpus, TASKS, CFG, rank=0)
    plan = streams.plan("mlm")
    again = BatchPlan("mlm", plan.indices, plan.seed[:3] + (plan.seed[3] + 1,))
    a, b = streams.make(plan), streams.make(again)
    assert not torch.equal(a.mlm_rows, b.mlm_rows) or not torch.equal(a.inputs.input_ids, b.inputs.input_ids)
    reversed_plan = BatchPlan("itm", plan.indices[::-1], plan.seed)
    inputs = streams.make(reversed_plan).inputs  # itm masks no word: the texts as the corpus holds them
    first = inputs.input_ids[:inputs.text_lens[0]].tolist()
    assert first == [corpus.vocab.cls_id, *corpus.texts[plan.indices[-1]].tolist(), corpus.vocab.sep_id]
    for prob, label in ((0.0, 1), (1.0, 0)):
        cfg = dataclasses.replace(CFG, itm_neg_prob=prob)
        itm = TaskStreams(corpus, TASKS, cfg, rank=0).next("itm")
        assert itm.itm_labels.eq(label).all(), prob
    joint = TaskStreams(corpus, TASKS, dataclasses.replace(CFG, conditional_masking=False), rank=0).next("mlm")
    assert joint.inputs.img_masks is not None and joint.inputs.img_masks.any()


@pytest.mark.parametrize("prefetch", [1, 3])
def test_the_thread_makes_as_many_batches_ahead_as_asked(corpus, prefetch):
    streams = TaskStreams(corpus, TASKS, CFG, rank=0)
    batches = training_batches(streams, TaskSampler(CFG.tasks, CFG.seed, CFG.task_phases), CFG, prefetch)
    next(batches)
    for _ in range(100):  # until the thread has filled the queue and drawn the one after
        if sum(streams.drawn.values()) == 1 + prefetch + 1:
            break
        time.sleep(0.02)
    time.sleep(0.1)
    assert sum(streams.drawn.values()) == 1 + prefetch + 1  # the consumed one, `prefetch` queued, one waiting
    batches.close()
