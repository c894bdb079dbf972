"""Post-hoc EMA: EDM2's power-function EMA, snapshots during training, and `distgen ema` reconstructing
other widths from them (exports, a sweep with a table and a plot), with bad input refused by name."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from distgen import phema
from distgen.ema import PowerEMA, exp_to_std, std_to_exp
from test_train import run, tiny_config, weights

PY = [sys.executable, "-m", "distgen"]


# ---------------------------------------------------------------- the maths, in process
def test_power_ema_is_the_power_profile_weighted_average():
    """After K steps of b samples, EDM2's update (1 - b/t)^(gamma+1) has given step k the weight
    (k/K)^(gamma+1) - ((k-1)/K)^(gamma+1): the profile (gamma+1) t^gamma / T^(gamma+1) integrated over the
    step's samples. Checked against that float64 sum on a random parameter sequence."""
    torch.manual_seed(0)
    seq = torch.randn(200, 7, dtype=torch.float64)
    p = torch.nn.Parameter(seq[0].float().clone())
    b = 16
    for sigma in (0.05, 0.10, 0.2):
        ema = PowerEMA([p], sigma)
        gamma = std_to_exp(sigma)
        assert exp_to_std(gamma) == pytest.approx(sigma, rel=1e-12)
        for k in range(1, len(seq) + 1):
            p.data.copy_(seq[k - 1])
            ema.cur_nimg, ema.batch = k * b, b
            ema.step([p])
            K = k
            w = torch.tensor([(j / K) ** (gamma + 1) - ((j - 1) / K) ** (gamma + 1) for j in range(1, K + 1)],
                             dtype=torch.float64)
            want = (w[:, None] * seq[:K]).sum(0)
            assert torch.allclose(ema.shadow_params[0].double(), want, rtol=0, atol=1e-5), (sigma, k)


def test_profile_inner_products_are_the_integrals():
    t = np.linspace(0, 3000, 600001)

    def profile(T, s):
        g = std_to_exp(s)
        return np.where(t <= T, (g + 1) / T * (t / T) ** g, 0.0)

    for a, b in (((2000, 0.05), (3000, 0.10)), ((3000, 0.2), (1000, 0.07)), ((1500, 0.1), (1500, 0.1))):
        direct = np.trapezoid(profile(*a) * profile(*b), t)
        assert phema.correlation(a[0], a[1], b[0], b[1]) == pytest.approx(direct, rel=1e-4)
    # a tracked width is fitted exactly; one between two tracked ones nearly so
    ts = np.repeat(np.arange(1, 21) * 1000.0, 2)
    stds = np.tile([0.05, 0.10], 20)
    _, res = phema.solve(ts, stds, [20000.0] * 2, [0.05, 0.075])
    assert res[0] < 1e-6 and res[1] < 1e-2


# ---------------------------------------------------------------- training runs
def power_config(path, manifest, **over):
    sections = {"train": {"total_kimg": 0.16, "checkpoint_every": 10, "log_every": 5},
                "ema": {"kind": "power", "power_stds": [0.05, 0.10], "snapshot_kimg": 0.016, "snapshot_dtype": "fp32"}}
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    return tiny_config(path, manifest, **sections)


@pytest.mark.e2e
def test_reconstruction_matches_a_directly_tracked_ema_and_exports_load(tmp_path, fm_test_shards, env_with_repo):
    """Run A tracks widths 0.05 and 0.10 with snapshots every 2 steps; run B, the same training (same seed:
    an EMA does not touch the trained weights), tracks 0.075 directly. Reconstructing 0.075 from A's
    snapshots gives B's EMA up to float32 rounding of the combination (1e-5 of the weights' scale), and
    closes >99% of the gap between B's EMA and A's nearest tracked one."""
    a = power_config(tmp_path / "a", fm_test_shards)
    b = power_config(tmp_path / "b", fm_test_shards, ema={"power_stds": [0.075], "snapshot_kimg": None})
    run(PY + ["train", str(a)], env_with_repo)
    run(PY + ["train", str(b)], env_with_repo)
    index = phema.read_index(tmp_path / "a" / "run")
    assert [e["nimg"] for e in index] == [16 * i for i in range(1, 11)] and index[0]["stds"] == [0.05, 0.10]
    out = tmp_path / "posthoc"
    r = run(PY + ["ema", str(tmp_path / "a" / "run"), "--sigma-rel", "0.075,0.05", "--out", str(out)], env_with_repo)
    assert "widths they represent within residual 0.05" in r.stdout and "sigma_rel 0.075" in r.stdout
    direct = weights(tmp_path / "b" / "run" / "checkpoints" / "step-00000020", "ema0-unet.safetensors")
    nearest = weights(tmp_path / "a" / "run" / "checkpoints" / "step-00000020", "ema0-unet.safetensors")
    from diffusers import UNet2DModel

    rec = UNet2DModel.from_pretrained(out / "sigma-0.075" / "unet").state_dict()  # diffusers loads the export
    norm = lambda d: math.sqrt(sum(float(v.double().square().sum()) for v in d.values()))  # noqa: E731
    err = norm({k: rec[k].double() - direct[k].double() for k in direct})
    gap = norm({k: nearest[k].double() - direct[k].double() for k in direct})
    assert err <= 1e-5 * norm(direct) and err <= 0.01 * gap, (err, gap, norm(direct))
    meta = json.loads((out / "sigma-0.075" / "distgen.json").read_text())
    assert meta["source"]["posthoc_ema"]["sigma_rel"] == 0.075 and meta["source"]["posthoc_ema"]["snapshots"] == 10
    # the 0.05 reconstruction is the tracked EMA itself; `distgen sample` takes the export
    tracked = load_file(tmp_path / "a" / "run" / "ema-snapshots" / index[-1]["file"])
    rec05 = UNet2DModel.from_pretrained(out / "sigma-0.050" / "unet").state_dict()
    assert max(float((rec05[k] - tracked[f"unet/0/{k}"]).abs().max()) for k in direct) < 1e-6
    run(PY + ["sample", str(out / "sigma-0.075"), "--num", "2", "--out", str(tmp_path / "s.npz")], env_with_repo)
    assert np.load(tmp_path / "s.npz")["x"].shape[0] == 2


@pytest.mark.e2e
def test_bad_input_is_refused_by_name_and_nothing_is_written(tmp_path, fm_test_shards, env_with_repo, capsys):
    from distgen.cli import main
    from distgen.config import ConfigError, load_config

    def ema(run_dir, *args):  # `distgen ema` in process: its checks come before any model is loaded
        code = main(["ema", str(run_dir), *args])
        return code, capsys.readouterr().err

    plain = tiny_config(tmp_path / "plain", fm_test_shards, train={"total_kimg": 0.08})
    cfg = power_config(tmp_path / "p", fm_test_shards, train={"total_kimg": 0.08})
    run(PY + ["train", str(plain)], env_with_repo)
    run(PY + ["train", str(cfg)], env_with_repo)
    out, rd = tmp_path / "out", tmp_path / "p" / "run"
    code, err = ema(tmp_path / "plain" / "run", "--sigma-rel", "0.07", "--out", str(out))
    assert code == 2 and "ema-snapshots/index.json: no EMA snapshots" in err and not out.exists()
    code, err = ema(rd, "--sigma-rel", "0.28", "--out", str(out))
    assert code == 2 and "--sigma-rel 0.28: the 5 snapshots" in err and "they represent sigma_rel" in err
    assert not out.exists()
    snaps = sorted((rd / "ema-snapshots").glob("ema-*.safetensors"))
    data = snaps[2].read_bytes()
    snaps[2].write_bytes(data[: len(data) // 2])  # truncated
    code, err = ema(rd, "--sigma-rel", "0.07", "--out", str(out))
    assert code == 2 and f"{snaps[2]}: {len(data) // 2} bytes, the index recorded {len(data)}" in err
    snaps[2].write_bytes(data[:-8] + bytes(8))  # the same size, other bytes
    code, err = ema(rd, "--sigma-rel", "0.07", "--out", str(out))
    assert code == 2 and f"{snaps[2]}: its sha256 differs" in err
    snaps[2].unlink()  # missing
    code, err = ema(rd, "--sigma-rel", "0.07", "--out", str(out))
    assert code == 2 and f"{snaps[2]}: listed in" in err and "but missing" in err
    assert not out.exists()
    # nor over the run folder or a folder of other files
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for target, why in ((rd, "is the run folder"), (tmp_path / "other", "not a distgen ema output")):
        code, err = ema(rd, "--sigma-rel", "0.07", "--out", str(target))
        assert code == 2 and why in err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="ema.snapshot_kimg: snapshots are of power-function EMAs"):
        load_config(str(cfg), ["ema.kind=halflife"])


@pytest.mark.e2e
def test_sweep_writes_a_table_a_plot_and_the_best_export(tmp_path, fm_test_shards, env_with_repo):
    from distgen.data import write_shards
    from distgen.evaluate.extractors import write_random_inception
    from test_eval import _fm_images

    # EDM2's recipe end to end: its U-Net in EDM's formulation with the learned uncertainty, power EMAs, the sweep
    cfg = power_config(tmp_path, fm_test_shards, model={"backbone": "edm2", "formulation": "edm",
                                                        "edm_uncertainty": True, "sample_steps": 2})
    run(PY + ["train", str(cfg)], env_with_repo)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["backbone"] == "edm2"
    x, _ = _fm_images(40)
    inception = write_random_inception(tmp_path / "inception.pth",
                                       images=torch.from_numpy(x)[:, None].expand(-1, 3, -1, -1).contiguous())
    np.savez(tmp_path / "ref.npz", x=x)
    write_shards(f"npz:{tmp_path / 'ref.npz'}", tmp_path / "ref", "test", samples_per_shard=40)
    out = tmp_path / "sweep"
    args = ["ema", str(tmp_path / "run"), "--sweep", "0.04:0.16:3", "--metric", "fid", "--num-samples", "12",
            "--ref", str(tmp_path / "ref" / "test.manifest.json"), "--inception-weights", str(inception),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--baseline", str(tmp_path / "run")]
    r = run(PY + args, env_with_repo)
    summary = json.loads((out / "posthoc.json").read_text())
    fids = [row["fid"] for row in summary["sweep"]]
    assert [row["sigma_rel"] for row in summary["sweep"]] == pytest.approx([0.04, 0.10, 0.16])
    assert all(math.isfinite(f) and f >= 0 for f in fids) and summary["best"]["fid"] == min(fids)
    assert math.isfinite(summary["baseline"]["fid"])
    table = (out / "sweep.md").read_text()
    assert "| sigma_rel | gamma | fit residual | fid |" in table and "**best**" in table and "baseline" in table
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    best = json.loads((out / "best" / "distgen.json").read_text())["source"]["posthoc_ema"]["sigma_rel"]
    assert best == summary["best"]["sigma_rel"] and "best sigma_rel" in r.stdout
    # the best export loads for evaluation as any export does, and scores what the sweep found
    r = run(PY + ["eval", str(out / "best"), "--metrics", "fid", "--num-samples", "12", "--ref",
                  str(tmp_path / "ref" / "test.manifest.json"), "--inception-weights", str(inception),
                  "--cache-dir", str(tmp_path / "cache")], env_with_repo)
    import re

    fid = float(re.search(r"FID\s+([\d.]+)", r.stdout).group(1))
    assert fid == pytest.approx(summary["best"]["fid"], rel=1e-5)  # the same images from the same weights
    # a second sweep into the same folder needs --force
    r = run(PY + args, env_with_repo, check=False)
    assert r.returncode == 2 and "pass --force" in r.stderr
