"""Converter details the broad tests in test_convert.py leave open (found by mutation testing of
uniter_fast/data/convert): the original's region-count rule at its edges, each per-record check naming the source
and the record, what every region converter passes on to the store (boxes, append, shard_bytes), the order images
and texts are written in, the summary lines, refused pickles, and the synthetic export's val corpus and paths.

Sources are built with test_convert.py's builders; expected values come from the arrays written, the original's
definitions (reference/uniter.md 4.2, 4.3) and hand computation."""
from __future__ import annotations

import base64
import json
import os
import re

import msgpack
import numpy as np
import pytest

from test_convert import (
    D, META, _b64, _image_db_error, fake_image, make_image_db, make_text_db, msgpack_numpy_dumps, npz_dumps,
    tsv_line, write_lmdb,
)
from uniter_fast.data.convert import (
    LXMERT_FIELDS, ConversionError, ConversionSummary, RegionRule, convert_image_db, convert_npz_dir,
    convert_text_db, convert_tsv, export_synthetic,
)
from uniter_fast.data.convert.common import apply_rule, check_regions
from uniter_fast.data.synthetic import WorldConfig, make_world
from uniter_fast.data.text_corpus import read_text_corpus
from uniter_fast.train.config import DataOptions, PretrainConfig

RegionStore = pytest.importorskip("uniter_fast.data.region_store").RegionStore

KINDS = ("imagedb", "npz", "tsv")


@pytest.fixture
def rng():
    return np.random.default_rng(1)


# ---- the region-count rule and one image's checks -----------------------------------------------------------

def test_region_rule_defaults_are_the_originals_th02_max100_min10():
    rule = RegionRule()
    assert (rule.conf_th, rule.max_bb, rule.min_bb) == (0.2, 100, 10)
    assert rule.count(np.full(15, 0.25)) == 15   # all 15 are above 0.2


def test_region_rule_takes_a_fixed_count_and_refuses_zero_boxes():
    # the NLVR2 extractor sets MIN_BOXES = MAX_BOXES (reference 4.1): min_bb == max_bb is a fixed count
    assert RegionRule(min_bb=36, max_bb=36).count(np.full(50, 0.1)) == 36
    with pytest.raises(ValueError, match="min_bb=0"):
        RegionRule(min_bb=0)


def test_apply_rule_keeps_the_stored_order_among_equal_confidences(rng):
    # the original slices the first nbb rows of a record sorted by confidence: equal confidences keep row order
    arrays = fake_image(rng, 60)
    arrays["conf"] = rng.choice([0.3, 0.6, 0.9], size=(60, 1)).astype(np.float16)
    conf = arrays["conf"][:, 0].tolist()
    regions = apply_rule(check_regions(arrays, "src", "img"), RegionRule(conf_th=0.5, min_bb=1))
    expected = sorted(range(60), key=lambda i: -conf[i])[:sum(c > 0.5 for c in conf)]   # Python's sort is stable
    np.testing.assert_array_equal(regions.features, arrays["features"][expected])


def _set(name, value):
    return lambda arrays: arrays.update({name: value})


def _poke(name, index, value):
    return lambda arrays: arrays[name].__setitem__(index, value)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.pop("features"), r"no 'features' array \(has \['conf', 'norm_bb', 'soft_labels'\]\)"),
    (_set("features", np.zeros((0, D), np.float16)), r"features must be \(n, D\) with n >= 1, got shape \(0, 16\)"),
    (_set("features", np.zeros((12, 0), np.float16)), r"features must be \(n, D\) with n >= 1, got shape \(12, 0\)"),
    (_set("features", np.ones((12, D), np.int32)), r"features must be floating point, got int32"),
    (_set("norm_bb", np.zeros((11, 6), np.float16)), r"norm_bb must be \(12, 6\) or \(12, 7\), got \(11, 6\)"),
    (_set("soft_labels", np.zeros((11, 9), np.float16)), r"soft_labels must be \(12, C\), got \(11, 9\)"),
    (_set("soft_labels", np.zeros((12, 0), np.float16)), r"soft_labels must be \(12, C\), got \(12, 0\)"),
    (_poke("soft_labels", (2, 3), np.nan), r"soft_labels holds NaN or infinite values$"),
    (_poke("norm_bb", (5, 0), np.inf), r"norm_bb holds NaN or infinite values$"),
])
def test_check_regions_names_the_source_the_record_and_the_problem(rng, change, match):
    arrays = fake_image(rng, 12)
    change(arrays)
    with pytest.raises(ConversionError, match=r"^src\.npz: image 'x': " + match):
        check_regions(arrays, "src.npz", "image 'x'")


def test_summary_lines_give_regions_per_image_the_rule_and_the_notes():
    summary = ConversionSummary("out", images=4, regions=10, rule_applied=3, soft_labels=False, notes=["a note"])
    assert summary.lines() == ["wrote 4 images, 10 regions (2.5 per image) to out",
                               "soft labels: none (the source has none)", "region-count rule applied to 3 images",
                               "a note"]


# ---- what every region converter shares ---------------------------------------------------------------------

def _region_source(kind: str, root, rng, prefix: str = "img", count: int = 3, n: int = 12):
    """(converter, source path): `count` images of n boxes, named prefix_i, in a source of `kind`."""
    if kind == "imagedb":
        return convert_image_db, make_image_db(root, {f"{prefix}_{i}.npz": fake_image(rng, n) for i in range(count)},
                                               name="all")
    root.mkdir(parents=True)
    if kind == "npz":
        for i in range(count):
            np.savez(root / f"{prefix}_{i}.npz", **fake_image(rng, n))
        return convert_npz_dir, root
    (root / "f.tsv").write_text("".join(tsv_line(f"{prefix}_{i}", rng, n)[0] for i in range(count)))
    return convert_tsv, root / "f.tsv"


@pytest.mark.parametrize("kind", KINDS)
def test_region_converters_refuse_an_unknown_box_policy(tmp_path, rng, kind):
    convert, src = _region_source(kind, tmp_path / "src", rng)
    with pytest.raises(ValueError, match="boxes must be .*'every'"):
        convert(src, tmp_path / "store", boxes="every", progress=False)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_region_converters_append_to_an_existing_store(tmp_path, rng, kind):
    convert, first = _region_source(kind, tmp_path / "a", rng, prefix="a")
    second = _region_source(kind, tmp_path / "b", rng, prefix="b")[1]
    convert(first, tmp_path / "store", progress=False)
    assert convert(second, tmp_path / "store", append=True, progress=False).images == 3
    assert sorted(name[0] for name in RegionStore(tmp_path / "store")) == ["a"] * 3 + ["b"] * 3


@pytest.mark.parametrize("kind", KINDS)
def test_region_converters_pass_shard_bytes_to_the_store(tmp_path, rng, kind):
    convert, src = _region_source(kind, tmp_path / "src", rng)
    convert(src, tmp_path / "store", shard_bytes=1, progress=False)   # every record then starts a shard
    assert len(list((tmp_path / "store").glob("shard-*.rgs"))) == 3
    assert len(RegionStore(tmp_path / "store")) == 3


def test_a_second_feature_width_names_the_file(tmp_path, rng):
    src = tmp_path / "npz"
    src.mkdir()
    np.savez(src / "a.npz", **fake_image(rng, 12))
    np.savez(src / "b.npz", **{**fake_image(rng, 12), "features": np.ones((12, 8), np.float16)})
    with pytest.raises(ConversionError, match=re.escape(f"{src / 'b.npz'}: arrays: (feature dim, soft-label dim) "
                                                        "(8, 9) differs from the earlier images' (16, 9)")):
        convert_npz_dir(src, tmp_path / "store", progress=False)


def test_an_image_in_two_tsv_files_names_both_places(tmp_path, rng):
    same, other = tsv_line("same", rng, 12)[0], tsv_line("other", rng, 12)[0]
    (tmp_path / "a.tsv").write_text(other + same)
    (tmp_path / "b.tsv").write_text(same)
    with pytest.raises(ConversionError, match=re.escape(
            f"{tmp_path / 'b.tsv'}: line 1 (image 'same'): image id 'same' was already converted from "
            f"{tmp_path / 'a.tsv'}: line 2 (image 'same')")):
        convert_tsv([tmp_path / "a.tsv", tmp_path / "b.tsv"], tmp_path / "store", progress=False)


def test_an_empty_source_is_an_error_naming_the_store(tmp_path):
    (tmp_path / "empty.tsv").write_text("\n\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'store'}: no image was converted: the source is "
                                                   "empty")):
        convert_tsv(tmp_path / "empty.tsv", tmp_path / "store", progress=False)


class _MakesDirectory:
    """Unpickling it creates a directory: the proof that a pickle in a source was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _pickled_features(marker) -> dict:
    return {**fake_image(np.random.default_rng(2), 12), "features": np.array([_MakesDirectory(marker)], dtype=object)}


def test_image_db_never_unpickles_a_record(tmp_path):
    images = {"a.npz": fake_image(np.random.default_rng(3), 12)}
    db = make_image_db(tmp_path / "img", images, name="all", raw={"evil.npz": npz_dumps(_pickled_features(
        tmp_path / "ran"))})
    with pytest.raises(ConversionError, match=r"image 'evil\.npz': corrupt value"):
        convert_image_db(db, tmp_path / "store", progress=False)
    assert not (tmp_path / "ran").exists()


def test_npz_dir_never_unpickles_a_file(tmp_path):
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "evil.npz", **_pickled_features(tmp_path / "ran"))
    with pytest.raises(ConversionError, match=r"evil\.npz: corrupt or unreadable"):
        convert_npz_dir(tmp_path / "npz", tmp_path / "store", progress=False)
    assert not (tmp_path / "ran").exists()


# ---- image DB -----------------------------------------------------------------------------------------------

def _damaged_msgpack(rng, damage) -> bytes:
    """A msgpack-numpy record of 12 regions, one array entry changed by damage(entries)."""
    entries = msgpack.unpackb(msgpack_numpy_dumps(fake_image(rng, 12)), raw=False)
    damage(entries)
    return msgpack.packb(entries, use_bin_type=True)


@pytest.mark.parametrize("damage, match", [
    (lambda e: e["conf"].pop(b"data"), r"a msgpack-numpy entry lacks \['data'\]"),
    (lambda e: e["features"].update({b"data": e["features"][b"data"] + b"\0\0"}),
     r"needs 384 bytes, the record holds 386"),
])
def test_image_db_damaged_msgpack_entry_names_the_image(tmp_path, rng, damage, match):
    db = make_image_db(tmp_path / "img", {"a.npz": fake_image(rng, 12)}, name="all",
                       raw={"bad.npz": _damaged_msgpack(rng, damage)})
    with pytest.raises(ConversionError, match=r"all: image 'bad\.npz': corrupt value .*" + match):
        convert_image_db(db, tmp_path / "store", progress=False)


def test_image_db_with_two_lmdbs_names_both(tmp_path, rng):
    for name in ("all", "feat_numbb36"):
        make_image_db(tmp_path / "img", {"a.npz": fake_image(rng, 12)}, name=name)
    with pytest.raises(ValueError, match="found all, feat_numbb36: pass the LMDB directory itself"):
        convert_image_db(tmp_path / "img", tmp_path / "store", progress=False)


def test_image_db_without_keys_entry_converts_in_key_order(tmp_path, rng):
    names = ["b.npz", "c.npz", "a.npz"]
    write_lmdb(tmp_path / "all", {k.encode(): msgpack_numpy_dumps(fake_image(rng, 12)) for k in names})
    assert convert_image_db(tmp_path / "all", tmp_path / "store", progress=False).images == 3
    assert list(RegionStore(tmp_path / "store")) == ["a.npz", "b.npz", "c.npz"]


@pytest.mark.parametrize("nbb, match", [
    ({"img_0.npz": 12, "img_1.npz": 0, "img_2.npz": 12},
     r"nbb_th0\.2_max100_min10\.json: image 'img_1\.npz': region count must be a positive integer, got 0"),
    ([12, 12, 12], r"nbb_th0\.2_max100_min10\.json: expected a JSON object"),
    ({"img_0.npz": 12, "img_1.npz": 13, "img_2.npz": 12},   # the record holds fewer than its count
     r"image 'img_1\.npz': holds 12 regions but nbb_th0\.2_max100_min10\.json says 13"),
])
def test_image_db_bad_region_counts_name_the_json_and_image(tmp_path, rng, nbb, match):
    _image_db_error(tmp_path, rng, match, nbb=nbb)


@pytest.mark.parametrize("options, rows", [({"boxes": "keep"}, slice(None)), ({"num_bb": 5}, slice(0, 5))])
def test_image_db_keep_and_num_bb_override_the_rule_of_an_all_db(tmp_path, rng, options, rows):
    arrays = fake_image(rng, 120, sort=False)
    db = make_image_db(tmp_path / "img", {"a.npz": arrays}, name="all")
    convert_image_db(db, tmp_path / "store", progress=False, **options)
    np.testing.assert_array_equal(np.asarray(RegionStore(tmp_path / "store")["a.npz"].features),
                                  arrays["features"][rows])



@pytest.mark.parametrize("num_bb", [0, -1])
def test_image_db_refuses_a_num_bb_below_one(tmp_path, rng, num_bb):
    # -1 used to slice [0:-1], silently dropping each record's last region
    db = make_image_db(tmp_path / "img", {"a.npz": fake_image(rng, 12)}, name="all")
    with pytest.raises(ValueError, match=rf"all: num_bb must be a positive integer, got {num_bb}$"):
        convert_image_db(db, tmp_path / "store", num_bb=num_bb, progress=False)
    assert not (tmp_path / "store").exists()

@pytest.mark.parametrize("options, named", [
    ({"num_bb": 5, "nbb_json": "counts.json"}, r"nbb_json \(--nbb\) and num_bb \(--num-bb\)"),
    ({"num_bb": 5, "boxes": "rule"}, r"boxes='rule' and num_bb \(--num-bb\)"),
    ({"nbb_json": "counts.json", "boxes": "keep"}, r"boxes='keep' and nbb_json \(--nbb\)"),
])
def test_image_db_refuses_two_region_counts_at_once(tmp_path, rng, options, named):
    # each sets how many regions to keep: one of them used to be ignored without a word
    db = make_image_db(tmp_path / "img", {"a.npz": fake_image(rng, 12)}, name="all")
    with pytest.raises(ValueError, match=rf"all: {named} each say how many regions to keep"):
        convert_image_db(db, tmp_path / "store", progress=False, **options)
    assert not (tmp_path / "store").exists()


# ---- TSV ----------------------------------------------------------------------------------------------------

def _tsv(line: str, **override) -> str:
    """A TSV line with some of LXMERT's columns replaced."""
    columns = dict(zip(LXMERT_FIELDS, line.rstrip("\n").split("\t")))
    return "\t".join({**columns, **override}.values()) + "\n"


def _tsv_boxes(*box) -> str:
    return _b64(np.tile(np.array([box], np.float32), (12, 1)))


@pytest.mark.parametrize("override, match", [
    ({"boxes": _tsv_boxes(10, 20, 30, 40)[:8] + "!" + _tsv_boxes(10, 20, 30, 40)[8:]},
     r"line 1 \(image 'x'\): boxes is not valid base64"),
    ({"num_boxes": "11"}, r"line 1 \(image 'x'\): boxes holds 192 bytes, 44 float32 values need 176"),
    ({"features": base64.b64encode(b"\0" * 14).decode()},
     r"line 1 \(image 'x'\): features holds 14 bytes, not a whole number of float32 values"),
    ({"attrs_conf": "AAAA\tAAAA"}, r"line 1: 11 tab-separated fields, expected 10"),
    ({"img_id": ""}, r"line 1: empty img_id"),
    ({"boxes": _tsv_boxes(30, 10, 20, 40)}, r"line 1 \(image 'x'\): box 0 \[30\.0, 10\.0, 20\.0, 40\.0\] has x2 < x1"),
    ({"boxes": _tsv_boxes(10, np.nan, 30, 40)}, r"line 1 \(image 'x'\): boxes hold NaN or infinite values"),
])
def test_tsv_bad_line_names_the_file_line_and_image(tmp_path, rng, override, match):
    (tmp_path / "f.tsv").write_text(_tsv(tsv_line("x", rng, 12)[0], **override))
    with pytest.raises(ConversionError, match="^" + re.escape(str(tmp_path / "f.tsv")) + ": " + match):
        convert_tsv(tmp_path / "f.tsv", tmp_path / "store", progress=False)


def test_tsv_duplicate_column_names_are_refused():
    with pytest.raises(ValueError, match="name a column twice"):
        convert_tsv("unused.tsv", "unused", fields=[*LXMERT_FIELDS, "image_id"], progress=False)


def _stored_boxes(store, image_id):
    return np.asarray(store[image_id].norm_bb, np.float32)


def test_tsv_butd_names_image_h_and_image_w_mean_height_and_width(tmp_path, rng):
    line, expected = tsv_line("x", rng, 12, h=300, w=900)
    (tmp_path / "f.tsv").write_text(line)
    fields = ["image_id", "image_h", "image_w", *LXMERT_FIELDS[3:]]
    convert_tsv(tmp_path / "f.tsv", tmp_path / "store", fields=fields, progress=False)
    np.testing.assert_allclose(_stored_boxes(RegionStore(tmp_path / "store"), "x"), expected["norm_bb"], rtol=1e-3,
                               atol=1e-4)


def test_tsv_reads_crlf_lines_and_skips_blank_ones(tmp_path, rng):
    lines = {k: tsv_line(k, rng, 12) for k in ("a", "b")}
    text = "\r\n\r\n".join(line.rstrip("\n") for line, _ in lines.values()) + "\r\n"
    (tmp_path / "f.tsv").write_bytes(text.encode())
    assert convert_tsv(tmp_path / "f.tsv", tmp_path / "store", progress=False).images == 2
    store = RegionStore(tmp_path / "store")
    for key, (_, expected) in lines.items():
        np.testing.assert_array_equal(np.asarray(store[key].features), expected["features"])


def test_tsv_float16_features(tmp_path, rng):
    line, expected = tsv_line("x", rng, 12)
    (tmp_path / "f.tsv").write_text(_tsv(line, features=_b64(expected["features"])))
    convert_tsv(tmp_path / "f.tsv", tmp_path / "store", feature_dtype="float16", progress=False)
    np.testing.assert_array_equal(np.asarray(RegionStore(tmp_path / "store")["x"].features), expected["features"])


# ---- npz directory ------------------------------------------------------------------------------------------

def test_npz_dir_converts_files_in_name_order_and_ignores_directories(tmp_path, rng):
    src = tmp_path / "npz"
    (src / "d.npz").mkdir(parents=True)   # a directory with an .npz name is not a feature file
    for name in ("b", "c", "a"):
        np.savez(src / f"{name}.npz", **fake_image(rng, 12))
    convert_npz_dir(src, tmp_path / "store", boxes="keep", progress=False)
    assert list(RegionStore(tmp_path / "store")) == ["a.npz", "b.npz", "c.npz"]


def test_npz_dir_without_npz_files_names_the_directory(tmp_path):
    (tmp_path / "npz").mkdir()
    (tmp_path / "npz" / "notes.txt").write_text("no features")
    with pytest.raises(ValueError, match=re.escape(f"npz directory {tmp_path / 'npz'} holds no .npz files")):
        convert_npz_dir(tmp_path / "npz", tmp_path / "store", progress=False)


# ---- text DB ------------------------------------------------------------------------------------------------

def _text_db_error(tmp_path, rng, match, **edits):
    make_text_db(tmp_path / "coco.db", rng, **edits)
    with pytest.raises(ConversionError, match=match):
        convert_text_db(tmp_path / "coco.db", tmp_path / "out.npz", progress=False)
    assert not (tmp_path / "out.npz").exists()


def _record(text_id, **fields):
    return lambda records: records[text_id].update(fields)


def _side(name, text_id, value):
    return lambda side: side[name].update({text_id: value})


@pytest.mark.parametrize("edits, match", [
    ({"edit_side": lambda s: s.update({"id2len.json": list(s["id2len.json"])})},
     r"id2len\.json: expected a JSON dict, got list"),
    ({"edit_record": _record("1002", input_ids=[200.0, 300.0, 400.0]), "edit_side": _side("id2len.json", "1002", 3)},
     r"coco\.db: text '1002': input_ids must be a list of integers"),
    ({"edit_record": _record("1003", img_fname="")}, r"coco\.db: text '1003': img_fname must be an image name, got ''"),
    ({"edit_side": _side("id2len.json", "1002", 1)}, r"coco\.db: text '1002': id2len\.json says 1 tokens, the record"),
    ({"edit_record": _record("1005", input_ids=[106, 28996]), "edit_side": _side("id2len.json", "1005", 2)},
     r"coco\.db: text '1005': token id outside the vocabulary \[0, 28996\)"),
    ({"edit_side": _side("img2txts.json", "coco_000.npz", "1000")},
     r"img2txts\.json: image 'coco_000\.npz': must map to a list of text ids"),
    ({"edit_side": lambda s: s["img2txts.json"]["coco_000.npz"].append("9999")},
     r"img2txts\.json: text '9999': listed under image 'coco_000\.npz' is not in id2len\.json"),
])
def test_text_db_bad_record_or_side_file_names_the_file_and_text(tmp_path, rng, edits, match):
    _text_db_error(tmp_path, rng, match, **edits)


def test_text_db_invalid_json_names_the_side_file(tmp_path, rng):
    make_text_db(tmp_path / "coco.db", rng)
    (tmp_path / "coco.db" / "txt2img.json").write_text("{not json")
    with pytest.raises(ConversionError, match=r"coco\.db/txt2img\.json: not valid JSON"):
        convert_text_db(tmp_path / "coco.db", tmp_path / "out.npz", progress=False)


def test_text_db_without_an_lmdb_names_data_mdb(tmp_path, rng):
    make_text_db(tmp_path / "coco.db", rng)
    (tmp_path / "coco.db" / "data.mdb").unlink()
    with pytest.raises(FileNotFoundError, match=r"coco\.db: no LMDB there \(.*coco\.db/data\.mdb does not exist\)"):
        convert_text_db(tmp_path / "coco.db", tmp_path / "out.npz", progress=False)


def test_text_db_keeps_id2len_order_and_counts_tokens(tmp_path, rng):
    def reverse_id2len(side):
        side["id2len.json"] = dict(reversed(side["id2len.json"].items()))
    records = make_text_db(tmp_path / "coco.db", rng, edit_side=reverse_id2len)
    summary = convert_text_db(tmp_path / "coco.db", tmp_path / "out.npz", progress=False)
    assert read_text_corpus(tmp_path / "out.npz")[2] == list(reversed(records))
    tokens = sum(len(r["input_ids"]) for r in records.values())
    assert summary.lines() == [f"wrote 12 texts ({tokens} tokens) about 4 images to {tmp_path / 'out.npz'}"]


def test_text_db_keeps_ids_above_int16(tmp_path, rng):
    # a vocabulary of 50000 ids (e.g. a multilingual tokenizer): ids above 32767 are kept as they are
    def bigger_vocabulary(side):
        side["meta.json"]["v_range"] = [106, 50000]
        side["id2len.json"]["1001"] = 3
    make_text_db(tmp_path / "big.db", rng, edit_record=_record("1001", input_ids=[40000, 49999, 106]),
                 edit_side=bigger_vocabulary)
    convert_text_db(tmp_path / "big.db", tmp_path / "out.npz", progress=False)
    texts, _, text_ids, meta = read_text_corpus(tmp_path / "out.npz")
    assert texts[text_ids.index("1001")].tolist() == [40000, 49999, 106] and meta["vocab_size"] == 50000
    assert {k: meta[k] for k in ("CLS", "SEP", "MASK")} == {k: META[k] for k in ("CLS", "SEP", "MASK")}


# ---- the synthetic world ------------------------------------------------------------------------------------

SMALL_WORLD = WorldConfig(num_train_images=6, num_val_images=3, captions_per_image=2, max_regions=12, img_dim=16,
                          num_labels=40)


def _export(dst):
    return export_synthetic(PretrainConfig(data=DataOptions(world=SMALL_WORLD, vocab_size=120)), dst, progress=False)


def test_synthetic_export_writes_the_val_captions_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # a relative destination: the config must still name absolute paths
    _export("files")
    files = tmp_path / "files"
    data = json.loads((files / "pretrain.json").read_text())["data"]
    assert (data["region_store"], data["text_corpus"], data["val_text_corpus"]) == (
        str(files / "regions"), str(files / "train.corpus.npz"), str(files / "val.corpus.npz"))
    val = make_world(SMALL_WORLD)["val"].captions
    _, image_ids, text_ids, _ = read_text_corpus(files / "val.corpus.npz")
    assert text_ids == [c.text_id for c in val] and image_ids == [c.image_id for c in val] and len(val) == 6
    assert len(RegionStore(files / "regions")) == 9


@pytest.mark.parametrize("existing", ["train.corpus.npz", "pretrain.json"])
def test_synthetic_export_never_writes_over_an_earlier_one(tmp_path, existing):
    # the region store's own check came first and only guarded regions/: the corpora and config were replaced
    (tmp_path / existing).write_text("earlier")
    with pytest.raises(FileExistsError, match=rf"export to {tmp_path}: {tmp_path / existing} already exist"):
        _export(tmp_path)
    assert (tmp_path / existing).read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == [existing]
