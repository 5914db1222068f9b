"""Checkpoint and config details the main checkpoint tests leave open: clear errors that name the file or key,
the loader's safety, explicit configs, and the presets against the original's JSON.

Expected keys come from reference/uniter.md 1.9 (written out here, not taken from our models); expected config
values from the original's config/uniter-{base,large}.json (copied in configs/) and reference/uniter.md 1.1.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from helpers import original_keys
from uniter_fast.config import UniterConfig
from uniter_fast.model import UniterModel
from uniter_fast.model.checkpoint import CheckpointError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
H, I, V, LAYERS = 64, 128, 100, 2
# per encoder layer, the original's 16 keys (reference/uniter.md 1.9)
LAYER_KEYS = tuple(f"{name}.{kind}" for name in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm") for kind in ("weight", "bias"))


def trunk_state_dict(seed: int = 0, hidden: int = H, inter: int = I) -> dict[str, torch.Tensor]:
    """The original UniterModel's weights under `uniter.` (no heads), random."""
    gen = torch.Generator().manual_seed(seed)
    shapes = original_keys(H=hidden, I=inter, V=V, layers=LAYERS, heads=False)
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}


def config(**overrides) -> UniterConfig:
    return UniterConfig(**{**dict(vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=I), **overrides})


# the loader never runs code from a file -----------------------------------------------------------------------
_RAN = []


def _side_effect():
    _RAN.append(True)
    return torch.zeros(1)


class _Payload:
    """Unpickling this calls _side_effect (as a malicious file would run any callable)."""

    def __reduce__(self):
        return (_side_effect, ())


def test_a_pickled_callable_is_never_run(tmp_path):
    """torch.load without weights_only runs any callable a file names; the loader must refuse it, naming the file."""
    torch.save({"uniter.pooler.dense.bias": _Payload()}, tmp_path / "evil.pt")
    _RAN.clear()
    with pytest.raises(CheckpointError, match=r"evil\.pt cannot be read"):
        UniterModel.from_pretrained(tmp_path / "evil.pt", config())
    assert not _RAN


# clear errors -------------------------------------------------------------------------------------------------
def test_error_lists_are_labelled_and_counted():
    """A strict failure says which keys are missing and which unexpected (not just the names), with counts."""
    sd = trunk_state_dict()
    for key in LAYER_KEYS:
        del sd[f"uniter.encoder.layer.1.{key}"]
    sd["uniter.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        UniterModel.from_pretrained(sd, config())
    text = str(err.value)
    missing = re.search(r"missing \((\d+)\): (.*)", text)
    unexpected = re.search(r"unexpected \((\d+)\): (.*)", text)
    assert missing and unexpected, text
    assert int(missing.group(1)) == len(LAYER_KEYS)
    assert "encoder.layer.1.output.dense.weight" in missing.group(2)
    assert "rotary" not in missing.group(2)
    assert unexpected.group(1) == "1" and "attention.self.rotary.weight" in unexpected.group(2)
    # long lists are cut, saying how many were left out
    _, report = UniterModel.from_pretrained(sd, config(), strict=False)
    assert f"... and {len(LAYER_KEYS) - 3} more" in report.errors(limit=3)


def test_a_transposed_matrix_is_reported_as_wrongly_shaped():
    """Same number of elements, other shape: a CheckpointError naming the key and both shapes, or a report entry;
    never a RuntimeError from the copy or a silent reshape."""
    sd = trunk_state_dict()
    key = "uniter.encoder.layer.0.intermediate.dense.weight"
    sd[key] = sd[key].t().contiguous()
    with pytest.raises(CheckpointError, match=re.escape("encoder.layer.0.intermediate.dense.weight checkpoint "
                                                        f"({H}, {I}) vs model ({I}, {H})")):
        UniterModel.from_pretrained(sd, config())
    _, report = UniterModel.from_pretrained(sd, config(), strict=False)
    assert report.mismatched == [("encoder.layer.0.intermediate.dense.weight", (H, I), (I, H))]


def test_a_state_dict_of_another_model_gets_the_hint():
    """Nothing matching at all most likely means the wrong file: the error says so."""
    sd = {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}
    with pytest.raises(CheckpointError, match=r"no key matched: is it a UNITER or BERT checkpoint\?"):
        UniterModel.from_pretrained(sd, config())


def test_an_empty_checkpoint_is_named_as_empty(tmp_path):
    """An empty file (a failed save) is refused as empty, naming the file, not blamed on a missing key."""
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"empty\.pt is not a state dict.*an empty mapping"):
        UniterModel.from_pretrained(tmp_path / "empty.pt", config())


def test_a_sharded_directory_says_sharding_is_unsupported(tmp_path):
    """A Hugging Face directory holding only shards gets the reason, not just 'no weights'."""
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(FileNotFoundError, match=r"sharded checkpoints are not supported"):
        UniterModel.from_pretrained(tmp_path, config())


def test_config_inference_refuses_what_it_cannot_know():
    """A width that is not a multiple of 64 has no safe head count, and a checkpoint without encoder layers no
    depth: both are CheckpointErrors asking for a config, not a silent guess or a bare max() error."""
    sd = trunk_state_dict(hidden=96, inter=192)
    with pytest.raises(CheckpointError, match=r"hidden size 96 is not a multiple of 64.*pass a config"):
        UniterModel.from_pretrained(sd)
    assert UniterModel.from_pretrained(sd, config(hidden_size=96, num_attention_heads=3,
                                                  intermediate_size=192)).config.num_attention_heads == 3
    sd = {k: v for k, v in trunk_state_dict().items() if ".encoder." not in k}
    with pytest.raises(CheckpointError, match=r"cannot infer the model config from <state dict>: it has no encoder"):
        UniterModel.from_pretrained(sd)


# explicit configs and extras ----------------------------------------------------------------------------------
def test_an_explicit_config_wins_over_config_json_beside(tmp_path):
    """config.json beside the weights is the fallback for config=None only: a config the caller passes (here other
    heads and dropout, same shapes) is the one the model gets."""
    torch.save(trunk_state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(config().to_dict(original_only=True)))
    given = config(num_attention_heads=2, hidden_dropout_prob=0.0)
    assert UniterModel.from_pretrained(tmp_path / "model.pt", given).config == given
    assert UniterModel.from_pretrained(tmp_path / "model.pt").config.num_attention_heads == 4


@pytest.mark.parametrize("buffer", ["position_ids", "token_type_ids"])
def test_hugging_face_embedding_buffers_are_ignored(buffer):
    """Older transformers saved `embeddings.position_ids` / `token_type_ids` buffers: not weights, ignored."""
    sd = {("bert." + k[len("uniter."):]): v for k, v in trunk_state_dict().items()}
    sd[f"bert.embeddings.{buffer}"] = torch.zeros(1, 512, dtype=torch.long)
    model, report = UniterModel.from_pretrained(sd, config(), strict=False)
    assert report.ok and report.ignored == [f"bert.embeddings.{buffer}"]
    UniterModel.from_pretrained(sd, config())  # strict accepts it too


def test_state_dict_values_are_detached_and_deep_copyable():
    """A state dict snapshot (copy.deepcopy, the usual best-model copy) must work: the fused QKV's original-named
    blocks are plain detached tensors like every other entry."""
    model = UniterModel(config())
    state = model.state_dict()
    assert not any(v.requires_grad for v in state.values())
    snapshot = copy.deepcopy(state)
    q = snapshot["encoder.layer.0.attention.self.query.weight"]
    assert torch.equal(q, model.encoder.layer[0].attention.self.qkv.weight.detach()[:H])
    # with keep_vars the blocks are still detached views (a view with a grad_fn cannot be deep-copied)
    kept = model.state_dict(keep_vars=True)
    assert not kept["encoder.layer.1.attention.self.value.bias"].requires_grad
    copy.deepcopy(kept)


# config: presets and the original JSON --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["base", "large"])
def test_the_shipped_original_json_is_the_preset(name):
    """configs/uniter-{base,large}.json are the original's files: they read (strictly) as the presets, and the
    presets' sizes are the paper's (reference/uniter.md 1.1)."""
    preset = UniterConfig.preset(name)
    assert UniterConfig.from_json(CONFIGS / f"uniter-{name}.json") == preset
    expected = {"base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096)}[name]
    assert (preset.hidden_size, preset.num_hidden_layers, preset.num_attention_heads,
            preset.intermediate_size) == expected
    assert (preset.vocab_size, preset.max_position_embeddings, preset.type_vocab_size) == (28996, 512, 2)


def test_preset_overrides_win():
    """Overrides replace a preset's own values (large with fewer layers is how tests and benchmarks shrink it)."""
    assert UniterConfig.large(num_hidden_layers=2).num_hidden_layers == 2
    assert UniterConfig.large(num_hidden_layers=2).hidden_size == 1024
    tiny = UniterConfig.tiny(hidden_size=64, hidden_dropout_prob=0.1)
    assert (tiny.hidden_size, tiny.hidden_dropout_prob) == (64, 0.1)


def test_tiny_preset_is_what_its_doc_says():
    """2 layers of width 128 with 4 heads, no dropout, initializer_range 0.1 (the doc's measured choice)."""
    tiny = UniterConfig.tiny()
    assert (tiny.num_hidden_layers, tiny.hidden_size, tiny.num_attention_heads) == (2, 128, 4)
    assert (tiny.hidden_dropout_prob, tiny.attention_probs_dropout_prob, tiny.initializer_range) == (0.0, 0.0, 0.1)
    assert tiny.layer_norm_eps == 1e-12 and tiny.hidden_act == "gelu"


def test_from_json_is_strict_by_default(tmp_path):
    """A misspelt field in a UNITER config file is an error naming it, not a silent default."""
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "num_hiden_layers": 3}))
    with pytest.raises(ValueError, match=r"typo\.json: unknown UNITER config keys \['num_hiden_layers'\]"):
        UniterConfig.from_json(path)


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", r"expected a JSON object, got list"),
    (json.dumps({"hidden_act": "relu"}), r"hidden_act 'relu': UNITER uses 'gelu'"),
    (json.dumps({"hidden_dropout_prob": 1.0}), r"hidden_dropout_prob must be in \[0, 1\)"),
    (json.dumps({"num_hidden_layers": True}), r"num_hidden_layers must be a positive integer, got True"),
    (json.dumps({"num_hidden_layers": 0}), r"num_hidden_layers must be a positive integer, got 0"),
    (json.dumps({"initializer_range": True}), r"initializer_range must be a number, got True"),
    (json.dumps({"backend": "cuda"}), r"backend 'cuda': expected one of"),
])
def test_invalid_config_files_are_refused_naming_them(tmp_path, content, match):
    """Values the model cannot honour (another activation, certain dropout, a bool for a size) are refused with the
    file's name, before a model is built with them."""
    path = tmp_path / "cfg.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"cfg\.json.*" + match):
        UniterConfig.from_json(path)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model config .*nowhere\.json does not exist"):
        UniterConfig.from_json(tmp_path / "nowhere.json")


def test_original_only_json_has_the_original_fields_in_order(tmp_path):
    """original_only writes exactly the original file's eleven fields, keys sorted as in the original files."""
    UniterConfig.base().to_json(tmp_path / "c.json", original_only=True)
    data = json.loads((tmp_path / "c.json").read_text())
    original = json.loads((CONFIGS / "uniter-base.json").read_text())
    assert list(data) == sorted(original) and data == original


def test_fused_and_original_qkv_keys_together_are_refused():
    """A state dict carrying both the fused qkv and its original parts is ambiguous: load_state_dict must fail,
    not let one silently overwrite the other."""
    model = UniterModel(config())
    state = model.state_dict()
    prefix = "encoder.layer.0.attention.self."
    state[prefix + "qkv.weight"] = torch.zeros(3 * H, H)
    with pytest.raises(RuntimeError):
        UniterModel(config()).load_state_dict(state)


# embeddings: the original's padding row and dropout placement (reference/uniter.md 1.2-1.3) ---------------------
def test_word_embedding_row_0_is_the_padding_row():
    """padding_idx=0 as the original (and BERT): the [PAD] row gets no gradient."""
    from uniter_fast.model.embeddings import TextEmbeddings
    emb = TextEmbeddings(config())
    ids = torch.tensor([0, 5, 0, 7])
    out = emb.eval()(ids, torch.arange(4), torch.zeros(4, dtype=torch.long))
    (out * torch.randn(out.shape)).sum().backward()  # not a plain sum: LayerNorm outputs sum to a constant
    grad = emb.word_embeddings.weight.grad
    assert grad[0].abs().sum() == 0 and grad[5].abs().sum() > 0


@pytest.mark.parametrize("side", ["text", "image"])
def test_embedding_dropout_comes_after_the_layer_norm(side):
    """Dropout(LayerNorm(x)) as the original: in training, dropped outputs are exact zeros (about p of them);
    dropout before the LayerNorm would leave none, and a missing dropout none either."""
    from uniter_fast.model.embeddings import ImageEmbeddings, TextEmbeddings
    cfg = config(hidden_dropout_prob=0.5, img_dim=24)
    n = 64
    if side == "text":
        out = TextEmbeddings(cfg).train()(torch.randint(1, V, (n,)), torch.arange(n), torch.zeros(n, dtype=torch.long))
    else:
        out = ImageEmbeddings(cfg).train()(torch.randn(n, 24), torch.rand(n, 7), torch.randn(n, H))
    zeros = (out == 0).float().mean().item()
    assert 0.4 < zeros < 0.6, zeros
