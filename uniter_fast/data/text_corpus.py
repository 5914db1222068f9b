"""The text corpus our pre-training data path reads: tokenised captions, their image ids, and the vocabulary.

One file, an uncompressed NumPy `.npz` (readable without pickle), format "uniter-fast-text-corpus" version 1:

| member               | dtype / shape          | what                                                            |
|----------------------|------------------------|-----------------------------------------------------------------|
| `format`, `version`  | str, int64 (0-d)       | "uniter-fast-text-corpus", 1                                    |
| `meta`               | str (0-d)              | JSON object: the vocabulary and where the corpus came from      |
| `token_ids`          | uint16 or int32 (T,)   | every text's WordPiece ids, concatenated, no [CLS]/[SEP]        |
| `token_offsets`      | int64 (N+1,)           | text i is token_ids[token_offsets[i]:token_offsets[i+1]]        |
| `text_ids`           | uint8 (bytes)          | UTF-8 text ids, concatenated; `text_id_offsets` int64 (N+1,)    |
| `image_names`        | uint8 (bytes)          | UTF-8 distinct image ids; `image_name_offsets` int64 (M+1,)     |
| `image_index`        | int32 (N,)             | text i describes image image_names[image_index[i]]              |
| `extras`             | uint8 (bytes)          | per text, msgpack of the source record's other fields (a VQA    |
|                      |                        | target, ...); `extra_offsets` int64 (N+1,); empty when none     |

Strings are stored as bytes plus offsets rather than NumPy unicode arrays, which pad every id to the longest
(4 bytes a character): millions of ids would cost gigabytes. Token ids are uint16 when the vocabulary fits.

`meta` keeps the original text DB's meta.json keys (CLS, SEP, MASK, UNK, v_range, and the tokenizer name under
"bert" when the source had it) and adds ours: `vocab_size`, `source` (what it was converted from), and, when known,
`tokenizer` (a Hugging Face `tokenizers` JSON string, so ids can be decoded and a run can save its tokenizer).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import msgpack
import numpy as np

from uniter_fast.files import replacing

FORMAT = "uniter-fast-text-corpus"
VERSION = 1
REQUIRED_META = ("CLS", "SEP", "MASK", "v_range")
_MEMBERS = ("format", "version", "meta", "token_ids", "token_offsets", "text_ids", "text_id_offsets",
            "image_names", "image_name_offsets", "image_index", "extras", "extra_offsets")


@dataclass
class TextCorpus:
    """A text corpus in memory; `texts[i]` is a view into one token array."""

    texts: list[np.ndarray]
    image_ids: list[str]
    text_ids: list[str]
    meta: dict
    extras: list[dict] | None  # per text, the source record's other fields ({} when none); None: not read

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def check_meta(meta, where: str) -> dict:
    """The vocabulary keys the data path needs; adds vocab_size = v_range[1] (the original's len(vocab))."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: meta must be a JSON object, got {type(meta).__name__}")
    for key in REQUIRED_META:
        if key not in meta:
            raise ValueError(f"{where}: meta lacks the key {key!r} (needs {', '.join(REQUIRED_META)})")
    for key in ("CLS", "SEP", "MASK"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0:
            raise ValueError(f"{where}: meta[{key!r}] must be a non-negative integer id, got {meta[key]!r}")
    v_range = meta["v_range"]
    if (not isinstance(v_range, (list, tuple)) or len(v_range) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in v_range) or not 0 <= v_range[0] < v_range[1]):
        raise ValueError(f"{where}: meta['v_range'] must be [low, high) ids with 0 <= low < high, got {v_range!r}")
    meta = {**meta, "v_range": list(v_range)}
    meta.setdefault("vocab_size", v_range[1])
    size = meta["vocab_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < v_range[1]:
        raise ValueError(f"{where}: meta['vocab_size'] must be an integer >= v_range[1] = {v_range[1]}, got {size!r}")
    for key in ("CLS", "SEP", "MASK"):
        if meta[key] >= size:
            raise ValueError(f"{where}: meta[{key!r}] = {meta[key]} is outside the vocabulary of {size} ids")
    return meta


def _pack_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unpack_strings(data: np.ndarray, offsets: np.ndarray, name: str, where: str) -> list[str]:
    raw = data.tobytes()
    strings = []
    for i, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        try:
            strings.append(raw[a:b].decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}: {name} entry {i} is not UTF-8 text ({err}): the file is damaged") from None
    return strings


def write_text_corpus(path: str | Path, texts: Sequence, image_ids: Sequence[str], text_ids: Sequence[str],
                      meta: dict, extras: Sequence[dict] | None = None) -> None:
    """Write a corpus file atomically (a temporary file renamed into place). Ids without [CLS]/[SEP]."""
    path = Path(path)
    where = f"text corpus {path}"
    n = len(texts)
    if len(image_ids) != n or len(text_ids) != n or (extras is not None and len(extras) != n):
        raise ValueError(f"{where}: {n} texts, {len(image_ids)} image ids, {len(text_ids)} text ids"
                         + ("" if extras is None else f", {len(extras)} extras") + ": they must match")
    meta = check_meta(meta, where)
    seen: set[str] = set()
    for text_id, image_id in zip(text_ids, image_ids):
        if not isinstance(text_id, str) or not isinstance(image_id, str):
            raise ValueError(f"{where}: text {text_id!r}: text and image ids must be strings, got {image_id!r}")
        if text_id in seen:
            raise ValueError(f"{where}: text id {text_id!r} appears twice")
        seen.add(text_id)
    token_dtype = np.uint16 if meta["vocab_size"] <= np.iinfo(np.uint16).max + 1 else np.int32
    arrays = [np.asarray(t) for t in texts]
    for text_id, ids in zip(text_ids, arrays):
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"{where}: text {text_id!r}: token ids must be a 1-D integer sequence, got {ids.dtype} "
                             f"{ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= meta["vocab_size"]):
            raise ValueError(f"{where}: text {text_id!r}: token id outside [0, {meta['vocab_size']})")
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.size for a in arrays])
    tokens = np.concatenate([a.astype(token_dtype) for a in arrays]) if n else np.zeros(0, token_dtype)
    names = list(dict.fromkeys(image_ids))
    index_of = {name: i for i, name in enumerate(names)}
    blobs = [b"" if not e else msgpack.packb(e, use_bin_type=True) for e in (extras or [{}] * n)]
    extra_offsets = np.zeros(n + 1, dtype=np.int64)
    extra_offsets[1:] = np.cumsum([len(b) for b in blobs])
    text_bytes, text_offsets = _pack_strings(text_ids)
    name_bytes, name_offsets = _pack_strings(names)
    members = {
        "format": np.array(FORMAT), "version": np.array(VERSION, dtype=np.int64),
        "meta": np.array(json.dumps(meta, sort_keys=True)),
        "token_ids": tokens, "token_offsets": offsets,
        "text_ids": text_bytes, "text_id_offsets": text_offsets,
        "image_names": name_bytes, "image_name_offsets": name_offsets,
        "image_index": np.array([index_of[i] for i in image_ids], dtype=np.int32),
        "extras": np.frombuffer(b"".join(blobs), dtype=np.uint8), "extra_offsets": extra_offsets,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **members)


def _check_offsets(offsets: np.ndarray, count: int, total: int, name: str, where: str) -> None:
    if offsets.dtype != np.int64 or offsets.shape != (count + 1,):
        raise ValueError(f"{where}: {name} must be int64 of shape ({count + 1},), got {offsets.dtype} {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != total or (np.diff(offsets) < 0).any():
        raise ValueError(f"{where}: {name} must rise from 0 to {total}: the file is damaged")


def load_text_corpus(path: str | Path, *, extras: bool = True) -> TextCorpus:
    """Read and check a corpus file; errors name the file and, for a bad record, its text id.

    extras=False skips decoding the per-text extra fields (pre-training reads only ids).
    """
    read_extras = extras
    path = Path(path)
    where = f"text corpus {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [m for m in _MEMBERS if m not in npz.files]
            if missing:
                raise ValueError(f"{where}: not a {FORMAT} file (missing {missing})")
            m = {name: npz[name] for name in _MEMBERS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: cannot read it as a {FORMAT} .npz: {err}") from None
    if str(m["format"]) != FORMAT:
        raise ValueError(f"{where}: format {str(m['format'])!r}, expected {FORMAT!r}")
    version = m["version"]
    if version.shape != () or version.dtype.kind not in "iu" or int(version) != VERSION:
        raise ValueError(f"{where}: version {version.tolist()!r} is not supported (this reader knows {VERSION})")
    try:
        meta = json.loads(str(m["meta"]))
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: meta is not valid JSON: {err}") from None
    meta = check_meta(meta, where)
    for name in ("text_ids", "image_names", "extras"):
        if m[name].dtype != np.uint8 or m[name].ndim != 1:
            raise ValueError(f"{where}: {name} must be 1-D uint8 bytes, got {m[name].dtype} {m[name].shape}")
    tokens, index = m["token_ids"], m["image_index"]
    n = index.shape[0]
    if index.dtype != np.int32 or index.ndim != 1:
        raise ValueError(f"{where}: image_index must be 1-D int32, got {index.dtype} {index.shape}")
    if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.int32):
        raise ValueError(f"{where}: token_ids must be 1-D uint16 or int32, got {tokens.dtype} {tokens.shape}")
    _check_offsets(m["token_offsets"], n, tokens.shape[0], "token_offsets", where)
    _check_offsets(m["text_id_offsets"], n, m["text_ids"].shape[0], "text_id_offsets", where)
    _check_offsets(m["extra_offsets"], n, m["extras"].shape[0], "extra_offsets", where)
    name_offsets = m["image_name_offsets"]  # as many names as it has entries, less one
    _check_offsets(name_offsets, max(name_offsets.shape[0] - 1, 0) if name_offsets.ndim == 1 else 0,
                   m["image_names"].shape[0], "image_name_offsets", where)
    names = _unpack_strings(m["image_names"], name_offsets, "image_names", where)
    text_ids = _unpack_strings(m["text_ids"], m["text_id_offsets"], "text_ids", where)
    if n and (index.min() < 0 or index.max() >= len(names)):
        raise ValueError(f"{where}: image_index points outside the {len(names)} image names: the file is damaged")
    offsets = m["token_offsets"]
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= meta["vocab_size"]):
        bad = int(np.searchsorted(offsets, int(np.flatnonzero((tokens < 0) | (tokens >= meta["vocab_size"]))[0]),
                                  side="right")) - 1
        raise ValueError(f"{where}: text {text_ids[bad]!r}: token id outside [0, {meta['vocab_size']})")
    texts = [tokens[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    if not read_extras:
        return TextCorpus(texts, [names[i] for i in index.tolist()], text_ids, meta, None)
    raw_extras, extra_offsets = m["extras"].tobytes(), m["extra_offsets"].tolist()
    extras = []
    for i in range(n):
        blob = raw_extras[extra_offsets[i]:extra_offsets[i + 1]]
        try:
            extras.append(msgpack.unpackb(blob, raw=False, strict_map_key=False) if blob else {})
        except (ValueError, msgpack.UnpackException) as err:
            raise ValueError(f"{where}: text {text_ids[i]!r}: its extra fields do not decode: {err}") from None
    return TextCorpus(texts, [names[i] for i in index.tolist()], text_ids, meta, extras)


def read_text_corpus(path: str | Path) -> tuple[list[np.ndarray], list[str], list[str], dict]:
    """(texts, image_ids, text_ids, meta) of a corpus file: token ids without [CLS]/[SEP], one entry per text."""
    corpus = load_text_corpus(path, extras=False)
    return corpus.texts, corpus.image_ids, corpus.text_ids, corpus.meta


def corpus_meta_from_tokenizer(tokenizer, source: dict | None = None) -> dict:
    """The meta of a corpus tokenised by our Tokenizer: the original's meta.json keys plus the tokenizer itself."""
    tokenizer_json = tokenizer.to_str()
    return {"CLS": tokenizer.cls_id, "SEP": tokenizer.sep_id, "MASK": tokenizer.mask_id, "UNK": tokenizer.unk_id,
            "PAD": tokenizer.pad_id, "v_range": list(tokenizer.vocab_range), "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer_json, "source": source or {}}


def tokenizer_from_meta(meta: dict, where: str = "text corpus"):
    """The Tokenizer a corpus was written with, or None when its meta carries none (e.g. an original text DB)."""
    from uniter_fast.data.tokenizer import Tokenizer

    if not meta.get("tokenizer"):
        return None
    tokenizer = Tokenizer.from_str(meta["tokenizer"], source=f"{where}: meta['tokenizer']")
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise ValueError(f"{where}: meta['tokenizer'] has {tokenizer.vocab_size} ids but vocab_size is "
                         f"{meta['vocab_size']}")
    return tokenizer
