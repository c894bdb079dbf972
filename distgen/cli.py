"""Command line: turns arguments into a typed config and hands it on. Nothing else.

    distgen train CONFIG [key=value ...] [--dry-run]
    distgen data shard SOURCE OUT_DIR [--split train|test] [--samples-per-shard N]
    distgen data bench SHARDS... [--workers N[,M]] [--batch-size B] [--seconds S]
    distgen demo
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from distgen.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distgen", description="Distributed training of image generative models.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", help="experiment YAML (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=64")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    d = sub.add_parser("data", help="shard data sets and benchmark the loader")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("shard", help="write webdataset tar shards and a manifest")
    s.add_argument("source", help="fashion-mnist[:DIR] | cifar10:PATH | folder:DIR | npz:FILE")
    s.add_argument("out_dir")
    s.add_argument("--split", default="train", choices=["train", "test"])
    s.add_argument("--samples-per-shard", type=int, default=10000)
    b = dsub.add_parser("bench", help="loader images/s against a raw single-process baseline")
    b.add_argument("shards", nargs="+", help="manifest, brace pattern or tar files")
    b.add_argument("--workers", default="1,2", help="DataLoader workers, or a comma list to compare (default 1,2)")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--seconds", type=float, default=5.0, help="length of each timed run")
    b.add_argument("--repeats", type=int, default=3, help="runs of each; the best is reported")

    sub.add_parser("demo", help="the bundled demo: shard Fashion-MNIST and report the loader")
    return p


def cmd_train(args) -> int:
    from distgen.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from distgen.train import train

    return train(cfg)


def cmd_shard(args) -> int:
    from distgen.data import write_shards

    m = write_shards(args.source, args.out_dir, args.split, args.samples_per_shard, log=print)
    size = "x".join(map(str, m["image_size"])) if m["image_size"] else "mixed"
    print(f"{m['total']} samples in {len(m['shards'])} shard(s), {size}x{m['channels']}, "
          f"{m['num_classes']} classes -> {Path(args.out_dir) / (args.split + '.manifest.json')}")
    return 0


def cmd_bench(args) -> int:
    from distgen.data.bench import run_bench

    try:
        workers = [int(w) for w in str(args.workers).split(",")]
    except ValueError:
        raise ConfigError(f"--workers: expected N or a comma list of N, got {args.workers!r}") from None
    run_bench(args.shards, workers, args.batch_size, args.seconds, args.repeats)
    return 0


def cmd_demo(args) -> int:
    from distgen.demo import demo

    return demo()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    from distgen.data import DataError

    try:
        if args.cmd == "train":
            return cmd_train(args)
        if args.cmd == "data":
            return cmd_shard(args) if args.data_cmd == "shard" else cmd_bench(args)
        if args.cmd == "demo":
            return cmd_demo(args)
    except (ConfigError, DataError) as e:
        print(f"distgen: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
