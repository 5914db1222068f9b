"""Converters: small files of every source format built here (lmdb, msgpack, lz4, numpy, base64), converted, and
read back through RegionStore and read_text_corpus; bad records raise errors naming the file and the record."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import lmdb
import lz4.frame
import msgpack
import numpy as np
import pytest

from uniter_fast.cli import main
from uniter_fast.data.convert import (
    ConversionError, RegionRule, convert_image_db, convert_npz_dir, convert_text_db, convert_tsv,
)
from uniter_fast.data.convert.common import apply_rule, check_regions
from uniter_fast.data.convert.imagedb import decode_msgpack_numpy
from uniter_fast.data.text_corpus import load_text_corpus, read_text_corpus, write_text_corpus

RegionStore = pytest.importorskip("uniter_fast.data.region_store").RegionStore

D, C = 16, 9  # small feature and soft-label widths: the store takes any


# ---- source builders ----------------------------------------------------------------------------------------

def fake_image(rng, n: int, *, sort: bool = True) -> dict[str, np.ndarray]:
    """The four BUTD arrays, fp16, conf (n, 1); sorted by confidence like the extractor's output."""
    conf = rng.uniform(0.05, 0.99, size=n)
    if sort:
        conf = np.sort(conf)[::-1]
    xy = rng.uniform(0, 0.5, size=(n, 2))
    wh = rng.uniform(0.05, 0.5, size=(n, 2))
    soft = rng.random((n, C))
    return {"features": rng.random((n, D)).astype(np.float16) * 4,
            "norm_bb": np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float16),
            "conf": conf.astype(np.float16)[:, None],
            "soft_labels": (soft / soft.sum(1, keepdims=True)).astype(np.float16)}


def msgpack_numpy_dumps(arrays: dict) -> bytes:
    """What msgpack_numpy's encoder writes for a dict of arrays (keys as bytes, use_bin_type=True)."""
    def enc(a):
        return {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": list(a.shape), b"data": a.tobytes()}
    return msgpack.packb({k: enc(v) for k, v in arrays.items()}, use_bin_type=True)


def npz_dumps(arrays: dict) -> bytes:
    """The original's compressed value: np.savez_compressed bytes; old numpy stored its allow_pickle kwarg too."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, **{"allow_pickle": np.array(True)})
    return buf.getvalue()


def write_lmdb(path: Path, items: dict[bytes, bytes]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k, v)
    env.close()


def make_image_db(root: Path, images: dict, *, name="feat_th0.2_max100_min10", compressed=False, keys=None,
                  nbb=None, raw: dict | None = None) -> Path:
    """An image-set directory holding one image DB and (for feat_th names) its nbb JSON."""
    db = root / (name + ("_compressed" if compressed else ""))
    items = {k.encode(): (npz_dumps(v) if compressed else msgpack_numpy_dumps(v)) for k, v in images.items()}
    items.update({k.encode(): v for k, v in (raw or {}).items()})
    items[b"__keys__"] = json.dumps(list(images) + list(raw or {}) if keys is None else keys).encode()
    write_lmdb(db, items)
    if name.startswith("feat_th"):
        counts = {k: len(v["features"]) for k, v in images.items()} if nbb is None else nbb
        (root / (name.replace("feat_", "nbb_") + ".json")).write_text(json.dumps(counts))
    return db


def assert_stored(store, image_id: str, arrays: dict, *, soft: bool = True) -> None:
    got = store[image_id]
    np.testing.assert_array_equal(np.asarray(got.features, np.float32), arrays["features"].astype(np.float32))
    np.testing.assert_allclose(np.asarray(got.norm_bb, np.float32), arrays["norm_bb"][:, :6].astype(np.float32),
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got.conf, np.float32).reshape(-1),
                               arrays["conf"].reshape(-1).astype(np.float32), rtol=1e-3)
    if soft:
        np.testing.assert_array_equal(np.asarray(got.soft_labels, np.float32),
                                      arrays["soft_labels"].astype(np.float32))
    else:
        assert got.soft_labels is None


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---- shared pieces ------------------------------------------------------------------------------------------

def test_region_rule_matches_the_original():
    rule = RegionRule()
    assert rule.count(np.array([0.9] * 5 + [0.1] * 30)) == 10      # min 10
    assert rule.count(np.array([0.9] * 150)) == 100                 # max 100
    assert rule.count(np.array([0.9] * 40 + [0.2] * 5)) == 40       # strictly above 0.2
    assert rule.count(np.array([0.9] * 3)) == 3                     # fewer boxes than min_bb: all of them
    with pytest.raises(ValueError, match="min_bb <= max_bb"):
        RegionRule(min_bb=20, max_bb=10)


def test_apply_rule_sorts_by_confidence(rng):
    arrays = fake_image(rng, 30, sort=False)
    regions = apply_rule(check_regions(arrays, "src", "img"), RegionRule(conf_th=0.5, min_bb=2, max_bb=100))
    expected = np.argsort(-arrays["conf"][:, 0].astype(np.float64), kind="stable")[:int((arrays["conf"] > 0.5).sum())]
    np.testing.assert_array_equal(regions.features, arrays["features"][expected])
    assert (np.diff(regions.conf.astype(np.float32)) <= 0).all()


def test_msgpack_numpy_decoder_reads_str_and_bytes_keys():
    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    for key in (b"nd", "nd"):
        value = msgpack.packb({"features": {key: True, "type": "<f2", "kind": "", "shape": [2, 3],
                                            "data": a.tobytes()}}, use_bin_type=True)
        np.testing.assert_array_equal(decode_msgpack_numpy(value)["features"], a)


# ---- image DB -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True])
def test_image_db_converts_every_record(tmp_path, rng, compressed):
    images = {f"coco_{i:03d}.npz": fake_image(rng, int(rng.integers(10, 30))) for i in range(7)}
    images["coco_001.npz"]["norm_bb"] = np.concatenate(   # some DBs hold the 7-column boxes
        [images["coco_001.npz"]["norm_bb"], images["coco_001.npz"]["norm_bb"][:, 4:5] * 0], axis=1)
    db = make_image_db(tmp_path / "img", images, compressed=compressed)
    # the nbb JSON is found beside the DB from its name; compressed DBs share the uncompressed name's JSON
    summary = convert_image_db(db, tmp_path / "store", progress=False)
    assert summary.images == 7 and summary.regions == sum(len(v["features"]) for v in images.values())
    store = RegionStore(tmp_path / "store")
    assert sorted(store) == sorted(images)
    for key, arrays in images.items():
        assert store.num_regions(key) == len(arrays["features"])
        assert_stored(store, key, arrays)


def test_image_db_all_applies_the_region_rule(tmp_path, rng):
    images = {"a.npz": fake_image(rng, 120, sort=False), "b.npz": fake_image(rng, 12)}
    db = make_image_db(tmp_path / "img", images, name="all")
    summary = convert_image_db(db, tmp_path / "store", progress=False)
    assert summary.rule_applied == 2
    store = RegionStore(tmp_path / "store")
    for key, arrays in images.items():
        expected = apply_rule(check_regions(arrays, "x", key), RegionRule())
        assert store.num_regions(key) == len(expected) == RegionRule().count(arrays["conf"][:, 0])
        np.testing.assert_array_equal(np.asarray(store[key].features), expected.features)


def test_image_db_numbb_keeps_the_first_rows(tmp_path, rng):
    images = {"a.npz": fake_image(rng, 50), "b.npz": fake_image(rng, 20)}
    make_image_db(tmp_path / "img", images, name="feat_numbb36")
    convert_image_db(tmp_path / "img", tmp_path / "store", progress=False)   # the parent directory works too
    store = RegionStore(tmp_path / "store")
    assert store.num_regions("a.npz") == 36 and store.num_regions("b.npz") == 20
    np.testing.assert_array_equal(np.asarray(store["a.npz"].features), images["a.npz"]["features"][:36])


def test_image_db_without_soft_labels(tmp_path, rng):
    images = {f"{i}.npz": {k: v for k, v in fake_image(rng, 12).items() if k != "soft_labels"} for i in range(3)}
    make_image_db(tmp_path / "img", images)
    summary = convert_image_db(tmp_path / "img", tmp_path / "store", progress=False)
    assert summary.soft_labels is False
    for key, arrays in images.items():
        assert_stored(RegionStore(tmp_path / "store"), key, arrays, soft=False)


def _image_db_error(tmp_path, rng, match, **kwargs):
    images = {f"img_{i}.npz": fake_image(rng, 12) for i in range(3)}
    for change in kwargs.pop("edit", ()):
        change(images)
    db = make_image_db(tmp_path / "img", images, **kwargs)
    with pytest.raises((ConversionError, FileNotFoundError, ValueError), match=match) as err:
        convert_image_db(db, tmp_path / "store", progress=False)
    return err


def test_image_db_corrupt_value_names_the_db_and_image(tmp_path, rng):
    _image_db_error(tmp_path, rng, r"feat_th0\.2_max100_min10: image 'broken\.npz': corrupt value",
                    raw={"broken.npz": b"\xc1\x00garbage"}, nbb={"img_0.npz": 12, "img_1.npz": 12, "img_2.npz": 12,
                                                                  "broken.npz": 12})


def test_image_db_truncated_array_names_the_image(tmp_path, rng):
    good = fake_image(rng, 12)
    fields = {k: {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": list(a.shape), b"data": a.tobytes()}
              for k, a in good.items()}
    fields["features"][b"shape"] = [13, D]   # the shape promises a row the data lacks
    _image_db_error(tmp_path, rng, r"image 'short\.npz': corrupt value.*needs \d+ bytes",
                    raw={"short.npz": msgpack.packb(fields, use_bin_type=True)},
                    nbb={"img_0.npz": 12, "img_1.npz": 12, "img_2.npz": 12, "short.npz": 12})


def test_image_db_wrong_shapes_name_the_image(tmp_path, rng):
    def bad(images):
        images["img_1.npz"]["norm_bb"] = images["img_1.npz"]["norm_bb"][:, :5]
    _image_db_error(tmp_path, rng, r"image 'img_1\.npz': norm_bb must be \(12, 6\) or \(12, 7\)", edit=[bad])


def test_image_db_missing_field_names_the_image(tmp_path, rng):
    def bad(images):
        del images["img_2.npz"]["conf"]
    _image_db_error(tmp_path, rng, r"image 'img_2\.npz': no 'conf' array", edit=[bad])


def test_image_db_nan_names_the_image(tmp_path, rng):
    def bad(images):
        images["img_0.npz"]["features"][3, 1] = np.nan
    _image_db_error(tmp_path, rng, r"image 'img_0\.npz': features holds NaN", edit=[bad])


def test_image_db_count_mismatch_with_nbb_json(tmp_path, rng):
    err = _image_db_error(tmp_path, rng, r"image 'img_1\.npz': holds 12 regions but nbb_th0\.2_max100_min10\.json "
                          r"says 11", nbb={"img_0.npz": 12, "img_1.npz": 11, "img_2.npz": 12})
    assert "do not belong together" in str(err.value)


def test_image_db_nbb_json_and_keys_must_cover_the_records(tmp_path, rng):
    _image_db_error(tmp_path, rng, r"nbb_th0\.2_max100_min10\.json: image 'img_2\.npz': has a record .* but no "
                    r"region count", nbb={"img_0.npz": 12, "img_1.npz": 12})
    _image_db_error(tmp_path / "b", rng, r"image 'ghost\.npz': is listed in __keys__ but has no record",
                    keys=["img_0.npz", "img_1.npz", "img_2.npz", "ghost.npz"])
    _image_db_error(tmp_path / "c", rng, r"image 'img_2\.npz': has a record but is not listed in __keys__",
                    keys=["img_0.npz", "img_1.npz"])
    _image_db_error(tmp_path / "d", rng, r"nbb_th0\.2_max100_min10\.json: image 'ghost\.npz': has a region count but "
                    r"no record", nbb={"img_0.npz": 12, "img_1.npz": 12, "img_2.npz": 12, "ghost.npz": 12})
    _image_db_error(tmp_path / "e", rng, r"feat_th0\.2_max100_min10: __keys__: lists 'img_0\.npz' twice",
                    keys=["img_0.npz", "img_1.npz", "img_2.npz", "img_0.npz"])


def test_image_db_missing_nbb_json_says_what_to_pass(tmp_path, rng):
    arrays = fake_image(rng, 40)
    db = make_image_db(tmp_path / "img", {"a.npz": arrays})
    (tmp_path / "img" / "nbb_th0.2_max100_min10.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"nbb_th0\.2_max100_min10\.json do not exist.*--all-boxes"):
        convert_image_db(db, tmp_path / "store", progress=False)
    convert_image_db(db, tmp_path / "store", boxes="rule", progress=False)   # the rule instead of the JSON
    assert RegionStore(tmp_path / "store").num_regions("a.npz") == RegionRule().count(arrays["conf"][:, 0])


# ---- TSV ----------------------------------------------------------------------------------------------------

def _b64(a) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def tsv_line(image_id: str, rng, n: int, *, h=480, w=640, **override) -> tuple[str, dict]:
    x1 = rng.uniform(0, w / 2, n)
    y1 = rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(5, w / 2, n), y1 + rng.uniform(5, h / 2, n)], 1).astype(np.float32)
    conf = np.sort(rng.uniform(0.1, 1.0, n))[::-1].astype(np.float32)
    feats = rng.random((n, D)).astype(np.float32) * 3
    fields = {"img_id": image_id, "img_h": str(h), "img_w": str(w),
              "objects_id": _b64(rng.integers(0, 1600, n).astype(np.int64)), "objects_conf": _b64(conf),
              "attrs_id": _b64(rng.integers(0, 400, n).astype(np.int64)), "attrs_conf": _b64(conf * 0.5),
              "num_boxes": str(n), "boxes": _b64(boxes), "features": _b64(feats), **override}
    norm = boxes.astype(np.float64) / [w, h, w, h]
    expected = {"features": feats.astype(np.float16),
                "norm_bb": np.concatenate([norm, norm[:, 2:] - norm[:, :2]], 1).astype(np.float32), "conf": conf}
    order = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
             "boxes", "features")
    return "\t".join(fields[k] for k in order) + "\n", expected


def test_tsv_converts_and_normalises_boxes(tmp_path, rng):
    lines, expected = [], {}
    for i in range(5):
        line, exp = tsv_line(f"COCO_{i}", rng, int(rng.integers(10, 40)))
        lines.append(line)
        expected[f"COCO_{i}"] = exp
    big, exp_big = tsv_line("COCO_big", rng, 130)  # more than 100 boxes: the rule selects (auto)
    (tmp_path / "a.tsv").write_text("".join(lines[:3]))
    (tmp_path / "b.tsv").write_text("".join(lines[3:]) + big)
    summary = convert_tsv([tmp_path / "a.tsv", tmp_path / "b.tsv"], tmp_path / "store", progress=False)
    assert summary.images == 6 and summary.rule_applied == 1 and summary.soft_labels is False
    store = RegionStore(tmp_path / "store")
    for key, exp in expected.items():
        assert_stored(store, key, exp, soft=False)
    assert store.num_regions("COCO_big") == RegionRule().count(exp_big["conf"])


def test_tsv_all_boxes_applies_the_rule_everywhere(tmp_path, rng):
    line, exp = tsv_line("x", rng, 40)
    (tmp_path / "f.tsv").write_text(line)
    convert_tsv(tmp_path / "f.tsv", tmp_path / "store", boxes="rule", rule=RegionRule(conf_th=0.5), progress=False)
    assert RegionStore(tmp_path / "store").num_regions("x") == max(10, int((exp["conf"] > 0.5).sum()))


def test_tsv_auto_applies_the_rule_only_above_max_bb(tmp_path, rng):
    lines = {n: tsv_line(f"n{n}", rng, n)[0] for n in (100, 101)}
    (tmp_path / "f.tsv").write_text("".join(lines.values()))
    summary = convert_tsv(tmp_path / "f.tsv", tmp_path / "store", rule=RegionRule(conf_th=0.5), progress=False)
    assert summary.rule_applied == 1
    assert RegionStore(tmp_path / "store").num_regions("n100") == 100  # a selection of exactly max_bb: kept


@pytest.mark.parametrize("override, match", [
    ({"boxes": "not base64!"}, r"line 2 \(image 'bad'\): boxes is not valid base64"),
    ({"num_boxes": "13"}, r"line 2 \(image 'bad'\): boxes holds 192 bytes, 52 float32 values need 208"),
    ({"img_w": "0"}, r"line 2 \(image 'bad'\): img_w must be positive"),
    ({"features": base64.b64encode(b"\x00" * 12).decode()}, r"line 2 \(image 'bad'\): features hold 3 values"),
    ({"boxes": _b64(np.tile(np.array([[10, 50, 20, 40]], np.float32), (12, 1)))},
     r"line 2 \(image 'bad'\): box 0 \[10\.0, 50\.0, 20\.0, 40\.0\] has x2 < x1 or y2 < y1"),
    ({"img_h": "inf"}, r"line 2 \(image 'bad'\): img_h must be finite, got 'inf'"),
])
def test_tsv_errors_name_the_file_and_line(tmp_path, rng, override, match):
    good, _ = tsv_line("good", rng, 12)
    bad, _ = tsv_line("bad", rng, 12, **override)
    (tmp_path / "f.tsv").write_text(good + bad)
    with pytest.raises(ConversionError, match=re.escape(str(tmp_path / "f.tsv")) + ": " + match):
        convert_tsv(tmp_path / "f.tsv", tmp_path / "store", progress=False)


def test_tsv_missing_fields_and_duplicates(tmp_path, rng):
    good, _ = tsv_line("same", rng, 12)
    (tmp_path / "f.tsv").write_text(good + "\t".join(good.split("\t")[:9]) + "\n")
    with pytest.raises(ConversionError, match=r"f\.tsv: line 2: 9 tab-separated fields, expected 10"):
        convert_tsv(tmp_path / "f.tsv", tmp_path / "s1", progress=False)
    (tmp_path / "f.tsv").write_text(good + good)
    with pytest.raises(ConversionError, match=r"line 2 \(image 'same'\): image id 'same' was already converted "
                                              r"from .*line 1"):
        convert_tsv(tmp_path / "f.tsv", tmp_path / "s2", progress=False)
    with pytest.raises(ValueError, match="lack \\['objects_conf'\\]"):
        convert_tsv(tmp_path / "f.tsv", tmp_path / "s3", fields=["image_id", "image_w", "image_h", "num_boxes",
                                                                  "boxes", "features"], progress=False)


def test_tsv_that_is_not_utf8_names_the_file_and_line(tmp_path, rng):
    good, _ = tsv_line("good", rng, 12)
    (tmp_path / "f.tsv").write_bytes(good.encode() + b"\xff\xfe binary\n")
    with pytest.raises(ConversionError, match=re.escape(str(tmp_path / "f.tsv")) + r": line 2: is not UTF-8 text"):
        convert_tsv(tmp_path / "f.tsv", tmp_path / "store", progress=False)


# ---- npz directory ------------------------------------------------------------------------------------------

def test_npz_dir_applies_the_rule_by_default_and_keeps_on_request(tmp_path, rng):
    src = tmp_path / "npz"
    src.mkdir()
    images = {f"nlvr2_{i}-img0.npz": fake_image(rng, 100 if i < 2 else 25, sort=i != 0) for i in range(4)}
    images["nlvr2_3-img0.npz"] = {k: v.astype(np.float32) for k, v in images["nlvr2_3-img0.npz"].items()}
    for name, arrays in images.items():
        np.savez_compressed(src / name, **arrays)
    (src / "notes.txt").write_text("not an npz")
    summary = convert_npz_dir(src, tmp_path / "rule", progress=False)
    assert summary.images == 4 and summary.rule_applied == 4
    store = RegionStore(tmp_path / "rule")
    for name, arrays in images.items():
        expected = apply_rule(check_regions(arrays, "x", name), RegionRule())
        np.testing.assert_array_equal(np.asarray(store[name].features), expected.features)
    convert_npz_dir(src, tmp_path / "keep", boxes="keep", progress=False)
    store = RegionStore(tmp_path / "keep")
    for name, arrays in images.items():
        assert_stored(store, name, {**arrays, "features": arrays["features"].astype(np.float16)})


def test_npz_dir_auto_applies_the_rule_only_above_max_bb(tmp_path, rng):
    src = tmp_path / "npz"
    src.mkdir()
    for n in (100, 101):
        np.savez(src / f"{n}.npz", **fake_image(rng, n))
    summary = convert_npz_dir(src, tmp_path / "store", boxes="auto", rule=RegionRule(conf_th=0.5), progress=False)
    assert summary.rule_applied == 1
    assert RegionStore(tmp_path / "store").num_regions("100.npz") == 100


@pytest.mark.parametrize("field, value, match", [
    ("conf", np.nan, "conf holds NaN or infinite values"),
    ("features", 1e6, r"features holds NaN or infinite values \(beyond fp16's range\)"),  # finite in fp32
])
def test_npz_dir_non_finite_values_name_the_file(tmp_path, rng, field, value, match):
    src = tmp_path / "npz"
    src.mkdir()
    arrays = {k: v.astype(np.float32) for k, v in fake_image(rng, 12).items()}
    arrays[field][3] = value
    np.savez(src / "a.npz", **arrays)
    with pytest.raises(ConversionError, match=re.escape(str(src / "a.npz")) + ": arrays: " + match):
        convert_npz_dir(src, tmp_path / "store", progress=False)


def test_a_failed_conversion_commits_nothing(tmp_path, rng):
    first, second = tmp_path / "first", tmp_path / "second"
    for src, names in ((first, ("0", "1")), (second, ("2", "3"))):
        src.mkdir()
        for name in names:
            np.savez(src / f"{name}.npz", **fake_image(rng, 12))
    np.savez(second / "4.npz", features=np.zeros((4, D), np.float16))  # bad, after two good images
    with pytest.raises(ConversionError, match=r"4\.npz: arrays: no 'norm_bb'"):
        convert_npz_dir(second, tmp_path / "new", progress=False)
    with pytest.raises(FileNotFoundError, match="index.rsi"):  # a new store is left without an index
        RegionStore(tmp_path / "new")
    convert_npz_dir(first, tmp_path / "store", progress=False)
    with pytest.raises(ConversionError, match=r"4\.npz") as err:
        convert_npz_dir(second, tmp_path / "store", append=True, progress=False)
    assert "it keeps its earlier images" in " ".join(err.value.__notes__)
    assert list(RegionStore(tmp_path / "store")) == ["0.npz", "1.npz"]


def test_npz_dir_errors_name_the_file(tmp_path, rng):
    src = tmp_path / "npz"
    src.mkdir()
    np.savez(src / "a.npz", **fake_image(rng, 12))
    (src / "b.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConversionError, match=re.escape(str(src / "b.npz")) + ": corrupt or unreadable"):
        convert_npz_dir(src, tmp_path / "s1", progress=False)
    arrays = fake_image(rng, 12)
    del arrays["norm_bb"]
    np.savez(src / "b.npz", **arrays)
    with pytest.raises(ConversionError, match=r"b\.npz: arrays: no 'norm_bb' array"):
        convert_npz_dir(src, tmp_path / "s2", progress=False)
    arrays = fake_image(rng, 12)
    arrays["soft_labels"] = arrays["soft_labels"][:, :5]
    np.savez(src / "b.npz", **arrays)
    with pytest.raises(ConversionError, match=r"b\.npz: arrays: \(feature dim, soft-label dim\) \(16, 5\) differs"):
        convert_npz_dir(src, tmp_path / "s3", progress=False)


# ---- text DB ------------------------------------------------------------------------------------------------

META = {"bert": "bert-base-cased", "UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103, "v_range": [106, 28996]}


def make_text_db(path: Path, rng, n=12, *, edit_record=None, edit_side=None, raw=None) -> dict:
    records = {}
    for i in range(n):
        ids = rng.integers(106, 28996, size=int(rng.integers(3, 20))).tolist()
        records[str(1000 + i)] = {"input_ids": ids, "img_fname": f"coco_{i // 3:03d}.npz", "raw": f"caption {i}",
                                  "toked_hypo": None}
    side = {"meta.json": dict(META),
            "id2len.json": {k: len(v["input_ids"]) for k, v in records.items()},
            "txt2img.json": {k: v["img_fname"] for k, v in records.items()},
            "img2txts.json": {}}
    for k, v in records.items():
        side["img2txts.json"].setdefault(v["img_fname"], []).append(k)
    if edit_record:  # after the side files: they describe the intended records
        edit_record(records)
    items = {k.encode(): lz4.frame.compress(msgpack.packb(v, use_bin_type=True)) for k, v in records.items()}
    items.update({k.encode(): v for k, v in (raw or {}).items()})
    write_lmdb(path, items)
    if raw:
        for k in raw:
            side["id2len.json"][k] = 3
            side["txt2img.json"][k] = "coco_000.npz"
            side["img2txts.json"]["coco_000.npz"].append(k)
    if edit_side:
        edit_side(side)
    for name, value in side.items():
        (path / name).write_text(json.dumps(value))
    return records


def test_text_db_converts_to_a_corpus(tmp_path, rng):
    records = make_text_db(tmp_path / "coco.db", rng)
    summary = convert_text_db(tmp_path / "coco.db", tmp_path / "coco.corpus.npz", progress=False)
    assert summary.texts == 12 and summary.images == 4
    texts, image_ids, text_ids, meta = read_text_corpus(tmp_path / "coco.corpus.npz")
    assert text_ids == list(records)
    assert image_ids == [r["img_fname"] for r in records.values()]
    for ids, record in zip(texts, records.values()):
        assert ids.tolist() == record["input_ids"]
    assert {k: meta[k] for k in META} == META and meta["vocab_size"] == 28996
    assert load_text_corpus(tmp_path / "coco.corpus.npz").extras[0] == {"raw": "caption 0", "toked_hypo": None}
    before = (tmp_path / "coco.corpus.npz").read_bytes()
    with pytest.raises(FileExistsError, match=r"coco\.corpus\.npz already exists"):  # never written over
        convert_text_db(tmp_path / "coco.db", tmp_path / "coco.corpus.npz", progress=False)
    assert (tmp_path / "coco.corpus.npz").read_bytes() == before


@pytest.mark.parametrize("edit_record, edit_side, raw, match", [
    (None, lambda s: s["txt2img.json"].update({"1004": "coco_003.npz"}),
     None, r"coco\.db: text '1004': txt2img\.json maps it to 'coco_003\.npz', the record's img_fname is 'coco_001"),
    (None, lambda s: s["id2len.json"].update({"1002": 99}),
     None, r"coco\.db: text '1002': id2len\.json says 99 tokens, the record holds"),
    (None, lambda s: s["img2txts.json"]["coco_000.npz"].remove("1001"),
     None, r"img2txts\.json: text '1001': is not listed under its image 'coco_000\.npz'"),
    (None, lambda s: s["img2txts.json"]["coco_002.npz"].append("1000"),
     None, r"img2txts\.json: text '1000': is listed under image 'coco_002\.npz' but txt2img\.json maps it"),
    (lambda r: r["1007"].pop("img_fname"), None, None, r"coco\.db: text '1007': the record has no 'img_fname'"),
    (lambda r: r["1003"].update(img_fname=["a.npz", "b.npz"]), None, None, r"text '1003': img_fname is a list"),
    (lambda r: r["1005"].update(input_ids=[5, 30000]), lambda s: s["id2len.json"].update({"1005": 2}), None,
     r"text '1005': token id outside the vocabulary"),
    (None, None, {"1999": b"not lz4"}, r"coco\.db: text '1999': corrupt record \(not lz4-compressed msgpack\)"),
    (None, None, {"1998": lz4.frame.compress(b"\xc1\xc1")}, r"coco\.db: text '1998': corrupt record"),
    (None, lambda s: s["id2len.json"].update({"2000": 4}), None,
     r"coco\.db: text '2000': is in id2len\.json but has no record"),
    (None, lambda s: s["id2len.json"].pop("1011"), None, r"coco\.db: key '1011': has a record but is not in id2len"),
    (None, lambda s: s["meta.json"].pop("MASK"), None, r"meta\.json: meta lacks the key 'MASK'"),
    (None, lambda s: s["txt2img.json"].pop("1004"), None, r"coco\.db: text '1004': has no entry in txt2img\.json"),
    (None, lambda s: s["txt2img.json"].update({"5555": "coco_000.npz"}), None,
     r"txt2img\.json: text '5555': is not in id2len\.json"),
    (lambda r: r["1005"].update(input_ids=[-1, 200]), lambda s: s["id2len.json"].update({"1005": 2}), None,
     r"coco\.db: text '1005': token id outside the vocabulary"),
    (None, lambda s: s["id2len.json"].update({"1002": -1}), None,
     r"id2len\.json: text '1002': length must be a non-negative integer, got -1"),
])
def test_text_db_errors_name_the_file_and_text(tmp_path, rng, edit_record, edit_side, raw, match):
    make_text_db(tmp_path / "coco.db", rng, edit_record=edit_record, edit_side=edit_side, raw=raw)
    with pytest.raises(ConversionError, match=match):
        convert_text_db(tmp_path / "coco.db", tmp_path / "out.npz", progress=False)
    assert not (tmp_path / "out.npz").exists()


def test_text_db_missing_side_file(tmp_path, rng):
    make_text_db(tmp_path / "coco.db", rng)
    (tmp_path / "coco.db" / "img2txts.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"coco\.db/img2txts\.json does not exist"):
        convert_text_db(tmp_path / "coco.db", tmp_path / "out.npz", progress=False)


# ---- text corpus file ---------------------------------------------------------------------------------------

def test_text_corpus_round_trip_and_damage(tmp_path):
    meta = {"CLS": 1, "SEP": 2, "MASK": 3, "v_range": [5, 70000]}
    texts = [np.array([5, 69999]), np.array([], dtype=np.int64), np.array([7, 8, 9])]
    write_text_corpus(tmp_path / "c.npz", texts, ["é.jpg", "b", "é.jpg"], ["t0", "t1", "t2"], meta,
                      extras=[{"target": {"labels": [1], "scores": [0.9]}}, {}, {}])
    corpus = load_text_corpus(tmp_path / "c.npz")
    assert [t.tolist() for t in corpus.texts] == [t.tolist() for t in texts]
    assert corpus.image_ids == ["é.jpg", "b", "é.jpg"] and corpus.text_ids == ["t0", "t1", "t2"]
    assert corpus.meta["vocab_size"] == 70000 and corpus.extras[0]["target"]["scores"] == [0.9]
    with pytest.raises(ValueError, match=r"c2\.npz: text 't1': token id outside \[0, 70000\)"):
        write_text_corpus(tmp_path / "c2.npz", [np.array([1]), np.array([70000])], ["a", "b"], ["t0", "t1"], meta)
    with pytest.raises(ValueError, match=r"text id 't0' appears twice"):
        write_text_corpus(tmp_path / "c2.npz", texts[:2], ["a", "b"], ["t0", "t0"], meta)
    with pytest.raises(ValueError, match=r"meta lacks the key 'v_range'"):
        write_text_corpus(tmp_path / "c2.npz", texts, ["a"] * 3, ["a", "b", "c"], {"CLS": 1, "SEP": 2, "MASK": 3})
    with np.load(tmp_path / "c.npz") as npz:
        members = dict(npz)
    members["token_offsets"] = members["token_offsets"][::-1].copy()
    np.savez(tmp_path / "damaged.npz", **members)
    with pytest.raises(ValueError, match=r"damaged\.npz: token_offsets must rise"):
        read_text_corpus(tmp_path / "damaged.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.npz: cannot read it"):
        read_text_corpus(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match=r"nothing\.npz does not exist"):
        read_text_corpus(tmp_path / "nothing.npz")


def test_text_corpus_writer_refuses_ids_outside_the_vocabulary(tmp_path):
    meta = {"CLS": 1, "SEP": 2, "MASK": 3, "v_range": [5, 10]}
    with pytest.raises(ValueError, match=r"c\.npz: meta\['MASK'\] = 10 is outside the vocabulary of 10 ids"):
        write_text_corpus(tmp_path / "c.npz", [np.array([5])], ["a"], ["t0"], {**meta, "MASK": 10})
    with pytest.raises(ValueError, match=r"c\.npz: text 't1': token id outside \[0, 10\)"):
        write_text_corpus(tmp_path / "c.npz", [np.array([5]), np.array([6, -1])], ["a", "b"], ["t0", "t1"], meta)
    assert not (tmp_path / "c.npz").exists()


def test_text_corpus_keeps_ids_that_do_not_fit_uint16(tmp_path):
    meta = {"CLS": 1, "SEP": 2, "MASK": 3, "v_range": [5, 65537]}
    write_text_corpus(tmp_path / "c.npz", [np.array([65536, 65535, 5])], ["a"], ["t0"], meta)
    assert read_text_corpus(tmp_path / "c.npz")[0][0].tolist() == [65536, 65535, 5]


@pytest.mark.parametrize("change, match", [
    ({"image_name_offsets": np.array([0, 2, 1], dtype=np.int64)}, r"image_name_offsets must rise from 0 to 2"),
    ({"image_name_offsets": np.array([0, 1, 9], dtype=np.int64)}, r"image_name_offsets must rise from 0 to 2"),
    ({"image_name_offsets": np.array([0.0, 1, 2])}, r"image_name_offsets must be int64"),
    ({"text_ids": np.frombuffer(b"\xff0t1", dtype=np.uint8)}, r"text_ids entry 0 is not UTF-8 text"),
    ({"text_ids": np.array([116, 48, 116, 49])}, r"text_ids must be 1-D uint8 bytes, got int64"),
    ({"meta": np.array("{not json")}, r"meta is not valid JSON"),
    ({"version": np.array("one")}, r"version 'one' is not supported"),
    ({"image_index": np.array([0, 2], dtype=np.int32)}, r"image_index points outside the 2 image names"),
    ({"token_ids": np.array([5, 6, 10], dtype=np.uint16)}, r"text 't1': token id outside \[0, 10\)"),
])
def test_text_corpus_damaged_members_name_the_file(tmp_path, change, match):
    write_text_corpus(tmp_path / "c.npz", [np.array([5, 6]), np.array([7])], ["a", "b"], ["t0", "t1"],
                      {"CLS": 1, "SEP": 2, "MASK": 3, "v_range": [5, 10]})
    with np.load(tmp_path / "c.npz") as npz:
        members = {**dict(npz), **change}
    np.savez(tmp_path / "damaged.npz", **members)
    with pytest.raises(ValueError, match=r"text corpus .*damaged\.npz: " + match):
        read_text_corpus(tmp_path / "damaged.npz")


# ---- the command --------------------------------------------------------------------------------------------

def test_convert_command(tmp_path, rng, capsys):
    src = tmp_path / "npz"
    src.mkdir()
    for i in range(3):
        np.savez(src / f"{i}.npz", **fake_image(rng, 20))
    assert main(["convert", "npz", str(src), str(tmp_path / "store"), "--keep-boxes", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote 3 images, 60 regions" in out and "soft labels: stored" in out
    assert len(RegionStore(tmp_path / "store")) == 3
    make_text_db(tmp_path / "t.db", rng)
    assert main(["convert", "txtdb", str(tmp_path / "t.db"), str(tmp_path / "t.npz"), "--no-progress"]) == 0
    assert "wrote 12 texts" in capsys.readouterr().out
    np.savez(src / "3.npz", features=np.zeros((4, D), np.float16))
    assert main(["convert", "npz", str(src), str(tmp_path / "store2"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "uniter-fast convert npz: error:" in err and "3.npz: arrays: no 'norm_bb' array" in err
    assert main(["convert", "tsv", str(tmp_path / "none.tsv"), str(tmp_path / "s"), "--no-progress"]) == 1
    assert "none.tsv does not exist" in capsys.readouterr().err
    images = {"a.npz": fake_image(rng, 30), "b.npz": fake_image(rng, 12)}
    db = make_image_db(tmp_path / "img", images, name="feat_th0.2_max100_min10", compressed=True)
    (tmp_path / "img" / "nbb_th0.2_max100_min10.json").rename(tmp_path / "counts.json")
    assert main(["convert", "imagedb", str(db), str(tmp_path / "db-store"), "--nbb", str(tmp_path / "counts.json"),
                 "--no-progress"]) == 0
    assert "wrote 2 images, 42 regions" in capsys.readouterr().out
    assert main(["convert", "imagedb", str(db), str(tmp_path / "db-store2"), "--min-bb", "150",
                 "--all-boxes", "--no-progress"]) == 1
    assert "min_bb <= max_bb" in capsys.readouterr().err
