"""A tiny pre-training run through DeepSpeed (ZeRO-2, one CPU process): it writes its outputs and its losses fall."""
import json
import math
import os
import shutil
import subprocess

import pytest
import torch

from helpers import pretrain_config_file
from uniter_fast.cli import main
from uniter_fast.model import UniterForPretraining
from uniter_fast.train.config import PretrainConfig
from uniter_fast.train.engine import NO_DECAY, _free_port, clear_stale_gradients, parameter_groups, warmup_linear


@pytest.mark.slow
def test_tiny_pretraining_run_learns_and_writes_its_outputs(tmp_path):
    path = pretrain_config_file(tmp_path)
    assert main(["pretrain", "--config", str(path), "--no-progress"]) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert (run / "curves.png").stat().st_size > 10_000
    for task in ("mlm", "itm", "mrfr", "mrckl"):
        losses = [r["loss"] for r in history if r["task"] == task]
        assert len(losses) >= 8, task
        first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
        if task == "itm":  # about 20 ITM updates: still on its plateau at chance (test_learnability sees it leave)
            assert abs(last - math.log(2)) < 0.1, f"itm loss {last:.4f}, chance {math.log(2):.4f}"
            continue
        assert last < first, f"{task} loss did not fall: {first:.4f} -> {last:.4f}"
    assert metrics["validation"]["mlm"]["acc"] > 5 * metrics["chance"]["mlm_acc"]
    assert set(metrics["zero_shot_retrieval"]) == {f"{d}_r{k}" for d in ("ir", "tr") for k in (1, 5, 10)}
    # the checkpoint is in the original key layout and loads back
    state = torch.load(run / "ckpt" / "model_step_80.pt", weights_only=True)
    assert "uniter.encoder.layer.1.output.LayerNorm.weight" in state and "itm_output.weight" in state
    model = UniterForPretraining.from_pretrained(run / "ckpt" / "model_step_80.pt",
                                                 run / "ckpt" / "config.json")
    assert torch.equal(model.uniter.pooler.dense.weight, state["uniter.pooler.dense.weight"])


def test_zero3_run_writes_whole_parameters_and_trains_as_zero2(tmp_path):
    """ZeRO-3 partitions parameters across ranks (placeholders of size 0 on each): the checkpoint must be whole.
    Its updates are ZeRO-2's, loss for loss: the heads of the tasks an update does not train get no gradient, not
    the one they got last (clear_stale_gradients). (ZeRO-3's batches are made ahead on a thread: --prefetch-batches
    reaches the run's config.)"""
    for stage in (3, 2):
        path = pretrain_config_file(tmp_path, zero_stage=stage, num_train_steps=6, log_every=3,
                                    output_dir=str(tmp_path / f"zero{stage}"))
        assert main(["pretrain", "--config", str(path), "--no-progress", "--prefetch-batches", str(stage - 1)]) == 0
    assert json.loads((tmp_path / "zero3" / "pretrain_config.json").read_text())["prefetch_batches"] == 2
    state = torch.load(tmp_path / "zero3" / "ckpt" / "model_step_6.pt", weights_only=True)
    assert state["uniter.encoder.layer.0.attention.self.query.weight"].shape == (64, 64)
    assert state["cls.predictions.decoder.weight"].shape == state["uniter.embeddings.word_embeddings.weight"].shape
    history = [json.loads((tmp_path / f"zero{stage}" / "history.json").read_text()) for stage in (3, 2)]
    assert len({r["task"] for r in history[0]}) > 1 and history[0] == history[1]


def test_clearing_stale_gradients_needs_the_zero3_buffer():
    class Engine:
        def __init__(self, stage, optimizer):
            self.stage, self.optimizer = stage, optimizer

        def zero_optimization_stage(self):
            return self.stage

    class Optimizer:
        grad_partitions_flat_buffer = torch.ones(4)

    clear_stale_gradients(Engine(2, object()))  # below stage 3: nothing to clear
    engine = Engine(3, Optimizer())
    clear_stale_gradients(engine)
    assert not engine.optimizer.grad_partitions_flat_buffer.any()
    with pytest.raises(RuntimeError, match="no grad_partitions_flat_buffer .* use zero_stage 2"):
        clear_stale_gradients(Engine(3, object()))


@pytest.mark.slow
def test_the_readmes_launcher_command_trains_on_two_cpu_ranks_with_zero3_and_resumes(tmp_path):
    """`deepspeed --num_gpus 2 --module uniter_fast.cli pretrain` as the README gives it, on CPU ranks: each rank
    holds half of every parameter under ZeRO-3, and rank 0 writes them whole after gathering, mid-run (validation
    at update 3) and at the end. Then --resume from the state saved at that validation (each rank's partition of
    the weights and the optimizer, its random state: dropout is on) ends with the same weights and history, bit for
    bit."""
    dropout = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    path = pretrain_config_file(tmp_path, zero_stage=3, num_train_steps=6, log_every=3,
                                eval={"val_batches": 2, "retrieval_images": 10, "valid_steps": 3},
                                model={"preset": "tiny", "overrides": {"hidden_size": 64, "num_hidden_layers": 2,
                                                                       "num_attention_heads": 4,
                                                                       "intermediate_size": 128, **dropout}})
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("WORLD_SIZE", None)
    launcher = shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not on PATH (deepspeed is a dependency of the package)"

    def launch(*flags):
        run = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
                              "uniter_fast.cli", "pretrain", "--config", str(path), "--no-progress", *flags],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert (run.stdout + run.stderr).count("exits successfully") == 2  # the launcher's line per rank

    launch()
    ckpt = tmp_path / "run" / "ckpt"
    for step in (3, 6):
        state = torch.load(ckpt / f"model_step_{step}.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        model = UniterForPretraining.from_pretrained(ckpt / f"model_step_{step}.pt", ckpt / "config.json")  # whole
        assert model.uniter.encoder.layer[0].attention.self.qkv.weight.shape == (3 * 64, 64)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["num_train_steps"] == 6
    straight = torch.load(ckpt / "model_step_6.pt", weights_only=True)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert sorted(p.name for p in (tmp_path / "run" / "resume" / "step_3").glob("rank_*.pt")) == ["rank_0.pt",
                                                                                                 "rank_1.pt"]
    (ckpt / "model_step_6.pt").unlink()
    launch("--resume")
    resumed = torch.load(ckpt / "model_step_6.pt", weights_only=True)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == history


def test_compiled_encoder_trains_as_eager(tmp_path):
    """--compile: the encoder under torch.compile (aot_eager here: the graph as traced, run by eager kernels) follows
    the eager run's losses, and the checkpoint keeps the original key names. On the CPU "auto" takes the reference
    attention (the triton kernels under the interpreter would take minutes here); test_attention compiles those."""
    histories = []
    for name, flags in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        (tmp_path / name).mkdir()
        path = pretrain_config_file(tmp_path / name, num_train_steps=6, log_every=3)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()  # reset() keeps them; earlier tests compiled graphs too
        assert main(["pretrain", "--config", str(path), "--no-progress", *flags]) == 0
        histories.append(json.loads((tmp_path / name / "run" / "history.json").read_text()))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the second run did compile
    eager, compiled = ([r["loss"] for r in h] for h in histories)
    assert [r["task"] for r in histories[0]] == [r["task"] for r in histories[1]]
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=1e-4, rtol=1e-4)
    state = torch.load(tmp_path / "compiled" / "run" / "ckpt" / "model_step_6.pt", weights_only=True)
    assert "uniter.encoder.layer.0.attention.self.query.weight" in state


def test_the_command_line_overrides_only_what_it_is_given(tmp_path, monkeypatch):
    import uniter_fast.train.loop as loop

    seen = []

    def fake_pretrain(cfg, progress, overwrite, resume):
        seen.append(cfg)
        return {"validation": {}, "zero_shot_retrieval": {}}

    monkeypatch.setattr(loop, "pretrain", fake_pretrain)
    path = pretrain_config_file(tmp_path, prefetch_batches=3, precision="fp32")
    assert main(["pretrain", "--config", str(path), "--no-progress"]) == 0
    assert main(["pretrain", "--config", str(path), "--no-progress", "--prefetch-batches", "1", "--steps", "4"]) == 0
    assert [(c.prefetch_batches, c.num_train_steps, c.precision) for c in seen] == [(3, 80, "fp32"), (1, 4, "fp32")]


def test_config_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"learning_rat": 1e-4}))
    with pytest.raises(ValueError, match=r"bad\.json.*unknown keys \['learning_rat'\]"):
        PretrainConfig.from_json(path)
    path.write_text(json.dumps({"tasks": {"mlm": 1, "vqa": 1}}))
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        PretrainConfig.from_json(path)
    path.write_text(json.dumps({"task_phases": [{"steps": 10, "tasks": {"itm": 0}}]}))
    with pytest.raises(ValueError, match=r"task_phases\[0\]\.tasks: the mix ratio of 'itm'"):
        PretrainConfig.from_json(path)
    path.write_text(json.dumps({"task_phases": [{"steps": 10}]}))
    with pytest.raises(ValueError, match=r"task_phases\[0\]: expected an object with exactly the keys"):
        PretrainConfig.from_json(path)
    path.write_text(json.dumps({"data": {"world": {"num_train_images": 0}}}))
    with pytest.raises(ValueError, match=r"data: world.*num_train_images"):
        PretrainConfig.from_json(path)
    path.write_text(json.dumps({"compile": "inductr"}))
    with pytest.raises(ValueError, match=r"bad\.json: compile 'inductr': expected null or a torch.compile backend"):
        PretrainConfig.from_json(path)
    path.write_text(json.dumps({"compile": "inductor", "zero_stage": 3}))
    with pytest.raises(ValueError, match=r"bad\.json: compile is not supported with zero_stage 3"):
        PretrainConfig.from_json(path)


def test_the_command_reports_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    """Exit status 1 and one message naming the file or key, no traceback; UNITER_FAST_TRACEBACK=1 raises."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rate": "1e-3"}))
    assert main(["pretrain", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("uniter-fast pretrain: error: ") and "bad.json: learning_rate must be a number > 0" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    config = pretrain_config_file(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}\n")  # an earlier run
    assert main(["pretrain", "--config", str(config)]) == 1
    assert "is not empty" in capsys.readouterr().err
    monkeypatch.setenv("UNITER_FAST_TRACEBACK", "1")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        main(["pretrain", "--config", str(config)])


def test_optimizer_groups_follow_the_original_name_rule():
    from helpers import tiny_config

    model = UniterForPretraining(tiny_config())
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert "uniter.img_embeddings.img_layer_norm.weight" in decayed  # not literally "LayerNorm": decayed
    assert "uniter.img_embeddings.mask_embedding.weight" in decayed
    assert not any(any(nd in n for nd in NO_DECAY) for n in decayed)
    assert "cls.predictions.bias" in {names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_linear_schedule():
    assert warmup_linear(5, 10, 100) == pytest.approx(0.5)
    assert warmup_linear(10, 10, 100) == pytest.approx(1.0)
    assert warmup_linear(55, 10, 100) == pytest.approx(0.5)
    assert warmup_linear(100, 10, 100) == 0.0


def test_env_report_names_each_op(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for op in ("ipot", "sinkhorn", "wra_distance", "varlen_attention"):
        assert op in out
    assert "torch" in out
