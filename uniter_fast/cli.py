"""The `uniter-fast` command: pre-training, data conversion and an environment report."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


TRACEBACK_VAR = "UNITER_FAST_TRACEBACK"
# what bad input raises (files, config values, records, keys): reported in one line, without a traceback
INPUT_ERRORS = (OSError, ValueError, KeyError)


def _input_error(command: str, err: Exception) -> int:
    """Exit status 1 and one clear message on stderr; with UNITER_FAST_TRACEBACK=1 the error is raised instead."""
    if os.environ.get(TRACEBACK_VAR) == "1":
        raise err
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    print(f"{command}: error: {message}", file=sys.stderr)
    for note in getattr(err, "__notes__", []):
        print(f"  {note}", file=sys.stderr)
    return 1


def _pretrain(args: argparse.Namespace) -> int:
    from uniter_fast.train.config import PretrainConfig
    from uniter_fast.train.loop import pretrain

    try:
        cfg = PretrainConfig.from_json(args.config)
        changes = {k: v for k, v in (("output_dir", args.output_dir), ("num_train_steps", args.steps),
                                     ("precision", args.precision), ("compile", args.compile),
                                     ("prefetch_batches", args.prefetch_batches)) if v is not None}
        cfg = cfg.replace(**changes)
        metrics = pretrain(cfg, progress=not args.no_progress, overwrite=args.overwrite, resume=args.resume)
        _all_ranks_done()
    except INPUT_ERRORS as err:
        return _input_error("uniter-fast pretrain", err)
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


def _all_ranks_done() -> None:
    """Wait for every rank before the group is torn down: a rank that destroyed its gloo group while another was
    still writing the outputs once died in C++ teardown ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import deepspeed.comm

        deepspeed.comm.barrier()


def _convert(args: argparse.Namespace) -> int:
    from uniter_fast.data import convert

    store = {"append": args.append, "shard_bytes": args.shard_bytes} if hasattr(args, "append") else {}
    progress = not args.no_progress
    try:
        rule = convert.RegionRule(conf_th=args.conf_th, max_bb=args.max_bb, min_bb=args.min_bb) \
            if hasattr(args, "conf_th") else None
        if args.source == "imagedb":
            summary = convert.convert_image_db(args.src, args.dst, nbb_json=args.nbb, boxes=args.boxes, rule=rule,
                                               num_bb=args.num_bb, progress=progress, **store)
        elif args.source == "tsv":
            fields = [f.strip() for f in args.fields.split(",")] if args.fields else convert.LXMERT_FIELDS
            summary = convert.convert_tsv(args.src, args.dst, fields=fields, boxes=args.boxes, rule=rule,
                                          feature_dtype=args.feature_dtype, progress=progress, **store)
        elif args.source == "npz":
            summary = convert.convert_npz_dir(args.src, args.dst, boxes=args.boxes, rule=rule, progress=progress,
                                              **store)
        elif args.source == "txtdb":
            summary = convert.convert_text_db(args.src, args.dst, progress=progress)
        else:
            from uniter_fast.train.config import PretrainConfig

            summary = convert.export_synthetic(PretrainConfig.from_json(args.config), args.dst, progress=progress)
    except INPUT_ERRORS as err:
        return _input_error(f"uniter-fast convert {args.source}", err)
    print("\n".join(summary.lines()))
    return 0


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="convert region features or texts from the original's and other formats",
                       description="Convert features into a region store, or an original text DB into a text "
                                   "corpus file (docs/converters.md).")
    kinds = c.add_subparsers(dest="source", required=True)

    def store_options(p, default_boxes: str, auto: str) -> None:
        p.add_argument("--append", action="store_true", help="add to an existing store instead of creating one")
        p.add_argument("--shard-bytes", type=int, default=None,
                       help="bytes per store shard (default 1 GiB; a store does not record its own)")
        rule = p.add_argument_group("region-count rule (the original's: conf > 0.2, 10..100 boxes)")
        rule.add_argument("--conf-th", type=float, default=0.2, help="confidence threshold (default 0.2)")
        rule.add_argument("--max-bb", type=int, default=100, help="most boxes kept (default 100)")
        rule.add_argument("--min-bb", type=int, default=10, help="fewest boxes kept (default 10)")
        boxes = rule.add_mutually_exclusive_group()
        boxes.add_argument("--boxes", choices=("auto", "rule", "keep"), default=default_boxes,
                           help=f"rule: apply it to every image; keep: store every box; auto: {auto} "
                                f"(default {default_boxes})")
        boxes.add_argument("--all-boxes", dest="boxes", action="store_const", const="rule",
                           help="the source holds every detected box: apply the rule (same as --boxes rule)")
        boxes.add_argument("--keep-boxes", dest="boxes", action="store_const", const="keep",
                           help="store every box as it is (same as --boxes keep)")

    p = kinds.add_parser("imagedb", help="the original UNITER image DB (LMDB, msgpack-numpy or compressed npz)")
    p.add_argument("src", help="the LMDB directory, e.g. /img/coco_train2014/feat_th0.2_max100_min10, or its parent")
    p.add_argument("dst", help="the region store directory to write")
    p.add_argument("--nbb", default=None, help="region-count JSON (default: nbb_th*_max*_min*.json beside a feat_th* DB)")
    p.add_argument("--num-bb", type=int, default=None, help="keep the first N regions (default for feat_numbbN: N)")
    store_options(p, "auto", "as the DB's name says (feat_th*: the nbb JSON's counts, all: the rule, "
                             "feat_numbbN: the first N)")
    p = kinds.add_parser("tsv", help="BUTD / LXMERT feature TSV files (base64 arrays, absolute boxes)")
    p.add_argument("src", nargs="+", help="one or more TSV files")
    p.add_argument("dst", help="the region store directory to write")
    p.add_argument("--fields", default=None, help="comma-separated column names in order (default: LXMERT's "
                                                  "img_id,img_h,img_w,objects_id,objects_conf,attrs_id,attrs_conf,"
                                                  "num_boxes,boxes,features)")
    p.add_argument("--feature-dtype", default="float32", choices=("float32", "float16", "float64"),
                   help="dtype of the base64 features (default float32)")
    store_options(p, "auto", "apply it only to images with more than --max-bb boxes")
    p = kinds.add_parser("npz", help="a directory of per-image .npz files (features, norm_bb, conf, soft_labels)")
    p.add_argument("src", help="the directory of .npz files")
    p.add_argument("dst", help="the region store directory to write")
    store_options(p, "rule", "apply it only to images with more than --max-bb boxes")
    p = kinds.add_parser("txtdb", help="the original UNITER text DB (LMDB + meta/id2len/txt2img/img2txts JSON)")
    p.add_argument("src", help="the text DB directory, e.g. /txt/pretrain_coco_train.db")
    p.add_argument("dst", help="the text corpus file to write, e.g. coco_train.corpus.npz")
    p = kinds.add_parser("synthetic", help="the synthetic world: a region store, text corpora and a config")
    p.add_argument("dst", help="directory to write regions/, train.corpus.npz, val.corpus.npz, pretrain.json into")
    p.add_argument("--config", required=True, help="pre-training config whose data.world and vocab_size to use")
    for p in kinds.choices.values():
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(run=_convert)


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
    p.add_argument("--compile", default=None, metavar="BACKEND",
                   help="run the encoder under torch.compile with this backend (inductor on a GPU)")
    p.add_argument("--prefetch-batches", type=int, default=None, metavar="N",
                   help="override prefetch_batches: batches a thread makes ahead (default 2 on a GPU, 0 on the CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a log line per interval instead)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty output_dir: this run's files replace an earlier run's of the same name, "
                        "and the earlier run's states to resume from are removed")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its newest saved state (saved at each validation and "
                        "every save_steps updates): the same config, and as many ranks")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(run=_pretrain)

    _add_convert(sub)

    e = sub.add_parser("env", help="versions, device, and which backend each op uses and why")
    e.set_defaults(run=_env)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
