"""Bad pre-training input: an error naming the file and key before any work is done, and no earlier run lost."""
import json
from pathlib import Path

import pytest

from uniter_fast.train.config import PretrainConfig
from uniter_fast.train.loop import pretrain


@pytest.mark.parametrize("changes, match", [
    ({"train_batch_size": "4096"}, r"train_batch_size must be a positive integer, got '4096'"),
    ({"num_train_steps": 10.5}, r"num_train_steps must be a positive integer, got 10\.5"),
    ({"gradient_accumulation_steps": 2.0}, r"gradient_accumulation_steps must be a positive integer, got 2\.0"),
    ({"warmup_steps": "10"}, r"warmup_steps must be a non-negative integer, got '10'"),
    ({"learning_rate": "1e-3"}, r"learning_rate must be a number > 0, got '1e-3'"),
    ({"learning_rate": 0}, r"learning_rate must be a number > 0, got 0"),
    ({"betas": [0.9]}, r"betas must be two numbers in \[0, 1\), got \(0\.9,\)"),
    ({"betas": [0.9, 1.5]}, r"betas must be two numbers in \[0, 1\), got \(0\.9, 1\.5\)"),
    ({"adam_eps": -1}, r"adam_eps must be a number > 0, got -1"),
    ({"weight_decay": "0.01"}, r"weight_decay must be a number >= 0, got '0\.01'"),
    ({"grad_norm": "5"}, r"grad_norm must be a number \(-1: no clipping\), got '5'"),
    ({"mrm_prob": 2}, r"mrm_prob must be a probability in \[0, 1\], got 2"),
    ({"itm_neg_prob": "0.5"}, r"itm_neg_prob must be a probability in \[0, 1\], got '0\.5'"),
    ({"itm_ot_lambda": "x"}, r"itm_ot_lambda must be a number >= 0, got 'x'"),
    ({"seed": -1}, r"seed must be a non-negative integer, got -1"),
    ({"prefetch_batches": -1}, r"prefetch_batches must be a non-negative integer, got -1"),
    ({"prefetch_batches": 2.0}, r"prefetch_batches must be a non-negative integer, got 2\.0"),
    ({"prefetch_batches": True}, r"prefetch_batches must be a non-negative integer, got True"),
    ({"conditional_masking": "no"}, r"conditional_masking must be true or false, got 'no'"),
    ({"zero_stage": True}, r"zero_stage True: expected 0, 1, 2 or 3"),
    ({"output_dir": ""}, r"output_dir must be a directory path, got ''"),
    ({"output_dir": None}, r"output_dir must be a directory path, got None"),
    ({"task_phases": {"steps": 5, "tasks": {"itm": 1}}}, r"task_phases must be a list of \{\"steps\": n, \"tasks\""),
    ({"data": {"vocab_size": "400"}}, r"data: vocab_size must be a positive integer, got '400'"),
    ({"eval": {"retrieval_images": 0}}, r"eval: retrieval_images must be a positive integer, got 0"),
    ({"eval": {"val_batches": 0}}, r"eval: val_batches must be a positive integer, got 0"),
    ({"eval": {"valid_steps": "5"}}, r"eval: valid_steps must be a non-negative integer, got '5'"),
    ({"model": {"preset": "huge"}}, r"model: unknown model preset 'huge'; expected one of tiny, base, large"),
    ({"model": {"overrides": {"hidden_sz": 64}}}, r"model: overrides: unknown UNITER config keys \['hidden_sz'\]"),
    ({"model": {"overrides": [64]}}, r"model: overrides must be an object of UNITER config keys, got \[64\]"),
])
def test_bad_config_values_name_the_file_and_key(tmp_path, changes, match):
    """Each used to pass the config and fail later (a raw TypeError/IndexError from torch, numpy or the loop; for
    retrieval_images 0 after the whole run, with nothing written), or pass silently (output_dir "" wrote the run
    into the working directory)."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(changes))
    with pytest.raises(ValueError, match=r"bad\.json: " + match):
        PretrainConfig.from_json(path)


def test_the_real_configs_still_load():
    cfg = PretrainConfig.from_json(Path(__file__).resolve().parents[1] / "configs" / "pretrain-tiny.json")
    assert cfg.betas == (0.9, 0.98) and cfg.eval.retrieval_images == 100


@pytest.mark.parametrize("earlier", ["run", "file"])
def test_an_earlier_run_in_output_dir_is_never_written_over(tmp_path, earlier):
    """pretrain used to write over metrics.json, history.json and ckpt/ of a run already in output_dir (mixing the
    two runs' checkpoints), and into an output_dir that is a file it failed only after training."""
    out = tmp_path / "run"
    if earlier == "run":
        (out / "ckpt").mkdir(parents=True)
        (out / "metrics.json").write_text('{"earlier": true}\n')
    else:
        out.write_text("not a directory\n")
    cfg = PretrainConfig(output_dir=str(out), num_train_steps=1)
    with pytest.raises(FileExistsError, match=f"output_dir {out} "):
        pretrain(cfg, progress=False)
    if earlier == "run":
        assert (out / "metrics.json").read_text() == '{"earlier": true}\n'
        assert sorted(p.name for p in out.iterdir()) == ["ckpt", "metrics.json"]
    else:
        assert out.read_text() == "not a directory\n"


def _world_config(tmp_path, **changes) -> PretrainConfig:
    from uniter_fast.data.synthetic import WorldConfig
    from uniter_fast.train.config import DataOptions

    # seed 5: the held-out split's longest example (36 tokens) is longer than the training split's (29)
    world = WorldConfig(seed=5, num_train_images=40, num_val_images=20, captions_per_image=3, max_regions=14)
    return PretrainConfig(data=DataOptions(world=world, vocab_size=200), output_dir=str(tmp_path / "run"),
                          num_train_steps=2, **changes)


@pytest.mark.parametrize("changes, match", [
    # used to train, then fail in validation at the end with nothing written
    ({"train_batch_size": 256}, r"train_batch_size 256 is too small for the held-out split: .*longest length 36"),
    # used to fail as "TokenBucketSampler: batch_tokens=10 cannot hold ...", naming no config key
    ({"train_batch_size": 10}, r"train_batch_size 10 is too small for the training split"),
])
def test_a_split_that_cannot_be_batched_fails_before_training(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        pretrain(_world_config(tmp_path, **changes), progress=False)


def test_overwrite_writes_into_an_earlier_run(tmp_path):
    """--overwrite (pretrain(overwrite=True)) takes a non-empty output_dir: the run gets past the claim to the next
    check, here a batch size too small, which it would have reached without the earlier run there."""
    cfg = _world_config(tmp_path, train_batch_size=10)
    Path(cfg.output_dir).mkdir()
    (Path(cfg.output_dir) / "metrics.json").write_text("{}\n")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        pretrain(cfg, progress=False)
    with pytest.raises(ValueError, match="train_batch_size 10 is too small"):
        pretrain(cfg, progress=False, overwrite=True)


def test_max_txt_len_that_drops_every_caption_names_the_key(tmp_path):
    """Used to fail as "TokenBucketSampler: lens must be a non-empty 1-D sequence", naming no config key."""
    cfg = _world_config(tmp_path)
    cfg = cfg.replace(data=cfg.data.__class__(world=cfg.data.world, vocab_size=200, max_txt_len=2))
    with pytest.raises(ValueError, match=r"the training split has no caption of at most data\.max_txt_len \(2\)"):
        pretrain(cfg, progress=False)


@pytest.mark.parametrize("split", ["training", "held-out"])
def test_a_caption_without_words_is_refused_before_training_when_mlm_runs(tmp_path, monkeypatch, split):
    """mlm masks at least one word per caption: an empty caption used to stop the run at its first mlm batch (or
    in validation, at the end), losing the training done."""
    import uniter_fast.train.loop as loop

    real, emptied = loop.build_data, []

    def with_an_empty_caption(cfg):
        data = real(cfg)
        corpus = data.train if split == "training" else data.val
        corpus.texts[3] = corpus.texts[3][:0]
        emptied.append(corpus.text_ids[3])
        return data

    monkeypatch.setattr(loop, "build_data", with_an_empty_caption)
    with pytest.raises(ValueError, match=rf"the {split} split's caption '.+' has no words") as refused:
        pretrain(_world_config(tmp_path), progress=False)
    assert repr(emptied[-1]) in str(refused.value)
    monkeypatch.setattr(loop, "_check_captions", lambda data, tasks: None)  # without the check: it fails later
    cfg = _world_config(tmp_path, tasks={"mlm": 1}).replace(num_train_steps=30, output_dir=str(tmp_path / "late"))
    with pytest.raises(ValueError, match=rf"caption {emptied[-1]!r} has no words for mlm to mask"):
        pretrain(cfg, progress=False)
