"""BERT WordPiece tokenizer, as UNITER uses it, over the Hugging Face `tokenizers` library.

`encode` returns ids without [CLS]/[SEP], like the `input_ids` of the original text DB (reference/uniter.md
4.3); the model's collate adds them. Cased by default, like UNITER's bert-base-cased.
"""
from __future__ import annotations

import string
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)   # trained vocabularies put them at ids 0..4
FIRST_REAL_TOKEN = "!"   # UNITER draws random replacement tokens from id('!') up to the vocabulary size


def _bert_pipeline(model: models.Model, lowercase: bool) -> _HFTokenizer:
    """BERT's normaliser, pre-tokenizer and decoder around a WordPiece model."""
    tok = _HFTokenizer(model)
    # bert-base-cased keeps accents; uncased BERT strips them along with case
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=lowercase, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _parse(read, source: str) -> _HFTokenizer:
    """`read()`, a tokenizers JSON parser; its failures named after `source`."""
    try:
        return read()
    except Exception as err:  # tokenizers raises its own Exception type
        raise ValueError(f"{source} is not a tokenizers JSON: {err}") from None


def _read_vocab(path: Path) -> dict[str, int]:
    """A BERT vocab.txt: one token a line, id = line number."""
    if not path.is_file():
        raise FileNotFoundError(f"vocab file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"vocab file {path} is not UTF-8 text: {err}") from None
    vocab: dict[str, int] = {}
    for i, token in enumerate(lines):
        if token in vocab:
            raise ValueError(f"vocab file {path}: token {token!r} appears twice (lines {vocab[token] + 1} and {i + 1})")
        vocab[token] = i
    for token in SPECIAL_TOKENS + (FIRST_REAL_TOKEN,):
        if token not in vocab:
            raise ValueError(f"vocab file {path} lacks the token {token!r}")
    return vocab


class Tokenizer:
    """WordPiece ids for UNITER: train one, read a BERT vocab.txt, or load a saved tokenizers JSON."""

    def __init__(self, hf_tokenizer: _HFTokenizer, source: str = "tokenizer") -> None:
        missing = [t for t in SPECIAL_TOKENS + (FIRST_REAL_TOKEN,) if hf_tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{source} lacks the tokens {missing}")
        hf_tokenizer.add_special_tokens(list(SPECIAL_TOKENS))   # already in the vocab: only stops them being split
        self._tok = hf_tokenizer

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1000, lowercase: bool = False) -> "Tokenizer":
        """A WordPiece vocabulary learnt from texts, the same on every call: the specials at ids 0..4, every printable
        ASCII character (so '!' exists and no ASCII text hits [UNK]), '##' + each character seen inside a word, then
        whole words by frequency (ties by spelling) up to vocab_size ids; ids follow the tokens' sorted order.

        A word left out is split into characters. (The `tokenizers` WordPiece trainer breaks ties between merges in
        hash order: its vocabulary differed between calls on the same captions.)
        """
        tok = _bert_pipeline(models.WordPiece(unk_token=UNK), lowercase)
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(word for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
        alphabet = set(string.printable) - set(string.whitespace)
        pieces = alphabet | {"##" + c for word in counts for c in word[1:]}
        words = sorted((w for w in counts if w not in pieces), key=lambda w: (-counts[w], w))
        room = max(vocab_size - len(SPECIAL_TOKENS) - len(pieces), 0)
        order = list(SPECIAL_TOKENS) + sorted(pieces | set(words[:room]))  # '!' (0x21) sorts first
        return cls(_bert_pipeline(models.WordPiece({t: i for i, t in enumerate(order)}, unk_token=UNK), lowercase))

    @classmethod
    def from_vocab_file(cls, path: str | Path, lowercase: bool = False) -> "Tokenizer":
        """A BERT vocab.txt (e.g. bert-base-cased's): ids follow the file's lines."""
        vocab = _read_vocab(Path(path))
        return cls(_bert_pipeline(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100), lowercase))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """A tokenizer written by `save` (the `tokenizers` JSON format)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        source = f"tokenizer file {path}"
        return cls(_parse(lambda: _HFTokenizer.from_file(str(path)), source), source=source)

    @classmethod
    def from_str(cls, text: str, source: str = "tokenizer JSON") -> "Tokenizer":
        """A tokenizer from the text `save` writes; errors name `source`."""
        return cls(_parse(lambda: _HFTokenizer.from_str(text), source), source=source)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    def to_str(self) -> str:
        """The text `save` writes (from_str reads it)."""
        return self._tok.to_str(pretty=True)

    # ---- ids -------------------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id(PAD)

    @property
    def unk_id(self) -> int:
        return self._tok.token_to_id(UNK)

    @property
    def cls_id(self) -> int:
        return self._tok.token_to_id(CLS)

    @property
    def sep_id(self) -> int:
        return self._tok.token_to_id(SEP)

    @property
    def mask_id(self) -> int:
        return self._tok.token_to_id(MASK)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_range(self) -> tuple[int, int]:
        """[id of '!', vocab_size): where MLM draws random replacement tokens (the original's meta.json v_range)."""
        return self._tok.token_to_id(FIRST_REAL_TOKEN), self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    # ---- text <-> ids ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """WordPiece ids without [CLS]/[SEP]."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, vocab_range={self.vocab_range})"
