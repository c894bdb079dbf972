"""The standalone ONNX sampler's numpy ports (distgen/export/sample_onnx.py, numpy + onnxruntime only) against
the one torch implementation of each algorithm, on the same inputs and the same noise: classifier-free guidance
(families/denoising.py), the discretised logistic mixture's draw (families/likelihoods.py), Dormand-Prince 5(4)
(families/ode.py) and the score SDEs' samplers (families/sde.py).

Tolerances come from float32 arithmetic, not from a run: U32 = 2^-24 is float32's unit roundoff (one rounding
moves a value v by at most U32 |v|). The torch side computes in float32 where the family does, the numpy side
in float64 on the graphs' float32 outputs, so each bound counts the float32 roundings on the torch side (or the
float32 casts of a graph's input) times the largest magnitude they act on.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distgen.config import load_config
from distgen.export import sample_onnx
from distgen.families.base import DataInfo
from distgen.families.denoising import guided_prediction
from distgen.config.backbones import UNET_PRESETS as PRESETS
from distgen.families.likelihoods import logistic_mixture_draw, logistic_mixture_params
from distgen.families.ode import rk45
from distgen.families.score import Score
from distgen.families.sde import SAMPLE_EPS

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

U32 = 2.0 ** -24


def rngs(n: int, seed: int = 0) -> list:
    """Per-image numpy generators, as sample_onnx.py seeds them."""
    return [np.random.default_rng([seed, i]) for i in range(n)]


class Graphs:
    """Stands in for sample_onnx's Export: ``run(graph, **feed)`` calls a torch function on the float32 feed, as
    onnxruntime runs the graph the torch module was exported from."""

    def __init__(self, spec: dict, fn):
        self.spec, self.fn = spec, fn

    def run(self, graph, **feed):
        with torch.no_grad():
            out = self.fn(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()})
        return [out.numpy()]


# ---------------------------------------------------------------- classifier-free guidance

def test_guidance_port_equals_torch():
    """sample_onnx.guided == denoising.guided_prediction on the same U-Net, inputs, labels and weight. Both run
    the U-Net once on the same float32 batch of 2B; torch then rounds (c - u), g (c - u) and u + g (c - u) in
    float32: at most 3 roundings of magnitudes <= |u| + |g| (|c| + |u|)."""
    torch.manual_seed(0)
    unet = __import__("diffusers").UNet2DModel(**PRESETS["tiny"], sample_size=8, in_channels=1, out_channels=1,
                                               num_class_embeds=4).eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels, null, t = torch.tensor([0, 2, 1]), 3, 500
    ex = Graphs({}, lambda x, t, labels=None: unet(x, t, class_labels=labels).sample)
    with torch.no_grad():
        cond, uncond = (unet(x, t, class_labels=y).sample.double() for y in (labels, torch.full_like(labels, null)))
    for g in (2.5, 1.0, 0.0):
        with torch.no_grad():
            want = guided_prediction(unet, x, torch.tensor(t), labels, null, g).double()
        got = sample_onnx.guided(ex, x.double().numpy(), np.full(3, t), labels.numpy(), null, g)
        tol = 3 * U32 * (uncond.abs() + abs(g) * (cond.abs() + uncond.abs()))
        assert ((torch.from_numpy(got) - want).abs() <= tol).all(), g
    assert (cond - uncond).abs().max() > 1e-3  # the label matters, so a port that drops it fails


# ---------------------------------------------------------------- the logistic mixture's draw

@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
def test_logistic_mixture_port_equals_torch(temperature):
    """sample_onnx.logistic_mixture_draw == likelihoods.logistic_mixture_draw on the same float32 parameters and
    the same uniforms. Both land on the 256-value grid; torch rounds k / 127.5 - 1 in float32, 2 roundings of
    values <= 1. (A value whose pre-rounding v lies within float32 rounding, ~1e-7, of a bin edge could fall in
    the neighbouring bin: about 255 x 1e-7 per value, none among these.)"""
    m, c, b = 5, 3, 256
    params = torch.randn(b, logistic_mixture_params(c, m), generator=torch.Generator().manual_seed(0)) * 2
    u = np.clip(np.stack([r.random(m + c) for r in rngs(b)]), 1e-12, None)
    want = logistic_mixture_draw(params, m, c, torch.from_numpy(u), temperature).double().numpy()
    got = sample_onnx.logistic_mixture_draw(params.double().numpy(), m, c, u, temperature)
    assert np.abs(got - want).max() <= 2 * U32
    assert len(np.unique(want)) > 50  # draws spread over the grid


# ---------------------------------------------------------------- Dormand-Prince 5(4)

def dynamics(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A float32 graph's dynamics, nonlinear in y and t and bounded both ways in time: rows started at
    different scales take different paths, so their adaptive steps differ."""
    return -torch.sin(3 * y) * (1 + y * y) * (1 + t[:, None]) + torch.cos(3 * t)[:, None]


@pytest.mark.parametrize("graph", ["float32", "float64"])
@pytest.mark.parametrize("t0,t1", [(0.0, 1.0), (1.0, 1e-3)])
def test_rk45_port_equals_torch(t0, t1, graph):
    """sample_onnx.rk45 == ode.rk45 on the same dynamics from the same y0, both solvers in float64.

    With float32 dynamics (as a graph computes them) an evaluation rounds its input and output to float32, which
    may move the solution by U32 (|y| + |f| |h|) <= U32 (max|y| + max|f|) (|h| <= 1) per evaluation, summed over
    the evaluations. With float64 dynamics only the solvers' own arithmetic can differ (numpy's and torch's
    reductions may order sums differently): at most 8 float64 roundings (U64 = 2^-53) of the same magnitudes
    per evaluation, a bound far below any change of the method (a tableau weight, the error norm, the step
    control moves the solution by about its tolerance, 1e-5)."""
    y0 = torch.randn(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y0 = y0 * torch.tensor([0.1, 0.3, 1.0, 1.5, 2.0, 3.0], dtype=torch.float64)[:, None]
    dtype = getattr(torch, graph)
    calls, fmax = [0], [0.0]

    def f_torch(y, t, rows):
        calls[0] += 1
        out = dynamics(y.to(dtype), t.to(dtype))
        fmax[0] = max(fmax[0], float(out.abs().max()))
        return out.double()

    def f_numpy(y, t):
        return dynamics(torch.from_numpy(y).to(dtype), torch.from_numpy(t).to(dtype)).double().numpy()

    want = rk45(f_torch, y0, t0, t1, 1e-5)
    got = sample_onnx.rk45(f_numpy, y0.numpy(), t0, t1, 1e-5, 1e-5)
    scale = max(float(want.abs().max()), float(y0.abs().max())) + fmax[0]
    tol = calls[0] * (U32 if graph == "float32" else 8 * 2.0 ** -53) * scale
    assert np.abs(got - want.numpy()).max() <= tol
    assert calls[0] > 30  # an adaptive solve of many steps, not one


# ---------------------------------------------------------------- the score SDEs' samplers

def score_family(sde: str, *model) -> Score:
    cfg = load_config(None, ["model.family=score", "model.preset=tiny", f"model.sde={sde}", "data.resolution=8",
                             *model])
    return Score(cfg.model, DataInfo(8, 1, 0))


class GaussianScore:
    """The exact score of data N(mean, var) per pixel perturbed by the family's SDE, in float32 as the score graph
    computes it: s(x, t) = -(x - m(t) mean) / (m(t)^2 var + std(t)^2)."""

    def __init__(self, fam: Score, mean: float, var: float):
        self.fam, self.mean, self.var, self.evals = fam, mean, var, 0

    def __call__(self, x, t):
        self.evals += 1
        m, std = (v.float().view(-1, 1, 1, 1) for v in self.fam.sde.marginal(t.float()))
        return -(x.float() - m * self.mean) / (m * m * self.var + std * std)


SDE_CASES = [("ncsn", "langevin", ["model.num_scales=8", "model.n_steps_each=3", "model.step_size=4e-5",
                                    "model.sigma_max=1.0"]),
             ("ve", "pc", ["model.sample_steps=5", "model.n_steps_each=1", "model.sigma_max=1.0"]),
             ("vp", "pc", ["model.sample_steps=20", "model.n_steps_each=2"]),
             ("subvp", "pc", ["model.sample_steps=20", "model.n_steps_each=1", "model.predictor=euler_maruyama"])]


@pytest.mark.parametrize("sde,sampler,model", SDE_CASES, ids=[c[0] for c in SDE_CASES])
def test_sde_sampler_port_equals_torch(sde, sampler, model):
    """sample_onnx.sample_score == SDE.langevin / SDE.pc (then the family's output scaling) with the same score,
    the same start and the same noise (both drawn from the same numpy generators; torch takes them in float32).
    Each score evaluation and each noise draw is one float32 rounding on the torch side, of values at most the
    prior's std; the Gaussian score contracts (x + step s(x) moves an error by a factor < 1), so the errors
    add up: (evaluations + draws) x 8 roundings x U32 x (1 + prior std)."""
    fam = score_family(sde, *model)
    ve = fam.sde.ve
    score = GaussianScore(fam, 0.5 if ve else 0.0, 0.01 if ve else 0.09)
    spec = fam.onnx_sampler({})
    assert spec["sampler"] == sampler and spec["sample_eps"] == SAMPLE_EPS[sde]
    shape, n = tuple(spec["shape"]), spec["steps"]
    ex = Graphs(spec, lambda x, t: score(x, t))
    got = sample_onnx.sample_score(ex, rngs(4), np.arange(4), SimpleNamespace(sampler=None, steps=None, step_size=None))
    score.evals = 0

    mirror = rngs(4)  # the same generators: the torch side draws what the numpy port draws, in the same order
    draws = [0]

    def noise():
        draws[0] += 1
        return torch.from_numpy(sample_onnx._normal(mirror, shape)).float()

    with torch.no_grad():
        if sampler == "langevin":
            x0 = torch.from_numpy(np.stack([r.random(shape) for r in mirror])).float()
            x = fam.sde.langevin(score, x0, noise, n, fam.cfg.step_size, fam._n_steps("langevin"))
        else:
            x = fam.sde.pc(score, noise() * fam.sde.prior_std(), noise, n, fam._n_steps("pc"))
    want = fam.from_model(x).double().numpy()
    tol = (score.evals + draws[0]) * 8 * U32 * (1 + fam.sde.prior_std())
    assert np.abs(got - want).max() <= tol
    assert np.abs(want).max() > 0.05 and (np.abs(want) < 1).mean() > 0.5  # images, mostly inside the clip


# ---------------------------------------------------------------- EDM's and flow's ODE samplers

ODE_CASES = [("edm", dict(s_churn=10.0, s_min=0.05, s_max=50.0, sample_steps=4), ("heun", "euler", "dpmpp_2m")),
             ("flow", dict(flow_shift=3.0, sample_steps=4), ("euler", "heun"))]


@pytest.mark.parametrize("form,model,samplers", ODE_CASES, ids=[c[0] for c in ODE_CASES])
def test_ode_sampler_ports_equal_torch(form, model, samplers, monkeypatch):
    """sample_onnx.sample_edm / sample_flow == the family's sample (karras.py's samplers, classifier-free guided,
    EDM with churn) on the family's own ONNX graph module run in torch, from the same noise: the start and the
    churn's draws come from the same numpy generators on both sides (torch takes them in float32). The bound
    2e-4 on images on [-1, 1]: float32 roundings of values up to sigma_max |noise| on the torch side, divided by
    the next sigma in Heun's correction (tests/test_ode_exports.py's note); a wrong grid, order or weight is off
    by more than 1e-2."""
    import diffusers.utils.torch_utils as tu

    from distgen.config.core import build_dataclass
    from distgen.config.models import DiffusionConfig
    from distgen.families.diffusion import Diffusion

    cfg = build_dataclass(DiffusionConfig, {"family": "diffusion", "preset": "tiny", "formulation": form,
                                            "class_conditional": True, "guidance_scale": 2.0, **model}, "model")
    fam = Diffusion(cfg, DataInfo(8, 1, 3))
    torch.manual_seed(0)
    nets = {k: v.eval().requires_grad_(False) for k, v in fam.build_networks().items()}
    graph = fam.onnx_graphs(nets)[0]
    spec = fam.onnx_sampler(nets)
    ex = Graphs(spec, graph.module)
    port = {"edm": sample_onnx.sample_edm, "flow": sample_onnx.sample_flow}[form]
    idx, outs = np.arange(3), []
    for sampler in samplers:
        got = port(ex, rngs(3), idx, SimpleNamespace(sampler=sampler, steps=None, guidance=None, labels=None))
        mirror = rngs(3)
        monkeypatch.setattr(tu, "randn_tensor", lambda shape, generator=None, device=None, dtype=None:
                            torch.from_numpy(sample_onnx._normal(mirror, tuple(shape[1:]))).float())
        with torch.no_grad():
            want = fam.sample(nets, [None] * 3, labels=torch.tensor(idx % 3), sampler=sampler).numpy()
        assert np.abs(got - want).max() <= 2e-4, sampler
        outs.append(got)
    assert min(np.abs(a - b).max() for a, b in zip(outs, outs[1:])) > 1e-2  # the samplers (and churn) differ
