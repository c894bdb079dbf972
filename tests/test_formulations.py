"""The diffusion formulations (ddpm, edm, flow) against what is known in closed form.

For Gaussian data N(mu, s^2) everything is: EDM's ideal denoiser E[x0 | x0 + sigma n = x] = mu + s^2 / (s^2 +
sigma^2) (x - mu), flow matching's ideal velocity E[eps - x0 | x_t], the probability-flow ODEs' exact solutions
(affine in the starting noise) and the flow loss's minimum (the conditional variance of eps - x0). Networks
written here from those closed forms (never from the formulation's code) drive the formulations' preconditioning,
losses and samplers; DDPM is compared with the code path distgen had before the formulations, bit for bit.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distgen.config.core import ConfigError, build_dataclass
from distgen.config.models import DiffusionConfig
from distgen.families import DataInfo
from distgen.families.diffusion import Diffusion
from distgen.families.formulations import EDM, Flow, WithUncertainty
from distgen.families.karras import (flow_times, karras_sigmas, sample_dpmpp_2m, sample_euler, sample_flow_euler,
                                     sample_flow_heun, sample_heun)

pytestmark = pytest.mark.usefixtures("one_thread")

MU, S = 0.3, 0.6  # the Gaussian data: N(MU, S^2) in every dimension
SD = 0.5  # EDM's sigma_data (not S: at S = SD, c_skip is the posterior's shrinkage and hides an error of c_in)


def cfg(**model) -> DiffusionConfig:
    return build_dataclass(DiffusionConfig, {"family": "diffusion", "preset": "tiny", **model}, "model")


# --------------------------------------------------------------------------- networks from the closed forms
class GaussianF(nn.Module):
    """The network F that EDM's preconditioning turns into the ideal denoiser of N(MU, S^2) data: from its input
    c_in x and c_noise = ln(sigma) / 4 it recovers sigma and x, and returns (D* - c_skip x) / c_out, with EDM's
    Table 1 written out here."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))  # a device to sample on

    def forward(self, x_in, c_noise, class_labels=None):
        sigma = torch.exp(4 * c_noise)
        sigma = sigma.reshape(-1, *[1] * (x_in.dim() - 1)) if sigma.dim() else sigma
        root = torch.sqrt(sigma ** 2 + SD ** 2)
        x = x_in * root
        ideal = MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)
        c_skip, c_out = SD ** 2 / (sigma ** 2 + SD ** 2), sigma * SD / root
        return SimpleNamespace(sample=(ideal - c_skip * x) / c_out)


def ideal_velocity(x, t):
    """E[eps - x0 | (1 - t) x0 + t eps = x] for x0 ~ N(MU, S^2), eps ~ N(0, 1): jointly Gaussian, so
    E[v] + Cov(v, x_t) / Var(x_t) (x - E[x_t]) with E[v] = -MU, Cov = t - (1 - t) S^2, Var = (1 - t)^2 S^2 + t^2."""
    var = (1 - t) ** 2 * S ** 2 + t ** 2
    return -MU + (t - (1 - t) * S ** 2) / var * (x - (1 - t) * MU)


def flow_residual_variance(t):
    """Var(eps - x0 | x_t) = (1 + S^2) - Cov^2 / Var(x_t) = S^2 / ((1 - t)^2 S^2 + t^2)."""
    return S ** 2 / ((1 - t) ** 2 * S ** 2 + t ** 2)


class GaussianV(nn.Module):
    """The ideal velocity network, called as the family calls it: (x, 1000 t)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x, cond, class_labels=None):
        t = cond / 1000
        t = t.reshape(-1, *[1] * (x.dim() - 1)) if t.dim() else t
        return SimpleNamespace(sample=ideal_velocity(x, t))


# --------------------------------------------------------------------------- EDM's preconditioning
SIGMAS = [0.002, 0.02, 0.2, 0.5, 1.0, 5.0, 80.0]


def test_edm_coefficients_are_the_closed_forms_and_give_unit_variance_targets():
    edm = EDM(cfg(formulation="edm"))
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.coefficients(sigma)
    eps = torch.finfo(torch.float64).eps
    for i, s in enumerate(SIGMAS):
        want = (SD ** 2 / (s ** 2 + SD ** 2), s * SD / math.sqrt(s ** 2 + SD ** 2), 1 / math.sqrt(s ** 2 + SD ** 2),
                math.log(s) / 4)
        for got, w in zip((c_skip[i], c_out[i], c_in[i], c_noise[i]), want):
            assert abs(got.item() - w) <= 8 * eps * abs(w), (s, got.item(), w)
    # EDM's design principles (its appendix B.6), for x = y + sigma n, Var(y) = sigma_d^2: the network's input
    # c_in x has unit variance, and so has its effective target (y - c_skip x) / c_out, whose weight
    # lambda c_out^2 is 1
    one = torch.ones_like(sigma)
    torch.testing.assert_close(c_in ** 2 * (SD ** 2 + sigma ** 2), one, rtol=16 * eps, atol=0)
    target_var = ((1 - c_skip) ** 2 * SD ** 2 + c_skip ** 2 * sigma ** 2) / c_out ** 2
    torch.testing.assert_close(target_var, one, rtol=16 * eps, atol=0)
    torch.testing.assert_close(edm.weight(sigma) * c_out ** 2, one, rtol=16 * eps, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_preconditioned_ideal_network_is_the_gaussian_posterior_mean(dtype):
    edm = EDM(cfg(formulation="edm"))
    g = torch.Generator().manual_seed(0)
    y = MU + S * torch.randn(len(SIGMAS), 64, generator=g, dtype=torch.float64)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)[:, None]
    x = y + sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)
    got, _ = edm.precondition(GaussianF(), x.to(dtype), sigma.to(dtype))
    ideal = MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)
    # float error: a few roundings of |c_skip x| and |D*| (through c_out F = D* - c_skip x and back), and sigma
    # recovered as exp(4 ln(sigma) / 4) to a relative (2 + |ln sigma|) u, which moves D* by at most |x - mu| / 2
    # times that (|dD*/dsigma| sigma <= |x - mu| / 2); x itself rounded to dtype moves D* by u |x|
    u = torch.finfo(dtype).eps / 2
    c_skip = SD ** 2 / (sigma ** 2 + SD ** 2)
    bound = 16 * u * (2 * (c_skip * x).abs() + 2 * ideal.abs() + (2 + sigma.log().abs()) * (x - MU).abs() + x.abs())
    err = (got.double() - ideal).abs()
    assert (err <= bound).all(), (err / bound).max()


# --------------------------------------------------------------------------- EDM's samplers on Gaussian data
N_IMG = 2048  # images of 4x4: 32768 independent scalars


def _edm_start(n, generator, sigma_max):
    """Noise from the exact marginal N(MU, S^2 + sigma_max^2) at sigma_max and the standard normal it came from:
    the probability-flow ODE maps it to MU + S z exactly (its flow is affine: x - MU scales as sqrt(S^2 + sigma^2))."""
    z = torch.randn(n, 1, 4, 4, generator=generator, dtype=torch.float64)
    return MU + math.sqrt(S ** 2 + sigma_max ** 2) * z, z


def _edm_run(sampler, steps, z=None):
    edm = EDM(cfg(formulation="edm"))
    g = torch.Generator().manual_seed(1)
    x, z0 = _edm_start(N_IMG, g, edm.cfg.sigma_max)
    out, nfe = sampler(edm.denoiser(GaussianF()), x, karras_sigmas(steps, edm.cfg.sigma_min, edm.cfg.sigma_max))
    # every sampler's last step, sigma_min -> 0, is the denoising D(x; sigma_min) itself: the reference is the exact
    # ODE solution at sigma_min, MU + sqrt(S^2 + sigma_min^2) z, denoised: MU + S^2 / sqrt(S^2 + sigma_min^2) z
    return out, MU + S ** 2 / math.sqrt(S ** 2 + edm.cfg.sigma_min ** 2) * z0, nfe


@pytest.mark.parametrize("sampler,order,nfe", [(sample_euler, 1, lambda n: n), (sample_heun, 2, lambda n: 2 * n - 1),
                                               (sample_dpmpp_2m, 2, lambda n: n)])
def test_edm_samplers_with_the_ideal_denoiser_reproduce_the_data(sampler, order, nfe):
    errs = {}
    for steps in (16, 32, 64):
        out, exact, got_nfe = _edm_run(sampler, steps)
        assert got_nfe == nfe(steps)
        errs[steps] = (out - exact).abs().max().item()
    # convergence at the method's order: doubling the steps divides the error by about 2^order (a margin of
    # 2^(order - 0.5) for the schedule's nonuniform steps)
    for a, b in ((16, 32), (32, 64)):
        assert errs[a] / errs[b] > 2 ** (order - 0.5), errs
    out, exact, _ = _edm_run(sampler, 64)
    n, e = out.numel(), (out - exact).pow(2).mean().sqrt().item()
    # the samples' mean and standard deviation: within 5 standard errors of the data's (S / sqrt(n), and
    # S / sqrt(2 n) for the standard deviation) plus the discretisation error (its root mean square bounds how far
    # it moves the mean, by Cauchy-Schwarz, and the standard deviation, a seminorm) and the last step's shrinkage
    # S - S^2 / sqrt(S^2 + sigma_min^2) of the standard deviation
    shrink = S - S ** 2 / math.sqrt(S ** 2 + 0.002 ** 2)
    assert abs(out.mean().item() - MU) <= 5 * S / math.sqrt(n) + e
    assert abs(out.std().item() - S) <= 5 * S / math.sqrt(2 * n) + e + shrink


def test_heun_churn_keeps_the_data_distribution_and_uses_the_generators():
    edm = EDM(cfg(formulation="edm", s_churn=40.0, s_min=0.05, s_max=50.0))
    g = torch.Generator().manual_seed(2)
    x, _ = _edm_start(N_IMG, g, edm.cfg.sigma_max)
    noise_gen = torch.Generator().manual_seed(3)

    def noise(like):
        return torch.randn(like.shape, generator=noise_gen, dtype=like.dtype)

    c = edm.cfg
    kw = dict(s_churn=c.s_churn, s_min=c.s_min, s_max=c.s_max, noise=noise)
    out, _ = sample_heun(edm.denoiser(GaussianF()), x, karras_sigmas(64, c.sigma_min, c.sigma_max), **kw)
    n = out.numel()
    # stochastic: the bound is statistical alone plus a churned sampler's larger discretisation error (0.01 S)
    assert abs(out.mean().item() - MU) <= 5 * S / math.sqrt(n) + 0.01 * S
    assert abs(out.std().item() - S) <= 5 * S / math.sqrt(2 * n) + 0.01 * S
    again, _ = sample_heun(edm.denoiser(GaussianF()), x, karras_sigmas(64, c.sigma_min, c.sigma_max),
                           **{**kw, "s_churn": 0.0})
    assert not torch.equal(out, again)  # the churn did add noise


def test_karras_schedule():
    s = karras_sigmas(5, 0.002, 80.0, 7.0)
    assert len(s) == 6 and s[-1] == 0 and s[0] == pytest.approx(80.0, rel=1e-12)
    assert s[-2] == pytest.approx(0.002, rel=1e-12) and all(a > b for a, b in zip(s, s[1:]))
    mid = (80.0 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert s[2] == pytest.approx(mid, rel=1e-12)


# --------------------------------------------------------------------------- flow matching on Gaussian data
@pytest.mark.parametrize("sampler,order,nfe", [(sample_flow_euler, 1, lambda n: n),
                                               (sample_flow_heun, 2, lambda n: 2 * n)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_samplers_with_the_ideal_velocity_transport_noise_to_the_data(sampler, order, nfe, shift):
    flow = Flow(cfg(formulation="flow", flow_shift=shift))
    g = torch.Generator().manual_seed(4)
    z = torch.randn(N_IMG, 1, 4, 4, generator=g, dtype=torch.float64)
    exact = MU + S * z  # the ODE's flow is affine: x_t = (1 - t) MU + sqrt((1 - t)^2 S^2 + t^2) z
    errs = {}
    for steps in (16, 32, 64):
        out, got_nfe = sampler(flow.velocity(GaussianV()), z, flow_times(steps, shift))
        assert got_nfe == nfe(steps)
        errs[steps] = (out - exact).abs().max().item()
    for a, b in ((16, 32), (32, 64)):
        assert errs[a] / errs[b] > 2 ** (order - 0.5), errs
    n, e = out.numel(), (out - exact).pow(2).mean().sqrt().item()  # as for EDM's samplers
    assert abs(out.mean().item() - MU) <= 5 * S / math.sqrt(n) + e
    assert abs(out.std().item() - S) <= 5 * S / math.sqrt(2 * n) + e


@pytest.mark.parametrize("flow_t", ["uniform", "logit_normal"])
def test_the_flow_loss_at_the_ideal_velocity_is_the_conditional_variance(flow_t):
    flow = Flow(cfg(formulation="flow", flow_t=flow_t, flow_shift=2.0))
    g = torch.Generator().manual_seed(5)
    x0 = MU + S * torch.randn(4096, 1, 4, 4, generator=g, dtype=torch.float64)
    drawn = flow.draw(x0, g)
    loss, _ = flow.loss(GaussianV().double(), drawn, None)
    # per image: the mean of D = 16 squared N(0, c(t)) residuals, so loss / c(t) has mean 1 and variance 2 / D;
    # over B images the mean of loss / c(t) is 1 within 5 sqrt(2 / (B D))
    ratio = loss.double() / flow_residual_variance(drawn["t"].double())
    assert abs(ratio.mean().item() - 1) <= 5 * math.sqrt(2 / x0.numel())
    t = drawn["t"]
    assert 0 <= t.min() and t.max() <= 1


def _dkw(samples: torch.Tensor, cdf) -> None:
    """The empirical CDF of ``samples`` within the Dvoretzky-Kiefer-Wolfowitz bound sqrt(ln(2 / a) / (2 n)) of
    ``cdf`` (a = 1e-6: a correct sampler fails once in a million runs)."""
    x, _ = samples.double().sort()
    n = len(x)
    emp_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    f = cdf(x)
    gap = torch.maximum((emp_hi - f).abs(), (emp_hi - 1 / n - f).abs()).max().item()
    assert gap <= math.sqrt(math.log(2 / 1e-6) / (2 * n)), gap


@pytest.mark.parametrize("flow_t,shift", [("uniform", 1.0), ("uniform", 3.0), ("logit_normal", 1.0),
                                          ("logit_normal", 0.5)])
def test_flow_training_times_follow_their_distribution(flow_t, shift):
    flow = Flow(cfg(formulation="flow", flow_t=flow_t, flow_mean=0.2, flow_std=0.8, flow_shift=shift))
    t = flow.times(100_000, "cpu", torch.Generator().manual_seed(9))
    normal = torch.distributions.Normal(0.0, 1.0)

    def cdf(q):
        u = q / (shift - (shift - 1) * q)  # the shift's inverse: P(t <= q) = P(t0 <= u)
        if flow_t == "uniform":
            return u
        return normal.cdf((torch.log(u / (1 - u)) - 0.2) / 0.8)
    _dkw(t, cdf)


def test_edm_training_sigmas_are_log_normal():
    edm = EDM(cfg(formulation="edm", p_mean=-0.4, p_std=1.5))
    drawn = edm.draw(torch.zeros(100_000, 1, 1, 1), torch.Generator().manual_seed(10))
    normal = torch.distributions.Normal(-0.4, 1.5)
    _dkw(drawn["sigma"].reshape(-1), lambda q: normal.cdf(q.log()))
    _dkw((drawn["x"] / drawn["sigma"]).reshape(-1), torch.distributions.Normal(0.0, 1.0).cdf)  # x = x0 + sigma n


def test_flow_times_shift():
    t = flow_times(4, 3.0)
    assert t[0] == 1.0 and t[-1] == 0.0
    assert t[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))


# --------------------------------------------------------------------------- EDM's loss and EDM2's uncertainty
def test_edm_loss_is_the_weighted_denoising_error_and_uncertainty_trains_with_the_network():
    c = cfg(formulation="edm", edm_uncertainty=True)
    edm = EDM(c)
    net = edm.wrap(GaussianF())
    assert isinstance(net, WithUncertainty) and "linear.weight" in net.state_dict()

    class Plain(nn.Module):  # F as the U-Net returns it, wrapped as EDM wraps the U-Net
        def __init__(self):
            super().__init__()
            self.f = GaussianF()

        def forward(self, x, t, class_labels=None):
            return SimpleNamespace(sample=self.f(x, t).sample.float())

    net = WithUncertainty(Plain())
    with torch.no_grad():
        net.linear.bias.fill_(0.7)  # u = 0.7 at every sigma
    g = torch.Generator().manual_seed(6)
    x0 = MU + S * torch.randn(8, 1, 4, 4, generator=g)
    drawn = edm.draw(x0, g)
    loss, logs = edm.loss(net, drawn, None)
    d, _ = edm.precondition(net, drawn["x"], drawn["sigma"])
    sigma = drawn["sigma"].reshape(-1)
    plain = edm.weight(sigma) * ((d - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, plain / math.exp(0.7) + 0.7)
    assert logs["uncertainty"].item() == pytest.approx(0.7)
    loss.mean().backward()
    assert net.linear.bias.grad is not None and net.linear.bias.grad.abs().item() > 0


# --------------------------------------------------------------------------- DDPM: the code path of before
def _ddpm_family(**model):
    fam = Diffusion(cfg(**model), DataInfo(8, 1, 3 if model.get("class_conditional") else 0))
    torch.manual_seed(0)
    nets = fam.build_networks()
    return fam, nets


@pytest.mark.parametrize("model", [{}, {"class_conditional": True, "prediction": "v_prediction"}])
def test_ddpm_loss_is_bit_identical_to_the_code_before_formulations(model):
    import torch.nn.functional as F

    fam, nets = _ddpm_family(**model)
    unet = nets["unet"]
    g = torch.Generator().manual_seed(7)
    batch = {"image": torch.randn(4, 1, 8, 8, generator=g), "label": torch.tensor([0, 1, 2, 0])}
    got, _ = fam.loss(None, nets, batch, torch.Generator().manual_seed(8))
    # distgen's loss before formulations, verbatim
    gen = torch.Generator().manual_seed(8)
    x0 = batch["image"]
    b = x0.shape[0]
    t = torch.randint(0, fam.cfg.num_train_timesteps, (b,), device=x0.device, generator=gen)
    noise = torch.randn(x0.shape, device=x0.device, generator=gen, dtype=x0.dtype)
    xt = fam.scheduler.add_noise(x0, noise, t)
    labels = None
    if fam.num_classes:
        labels = batch["label"]
        drop = torch.rand(b, device=x0.device, generator=gen) < fam.cfg.label_dropout
        labels = torch.where(drop, torch.full_like(labels, fam.null_class), labels)
    pred = unet(xt, t, class_labels=labels).sample
    target = noise if fam.cfg.prediction == "epsilon" else fam.scheduler.get_velocity(x0, noise, t)
    want = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    assert torch.equal(got, want)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver"])
def test_ddpm_samples_are_bit_identical_to_the_code_before_formulations(sampler):
    from diffusers.utils.torch_utils import randn_tensor

    from distgen.families.denoising import denoise
    from distgen.families.formulations import make_sampler

    fam, nets = _ddpm_family(class_conditional=True, guidance_scale=2.0)
    unet = nets["unet"].eval()
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(3)]  # noqa: E731
    got = fam.sample(nets, gens(), steps=3, sampler=sampler)
    assert fam.last_nfe == 3
    # distgen's sample() before formulations, verbatim
    gg = gens()
    sched = make_sampler(sampler, fam.scheduler)
    sched.set_timesteps(3, device="cpu")
    with torch.no_grad():
        x = randn_tensor((3, 1, 8, 8), generator=gg, device=torch.device("cpu"), dtype=torch.float32)
        x = x * sched.init_noise_sigma
        labels = torch.tensor([i % fam.num_classes for i in range(3)])
        want = denoise(unet, sched, x, labels, fam.null_class, 2.0, generator=gg).clamp(-1, 1)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- the family, its options and config
class TensorOut(nn.Module):
    """A backbone that returns its prediction as a plain tensor (distgen.families.backbones' convention)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, cond, class_labels=None):
        return self.net(x, cond, class_labels).sample


def test_the_family_samples_each_formulation_and_counts_network_evaluations():
    for form, sampler, steps, nfe in (("edm", "heun", 5, 9), ("edm", "euler", 5, 5), ("edm", "dpmpp_2m", 5, 5),
                                      ("flow", "euler", 4, 4), ("flow", "heun", 4, 8)):
        fam = Diffusion(cfg(formulation=form), DataInfo(4, 1, 0))
        net = GaussianF() if form == "edm" else GaussianV()
        images = []
        for n in (net, TensorOut(net)):  # either return convention, the same images
            images.append(fam.sample({"unet": n}, [torch.Generator().manual_seed(i) for i in range(2)], steps=steps,
                                     sampler=sampler))
            assert fam.last_nfe == nfe, (form, sampler)
        assert images[0].shape == (2, 1, 4, 4) and torch.isfinite(images[0]).all()
        assert torch.equal(images[0], images[1])
        x0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        losses = [fam.form.loss(n, fam.form.draw(x0, torch.Generator().manual_seed(1)), None)[0]
                  for n in (net, TensorOut(net))]
        assert torch.equal(*losses)


def test_a_sampler_of_another_formulation_is_refused_naming_the_flag_and_the_allowed_ones():
    fam = Diffusion(cfg(formulation="edm"), DataInfo(8, 1, 0))
    with pytest.raises(ValueError, match=r"--sampler: .*formulation edm samples with heun, euler, dpmpp_2m, not ddim"):
        fam.check_sample_options({"sampler": "ddim"})
    assert fam.check_sample_options({"sampler": "dpmpp_2m", "steps": 5000}) == {"sampler": "dpmpp_2m", "steps": 5000}
    fam = Diffusion(cfg(formulation="flow"), DataInfo(8, 1, 0))
    with pytest.raises(ValueError, match=r"--sampler: .*samples with euler, heun, not dpmpp_2m"):
        fam.check_sample_options({"sampler": "dpmpp_2m"})
    fam = Diffusion(cfg(), DataInfo(8, 1, 0))
    with pytest.raises(ValueError, match=r"--sampler: .*samples with ddim, ddpm, dpmsolver, not heun"):
        fam.check_sample_options({"sampler": "heun"})
    with pytest.raises(ValueError, match=r"--steps: must be in \[1, 1000\]"):
        fam.check_sample_options({"steps": 1001})


@pytest.mark.parametrize("model,message", [
    ({"formulation": "edm", "sigma_data": 0.0}, "model.sigma_data: must be > 0, got 0.0"),
    ({"formulation": "edm", "sigma_max": 0.001}, "model.sigma_max: must be > sigma_min"),
    ({"formulation": "edm", "p_std": -1.0}, "model.p_std: must be > 0"),
    ({"formulation": "flow", "flow_shift": 0.0}, "model.flow_shift: must be > 0"),
    ({"formulation": "flow", "flow_std": 0.0}, "model.flow_std: must be > 0"),
    ({"formulation": "rectified"}, "model.formulation: 'rectified' is not one of 'ddpm', 'edm', 'flow'"),
    ({"sigma_data": 1.0}, "model.sigma_data: EDM's data standard deviation is for formulation edm only, not ddpm"),
    ({"formulation": "flow", "edm_uncertainty": True}, "model.edm_uncertainty: .* for formulation edm only, not flow"),
    ({"formulation": "edm", "flow_shift": 3.0}, "model.flow_shift: .* for formulation flow only, not edm"),
    ({"formulation": "edm", "prediction": "v_prediction"}, "model.prediction: .* for formulation ddpm only, not edm"),
    ({"formulation": "edm", "sampler": "ddim"}, "model.sampler: formulation edm samples with heun, euler, dpmpp_2m"),
    ({"sampler": "heun"}, "model.sampler: formulation ddpm samples with ddim, ddpm, dpmsolver, not heun"),
    ({"sample_steps": 2000}, r"model.sample_steps: must be in \[1, num_train_timesteps\]"),
    ({"probes": 4}, "model.probes: the probability-flow ODE's bits/dim is for formulation edm and flow"),
    ({"formulation": "flow", "ode_tol": 0.0}, r"model.ode_tol: must be in \(0, 1\)"),
])
def test_config_checks_name_the_field(model, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**model)


def test_config_defaults():
    assert cfg().default_sampler == "ddim" and cfg(formulation="edm").default_sampler == "heun"
    assert cfg(formulation="flow").default_sampler == "euler"
    assert cfg(formulation="edm", sample_steps=5000).sample_steps == 5000  # edm has no training timesteps


# --------------------------------------------------------------------------- training through the CLI
@pytest.mark.e2e
@pytest.mark.parametrize("form", ["edm", "flow"])
def test_each_formulation_trains_resumes_exactly_and_samples_through_the_cli(form, tmp_path, fm_test_shards, env):
    """One process on the tiny preset: 6 steps straight and 3 + a resume to 6 end bit for bit the same (EDM2's
    uncertainty included); `distgen sample` prints the NFE, refuses another formulation's sampler naming --sampler,
    and an export samples what its run folder does. (2 processes and ZeRO-2/3: tests/matrix.py's MODELS.)"""
    import yaml
    from matrix import differences
    from test_train import family_config, run

    model = {"family": "diffusion", "preset": "tiny", "formulation": form, "sample_steps": 3}
    if form == "edm":
        model["edm_uncertainty"] = True
    dirs = {}
    for name, stops in (("a", [6]), ("b", [3, 6])):
        path = family_config(tmp_path / name, fm_test_shards, {"model": dict(model)},
                             {"train": {"batch_size": 4, "checkpoint_every": 3, "log_every": 1, "total_kimg": 1}})
        for stop in stops:
            run([sys.executable, "-m", "distgen", "train", str(path), f"train.max_steps={stop}"], env)
        dirs[name] = yaml.safe_load(path.read_text())["run"]["dir"]
    a, b = (Path(dirs[k]) / "checkpoints" / "step-00000006" for k in "ab")
    assert differences(a, b) == []
    r = run([sys.executable, "-m", "distgen", "sample", dirs["b"], "--num", "2", "--out", str(tmp_path / "s.png"),
             "--steps", "4"], env)
    assert f"NFE {7 if form == 'edm' else 4}" in r.stdout, r.stdout
    # the export (a diffusers pipeline folder whose unet/ is the EMA backbone, without EDM2's uncertainty, which
    # sampling does not use) samples the same images as the run folder it came from
    import numpy as np

    run([sys.executable, "-m", "distgen", "export", dirs["b"], str(tmp_path / "export")], env)
    assert (tmp_path / "export" / "unet" / "config.json").is_file()
    for src, out in ((dirs["b"], "run.npz"), (str(tmp_path / "export"), "export.npz")):
        run([sys.executable, "-m", "distgen", "sample", src, "--num", "2", "--out", str(tmp_path / out)], env)
    assert (np.load(tmp_path / "run.npz")["x"] == np.load(tmp_path / "export.npz")["x"]).all()
    bad = run([sys.executable, "-m", "distgen", "sample", dirs["b"], "--num", "2", "--out",
               str(tmp_path / "t.png"), "--sampler", "ddim"], env, check=False)
    assert bad.returncode != 0 and "--sampler" in bad.stdout + bad.stderr


@pytest.mark.parametrize("form", ["edm", "flow"])
def test_latent_diffusion_takes_each_formulation_guided_and_its_export_samples_the_same(form, tmp_path):
    from diffusers import AutoencoderKL

    from distgen.export.native import write_format
    from distgen.families import FAMILIES
    from distgen.families.autoencoder import autoencoder_kwargs

    torch.manual_seed(0)
    AutoencoderKL(**autoencoder_kwargs("tiny", 1, 16), scaling_factor=0.7).save_pretrained(tmp_path / "ae")
    cls = FAMILIES["latent_diffusion"]
    model = {"family": "latent_diffusion", "preset": "tiny", "formulation": form, "autoencoder": str(tmp_path / "ae"),
             "sample_steps": 2, "class_conditional": True, "edm_uncertainty": form == "edm"}
    fam = cls(build_dataclass(cls.config_cls, model, "model"), DataInfo(16, 1, 3))
    nets = fam.build_networks()
    batch = {"image": torch.rand(2, 1, 16, 16) * 2 - 1, "label": torch.tensor([0, 2])}
    loss, _ = fam.loss(None, nets, batch, torch.Generator().manual_seed(0))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    x = fam.sample(nets, gens(), guidance=2.0)
    assert fam.last_nfe == (3 if form == "edm" else 2)  # Heun's 2 steps: 2 x 2 - 1; flow's Euler: 2
    write_format(tmp_path / "export", fam, nets)
    stem = "edm_pipeline.py" if form == "edm" else "flow_pipeline.py"  # the shipped diffusers pipeline
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [stem, "model_index.json", "scheduler",
                                                                       "unet", "vae"]
    assert torch.equal(fam.sample(fam.load_export(tmp_path / "export"), gens(), guidance=2.0), x)


# --------------------------------------------------------------------------- bits/dim through the probability-flow ODE
def _probes(y, k=2, seed=11):
    return (torch.randint(0, 2, (len(y), k, *y.shape[1:]), generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(
        y.dtype)


@pytest.mark.parametrize("form", ["edm", "flow"])
def test_the_ode_log_density_of_the_ideal_network_is_the_closed_form(form):
    """The ideal networks' ODE is linear with a Jacobian c(s) I, so Hutchinson's Rademacher estimate is the exact
    trace and the change of variables is closed-form: flow's log p(y) is log N(y; MU, S^2) itself; EDM's, from
    its prior N(0, sigma_max^2) at sigma_max, is log N(x(sigma_max); 0, sigma_max^2) + D/2 ln((S^2 + sigma_max^2) /
    (S^2 + sigma_min^2)) with x(sigma) - MU = sqrt((S^2 + sigma^2) / (S^2 + sigma_min^2)) (y - MU). The solver runs
    at tolerance 1e-9; the bound 1e-5 (1 + |log p|) leaves it a hundred steps' worth of error."""
    g = torch.Generator().manual_seed(12)
    y = MU + S * torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    d = y[0].numel()
    if form == "edm":
        f = EDM(cfg(formulation="edm"))
        got = f.log_density(GaussianF().double(), y, None, _probes(y), 1e-9)
        lo, hi = f.cfg.sigma_min, f.cfg.sigma_max
        x = MU + math.sqrt((S ** 2 + hi ** 2) / (S ** 2 + lo ** 2)) * (y - MU)
        want = torch.distributions.Normal(0.0, hi).log_prob(x).flatten(1).sum(1) + d / 2 * math.log(
            (S ** 2 + hi ** 2) / (S ** 2 + lo ** 2))
    else:
        f = Flow(cfg(formulation="flow"))
        got = f.log_density(GaussianV().double(), y, None, _probes(y), 1e-9)
        want = torch.distributions.Normal(MU, S).log_prob(y).flatten(1).sum(1)
    assert ((got - want).abs() <= 1e-5 * (1 + want.abs())).all(), (got, want)


def test_the_family_scores_dequantised_images_in_pixel_units():
    """Diffusion.log_likelihood (flow, the ideal network): each image's dequantised y = 2 (x + u) / 256 - 1 scored
    by the ODE, minus D log 128 (the [-1, 1] density in units of pixel bins): the Gaussian log-density of the same
    y, to float32 solver error."""
    from distgen.families.ode import dequantize

    fam = Diffusion(cfg(formulation="flow", ode_tol=1e-6), DataInfo(2, 1, 0))
    images = torch.randint(0, 256, (3, 1, 2, 2), generator=torch.Generator().manual_seed(13), dtype=torch.uint8)
    gens = lambda: [torch.Generator().manual_seed(20 + i) for i in range(3)]  # noqa: E731
    got = fam.log_likelihood({"unet": GaussianV()}, images, None, gens())
    y = dequantize(images, gens()) * 2 - 1
    want = torch.distributions.Normal(MU, S).log_prob(y).flatten(1).sum(1) - 4 * math.log(128)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="--probes: the variational bound of model.formulation ddpm"):
        Diffusion(cfg(), DataInfo(2, 1, 0)).check_likelihood_options({"probes": 2})
    assert fam.check_likelihood_options({"probes": 2}) == {"probes": 2}


@pytest.mark.parametrize("form", ["ddpm", "edm", "flow"])
@pytest.mark.parametrize("name", ["unet", "dit", "edm2"])
def test_every_backbone_trains_and_samples_guided_in_every_formulation(name, form):
    """distgen.families.backbones' networks (tensor outputs) through each formulation's loss, its gradient and its
    guided sampler (EDM with EDM2's uncertainty around the backbone)."""
    from distgen.families.backbones import build_backbone
    from distgen.config.backbones import UNET_PRESETS as PRESETS

    fam = Diffusion(cfg(formulation=form, class_conditional=True, sample_steps=2, edm_uncertainty=form == "edm"),
                    DataInfo(8, 1, 3))
    torch.manual_seed(0)
    net = fam.form.wrap(build_backbone(name, 1, 8, 3, PRESETS["tiny"] if name == "unet" else "tiny"))
    batch = {"image": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
             "label": torch.tensor([0, 2])}
    loss, _ = fam.loss(None, {"unet": net}, batch, torch.Generator().manual_seed(0))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    x = fam.sample({"unet": net}, [torch.Generator().manual_seed(i) for i in range(2)], guidance=2.0)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert fam.last_nfe == {"ddpm": 2, "edm": 3, "flow": 2}[form]
