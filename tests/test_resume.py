"""Resuming pre-training (uniter_fast/train/state.py): a run stopped and resumed trains exactly as one never stopped,
even stopped twice, once while saving; the states kept; what a resumed run may change; the errors for another run's
config, other ranks and damaged states; ZeRO-3's gradients under accumulation."""
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

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
    """output_dir, prefetch_batches, log_every and save_steps: the same batches and updates."""
    metrics = loop.pretrain(stopped.replace(prefetch_batches=1, log_every=2, save_steps=5), progress=False,
                            resume=True)
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
    (path / "rank_0.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"step_4/rank_0.pt cannot be read as a torch file \(UnpicklingError\): "
                                         r"the state in .*step_4 is damaged"):
        loop.pretrain(stopped, progress=False, resume=True)
    (path / "rank_0.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"step_4/rank_0.pt is missing"):
        loop.pretrain(stopped, progress=False, resume=True)
    mark = json.loads((path / state.MARK).read_text())
    (path / state.MARK).write_text(json.dumps({k: v for k, v in mark.items() if k != "drawn"}))
    with pytest.raises(ValueError, match=r"step_4/run_state.json lacks \['drawn'\]: the state in .*step_4 is damaged"):
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


EVAL = {"val_batches": 2, "retrieval_images": 10, "valid_steps": 6}


def _updates_clock(monkeypatch) -> None:
    """The loop's clock reads the number of updates begun (in any run of the test): train_seconds becomes exact."""
    now, real = [0.0], loop.clear_stale_gradients

    def begin_update(engine):  # called once at the start of each update
        now[0] += 1
        real(engine)

    monkeypatch.setattr(loop, "clear_stale_gradients", begin_update)
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: now[0]))


def _last_loss_line(caplog) -> str:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("update 12/12 losses")][-1]


def _states(run: Path) -> list[tuple[int, bool]]:
    """(update, complete) of each state in the run, newest first."""
    return [(update, (path / state.MARK).exists()) for update, path in state.state_dirs(run)]


@pytest.mark.slow
def test_a_run_stopped_twice_once_while_saving_ends_as_one_never_stopped(tmp_path, monkeypatch, caplog):
    """Validation at update 6, which log_every 5 does not divide; states after 4, 6 and 8. Stopped first in update 6
    with the batch thread ahead (state 4), resumed with another thread and log_every, stopped again while rank 0
    writes the history of state 8: that state has no mark, so the second resume takes state 6, written by the first
    resumed run (its batches drawn, tokens and seconds carried from state 4). The run ends with the weights,
    history, metrics (tokens per second too, on a clock counting updates) and last loss line of one never stopped."""
    caplog.set_level(logging.INFO, logger="uniter_fast.train")
    _updates_clock(monkeypatch)
    straight = _config(tmp_path, "straight", log_every=5, eval=EVAL)
    loop.pretrain(straight, progress=False)
    last_line = _last_loss_line(caplog)
    cfg = straight.replace(output_dir=str(tmp_path / "stopped"), prefetch_batches=2)
    with monkeypatch.context() as patch:
        _stop_after(patch, 5)
        with pytest.raises(Stop):
            loop.pretrain(cfg, progress=False)
    run = tmp_path / "stopped"
    (run / "resume" / "step_7").mkdir()  # a state cut short, newer than the one resumed from: not one to keep
    write_text = Path.write_text

    def stop_writing_history_8(path, *args, **kwargs):
        if path.name == "history.json" and path.parent.name == "step_8":
            raise Stop("while saving the state of update 8")
        return write_text(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", stop_writing_history_8)
        with pytest.raises(Stop):
            loop.pretrain(cfg.replace(prefetch_batches=1, log_every=4), progress=False, resume=True)
    # state 8 is cut short; the newest two complete ones (6 and 4) are both kept, the cut-short 7 not counted
    assert _states(run) == [(8, False), (7, False), (6, True), (4, True)]
    caplog.clear()
    loop.pretrain(cfg.replace(prefetch_batches=0, log_every=3), progress=False, resume=True)
    _same_results(tmp_path / "straight", run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["train_seconds"] == 12  # one tick per update
    assert _last_loss_line(caplog) == last_line  # the losses of the updates before the resume count too
    history = json.loads((run / "history.json").read_text())
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 10, 11, 12]
    assert [r["task"] == "validation" for r in history].index(True) == 6  # after update 6's row, in update order
    assert _states(run) == [(8, True), (6, True)]


def test_states_are_the_step_directories_newest_first(tmp_path):
    for name in ("step_3", "step_10", "step_9.old", "step_", "stepx", "step_2"):
        (tmp_path / state.RESUME_DIR / name).mkdir(parents=True)
    assert state.state_dirs(tmp_path) == [(u, tmp_path / state.RESUME_DIR / f"step_{u}") for u in (10, 3, 2)]


def _edit_mark(run: PretrainConfig, edit) -> None:
    mark = state.state_dirs(run.output_dir)[0][1] / state.MARK
    saved = json.loads(mark.read_text())
    edit(saved)
    mark.write_text(json.dumps(saved))


@pytest.mark.parametrize("edit, named", [
    (lambda m: m["config"]["model"]["overrides"].update(hidden_dropout_prob=0.2),
     r"with: model\.overrides\.hidden_dropout_prob \(0\.2 saved, 0\.1 now\)\. A resumed"),
    (lambda m: m["config"]["eval"].pop("valid_steps"), r"with: eval\.valid_steps \(null saved, 0 now\)\. A resumed"),
    (lambda m: m["config"].update(retired_option=1), r"with: retired_option \(1 saved, null now\)\. A resumed"),
])
def test_a_key_changed_deep_in_the_config_or_on_one_side_only_is_named(stopped, edit, named):
    _edit_mark(stopped, edit)
    with pytest.raises(ValueError, match=named):
        loop.pretrain(stopped, progress=False, resume=True)


def test_a_state_saved_by_fewer_ranks_than_this_run_has_is_refused(stopped, monkeypatch):
    real = loop.init_distributed
    monkeypatch.setattr(loop, "init_distributed", lambda: (lambda r, w, d: (r, 2, d))(*real()))
    with pytest.raises(ValueError, match=r"step_4 was saved by 1 ranks and this run has 2: resume with as many"):
        loop.pretrain(stopped, progress=False, resume=True)


def test_a_damaged_mark_or_a_missing_deepspeed_checkpoint_names_the_state(stopped):
    path = state.state_dirs(stopped.output_dir)[0][1]
    (path / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"--resume: .*step_4.* the state is damaged"):
        loop.pretrain(stopped, progress=False, resume=True)
    (path / state.MARK).write_text('{"update": 4')
    with pytest.raises(ValueError, match=r"step_4/run_state.json is not valid JSON \(.+\): the state in .*step_4 is "
                                         r"damaged"):
        loop.pretrain(stopped, progress=False, resume=True)


def test_overwriting_a_run_drops_its_states_so_resume_takes_the_new_runs(stopped, monkeypatch):
    """The earlier run's state after update 4 is newer than the new run's after update 2: left there, --resume
    would take it and refuse the new run's config."""
    new = stopped.replace(learning_rate=1e-3, save_steps=2)
    with monkeypatch.context() as patch:
        _stop_after(patch, 3)
        with pytest.raises(Stop):
            loop.pretrain(new, progress=False, overwrite=True)
    assert _states(Path(new.output_dir)) == [(2, True)]
    mark = json.loads((state.newest_complete(new.output_dir) / state.MARK).read_text())
    assert mark["config"]["learning_rate"] == 1e-3


@pytest.mark.slow
def test_zero3_accumulates_gradients_over_micro_batches_as_zero2(tmp_path):
    """Stale gradients are cleared once per update, not per micro-batch: under ZeRO-3 the second micro-batch's
    gradient adds to the first's, so two micro-batches per update give ZeRO-2's losses (cleared per micro-batch,
    the first micro-batch's gradient would be lost)."""
    histories = []
    for stage in (3, 2):
        path = pretrain_config_file(tmp_path, zero_stage=stage, num_train_steps=4, log_every=2,
                                    gradient_accumulation_steps=2, output_dir=str(tmp_path / f"zero{stage}"))
        loop.pretrain(PretrainConfig.from_json(path), progress=False)
        histories.append(json.loads((tmp_path / f"zero{stage}" / "history.json").read_text()))
    assert len({r["task"] for r in histories[0]}) > 1
    # the same losses up to summation order (the stages add the two micro-batches' gradients in other orders)
    assert [r["loss"] for r in histories[0]] == pytest.approx([r["loss"] for r in histories[1]], rel=1e-5)
