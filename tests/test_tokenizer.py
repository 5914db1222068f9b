"""The WordPiece tokenizer: trained on the synthetic captions, or read from a BERT vocab.txt."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from uniter_fast.data.synthetic import WorldConfig, make_world
from uniter_fast.data.tokenizer import Tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def captions() -> list[str]:
    world = make_world(WorldConfig(seed=5, num_train_images=120, num_val_images=30, img_dim=16))
    return [c.text for split in world.values() for c in split.captions]


@pytest.fixture(scope="module")
def tok(captions) -> Tokenizer:
    return Tokenizer.train(captions, vocab_size=500)


# ---- trained ----------------------------------------------------------------------------------------------

def test_trained_round_trip(tok, captions):
    for text in captions:
        ids = tok.encode(text)
        assert tok.unk_id not in ids, text
        assert tok.decode(ids) == text


def test_encode_has_no_cls_or_sep(tok, captions):
    ids = tok.encode(captions[0])
    assert tok.cls_id not in ids and tok.sep_id not in ids
    assert len(ids) == len(captions[0].replace(".", " .").replace(",", " ,").split())   # whole words: one id each
    assert tok.encode_batch(captions[:20]) == [tok.encode(t) for t in captions[:20]]


def test_trained_special_ids(tok):
    ids = [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id]
    assert ids == [tok.token_to_id(t) for t in SPECIALS]
    assert tok.pad_id == 0 and sorted(ids) == list(range(5))


def test_trained_specials_are_in_berts_order(tok):
    """[PAD] [UNK] [CLS] [SEP] [MASK], the relative order of bert-base-cased's ids 0, 100, 101, 102, 103."""
    assert [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id] == [0, 1, 2, 3, 4]


def test_decode_drops_cls_and_sep(tok, captions):
    ids = tok.encode(captions[0])
    assert tok.decode([tok.cls_id, *ids, tok.sep_id]) == captions[0]


def test_truncated_vocabulary_has_the_asked_size_and_keeps_the_frequent_words(captions):
    full = Tokenizer.train(captions, vocab_size=100_000)
    small = Tokenizer.train(captions, vocab_size=full.vocab_size - 10)
    assert small.vocab_size == full.vocab_size - 10
    counts = Counter(w for text in captions for w in re.findall(r"\w+|[^\w\s]", text))
    dropped = set(full.get_vocab()) - set(small.get_vocab())
    kept = [w for w in small.get_vocab() if w in counts and len(w) > 1]
    assert len(dropped) == 10 and dropped <= set(counts)
    assert max(counts[w] for w in dropped) <= min(counts[w] for w in kept)
    for word in dropped:  # a word left out is spelt in pieces, never [UNK]
        ids = small.encode(word)
        assert len(ids) > 1 and small.unk_id not in ids and small.decode(ids) == word


def test_words_outside_a_tiny_vocabulary_are_spelt_in_characters():
    tok = Tokenizer.train(["Ox and qa"], vocab_size=10)
    for word in ("Ox", "and", "qa"):  # '##x' and '##a' come only from a word's second letter
        ids = tok.encode(word)
        assert tok.unk_id not in ids and len(ids) == len(word) and tok.decode(ids) == word


def test_vocab_range_starts_at_exclamation_mark(tok):
    bang = tok.token_to_id("!")
    assert bang is not None
    assert tok.vocab_range == (bang, tok.vocab_size)
    assert tok.vocab_size <= 500
    # random MLM replacements never draw a special token
    drawable = {tok.id_to_token(i) for i in range(*tok.vocab_range)}
    assert not drawable & set(SPECIALS)
    assert len(drawable) == tok.vocab_size - bang


def test_trained_is_cased_unless_asked(captions):
    cased = Tokenizer.train(captions, vocab_size=500)
    assert cased.encode("A dog") != cased.encode("a dog")
    lower = Tokenizer.train(captions, vocab_size=500, lowercase=True)
    assert lower.encode("A Dog") == lower.encode("a dog")
    assert lower.decode(lower.encode("A Dog.")) == "a dog."


def test_mask_token_stays_whole(tok):
    ids = tok.encode("A red [MASK] on the left.")
    assert ids.count(tok.mask_id) == 1 and tok.unk_id not in ids


def test_unknown_characters_become_unk(tok):
    assert tok.unk_id in tok.encode("A \u00fcber dog")


def test_save_load_equal(tok, captions, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.vocab_range == tok.vocab_range
    assert [loaded.pad_id, loaded.unk_id, loaded.cls_id, loaded.sep_id, loaded.mask_id] == \
        [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id]
    assert loaded.encode_batch(captions) == tok.encode_batch(captions)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"version": "1.0"}', b"\xff\xfe binary"])
def test_load_unreadable_file_names_it(tmp_path, content):
    path = tmp_path / "broken_tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"tokenizer file .*broken_tokenizer\.json is not a tokenizers JSON"):
        Tokenizer.load(path)


def test_corpus_meta_with_a_bad_tokenizer_names_the_corpus(tok):
    from uniter_fast.data.text_corpus import corpus_meta_from_tokenizer, tokenizer_from_meta

    meta = corpus_meta_from_tokenizer(tok)
    assert tokenizer_from_meta(meta, "text corpus c.npz").get_vocab() == tok.get_vocab()
    for bad in ("{not json", 7):
        with pytest.raises(ValueError, match=r"^text corpus c\.npz: meta\['tokenizer'\] is not a tokenizers JSON: "
                                             r"(?!.*tokenizer file)"):
            tokenizer_from_meta({**meta, "tokenizer": bad}, "text corpus c.npz")


# ---- BERT vocab.txt ---------------------------------------------------------------------------------------

def _bert_like_vocab(drop: str | None = None) -> list[str]:
    """[PAD] at 0, [unusedN] filler, [UNK] [CLS] [SEP] [MASK] at 100-103, then real tokens like BERT's."""
    lines = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    lines += ["!", ",", ".", "A", "a", "The", "the", "dog", "red", "cat", "left", "of", "to", "##s", "un", "##der"]
    return [t for t in lines if t != drop]


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_from_vocab_file_follows_the_file(tmp_path):
    lines = _bert_like_vocab()
    tok = Tokenizer.from_vocab_file(_write(tmp_path, lines))
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.vocab_size == len(lines)
    assert tok.vocab_range == (lines.index("!"), len(lines))
    expected = [lines.index(t) for t in ["A", "red", "dog", "##s", "to", "the", "left", "of", "a", "cat", "."]]
    assert tok.encode("A red dogs to the left of a cat.") == expected
    assert tok.encode("under") == [lines.index("un"), lines.index("##der")]
    assert tok.encode("A zebra") == [lines.index("A"), 100]
    assert tok.decode(expected) == "A red dogs to the left of a cat."
    assert tok.encode("a [MASK] dog") == [lines.index("a"), 103, lines.index("dog")]


def test_from_vocab_file_splits_long_words_like_bert(tmp_path):
    """BERT gives [UNK] only to words over 100 characters; shorter ones are split into pieces."""
    lines = _bert_like_vocab()
    tok = Tokenizer.from_vocab_file(_write(tmp_path, lines))
    assert tok.encode("un" + "der" * 20) == [lines.index("un")] + [lines.index("##der")] * 20
    assert tok.encode("un" + "der" * 40) == [tok.unk_id]


def test_from_vocab_file_duplicate_token_names_it(tmp_path):
    path = _write(tmp_path, _bert_like_vocab() + ["dog"])
    with pytest.raises(ValueError, match=r"vocab\.txt: token 'dog' appears twice"):
        Tokenizer.from_vocab_file(path)


def test_from_vocab_file_lowercase(tmp_path):
    lines = _bert_like_vocab()
    tok = Tokenizer.from_vocab_file(_write(tmp_path, lines), lowercase=True)
    assert tok.encode("THE Dog") == [lines.index("the"), lines.index("dog")]


@pytest.mark.parametrize("missing", SPECIALS + ["!"])
def test_from_vocab_file_missing_token(tmp_path, missing):
    path = _write(tmp_path, _bert_like_vocab(drop=missing))
    with pytest.raises(ValueError) as err:
        Tokenizer.from_vocab_file(path)
    assert str(path) in str(err.value) and repr(missing) in str(err.value)


def test_from_vocab_file_not_utf8_names_it(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes("\n".join(_bert_like_vocab()).encode() + b"\n\xff\n")
    with pytest.raises(ValueError, match=r"vocab file .*vocab\.txt is not UTF-8 text"):
        Tokenizer.from_vocab_file(path)


def test_from_vocab_file_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_vocab.txt"):
        Tokenizer.from_vocab_file(tmp_path / "no_vocab.txt")


def test_training_is_deterministic(captions):
    """The `tokenizers` trainer broke ties in hash order (other tokens, other ids per call); ours does not."""
    first = Tokenizer.train(captions, vocab_size=120)
    for _ in range(3):
        again = Tokenizer.train(captions, vocab_size=120)
        assert again._tok.get_vocab() == first._tok.get_vocab()
        assert again.encode_batch(captions) == first.encode_batch(captions)
