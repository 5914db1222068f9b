import numpy as np
import pytest
import torch

from uniter_fast.data.packing import PackedRegions, box7, pack_batch
from helpers import random_samples


def test_round_trip_restores_every_token_and_region():
    texts, regions = random_samples(6, seed=1)
    batch = pack_batch(texts, regions)
    # a "hidden state" that is the input itself: ids in column 0 for text rows, region features for region rows
    hidden = torch.zeros(batch.total_tokens, 24)
    hidden[batch.text_rows, 0] = batch.input_ids.float()
    hidden[batch.region_rows] = batch.img_feat
    for (text_out, region_out), ids, reg in zip(batch.split(hidden), texts, regions):
        assert torch.equal(text_out[:, 0].long(), ids)
        expected = reg[0] if reg is not None else torch.zeros(0, 24)
        assert torch.equal(region_out, expected)


def test_layout_is_text_then_regions_without_padding():
    texts, regions = random_samples(5, seed=2)
    batch = pack_batch(texts, regions)
    lens = [len(t) + (0 if r is None else r[0].shape[0]) for t, r in zip(texts, regions)]
    assert batch.cu_seqlens.tolist() == [0, *np.cumsum(lens).tolist()]
    assert batch.total_tokens == sum(lens)
    assert batch.max_seqlen == max(lens)
    assert batch.cu_seqlens.dtype == torch.int32
    # gather_index is a permutation of cat(text, regions)
    assert sorted(batch.gather_index.tolist()) == list(range(batch.total_tokens))
    start = 0
    for b, t in enumerate(texts):
        first = batch.cu_seqlens[b].item()
        assert batch.text_rows[start:start + len(t)].tolist() == list(range(first, first + len(t)))
        assert batch.position_ids[start:start + len(t)].tolist() == list(range(len(t)))
        start += len(t)
    assert torch.equal(batch.cls_rows, batch.cu_seqlens[:-1].long())
    assert batch.token_type_ids.eq(0).all() and batch.img_type_ids.eq(1).all()


def test_padded_views_match_per_sample_slices():
    texts, regions = random_samples(4, seed=3)
    batch = pack_batch(texts, regions)
    hidden = torch.randn(batch.total_tokens, 5)
    text_pad, region_pad = batch.pad_text(hidden), batch.pad_regions(hidden)
    assert text_pad.shape == (4, batch.max_text_len, 5) and region_pad.shape == (4, batch.max_regions, 5)
    for b, (t, r) in enumerate(batch.split(hidden)):
        assert torch.equal(text_pad[b, :len(t)], t) and text_pad[b, len(t):].eq(0).all()
        assert torch.equal(region_pad[b, :len(r)], r) and region_pad[b, len(r):].eq(0).all()


def test_seven_dim_box_adds_area():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6, 0.4, 0.4]])
    assert torch.allclose(box7(boxes), torch.tensor([[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16]]))
    batch = pack_batch([torch.tensor([1, 2])], [(torch.zeros(1, 3), boxes)])
    assert batch.img_pos.shape == (1, 7) and batch.img_pos[0, 6].item() == pytest.approx(0.16)


def test_bad_inputs_name_the_sample():
    with pytest.raises(ValueError, match="sample 1: boxes must have 6 or 7 columns"):
        pack_batch([torch.tensor([1]), torch.tensor([1])], [None, (torch.zeros(2, 4), torch.zeros(2, 5))])
    with pytest.raises(ValueError, match="sample 0 has neither text nor regions"):
        pack_batch([torch.tensor([], dtype=torch.long)], [None])
    with pytest.raises(ValueError, match="sample 1: feature dim 5 differs"):
        pack_batch([torch.tensor([1]), torch.tensor([1])],
                   [(torch.zeros(1, 4), torch.zeros(1, 6)), (torch.zeros(1, 5), torch.zeros(1, 6))])
    with pytest.raises(ValueError, match="2 texts but 1 region"):
        pack_batch([torch.tensor([1]), torch.tensor([1])], [None])
    with pytest.raises(ValueError, match="img_masks shape"):
        pack_batch([torch.tensor([1])], [(torch.zeros(2, 4), torch.zeros(2, 6))], img_masks=[np.zeros(3, bool)])
    with pytest.raises(ValueError, match="img_masks shape"):
        pack_batch([torch.tensor([1])], [(torch.zeros(2, 4), torch.zeros(2, 6))], img_masks=[np.zeros(1, bool)])
    with pytest.raises(ValueError, match="img_type_ids shape"):
        pack_batch([torch.tensor([1])], [(torch.zeros(2, 4), torch.zeros(2, 6))], img_type_ids=[np.ones(1, int)])
    with pytest.raises(ValueError, match="the batch is empty"):
        pack_batch([], [])
    # a negative count; counts for 4 rows of 3; 3 features but 2 boxes
    for counts, feature_rows, box_rows in (([4, -1], 3, 3), ([2, 2], 3, 3), ([1, 2], 3, 2)):
        regions = PackedRegions(torch.zeros(feature_rows, 4), torch.zeros(box_rows, 7), counts)
        with pytest.raises(ValueError, match="do not hold the counts"):
            pack_batch([torch.tensor([1]), torch.tensor([1])], regions)


def test_to_moves_tensors_and_keeps_ints():
    texts, regions = random_samples(2, seed=4)
    batch = pack_batch(texts, regions).to("cpu")
    assert isinstance(batch.max_seqlen, int) and batch.input_ids.device.type == "cpu"


def test_packed_regions_are_taken_without_a_copy():
    texts, regions = random_samples(5, seed=7)
    counts = [0 if r is None else r[0].shape[0] for r in regions]
    features = torch.cat([r[0] for r in regions if r is not None])
    boxes7 = torch.cat([box7(r[1]) for r in regions if r is not None])
    expected = pack_batch(texts, regions)
    got = pack_batch(texts, PackedRegions(features, boxes7, counts))
    for name in ("input_ids", "img_feat", "img_pos", "cu_seqlens", "gather_index", "text_rows", "region_rows"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert got.img_feat.data_ptr() == features.data_ptr()  # the gathered buffer itself
    with pytest.raises(ValueError, match="do not hold the counts"):
        pack_batch(texts, PackedRegions(features, boxes7, [c + 1 for c in counts]))
    with pytest.raises(ValueError, match="packed regions: boxes must have 6 or 7 columns, got 5"):
        pack_batch(texts, PackedRegions(features, boxes7[:, :5], counts))
    with pytest.raises(ValueError, match="5 texts but 4 region entries"):
        pack_batch(texts, PackedRegions(features, boxes7, [*counts[:-2], counts[-2] + counts[-1]]))


def test_packed_regions_with_six_column_boxes_get_the_area():
    texts, regions = random_samples(4, seed=8, allow_empty_regions=False)
    counts = [r[0].shape[0] for r in regions]
    boxes6 = torch.cat([r[1] for r in regions])
    got = pack_batch(texts, PackedRegions(torch.cat([r[0] for r in regions]), boxes6, counts))
    assert got.img_pos.shape == (sum(counts), 7)
    assert torch.equal(got.img_pos[:, :6], boxes6)
    assert torch.allclose(got.img_pos[:, 6], boxes6[:, 4] * boxes6[:, 5])
    assert torch.equal(got.img_pos, pack_batch(texts, regions).img_pos)


def test_fp16_features_are_kept_as_stored():
    """A text-only sample first must not decide the features' dtype or width."""
    texts, regions = random_samples(3, seed=9, allow_empty_regions=False)
    regions = [None] + [(f.half(), b) for f, b in regions[1:]]
    batch = pack_batch(texts, regions)
    assert batch.img_feat.dtype == torch.float16 and batch.img_feat.shape[1] == 24
    assert torch.equal(batch.img_feat, torch.cat([r[0] for r in regions[1:]]))
    assert batch.img_pos.dtype == torch.float32


def test_given_type_ids_and_masks_are_packed_in_sample_order():
    texts, regions = random_samples(5, seed=10)
    counts = [0 if r is None else r[0].shape[0] for r in regions]
    rng = np.random.default_rng(0)
    token_types = [rng.integers(0, 2, size=len(t)) for t in texts]
    img_types = [rng.integers(0, 2, size=n) for n in counts]
    masks = [rng.random(n) < 0.5 for n in counts]
    batch = pack_batch(texts, regions, token_type_ids=token_types, img_type_ids=img_types, img_masks=masks)
    assert batch.token_type_ids.tolist() == np.concatenate(token_types).tolist()
    assert batch.img_type_ids.tolist() == np.concatenate(img_types).tolist()
    assert batch.img_masks.dtype == torch.bool and batch.img_masks.tolist() == np.concatenate(masks).tolist()
    assert 0 < batch.token_type_ids.sum() < len(batch.token_type_ids)  # the test would see them ignored
    assert 0 < batch.img_type_ids.sum() < len(batch.img_type_ids)
    with pytest.raises(ValueError, match="sample 0: token_type_ids shape"):
        pack_batch(texts, regions, token_type_ids=[t[:-1] for t in token_types])


def test_ids_past_two_to_the_53_are_kept_exactly_whatever_the_other_samples_hold():
    """Numpy samples are concatenated, not converted one by one: an empty list (float64 in numpy) beside them must not
    turn the batch's ids into floats."""
    big = np.array([101, 2**53 + 1, 102], dtype=np.int64)
    for other in ([], np.array([7.0]), np.array([5], dtype=np.uint64)):
        one_region = (torch.zeros(1, 4), torch.zeros(1, 7))
        batch = pack_batch([big, other], [one_region, one_region])
        assert batch.input_ids[:3].tolist() == [101, 2**53 + 1, 102], other


def test_dtypes_follow_the_regions_not_an_empty_first_sample():
    """fp16 features stay fp16 when the first sample has none (an fp32 (0, d) tensor); packed fp16 boxes become
    fp32 positions, as per-sample ones do."""
    batch = pack_batch([torch.tensor([1]), torch.tensor([2])],
                       [(torch.zeros(0, 4), torch.zeros(0, 6)),
                        (torch.ones(2, 4, dtype=torch.float16), torch.rand(2, 6))])
    assert batch.img_feat.dtype == torch.float16 and batch.img_pos.dtype == torch.float32
    packed = pack_batch([torch.tensor([1])], PackedRegions(torch.zeros(2, 4, dtype=torch.float16),
                                                           torch.rand(2, 7, dtype=torch.float16), [2]))
    assert packed.img_pos.dtype == torch.float32


def test_token_type_ids_longer_than_the_text_are_refused():
    with pytest.raises(ValueError, match="sample 0: token_type_ids shape"):
        pack_batch([torch.tensor([1, 2])], [None], token_type_ids=[torch.zeros(3, dtype=torch.long)])
