"""The pre-training configuration: the original's field names where one exists (reference/uniter.md 3.4-3.5)."""
from __future__ import annotations

import dataclasses
import numbers
import typing
from dataclasses import dataclass, field
from pathlib import Path

from uniter_fast.config import UniterConfig, read_json_object
from uniter_fast.data.synthetic import WorldConfig
from uniter_fast.objectives.tasks import TASKS


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(value, name: str, least: int) -> None:
    """An integer (not a bool, not a float) of at least `least` (0 or 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        kind = "a positive" if least == 1 else "a non-negative"
        raise ValueError(f"{name} must be {kind} integer, got {value!r}")


@dataclass(frozen=True)
class ModelOptions:
    preset: str = "tiny"                 # tiny | base | large
    config: str | None = None            # a JSON in the original's fields; wins over the preset
    overrides: dict = field(default_factory=dict)
    init_checkpoint: str | None = None   # an original UNITER or Hugging Face BERT checkpoint

    def __post_init__(self) -> None:
        if self.config is None and self.preset not in UniterConfig.PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; expected one of {', '.join(UniterConfig.PRESETS)}")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides must be an object of UNITER config keys, got {self.overrides!r}")
        known = {f.name for f in dataclasses.fields(UniterConfig)}
        unknown = sorted(k for k in self.overrides if k not in known)
        if unknown:
            raise ValueError(f"overrides: unknown UNITER config keys {unknown}; expected some of {sorted(known)}")

    def build_config(self, **forced) -> UniterConfig:
        base = UniterConfig.from_json(self.config) if self.config else UniterConfig.preset(self.preset)
        return base.replace(**{**self.overrides, **forced})


@dataclass(frozen=True)
class DataOptions:
    world: WorldConfig = WorldConfig()   # the built-in synthetic world
    vocab_size: int = 400                # of the WordPiece vocabulary trained on its captions
    max_txt_len: int = 60                # captions longer than this many words are dropped, as the original
    # files instead of the synthetic world (all three together; docs/converters.md writes them). Relative paths
    # are relative to the working directory, like output_dir. `world` and `vocab_size` are then unused: the
    # vocabulary is the text corpora's.
    region_store: str | None = None      # a region store directory (uniter_fast.data.region_store)
    text_corpus: str | tuple | None = None      # training text corpus file(s) (uniter_fast.data.text_corpus)
    val_text_corpus: str | tuple | None = None  # held-out text corpus file(s): validation and retrieval

    def __post_init__(self) -> None:
        files = {"region_store": self.region_store, "text_corpus": self.text_corpus,
                 "val_text_corpus": self.val_text_corpus}
        for name in ("text_corpus", "val_text_corpus"):
            value = files[name]
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, name, value)
            if isinstance(value, tuple) and not value:
                raise ValueError(f"{name}: an empty list; give one corpus file or several")
            for path in value if isinstance(value, tuple) else (value,):
                if path is not None and (not isinstance(path, str) or not path):
                    raise ValueError(f"{name} must be a path or a list of paths, got {path!r}")
        if self.region_store is not None and (not isinstance(self.region_store, str) or not self.region_store):
            raise ValueError(f"region_store must be a path (a string), got {self.region_store!r}")
        given = [k for k, v in files.items() if v is not None]
        if given and len(given) != len(files):
            absent = [k for k in files if k not in given]
            raise ValueError(f"{', '.join(given)} given without {', '.join(absent)}: reading files instead of the "
                             "synthetic world needs region_store, text_corpus and val_text_corpus together")
        _check_int(self.vocab_size, "vocab_size", least=1)
        _check_int(self.max_txt_len, "max_txt_len", least=1)

    @property
    def from_files(self) -> bool:
        """Whether the data comes from a region store and text corpora rather than the synthetic world."""
        return self.region_store is not None

    def corpus_paths(self, name: str) -> tuple[str, ...]:
        value = getattr(self, name)
        return () if value is None else (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class EvalOptions:
    valid_steps: int = 0                 # validate every this many updates (0: only at the end)
    val_batches: int = 8                 # batches per task when validating
    retrieval_images: int = 100          # zero-shot retrieval over this many held-out images (one caption each)

    def __post_init__(self) -> None:
        _check_int(self.valid_steps, "valid_steps", least=0)
        _check_int(self.val_batches, "val_batches", least=1)
        _check_int(self.retrieval_images, "retrieval_images", least=1)


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelOptions = ModelOptions()
    data: DataOptions = DataOptions()
    eval: EvalOptions = EvalOptions()
    # one task per update, drawn with these weights (the original's mix_ratio)
    tasks: dict = field(default_factory=lambda: {"itm": 2, "mlm": 2, "mrfr": 1, "mrckl": 1})
    # ours: phases run first, each {"steps": n, "tasks": mix}; then `tasks` for the rest of the run
    task_phases: tuple = ()
    mrm_prob: float = 0.15
    itm_neg_prob: float = 0.5
    itm_ot_lambda: float = 0.1
    conditional_masking: bool = True
    train_batch_size: int = 4096         # padded tokens per micro-batch (the original's token budget)
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    warmup_steps: int = 10000
    num_train_steps: int = 200000
    betas: tuple = (0.9, 0.98)
    adam_eps: float = 1e-6
    weight_decay: float = 0.01
    grad_norm: float = 5.0               # -1 turns clipping off
    precision: str = "fp32"              # fp32 | bf16 | fp16 (DeepSpeed's mixed precision)
    zero_stage: int = 2
    # ours: run the encoder under torch.compile with this backend ("inductor" on a GPU fuses the passes around
    # the matrix products; the attention kernels stay whole as custom ops). None: eager. Not with ZeRO-3 yet.
    compile: str | None = None
    # ours: batches a thread makes ahead while a step runs (uniter_fast/train/batches.py); None: 2 on a GPU, 0 on
    # the CPU (where the thread would take a core from the step)
    prefetch_batches: int | None = None
    seed: int = 42
    output_dir: str = "runs/pretrain"
    log_every: int = 10
    # ours: a resumable training state (uniter_fast/train/state.py) every this many updates, beside the one saved
    # at each validation; 0: at validations only
    save_steps: int = 0

    def __post_init__(self) -> None:
        _check_mix(self.tasks, "tasks")
        if not isinstance(self.task_phases, (tuple, list)):
            raise ValueError('task_phases must be a list of {"steps": n, "tasks": mix} objects, '
                             f"got {self.task_phases!r}")
        for i, phase in enumerate(self.task_phases):
            where = f"task_phases[{i}]"
            if not isinstance(phase, dict) or set(phase) != {"steps", "tasks"}:
                raise ValueError(f"{where}: expected an object with exactly the keys 'steps' and 'tasks', got {phase!r}")
            if isinstance(phase["steps"], bool) or not isinstance(phase["steps"], int) or phase["steps"] < 1:
                raise ValueError(f"{where}.steps must be a positive integer, got {phase['steps']!r}")
            _check_mix(phase["tasks"], f"{where}.tasks")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision {self.precision!r}: expected fp32, bf16 or fp16")
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage {self.zero_stage!r}: expected 0, 1, 2 or 3")
        _check_compile(self.compile, self.zero_stage)
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_steps", "log_every"):
            _check_int(getattr(self, name), name, least=1)
        for name in ("warmup_steps", "seed", "save_steps"):
            _check_int(getattr(self, name), name, least=0)
        if self.prefetch_batches is not None:
            _check_int(self.prefetch_batches, "prefetch_batches", least=0)
        for name, ok, expected in (("learning_rate", lambda v: v > 0, "a number > 0"),
                                   ("adam_eps", lambda v: v > 0, "a number > 0"),
                                   ("weight_decay", lambda v: v >= 0, "a number >= 0"),
                                   ("grad_norm", lambda v: True, "a number (-1: no clipping)"),
                                   ("mrm_prob", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
                                   ("itm_neg_prob", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
                                   ("itm_ot_lambda", lambda v: v >= 0, "a number >= 0")):
            value = getattr(self, name)
            if not _is_number(value) or not ok(value):
                raise ValueError(f"{name} must be {expected}, got {value!r}")
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2 or \
                not all(_is_number(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not isinstance(self.conditional_masking, bool):
            raise ValueError(f"conditional_masking must be true or false, got {self.conditional_masking!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir must be a directory path, got {self.output_dir!r}")

    def replace(self, **changes) -> "PretrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: str | Path) -> "PretrainConfig":
        return _build(cls, read_json_object(path, "pre-training config"), str(path))


def _check_compile(backend, zero_stage: int) -> None:
    if backend is None:
        return
    import torch

    known = torch.compiler.list_backends(exclude_tags=())
    if not isinstance(backend, str) or backend not in known:
        raise ValueError(f"compile {backend!r}: expected null or a torch.compile backend ({', '.join(known)})")
    if zero_stage == 3:  # ZeRO-3 gathers each module's parameters in hooks that a compiled encoder would trace
        raise ValueError("compile is not supported with zero_stage 3 yet: use zero_stage 0-2, or compile null")


def _check_mix(mix, where: str) -> None:
    """A mix is {task: positive integer ratio} over known tasks."""
    if not isinstance(mix, dict) or not mix:
        raise ValueError(f"{where}: at least one pre-training task is needed, as {{task: ratio}}")
    for task, ratio in mix.items():
        if task not in TASKS:
            raise ValueError(f"{where}: unknown task {task!r}; expected some of {', '.join(TASKS)}")
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
            raise ValueError(f"{where}: the mix ratio of {task!r} must be a positive integer, got {ratio!r}")


def _build(cls, data, where: str):
    """Nested dataclass from a JSON object; unknown keys are errors naming the file and key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{where}: {name}")
        elif hint is tuple and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
