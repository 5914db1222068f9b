"""Details of the `uniter-fast` command (what each flag hands to the run or converter, what it prints, how bad input
is reported), the plots (read back from the saved figure), `uniter-fast env`, files.replacing and TaskSampler.

The pre-training and the converters are replaced by recorders: these tests check the command, not the work."""
from __future__ import annotations

import json
import logging
import os

import matplotlib.figure
import numpy as np
import pytest
import torch

import uniter_fast.env as env
import uniter_fast.train.loop as loop
from helpers import random_batch, tiny_config
from uniter_fast.cli import main
from uniter_fast.data import convert
from uniter_fast.files import replacing
from uniter_fast.model import UniterModel
from uniter_fast.train.tasks import TaskSampler
from uniter_fast.viz.attention import SampleAttention, attention_maps, plot_attention
from uniter_fast.viz.curves import plot_curves

METRICS = {"validation": {"mlm": {"acc": 0.5}}, "zero_shot_retrieval": {"ir_r1": 0.25}, "chance": {"mlm_acc": 0.1}}
# LXMERT's TSV columns, as docs/converters.md lists them
LXMERT_COLUMNS = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
                  "boxes", "features"]


# ---- shared set-up ----------------------------------------------------------------------------------------------

def _pretrain_recorder(monkeypatch, tmp_path, result=None, **config) -> tuple[str, list]:
    """A config file (output_dir under tmp_path, plus `config`) and the calls of a stand-in pretrain(), which
    returns METRICS, or raises `result` when that is an exception."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "run"), **config}))
    calls = []

    def fake_pretrain(cfg, progress, overwrite, resume):
        calls.append({"cfg": cfg, "progress": progress, "overwrite": overwrite, "resume": resume})
        if isinstance(result, Exception):
            raise result
        return METRICS

    monkeypatch.setattr(loop, "pretrain", fake_pretrain)
    return str(path), calls


def _converter_recorder(monkeypatch) -> list:
    """Stand-ins for the region converters: each call is recorded as (name, args, kwargs)."""
    calls = []
    for name in ("convert_image_db", "convert_tsv", "convert_npz_dir"):
        def fake(*args, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return convert.ConversionSummary(destination=str(args[1]), images=1, regions=1)
        monkeypatch.setattr(convert, name, fake)
    return calls


def _saved_figures(monkeypatch) -> list:
    """Figures as they are saved; their axes, images, lines and labels are read back afterwards."""
    saved, original = [], matplotlib.figure.Figure.savefig

    def saving(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", saving)
    return saved


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- uniter-fast pretrain ---------------------------------------------------------------------------------------

def test_pretrain_flags_reach_the_run_including_a_zero_prefetch(tmp_path, monkeypatch):
    """--output-dir, --compile and --prefetch-batches 0 (make no batches ahead: a falsy value, still given) override
    the config; without flags the config's values stand, progress on, overwrite and resume off; --resume reaches
    the run."""
    path, calls = _pretrain_recorder(monkeypatch, tmp_path, prefetch_batches=3)
    assert main(["pretrain", "--config", path]) == 0
    assert main(["pretrain", "--config", path, "--output-dir", str(tmp_path / "other"), "--compile", "aot_eager",
                 "--prefetch-batches", "0", "--no-progress", "--overwrite"]) == 0
    assert main(["pretrain", "--config", path, "--resume"]) == 0
    default, flagged, resumed = calls
    assert (default["cfg"].output_dir, default["cfg"].compile, default["cfg"].prefetch_batches) == \
        (str(tmp_path / "run"), None, 3)
    assert (default["progress"], default["overwrite"], default["resume"]) == (True, False, False)
    assert (resumed["overwrite"], resumed["resume"]) == (False, True)
    assert (flagged["cfg"].output_dir, flagged["cfg"].compile, flagged["cfg"].prefetch_batches) == \
        (str(tmp_path / "other"), "aot_eager", 0)
    assert (flagged["progress"], flagged["overwrite"]) == (False, True)


def test_pretrain_prints_the_json_summary_and_where_it_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    path, _ = _pretrain_recorder(monkeypatch, tmp_path)
    assert main(["pretrain", "--config", path, "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary, _, wrote = out.rpartition("}\n")
    assert json.loads(summary + "}") == {"validation": {"mlm": {"acc": 0.5}}, "zero_shot_retrieval": {"ir_r1": 0.25}}
    run = tmp_path / "run"
    assert wrote == f"wrote {run}/metrics.json, {run}/curves.png and the checkpoint in {run}/ckpt\n"
    # another rank of a launcher's run prints nothing: rank 0 reports once
    monkeypatch.setenv("RANK", "1")
    assert main(["pretrain", "--config", path, "--no-progress"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("flag", [["--local_rank=1"], ["--local-rank", "0"]])
def test_pretrain_accepts_the_launchers_local_rank_after_the_subcommand(tmp_path, monkeypatch, flag):
    """`deepspeed --module uniter_fast.cli pretrain ...` appends --local_rank=N after the command's own flags."""
    path, calls = _pretrain_recorder(monkeypatch, tmp_path)
    assert main(["pretrain", "--config", path, *flag]) == 0 and len(calls) == 1


@pytest.mark.parametrize("fails, world, expected", [(False, 1, ["destroy"]), (False, 2, ["barrier", "destroy"]),
                                                    (True, 2, ["destroy"])])
def test_pretrain_destroys_the_process_group_after_the_run_even_a_failed_one(tmp_path, monkeypatch, fails, world,
                                                                             expected):
    """Several ranks wait for each other before tearing the group down; a failed run does not wait (the other
    ranks may never arrive) but still destroys its group."""
    import deepspeed.comm
    import torch.distributed as dist

    path, _ = _pretrain_recorder(monkeypatch, tmp_path, result=ValueError("bad") if fails else None)
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    monkeypatch.setattr(deepspeed.comm, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(deepspeed.comm, "destroy_process_group", lambda: calls.append("destroy"))
    assert main(["pretrain", "--config", path]) == int(fails)
    assert calls == expected


def test_a_key_error_is_reported_as_its_message_with_its_notes(tmp_path, monkeypatch, capsys):
    """A KeyError (a missing image, a missing key) is bad input too: its message without the quotes str(KeyError)
    adds, then each note on its own indented line; exit status 1, no traceback."""
    err = KeyError("data.train_corpus: 2 images its texts refer to are not in the region store")
    err.add_note("nothing was written")
    path, _ = _pretrain_recorder(monkeypatch, tmp_path, result=err)
    assert main(["pretrain", "--config", path]) == 1
    assert capsys.readouterr().err == ("uniter-fast pretrain: error: data.train_corpus: 2 images its texts refer to "
                                       "are not in the region store\n  nothing was written\n")


def test_usage_errors_exit_with_status_2(tmp_path, monkeypatch):
    """No command at all, or a precision outside fp32/bf16/fp16: argparse's usage error (status 2), not a crash."""
    path, calls = _pretrain_recorder(monkeypatch, tmp_path)
    for argv in ([], ["pretrain", "--config", path, "--precision", "fp8"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
    assert calls == []


def test_the_command_quiets_deepspeeds_loggers(tmp_path, monkeypatch):
    path, _ = _pretrain_recorder(monkeypatch, tmp_path)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    assert main(["pretrain", "--config", path]) == 0
    assert [logging.getLogger(n).level for n in ("DeepSpeed", "deepspeed", "torch.distributed")] == \
        [logging.WARNING] * 3


# ---- uniter-fast convert ----------------------------------------------------------------------------------------

def test_convert_defaults_are_the_originals_region_rule(tmp_path, monkeypatch, capsys):
    """conf > 0.2, 10..100 boxes (the original's rule); npz applies it by default, an image DB and a TSV decide per
    source ("auto"); a TSV's columns default to LXMERT's, its features to float32."""
    calls = _converter_recorder(monkeypatch)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    for source in ("imagedb", "tsv", "npz"):
        assert main(["convert", source, src, dst]) == 0
    assert f"wrote 1 images, 1 regions (1.0 per image) to {dst}" in capsys.readouterr().out
    kwargs = {name: kw for name, _, kw in calls}
    for name, boxes in (("convert_image_db", "auto"), ("convert_tsv", "auto"), ("convert_npz_dir", "rule")):
        kw = kwargs[name]
        assert (kw["boxes"], kw["rule"], kw["progress"]) == (boxes, convert.RegionRule(0.2, 100, 10), True), name
        assert (kw["append"], kw["shard_bytes"]) == (False, None), name
    assert (kwargs["convert_image_db"]["nbb_json"], kwargs["convert_image_db"]["num_bb"]) == (None, None)
    assert list(kwargs["convert_tsv"]["fields"]) == LXMERT_COLUMNS
    assert kwargs["convert_tsv"]["feature_dtype"] == "float32"


def test_convert_options_reach_the_converter(tmp_path, monkeypatch):
    calls = _converter_recorder(monkeypatch)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    store = ["--append", "--shard-bytes", "4096", "--conf-th", "0.5", "--max-bb", "50", "--min-bb", "5",
             "--no-progress"]
    assert main(["convert", "npz", src, dst, "--boxes", "keep", *store]) == 0
    assert main(["convert", "imagedb", src, dst, "--nbb", "counts.json", "--num-bb", "36", *store]) == 0
    assert main(["convert", "tsv", src, dst, "--fields", "img_id, img_w ,img_h", "--feature-dtype", "float16",
                 *store]) == 0
    (_, npz_args, npz), (_, _, db), (_, tsv_args, tsv) = calls
    assert npz_args == (src, dst)
    assert tsv_args == ([src], dst)  # nargs="+": a list of files
    for kw in (npz, db, tsv):
        assert (kw["append"], kw["shard_bytes"], kw["rule"], kw["progress"]) == \
            (True, 4096, convert.RegionRule(conf_th=0.5, max_bb=50, min_bb=5), False)
    assert npz["boxes"] == "keep"
    assert (db["nbb_json"], db["num_bb"]) == ("counts.json", 36)
    assert (tsv["fields"], tsv["feature_dtype"]) == (["img_id", "img_w", "img_h"], "float16")  # spaces stripped


@pytest.mark.parametrize("flag, boxes", [("--all-boxes", "rule"), ("--keep-boxes", "keep")])
def test_box_shorthands_choose_the_rule_or_every_box(tmp_path, monkeypatch, flag, boxes):
    calls = _converter_recorder(monkeypatch)
    for source in ("imagedb", "tsv", "npz"):
        assert main(["convert", source, str(tmp_path / "s"), str(tmp_path / "d"), flag]) == 0
    assert [kw["boxes"] for _, _, kw in calls] == [boxes] * 3


# ---- plots --------------------------------------------------------------------------------------------------------

def test_attention_maps_give_each_sample_its_own_square_map_and_text_length():
    batch, texts, regions = random_batch(4, seed=3)
    cfg = tiny_config(backend="torch")
    maps = attention_maps(UniterModel(cfg), batch)
    assert len(maps) == 4
    for b, sample in enumerate(maps):
        length = len(texts[b]) + (0 if regions[b] is None else len(regions[b][0]))
        assert sample.text_len == len(texts[b]), b
        assert sample.probs.dtype == torch.float32
        assert sample.probs.shape == (cfg.num_hidden_layers, cfg.num_attention_heads, length, length), b
        torch.testing.assert_close(sample.probs.sum(-1), torch.ones(sample.probs.shape[:-1]))  # softmax rows
    assert len({m.probs.shape[-1] for m in maps}) > 1  # the batch does mix lengths


def test_attention_plot_shows_at_most_16_heads_in_rows_of_four(tmp_path, monkeypatch):
    saved = _saved_figures(monkeypatch)
    plot_attention(SampleAttention(torch.rand(1, 20, 4, 4), text_len=2), tmp_path / "many.png")
    plot_attention(SampleAttention(torch.rand(1, 6, 4, 4), text_len=2), tmp_path / "six.png")
    many, six = saved
    assert len(many.axes) == 16 and all(len(ax.images) == 1 for ax in many.axes)
    assert many.axes[0].get_subplotspec().get_geometry()[:2] == (4, 4)
    assert six.axes[0].get_subplotspec().get_geometry()[:2] == (2, 4)
    # six heads on a 2 x 4 grid: the last two panels are blank and hidden
    assert [len(ax.images) for ax in six.axes] == [1] * 6 + [0] * 2
    assert [ax.axison for ax in six.axes] == [True] * 6 + [False] * 2
    assert _is_png(tmp_path / "many.png") and _is_png(tmp_path / "six.png")


def test_attention_plot_labels_and_borders(tmp_path, monkeypatch):
    """The text/region border on both axes, the layer's number (not -1), token labels for the text rows only, and
    a colour scale that starts at probability 0."""
    saved = _saved_figures(monkeypatch)
    sample = SampleAttention(torch.rand(3, 1, 5, 5) * 0.5 + 0.2, text_len=3)
    plot_attention(sample, tmp_path / "map.png", tokens=["[CLS]", "dog", "[SEP]", "unused", "extra"])
    (ax,) = saved[0].axes
    assert ax.get_title() == "layer 2, head 0"
    borders = {(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in ax.lines}
    assert borders == {((0, 1), (2.5, 2.5)), ((2.5, 2.5), (0, 1))}  # axhline and axvline at 2.5
    labels = ["[CLS]", "dog", "[SEP]", "r0", "r1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert ax.images[0].norm.vmin == 0.0


def test_attention_plot_labels_tokens_up_to_40_rows(tmp_path, monkeypatch):
    saved = _saved_figures(monkeypatch)
    for length in (40, 41):
        plot_attention(SampleAttention(torch.rand(1, 1, length, length), text_len=2), tmp_path / f"{length}.png",
                       tokens=["[CLS]", "[SEP]"])
    labelled, crowded = (fig.axes[0] for fig in saved)
    assert [t.get_text() for t in labelled.get_yticklabels()][:3] == ["[CLS]", "[SEP]", "r0"]
    assert len(labelled.get_xticks()) == 40 and len(crowded.get_xticks()) == 0


def _curves(monkeypatch, tmp_path, history, **kwargs):
    """plot_curves' saved figure: ({(axes title, task): (x, y)}, loss axes, accuracy axes)."""
    saved = _saved_figures(monkeypatch)
    plot_curves(history, tmp_path / "curves.png", **kwargs)
    assert _is_png(tmp_path / "curves.png")
    loss_ax, acc_ax = saved[0].axes
    lines = {(ax.get_title().split(" (")[0], line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for ax in (loss_ax, acc_ax) for line in ax.lines}
    return lines, loss_ax, acc_ax


def test_curves_of_a_short_run_average_over_a_fifth_of_its_updates(tmp_path, monkeypatch):
    """12 updates with window 10: a window of 12 // 5 = 2 updates; 3 updates: no averaging (a window of one)."""
    history = [{"step": s, "task": "mlm", "loss": float(s * s)} for s in range(1, 13)]
    history += [{"step": s, "task": "itm", "loss": float(s)} for s in (1, 5, 9)]
    lines, _, _ = _curves(monkeypatch, tmp_path, history, window=10)
    x, y = lines[("training loss", "mlm")]
    assert x == list(range(2, 13))
    np.testing.assert_allclose(y, [((s - 1) ** 2 + s * s) / 2 for s in range(2, 13)])
    assert lines[("training loss", "itm")] == ([1, 5, 9], [1.0, 5.0, 9.0])


def test_curves_default_window_is_10_updates(tmp_path, monkeypatch):
    history = [{"step": s, "task": "mlm", "loss": float(s)} for s in range(1, 101)]
    lines, loss_ax, _ = _curves(monkeypatch, tmp_path, history)
    x, y = lines[("training loss", "mlm")]
    assert x == list(range(10, 101))
    np.testing.assert_allclose(y, np.arange(10, 101) - 4.5)  # the mean of s-9 .. s
    assert loss_ax.get_xlabel() == "update"


def test_curves_legend_lists_tasks_alphabetically(tmp_path, monkeypatch):
    """The same task gets the same colour whichever task a run happened to draw first."""
    history = [{"step": s, "task": task, "loss": 1.0, "acc": 0.5} for s in range(1, 11) for task in ("mrfr", "itm")]
    _, loss_ax, acc_ax = _curves(monkeypatch, tmp_path, history)
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["itm", "mrfr"]
    assert [t.get_text() for t in acc_ax.get_legend().get_texts()] == ["itm", "mrfr"]


@pytest.mark.parametrize("losses, accs, scale", [
    ([1.0, 0.5, 0.25, 0.0], [0.5] * 4, "symlog"),     # a loss of exactly 0 has no place on a log axis
    ([1.0, 0.5, 0.25, 0.125], [0.0] * 4, "log"),      # an accuracy of 0 does not concern the loss axis
    ([1.0] * 4 + [-0.2] + [1.0] * 5, [0.5] * 10, "log"),  # the dip averages out (0.4): every plotted point is > 0
])
def test_curves_loss_axis_is_log_only_when_every_plotted_loss_is_positive(tmp_path, monkeypatch, losses, accs, scale):
    history = [{"step": s, "task": "itm", "loss": loss, "acc": acc} for s, (loss, acc) in enumerate(zip(losses, accs))]
    lines, loss_ax, _ = _curves(monkeypatch, tmp_path, history, window=2)
    assert (min(lines[("training loss", "itm")][1]) > 0) == (scale == "log")
    assert loss_ax.get_yscale() == scale


# ---- uniter-fast env ----------------------------------------------------------------------------------------------

def test_versions_of_a_broken_or_versionless_install(monkeypatch):
    """A module that fails to import with any error is reported with the error's type and first line (80 characters
    at most); one without __version__ as installed."""
    def fake_import(name):
        if name == "versionless":
            return object()
        raise RuntimeError(name * 100 + "\nsecond line")

    monkeypatch.setattr(env.importlib, "import_module", fake_import)
    assert env._version("versionless") == "installed"
    assert env._version("x") == f"unavailable (RuntimeError: {'x' * 80})"


def test_an_unknown_backend_is_reported_as_invalid_for_each_op(monkeypatch):
    monkeypatch.setenv("UNITER_FAST_BACKEND", "cuda")
    report = env.op_backends(torch.device("cpu"))
    assert {chosen for chosen, _ in report.values()} == {"invalid"} and len(report) == 4


def test_env_report_lists_versions_device_interpreter_and_xformers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lines = env.environment_report().splitlines()
    names = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert names == ["python", "torch", "triton", "deepspeed", "numpy", "tokenizers", "safetensors", "xformers", "ot",
                     "device", "backend"]
    assert f"(CUDA build {torch.version.cuda or 'none'})" in lines[1]
    assert f"device      cpu ({os.cpu_count()} cores); no CUDA device" in lines
    assert lines[names.index("backend")].endswith(", TRITON_INTERPRET=1")
    xformers = lines[-1].split(maxsplit=2)
    # no CUDA device: xformers cannot run, and the row gives the reason rather than the note on when it may
    assert xformers[:2] == ["xformers", "-"] and not xformers[2].startswith("backend=xformers selects")


# ---- files.replacing --------------------------------------------------------------------------------------------

def test_replacing_a_file_whose_name_ends_in_tmp(tmp_path):
    """The temporary file must not be the file itself: replacing `x.tmp` writes it, it does not delete it."""
    path = tmp_path / "x.tmp"
    path.write_bytes(b"old")
    with replacing(path) as tmp:
        assert tmp != path
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"


def test_replacing_with_nothing_written_is_an_error_and_keeps_the_file(tmp_path):
    """A block that never wrote its file must not pass for a successful write."""
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        with replacing(path):
            pass
    assert path.read_bytes() == b"old"


# ---- TaskSampler ----------------------------------------------------------------------------------------------------

def test_task_sequences_of_neighbouring_seeds_and_distant_updates_are_unrelated():
    """Seed s+1 is not seed s shifted by one update, and the sequence does not repeat after some period."""
    mix = {"itm": 1, "mlm": 1, "mrfr": 1, "mrckl": 1}
    first, second = TaskSampler(mix, 0), TaskSampler(mix, 1)
    seq = [first.task_for(u) for u in range(1, 201)]
    assert seq != [second.task_for(u) for u in range(0, 200)]
    for start in (1000, 1024, 4096, 65536):
        assert seq != [first.task_for(u) for u in range(start + 1, start + 201)], start
