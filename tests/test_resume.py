"""Resuming pre-training (uniter_fast/train/state.py): a run stopped and resumed trains exactly as one never stopped."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import pretrain_config_file
from uniter_fast.cli import main
from uniter_fast.train import loop, state
from uniter_fast.train.batches import TaskStreams
from uniter_fast.train.config import EvalOptions, PretrainConfig

# dropout on, so the resumed run matches only if each rank's random state is restored too
MODEL = {"preset": "tiny", "overrides": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                         "intermediate_size": 128, "hidden_dropout_prob": 0.1,
                                         "attention_probs_dropout_prob": 0.1}}


class Stop(Exception):
    """The pre-emption a resumable state guards against."""


def _stop_after(monkeypatch, batches: int) -> None:
    """Training stops while asking for batch `batches` + 1."""
    made, real = [0], TaskStreams.make

    def make(self, plan):
        made[0] += 1
        if made[0] > batches:
            raise Stop(f"stopped at batch {made[0]}")
        return real(self, plan)

    monkeypatch.setattr(TaskStreams, "make", make)


def _config(tmp_path, name: str, **changes) -> PretrainConfig:
    changes = {"model": MODEL, "num_train_steps": 12, "warmup_steps": 3, "save_steps": 4, "log_every": 3,
               **changes, "output_dir": str(tmp_path / name)}
    return PretrainConfig.from_json(pretrain_config_file(tmp_path, **changes))


def _weights(run) -> dict:
    return torch.load(run / "ckpt" / "model_step_12.pt", weights_only=True)


def _same_results(straight, resumed) -> None:
    assert json.loads((resumed / "history.json").read_text()) == json.loads((straight / "history.json").read_text())
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (straight, resumed))
    for key in ("train_seconds", "train_tokens_per_second"):
        ma.pop(key), mb.pop(key)
    assert ma == mb


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_run_stopped_and_resumed_trains_exactly_as_one_never_stopped(tmp_path, monkeypatch, accumulate):
    """Stopped in update 7, the run resumes from its state after update 4 (save_steps 4; the one after 8 is never
    written), and ends with the straight run's weights, history and metrics, bit for bit."""
    straight = _config(tmp_path, "straight", gradient_accumulation_steps=accumulate)
    loop.pretrain(straight, progress=False)
    cfg = straight.replace(output_dir=str(tmp_path / "stopped"))
    with monkeypatch.context() as patch:
        _stop_after(patch, 6 * accumulate)
        with pytest.raises(Stop):
            loop.pretrain(cfg, progress=False)
    assert [u for u, _ in state.state_dirs(tmp_path / "stopped")] == [4]
    assert not (tmp_path / "stopped" / "metrics.json").exists()
    loop.pretrain(cfg, progress=False, resume=True)
    _same_results(tmp_path / "straight", tmp_path / "stopped")
    # the states a run keeps: the newest two complete ones (after updates 4 and 8)
    assert [u for u, _ in state.state_dirs(tmp_path / "straight")] == [8, 4]


@pytest.mark.slow
@pytest.mark.parametrize("precision, stage", [("fp16", 2), ("bf16", 3)])
def test_mixed_precision_resumes_exactly(tmp_path, monkeypatch, precision, stage):
    """DeepSpeed's fp16 optimizer under ZeRO-2 and its bf16 partitions under ZeRO-3 come back from the state too.
    (The loss scale stays at its first value in so short a run: whether it comes back is not checked here.)"""
    straight = _config(tmp_path, "straight", precision=precision, zero_stage=stage, num_train_steps=8, save_steps=3)
    loop.pretrain(straight, progress=False)
    cfg = straight.replace(output_dir=str(tmp_path / "stopped"))
    with monkeypatch.context() as patch:
        _stop_after(patch, 4)
        with pytest.raises(Stop):
            loop.pretrain(cfg, progress=False)
    loop.pretrain(cfg, progress=False, resume=True)
    history = json.loads((tmp_path / "stopped" / "history.json").read_text())
    assert [r["step"] for r in history] == list(range(1, 9))
    a = torch.load(tmp_path / "straight" / "ckpt" / "model_step_8.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "ckpt" / "model_step_8.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert history == json.loads((tmp_path / "straight" / "history.json").read_text())


@pytest.mark.slow
def test_resuming_draws_the_batches_a_run_never_stopped_draws(tmp_path, monkeypatch):
    """The data position: each batch the resumed run trains on is the one the straight run trained on at that
    update (tasks, examples and masks), with the validation at update 6 saving the state resumed from."""
    seen: dict[str, list] = {"straight": [], "stopped": []}
    real = TaskStreams.make

    def recording(name):
        def make(self, plan):
            seen[name].append(plan)
            return real(self, plan)
        return make

    cfg = _config(tmp_path, "straight", save_steps=0, eval={"val_batches": 2, "retrieval_images": 10,
                                                             "valid_steps": 6})
    monkeypatch.setattr(TaskStreams, "make", recording("straight"))
    loop.pretrain(cfg, progress=False)
    monkeypatch.setattr(TaskStreams, "make", real)
    stopped = cfg.replace(output_dir=str(tmp_path / "stopped"))
    with monkeypatch.context() as patch:
        _stop_after(patch, 9)
        with pytest.raises(Stop):
            loop.pretrain(stopped, progress=False)
    monkeypatch.setattr(TaskStreams, "make", recording("stopped"))
    loop.pretrain(stopped, progress=False, resume=True)
    assert seen["stopped"] == seen["straight"][6:]
    assert len({p.task for p in seen["straight"]}) > 1  # the tasks' streams interleave
    assert (tmp_path / "stopped" / "ckpt" / "model_step_6.pt").exists()
    _same_results(tmp_path / "straight", tmp_path / "stopped")


def test_a_run_keeps_its_newest_two_complete_states(tmp_path):
    cfg = _config(tmp_path, "run", num_train_steps=5, save_steps=1)
    (tmp_path / "run" / "resume" / "step_0").mkdir(parents=True)  # cut short by an earlier stop: no run_state.json
    loop.pretrain(cfg, progress=False, overwrite=True)
    assert [u for u, _ in state.state_dirs(tmp_path / "run")] == [4, 3]  # none after the last update
    assert all((path / state.MARK).exists() for _, path in state.state_dirs(tmp_path / "run"))


def test_resuming_needs_a_complete_state_and_says_where_it_looked(tmp_path):
    cfg = _config(tmp_path, "run")
    with pytest.raises(FileNotFoundError, match=r"run/resume holds no state to resume from; .*save_steps"):
        loop.pretrain(cfg, progress=False, resume=True)
    (tmp_path / "run" / "resume" / "step_4").mkdir(parents=True)  # cut short: no run_state.json
    with pytest.raises(FileNotFoundError, match=r"holds incomplete states \[.*step_4'\]"):
        loop.pretrain(cfg, progress=False, resume=True)


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--resume continues the run .* --overwrite starts a new one"):
        loop.pretrain(_config(tmp_path, "run"), progress=False, resume=True, overwrite=True)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped in update 6 with its state after update 4: each test gets a copy of its output_dir."""
    tmp = tmp_path_factory.mktemp("stopped")
    cfg = _config(tmp, "run", num_train_steps=6)
    with pytest.MonkeyPatch.context() as patch:
        _stop_after(patch, 5)
        with pytest.raises(Stop):
            loop.pretrain(cfg, progress=False)
    return cfg


@pytest.fixture
def stopped(stopped_run, tmp_path):
    shutil.copytree(stopped_run.output_dir, tmp_path / "run")
    return stopped_run.replace(output_dir=str(tmp_path / "run"))


@pytest.mark.parametrize("changes, named", [
    ({"learning_rate": 1e-3}, r"learning_rate \(0.002 saved, 0.001 now\)"),
    ({"num_train_steps": 8, "seed": 1}, r"num_train_steps \(6 saved, 8 now\); seed \(42 saved, 1 now\)\. A resumed"),
    ({"eval": EvalOptions(val_batches=3, retrieval_images=10)}, r"eval.val_batches \(2 saved, 3 now\)"),
])
def test_a_changed_config_is_refused_naming_each_changed_key(stopped, changes, named):
    with pytest.raises(ValueError, match=r"--resume: this config differs from the one .*step_4 was saved with: "
                                         + named):
        loop.pretrain(stopped.replace(**changes), progress=False, resume=True)


def test_what_does_not_change_the_run_may_change_on_resume(stopped):
    """output_dir, prefetch_batches and log_every: the same batches and updates."""
    metrics = loop.pretrain(stopped.replace(prefetch_batches=1, log_every=2), progress=False, resume=True)
    assert metrics["num_train_steps"] == 6
    history = json.loads((Path(stopped.output_dir) / "history.json").read_text())
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]


def test_a_state_saved_by_other_ranks_is_refused(stopped):
    mark = state.state_dirs(stopped.output_dir)[0][1] / state.MARK
    saved = json.loads(mark.read_text())
    mark.write_text(json.dumps({**saved, "world_size": 2}))
    with pytest.raises(ValueError, match=r"step_4 was saved by 2 ranks and this run has 1: resume with as many"):
        loop.pretrain(stopped, progress=False, resume=True)


def test_a_damaged_state_names_its_file(stopped):
    path = state.state_dirs(stopped.output_dir)[0][1]
    (path / "history.json").write_text("[{")
    with pytest.raises(ValueError, match=r"step_4/history.json is not valid JSON"):
        loop.pretrain(stopped, progress=False, resume=True)
    (path / "rank_0.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"step_4/rank_0.pt is missing"):
        loop.pretrain(stopped, progress=False, resume=True)


def test_a_changed_task_sampler_is_caught_by_the_batches_drawn(stopped, monkeypatch):
    mark = state.state_dirs(stopped.output_dir)[0][1] / state.MARK
    saved = json.loads(mark.read_text())
    assert sum(saved["drawn"].values()) == 4  # one batch per update
    mark.write_text(json.dumps({**saved, "drawn": {"itm": 4}}))
    with pytest.raises(ValueError, match=r"the tasks of updates 1-4 drawn again give .* the saved run trained on "
                                         r"\{'itm': 4\}"):
        loop.pretrain(stopped, progress=False, resume=True)


def test_the_command_line_resumes(stopped, tmp_path, capsys):
    config = tmp_path / "resume.json"
    config.write_text(json.dumps(stopped.to_dict(), default=list))
    assert main(["pretrain", "--config", str(config), "--resume", "--no-progress"]) == 0
    assert "zero_shot_retrieval" in capsys.readouterr().out
    assert main(["pretrain", "--config", str(config), "--resume", "--overwrite"]) == 1
    assert "give one" in capsys.readouterr().err
