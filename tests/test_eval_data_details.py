"""Details of retrieval recall, validation, token batching, the text corpus file and the tokenizer that the broader
tests leave open (found by mutation testing): each expected value comes from a definition, computed here."""
from __future__ import annotations

import itertools
import string
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, processors

from uniter_fast.data.pretrain import MaskingOptions, PretrainCorpus, Vocab
from uniter_fast.data.sampler import TokenBucketSampler
from uniter_fast.data.text_corpus import (check_meta, corpus_meta_from_tokenizer, load_text_corpus,
                                          tokenizer_from_meta, write_text_corpus)
from uniter_fast.data.tokenizer import Tokenizer
from uniter_fast.eval.retrieval import recall_at_k, score_matrix
from uniter_fast.eval.validation import validate

# --- retrieval recall -----------------------------------------------------------------------------------------


def _chance_in_top_k(scores: list[float], true: set[int], k: int) -> Fraction:
    """Exact chance that some true item is among the first k when items are sorted by score, descending, ties in
    uniformly random order: every tie-break order (a permutation used as secondary key) is equally likely."""
    n = len(scores)
    if not true:
        return Fraction(0)
    hits = 0
    perms = list(itertools.permutations(range(n)))
    for priority in perms:
        ranking = sorted(range(n), key=lambda j: (-scores[j], priority[j]))
        hits += any(j in true for j in ranking[:k])
    return Fraction(hits, len(perms))


def _brute_force_recall(scores: np.ndarray, text_to_image: list[int], ks) -> dict[str, float]:
    n_texts, n_images = scores.shape
    out = {}
    for k in ks:
        ir = [_chance_in_top_k(scores[t].tolist(), {text_to_image[t]}, k) for t in range(n_texts)]
        out[f"ir_r{k}"] = float(100 * sum(ir) / n_texts)
    for k in ks:
        tr = [_chance_in_top_k(scores[:, i].tolist(), {t for t in range(n_texts) if text_to_image[t] == i}, k)
              for i in range(n_images)]
        out[f"tr_r{k}"] = float(100 * sum(tr) / n_images)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_recall_matches_brute_force_random_tie_breaking(seed):
    """Recall@k in both directions equals the exact chance under random tie-breaking, over score matrices with many
    ties, several captions per image, an image with no caption, and k above the number of candidates."""
    rng = np.random.default_rng(seed)
    n_texts, n_images = 5, 4
    scores = rng.integers(0, 3, size=(n_texts, n_images)).astype(np.float64) / 4
    gt = rng.integers(0, n_images - 1, size=n_texts).tolist()  # the last image never has a caption
    ks = (1, 2, 3, 10)
    got = recall_at_k(torch.from_numpy(scores), gt, ks=ks)
    expected = _brute_force_recall(scores, gt, ks)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def test_image_without_captions_never_counts_as_a_hit():
    """Even with k above the number of texts, an image nobody describes has no caption to retrieve."""
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4]])
    r = recall_at_k(scores, [0, 1], ks=(1, 5))
    assert r["tr_r5"] == pytest.approx(200 / 3) and r["tr_r1"] == pytest.approx(200 / 3)


def test_close_scores_are_not_ties():
    """Scores closer than half precision resolves still rank: the true image above by 1e-4 is first."""
    scores = torch.tensor([[1.0001, 1.0], [1.0, 1.0001]], dtype=torch.float32)
    r = recall_at_k(scores, [0, 1], ks=(1,))
    assert r == {"ir_r1": 100.0, "tr_r1": 100.0}


class _FineScorer:
    """itm_scores = (text code, the token after [CLS]) + (image code, its first feature) / 1000, in float32."""

    def itm_scores(self, batch):
        text_start = torch.cumsum(batch.text_lens, 0) - batch.text_lens
        region_start = torch.cumsum(batch.region_lens, 0) - batch.region_lens
        return batch.input_ids[text_start + 1].float() + batch.img_feat[region_start.long(), 0].float() / 1000


def test_score_matrix_keeps_full_precision():
    """Scores 1/1000 apart (below half precision at 7) stay apart: recall must not see ties the model did not make."""
    texts = [np.array([1, code, 2]) for code in (7, 8)]
    images = [SimpleNamespace(features=np.full((2, 24), float(j), dtype=np.float32),
                              norm_bb=np.tile(np.array([0.1, 0.1, 0.5, 0.5, 0.4, 0.4], dtype=np.float32), (2, 1)))
              for j in range(2)]
    scores = score_matrix(_FineScorer(), texts, images, device=torch.device("cpu"), pairs_per_batch=3)
    expected = torch.tensor([[7.0, 7.001], [8.0, 8.001]], dtype=torch.float32)
    assert torch.allclose(scores, expected, rtol=1e-6, atol=0)


# --- validation -----------------------------------------------------------------------------------------------


class _MaskRecorder:
    """Records the masked words MLM validation is given."""

    training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, batch):
        self.seen.append(batch.mlm_labels.tolist())
        return SimpleNamespace(metrics={"n": torch.tensor(1.0)})


def _one_caption_corpus():
    """One caption, so every seed gives the same single batch: only the masks can differ."""
    images = {"img0": SimpleNamespace(features=np.ones((4, 8), np.float32),
                                      norm_bb=np.tile(np.array([0.1, 0.1, 0.5, 0.5, 0.4, 0.4], np.float32), (4, 1)),
                                      soft_labels=np.full((4, 5), 0.2, np.float32))}
    return PretrainCorpus([np.arange(10, 40)], ["img0"], images, Vocab(1, 2, 3, (10, 40)))


def test_validation_masks_depend_on_the_seed():
    """`seed` fixes the masks (reference: fixed masks for a seed): the same seed repeats them, other seeds draw
    other words to mask (each word id here is its position, so the labels show which words were masked)."""
    corpus = _one_caption_corpus()

    def masked(seed):
        model = _MaskRecorder()
        model.seen = []
        validate(model, corpus, ["mlm"], batch_tokens=400, num_batches=1, options=MaskingOptions(),
                 device=torch.device("cpu"), seed=seed)
        return model.seen

    assert masked(1) == masked(1)
    assert len({str(masked(seed)) for seed in range(1, 6)}) > 1


# --- token batching -------------------------------------------------------------------------------------------


def test_buckets_are_filled_longest_first():
    """Sorted longest first, the longest examples open the batches and the ragged leftover holds the shortest
    (reference 3.6): 8 of length 20 and 16 of length 10 within 320 tokens -> [20 x 8 + 10 x 8] and [10 x 8]."""
    lens = np.array([10] * 16 + [20] * 8)
    batches = TokenBucketSampler(lens, batch_tokens=320, size_multiple=8, seed=0).epoch(0)
    by_size = sorted(batches, key=len)
    assert [len(b) for b in by_size] == [8, 16]
    assert sorted(lens[by_size[0]].tolist()) == [10] * 8
    assert sorted(lens[by_size[1]].tolist()) == [10] * 8 + [20] * 8


def test_neighbouring_seeds_do_not_replay_each_others_epochs():
    """Seed s, epoch e+1 is not seed s+1, epoch e: two runs with adjacent seeds see unrelated orders."""
    lens = np.random.default_rng(0).integers(10, 60, size=200)
    a = TokenBucketSampler(lens, batch_tokens=1200, seed=3).epoch(1)
    b = TokenBucketSampler(lens, batch_tokens=1200, seed=4).epoch(0)
    assert [x.tolist() for x in a] != [x.tolist() for x in b]


def test_a_budget_that_exactly_holds_the_longest_chunk_is_accepted():
    """size_multiple examples of the longest length filling the budget exactly is allowed (only more is refused)."""
    batches = TokenBucketSampler([10] * 16, batch_tokens=80, size_multiple=8).epoch(0)
    assert sorted(len(b) for b in batches) == [8, 8]


# --- text corpus file -----------------------------------------------------------------------------------------

_META = {"CLS": 1, "SEP": 2, "MASK": 3, "v_range": [5, 10]}


def _write_and_change(tmp_path, **change):
    write_text_corpus(tmp_path / "c.npz", [np.array([5, 6]), np.array([7])], ["a", "b"], ["t0", "t1"], _META)
    with np.load(tmp_path / "c.npz") as npz:
        members = {**dict(npz), **change}
    np.savez(tmp_path / "damaged.npz", **members)
    return tmp_path / "damaged.npz"


@pytest.mark.parametrize("change, match", [
    ({"image_index": np.array([0, -1], dtype=np.int32)}, r"image_index points outside"),
    ({"version": np.array(2, dtype=np.int64)}, r"version 2 is not supported"),
    ({"format": np.array("something-else")}, r"format 'something-else', expected"),
])
def test_damaged_or_foreign_corpus_is_refused_naming_the_file(tmp_path, change, match):
    """A negative image index (Python would wrap it to the last image), a newer version or another format."""
    with pytest.raises(ValueError, match=r"text corpus .*damaged\.npz: " + match):
        load_text_corpus(_write_and_change(tmp_path, **change))


@pytest.mark.parametrize("meta, match", [
    ({**_META, "v_range": [5, 5]}, r"meta\['v_range'\] must be \[low, high\)"),
    ({**_META, "CLS": True}, r"meta\['CLS'\] must be a non-negative integer"),
    ({**_META, "SEP": -1}, r"meta\['SEP'\] must be a non-negative integer"),
])
def test_meta_checks_name_the_key(meta, match):
    """An empty random-token range, a boolean or a negative special id are refused."""
    with pytest.raises(ValueError, match=r"^corpus x: " + match):
        check_meta(meta, "corpus x")


def test_meta_accepts_id_zero():
    """0 is a valid (non-negative) id for a special token."""
    assert check_meta({**_META, "CLS": 0}, "corpus x")["CLS"] == 0


def test_writer_refuses_image_ids_of_another_length(tmp_path):
    """One image id per text: a short list would write a corpus whose texts lose their images."""
    with pytest.raises(ValueError, match=r"c\.npz: 2 texts, 1 image ids, 2 text ids"):
        write_text_corpus(tmp_path / "c.npz", [np.array([5]), np.array([6])], ["a"], ["t0", "t1"], _META)
    assert not (tmp_path / "c.npz").exists()


def test_writer_refuses_fractional_token_ids(tmp_path):
    """Float ids would be truncated silently on write: refused, naming the text."""
    with pytest.raises(ValueError, match=r"c\.npz: text 't0': token ids must be a 1-D integer sequence"):
        write_text_corpus(tmp_path / "c.npz", [np.array([5.5, 6.0])], ["a"], ["t0"], _META)


def test_damaged_extra_offsets_are_refused_naming_the_file(tmp_path):
    """extra_offsets that do not rise from 0 to the extras' size are damage, not silently wrong extras."""
    path = _write_and_change(tmp_path, extra_offsets=np.array([0, 3, 0], dtype=np.int64))
    with pytest.raises(ValueError, match=r"text corpus .*damaged\.npz: extra_offsets must rise from 0 to 0"):
        load_text_corpus(path)


def _tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train(["a red dog", "a cat"], vocab_size=120)


def test_corpus_meta_carries_the_tokenizers_ids():
    """meta.json's CLS, SEP, MASK, UNK and v_range are the tokenizer's ids, as the original's meta.json."""
    tok = _tiny_tokenizer()
    meta = corpus_meta_from_tokenizer(tok)
    assert (meta["CLS"], meta["SEP"], meta["MASK"], meta["UNK"], meta["PAD"]) == (
        tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), tok.token_to_id("[MASK]"), tok.token_to_id("[UNK]"),
        tok.token_to_id("[PAD]"))
    assert meta["v_range"] == [tok.token_to_id("!"), len(tok.get_vocab())]


def test_tokenizer_of_another_size_than_the_corpus_is_refused():
    """A tokenizer whose vocabulary disagrees with the corpus's vocab_size would decode ids wrongly."""
    meta = corpus_meta_from_tokenizer(_tiny_tokenizer())
    with pytest.raises(ValueError, match=r"^c\.npz: meta\['tokenizer'\] has \d+ ids but vocab_size is 999"):
        tokenizer_from_meta({**meta, "vocab_size": 999}, "c.npz")


# --- tokenizer ------------------------------------------------------------------------------------------------

_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocab_tokenizer(tmp_path, extra=("a", "##a", "dog")) -> tuple[Tokenizer, list[str]]:
    lines = _SPECIALS + ["!", *extra]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Tokenizer.from_vocab_file(path), lines


def test_words_of_100_characters_are_split_and_longer_ones_are_unk(tmp_path):
    """BERT's WordPiece: a word over max_input_chars_per_word = 100 characters becomes [UNK]; 100 is still split."""
    tok, lines = _vocab_tokenizer(tmp_path)
    assert tok.encode("a" * 100) == [lines.index("a")] + [lines.index("##a")] * 99
    assert tok.encode("a" * 101) == [lines.index("[UNK]")]


def test_loaded_tokenizer_with_a_post_processor_still_encodes_without_cls_sep():
    """A tokenizers JSON that carries a [CLS] $A [SEP] template (as Hugging Face's bert tokenizer.json does) still
    encodes to bare ids: the corpus stores texts without [CLS]/[SEP] and the collate adds them."""
    vocab = {t: i for i, t in enumerate(_SPECIALS + ["!", "a", "dog"])}
    hf = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                               ("[SEP]", 3)])
    tok = Tokenizer.from_str(hf.to_str())
    assert tok.encode("a") == [vocab["a"]]
    assert tok.encode_batch(["a", "dog"]) == [[vocab["a"]], [vocab["dog"]]]


def test_loading_a_tokenizer_without_mask_names_the_file(tmp_path):
    """A saved tokenizer lacking [MASK] is refused on load, naming the file and the token."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "!", "a"])}
    path = tmp_path / "no_mask.json"
    HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]")).save(str(path))
    with pytest.raises(ValueError, match=r"no_mask\.json lacks the tokens \['\[MASK\]'\]"):
        Tokenizer.load(path)


def test_training_breaks_frequency_ties_by_spelling():
    """Room for one whole word among equally frequent ones: the one that sorts first by spelling is kept."""
    alphabet = set(string.printable) - set(string.whitespace)
    pieces = alphabet | {"##b", "##a"}  # second letters of "bb" and "aa"
    tok = Tokenizer.train(["bb aa"], vocab_size=len(_SPECIALS) + len(pieces) + 1)
    assert tok.token_to_id("aa") is not None and tok.token_to_id("bb") is None
    assert len(tok.encode("bb")) == 2


def test_chinese_characters_are_words_of_their_own(tmp_path):
    """BERT puts spaces around CJK characters: two unknown characters give two [UNK], not one."""
    tok, lines = _vocab_tokenizer(tmp_path)
    assert tok.encode("\u72d7\u732b") == [lines.index("[UNK]")] * 2


def test_control_characters_are_removed(tmp_path):
    """BERT's clean_text drops control characters, so 'dog\\x07' is the word 'dog', not an unknown word."""
    tok, lines = _vocab_tokenizer(tmp_path)
    assert tok.encode("dog\x07") == [lines.index("dog")]
