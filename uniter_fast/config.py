"""Model configuration: the original UNITER/BERT JSON fields, presets, and JSON in both directions."""
from __future__ import annotations

import dataclasses
import json
import logging
import numbers
from dataclasses import dataclass, fields
from pathlib import Path

from uniter_fast.kernels.backend import BACKENDS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UniterConfig:
    """The fields of the original `config/uniter-{base,large}.json` (BERT's), plus UNITER's image sizes.

    `backend` is ours: "auto" | "torch" | "triton" | "xformers" (overridden by UNITER_FAST_BACKEND); "xformers"
    names attention's backend, the other ops then choose automatically.
    """

    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    img_dim: int = 2048
    img_label_dim: int = 1601
    backend: str = "auto"

    # the keys of the original JSON files, in their order
    ORIGINAL_KEYS = (
        "attention_probs_dropout_prob", "hidden_act", "hidden_dropout_prob", "hidden_size", "initializer_range",
        "intermediate_size", "max_position_embeddings", "num_attention_heads", "num_hidden_layers",
        "type_vocab_size", "vocab_size",
    )

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "img_dim", "img_label_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UniterConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"UniterConfig.hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act != "gelu":
            raise ValueError(f"UniterConfig.hidden_act {self.hidden_act!r}: UNITER uses 'gelu' (erf)")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"UniterConfig.{name} must be a number, got {value!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"UniterConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"UniterConfig.backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # presets ------------------------------------------------------------------------------------------------
    @classmethod
    def base(cls, **overrides) -> "UniterConfig":
        return cls(**overrides)

    @classmethod
    def large(cls, **overrides) -> "UniterConfig":
        return cls(**{**dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096), **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "UniterConfig":
        """For tests and the CPU demo: 2 layers of width 128 with 4 heads, no dropout.

        BERT's initializer_range of 0.02 is set for width 768; at width 128 it leaves the attention path about 1%
        of the residual stream, and a model trained from scratch stalls (measured: image-conditioned predictions at
        chance after 1500 updates with 0.02, 93% after 300 with 0.1). Dropout 0.1 drowns the weak early signal of
        ITM at this size (measured on a small synthetic world: chance until update 550 with it, 0.87 at 200 without).
        """
        return cls(**{**dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=512, initializer_range=0.1, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0), **overrides})

    PRESETS = ("tiny", "base", "large")

    @classmethod
    def preset(cls, name: str, **overrides) -> "UniterConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(cls.PRESETS)}")
        return getattr(cls, name)(**overrides)

    # JSON ---------------------------------------------------------------------------------------------------
    def replace(self, **changes) -> "UniterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self, original_only: bool = False) -> dict:
        data = dataclasses.asdict(self)
        return {k: data[k] for k in self.ORIGINAL_KEYS} if original_only else data

    def to_json(self, path: str | Path, original_only: bool = False) -> None:
        """Write the config; original_only=True writes exactly the original file's fields."""
        Path(path).write_text(json.dumps(self.to_dict(original_only), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict, *, strict: bool = True, source: str = "config") -> "UniterConfig":
        """Build from the original's (or BERT's) field names.

        strict: unknown keys raise, naming them; otherwise they are skipped (a Hugging Face BERT config.json carries
        many keys that mean nothing to UNITER) and logged.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in known)
        if unknown and strict:
            raise ValueError(f"{source}: unknown UNITER config keys {unknown}")
        if unknown:
            log.debug("%s: skipping keys UNITER does not use: %s", source, unknown)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path, *, strict: bool = True) -> "UniterConfig":
        return cls.from_dict(read_json_object(path, "model config"), strict=strict, source=str(path))


def read_json_object(path: str | Path, what: str) -> dict:
    """A JSON file holding one object; errors name the file and what it was meant to be."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data
