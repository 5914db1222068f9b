"""The original UNITER text DB (reference/uniter.md 4.3) -> our text corpus file (uniter_fast.data.text_corpus).

A text DB is a directory `*.db/`: an LMDB whose values are lz4-frame-compressed msgpack dicts keyed by text id
(`input_ids`: WordPiece ids without [CLS]/[SEP], `img_fname`: the image DB key, plus task fields), and the JSON
side files `meta.json` (CLS, SEP, MASK, v_range, ...), `id2len.json` {text id: len(input_ids)}, `txt2img.json`
{text id: img_fname} and `img2txts.json` {img_fname: [text ids]}.

Texts are converted in id2len.json's order (the original's dataset order). Every record is checked against the
side files: id2len against len(input_ids), txt2img against img_fname, img2txts both ways, and every record and
every listed id must exist; errors name the DB and the text id. Task fields other than input_ids and img_fname
are kept in the corpus's per-text extras. A DB whose texts pair with two images (NLVR2, VCR) is not a
pre-training corpus and is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import lmdb
import lz4.frame
import msgpack
import numpy as np

from uniter_fast.data.convert.common import ConversionError, ConversionSummary, progress_bar
from uniter_fast.data.text_corpus import check_meta, write_text_corpus

SIDE_FILES = ("meta.json", "id2len.json", "txt2img.json", "img2txts.json")


def _read_json(path: Path, kind: type):
    if not path.is_file():
        raise FileNotFoundError(f"text DB file {path} does not exist")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(path, None, f"not valid JSON: {err}") from None
    if not isinstance(value, kind):
        raise ConversionError(path, None, f"expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def decode_text_record(value: bytes) -> dict:
    """lz4 frame -> msgpack dict (the original's TxtLmdb.__getitem__)."""
    record = msgpack.unpackb(lz4.frame.decompress(value), raw=False, strict_map_key=False)
    if not isinstance(record, dict):
        raise ValueError(f"expected a msgpack dict, got {type(record).__name__}")
    return record


def _check_record(record: dict, text_id: str, id2len: dict, txt2img: dict, db: Path) -> tuple[list, str]:
    where = f"text {text_id!r}"
    for key in ("input_ids", "img_fname"):
        if key not in record:
            raise ConversionError(db, where, f"the record has no {key!r} (has {sorted(record)})")
    ids, image = record["input_ids"], record["img_fname"]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConversionError(db, where, f"input_ids must be a list of integers, got {str(ids)[:80]}")
    if isinstance(image, list):
        raise ConversionError(db, where, f"img_fname is a list {image!r} (an NLVR2 or VCR DB): a pre-training "
                              "corpus pairs each text with one image")
    if not isinstance(image, str) or not image:
        raise ConversionError(db, where, f"img_fname must be an image name, got {image!r}")
    if id2len[text_id] != len(ids):
        raise ConversionError(db, where, f"id2len.json says {id2len[text_id]} tokens, the record holds {len(ids)}")
    if text_id not in txt2img:
        raise ConversionError(db, where, "has no entry in txt2img.json")
    if txt2img[text_id] != image:
        raise ConversionError(db, where, f"txt2img.json maps it to {txt2img[text_id]!r}, the record's img_fname is "
                              f"{image!r}")
    return ids, image


def _check_side_files(db: Path, ids: list[str], txt2img: dict, img2txts: dict) -> None:
    """txt2img and img2txts describe exactly the DB's texts, each under its own image."""
    known = set(ids)
    extra = [t for t in txt2img if t not in known]
    if extra:
        raise ConversionError(db / "txt2img.json", f"text {extra[0]!r}", f"is not in id2len.json "
                              f"({len(extra)} such texts)")
    listed: set[str] = set()
    for image, texts in img2txts.items():
        if not isinstance(texts, list):
            raise ConversionError(db / "img2txts.json", f"image {image!r}", "must map to a list of text ids")
        for t in texts:
            if t not in known:
                raise ConversionError(db / "img2txts.json", f"text {t!r}", f"listed under image {image!r} is not "
                                      "in id2len.json")
            if txt2img[t] != image:
                raise ConversionError(db / "img2txts.json", f"text {t!r}", f"is listed under image {image!r} but "
                                      f"txt2img.json maps it to {txt2img[t]!r}")
            listed.add(t)
    unlisted = [t for t in ids if t not in listed]
    if unlisted:
        raise ConversionError(db / "img2txts.json", f"text {unlisted[0]!r}", f"is not listed under its image "
                              f"{txt2img[unlisted[0]]!r} ({len(unlisted)} such texts)")


def convert_text_db(src: str | Path, dst: str | Path, *, progress: bool = True) -> ConversionSummary:
    """Convert the text DB directory `src` into the corpus file `dst` (e.g. coco_train.corpus.npz)."""
    db = Path(src)
    if Path(dst).exists():  # as a region store: never written over (another corpus there would be lost)
        raise FileExistsError(f"{dst} already exists: remove it or choose another output path")
    if not (db / "data.mdb").is_file():
        raise FileNotFoundError(f"text DB {db}: no LMDB there ({db / 'data.mdb'} does not exist)")
    meta = _read_json(db / "meta.json", dict)
    try:
        meta = check_meta(meta, str(db / "meta.json"))
    except ValueError as err:
        raise ConversionError(db / "meta.json", None, str(err).split(": ", 1)[-1]) from None
    id2len = _read_json(db / "id2len.json", dict)
    txt2img = _read_json(db / "txt2img.json", dict)
    img2txts = _read_json(db / "img2txts.json", dict)
    ids = list(id2len)
    for text_id, n in id2len.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConversionError(db / "id2len.json", f"text {text_id!r}",
                                  f"length must be a non-negative integer, got {n!r}")

    texts, images, extras = [], [], []
    vocab_size = meta["vocab_size"]
    env = lmdb.open(str(db), readonly=True, lock=False, readahead=False, subdir=True)
    try:
        with env.begin(buffers=True) as txn:
            stored = txn.stat()["entries"]
            with progress_bar(total=len(ids), desc=f"convert {db.name}", unit="text", enabled=progress) as bar:
                for text_id in ids:
                    where = f"text {text_id!r}"
                    value = txn.get(text_id.encode("utf-8"))
                    if value is None:
                        raise ConversionError(db, where, "is in id2len.json but has no record in the LMDB")
                    try:
                        record = decode_text_record(bytes(value))
                    except (ValueError, RuntimeError, TypeError, msgpack.UnpackException) as err:
                        raise ConversionError(db, where, f"corrupt record (not lz4-compressed msgpack): "
                                              f"{type(err).__name__}: {err}") from None
                    token_ids, image = _check_record(record, text_id, id2len, txt2img, db)
                    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
                        raise ConversionError(db, where, f"token id outside the vocabulary [0, {vocab_size}) of "
                                              "meta.json's v_range")
                    texts.append(np.asarray(token_ids, dtype=np.int64))
                    images.append(image)
                    extras.append({k: v for k, v in record.items() if k not in ("input_ids", "img_fname")})
                    bar.update(1)
            if stored != len(ids):
                known = {t.encode("utf-8") for t in ids}
                with txn.cursor() as cursor:
                    extra = next(bytes(k) for k in cursor.iternext(keys=True, values=False) if bytes(k) not in known)
                raise ConversionError(db, f"key {extra.decode('utf-8', 'replace')!r}", f"has a record but is not in "
                                      f"id2len.json ({stored - len(ids)} such records)")
    finally:
        env.close()
    _check_side_files(db, ids, txt2img, img2txts)
    meta = {**meta, "source": {"kind": "uniter-txtdb", "path": str(db.resolve())}}
    write_text_corpus(dst, texts, images, ids, meta, extras=extras if any(extras) else None)
    return ConversionSummary(str(dst), images=len(set(images)), texts=len(texts),
                             tokens=sum(len(t) for t in texts))
