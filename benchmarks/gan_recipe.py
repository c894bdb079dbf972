"""Quality of a GAN recipe after a fixed budget: train it, then the domain-feature FD / KID / PR.

    python benchmarks/gan_recipe.py CONFIG [--procs P] [--num-samples N] [--features PATH] [key=value ...]

Trains CONFIG (e.g. configs/fashion_mnist_dcgan.yaml) with P processes
(``accelerate launch``; on a GPU machine use 1 per GPU), timing it, then
evaluates N samples of the EMA generator against the Fashion-MNIST test
split in the feature space of the small domain classifier
(`distgen eval fit-features`, fitted first if PATH is missing). Inception
weights cannot be downloaded here, so domain FD stands in for FID. Prints
one summary line; the README's GAN figures come from it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distgen.demo import FEATURES, ensure_shards  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--num-samples", type=int, default=10000)
    ap.add_argument("--features", default=str(FEATURES), help="the demo's domain extractor, fitted if missing")
    ap.add_argument("--runs", default="runs/recipes")
    a = ap.parse_args()
    paths = ensure_shards()
    exe = [sys.executable, "-m", "distgen"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
              "--num_processes", str(a.procs), "-m", "distgen"]
    if a.procs == 1:
        launch = exe
    features = Path(a.features)
    if not features.is_file():
        subprocess.run(exe + ["eval", "fit-features", str(paths["train"]), str(features), "--kimg", "30"], check=True)
    run_dir = Path(a.runs) / Path(a.config).stem
    t0 = time.time()
    subprocess.run(launch + ["train", a.config, f"run.dir={run_dir}", *a.overrides], check=True)
    train_s = time.time() - t0
    out = run_dir / "domain-eval.json"
    subprocess.run(launch + ["eval", str(run_dir), "--metrics", "fid,kid,prc", "--num-samples", str(a.num_samples),
                             "--ref", str(paths["test"]), "--feature-extractor", str(features), "--out", str(out)],
                   check=True)
    r = json.loads(out.read_text())
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    print(f"recipe {a.config} {' '.join(a.overrides)}: {last['kimg']:.1f} kimg in {train_s / 60:.1f} min "
          f"({a.procs} process(es)); {a.num_samples} samples vs the test split: domain FD {r['fid']:.2f}, "
          f"KID {r['kid_mean']:.4f}, precision {r['precision']:.3f}, recall {r['recall']:.3f}, "
          f"class entropy {r['class_entropy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
