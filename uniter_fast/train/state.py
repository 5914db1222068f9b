"""A pre-training run's resumable state, saved under output_dir/resume/step_{N}/ and continued exactly.

A state is DeepSpeed's checkpoint (weights, optimizer, schedule, loss scale; under ZeRO each rank's partition),
each rank's random state and token count (rank_{r}.pt), the training history (history.json) and, written last
as the mark of a complete state, run_state.json (updates done, batches drawn per task, world size, the config).
The data position needs nothing more: a batch is a pure function of its plan, and the plans of the updates done
are drawn again without making their batches (TaskStreams.fast_forward). A state cut short by the pre-emption it
guards against has no run_state.json: resuming skips it for the newest complete one, so two are kept.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("uniter_fast.train")

RESUME_DIR = "resume"
KEEP = 2
MARK = "run_state.json"
# config keys a resumed run may change: none of them changes which batches are drawn or what a step computes
FREE_KEYS = ("output_dir", "prefetch_batches", "log_every", "save_steps")
MARK_KEYS = ("update", "seconds", "drawn", "world_size", "config")


@dataclass
class RunState:
    update: int                # updates done
    tokens: int                # this rank's tokens trained on
    seconds: float             # training time so far
    history: list[dict]
    drawn: dict[str, int]      # batches drawn per task: checked against the draws replayed on resume


def state_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """(update, directory) of every state under out_dir/resume, complete or not, newest first."""
    root = Path(out_dir) / RESUME_DIR
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := re.fullmatch(r"step_(\d+)", p.name))]
    return sorted(found, reverse=True)


def _config_json(config: dict) -> dict:
    return json.loads(json.dumps(config, default=list))  # tuples as lists, as pretrain_config.json has them


def save_state(engine, out_dir: Path, state: RunState, config: dict, rank: int, world_size: int) -> Path:
    """Every rank calls it together. Returns the state's directory; older states go, but the newest KEEP complete."""
    import deepspeed.comm as dist

    root = Path(out_dir) / RESUME_DIR
    tag = f"step_{state.update}"
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rng = {"cpu": torch.get_rng_state(), "tokens": state.tokens}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, root / tag / f"rank_{rank}.pt")
    dist.barrier()  # every rank's files are written before the mark says the state is complete
    if rank == 0:
        (root / tag / "history.json").write_text(json.dumps(state.history) + "\n")
        mark = {"update": state.update, "seconds": state.seconds, "drawn": state.drawn, "world_size": world_size,
                "config": _config_json(config)}
        tmp = root / tag / (MARK + ".tmp")
        tmp.write_text(json.dumps(mark, indent=2) + "\n")
        os.replace(tmp, root / tag / MARK)
        kept = [p for _, p in state_dirs(out_dir) if (p / MARK).exists()][:KEEP]
        for update, old in state_dirs(out_dir):
            if update < state.update and old not in kept:  # older complete states, and any cut short
                (old / MARK).unlink(missing_ok=True)  # first: a deletion cut short leaves no complete-looking state
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted config keys whose values differ, with both values."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({json.dumps(a)} saved, {json.dumps(b)} now)")
    return out


def newest_complete(out_dir: Path) -> Path:
    """The newest state with its mark; raises FileNotFoundError naming the directory when there is none."""
    dirs = state_dirs(out_dir)
    for _, path in dirs:
        if (path / MARK).exists():
            return path
        log.warning("resume: %s is incomplete (no %s: cut short while saving), trying an older state", path, MARK)
    saved = f"incomplete states {[str(p) for _, p in dirs]}" if dirs else "no state"
    raise FileNotFoundError(f"--resume: {Path(out_dir) / RESUME_DIR} holds {saved} to resume from; a run saves one at "
                            "each validation (eval.valid_steps) and every save_steps updates")


def _damaged(path: Path, why: str) -> ValueError:
    return ValueError(f"--resume: {path} {why}: the state in {path.parent} is damaged")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise _damaged(path, f"is not valid JSON ({err})") from None


def load_state(engine, path: Path, config: dict, rank: int, world_size: int) -> RunState:
    """Every rank calls it together, after the engine is built, with the state to resume from (newest_complete):
    restores the engine and this rank's random state and returns the run's state. The run must be the saved one:
    the same config (but FREE_KEYS), the same ranks."""
    mark = _read_json(path / MARK)
    missing = [k for k in MARK_KEYS if k not in mark] if isinstance(mark, dict) else list(MARK_KEYS)
    if missing:
        raise _damaged(path / MARK, f"lacks {missing}")
    if mark["world_size"] != world_size:
        raise ValueError(f"--resume: {path} was saved by {mark['world_size']} ranks and this run has {world_size}: "
                         "resume with as many (each rank trains on its own shard, and ZeRO partitions by rank)")
    current = _config_json(config)
    changed = [d for d in _differences(mark["config"], current) if d.split(" ")[0] not in FREE_KEYS]
    if changed:
        raise ValueError(f"--resume: this config differs from the one {path} was saved with: {'; '.join(changed)}. "
                         f"A resumed run must be the same run (only {', '.join(FREE_KEYS)} may change)")
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(f"--resume: {rank_file} is missing: the state in {path} is damaged")
    try:
        rng = torch.load(rank_file, weights_only=True)
    except Exception as err:  # whatever unpickling a damaged file raises
        raise _damaged(rank_file, f"cannot be read as a torch file ({type(err).__name__})") from None
    try:
        engine.load_checkpoint(str(path.parent), tag=path.name)
    except AssertionError as err:  # DeepSpeed asserts, without a message, that it found its model states file
        raise FileNotFoundError(f"--resume: DeepSpeed found no checkpoint to load in {path} ({err!r}): the state is "
                                "damaged") from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    history = _read_json(path / "history.json")
    log.info("resume: continuing after update %d from %s", mark["update"], path)
    return RunState(mark["update"], int(rng["tokens"]), float(mark["seconds"]), history, mark["drawn"])
