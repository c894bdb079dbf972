"""pix2pix and CycleGAN as users run them: training with 1 and 2 processes on the two built-in Fashion-MNIST
tasks, exact resume (CycleGAN's image histories included), export -> translate round trips, evaluation,
the data each family refuses, and the learning-rate schedule of the papers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distgen.cli import main as cli_main
from distgen.config import load_config
from test_train import family_config, launch, run, weights

pytestmark = pytest.mark.e2e  # trains and launches translators (make test-fast leaves these out)


@pytest.fixture(scope="module")
def edges(tmp_path_factory) -> Path:
    """The paired edges -> clothing task on Fashion-MNIST's test split (10000 pairs)."""
    out = tmp_path_factory.mktemp("fm-edges")
    assert cli_main(["data", "shard", "fashion-mnist:edges", str(out), "--split", "test",
                     "--samples-per-shard", "4000"]) == 0
    return out / "test.manifest.json"


@pytest.fixture(scope="module")
def boots(tmp_path_factory) -> Path:
    """The unpaired sneaker <-> ankle boot task on the test split (1000 images per domain)."""
    out = tmp_path_factory.mktemp("fm-boots")
    assert cli_main(["data", "shard", "fashion-mnist:classes=Sneaker/Ankle boot", str(out), "--split", "test",
                     "--samples-per-shard", "400"]) == 0
    return out


PAIRS = 21  # test pairs pix2pix's evaluation scores: odd, so 2 ranks get 10 and 11


def config(tmp_path: Path, model: dict, data: dict, **over) -> Path:
    sections = {"model": model,
                "data": {"resolution": 32, "resize": "stretch", "flip": True, **data},
                "train": {"batch_size": 4, "total_kimg": 0.08, "lr": 2e-4, "betas": [0.5, 0.999], "grad_clip": 0,
                          "log_every": 5, "checkpoint_every": 10, "sample_every": 10, "sample_num": 6},
                "ema": {"halflife_kimg": [0.02], "rampup": None}}
    manifest = sections["data"].pop("train")
    return family_config(tmp_path, manifest, sections, over)


def pix2pix(tmp_path, edges, **over):
    return config(tmp_path, {"family": "pix2pix", "preset": "tiny"}, {"train": edges, "eval": [str(edges)]}, **over)


def cyclegan(tmp_path, boots, model=None, **over):
    data = {"train": boots / "testA.manifest.json", "train_b": [str(boots / "testB.manifest.json")],
            "eval": [str(boots / "testA.manifest.json")], "eval_b": [str(boots / "testB.manifest.json")]}
    return config(tmp_path, {"family": "cyclegan", "preset": "tiny", "blocks": 2, **(model or {})}, data, **over)


def records(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


# ---------------------------------------------------------------- pix2pix

def test_pix2pix_trains_exports_translates_and_is_scored(tmp_path, edges, env_with_repo, capsys):
    cfg = pix2pix(tmp_path, edges, train={"total_kimg": 0.16})
    r = run(launch(1) + ["train", str(cfg)], env_with_repo)
    assert "40 steps" in r.stdout
    recs = records(tmp_path / "run")
    assert all(np.isfinite(x["loss/D"]) and np.isfinite(x["loss/G"]) and 0 <= x["D/acc"] <= 1 for x in recs)
    # the L1 term pulls the output towards the target: lower at the end than at the start
    assert recs[-1]["G/l1"] < recs[0]["G/l1"], [x["G/l1"] for x in recs]
    # the grid: 3 rows (input edges, translation, target) of the first 6 test pairs, 32 px + 2 px borders
    grid = grey(tmp_path / "run" / "samples" / "step-00000040.png")
    assert grid.shape == (2 + 3 * 34, 2 + 6 * 34)

    out = tmp_path / "export"
    run(launch(1) + ["export", str(tmp_path / "run"), str(out)], env_with_repo)
    assert json.loads((out / "generator_config.json").read_text())["arch"] == "unet"
    # translate the test shards with 2 processes into a folder, then the same from the checkpoint's EMA in process
    run(launch(2) + ["sample", str(out), "--input", str(edges), "--num", "20", "--out", str(tmp_path / "t")],
        env_with_repo)
    files = sorted((tmp_path / "t").glob("*.png"))
    assert len(files) == 20 and files[0].name == "test_0000000.png"
    from distgen.sample import load_ema
    from distgen.translate import iter_inputs, translate_uint8

    family, nets, c = load_ema(tmp_path / "run")
    idx, names, x, target = next(iter_inputs([str(edges)], c.data, "AtoB", batch_size=PAIRS, want_targets=True))
    y = translate_uint8(family, nets, x, "AtoB", "cpu")
    assert names[0] == "test_0000000" and target.shape == x.shape == y.shape == (PAIRS, 1, 32, 32)
    for i in range(20):
        assert np.array_equal(grey(tmp_path / "t" / f"{names[i]}.png"), y[i, 0].numpy())
    # a translator does not sample from noise; CycleGAN's other direction is not pix2pix's
    assert cli_main(["sample", str(out), "--num", "2", "--out", str(tmp_path / "n.npz")]) == 2
    assert "translates images rather than sampling them: pass --input" in capsys.readouterr().err
    assert cli_main(["sample", str(out), "--input", str(edges), "--direction", "BtoA",
                     "--out", str(tmp_path / "b.npz")]) == 2
    assert "--direction: the pix2pix family translates AtoB, not BtoA" in capsys.readouterr().err
    # one image file in, a grid (input row over output row) out
    one = tmp_path / "edge.png"
    Image.fromarray(x[3, 0].numpy()).save(one)
    assert cli_main(["sample", str(out), "--input", str(one), "--out", str(tmp_path / "g.png")]) == 0
    g = grey(tmp_path / "g.png")
    assert np.array_equal(g[2:34, 2:34], x[3, 0].numpy()) and np.array_equal(g[36:68, 2:34], y[3, 0].numpy())

    # scored against the ground truth with 2 processes, each pair once: the first PAIRS test pairs (10 + 11 over
    # the ranks) as paired shards of their own
    from dataclasses import replace
    from itertools import islice

    from distgen.data import write_shards
    from distgen.data.sources import open_source
    from distgen.evaluate.recon import psnr

    source = open_source("fashion-mnist:edges", "test")
    write_shards(replace(source, count=PAIRS, items=lambda: islice(source.items(), PAIRS)), tmp_path / "pairs",
                 "test", samples_per_shard=8)
    res = tmp_path / "eval.json"
    run(launch(2) + ["eval", str(out), "--metrics", "paired", "--test", str(tmp_path / "pairs" / "test.manifest.json"),
                     "--out", str(res)], env_with_repo)
    got = json.loads(res.read_text())
    assert got["translated_images"] == PAIRS
    assert 0 < got["l1"] < 1 and 0 < got["ssim"] < 1 and np.isfinite(got["psnr"])
    # The same pairs' mean L1 (on [0, 1]) and PSNR by hand, from the same translations. Each image's L1 is exact
    # (a float64 sum of 1024 integers, over 1024) up to one rounding (/ 255); its PSNR up to one more (log10). The
    # means are float64 sums of PAIRS positive terms in another order (ranks, batches, all-reduce) and a division:
    # each within (PAIRS + 3) u of exact relative (u = 2^-53), so the two within 2 (PAIRS + 4) u of each other.
    # A pair counted twice or missed, or a wrong scale, moves them by whole percents.
    tol = 2 * (PAIRS + 4) * 2.0 ** -53
    want_l1 = float(((y.double() - target.double()).abs().flatten(1).mean(1) / 255).mean())
    want_psnr = float(psnr(target, y).mean())
    assert abs(got["l1"] - want_l1) <= tol * want_l1, (got["l1"], want_l1)
    assert abs(got["psnr"] - want_psnr) <= tol * want_psnr, (got["psnr"], want_psnr)


def test_pix2pix_two_processes_in_bf16(tmp_path, edges, env_with_repo):
    cfg = pix2pix(tmp_path, edges, train={"mixed_precision": "bf16", "sample_every": 0})
    r = run(launch(2) + ["train", str(cfg)], env_with_repo)
    assert "2 process(es)" in r.stdout and "done at step 10" in r.stdout
    recs = records(tmp_path / "run")
    assert all(np.isfinite(x["loss/D"]) and np.isfinite(x["loss/G"]) for x in recs)


# ---------------------------------------------------------------- CycleGAN

def test_each_rank_keeps_its_own_image_histories(trained):
    """The shared 2-process CycleGAN run (its exact resume, histories included, is test_resume's): each rank's
    pools of generated images in every checkpoint, full (2 images) and its own; the cycle and identity terms
    logged."""
    root, _ = trained
    cp = root / "cyclegan-a" / "checkpoints" / "step-00000006"
    pools = [weights(cp, f"family-{r}.safetensors") for r in (0, 1)]
    for key in ("pool_a.images", "pool_b.images"):
        assert all(p[key].shape == (2, 1, 32, 32) for p in pools)
        assert not torch.equal(pools[0][key], pools[1][key])  # each rank its own
    for x in records(root / "cyclegan-a"):
        assert x["G/cycle_a"] >= 0 and x["G/identity"] >= 0 and np.isfinite(x["loss/D"])


def test_cyclegan_exports_and_translates_both_ways_and_is_scored(tmp_path, boots, fm_test_shards, env_with_repo,
                                                                  domain_features):
    cfg = cyclegan(tmp_path, boots, train={"sample_every": 0})
    run(launch(1) + ["train", str(cfg)], env_with_repo)
    grid = grey(tmp_path / "run" / "samples" / "step-00000020.png")
    assert grid.shape == (2 + 4 * 34, 2 + 6 * 34)  # A, A->B, B, B->A rows
    out = tmp_path / "export"
    run(launch(1) + ["export", str(tmp_path / "run"), str(out)], env_with_repo)
    assert (out / "generator_ab.safetensors").is_file() and (out / "generator_ba.safetensors").is_file()
    from distgen.sample import load_ema

    family, nets, c = load_ema(out)
    src = boots / "testB.manifest.json"
    run(launch(2) + ["sample", str(out), "--input", str(src), "--direction", "BtoA", "--num", "12",
                     "--out", str(tmp_path / "ba.npz")], env_with_repo)
    z = np.load(tmp_path / "ba.npz")
    assert z["x"].shape == z["input"].shape == (12, 32, 32, 1)
    x = torch.from_numpy(z["input"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = family.translate(nets, x.float() / 127.5 - 1, "BtoA")
    from distgen.sample import to_uint8

    # the same translations; float sums of another thread count may move one rounding by a level
    diff = np.abs(z["x"].astype(int) - to_uint8(want).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    with torch.no_grad():
        assert not torch.equal(family.translate(nets, x.float() / 127.5 - 1, "AtoB"), want)

    # FD and the target-class share under a domain classifier of Fashion-MNIST's 10 classes
    feats = domain_features[0]  # a tiny Fashion-MNIST classifier, fitted once per session (conftest)
    res = tmp_path / "eval.json"
    run(launch(2) + ["eval", str(out), "--metrics", "fid,kid,target_class", "--feature-extractor", str(feats),
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(res)], env_with_repo)
    got = json.loads(res.read_text())
    assert got["translated_images"] == 1000 and got["ref_images"] == 1000  # sneakers in, ankle boots as reference
    assert got["fd_domain"] > 0 and 0 <= got["target_class_share"] <= 1 and got["target_class"] == "Ankle boot"
    back = tmp_path / "back.json"
    run(launch(1) + ["eval", str(out), "--metrics", "target_class", "--direction", "BtoA",
                     "--feature-extractor", str(feats), "--out", str(back)], env_with_repo)
    assert json.loads(back.read_text())["target_class"] == "Sneaker"


# ---------------------------------------------------------------- what each family refuses, and the schedule

def test_each_translator_refuses_the_other_layout_naming_the_field(tmp_path, edges, boots, fm_test_shards,
                                                                    env_with_repo):
    cases = [
        (config(tmp_path / "1", {"family": "pix2pix", "preset": "tiny"}, {"train": fm_test_shards}), "data.train: "),
        (config(tmp_path / "2", {"family": "cyclegan", "preset": "tiny"}, {"train": edges}), "data.train_b: "),
        (config(tmp_path / "3", {"family": "gan", "preset": "tiny"}, {"train": edges}), "data.train: "),
    ]
    for cfg, first in cases:
        r = run(launch(1) + ["train", str(cfg)], env_with_repo, check=False)
        assert r.returncode != 0 and r.stderr.startswith("distgen: error: " + first), r.stderr[-800:]
        assert not (cfg.parent / "run" / "checkpoints").exists()


def test_the_papers_linear_decay_holds_then_falls_to_zero(tmp_path, boots):
    from distgen.train import lr_factor

    cfg = load_config(str(cyclegan(tmp_path, boots, train={"total_kimg": 8, "lr_decay": "linear",
                                                           "lr_decay_start_kimg": 4})), [])
    tc = cfg.train
    assert [lr_factor(tc, n) for n in (0, 2000, 4000)] == [1.0, 1.0, 1.0]
    assert lr_factor(tc, 6000) == pytest.approx(0.5) and lr_factor(tc, 8000) == 0.0
