"""Details of the encoder, the trunk, the pre-training model and the attention API that the broader tests
leave open: the fused qkv's partial loads and ZeRO-3 placeholders, where dropout sits in a post-LN block and which
probability each dropout takes, that the config's backend and the options reach every attention entry point,
argument checks that name their argument, and backend choice for devices and for "xformers" on other ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uniter_fast.data.packing import pack_batch
from uniter_fast.kernels import attention, attention_xformers, backend
from uniter_fast.model import UniterForPretraining, UniterModel, pretrain
from uniter_fast.model.encoder import SelfOutput
from uniter_fast.objectives.tasks import PretrainBatch
from helpers import random_samples, tiny_config

PREFIX = "encoder.layer.0.attention.self."


def qkv_inputs(lens=(5, 7), heads=2, head_dim=8, seed=0):
    """q, k, v (total, heads, head_dim) in fp32 and int32 cu_seqlens for samples of these lengths."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), heads, head_dim, generator=gen) for _ in range(3))
    return q, k, v, cu


def explicit_attention(q, k, v, cu, scale):
    """softmax(q k^T * scale) v within each sample, written out per sample."""
    bounds = cu.tolist()
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        probs = (torch.einsum("qhd,khd->hqk", q[lo:hi], k[lo:hi]) * scale).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, v[lo:hi]))
    return torch.cat(outs)


def no_xformers_checks(monkeypatch):
    """xformers as if it imported and served the call: what the API decides before calling it shows."""
    monkeypatch.setattr(attention_xformers, "unavailable", lambda q: None)
    monkeypatch.setattr(attention_xformers, "varlen_attention", lambda q, k, v, cu, **kw: torch.zeros_like(q))


# ---------------------------------------------------------------------------------------------------------
# the fused query/key/value projection and its state dict
# ---------------------------------------------------------------------------------------------------------


def test_loading_one_or_two_of_query_key_value_is_refused_naming_them():
    """Any subset short of all three is refused, non-strict loading included (it would leave qkv half old)."""
    state = UniterModel(tiny_config()).state_dict()
    other = UniterModel(tiny_config())
    for dropped, kept in ((("key", "value"), "query"), (("query", "value"), "key")):
        partial = {k: v for k, v in state.items() if not any(k == f"{PREFIX}{d}.bias" for d in dropped)}
        with pytest.raises(RuntimeError, match=rf"query, key and value biases load together; got only "
                                               rf"{PREFIX}{kept}\.bias"):
            other.load_state_dict(partial, strict=False)


def test_loading_both_the_fused_and_the_original_qkv_keys_is_refused_naming_both():
    """A state dict with qkv.weight and query/key/value.weight says the weights are given twice, not that some
    are missing."""
    state = UniterModel(tiny_config()).state_dict()
    fused = UniterModel(tiny_config()).encoder.layer[0].attention.self.qkv.weight
    both = {**state, f"{PREFIX}qkv.weight": fused.detach().clone()}
    with pytest.raises(RuntimeError, match=rf"weights are given twice, as {PREFIX}qkv\.weight and as "
                                           rf"{PREFIX}query\.weight, {PREFIX}key\.weight, {PREFIX}value\.weight"):
        UniterModel(tiny_config()).load_state_dict(both)


def test_a_placeholder_in_either_qkv_parameter_keeps_both_fused():
    """A ZeRO-3 placeholder (no rows) in the weight or in the bias alone: nothing is split."""
    for kind in ("weight", "bias"):
        attn = UniterModel(tiny_config()).encoder.layer[0].attention.self
        getattr(attn.qkv, kind).data = torch.empty(0)
        assert set(attn.state_dict()) == {"qkv.weight", "qkv.bias"}, kind


# ---------------------------------------------------------------------------------------------------------
# post-LN blocks and dropout
# ---------------------------------------------------------------------------------------------------------


def test_dropout_acts_on_the_dense_branch_only():
    """LayerNorm(dropout(dense(h)) + residual): a dropout that drops everything leaves LayerNorm(residual)."""
    config = tiny_config(hidden_dropout_prob=0.5)
    block = SelfOutput(config, config.intermediate_size)
    with torch.no_grad():
        block.LayerNorm.weight.uniform_(0.5, 1.5)
        block.LayerNorm.bias.uniform_(-0.5, 0.5)
    block.dropout.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    h, residual = torch.randn(6, config.intermediate_size), torch.randn(6, config.hidden_size)
    expected = F.layer_norm(residual, (config.hidden_size,), block.LayerNorm.weight, block.LayerNorm.bias, eps=1e-12)
    torch.testing.assert_close(block(h, residual), expected)


def test_each_dropout_takes_its_own_probability():
    """attention_probs_dropout_prob on the attention probabilities, hidden_dropout_prob after each dense layer and on
    the embeddings (the original's BertSelfAttention / BertSelfOutput / BertOutput)."""
    config = tiny_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3)
    model = UniterModel(config)
    for layer in model.encoder.layer:
        assert layer.attention.self.attend.options.dropout_p == 0.3
        assert layer.attention.output.dropout.p == 0.2 and layer.output.dropout.p == 0.2
    assert model.embeddings.dropout.p == 0.2 and model.img_embeddings.dropout.p == 0.2


def test_the_configs_backend_reaches_the_attention(monkeypatch):
    """backend="triton" in the config is the attention's: on the CPU without the interpreter it cannot serve, and
    says so (a model that dropped it would fall back to the reference quietly)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = UniterModel(tiny_config(backend="triton")).eval()
    batch = pack_batch([torch.tensor([5, 6, 7])], [(torch.randn(2, 24), torch.rand(2, 6))])
    with torch.no_grad(), pytest.raises(backend.BackendUnavailable, match="varlen_attention: .*inputs on cpu"):
        model(batch)


# ---------------------------------------------------------------------------------------------------------
# the trunk and the pre-training model
# ---------------------------------------------------------------------------------------------------------


def test_too_long_text_error_gives_both_lengths():
    model = UniterModel(tiny_config(max_position_embeddings=8))
    with pytest.raises(ValueError, match=r"a text of 9 tokens exceeds max_position_embeddings \(8\)"):
        model(pack_batch([torch.arange(9)], [None]))


def test_weights_start_at_the_configs_initializer_range():
    """N(0, initializer_range) as configured (tiny's 0.1), not BERT's 0.02 whatever the config says."""
    model = UniterModel(tiny_config(initializer_range=0.1))
    for weight in (model.embeddings.word_embeddings.weight, model.encoder.layer[0].intermediate.dense.weight):
        assert weight.std().item() == pytest.approx(0.1, rel=0.1)


def test_itm_solves_the_transport_on_the_configs_backend(monkeypatch):
    """The WRA distances of ITM take the model's backend, as its attention does."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    real = pretrain.wra_distances
    monkeypatch.setattr(pretrain, "wra_distances", spy)
    model = UniterForPretraining(tiny_config(backend="torch"))
    texts, regions = random_samples(2, seed=1, allow_empty_regions=False)
    model(PretrainBatch(task="itm", inputs=pack_batch(texts, regions), itm_labels=torch.tensor([1, 0])))
    assert seen == ["torch"]


# ---------------------------------------------------------------------------------------------------------
# varlen_attention's arguments
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, error, message", [
    (lambda a: {**a, "v": a["v"][:, :, :4]}, ValueError, r"share one \(total, heads, head_dim\) shape"),
    (lambda a: {**a, "k": a["k"].double()}, TypeError, "share one floating dtype.*float64"),
    (lambda a: {n: t.long() if n in "qkv" else t for n, t in a.items()}, TypeError, "floating dtype"),
    (lambda a: {**a, "k": a["k"].to("meta")}, ValueError, "must be on one device.*meta"),
    (lambda a: {**a, "v": a["v"].to("meta")}, ValueError, "must be on one device.*meta"),
    (lambda a: {**a, "softmax_scale": "0.3"}, ValueError, "softmax_scale"),
    (lambda a: {**a, "dropout_p": "0.1"}, ValueError, "dropout_p"),
])
@pytest.mark.parametrize("choice", ["torch", "triton"])
def test_more_bad_arguments_name_themselves(change, error, message, choice):
    q, k, v, cu = qkv_inputs()
    args = change(dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=7, dropout_p=0.0, softmax_scale=None))
    with pytest.raises(error, match=message):
        attention.varlen_attention(**args, backend=choice)


def test_too_small_max_seqlen_names_the_longest_sample():
    q, k, v, cu = qkv_inputs((7, 2, 5))
    with pytest.raises(ValueError, match=r"max_seqlen=6 is below the longest sample \(7 tokens, sample 0\)"):
        attention.varlen_attention(q, k, v, cu, 6, backend="torch")


def test_a_bool_max_seqlen_is_refused_where_it_would_fit():
    q, k, v, cu = qkv_inputs((1, 1))
    with pytest.raises(ValueError, match="max_seqlen must be a non-negative int"):
        attention.varlen_attention(q, k, v, cu, True, backend="torch")


def test_offsets_beyond_an_empty_input_are_refused():
    q, k, v, _ = qkv_inputs((0,))
    with pytest.raises(ValueError, match="total_tokens=0"):
        attention.varlen_attention(q, k, v, torch.tensor([0, 5], dtype=torch.int32), 5, backend="torch")


def test_qkv_entry_point_checks_its_options_and_offsets():
    q, k, v, cu = qkv_inputs()
    qkv = torch.stack([q, k, v], 1)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        attention.varlen_attention_qkv(qkv, cu, 7, attention.AttentionOptions(dropout_p=1.0, backend="torch"))
    with pytest.raises(ValueError, match="softmax_scale must be"):
        attention.varlen_attention_qkv(qkv, cu, 7, attention.AttentionOptions(softmax_scale=-1.0, backend="torch"))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32/int64"):
        attention.varlen_attention_qkv(qkv, cu.float(), 7, attention.AttentionOptions(backend="torch"))


@pytest.mark.parametrize("choice", ["torch", "triton"])
def test_int64_offsets_give_the_int32_result(choice):
    q, k, v, cu = qkv_inputs((5, 0, 9))
    expected = explicit_attention(q, k, v, cu, 8 ** -0.5)
    out = attention.varlen_attention(q, k, v, cu.long(), 9, backend=choice)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# the torch backend: scale and dropout as given
# ---------------------------------------------------------------------------------------------------------


def test_torch_backend_uses_the_softmax_scale_given():
    q, k, v, cu = qkv_inputs((5, 9))
    out = attention.varlen_attention(q, k, v, cu, 9, softmax_scale=0.37, backend="torch")
    torch.testing.assert_close(out, explicit_attention(q, k, v, cu, 0.37), atol=1e-5, rtol=1e-4)


def test_torch_backend_applies_dropout_reproducibly():
    """dropout_p reaches the reference path: with v = 1 every output without dropout is 1 (the probabilities sum
    to 1), with dropout the sum of the kept probabilities times 1/(1-p), which is not; the same under one seed."""
    q, k, v, cu = qkv_inputs((6, 4))
    v = torch.ones_like(v)  # each output entry is then the sum of the kept, rescaled probabilities
    run = lambda: attention.varlen_attention(q, k, v, cu, 6, dropout_p=0.5, backend="torch")  # noqa: E731
    torch.manual_seed(5)
    a = run()
    torch.manual_seed(5)
    b = run()
    assert torch.equal(a, b)
    assert not torch.allclose(a, torch.ones_like(a))
    plain = attention.varlen_attention(q, k, v, cu, 6, backend="torch")
    torch.testing.assert_close(plain, torch.ones_like(plain))


# ---------------------------------------------------------------------------------------------------------
# deterministic reaching the xformers refusal
# ---------------------------------------------------------------------------------------------------------


def test_qkv_entry_point_passes_deterministic_on(monkeypatch):
    """deterministic=True refuses xformers through varlen_attention_qkv and the module's from_qkv too."""
    no_xformers_checks(monkeypatch)
    q, k, v, cu = qkv_inputs()
    qkv = torch.stack([q, k, v], 1)
    options = attention.AttentionOptions(deterministic=True, backend="xformers")
    for call in (lambda: attention.varlen_attention_qkv(qkv, cu, 7, options),
                 lambda: attention.VarlenAttention(options).from_qkv(qkv, cu, 7)):
        with pytest.raises(backend.BackendUnavailable, match="deterministic=True"):
            call()


# ---------------------------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------------------------


def test_xformers_leaves_other_ops_to_choose_automatically():
    """"xformers" names attention's backend: ipot on CUDA then takes triton automatically, as with "auto"."""
    assert backend.explain("ipot", "xformers", torch.device("cuda"), None) == \
        ("triton", "auto: a kernel serves this call")


def test_auto_takes_triton_only_for_cuda_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for device in ("meta", "mps", "cpu"):
        chosen, why = backend.explain("ipot", "auto", torch.device(device), None)
        assert chosen == "torch" and f"inputs on {device}" in why, device
