"""The `uniter-fast` command: pre-training and an environment report."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _pretrain(args: argparse.Namespace) -> int:
    from uniter_fast.train.config import PretrainConfig
    from uniter_fast.train.loop import pretrain

    cfg = PretrainConfig.from_json(args.config)
    changes = {k: v for k, v in (("output_dir", args.output_dir), ("num_train_steps", args.steps),
                                 ("precision", args.precision)) if v is not None}
    cfg = cfg.replace(**changes)
    try:
        metrics = pretrain(cfg, progress=not args.no_progress)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()  # through deepspeed, which holds references to the group
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    summary = {"validation": metrics["validation"], "zero_shot_retrieval": metrics["zero_shot_retrieval"]}
    print(json.dumps(summary, indent=2))
    print(f"wrote {cfg.output_dir}/metrics.json, {cfg.output_dir}/curves.png and the checkpoint in {cfg.output_dir}/ckpt")
    return 0


def _env(args: argparse.Namespace) -> int:
    from uniter_fast.env import environment_report

    print(environment_report())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="uniter-fast", description=__doc__)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train UNITER (the built-in synthetic world by default)")
    p.add_argument("--config", required=True, help="pre-training config JSON, e.g. configs/pretrain-tiny.json")
    p.add_argument("--output-dir", default=None, help="override the config's output_dir")
    p.add_argument("--steps", type=int, default=None, help="override num_train_steps")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None, help="override precision")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a log line per interval instead)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(run=_pretrain)

    e = sub.add_parser("env", help="versions, device, and which backend each op uses and why")
    e.set_defaults(run=_env)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
