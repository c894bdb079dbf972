"""The energy-based family (IGEBM, JEM): SGLD, the replay buffer and the loss against their formulas, and
training as users run it (1 and 2 processes, exact resume with each rank's buffer, export, sampling
from noise and from the buffer, JEM's accuracy, the divergence guard)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distgen.cli import main as cli_main
from distgen.config import load_config
from distgen.config.core import ConfigError
from distgen.config.models import EBMConfig
from distgen.families.base import DataInfo, PhaseNets, StepContext
from distgen.families.ebm import EBM, EnergyNet, cd_loss, chain_starts, energy, sgld
from distgen.families.capabilities import Classifies, offers
from test_train import family_config, launch, run, weights

INFO = DataInfo(16, 1, 10)


def ebm_config(tmp_path, manifest, model=None, **over):
    """A tiny EBM on Fashion-MNIST at 16x16: 5 SGLD steps, a 32-image buffer per process."""
    sections = {"model": {"family": "ebm", "preset": "tiny", "sgld_steps": 5, "buffer_size": 32, "sample_steps": 4,
                          **(model or {})},
                "data": {"resolution": 16, "resize": "stretch", "workers": 0},
                "train": {"batch_size": 4, "total_kimg": 0.08, "log_every": 5, "checkpoint_every": 10,
                          "sample_every": 0},
                "ema": {"halflife_kimg": [0.05], "rampup": None}}
    return family_config(tmp_path, manifest, sections, over)


def records(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the maths, in process

def test_an_sgld_step_is_the_formula_and_touches_no_weight():
    x0 = torch.linspace(-1, 1, 2 * 16 * 16).reshape(2, 1, 16, 16)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    # E(x) = 2 sum x^2: dE/dx = 4x
    x1 = sgld(lambda x: 2 * x.square().flatten(1).sum(1), x0, 1, 0.1, lambda: noise)
    assert torch.allclose(x1, (x0 - 0.1 * 4 * x0 + noise).clamp(-1, 1))
    assert x1.abs().max() == 1  # clamped to the pixel range
    # through a network: each image's step uses its own gradient; the weights get none
    torch.manual_seed(0)
    net = EnergyNet(1, 4, 1, 1)
    x2 = sgld(lambda x: energy(net, x), x0, 1, 0.5, lambda: noise)
    for i in range(2):
        xi = x0[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(-torch.logsumexp(net(xi), 1).sum(), xi)
        assert torch.allclose(x2[i:i + 1], (x0[i:i + 1] - 0.5 * g + noise[i:i + 1]).clamp(-1, 1), atol=1e-6)
    assert all(p.grad is None for p in net.parameters())


def test_chains_restart_from_noise_at_reinit_freq_and_else_from_distinct_slots():
    buf = torch.full((5000, 1, 2, 2), 0.25)
    idx, start, restarted = chain_starts(buf, 4000, 0.05, torch.Generator().manual_seed(1))
    assert len(set(idx.tolist())) == 4000  # without replacement
    n = int(restarted.sum())
    sd = math.sqrt(4000 * 0.05 * 0.95)  # binomial: 200 +- 13.8
    assert abs(n - 200) < 5 * sd, n
    assert torch.equal(start[~restarted], buf[idx[~restarted]])
    fresh = start[restarted]
    assert fresh.min() >= -1 and fresh.max() <= 1 and abs(fresh.mean()) < 5 * math.sqrt(1 / 3 / fresh.numel())
    assert not chain_starts(buf, 10, 0.0, torch.Generator())[2].any()
    assert chain_starts(buf, 10, 1.0, torch.Generator())[2].all()


def test_the_loss_is_contrastive_divergence_plus_the_energy_regulariser_plus_jem_cross_entropy():
    e_real, e_fake = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.0])
    assert torch.allclose(cd_loss(e_real, e_fake, 0.1), torch.tensor([0.5 - 2 + 0.1 * 4.25, -1.0 + 0.1 * 1.0]))
    for jem in (False, True):
        fam = EBM(EBMConfig(preset="tiny", jem=jem, sgld_steps=2, buffer_size=16, energy_reg=0.3), INFO)
        torch.manual_seed(0)
        nets = fam.build_networks()
        real = torch.rand(4, 1, 16, 16) * 2 - 1
        labels = torch.tensor([3, -1, 0, 9])  # -1: unlabelled, no cross-entropy
        loss, extras = fam.loss(StepContext("E"), PhaseNets(nets, nets), {"image": real, "label": labels},
                                torch.Generator().manual_seed(5))
        with torch.no_grad():
            # the same draws again: the buffer was made from the generator first, then the slots
            g = torch.Generator().manual_seed(5)
            torch.rand((16, 1, 16, 16), generator=g)
            idx, _, _ = chain_starts(fam.buffer, 4, 0.05, g)
            neg = fam.buffer[idx]  # the chains' ends were written back to their slots
            want = cd_loss(energy(nets["E"], real), energy(nets["E"], neg), 0.3)
            if jem:
                ce = torch.nn.functional.cross_entropy(nets["E"](real), labels, ignore_index=-1, reduction="none")
                assert ce[1] == 0
                want = want + ce
        assert torch.allclose(loss, want, atol=1e-5)
        assert set(extras) == {"e_real", "e_fake", "gap", "saturation"} | ({"ce", "acc"} if jem else set())
        assert offers(fam, Classifies) == jem  # the accuracy metric asks offers()


def test_the_health_rule_names_what_diverged():
    fam = EBM(EBMConfig(preset="tiny", diverge_energy=50, diverge_saturation=0.9), INFO)
    ok = {"E/e_real": -1.0, "E/e_fake": 2.0, "E/gap": 3.0, "E/saturation": 0.5}
    assert fam.health(ok) is None and fam.health({}) is None  # an all-non-finite interval logs no extras
    assert "E/gap 60 is beyond model.diverge_energy 50" in fam.health({**ok, "E/gap": 60.0})
    assert "E/e_real -70" in fam.health({**ok, "E/e_real": -70.0})
    assert "95.00% of their pixels at -1 or 1, beyond model.diverge_saturation 0.9" in fam.health(
        {**ok, "E/saturation": 0.95})
    off = EBM(EBMConfig(preset="tiny", diverge_energy=0, diverge_saturation=1), INFO)
    assert off.health({**ok, "E/gap": 1e9, "E/saturation": 1.0}) is None


def test_bad_values_are_refused_naming_the_field(tmp_path, fm_test_shards):
    cfg = ebm_config(tmp_path, fm_test_shards)
    for override, field in (("model.sgld_steps=0", "model.sgld_steps"), ("model.reinit_freq=1.5", "model.reinit_freq"),
                            ("model.sgld_step_size=0", "model.sgld_step_size"),
                            ("model.diverge_saturation=0", "model.diverge_saturation"),
                            ("model.buffer_size=0", "model.buffer_size"), ("model.energy_reg=-1", "model.energy_reg"),
                            ("model.sample_step_size=-0.1", "model.sample_step_size")):
        with pytest.raises(ConfigError, match=f"^{field}"):
            load_config(cfg, [override])
    with pytest.raises(ConfigError, match="^model.jem: JEM needs labelled data"):
        EBM(EBMConfig(jem=True), DataInfo(16, 1, 0))
    fam = EBM(EBMConfig(preset="tiny", buffer_size=2), INFO)
    nets = fam.build_networks()
    with pytest.raises(ConfigError, match=r"^model.buffer_size: must be >= train.batch_size \(4\)"):
        fam.loss(StepContext("E"), PhaseNets(nets, nets), {"image": torch.zeros(4, 1, 16, 16)}, torch.Generator())
    assert fam.engine_problem(3).startswith("the SGLD chains run the energy network outside its engine")
    assert fam.engine_problem(2) is None
    for opts, flag in (({"steps": 0}, "--steps"), ({"step_size": 0.0}, "--step-size"),
                       ({"from_buffer": True}, "--from-buffer: this model holds no replay buffer"),
                       ({"truncation": 1.0}, "the ebm family takes no sampling option --truncation")):
        with pytest.raises(ValueError, match=f"^{flag}"):
            EBM(EBMConfig(preset="tiny"), INFO).check_sample_options(opts)


def test_an_image_is_the_same_whatever_else_is_in_its_batch():
    fam = EBM(EBMConfig(preset="tiny", sgld_noise=0.05), INFO)
    torch.manual_seed(0)
    nets = fam.build_networks()
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    with torch.no_grad():
        together = fam.sample(nets, gens(), steps=3)
        alone = torch.cat([fam.sample(nets, [g], steps=3) for g in gens()])
    assert torch.allclose(together, alone, atol=1e-6) and not torch.allclose(together[0], together[1])


# ---------------------------------------------------------------- training as users run it

@pytest.mark.e2e
def test_each_rank_keeps_its_own_replay_buffer(trained):
    """The shared 2-process EBM run (its exact resume, buffers included, is test_resume's): a buffer per rank in
    every checkpoint, each its own; the logged saturation and energy gap sane."""
    root, _ = trained
    cp = root / "ebm-a" / "checkpoints" / "step-00000006"
    bufs = [weights(cp, f"family-{r}.safetensors")["buffer"] for r in (0, 1)]
    assert bufs[0].shape == (8, 1, 16, 16) and not torch.equal(bufs[0], bufs[1])
    last = records(root / "ebm-a")[-1]
    assert 0 <= last["E/saturation"] <= 1 and math.isfinite(last["E/gap"])


@pytest.mark.e2e
def test_jem_trains_exports_classifies_and_samples_the_same_with_any_process_count(tmp_path, fm_test_shards,
                                                                                   env, one_thread):
    cfg = ebm_config(tmp_path, fm_test_shards, {"jem": True}, data={"labels": True},
                     train={"total_kimg": 0.16, "lr": 1e-3, "sample_every": 20})
    r = run(launch(1) + ["train", str(cfg)], env)
    assert "40 steps" in r.stdout and (tmp_path / "run" / "samples" / "step-00000020.png").is_file()
    recs = records(tmp_path / "run")
    assert all(0 <= x["E/acc"] <= 1 and x["E/ce"] > 0 for x in recs)

    out = tmp_path / "export"
    assert cli_main(["export", str(tmp_path / "run"), str(out)]) == 0
    buf = weights(tmp_path / "run" / "checkpoints" / "step-00000040", "family-0.safetensors")["buffer"]
    assert torch.equal(weights(out, "buffer.safetensors")["buffer"], buf)  # rank 0's buffer, for --from-buffer
    assert json.loads((out / "energy_config.json").read_text())["kwargs"]["outputs"] == 10

    # the classifier's test accuracy: every image of the last test shard (1000) once, as classify() counts it
    res, shard = tmp_path / "eval.json", str(fm_test_shards.parent / "test-000003.tar")
    assert cli_main(["eval", str(out), "--metrics", "accuracy", "--test", shard, "--out", str(res)]) == 0
    got = json.loads(res.read_text())
    from distgen.data import make_loader
    from distgen.sample import load_ema

    family, nets, c = load_ema(out)
    right = 0
    for batch in make_loader([shard], c.data, batch_size=500, mode="eval"):
        with torch.no_grad():
            right += int((family.classify(nets, batch["image"]).argmax(1) == batch["label"]).sum())
    assert got["accuracy_images"] == 1000 and got["accuracy"] == right / 1000

    # sampling: 1 process (this one) and 2 give the same files, from noise and from the buffer
    from distgen.sample import sample_command

    args = ["sample", str(out), "--num", "19", "--steps", "3", "--step-size", "0.5", "--seed", "4"]
    assert sample_command(str(out), 19, str(tmp_path / "one.npz"), seed=4, options={"steps": 3, "step_size": 0.5}) == 0
    run(launch(2) + args + ["--out", str(tmp_path / "two.npz")], env)
    one, two = np.load(tmp_path / "one.npz")["x"], np.load(tmp_path / "two.npz")["x"]
    assert one.shape == (19, 16, 16, 1) and np.array_equal(one, two)
    assert cli_main(args + ["--from-buffer", "--out", str(tmp_path / "buf.npz")]) == 0
    fb = np.load(tmp_path / "buf.npz")["x"]
    assert fb.shape == one.shape and not np.array_equal(fb, one)
    # a chain started from the buffer: one step of size 1e-9 keeps its slot's image up to the noise (sd 0.01)
    with torch.no_grad():
        x = family.sample(nets, [torch.Generator().manual_seed(0)], steps=1, step_size=1e-9, from_buffer=True)
    assert any(torch.allclose(x[0], b, atol=0.011 * 5) for b in buf)


@pytest.mark.e2e
def test_diverging_energies_stop_the_run_naming_the_last_good_checkpoint(tmp_path, fm_test_shards, env):
    cfg = ebm_config(tmp_path, fm_test_shards, {"diverge_energy": 1e-4},
                     train={"log_every": 4, "checkpoint_every": 2})
    r = run(launch(1) + ["train", str(cfg)], env, check=False)
    first = r.stderr.strip().splitlines()[0] if r.stderr.strip() else ""
    last = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert r.returncode != 0 and first.startswith("distgen: error: the energies diverged: E/"), r.stderr[-2000:]
    assert f"beyond model.diverge_energy 0.0001 in magnitude (step 4); stopping without saving: the last good " \
           f"checkpoint is {last}" in first
    assert not (tmp_path / "run" / "checkpoints" / "step-00000004").exists()
