"""The trunk against a direct transcription of the original's padded forward (reference/uniter.md 1.2-1.7)."""
import math

import pytest
import torch
import torch.nn.functional as F

from uniter_fast.data.packing import pack_batch
from uniter_fast.kernels.reference import attention_probs_ref, varlen_attention_ref
from uniter_fast.model import UniterForPretraining, UniterModel
from helpers import random_samples, tiny_config


def original_forward(model: UniterModel, texts, regions, img_masks=None, token_types=None,
                     img_types=None) -> list[torch.Tensor]:
    """The original's computation: padded text and image embeddings, compacted with gather_index, additive -10000
    key mask, explicit softmax attention, post-LN layers. Returns each sample's (L_b, H) outputs.
    token_types / img_types: per-sample type ids (default 0 for text, 1 for regions, as the original)."""
    B = len(texts)
    H = model.config.hidden_size
    tl = [len(t) for t in texts]
    nb = [0 if r is None else r[0].shape[0] for r in regions]
    max_tl, max_nb = max(tl), max(max(nb), 1)
    ids = torch.zeros(B, max_tl, dtype=torch.long)
    feat = torch.zeros(B, max_nb, model.config.img_dim)
    pos = torch.zeros(B, max_nb, 7)
    masks = torch.zeros(B, max_nb, dtype=torch.long)
    ttypes = torch.zeros(B, max_tl, dtype=torch.long)
    itypes = torch.ones(B, max_nb, dtype=torch.long)
    for b in range(B):
        ids[b, :tl[b]] = texts[b]
        if token_types is not None:
            ttypes[b, :tl[b]] = torch.as_tensor(token_types[b]).long()
        if img_types is not None and nb[b]:
            itypes[b, :nb[b]] = torch.as_tensor(img_types[b]).long()
        if nb[b]:
            feat[b, :nb[b]] = regions[b][0]
            bb = regions[b][1]
            pos[b, :nb[b]] = torch.cat([bb, bb[:, 4:5] * bb[:, 5:6]], 1)
            if img_masks is not None:
                masks[b, :nb[b]] = torch.as_tensor(img_masks[b]).long()
    e = model.embeddings
    position_ids = torch.arange(max_tl)[None].expand(B, -1)
    txt = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(position_ids)
                      + e.token_type_embeddings(ttypes))
    ie = model.img_embeddings
    mask_table = ie.mask_embedding.weight.clone()
    mask_table[0] = 0
    feat = feat + mask_table[masks]
    img = ie.LayerNorm(ie.img_layer_norm(ie.img_linear(feat)) + ie.pos_layer_norm(ie.pos_linear(pos))
                       + e.token_type_embeddings(itypes))
    out_size = max(t + n for t, n in zip(tl, nb))
    gather = torch.arange(out_size)[None].repeat(B, 1)
    for b in range(B):
        gather[b, tl[b]:tl[b] + nb[b]] = torch.arange(max_tl, max_tl + nb[b])
    seq = torch.gather(torch.cat([txt, img], 1), 1, gather[..., None].expand(-1, -1, H))
    attn_mask = torch.zeros(B, out_size)
    for b in range(B):
        attn_mask[b, :tl[b] + nb[b]] = 1
    ext = (1.0 - attn_mask[:, None, None, :]) * -10000.0
    heads, d = model.config.num_attention_heads, model.config.head_dim
    x = seq
    for layer in model.encoder.layer:
        sa = layer.attention.self
        split = lambda t: t.view(B, out_size, heads, d).transpose(1, 2)
        # the original's query, key and value: the fused projection's row blocks, in that order
        query, key, value = (F.linear(x, w, b) for w, b in zip(sa.qkv.weight.chunk(3), sa.qkv.bias.chunk(3)))
        scores = split(query) @ split(key).transpose(-1, -2) / math.sqrt(d) + ext
        ctx = (scores.softmax(-1) @ split(value)).transpose(1, 2).reshape(B, out_size, H)
        x = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + x)
        inter = F.gelu(layer.intermediate.dense(x))
        x = layer.output.LayerNorm(layer.output.dense(inter) + x)
    return [x[b, :tl[b] + nb[b]] for b in range(B)]


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_model_equals_original_padded_forward(seed):
    config = tiny_config()
    model = UniterModel(config).eval()
    texts, regions = random_samples(5, seed=seed)
    batch = pack_batch(texts, regions)
    with torch.no_grad():
        hidden = model(batch)
        expected = original_forward(model, texts, regions)
    assert hidden.shape == (batch.total_tokens, config.hidden_size)
    for b, (t, r) in enumerate(batch.split(hidden)):
        torch.testing.assert_close(torch.cat([t, r]), expected[b], atol=2e-5, rtol=1e-5)


def test_masked_regions_get_the_learned_mask_feature():
    config = tiny_config()
    model = UniterModel(config).eval()
    with torch.no_grad():
        model.img_embeddings.mask_embedding.weight.normal_()
    texts, regions = random_samples(3, seed=5, allow_empty_regions=False)
    masks = [torch.rand(r[0].shape[0]) < 0.5 for r in regions]
    batch = pack_batch(texts, regions, img_masks=masks)
    with torch.no_grad():
        hidden = model(batch)
        expected = original_forward(model, texts, regions, img_masks=masks)
    for b, (t, r) in enumerate(batch.split(hidden)):
        torch.testing.assert_close(torch.cat([t, r]), expected[b], atol=2e-5, rtol=1e-5)


def test_samples_do_not_see_each_other():
    model = UniterModel(tiny_config()).eval()
    texts, regions = random_samples(4, seed=6)
    with torch.no_grad():
        together = pack_batch(texts, regions)
        joint = together.split(model(together))
        for b in range(4):
            alone = pack_batch([texts[b]], [regions[b]])
            (t, r), = alone.split(model(alone))
            torch.testing.assert_close(torch.cat(joint[b]), torch.cat([t, r]), atol=1e-5, rtol=1e-5)


def test_reference_attention_matches_explicit_softmax_with_empty_and_single_samples():
    lens = [3, 0, 1, 5, 0, 2]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = varlen_attention_ref(q, k, v, cu, max(lens))
    probs = attention_probs_ref(q, k, cu)
    for b, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        expected = torch.einsum("hqk,khd->qhd", probs[b], v[lo:hi])
        torch.testing.assert_close(out[lo:hi], expected)
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_pooler_reads_the_cls_row():
    model = UniterModel(tiny_config()).eval()
    texts, regions = random_samples(3, seed=7)
    batch = pack_batch(texts, regions)
    with torch.no_grad():
        hidden = model(batch)
        pooled = model.pool(hidden, batch)
    for b, (t, _) in enumerate(batch.split(hidden)):
        torch.testing.assert_close(pooled[b], torch.tanh(model.pooler.dense(t[0])))


def test_ties_and_key_layout():
    model = UniterForPretraining(tiny_config())
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is model.uniter.img_embeddings.img_linear.weight
    keys = set(model.state_dict())
    assert {"cls.predictions.decoder.weight", "feat_regress.weight", "uniter.embeddings.word_embeddings.weight",
            "uniter.img_embeddings.mask_embedding.weight", "region_classifier.net.3.weight",
            "itm_output.bias"} <= keys
    assert model.uniter.img_embeddings.mask_embedding.weight[0].eq(0).all()


def test_fused_qkv_keeps_the_original_keys_both_ways():
    model = UniterModel(tiny_config())
    attn = model.encoder.layer[0].attention.self
    state = model.state_dict()
    prefix = "encoder.layer.0.attention.self."
    assert [k for k in state if k.startswith(prefix)] == [
        prefix + f"{part}.{kind}" for part in ("query", "key", "value") for kind in ("weight", "bias")]
    for i, part in enumerate(("query", "key", "value")):
        assert torch.equal(state[prefix + part + ".weight"], attn.qkv.weight.detach().chunk(3)[i])
    other = UniterModel(tiny_config())
    other.load_state_dict(state)  # strict: every original key lands in the fused parameter
    assert torch.equal(other.encoder.layer[0].attention.self.qkv.weight, attn.qkv.weight)
    del state[prefix + "key.weight"]
    with pytest.raises(RuntimeError, match=r"query, key and value weights load together; got only .*query\.weight"):
        other.load_state_dict(state)


def test_a_zero3_placeholder_qkv_stays_fused():
    """Under ZeRO-3 a partitioned parameter's tensor is empty: the hook leaves it under its own key."""
    attn = UniterModel(tiny_config()).encoder.layer[0].attention.self
    attn.qkv.weight.data = torch.empty(0)
    attn.qkv.bias.data = torch.empty(0)
    assert set(attn.state_dict()) == {"qkv.weight", "qkv.bias"}


def test_text_longer_than_positions_is_refused():
    model = UniterModel(tiny_config(max_position_embeddings=8))
    batch = pack_batch([torch.arange(9)], [None])
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(batch)


def test_packed_model_equals_original_with_every_parameter_perturbed_and_type_ids_given():
    """Initialisation leaves every LayerNorm at 1/0 and every bias at 0 and the tests above use the default type
    ids, so exchanging two LayerNorms, dropping a bias or ignoring given type ids would not show there."""
    model = UniterModel(tiny_config()).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    texts, regions = random_samples(5, seed=8)
    counts = [0 if r is None else r[0].shape[0] for r in regions]
    token_types = [torch.randint(0, 2, (len(t),), generator=gen) for t in texts]
    img_types = [torch.randint(0, 2, (n,), generator=gen) for n in counts]
    masks = [torch.rand(n, generator=gen) < 0.5 for n in counts]
    assert torch.cat(token_types).eq(1).any() and torch.cat(img_types).eq(0).any() and torch.cat(masks).any()
    batch = pack_batch(texts, regions, token_type_ids=token_types, img_type_ids=img_types, img_masks=masks)
    with torch.no_grad():
        hidden = model(batch)
        expected = original_forward(model, texts, regions, img_masks=masks, token_types=token_types,
                                    img_types=img_types)
        default = original_forward(model, texts, regions, img_masks=masks)
    for b, (t, r) in enumerate(batch.split(hidden)):
        torch.testing.assert_close(torch.cat([t, r]), expected[b], atol=5e-5, rtol=1e-5)
    assert not torch.allclose(torch.cat(expected), torch.cat(default), atol=1e-2)  # the type ids matter here


def test_the_mask_feature_is_learned_from_the_masked_regions_only():
    model = UniterModel(tiny_config())
    texts, regions = random_samples(3, seed=9, allow_empty_regions=False)
    masks = [torch.arange(r[0].shape[0]) % 2 == 0 for r in regions]
    batch = pack_batch(texts, regions, img_masks=masks)
    batch.img_feat.requires_grad_(True)
    hidden = model(batch)
    (hidden * torch.randn(hidden.shape)).sum().backward()
    grad = model.img_embeddings.mask_embedding.weight.grad
    assert grad[0].eq(0).all()  # the padding row stays zero
    assert grad[1].abs().max() > 0
    # row 1 is added to each masked region's features: its gradient is the sum of theirs
    torch.testing.assert_close(grad[1], batch.img_feat.grad[batch.img_masks].sum(0))


def test_initialisation_is_the_originals():
    """N(0, initializer_range) weights, zero biases, LayerNorm 1/0 with eps 1e-12, on the trunk and the heads."""
    config = tiny_config(hidden_size=64, intermediate_size=128, vocab_size=200, initializer_range=0.02)
    assert config.layer_norm_eps == 1e-12
    model = UniterForPretraining(config)
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert module.eps == 1e-12, name
            assert module.weight.eq(1).all() and module.bias.eq(0).all(), name
            seen.add("ln")
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            if getattr(module, "bias", None) is not None:
                assert module.bias.eq(0).all(), name
            if module.weight.numel() >= 1000:
                assert module.weight.mean().item() == pytest.approx(0.0, abs=0.003), name
                assert module.weight.std().item() == pytest.approx(0.02, rel=0.1), name
            seen.add(type(module).__name__)
    assert seen == {"ln", "Linear", "Embedding"}


def test_text_of_exactly_max_position_embeddings_is_accepted():
    model = UniterModel(tiny_config(max_position_embeddings=8)).eval()
    batch = pack_batch([torch.arange(8)], [(torch.randn(2, 24), torch.rand(2, 6))])
    with torch.no_grad():
        hidden = model(batch)
    assert hidden.shape == (10, 32) and torch.isfinite(hidden).all()


def test_fp16_region_features_give_the_fp32_result():
    """Features stay fp16 as stored; the embedding casts them to the model's dtype."""
    model = UniterModel(tiny_config()).eval()
    texts, regions = random_samples(3, seed=10, allow_empty_regions=False)
    half = [(f.half(), b) for f, b in regions]
    batch16 = pack_batch(texts, half)
    assert batch16.img_feat.dtype == torch.float16
    batch32 = pack_batch(texts, [(f.float(), b) for f, b in half])
    with torch.no_grad():
        assert torch.equal(model(batch16), model(batch32))


def test_a_text_only_batch_runs_on_a_model_of_any_region_width():
    """pack_batch cannot know the model's img_dim when no sample has regions (it takes 2048): the model's width
    serves, and each text-only sample gives what it gives in a batch with images."""
    model = UniterModel(tiny_config()).eval()
    assert model.config.img_dim != 2048
    texts, regions = random_samples(3, seed=11, allow_empty_regions=False)
    with torch.no_grad():
        alone = model(pack_batch(texts[:2], [None, None]))
        mixed = model(pack_batch(texts, [None, None, regions[2]]))
    assert alone.shape == (len(texts[0]) + len(texts[1]), model.config.hidden_size)
    torch.testing.assert_close(alone, mixed[:alone.shape[0]])
