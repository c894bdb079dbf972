"""Command line: turns arguments into a typed config and hands it on. Nothing else.

    distgen train CONFIG [key=value ...] [--dry-run]
    distgen sample RUN_DIR|EXPORT_DIR --num N [--steps S] [--sampler ddpm|ddim|dpmsolver] [--seed K] --out OUT
    distgen export RUN_DIR OUT_DIR
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

    sm = sub.add_parser("sample", help="sample from a run's EMA weights or an export")
    sm.add_argument("path", metavar="RUN_DIR|EXPORT_DIR")
    sm.add_argument("--num", type=int, required=True, help="number of images")
    sm.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model config's)")
    sm.add_argument("--sampler", choices=["ddpm", "ddim", "dpmsolver"], default=None)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    sm.add_argument("--out", required=True, help="FILE.png (a grid), FILE.npz, or a folder of PNGs")

    ex = sub.add_parser("export", help="write a run's EMA weights in standard formats")
    ex.add_argument("run_dir")
    ex.add_argument("out_dir")

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
    b.add_argument("--seconds", type=float, default=3.0, help="length of each timed run")
    b.add_argument("--repeats", type=int, default=5, help="interleaved runs of each; the best is reported")

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


def cmd_sample(args) -> int:
    from distgen.sample import sample_command

    if args.num < 1:
        raise ConfigError(f"--num: must be >= 1, got {args.num}")
    return sample_command(args.path, args.num, args.out, steps=args.steps, sampler=args.sampler, seed=args.seed,
                          guidance=args.guidance)


def cmd_export(args) -> int:
    from distgen.sample import export

    out = export(args.run_dir, args.out_dir)
    print(f"distgen: exported the EMA weights of {args.run_dir} -> {out}")
    return 0


def cmd_demo(args) -> int:
    from distgen.demo import demo

    return demo()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    from distgen.data import DataError
    from distgen.sample import SampleError
    from distgen.train import TrainingError

    try:
        if args.cmd == "train":
            return cmd_train(args)
        if args.cmd == "sample":
            return cmd_sample(args)
        if args.cmd == "export":
            return cmd_export(args)
        if args.cmd == "data":
            return cmd_shard(args) if args.data_cmd == "shard" else cmd_bench(args)
        if args.cmd == "demo":
            return cmd_demo(args)
    except (ConfigError, DataError, SampleError, TrainingError) as e:
        print(f"distgen: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
