"""Checkpoints in both directions: the original UNITER layout and Hugging Face BERT (reference/uniter.md 1.9).

Loading maps every checkpoint key onto the *original layout* (`uniter.<trunk>` + head keys, exactly the
original `UniterForPretraining` state dict), which is also what our models' keys become when saved, and matches
the two. Accepted sources:

1. original UNITER pre-training checkpoints (`uniter.*` + `cls.predictions.*`, `feat_regress.*`,
   `region_classifier.*`, `itm_output.*`), fp16 or fp32, heads present or not, tied tensors once or twice;
2. the original's init checkpoints (BERT `BertForPreTraining` with `bert` -> `uniter` in every key);
3. bare trunk state dicts (`embeddings.*`, `img_embeddings.*`, `encoder.*`, `pooler.*`) and our own files, also
   dicts named after our parameters (DeepSpeed's zero_to_fp32 and 16-bit model files), where each layer's
   query, key and value are one fused `attention.self.qkv` (its row blocks, in that order);
4. Hugging Face BERT (`BertModel` with or without `bert.`, `BertForPreTraining`), safetensors or .bin, including
   old TF-converted `gamma`/`beta` names.

Parts that may be absent keep their fresh initialisation (reported as `initialized`): the image side
(`uniter.img_embeddings.*`) and every head. The text embeddings, encoder and pooler are required. Keys of heads
the model does not have at all (pre-training heads into `UniterModel`, `vqa_output.*`, ...) are `ignored`.

With `config=None` the config is read from `config.json` beside the weights, or inferred from the tensor shapes
with `num_attention_heads = hidden_size // 64` (true for BERT and UNITER base and large); a checkpoint with other
head counts needs an explicit config. Files are read with safetensors or `torch.load(weights_only=True)`: no
arbitrary object is ever unpickled.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from uniter_fast.config import UniterConfig, read_json_object
from uniter_fast.files import replacing
from uniter_fast.model.encoder import QKV_PARTS
from uniter_fast.model.uniter import UniterModel

log = logging.getLogger(__name__)

TRUNK = "uniter."  # the original's prefix of the trunk in every full model
IMAGE_SIDE = "uniter.img_embeddings."
_TRUNK_ROOTS = ("embeddings.", "img_embeddings.", "encoder.", "pooler.")
_WRAPPER_KEYS = ("state_dict", "model", "module")  # one level of {"model": state_dict} etc. is unwrapped
_KEY_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile prefixes on keys
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# alias (original layout) -> the key it duplicates; the alias is dropped when both are present (after checking
# they agree) and renamed to the primary when it is present alone
_ALIASES = {
    "cls.predictions.decoder.weight": "uniter.embeddings.word_embeddings.weight",  # tied
    "feat_regress.weight": "uniter.img_embeddings.img_linear.weight",  # tied
    "cls.predictions.decoder.bias": "cls.predictions.bias",  # newer Hugging Face BERT's duplicate of the MLM bias
}
# keys (original layout) that checkpoints carry and no UNITER model has: always ignored
_KNOWN_EXTRAS = tuple(re.compile(p) for p in (
    r"^uniter\.embeddings\.(position_ids|token_type_ids)$",  # Hugging Face buffers
    r"^cls\.seq_relationship\.",  # BERT's next-sentence head
))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model (strict mode)."""


@dataclass
class LoadReport:
    """What loading did. missing/initialized/mismatched name the model's keys; unexpected/ignored the checkpoint's."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint shape, model shape)
    initialized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def errors(self, limit: int = 50) -> str:
        lines = [f"  missing ({len(self.missing)}): {_listing(self.missing, limit)}" if self.missing else "",
                 f"  unexpected ({len(self.unexpected)}): {_listing(self.unexpected, limit)}" if self.unexpected else "",
                 f"  wrongly shaped ({len(self.mismatched)}): " + _listing(
                     [f"{k} checkpoint {tuple(c)} vs model {tuple(m)}" for k, c, m in self.mismatched], limit)
                 if self.mismatched else ""]
        return "\n".join(line for line in lines if line)

    def __str__(self) -> str:
        lines = [f"loaded {self.source}: " + ("ok" if self.ok else "errors"), self.errors()]
        for name in ("initialized", "ignored"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"  {name} ({len(keys)}): {_by_part(keys)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(line for line in lines if line)


def _listing(items: list[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _part(key: str) -> str | None:
    """The optional part an original-layout key belongs to (image side or a head), None for required keys."""
    if key.startswith(IMAGE_SIDE):
        return IMAGE_SIDE[:-1]
    return None if key.startswith(TRUNK) else key.split(".", 1)[0]


def _by_part(keys: list[str]) -> str:
    """Short lists in full, long ones as counts per part."""
    if len(keys) <= 6:
        return ", ".join(keys)
    counts: dict[str, int] = {}
    for key in keys:
        part = _part(key) or key.rsplit(".", 1)[0]
        counts[part] = counts.get(part, 0) + 1
    return ", ".join(f"{p}.* ({n})" for p, n in counts.items())


# key mapping: one function per direction -----------------------------------------------------------------------
# our fused parameters, as dicts named after the model's parameters have them (DeepSpeed's zero_to_fp32 and 16-bit
# model files): SelfAttention.qkv holds the original's query, key and value as row blocks, in that order
_FUSED = re.compile(r"^(.*\.attention\.self\.)qkv\.(weight|bias)$")


def _unfused(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint entry as the original's: a fused QKV weight or bias becomes its three row blocks; anything
    else stays as it is."""
    match = _FUSED.match(key)
    if match is None:
        return [(key, tensor)]
    prefix, kind = match.groups()
    if tensor.dim() == 0 or tensor.shape[0] % 3:
        raise CheckpointError(f"{key}: a fused query/key/value tensor needs 3 equal row blocks, got shape "
                              f"{tuple(tensor.shape)}")
    return [(f"{prefix}{part}.{kind}", block) for part, block in zip(QKV_PARTS, tensor.chunk(3))]


def _original_key(key: str) -> str:
    """A checkpoint key in any accepted layout -> the original layout."""
    while key.startswith(_KEY_PREFIXES):  # in any order and nesting: torch.compile(DDP(model)) gives both
        key = key[len(next(p for p in _KEY_PREFIXES if key.startswith(p))):]
    head, _, last = key.rpartition(".")
    if last in ("gamma", "beta"):  # TF-converted LayerNorm names, renamed as the original loader does
        key = f"{head}.{'weight' if last == 'gamma' else 'bias'}"
    if key.startswith("bert."):
        return TRUNK + key[len("bert."):]
    return TRUNK + key if key.startswith(_TRUNK_ROOTS) else key


def _trunk_prefix(model: nn.Module) -> str:
    """Where the trunk sits in the model: '' for a UniterModel, 'uniter.' for the models that hold it there."""
    for name, module in model.named_modules():
        if isinstance(module, UniterModel):
            return f"{name}." if name else ""
    raise TypeError(f"{type(model).__name__} holds no UniterModel")


def to_original_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the original layout (a UniterModel gets the `uniter.` prefix); tied tensors twice."""
    prefix = _trunk_prefix(model)
    return {(TRUNK + k[len(prefix):] if k.startswith(prefix) else k): v.detach()
            for k, v in model.state_dict().items()}


# reading -------------------------------------------------------------------------------------------------------
def _read(source) -> tuple[dict[str, torch.Tensor], str, Path | None]:
    """-> (state dict, source name, config.json beside the weights or None)."""
    if isinstance(source, Mapping):
        return _as_state_dict(source, "<state dict>"), "<state dict>", None
    path = Path(os.fspath(source))
    if path.is_dir():
        found = [path / name for name in _HF_WEIGHT_FILES if (path / name).is_file()]
        if not found:
            sharded = " (sharded checkpoints are not supported)" if list(path.glob("*.index.json")) else ""
            raise FileNotFoundError(f"checkpoint directory {path} holds neither {' nor '.join(_HF_WEIGHT_FILES)}"
                                    f"{sharded}")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is reported with the file's name
        how = "safetensors" if path.suffix == ".safetensors" else "torch.load(weights_only=True)"
        raise CheckpointError(f"checkpoint {path} cannot be read with {how}: {type(err).__name__}: {err}") from None
    config_json = path.parent / "config.json"
    return _as_state_dict(data, str(path)), str(path), config_json if config_json.is_file() else None


def _as_state_dict(data, name: str) -> dict[str, torch.Tensor]:
    def is_state_dict(x) -> bool:
        return isinstance(x, Mapping) and len(x) > 0 and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in x.items())

    if isinstance(data, Mapping) and not is_state_dict(data):
        data = next((data[k] for k in _WRAPPER_KEYS if isinstance(data.get(k), Mapping)), data)
    if not is_state_dict(data):
        what = f"a {type(data).__name__}" if not isinstance(data, Mapping) else (
            "an empty mapping" if not data else "a mapping with non-tensor entries "
            + str(sorted(str(k) for k, v in data.items() if not isinstance(v, torch.Tensor))[:5]))
        raise CheckpointError(f"checkpoint {name} is not a state dict (a mapping of names to tensors, or one wrapped "
                              f"under {'/'.join(_WRAPPER_KEYS)}): it holds {what}")
    return dict(data)


def _read_config(path: Path) -> UniterConfig:
    try:
        data = read_json_object(path, "model config")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{path}: position_embedding_type {data['position_embedding_type']!r} is not "
                                  "UNITER's (absolute)")
        return UniterConfig.from_dict(data, strict=False, source=str(path))  # an HF config.json has other keys
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def infer_config(state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>") -> UniterConfig:
    """Sizes from the shapes of an original-layout (or any accepted) state dict; heads = hidden_size // 64."""
    sd = {_original_key(k): v for k, v in state_dict.items()}

    def shape(key: str, default=None):  # of a weight matrix
        alias = next((a for a, p in _ALIASES.items() if p == key and a in sd), None)
        if key not in sd and alias is None:
            if default is None:
                raise CheckpointError(f"cannot infer the model config from {source}: it has no {key}; pass a config")
            return default
        name = key if key in sd else alias
        found = tuple(sd[name].shape)
        if len(found) != 2:
            raise CheckpointError(f"cannot infer the model config from {source}: {name} has shape {found}, expected "
                                  "a matrix (2 dimensions)")
        return found

    vocab, hidden = shape("uniter.embeddings.word_embeddings.weight")
    layers = [int(m.group(1)) for k in sd if (m := re.match(r"uniter\.encoder\.layer\.(\d+)\.", k))]
    if not layers:
        raise CheckpointError(f"cannot infer the model config from {source}: it has no encoder layers")
    if hidden % 64:
        raise CheckpointError(f"cannot infer the head count of {source} (hidden size {hidden} is not a multiple of "
                              "64); pass a config")
    return UniterConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=max(layers) + 1, num_attention_heads=hidden // 64,
        intermediate_size=shape("uniter.encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=shape("uniter.embeddings.position_embeddings.weight")[0],
        type_vocab_size=shape("uniter.embeddings.token_type_embeddings.weight")[0],
        img_dim=shape("uniter.img_embeddings.img_linear.weight", (0, UniterConfig.img_dim))[1],
        img_label_dim=shape("region_classifier.net.3.weight", (UniterConfig.img_label_dim,))[0],
    )


# loading -------------------------------------------------------------------------------------------------------
def load_pretrained(model_cls, source, config: UniterConfig | None = None, *, strict: bool = True, **model_kwargs):
    """Build `model_cls(config, **model_kwargs)` and load `source` into it.

    source: a file (.safetensors, or anything torch.save wrote), a Hugging Face directory, or a state dict.
    config: a UniterConfig or a JSON path; None reads config.json beside the weights (for a file source too), else
    infers the sizes from the tensor shapes (see module doc).
    Returns the model, or (model, LoadReport) when strict=False. strict=True raises CheckpointError on missing,
    unexpected or wrongly shaped keys; absent image side / heads are never errors (`initialized`).
    """
    state_dict, name, config_json = _read(source)
    if isinstance(config, (str, os.PathLike)):
        config = UniterConfig.from_json(config, strict=False)
    if config is None:
        config = _read_config(config_json) if config_json is not None else infer_config(state_dict, name)
    model = model_cls(config, **model_kwargs)
    report = load_state_dict_into(model, state_dict, source=name, strict=strict)
    return model if strict else (model, report)


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "<state dict>",
                         strict: bool = True) -> LoadReport:
    """Copy a checkpoint (any accepted layout) into a built model; ties kept, values cast to the model's dtype."""
    prefix = _trunk_prefix(model)
    targets = {(TRUNK + k[len(prefix):] if k.startswith(prefix) else k): (k, t)
               for k, t in model.state_dict(keep_vars=True).items()}
    model_parts = {k.split(".", 1)[0] for k in targets}
    report = LoadReport(source=source)

    ckpt: dict[str, tuple[str, torch.Tensor]] = {}  # original-layout key -> (checkpoint key, tensor)
    for key, tensor in state_dict.items():
        for part_key, part in _unfused(key, tensor):
            okey = _original_key(part_key)
            if okey in ckpt:
                raise CheckpointError(f"checkpoint {source}: {ckpt[okey][0]} and {key} are the same key ({okey})")
            ckpt[okey] = (key, part)
    for alias, primary in _ALIASES.items():
        if alias not in ckpt:
            continue
        if primary not in ckpt:
            ckpt[primary] = ckpt.pop(alias)
            continue
        (akey, a), (pkey, p) = ckpt.pop(alias), ckpt[primary]
        if a.shape != p.shape or not torch.equal(a.float(), p.float()):
            report.notes.append(f"{akey} differs from {pkey}; kept {pkey}")
        if alias not in targets:
            report.ignored.append(akey)

    loaded: list[tuple[torch.Tensor, torch.Tensor]] = []
    for okey, (key, tensor) in ckpt.items():
        if okey in targets:
            mkey, target = targets[okey]
            if tensor.shape != target.shape:
                report.mismatched.append((mkey, tuple(tensor.shape), tuple(target.shape)))
            else:
                loaded.append((target, tensor))
        elif any(p.match(okey) for p in _KNOWN_EXTRAS) or okey.split(".", 1)[0] not in model_parts:
            report.ignored.append(key)  # a known extra, or a head this model does not have
        else:
            report.unexpected.append(key)

    given_parts = {_part(k) for k in ckpt if k in targets}
    for okey, (mkey, _) in targets.items():
        if okey in ckpt or (okey in _ALIASES and _ALIASES[okey] in targets):  # loaded, or tied to a loaded key
            continue
        part = _part(okey)
        (report.initialized if part is not None and part not in given_parts else report.missing).append(mkey)

    if strict and not report.ok:
        hint = "" if loaded else "\n  (no key matched: is it a UNITER or BERT checkpoint?)"
        raise CheckpointError(f"cannot load checkpoint {source} into {type(model).__name__}:\n"
                              f"{report.errors()}{hint}")
    with torch.no_grad():
        for target, tensor in loaded:
            target.copy_(tensor)  # in place: shared (tied) parameters stay shared; casts fp16/bf16 to the model dtype
    log.info("%s", report)
    return report


# saving --------------------------------------------------------------------------------------------------------
def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the original key layout: `.safetensors` through safetensors, anything else with torch.save (a flat
    state dict of tensors, loadable with weights_only=True). Tied tensors appear under both names, as the original.
    Written to a temporary file renamed into place: a failed save leaves no half-written file at `path`, and the
    file already there intact."""
    path = Path(path)
    state = {k: v.cpu() for k, v in to_original_state_dict(model).items()}
    with replacing(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            seen: set[int] = set()
            for key, tensor in state.items():  # safetensors refuses shared storage: clone the second name of a tie
                ptr = tensor.untyped_storage().data_ptr()
                state[key] = tensor.clone() if ptr in seen else tensor.contiguous()
                seen.add(ptr)
            save_file(state, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(state, tmp)


def to_bert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The text side in Hugging Face `BertForPreTraining` layout: `bert.embeddings/encoder/pooler.*` and
    `cls.predictions.*` (with the `decoder.bias` duplicate transformers has); image side and UNITER heads dropped.
    Loads into transformers' BertForPreTraining with only `cls.seq_relationship.*` missing."""
    out = {}
    for key, tensor in to_original_state_dict(model).items():
        if key.startswith(TRUNK) and not key.startswith(IMAGE_SIDE):
            out["bert." + key[len(TRUNK):]] = tensor
        elif key.startswith("cls.predictions."):
            out[key] = tensor
    if "cls.predictions.bias" in out:
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return out
