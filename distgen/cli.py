"""Command line: turns arguments into a typed config and hands it on. Nothing else.

    distgen train CONFIG [key=value ...] [--dry-run] [--allow-config-change]
    distgen sample RUN_DIR|EXPORT_DIR --num N [--seed K] [--steps S] [--sampler NAME]
                   [--guidance G] [--truncation PSI] [--temperature T] [--interpolate A.png B.png] --out OUT [--force]
    distgen sample RUN_DIR|EXPORT_DIR --input IMAGE|FOLDER|SHARDS [--direction AtoB|BtoA] [--num N] --out OUT
    distgen export RUN_DIR OUT_DIR [--force] [--format native|onnx]
    distgen ema RUN_DIR (--sigma-rel 0.05,0.08 | --sweep 0.02:0.20:10 --metric fid [eval flags]) --out OUT_DIR
    distgen eval RUN_DIR|EXPORT_DIR --metrics fid,kid,isc,prc,bpd,recon,paired,target_class --num-samples N
                 [--ref SHARDS|STATS] [--test SHARDS] [--direction AtoB|BtoA] [...]
    distgen eval fit-features SHARDS OUT [--test SHARDS] [--kimg K]
    distgen data shard SOURCE OUT_DIR [--split train|val|test] [--samples-per-shard N] [--domain A|B]
    distgen data encode AE_DIR SHARDS OUT_DIR [--split NAME] [--batch-size B]
    distgen data verify MANIFEST [--decode]
    distgen data bench SHARDS... [--workers N[,M]] [--batch-size B] [--seconds S]
    distgen status RUN_DIR|FOLDER_OF_RUNS
    (sample, export, eval and ema of a run folder take --checkpoint step-N|latest|best)
    distgen families [--json]
    distgen demo
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from distgen.errors import ERRORS, ConfigError


# Every family's samplers: each family checks that it takes the one given (diffusion's by its formulation, a score
# model's three)
SAMPLERS = ["ddpm", "ddim", "dpmsolver", "euler", "heun", "dpmpp_2m", "langevin", "pc", "ode"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distgen", description="Distributed training of image generative models.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", help="experiment YAML (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=64")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume a checkpoint although its model config differs from this one (refused otherwise)")

    sm = sub.add_parser("sample", help="sample from a run's EMA weights or an export")
    sm.add_argument("path", metavar="RUN_DIR|EXPORT_DIR")
    sm.add_argument("--num", type=int, default=None, help="number of images (with --input: at most this many)")
    sm.add_argument("--input", default=None, metavar="IMAGE|FOLDER|SHARDS",
                    help="translators (pix2pix, CycleGAN): the images to translate: a file, a folder of images, or "
                         "shards (manifest, brace pattern, tar)")
    sm.add_argument("--direction", choices=["AtoB", "BtoA"], default=None,
                    help="translators: AtoB (default) or, for CycleGAN, BtoA")
    sm.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model config's)")
    sm.add_argument("--sampler", choices=SAMPLERS, default=None,
                    help="diffusion: ddpm|ddim|dpmsolver (formulation ddpm), euler|heun|dpmpp_2m (edm), "
                         "euler|heun (flow); score models: langevin|pc|ode")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (diffusion)")
    sm.add_argument("--truncation", type=float, default=None, help="truncation psi / threshold (GANs)")
    sm.add_argument("--temperature", type=float, default=None, help="latent temperature (Glow, VAEs); PixelRNN: each pixel's mixture")
    _mcmc_flags(sm)
    sm.add_argument("--interpolate", nargs=2, default=None, metavar=("IMAGE_A", "IMAGE_B"),
                    help="instead of sampling, --num images on the latent path from one image file to the other "
                         "(VAEs)")
    sm.add_argument("--out", required=True, help="FILE.png (a grid), FILE.npz, or a folder of PNGs (new or empty, "
                                                 "unless --force)")
    sm.add_argument("--force", action="store_true",
                    help="write the PNGs into a folder that holds files, replacing those of the same names "
                         "(000000.png, ...; others stay)")
    _checkpoint_flag(sm)

    ex = sub.add_parser("export", help="write a run's EMA weights in standard formats")
    ex.add_argument("run_dir")
    ex.add_argument("out_dir", help="a new or empty folder, or (with --force) an earlier export to replace")
    ex.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds an earlier distgen export")
    ex.add_argument("--format", choices=("native", "onnx"), default="native",
                    help="native: the family's standard files (default); onnx: those plus ONNX graphs, onnx.json "
                         "and sample_onnx.py, a sampler needing only numpy and onnxruntime")
    _checkpoint_flag(ex)

    ev = sub.add_parser("eval", help="FID / KID / IS / precision-recall / bits-per-dim of a run or export "
                                     "(or: eval fit-features SHARDS OUT)")
    ev.add_argument("path", metavar="RUN_DIR|EXPORT_DIR")
    ev.add_argument("--metrics", default="fid",
                    help="comma list of fid, kid, isc, prc, bpd, recon, paired, target_class (default fid)")
    ev.add_argument("--num-samples", type=int, default=10000, help="generated images (default 10000)")
    ev.add_argument("--ref", nargs="+", default=None,
                    help="reference shards, manifest or .npz statistics (default: eval.ref, else data.train)")
    ev.add_argument("--test", nargs="+", default=None,
                    help="test shards for bpd and recon, and a translator's inputs (default data.eval)")
    ev.add_argument("--direction", choices=["AtoB", "BtoA"], default=None,
                    help="translators: score AtoB (default) or, for CycleGAN, BtoA translations")
    ev.add_argument("--batch-size", type=int, default=None, help="images per extractor pass per process")
    ev.add_argument("--seed", type=int, default=None, help="image i is drawn with the seed (seed, i)")
    ev.add_argument("--feature-extractor", default=None, metavar="NAME|PATH",
                    help="inception (default), dinov2-vit-s-14 ... dinov2-vit-g-14, clip-vit-b-32, clip-vit-l-14, "
                         "... (FD/KID/PR reported as fd_dinov2, kid_clip_mean, ...), or a file from "
                         "`distgen eval fit-features` or fashion-mnist (fd_domain, kid_domain_mean, ...)")
    ev.add_argument("--inception-weights", default=None, metavar="PATH",
                    help="local InceptionV3 weights (also $DISTGEN_INCEPTION_WEIGHTS)")
    ev.add_argument("--extractor-weights", default=None, metavar="PATH",
                    help="local DINOv2 / CLIP weights (default: the official file in $TORCH_HOME/hub/checkpoints; "
                         "never downloaded)")
    ev.add_argument("--cache-dir", default=None, help="reference statistics cache (default ~/.cache/distgen)")
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--sampler", choices=SAMPLERS, default=None)
    ev.add_argument("--guidance", type=float, default=None)
    ev.add_argument("--truncation", type=float, default=None)
    ev.add_argument("--temperature", type=float, default=None)
    _mcmc_flags(ev)
    ev.add_argument("--probes", type=int, default=None,
                    help="bits/dim of a score SDE or FFJORD: Hutchinson trace probes per image (default: the model "
                         "config's)")
    ev.add_argument("--trace", choices=("hutchinson", "exact"), default=None,
                    help="bits/dim of FFJORD: Hutchinson's estimate or the exact trace (one backward pass per "
                         "dimension, for small images)")
    ev.add_argument("--iw-samples", type=int, default=None,
                    help="bpd of a VAE: 1 gives the ELBO, K > 1 the importance-weighted bound")
    ev.add_argument("--out", default=None, help="also write the results to this JSON file")
    _checkpoint_flag(ev)

    em = sub.add_parser("ema", help="post-hoc EMA: reconstruct EMAs of chosen widths from a run's snapshots "
                                    "(ema.kind=power, ema.snapshot_kimg), or sweep widths and keep the best")
    em.add_argument("run_dir", metavar="RUN_DIR")
    what = em.add_mutually_exclusive_group(required=True)
    what.add_argument("--sigma-rel", help="comma list of relative widths, e.g. 0.05,0.08,0.12: one export each")
    what.add_argument("--sweep", metavar="LO:HI:N", help="evaluate N widths from LO to HI; keep the best as an export")
    em.add_argument("--out", required=True, metavar="OUT_DIR")
    em.add_argument("--force", action="store_true", help="replace an earlier distgen ema output in OUT_DIR")
    em.add_argument("--checkpoint", default=None, metavar="step-N|latest|best",
                    help="the run's config and networks from this checkpoint, reconstructed as of its step (the "
                         "snapshots up to it; default: latest, as of the last snapshot)")
    em.add_argument("--max-residual", type=float, default=0.05,
                    help="refuse widths the snapshots fit worse than this relative L2 residual (default 0.05)")
    em.add_argument("--metric", default="fid", help="the sweep's metric: fid, kid, isc, prc, bpd or recon")
    em.add_argument("--baseline", metavar="RUN_DIR|EXPORT_DIR", help="also evaluate this (e.g. a fixed-EMA run)")
    em.add_argument("--num-samples", type=int, default=10000)
    for flag in ("--ref", "--test"):
        em.add_argument(flag, nargs="+", default=None)
    em.add_argument("--batch-size", type=int, default=None)
    em.add_argument("--seed", type=int, default=None)
    for flag in ("--feature-extractor", "--inception-weights", "--extractor-weights", "--cache-dir"):
        em.add_argument(flag, default=None)
    em.add_argument("--steps", type=int, default=None, help="the sweep's sampling steps (default: the config's)")
    em.add_argument("--sampler", choices=SAMPLERS, default=None)
    em.add_argument("--guidance", type=float, default=None, help="the sweep's guidance scale (EDM2: it moves the best width)")
    em.add_argument("--truncation", type=float, default=None)
    em.add_argument("--temperature", type=float, default=None)
    _mcmc_flags(em)

    d = sub.add_parser("data", help="shard data sets and benchmark the loader")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("shard", help="write webdataset tar shards and a manifest")
    s.add_argument("source", help="fashion-mnist[:DIR] | cifar10:PATH | folder:DIR | npz:FILE; image-to-image "
                                  "translation: pix2pix:DIR (paired A|B images) | fashion-mnist[:DIR]:edges (paired) "
                                  "| cyclegan:DIR (writes <split>A and <split>B) | "
                                  "fashion-mnist[:DIR]:classes=NAME_A/NAME_B (likewise)")
    s.add_argument("out_dir")
    s.add_argument("--split", default="train", choices=["train", "val", "test"])
    s.add_argument("--samples-per-shard", type=int, default=10000)
    s.add_argument("--domain", choices=["A", "B"], default=None,
                   help="shard the source as one domain of an unpaired task: split <split>A or <split>B")
    en = dsub.add_parser("encode", help="latent shards of image shards under an autoencoder (latent diffusion)")
    en.add_argument("ae_dir", metavar="AE_DIR", help="an AutoencoderKL folder (distgen export of an autoencoder run)")
    en.add_argument("shards", metavar="SHARDS", help="image shards: a manifest or a brace pattern")
    en.add_argument("out_dir", metavar="OUT_DIR")
    en.add_argument("--split", default=None, help="output split name (default: the input manifest's)")
    en.add_argument("--batch-size", type=int, default=64)
    en.add_argument("--samples-per-shard", type=int, default=10000)
    v = dsub.add_parser("verify", help="check every shard of a manifest: size, sha256 and sample count as "
                                       "recorded (--decode: every sample decodes)")
    v.add_argument("manifest", metavar="MANIFEST")
    v.add_argument("--decode", action="store_true",
                   help="also decode every sample as training does (images, labels, latents) and name the first "
                        "bad one of each shard")
    b = dsub.add_parser("bench", help="loader images/s against a raw single-process baseline")
    b.add_argument("shards", nargs="+", help="manifest, brace pattern or tar files")
    b.add_argument("--workers", default="1,2", help="DataLoader workers, or a comma list to compare (default 1,2)")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--seconds", type=float, default=3.0, help="length of each timed run")
    b.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians are reported")

    fa = sub.add_parser("families", help="the table of model families x capabilities (bits/dim, recon, ONNX, ZeRO "
                                         "stages, ...), from the code")
    fa.add_argument("--json", action="store_true", help="the table as JSON, for tools")

    demo_help = ("the bundled demo, end to end on CPU: shard Fashion-MNIST, train the small pixel-diffusion model "
                 "with 2 processes, export it, sample a grid of 64 and score 1000 samples (domain FD / KID / "
                 "precision-recall); writes data/ and runs/ in the current folder")
    sub.add_parser("demo", help=demo_help, description=demo_help[0].upper() + demo_help[1:] + ".")

    st = sub.add_parser("status", help="where a run stands (step, ETA, losses, evaluations, checkpoints, EMA "
                                       "snapshots, whether it trains now, its last error), without importing torch",
                        description="One screen per run: RUN_DIR, or every run folder directly inside FOLDER. "
                                    "'training now' means a process holds the run folder's lock (distgen.lock), "
                                    "as distgen train does for as long as it runs.")
    st.add_argument("path", metavar="RUN_DIR|FOLDER_OF_RUNS")
    return p


def _checkpoint_flag(p: argparse.ArgumentParser) -> None:
    from distgen.checkpoint_choice import HELP

    p.add_argument("--checkpoint", default=None, metavar="step-N|latest|best", help=f"RUN_DIR only: {HELP}")


def _mcmc_flags(p: argparse.ArgumentParser) -> None:
    """Sampling flags of the MCMC families (score models' Langevin steps, EBMs' SGLD)."""
    p.add_argument("--step-size", type=float, default=None,
                   help="Langevin / SGLD step size (score models, EBMs; default: the model config's)")
    p.add_argument("--from-buffer", action="store_true", default=None,
                   help="EBMs: start the SGLD chains from the export's saved replay buffer instead of noise")


def cmd_train(args) -> int:
    from distgen.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from distgen.train import train

    return train(cfg, allow_config_change=args.allow_config_change)


def cmd_shard(args) -> int:
    from distgen.data import shard_source

    for m in shard_source(args.source, args.out_dir, args.split, args.samples_per_shard, args.domain, log=print):
        size = "x".join(map(str, m["image_size"])) if m["image_size"] else "mixed"
        layout = m.get("layout", "images")
        if layout == "domain":
            cls = m.get("source_class")
            layout = f"domain {m['domain']}" + (f" ({cls['name']})" if cls else "")
        print(f"{m['total']} samples in {len(m['shards'])} shard(s), {size}x{m['channels']}, "
              f"{m['num_classes']} classes, {layout} -> {Path(args.out_dir) / (m['split'] + '.manifest.json')}")
    return 0


def cmd_encode(args) -> int:
    from distgen.data.encode import encode_shards

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    m = encode_shards(args.ae_dir, [args.shards], args.out_dir, split=args.split, batch_size=args.batch_size,
                      samples_per_shard=args.samples_per_shard)
    print(f"{m['total']} latents {'x'.join(map(str, m['latent_shape']))} (scaling factor "
          f"{m['autoencoder']['scaling_factor']:.5g}) in {len(m['shards'])} shard(s) -> "
          f"{Path(args.out_dir) / (m['split'] + '.manifest.json')}")
    return 0


def cmd_verify(args) -> int:
    from distgen.data.verify import verify_manifest

    v = verify_manifest(args.manifest, decode=args.decode)
    print(f"{args.manifest}: {v.shards} shard(s), {v.samples} samples, {v.bytes / 2**20:.1f} MiB: sizes, sha256 "
          f"and sample counts as recorded (total = the sum of the counts); "
          + (f"every sample decoded ({v.decoded})" if v.decoded else "samples not decoded (--decode decodes them)"))
    return 0


def cmd_bench(args) -> int:
    from distgen.data.bench import run_bench

    try:
        workers = [int(w) for w in str(args.workers).split(",")]
    except ValueError:
        raise ConfigError(f"--workers: expected N or a comma list of N, got {args.workers!r}") from None
    for flag, value, ok, want in (("--workers", args.workers, min(workers) >= 0, ">= 0"),
                                  ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
                                  ("--seconds", args.seconds, args.seconds > 0, "> 0"),
                                  ("--repeats", args.repeats, args.repeats >= 1, ">= 1")):
        if not ok:
            raise ConfigError(f"{flag}: must be {want}, got {value}")
    run_bench(args.shards, workers, args.batch_size, args.seconds, args.repeats)
    return 0


def cmd_sample(args) -> int:
    from distgen.sample import sample_command

    if args.num is not None and args.num < 1:
        raise ConfigError(f"--num: must be >= 1, got {args.num}")
    if args.input is not None:
        from distgen.translate import translate_command

        if args.interpolate:
            raise ConfigError("--interpolate: not with --input (a translator maps the input images)")
        return translate_command(args.path, args.input, args.out, direction=args.direction, num=args.num,
                                 checkpoint=args.checkpoint, force=args.force)
    if args.num is None:
        raise ConfigError("--num: required (the number of images to sample), unless --input names images to "
                          "translate")
    if args.direction is not None:
        raise ConfigError("--direction: only with --input (translators)")
    return sample_command(args.path, args.num, args.out, seed=args.seed, options=_sampling(args),
                          interpolate=args.interpolate, checkpoint=args.checkpoint, force=args.force)


def _sampling(args) -> dict:
    """Sampling options as given on the command line (the family checks which it takes, and their values
    against the model: --steps within its schedule, --guidance only if it is class-conditional)."""
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {args.steps}")
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed: must be >= 0, got {args.seed}")
    if args.step_size is not None and not args.step_size > 0:
        raise ConfigError(f"--step-size: must be > 0, got {args.step_size}")
    return dict(steps=args.steps, sampler=args.sampler, guidance=args.guidance, truncation=args.truncation,
                temperature=args.temperature, step_size=args.step_size, from_buffer=args.from_buffer)


def _fit_parser() -> argparse.ArgumentParser:
    f = argparse.ArgumentParser(prog="distgen eval fit-features",
                                description="train a domain classifier whose features give FD / KID / PR")
    f.add_argument("shards", nargs="+", help="labelled training shards or manifest")
    f.add_argument("out", help="output .safetensors file, for --feature-extractor")
    f.add_argument("--test", nargs="+", default=None, help="test shards (default: test.manifest.json beside SHARDS)")
    f.add_argument("--kimg", type=float, default=480.0,
                   help="training length in thousands of images (480: the bundled extractor, 92.4%% on the test split)")
    f.add_argument("--batch-size", type=int, default=128)
    f.add_argument("--lr", type=float, default=2e-3, help="AdamW's peak learning rate (warm-up, then cosine)")
    f.add_argument("--arch", choices=("resnet", "cnn"), default="resnet",
                   help="resnet (default), or the first, weaker cnn")
    f.add_argument("--width", type=int, default=32, help="channels of the first stage (then 2x and 4x)")
    f.add_argument("--calibration-images", type=int, default=10000,
                   help="images per set of the calibration table (default 10000)")
    f.add_argument("--seed", type=int, default=0)
    return f


def cmd_fit(argv: list[str]) -> int:
    from distgen.evaluate.fit import fit_features

    a = _fit_parser().parse_args(argv)
    fit_features(a.shards, a.out, test=a.test, kimg=a.kimg, batch_size=a.batch_size, lr=a.lr, arch=a.arch,
                 width=a.width, calibration_images=a.calibration_images, seed=a.seed)
    return 0


def cmd_eval(args) -> int:
    from distgen.evaluate.command import eval_command

    from distgen.config.schema import sample_count_problem

    if args.num_samples < 2:
        raise ConfigError(f"--num-samples: must be >= 2, got {args.num_samples}")
    few = sample_count_problem([m.strip() for m in args.metrics.split(",")], args.num_samples)
    if few:
        raise ConfigError(f"--num-samples: {few}")
    return eval_command(args.path, args.metrics, args.num_samples, ref=args.ref, test=args.test,
                        batch_size=args.batch_size, seed=args.seed, feature_extractor=args.feature_extractor,
                        inception_weights=args.inception_weights, extractor_weights=args.extractor_weights,
                        cache_dir=args.cache_dir,
                        options=_sampling(args),
                        likelihood={"iw_samples": args.iw_samples, "probes": args.probes, "trace": args.trace},
                        out=args.out,
                        direction=args.direction, checkpoint=args.checkpoint)


def cmd_export(args) -> int:
    from distgen.export.native import export

    out = export(args.run_dir, args.out_dir, force=args.force, fmt=args.format, checkpoint=args.checkpoint)
    which = f" ({args.checkpoint})" if args.checkpoint else ""
    print(f"distgen: exported the EMA weights of {args.run_dir}{which} -> {out}")
    return 0


def cmd_ema(args) -> int:
    from distgen.config.schema import sample_count_problem
    from distgen.evaluate.posthoc import ema_command
    from distgen.phema import parse_sigmas, parse_sweep

    if args.max_residual <= 0:
        raise ConfigError(f"--max-residual: must be > 0, got {args.max_residual}")
    if args.sweep:
        few = sample_count_problem([args.metric], args.num_samples)
        if few:
            raise ConfigError(f"--num-samples: {few}")
    kw = {k: getattr(args, k) for k in ("ref", "test", "batch_size", "seed", "feature_extractor", "inception_weights",
                                        "extractor_weights", "cache_dir")}
    return ema_command(args.run_dir, args.out, sigmas=parse_sigmas(args.sigma_rel) if args.sigma_rel else None,
                       sweep=parse_sweep(args.sweep) if args.sweep else None, metric=args.metric,
                       max_residual=args.max_residual, force=args.force, num_samples=args.num_samples,
                       baseline=args.baseline, eval_kw=kw, options=_sampling(args), checkpoint=args.checkpoint)


def cmd_families(args) -> int:
    from distgen.families.table import json_table, text_table

    print(json_table() if args.json else text_table(), end="")
    return 0


def cmd_status(args) -> int:
    from distgen.status import status_command  # imports neither torch nor a family

    return status_command(args.path)


def cmd_demo(args) -> int:
    from distgen.demo import demo

    return demo()


# The commands that run torch's kernels in this process (demo launches others; data shard/verify/bench read files)
TORCH_COMMANDS = ("train", "sample", "eval", "export", "ema")


def _threads() -> None:
    """Threads per process from the cores and the local processes (distgen.threads), before any torch op: torch's
    default, every core in every process, oversubscribes a CPU shared by several processes."""
    from distgen import threads
    threads.configure()


def _logging() -> None:
    """distgen's records at INFO, others' from WARNING (torch's exit hook logs INFO after a Ctrl-C mid-import)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distgen").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # First, before torch is imported: a scheduler's signal during start-up becomes a requeue (exit 75),
        # not Python's default death (exit 143).
        from distgen import preemption

        preemption.install()
    try:
        if argv[:2] == ["eval", "fit-features"]:
            _threads()
            return cmd_fit(argv[2:])
        args = _parser().parse_args(argv)
        if args.cmd in TORCH_COMMANDS or (args.cmd == "data" and args.data_cmd == "encode"):
            _threads()
        if args.cmd == "eval":
            return cmd_eval(args)
        if args.cmd == "train":
            return cmd_train(args)
        if args.cmd == "sample":
            return cmd_sample(args)
        if args.cmd == "export":
            return cmd_export(args)
        if args.cmd == "ema":
            return cmd_ema(args)
        if args.cmd == "data":
            return {"shard": cmd_shard, "encode": cmd_encode, "verify": cmd_verify, "bench": cmd_bench}[args.data_cmd](args)
        if args.cmd == "families":
            return cmd_families(args)
        if args.cmd == "demo":
            return cmd_demo(args)
        if args.cmd == "status":
            return cmd_status(args)
    except ERRORS as e:
        print(f"distgen: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk, a name too long: the path and what to do
        from distgen.ownership import os_problem

        print(f"distgen: error: {os_problem(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # torch.save by a path (DeepSpeed's own checkpoint files) reports a failed write only in words
        if "PytorchStreamWriter failed writing" not in str(e):
            raise
        print(f"distgen: error: a checkpoint file could not be written ({str(e).strip().splitlines()[-1][:200]}): "
              f"check the run folder's free space and permissions; the last complete checkpoint is untouched",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every temporary file and folder was removed on the way out (atomic writes clean up after themselves);
        # finished outputs and checkpoints stay.
        print(f"\ndistgen: interrupted (SIGINT): {' '.join(argv[:2]) or 'distgen'} stopped; unfinished files "
              f"removed, finished ones kept", file=sys.stderr)
        # CPython records a KeyboardInterrupt that leaves code run by exec() of a string (dataclasses build their
        # methods so while modules import) as unhandled even once it is caught here, and then ends `python -m`
        # by SIGINT instead of with 130 (1 Ctrl-C in ~9 at start-up). Each such exec() clears the record as it
        # starts, so one that completes leaves it cleared.
        exec("None")
        return 130
    finally:
        # Leave the process group, if the command joined one; a command that never imported distgen.dist
        # (checking a config) must not import torch here.
        if "distgen.dist" in sys.modules:
            sys.modules["distgen.dist"].shutdown()
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
