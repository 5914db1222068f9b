"""Checkpoint loading and saving: original UNITER layout, init checkpoints, Hugging Face BERT (both directions).

Expected keys and shapes are written here from the rules of reference/uniter.md 1.9; numerics are checked against
transformers' BERT.
"""
from __future__ import annotations

import inspect
import json
import re

import pytest
import torch

from helpers import original_keys
from uniter_fast.config import UniterConfig
from uniter_fast.data.packing import pack_batch
from uniter_fast.model import UniterForPretraining, UniterModel
from uniter_fast.model.checkpoint import CheckpointError, LoadReport, save_checkpoint, to_bert_state_dict

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForPreTraining, BertModel  # noqa: E402

TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
LENGTHS = (7, 3, 12)


def uniter_config(**overrides) -> UniterConfig:
    return UniterConfig(**{**TINY, **overrides})


def bert_config() -> BertConfig:
    return BertConfig(**TINY, hidden_act="gelu", layer_norm_eps=1e-12, max_position_embeddings=512,
                      type_vocab_size=2, attn_implementation="eager")


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Make every parameter non-trivial (biases non-zero, LayerNorm away from 1/0) so that a swapped or skipped
    tensor shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def texts(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, TINY["vocab_size"], (n,), generator=gen) for n in LENGTHS]


def hf_padded(ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(t) for t in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for b, t in enumerate(ids):
        input_ids[b, :len(t)] = t
        mask[b, :len(t)] = 1
    return dict(input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids))


def our_text_hidden(trunk: UniterModel, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    batch = pack_batch(ids, [None] * len(ids))
    with torch.no_grad():
        hidden = trunk.eval()(batch)
    return [text for text, _ in batch.split(hidden)]


TINY_KEYS = dict(H=64, I=128, V=100, layers=2)
HEAD_ROOTS = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")


def tiny_original_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """An original-layout checkpoint built by hand (not through our save code), tied tensors twice."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=gen) * 0.05 for k, shape in original_keys(**TINY_KEYS).items()}
    sd["cls.predictions.decoder.weight"] = sd["uniter.embeddings.word_embeddings.weight"].clone()
    sd["feat_regress.weight"] = sd["uniter.img_embeddings.img_linear.weight"].clone()
    return sd


def assert_ties(model: UniterForPretraining) -> None:
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is model.uniter.img_embeddings.img_linear.weight


# Hugging Face BERT -> UNITER ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_bert():
    torch.manual_seed(0)
    return perturb(BertModel(bert_config(), add_pooling_layer=True), seed=1)


def _save_bin(model, directory) -> None:
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        model.save_pretrained(directory, safe_serialization=False)
    else:  # transformers 5 writes safetensors only
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    assert (directory / "pytorch_model.bin").is_file()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("given_config", [True, False])
def test_hf_bert_model_matches_transformers(hf_bert, tmp_path, fmt, given_config):
    if fmt == "safetensors":
        hf_bert.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    else:
        _save_bin(hf_bert, tmp_path)
    config = uniter_config() if given_config else None  # None: config.json (4 heads, not 64 // 64 = 1)
    model = UniterModel.from_pretrained(tmp_path, config)
    assert model.config.num_attention_heads == 4 and model.config.hidden_size == 64
    ids = texts()
    with torch.no_grad():
        ref = hf_bert(**hf_padded(ids)).last_hidden_state
    ours = our_text_hidden(model, ids)
    for b, t in enumerate(ids):
        torch.testing.assert_close(ours[b], ref[b, :len(t)], atol=1e-5, rtol=0)


def test_hf_bert_with_prefix_and_tf_names(hf_bert):
    sd = {}
    for k, v in hf_bert.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        sd["bert." + k] = v
    sd["bert.embeddings.position_ids"] = torch.arange(512)[None]
    model, report = UniterModel.from_pretrained(sd, uniter_config(), strict=False)
    assert report.ok and report.ignored == ["bert.embeddings.position_ids"]
    assert set(report.initialized) == {k[len("uniter."):] for k in original_keys(**TINY_KEYS, heads=False)
                                       if k.startswith("uniter.img_embeddings.")}
    torch.testing.assert_close(model.encoder.layer[1].output.LayerNorm.bias,
                               hf_bert.encoder.layer[1].output.LayerNorm.bias, atol=0, rtol=0)
    ids = texts(3)
    with torch.no_grad():
        ref = hf_bert(**hf_padded(ids)).last_hidden_state
    for b, (t, h) in enumerate(zip(ids, our_text_hidden(model, ids))):
        torch.testing.assert_close(h, ref[b, :len(t)], atol=1e-5, rtol=0)


def _mlm_logits(model: UniterForPretraining, ids):
    batch = pack_batch(ids, [None] * len(ids))
    with torch.no_grad():
        hidden = model.eval().uniter(batch)
        return [model.cls(text) for text, _ in batch.split(hidden)]


def test_hf_bert_for_pretraining(tmp_path):
    torch.manual_seed(1)
    hf = perturb(BertForPreTraining(bert_config()), seed=2)
    hf.save_pretrained(tmp_path)
    model, report = UniterForPretraining.from_pretrained(tmp_path, uniter_config(), strict=False, itm_ot_lambda=0.0)
    assert report.ok, str(report)
    assert model.itm_ot_lambda == 0.0
    assert_ties(model)
    expected = original_keys(**TINY_KEYS)
    image_side = {k for k in expected if k.startswith("uniter.img_embeddings.")}
    assert image_side <= set(report.initialized)
    for root in ("feat_regress.", "region_classifier.", "itm_output."):
        assert any(k.startswith(root) for k in report.initialized), root
    assert not any(k.startswith(("cls.", "uniter.embeddings.", "uniter.encoder.", "uniter.pooler."))
                   for k in report.initialized)
    assert any(k.startswith("cls.seq_relationship.") for k in report.ignored)
    torch.testing.assert_close(model.cls.predictions.bias, hf.cls.predictions.bias, atol=0, rtol=0)
    ids = texts(5)
    with torch.no_grad():
        ref = hf(**hf_padded(ids)).prediction_logits
    ours = _mlm_logits(model, ids)
    for b, t in enumerate(ids):
        torch.testing.assert_close(ours[b], ref[b, :len(t)], atol=1e-4, rtol=1e-5)


def test_to_bert_state_dict_round_trip():
    torch.manual_seed(2)
    ours = perturb(UniterForPretraining(uniter_config()), seed=3)
    sd = to_bert_state_dict(ours)
    assert not any(k.startswith(("bert.img_embeddings.", "feat_regress.", "region_classifier.", "itm_output."))
                   for k in sd)
    hf = BertForPreTraining(bert_config()).eval()
    result = hf.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) == {"cls.seq_relationship.weight", "cls.seq_relationship.bias"}
    assert list(result.unexpected_keys) == []
    ids = texts(7)
    with torch.no_grad():
        ref = hf(**hf_padded(ids)).prediction_logits
    for b, (t, logits) in enumerate(zip(ids, _mlm_logits(ours, ids))):
        torch.testing.assert_close(logits, ref[b, :len(t)], atol=1e-4, rtol=1e-5)


# the original layout ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
    torch.manual_seed(3)
    model = UniterForPretraining(UniterConfig.base())
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # heads away from their zero init, to be seen when reloaded
        model.feat_regress.bias.normal_()
    directory = tmp_path_factory.mktemp("base")
    save_checkpoint(model, directory / "uniter-base.pt")
    save_checkpoint(model, directory / "uniter-base.safetensors")
    return model.state_dict(), directory


def test_save_pt_has_the_original_keys(base_files):
    _, directory = base_files
    sd = torch.load(directory / "uniter-base.pt", map_location="cpu", weights_only=True)
    expected = original_keys()
    assert len(expected) == 230
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_save_safetensors_has_the_original_keys(base_files):
    from safetensors import safe_open
    _, directory = base_files
    with safe_open(str(directory / "uniter-base.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == original_keys()


@pytest.mark.parametrize("name", ["uniter-base.pt", "uniter-base.safetensors"])
def test_base_round_trip(base_files, name):
    state, directory = base_files
    model = UniterForPretraining.from_pretrained(directory / name)  # config inferred: 768 // 64 = 12 heads
    assert model.config.num_attention_heads == 12 and model.config.num_hidden_layers == 12
    assert_ties(model)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def test_fp16_checkpoint_loads():
    sd = {k: v.half() for k, v in tiny_original_state_dict().items()}
    model = UniterForPretraining.from_pretrained(sd, uniter_config())
    assert model.uniter.encoder.layer[0].output.dense.weight.dtype == torch.float32
    loaded = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v.float()), k
    assert_ties(model)


def test_bf16_deepspeed_file_and_wrappers(tmp_path):
    sd = tiny_original_state_dict()
    torch.save({"module": {k: v.bfloat16() for k, v in sd.items()}, "global_steps": 7, "lr": [1e-4]},
               tmp_path / "mp_rank_00_model_states.pt")
    model = UniterForPretraining.from_pretrained(tmp_path / "mp_rank_00_model_states.pt", uniter_config())
    torch.testing.assert_close(model.itm_output.weight, sd["itm_output.weight"].bfloat16().float(), atol=0, rtol=0)
    for wrapper in ("state_dict", "model"):
        torch.save({wrapper: sd, "epoch": 3}, tmp_path / f"{wrapper}.pth")
        model = UniterModel.from_pretrained(tmp_path / f"{wrapper}.pth", uniter_config())
        assert torch.equal(model.pooler.dense.weight, sd["uniter.pooler.dense.weight"])


def test_trunk_only_into_pretraining():
    sd = tiny_original_state_dict()
    trunk = {k[len("uniter."):]: v for k, v in sd.items() if k.startswith("uniter.")}
    model, report = UniterForPretraining.from_pretrained(trunk, uniter_config(), strict=False)
    assert report.ok and not report.ignored
    heads = {k for k in original_keys(**TINY_KEYS) if k.startswith(HEAD_ROOTS)}
    # the tied head weights follow the trunk's tensors, every other head tensor starts fresh
    assert set(report.initialized) == heads - {"cls.predictions.decoder.weight", "feat_regress.weight"}
    for k, v in trunk.items():
        assert torch.equal(model.uniter.state_dict()[k], v), k
    assert_ties(model)
    assert torch.equal(model.cls.predictions.decoder.weight, trunk["embeddings.word_embeddings.weight"])
    # strict mode accepts it too
    UniterForPretraining.from_pretrained(trunk, uniter_config())


def test_full_into_trunk_ignores_heads(tmp_path):
    sd = tiny_original_state_dict()
    sd["vqa_output.0.weight"] = torch.randn(128, 64)  # a downstream head
    model, report = UniterModel.from_pretrained(sd, uniter_config(), strict=False)
    assert report.ok and not report.initialized
    heads = {k for k in original_keys(**TINY_KEYS) if k.startswith(HEAD_ROOTS)}
    assert set(report.ignored) == heads | {"vqa_output.0.weight"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd["uniter." + k]), k
    # our UniterModel saved with save_checkpoint gets the `uniter.` prefix, as the original's files
    save_checkpoint(model, tmp_path / "trunk.pt")
    saved = torch.load(tmp_path / "trunk.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in saved.items()} == original_keys(**TINY_KEYS, heads=False)
    again = UniterForPretraining.from_pretrained(tmp_path / "trunk.pt", uniter_config())
    assert torch.equal(again.uniter.encoder.layer[1].intermediate.dense.bias,
                       sd["uniter.encoder.layer.1.intermediate.dense.bias"])


def test_init_checkpoint_from_bert():
    torch.manual_seed(4)
    hf = perturb(BertForPreTraining(bert_config()), seed=5)
    init = {k.replace("bert", "uniter"): v.clone() for k, v in hf.state_dict().items()}  # scripts/convert_ckpt.py
    assert "cls.seq_relationship.weight" in init and "cls.predictions.decoder.weight" in init
    model, report = UniterForPretraining.from_pretrained(init, uniter_config(), strict=False)
    assert report.ok, str(report)
    assert {k for k in original_keys(**TINY_KEYS) if k.startswith("uniter.img_embeddings.")} <= set(report.initialized)
    assert "cls.seq_relationship.weight" in report.ignored
    assert not any(k.startswith("cls.") for k in report.initialized)
    assert torch.equal(model.uniter.embeddings.word_embeddings.weight, hf.bert.embeddings.word_embeddings.weight)
    assert torch.equal(model.cls.predictions.transform.dense.weight, hf.cls.predictions.transform.dense.weight)
    assert_ties(model)


def test_tied_tensor_given_once_or_disagreeing():
    sd = tiny_original_state_dict()
    word = sd.pop("uniter.embeddings.word_embeddings.weight")  # only the decoder's copy
    model = UniterForPretraining.from_pretrained(sd, uniter_config())
    assert torch.equal(model.uniter.embeddings.word_embeddings.weight, word)
    assert_ties(model)

    sd = tiny_original_state_dict()
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + 1.0
    model, report = UniterForPretraining.from_pretrained(sd, uniter_config(), strict=False)
    assert report.ok and any("cls.predictions.decoder.weight" in n for n in report.notes)
    assert torch.equal(model.cls.predictions.decoder.weight, sd["uniter.embeddings.word_embeddings.weight"])


# errors ------------------------------------------------------------------------------------------------------------
def test_missing_unexpected_and_wrong_shape():
    bad_key = "uniter.encoder.layer.0.attention.self.rotary.weight"
    cases = {
        "encoder.layer.1.output.dense.weight": lambda sd: sd.pop("uniter.encoder.layer.1.output.dense.weight"),
        bad_key: lambda sd: sd.__setitem__(bad_key, torch.zeros(3)),
        "pooler.dense.weight": lambda sd: sd.__setitem__("uniter.pooler.dense.weight", torch.zeros(64, 65)),
    }
    for key, edit in cases.items():
        sd = tiny_original_state_dict()
        edit(sd)
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as err:
            UniterModel.from_pretrained(sd, uniter_config())
        assert "<state dict>" in str(err.value)

    sd = tiny_original_state_dict()
    for edit in cases.values():
        edit(sd)
    model, report = UniterModel.from_pretrained(sd, uniter_config(), strict=False)
    assert isinstance(report, LoadReport)
    assert report.missing == ["encoder.layer.1.output.dense.weight"]
    assert report.unexpected == [bad_key]
    assert report.mismatched == [("pooler.dense.weight", (64, 65), (64, 64))]
    assert not report.ok and "pooler.dense.weight" in str(report)
    # what did fit was loaded
    assert torch.equal(model.encoder.layer[0].output.dense.weight, sd["uniter.encoder.layer.0.output.dense.weight"])


def test_partial_image_side_is_missing_not_initialized():
    sd = tiny_original_state_dict()
    del sd["uniter.img_embeddings.pos_linear.bias"]
    with pytest.raises(CheckpointError, match=r"img_embeddings\.pos_linear\.bias"):
        UniterModel.from_pretrained(sd, uniter_config())


def test_given_config_that_disagrees():
    with pytest.raises(CheckpointError, match=r"embeddings\.word_embeddings\.weight.*\(100, 64\).*\(120, 64\)"):
        UniterModel.from_pretrained(tiny_original_state_dict(), uniter_config(vocab_size=120))


class _Boom:
    unpickled = False

    def __init__(self):
        self.state = 1  # pickle calls __setstate__ only for a non-empty state

    def __setstate__(self, state):
        type(self).unpickled = True


def test_unreadable_sources_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        UniterModel.from_pretrained(tmp_path / "nowhere.pt")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        UniterModel.from_pretrained(tmp_path)  # a directory without weights
    torch.save({"step": 3, "lr": 0.1}, tmp_path / "not_weights.pt")
    with pytest.raises(CheckpointError, match="not_weights.pt"):
        UniterModel.from_pretrained(tmp_path / "not_weights.pt")
    (tmp_path / "text.bin").write_text("hello")
    with pytest.raises(CheckpointError, match="text.bin"):
        UniterModel.from_pretrained(tmp_path / "text.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02junk")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        UniterModel.from_pretrained(tmp_path / "junk.safetensors")
    torch.save({"weight": torch.zeros(2), "obj": _Boom()}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="pickle.pt"):
        UniterModel.from_pretrained(tmp_path / "pickle.pt")
    assert not _Boom.unpickled
    with pytest.raises(CheckpointError, match="state dict"):
        UniterModel.from_pretrained({"a": 1})


def test_config_inferred_from_shapes():
    cfg = UniterConfig(vocab_size=120, hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=256, max_position_embeddings=40, type_vocab_size=3, img_dim=32,
                       img_label_dim=11)
    torch.manual_seed(5)
    sd = UniterForPretraining(cfg).state_dict()
    model = UniterForPretraining.from_pretrained(sd)
    got = model.config
    assert (got.vocab_size, got.hidden_size, got.num_hidden_layers, got.num_attention_heads, got.intermediate_size,
            got.max_position_embeddings, got.type_vocab_size, got.img_dim, got.img_label_dim) == (
        120, 128, 3, 2, 256, 40, 3, 32, 11)
    # a trunk alone: image width from img_linear, head sizes keep their defaults
    trunk = {k: v for k, v in sd.items() if k.startswith("uniter.")}
    assert UniterModel.from_pretrained(trunk).config.img_dim == 32


def test_config_json_beside_a_file(tmp_path):
    sd = tiny_original_state_dict()
    torch.save(sd, tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(uniter_config().to_dict(original_only=True)))
    assert UniterModel.from_pretrained(tmp_path / "model.pt").config.num_attention_heads == 4


def test_dicts_named_after_our_parameters_load():
    """DeepSpeed's zero_to_fp32 and 16-bit model files name tensors after the parameters: each layer's query, key
    and value as one fused attention.self.qkv, split here into the original's three keys."""
    ours = perturb(UniterForPretraining(uniter_config()), seed=7)
    by_parameter = {k: v.detach().clone() for k, v in ours.named_parameters()}
    assert "uniter.encoder.layer.0.attention.self.qkv.weight" in by_parameter
    model = UniterForPretraining.from_pretrained(by_parameter, uniter_config())
    expected = ours.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert_ties(model)
    by_parameter["uniter.encoder.layer.1.attention.self.qkv.bias"] = torch.zeros(10)
    with pytest.raises(CheckpointError, match=r"layer\.1\.attention\.self\.qkv\.bias: .*3 equal row blocks"):
        UniterForPretraining.from_pretrained(by_parameter, uniter_config())


@pytest.mark.parametrize("content, match", [
    (json.dumps({"hidden_dropout_prob": "0.1"}), r"UniterConfig\.hidden_dropout_prob must be a number, got '0\.1'"),
    (json.dumps({"hidden_size": "768"}), r"UniterConfig\.hidden_size must be a positive integer, got '768'"),
    (json.dumps({"hidden_size": 100}), r"UniterConfig\.hidden_size \(100\) is not a multiple"),
    (b"\xff\xfe{}", r"is not valid JSON"),
])
def test_bad_config_json_names_the_file(tmp_path, content, match):
    path = tmp_path / "bad_config.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ValueError, match=r"bad_config\.json.*" + match):
        UniterConfig.from_json(path)


def test_bad_config_json_beside_a_checkpoint_names_it(tmp_path):
    torch.save(tiny_original_state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({**uniter_config().to_dict(), "num_attention_heads": 5}))
    with pytest.raises(CheckpointError, match=r"config\.json: UniterConfig\.hidden_size \(64\) is not a multiple"):
        UniterModel.from_pretrained(tmp_path / "model.pt")


@pytest.mark.parametrize("key, shape", [
    ("uniter.embeddings.word_embeddings.weight", (100,)),
    ("uniter.encoder.layer.0.intermediate.dense.weight", ()),
])
def test_config_inference_names_a_wrongly_shaped_key(key, shape):
    sd = tiny_original_state_dict()
    sd[key] = torch.zeros(shape)
    with pytest.raises(CheckpointError, match=r"cannot infer the model config from <state dict>: "
                                              + re.escape(key) + r" has shape " + re.escape(str(shape))):
        UniterModel.from_pretrained(sd)


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_a_failed_save_leaves_the_earlier_file(tmp_path, monkeypatch, name):
    import safetensors.torch

    model = UniterModel(uniter_config())
    path = tmp_path / name
    save_checkpoint(model, path)
    before = path.read_bytes()

    def disk_full(state, target, *args, **kwargs):  # writes part of the file, then fails as a full disk does
        with open(target, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(perturb(model, seed=3), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# key layouts and config inference --------------------------------------------------------------------------------
def _as_bert_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original's trunk under Hugging Face's `bert.` prefix, heads as they are."""
    return {("bert." + k[len("uniter."):] if k.startswith("uniter.") else k): v for k, v in sd.items()}


@pytest.mark.parametrize("layout", ["original", "bare trunk", "bert prefix", "ddp prefix", "decoder copy only"])
def test_config_inferred_from_every_accepted_layout(layout):
    """With config=None the sizes come from the shapes whatever the key layout; the word-embedding width is read
    from the tied decoder's copy when the checkpoint carries only that one."""
    sd = tiny_original_state_dict()
    source = {
        "original": lambda: dict(sd),
        "bare trunk": lambda: {k[len("uniter."):]: v for k, v in sd.items() if k.startswith("uniter.")},
        "bert prefix": lambda: _as_bert_names(sd),
        "ddp prefix": lambda: {"module." + k: v for k, v in sd.items()},
        "decoder copy only": lambda: {k: v for k, v in sd.items() if k != "uniter.embeddings.word_embeddings.weight"},
    }[layout]()
    model = UniterForPretraining.from_pretrained(source)
    got = model.config
    assert (got.vocab_size, got.hidden_size, got.num_hidden_layers, got.num_attention_heads, got.intermediate_size,
            got.max_position_embeddings, got.type_vocab_size, got.img_dim, got.img_label_dim) == (
        100, 64, 2, 1, 128, 512, 2, 2048, 1601)
    loaded = model.state_dict()
    for k, v in sd.items():
        if layout != "bare trunk" or k.startswith("uniter."):  # a bare trunk has no heads
            assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_ddp_and_compile_prefixes_load_exactly(prefix):
    sd = tiny_original_state_dict()
    model, report = UniterForPretraining.from_pretrained({prefix + k: v for k, v in sd.items()}, uniter_config(),
                                                         strict=False)
    assert report.ok and not report.initialized and not report.ignored, str(report)
    loaded = model.state_dict()
    assert loaded.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    assert_ties(model)


def test_the_same_key_under_two_names_is_refused():
    """Two checkpoint entries that map to one key (prefixed and not, `bert.` and `uniter.`, fused qkv and its
    parts) must not load one of them silently."""
    sd = tiny_original_state_dict()
    sd["module.uniter.pooler.dense.weight"] = sd["uniter.pooler.dense.weight"] + 1.0
    with pytest.raises(CheckpointError, match=r"uniter\.pooler\.dense\.weight and module\.uniter\.pooler\.dense\."
                                              r"weight are the same key \(uniter\.pooler\.dense\.weight\)"):
        UniterForPretraining.from_pretrained(sd, uniter_config(), strict=False)

    sd = tiny_original_state_dict()
    sd["bert.encoder.layer.0.output.dense.bias"] = sd["uniter.encoder.layer.0.output.dense.bias"]
    with pytest.raises(CheckpointError, match=r"same key \(uniter\.encoder\.layer\.0\.output\.dense\.bias\)"):
        UniterModel.from_pretrained(sd, uniter_config())

    sd = tiny_original_state_dict()
    sd["uniter.encoder.layer.1.attention.self.qkv.bias"] = torch.zeros(3 * 64)
    with pytest.raises(CheckpointError, match=r"attention\.self\.qkv\.bias are the same key"):
        UniterModel.from_pretrained(sd, uniter_config())


# config: presets, JSON in both directions, config sources ---------------------------------------------------------
# config/uniter-{base,large}.json of the original (reference/uniter.md 1.1), every field
ORIGINAL_JSON = {
    "base": {"attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
             "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 512,
             "num_attention_heads": 12, "num_hidden_layers": 12, "type_vocab_size": 2, "vocab_size": 28996},
    "large": {"attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
              "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 4096,
              "max_position_embeddings": 512, "num_attention_heads": 16, "num_hidden_layers": 24,
              "type_vocab_size": 2, "vocab_size": 28996},
}


@pytest.mark.parametrize("name", ["base", "large"])
def test_presets_write_the_original_json_exactly(tmp_path, name):
    config = UniterConfig.preset(name)
    assert (config.layer_norm_eps, config.img_dim, config.img_label_dim) == (1e-12, 2048, 1601)
    config.to_json(tmp_path / "config.json", original_only=True)
    assert json.loads((tmp_path / "config.json").read_text()) == ORIGINAL_JSON[name]
    # and the original file reads back as the preset
    (tmp_path / "original.json").write_text(json.dumps(ORIGINAL_JSON[name]))
    assert UniterConfig.from_json(tmp_path / "original.json") == config


def test_config_json_round_trip_keeps_every_field(tmp_path):
    config = UniterConfig(vocab_size=77, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                          intermediate_size=96, hidden_dropout_prob=0.25, attention_probs_dropout_prob=0.125,
                          max_position_embeddings=40, type_vocab_size=4, initializer_range=0.5, layer_norm_eps=1e-5,
                          img_dim=24, img_label_dim=11, backend="torch")
    config.to_json(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data == config.to_dict() and len(data) == 15  # every dataclass field, none dropped
    assert UniterConfig.from_json(tmp_path / "config.json") == config


def test_from_dict_unknown_keys_raise_or_are_skipped():
    data = {**ORIGINAL_JSON["base"], "hidden_size": 64, "num_attention_heads": 4, "model_type": "bert",
            "pad_token_id": 0}
    with pytest.raises(ValueError, match=r"my\.json: unknown UNITER config keys \['model_type', 'pad_token_id'\]"):
        UniterConfig.from_dict(data, source="my.json")
    assert UniterConfig.from_dict(data, strict=False) == UniterConfig(hidden_size=64, num_attention_heads=4)


def test_config_given_as_a_hugging_face_json_path(tmp_path):
    bert_config().to_json_file(str(tmp_path / "bert_config.json"))  # many keys UNITER does not use
    model = UniterModel.from_pretrained(tiny_original_state_dict(), str(tmp_path / "bert_config.json"))
    assert (model.config.num_attention_heads, model.config.hidden_size, model.config.intermediate_size) == (4, 64, 128)


def test_relative_position_bert_config_beside_weights_is_refused(tmp_path):
    torch.save(tiny_original_state_dict(), tmp_path / "model.pt")
    config = bert_config()
    config.position_embedding_type = "relative_key"
    config.to_json_file(str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match=r"config\.json: position_embedding_type 'relative_key' is not UNITER's"):
        UniterModel.from_pretrained(tmp_path / "model.pt")


def test_hf_directory_prefers_safetensors(tmp_path):
    sd = tiny_original_state_dict()
    from safetensors.torch import save_file
    save_file(_as_bert_names(sd), str(tmp_path / "model.safetensors"))
    torch.save({k: v + 1.0 for k, v in _as_bert_names(sd).items()}, tmp_path / "pytorch_model.bin")
    model = UniterForPretraining.from_pretrained(tmp_path, uniter_config())
    assert torch.equal(model.uniter.pooler.dense.weight, sd["uniter.pooler.dense.weight"])


# dtypes ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_saved_tensors_keep_the_model_dtype(tmp_path, name, dtype):
    """torch.equal compares values across dtypes: a save that changes the dtype must be caught by the dtype."""
    from safetensors.torch import load_file
    model = perturb(UniterForPretraining(uniter_config()), seed=11).to(dtype)
    save_checkpoint(model, tmp_path / name)
    saved = (load_file(str(tmp_path / name)) if name.endswith(".safetensors")
             else torch.load(tmp_path / name, map_location="cpu", weights_only=True))
    assert {k: v.dtype for k, v in saved.items()} == {k: dtype for k in original_keys(**TINY_KEYS)}
    again = UniterForPretraining.from_pretrained(tmp_path / name, uniter_config())
    assert {v.dtype for v in again.state_dict().values()} == {torch.float32}
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v.float()), k
