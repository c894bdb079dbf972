"""Quality of a recipe after a fixed budget: train it, then score it on Fashion-MNIST's test split.

    python benchmarks/recipe.py CONFIG [--procs P] [--num-samples N] [--features PATH] [key=value ...]
    python benchmarks/recipe.py configs/fashion_mnist_ldm.yaml --stage1 configs/fashion_mnist_autoencoder.yaml

Trains CONFIG (e.g. configs/fashion_mnist_dcgan.yaml) with P processes
(``accelerate launch``; on a GPU machine use 1 per GPU), timing it, then
scores the EMA weights against the test split:

- families with a likelihood (pixelcnn, pixelrnn, glow, ffjord): bits/dim of all 10,000
  test images (`distgen eval --metrics bpd`), or of the first N with
  ``--bpd-images N``;
- VAEs: the ELBO in bits/dim and reconstruction PSNR / SSIM of all 10,000
  test images, then the ELBO and the importance-weighted bound with K samples
  (`--iw-samples K`) on the first test shard (5,000 images; K samples cost
  K forward passes an image);
- latent diffusion with ``--stage1 AE_CONFIG``: the autoencoder is trained
  first (timed too), exported, scored by reconstruction PSNR / SSIM, and
  named as ``model.autoencoder``; then as below;
- the others: domain FD / KID / PR of N samples in the feature space of the
  bundled Fashion-MNIST classifier (``--features fashion-mnist``, the default;
  or a `distgen eval fit-features` file, fitted first if PATH is missing);
  Inception weights cannot be downloaded here, so domain FD stands in for FID.

Prints one summary line; the README's figures come from it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distgen.config.schema import result_key  # noqa: E402
from distgen.data.manifest import read_manifest  # noqa: E402
from distgen.demo import FEATURES, ensure_shards  # noqa: E402
from distgen.evaluate.extractors import BUNDLED  # noqa: E402

LIKELIHOOD_FAMILIES = ("pixelcnn", "pixelrnn", "glow", "vae", "ffjord")


def test_subset(manifest: str, n: int, out_dir: Path) -> str:
    """A manifest of the first ``n`` test images (in shard order), for likelihoods too slow for all 10,000
    (FFJORD solves an ODE per image and block)."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from distgen.data import write_shards

    xs, ys = [], []
    for shard in read_manifest(Path(manifest))["shards"]:
        with tarfile.open(Path(manifest).parent / shard["name"]) as tar:
            files = {m.name: m for m in tar.getmembers()}
            for name in sorted(k for k in files if k.endswith(".png")):
                if len(xs) == n:
                    break
                xs.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(files[name]).read()))))
                ys.append(int(tar.extractfile(files[name[:-4] + ".cls"]).read()))
        if len(xs) == n:
            break
    np.savez(out_dir / "test-subset.npz", x=np.stack(xs), y=np.array(ys, dtype=np.int64))
    write_shards(f"npz:{out_dir / 'test-subset.npz'}", out_dir / "test-subset", "test", samples_per_shard=n)
    return str(out_dir / "test-subset" / "test.manifest.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--num-samples", type=int, default=10000)
    ap.add_argument("--features", default=FEATURES,
                    help="domain extractor: the bundled fashion-mnist one (default) or a fit-features file, fitted "
                         "if missing")
    ap.add_argument("--runs", default="runs/recipes")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps of the evaluation (default: the config's)")
    ap.add_argument("--sampler", default=None, help="sampler of the evaluation (default: the config's)")
    ap.add_argument("--json", default=None, metavar="FILE", help="append the figures to FILE as one JSON line")
    ap.add_argument("--stage1", default=None, metavar="AE_CONFIG",
                    help="latent diffusion: train and export this autoencoder config first")
    ap.add_argument("--iw-samples", type=int, default=16, help="VAEs: samples of the importance-weighted bound")
    ap.add_argument("--bpd-images", type=int, default=None,
                    help="bits/dim of the first N test images only (FFJORD: an ODE solve per image is slow on CPU)")
    a = ap.parse_args()
    paths = ensure_shards()
    exe = [sys.executable, "-m", "distgen"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
              "--num_processes", str(a.procs), "-m", "distgen"]
    if a.procs == 1:
        launch = exe
    family = yaml.safe_load(Path(a.config).read_text())["model"]["family"]
    run_dir = Path(a.runs) / Path(a.config).stem
    out = run_dir / "recipe-eval.json"
    if family in LIKELIHOOD_FAMILIES:
        test = str(paths["test"])
        if a.bpd_images:
            subset = run_dir.with_name(run_dir.name + "-bpd-test")
            subset.mkdir(parents=True, exist_ok=True)
            test = test_subset(test, a.bpd_images, subset)
        metrics = ["--metrics", "bpd,recon" if family == "vae" else "bpd", "--test", test]
    else:
        features = a.features
        if features not in BUNDLED and not Path(features).is_file():
            subprocess.run(exe + ["eval", "fit-features", str(paths["train"]), features], check=True)
        metrics = ["--metrics", "fid,kid,prc", "--num-samples", str(a.num_samples), "--ref", str(paths["test"]),
                   "--feature-extractor", str(features)]
        metrics += ["--steps", str(a.steps)] if a.steps else []
        metrics += ["--sampler", a.sampler] if a.sampler else []
    overrides, stage1 = list(a.overrides), ""
    if a.stage1:
        ae_run = Path(a.runs) / Path(a.stage1).stem
        t0 = time.time()
        subprocess.run(launch + ["train", a.stage1, f"run.dir={ae_run}"], check=True)
        ae_s = time.time() - t0
        ae_out = ae_run.with_name(ae_run.name + "-export")
        subprocess.run(exe + ["export", str(ae_run), str(ae_out), "--force"], check=True)
        rec_out = ae_run / "recipe-eval.json"
        subprocess.run(launch + ["eval", str(ae_run), "--metrics", "recon", "--test", str(paths["test"]),
                                 "--out", str(rec_out)], check=True)
        rec = json.loads(rec_out.read_text())
        ae_last = json.loads((ae_run / "metrics.jsonl").read_text().splitlines()[-1])
        sf = json.loads((ae_out / "config.json").read_text())["scaling_factor"]
        stage1 = (f"stage 1 {a.stage1}: {ae_last['kimg']:.1f} kimg in {ae_s / 60:.1f} min, test reconstructions "
                  f"PSNR {rec['psnr']:.2f} dB, SSIM {rec['ssim']:.4f}, scaling factor {sf:.4f}; ")
        overrides.append(f"model.autoencoder={ae_out}")
    t0 = time.time()
    subprocess.run(launch + ["train", a.config, f"run.dir={run_dir}", *overrides], check=True)
    train_s = time.time() - t0
    t0 = time.time()
    subprocess.run(launch + ["eval", str(run_dir), *metrics, "--out", str(out)], check=True)
    eval_s = time.time() - t0
    r = json.loads(out.read_text())
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    head = (f"recipe {a.config} {' '.join(a.overrides)}: {stage1}{last['kimg']:.1f} kimg in {train_s / 60:.1f} min "
            f"({a.procs} process(es))")
    if family == "vae":
        shard = str(Path(paths["test"]).parent / read_manifest(Path(paths["test"]))["shards"][0]["name"])
        iw = {}
        for k in (1, a.iw_samples):
            o = run_dir / f"recipe-eval-k{k}.json"
            subprocess.run(launch + ["eval", str(run_dir), "--metrics", "bpd", "--test", shard,
                                     "--iw-samples", str(k), "--out", str(o)], check=True)
            iw[k] = json.loads(o.read_text())
        print(f"{head}; the {r['bpd_images']} test images: ELBO {r['bpd']:.4f} bits/dim, reconstructions "
              f"PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}; the {iw[1]['bpd_images']} images of {shard}: "
              f"ELBO {iw[1]['bpd']:.4f}, IW bound (k={a.iw_samples}) {iw[a.iw_samples]['bpd']:.4f} bits/dim")
    elif family in LIKELIHOOD_FAMILIES:
        print(f"{head}; the {r['bpd_images']} test images: {r['bpd']:.4f} bits/dim ({r['bpd_kind']})")
    else:
        nfe = f", NFE {r['nfe']}" if "nfe" in r else ""
        # named by the extractor's feature space: fd_domain, kid_domain_mean, ... for a domain classifier
        fd, kid, pr, rc = (r[result_key(k, a.features)] for k in ("fid", "kid_mean", "precision", "recall"))
        print(f"{head}; {a.num_samples} samples vs the test split{nfe} ({eval_s / 60:.1f} min): domain FD "
              f"{fd:.2f}, KID {kid:.4f}, precision {pr:.3f}, recall {rc:.3f}, "
              f"class entropy {r['class_entropy']:.3f}, top class share {r['class_max_share']:.3f}")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"config": a.config, "overrides": a.overrides, "procs": a.procs, "kimg": last["kimg"],
                                "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), **r}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
