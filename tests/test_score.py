"""The score-based family (NCSN, score SDEs): the objectives, the divergence and the ODE likelihood against
known answers, sampling per image, refusals naming the field or flag, and training as users run it (2
processes with an exact resume, sampling with 2 processes, 1 process with export and bits/dim)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distgen.cli import main as cli_main
from distgen.config import load_config
from distgen.config.core import ConfigError
from distgen.families.base import DataInfo, PhaseNets, StepContext
from distgen.families.ode import dequantize, hutchinson_divergence, per_image, rk45
from distgen.families.score import LIKELIHOOD_EPS, Score, sliced_score_matching
from distgen.sample import SampleError, likelihood_options, load_ema, sampling_options
from distgen.families.capabilities import Likelihood, missing, offers
from test_likelihood import _bpd_direct
from test_train import family_config, launch, run


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def family(sde: str = "ve", res: int = 8, **model) -> Score:
    cfg = load_config(None, ["model.family=score", "model.preset=tiny", f"model.sde={sde}", f"data.resolution={res}",
                             *[f"model.{k}={v}" for k, v in model.items()]])
    return Score(cfg.model, DataInfo(res, 1, 0))


def tiny_unet(fam: Score, seed: int = 0):
    torch.manual_seed(seed)
    return fam.build_networks()["unet"].eval()


class Gaussian(torch.nn.Module):
    """The exact score of data N(mean, var) (per pixel) perturbed by the family's SDE, in the UNet's output
    convention (VE: the score; VP: -std x score). ``mean`` may be per image: the DSM target given x0."""

    def __init__(self, fam: Score, mean, var):
        super().__init__()
        self.fam, self.mean, self.var = fam, mean, var
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # sampling asks the device of the first parameter

    def forward(self, x, timestep):
        if self.fam.sde.ve:
            m, std = torch.ones_like(timestep).double(), timestep.double()
        else:
            m, std = self.fam.sde.marginal(timestep.double() / 999)
        m, std = m.view(-1, 1, 1, 1), std.view(-1, 1, 1, 1)
        score = -(x.double() - m * self.mean) / (m ** 2 * self.var + std ** 2)
        return SimpleNamespace(sample=(score if self.fam.sde.ve else -std * score).float())


# ---------------------------------------------------------------- the objectives

@pytest.mark.parametrize("sde", ["ncsn", "ve", "vp", "subvp"])
def test_denoising_score_matching_targets_minus_noise_over_sigma(sde):
    fam = family(sde, num_scales=10, likelihood_weighting=sde != "ncsn")
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    # the conditional score grad log N(xt; m x0, std^2) = -z / std is the target: zero loss
    net = Gaussian(fam, fam.to_model(x0).double(), 0.0)
    loss = lambda n: fam.loss(StepContext("score"), PhaseNets({"unet": n}, {"unet": n}), {"image": x0},  # noqa: E731
                              torch.Generator().manual_seed(3))[0]
    per = loss(net)
    assert per.shape == (6,) and per.abs().max() < 1e-3
    # a zero score: 1/2 |z|^2 (lambda = std^2), or g^2 / std^2 x that with likelihood weighting
    zero = Gaussian(fam, 0.0, math.inf)
    per = loss(zero)
    g = torch.Generator().manual_seed(3)  # the same draws: the times, then the noise
    t = (torch.randint(0, 10, (6,), generator=g).float() / 9 if sde == "ncsn"
         else torch.rand(6, generator=g) * (1 - 1e-5) + 1e-5)
    want = 0.5 * torch.randn(x0.shape, generator=g).pow(2).flatten(1).sum(1)
    if sde != "ncsn":
        _, std = fam.sde.marginal(t)
        want = want * (fam.sde.coefficients(t)[1] / std) ** 2
    assert torch.allclose(per, want, rtol=1e-5)


def test_sliced_score_matching_is_the_projected_jacobian_and_hyvarinens_objective_on_average():
    # a network: each projection gives v^T J v + |s|^2 / 2 with J the exact Jacobian of the score
    fam = family("ve", res=4)
    unet = tiny_unet(fam)
    t = torch.tensor([0.3])
    score = lambda x: fam.score(unet, x, t.expand(len(x)))  # noqa: E731
    x, v = torch.rand(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    jac = torch.autograd.functional.jacobian(lambda y: score(y).flatten(), x).reshape(16, 16)
    s, vf = score(x).flatten().detach(), v.flatten()
    want = vf @ jac @ vf + 0.5 * s @ s
    assert torch.allclose(sliced_score_matching(score, x, v), want.view(1), rtol=1e-4)
    # a linear score s = A x on data N(0, c I): E[SSM] = tr A + c |A|^2 / 2, which is the Fisher divergence
    # E |A x + x / c|^2 / 2 less its constant D / (2 c)
    gen = torch.Generator().manual_seed(0)
    a, c, n = torch.randn(4, 4, generator=gen) * 0.5, 0.7, 200_000
    x, v = torch.randn(n, 4, generator=gen) * math.sqrt(c), torch.randn(n, 4, generator=gen)
    per = sliced_score_matching(lambda y: y @ a.T, x, v).detach().double()
    closed = float(torch.trace(a) + 0.5 * c * a.pow(2).sum())
    assert abs(per.mean().item() - closed) < 5 * per.std().item() / math.sqrt(n)
    assert closed == pytest.approx(0.5 * c * (a + torch.eye(4) / c).pow(2).sum().item() - 4 / (2 * c), rel=1e-5)


def test_hutchinson_is_the_exact_trace_on_average_and_each_probe_is_exact():
    fam = family("ve", res=4)
    unet = tiny_unet(fam)
    x, t = torch.rand(1, 1, 4, 4), torch.tensor([0.4])
    jac = torch.autograd.functional.jacobian(lambda y: fam.ode_drift(unet, y, t).flatten(), x).reshape(16, 16)
    n = 4000  # one Rademacher probe per row, all in one batch
    probes = (torch.randint(0, 2, (n, 1, 1, 4, 4), generator=torch.Generator().manual_seed(1)) * 2 - 1).float()
    xs = x.expand(n, -1, -1, -1).clone().requires_grad_(True)
    est = hutchinson_divergence(fam.ode_drift(unet, xs, t.expand(n)), xs, probes).detach().double()
    p = probes.flatten(1).double()
    assert torch.allclose(est, torch.einsum("ni,ij,nj->n", p, jac.double(), p), rtol=1e-4, atol=1e-4)
    assert abs(est.mean().item() - torch.trace(jac).item()) < 5 * est.std().item() / math.sqrt(n)


def test_the_solver_steps_each_row_on_its_own_and_reaches_its_tolerance():
    k = torch.tensor([1.0, 40.0, 3.0], dtype=torch.float64)  # one stiff row among gentle ones
    f = lambda y, t, rows: -k[rows, None] * y  # noqa: E731
    y0 = torch.ones(3, 2, dtype=torch.float64)
    out = rk45(f, y0, 0.0, 1.0, 1e-6)
    assert torch.allclose(out, torch.exp(-k)[:, None].expand(3, 2), rtol=1e-4, atol=1e-6)  # atol: the tolerance
    for i in range(3):  # alone, each row takes the same steps: bit for bit the same answer
        alone = rk45(lambda y, t, rows: f(y, t, rows + i), y0[i:i + 1], 0.0, 1.0, 1e-6)
        assert torch.equal(alone, out[i:i + 1])


@pytest.mark.parametrize("sde", ["ve", "vp", "subvp"])
def test_the_ode_likelihood_is_the_gaussians_closed_form(sde):
    """Data N(0, diag(var)) with the exact perturbed score as the network: the probability-flow ODE's log p of
    each dequantised image is the Gaussian's log density at t = 1e-5, in pixel units, up to the prior's own
    known mismatch (p_1 is not exactly the prior), computed here. Rademacher probes are exact for a diagonal
    Jacobian: any number of probes gives the same."""
    fam = family(sde, res=4)
    var = torch.linspace(0.05, 1.0, 16, dtype=torch.float64).view(1, 1, 4, 4)
    nets = {"unet": Gaussian(fam, 0.0, var)}
    images = torch.randint(0, 256, (5, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(5)]  # noqa: E731
    with torch.no_grad():  # as evaluation calls it
        got = fam.log_likelihood(nets, images, None, gens(), probes=3)
    y, scale = dequantize(images, gens()), 256
    if not fam.sde.ve:
        y, scale = y * 2 - 1, 128

    def variance(t):
        m, std = fam.sde.marginal(torch.tensor([t], dtype=torch.float64))
        return m ** 2 * var + std ** 2

    normal = lambda x, v: (-0.5 * (x ** 2 / v + torch.log(2 * math.pi * v))).flatten(1).sum(1)  # noqa: E731
    closed = normal(y, variance(LIKELIHOOD_EPS)) - 16 * math.log(scale)
    z = y * (variance(1.0) / variance(LIKELIHOOD_EPS)).sqrt()  # where the exact flow carries y
    prior_gap = fam.sde.prior_logp(z) - normal(z, variance(1.0))
    assert prior_gap.abs().max() < 0.01
    assert torch.allclose(got, closed + prior_gap, atol=3e-4), (got - closed - prior_gap)


# ---------------------------------------------------------------- sampling and refusals

@pytest.mark.parametrize("sde,sampler,model", [
    ("ncsn", "langevin", {"num_scales": 10, "sigma_max": 1.0, "n_steps_each": 50, "step_size": 2e-5}),  # NCSN's
    ("ve", "pc", {"num_scales": 100}), ("vp", "pc", {"num_scales": 100}),
    ("subvp", "pc", {"num_scales": 100, "predictor": "euler_maruyama"}), ("vp", "ode", {"ode_tol": 1e-4})])
@pytest.mark.e2e
def test_every_sampler_draws_gaussian_data_given_its_exact_score(sde, sampler, model):
    """Data N(0, diag(var)) and the exact perturbed score: 800 images have the data's mean and variances (5
    standard errors). A corrector step scaled by each image's own score norm fails this (up to 2x the variance)."""
    fam = family(sde, res=4, **model)
    var = torch.linspace(0.05, 0.3, 16, dtype=torch.float64).view(1, 1, 4, 4)
    n = 800
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    net = Gaussian(fam, 0.0, var)
    if sampler == "langevin":
        x = fam.langevin(net, per_image("rand", gens, (1, 4, 4), "cpu"), gens, 10, 2e-5)
    else:
        start = per_image("randn", gens, (1, 4, 4), "cpu") * fam.sde.prior_std()
        x = fam.pc(net, start, gens, 100) if sampler == "pc" else fam.ode_sample(net, start)
    x = x.double()
    assert (x.mean(0).abs() < 5 * (var[0] / n).sqrt()).all()
    ratio = x.var(0) / var[0]
    assert ratio.min() > 1 - 5 * math.sqrt(2 / n) and ratio.max() < 1 + 5 * math.sqrt(2 / n), ratio


@pytest.mark.parametrize("sde,sampler", [("ncsn", "langevin"), ("ve", "pc"), ("vp", "pc"), ("subvp", "ode")])
def test_an_image_depends_on_its_own_generator_only(sde, sampler):
    fam = family(sde, num_scales=4, n_steps_each=1, ode_tol=1e-3, predictor="euler_maruyama" if sde == "vp" else
                 "reverse_diffusion")
    nets = {"unet": tiny_unet(fam)}
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    three = fam.sample(nets, gens([4, 5, 6]), sampler=sampler)
    one = fam.sample(nets, gens([5]), sampler=sampler)
    assert three.shape == (3, 1, 8, 8) and three.min() >= -1 and three.max() <= 1
    # the same up to rounding: a convolution may sum in another order for another batch size
    assert torch.allclose(three[1:2], one, atol=1e-4) and not torch.allclose(three[0], three[1])


def test_bad_values_are_refused_naming_the_field():
    base = ["model.family=score"]
    for extra, field in ((["model.sigma_max=0.005"], "model.sigma_max"),
                         (["model.sigma_min=0"], "model.sigma_min"),
                         (["model.beta_max=0.05"], "model.beta_max"),
                         (["model.num_scales=1"], "model.num_scales"),
                         (["model.sde=ncsn", "model.sampler=ode"], "model.sampler"),
                         (["model.sde=vp", "model.sampler=langevin"], "model.sampler"),
                         (["model.sde=ncsn", "model.num_scales=10", "model.sample_steps=5"], "model.sample_steps"),
                         (["model.sde=ncsn", "model.likelihood_weighting=true"], "model.likelihood_weighting"),
                         (["model.sde=ncsn", "model.n_steps_each=0"], "model.n_steps_each"),
                         (["model.snr=0"], "model.snr"), (["model.ode_tol=2"], "model.ode_tol"),
                         (["model.probes=0"], "model.probes"), (["model.objective=ism"], "model.objective")):
        with pytest.raises(ConfigError) as e:
            load_config(None, base + extra)
        assert str(e.value).startswith(f"{field}:"), str(e.value)
    # 0 corrector steps: pc without its corrector
    assert load_config(None, base + ["model.sde=ve", "model.n_steps_each=0"]).model.n_steps_each == 0
    ncsn, vp = family("ncsn", num_scales=10), family("vp")
    for fam, options, flag in ((ncsn, {"sampler": "ode"}, "--sampler: a score model with sde ncsn samples with "
                                                          "langevin, pc, not ode"),
                               (vp, {"sampler": "langevin"}, "--sampler: "),
                               (vp, {"sampler": "ode", "steps": 5}, "--steps: "),
                               (ncsn, {"steps": 5}, "--steps: sde ncsn samples at its 10 trained levels"),
                               (vp, {"step_size": 0.1}, "--step-size: "), (vp, {"guidance": 2.0}, "takes no sampling")):
        with pytest.raises(SampleError) as e:
            sampling_options(fam, options)
        assert flag in str(e.value), str(e.value)
    assert sampling_options(ncsn, {"step_size": 1e-5, "steps": 10}) == {"step_size": 1e-5, "steps": 10}
    assert likelihood_options(vp, {"probes": 4, "iw_samples": None}) == {"probes": 4}
    # bits/dim is skipped for NCSN's discrete levels
    assert not offers(ncsn, Likelihood) and offers(vp, Likelihood) and vp.likelihood == "bound"
    assert missing(ncsn, Likelihood) == "the score family supplies no log-likelihood as an NCSN (sde ve or vp has one)"
    with pytest.raises(ValueError, match="sde ncsn has discrete noise levels"):
        ncsn.log_likelihood({}, torch.zeros(1, 1, 8, 8, dtype=torch.uint8), None, [torch.Generator()])
    assert family("ve", objective="ssm").compile_problem("unet") and family("ve").compile_problem("unet") is None
    with pytest.raises(ConfigError, match=r"^data.resolution: the small score U-Net halves the image 2 time"):
        family("ve", res=30, preset="small")


# ---------------------------------------------------------------- training as users run it

def score_config(tmp_path, manifest, model=None, **over):
    """A tiny score model on Fashion-MNIST at 8x8, 10 steps of 4 images per process."""
    sections = {"model": {"family": "score", "preset": "tiny", "sde": "ve", "sample_steps": 3, "n_steps_each": 1,
                          **(model or {})},
                "data": {"resolution": 8, "resize": "stretch", "workers": 0},
                "train": {"batch_size": 4, "total_kimg": 0.08, "log_every": 5, "checkpoint_every": 5,
                          "sample_every": 0, "sample_num": 4},
                "ema": {"halflife_kimg": [0.05], "rampup": None}}
    return family_config(tmp_path, manifest, sections, over)


@pytest.mark.e2e
def test_two_processes_sample_what_one_process_samples(trained, tmp_path, env):
    """The shared VE / denoising-score-matching run (2 processes; its exact resume is test_resume's): finite
    losses, an end-of-run grid, and `distgen sample` with 2 processes writes the images 1 process writes."""
    root, _ = trained
    run_dir = root / "score-ve-a"
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and all(math.isfinite(r["loss"]) for r in recs)
    assert (run_dir / "samples" / "step-00000006.png").is_file()  # the end-of-run grid (pc)
    from distgen.sample import sample_command

    assert sample_command(str(run_dir), 9, str(tmp_path / "one.npz"), seed=2, options={"sampler": "langevin"}) == 0
    run(launch(2) + ["sample", str(run_dir), "--num", "9", "--seed", "2", "--sampler", "langevin",
                     "--out", str(tmp_path / "two.npz")], env)
    one, two = np.load(tmp_path / "one.npz")["x"], np.load(tmp_path / "two.npz")["x"]
    assert one.shape == (9, 8, 8, 1) and np.array_equal(one, two)


@pytest.mark.e2e
def test_one_process_sliced_score_matching_run_exports_and_reports_bits_per_dim(tmp_path, fm_test_shards, env):
    """sub-VP SDE trained by sliced score matching; the export (a diffusers U-Net folder) samples with the ODE
    and `distgen eval --metrics bpd --probes 2` gives the direct sum over a small test split."""
    cfg = score_config(tmp_path, fm_test_shards, {"sde": "subvp", "objective": "ssm", "sampler": "ode",
                                                   "ode_tol": 1e-3})
    run(launch(1) + ["train", str(cfg)], env)
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [5, 10, 15, 20] and all(math.isfinite(r["loss"]) for r in recs)
    out = tmp_path / "export"
    assert cli_main(["export", str(tmp_path / "run"), str(out)]) == 0
    assert (out / "unet" / "config.json").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    fam, nets, _ = load_ema(out)
    assert fam.name == "score" and fam.cfg.objective == "ssm"
    assert cli_main(["sample", str(out), "--num", "3", "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["x"].shape == (3, 8, 8, 1)

    from PIL import Image

    from distgen.data import write_shards
    from test_eval import _fm_images

    x, _ = _fm_images(6, offset=500)
    xs = np.stack([np.asarray(Image.fromarray(i).resize((8, 8))) for i in x])
    np.savez(tmp_path / "t.npz", x=xs, y=np.zeros(6, dtype=np.int64))
    write_shards(f"npz:{tmp_path / 't.npz'}", tmp_path / "t", "test", samples_per_shard=4)
    res = tmp_path / "bpd.json"
    assert cli_main(["eval", str(out), "--metrics", "bpd", "--test", str(tmp_path / "t" / "test.manifest.json"),
                     "--probes", "2", "--out", str(res)]) == 0
    got = json.loads(res.read_text())
    assert got["bpd_images"] == 6 and got["bpd_kind"] == "bound" and got["bpd_probes"] == 2
    with torch.no_grad():
        want = _bpd_direct(fam, nets, xs[..., None], None, per_shard=4, probes=2)
    assert got["bpd"] == pytest.approx(want, rel=1e-6) and 0 < got["bpd"] < 16


def test_an_rgb_ve_export_is_a_diffusers_score_sde_ve_pipeline(tmp_path):
    fam = Score(load_config(None, ["model.family=score", "model.preset=tiny", "model.num_scales=10", "data.channels=3",
                                   "data.resolution=8"]).model, DataInfo(8, 3, 0))
    nets = {"unet": tiny_unet(fam)}
    fam.export(nets, tmp_path / "export")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export")
    assert type(pipe).__name__ == "ScoreSdeVePipeline" and pipe.scheduler.config.sigma_max == 50.0
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 8, 8, 3)
    back = fam.load_export(tmp_path / "export")["unet"]
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in nets["unet"].state_dict().items())
