"""DeepSpeed set-up: process group, the original's optimizer and schedule, and the ZeRO engine."""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import torch
from torch import nn

from uniter_fast.train.config import PretrainConfig

# Parameters whose names contain these are not weight-decayed (the original's substring rule: LayerNorms not
# literally named "LayerNorm", e.g. img_layer_norm, and mask_embedding *are* decayed).
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or create) the process group: one process without a launcher, or the `deepspeed` launcher's ranks."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "WORLD_SIZE" not in os.environ:  # no launcher: a group of one on a free local port
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                           ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # tied parameters appear once, under their first name
        if param.requires_grad:
            (no_decay if any(nd in name for nd in NO_DECAY) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_linear(step: int, warmup_steps: int, total_steps: int) -> float:
    """The original's schedule factor for update `step` (1-based): linear warm-up, then linear decay to 0."""
    if step < warmup_steps:
        return step / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> tuple[torch.optim.Optimizer, object]:
    """AdamW (eps 1e-6, betas (0.9, 0.98), decoupled decay) and the warm-up-linear schedule with a 1e-8 floor.

    torch's AdamW differs from the original's HF-style AdamW only in where eps meets the bias correction and in
    applying decay before rather than after the step: differences far below the update itself at eps=1e-6.
    """
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=tuple(cfg.betas), eps=cfg.adam_eps)
    floor = 1e-8 / cfg.learning_rate

    def factor(done: int) -> float:  # LambdaLR passes the number of updates already made
        return max(warmup_linear(done + 1, cfg.warmup_steps, cfg.num_train_steps), floor)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def deepspeed_config(cfg: PretrainConfig) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": 1,  # a micro-batch is one token-bucket batch
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.grad_norm > 0:
        ds["gradient_clipping"] = cfg.grad_norm
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds


def build_engine(model: nn.Module, cfg: PretrainConfig):
    """The DeepSpeed engine around the model, with our optimizer and schedule."""
    import deepspeed

    optimizer, scheduler = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg))
    return engine


def clear_stale_gradients(engine) -> None:
    """Call before each update's first backward. Under ZeRO-3, DeepSpeed (0.19.8, measured) steps a parameter that
    got no gradient in an update with the gradient partition it got last, still in the optimizer's flat buffer:
    UNITER trains one task's head per update, so every other head would be stepped again with its old gradient.
    Zeroed, the buffer gives those parameters a zero gradient, as stages 0-2 do and as the original does (apex O2's
    zero_grad zeroes the model's gradients in place, so its AdamW steps an unused head with a zero gradient).
    A no-op below stage 3."""
    if engine.zero_optimization_stage() != 3:
        return
    buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
    if buffer is None:
        import deepspeed

        raise RuntimeError(f"ZeRO-3 on DeepSpeed {deepspeed.__version__}: its optimizer has no grad_partitions_flat_buffer "
                           "to clear, so heads unused in an update could be stepped with stale gradients: use zero_stage 2")
    buffer.zero_()


@contextmanager
def full_parameters(model: nn.Module):
    """Every parameter whole on every rank inside the block (ZeRO-3 partitions them); a no-op below stage 3.
    All ranks must enter it together."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield
