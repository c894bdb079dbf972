"""FFJORD: the likelihood against known answers (exact trace against many-probe Hutchinson, the change of
variables of linear dynamics in closed form, in the evaluation solver and in training's torchdiffeq solve),
sampling per image, refusals naming the field or flag, and training as users run it (2 processes with an
exact resume and the adjoint, sampling alike with 1 or 2 processes, export and bits/dim from the CLI)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distgen.cli import main as cli_main
from distgen.config import load_config
from distgen.config.core import ConfigError
from distgen.families.base import DataInfo
from distgen.families.ffjord import FFJORDFamily
from distgen.families.ode import exact_divergence, hutchinson_divergence, per_image
from distgen.sample import SampleError, likelihood_options, load_ema
from test_likelihood import _bpd_direct
from test_train import family_config, launch, run


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def family(res: int = 8, **model) -> FFJORDFamily:
    cfg = load_config(None, ["model.family=ffjord", "model.preset=tiny", f"data.resolution={res}",
                             *[f"model.{k}={v}" for k, v in model.items()]])
    return FFJORDFamily(cfg.model, DataInfo(res, 1, 0))


def random_flow(fam: FFJORDFamily, seed: int = 0, scale: float = 0.3):
    """The family's network with its zero-initialised last layers drawn at random: not the identity."""
    torch.manual_seed(seed)
    net = fam.build_networks()["ffjord"].eval()
    with torch.no_grad():
        for cnf in net.cnfs:
            for p in cnf.net.layers[-1].parameters():
                p.normal_(0, scale)
    return net


class Linear(torch.nn.Module):
    """f(z, t) = A z over the flattened image: the flow is exp(t A), its log-determinant t tr(A)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = torch.nn.Parameter(a)

    def forward(self, t, z):
        return (z.flatten(1) @ self.a.T.to(z.dtype)).view_as(z)


# ---------------------------------------------------------------- the likelihood

def test_exact_trace_and_many_probe_hutchinson_agree():
    """A random two-scale flow on 4x4 images: the divergence of f at a point, exactly and as the mean of 4000
    single-probe estimates (5 standard errors); then the whole log-density with the exact trace against the
    mean of 300 single-probe Hutchinson solves of the same y (the path z(t) does not depend on the probe, so
    the estimate is v^T (int J dt) v, unbiased for the exact integral; 5 standard errors)."""
    fam = family(res=4, scales=2)
    net = random_flow(fam)
    f = net.cnfs[0].net
    x, t = torch.rand(1, 1, 4, 4), torch.tensor([0.4])
    n = 4000
    xs = x.expand(n, -1, -1, -1).clone().requires_grad_(True)
    probes = per_image("rademacher", [torch.Generator().manual_seed(i) for i in range(n)], (1, 1, 4, 4), "cpu")
    est = hutchinson_divergence(f(t, xs), xs, probes).detach().double()
    x1 = x.clone().requires_grad_(True)
    exact = float(exact_divergence(f(t, x1), x1))
    jac = torch.autograd.functional.jacobian(lambda y: f(t, y.view(1, 1, 4, 4)).flatten(), x.flatten())
    assert exact == pytest.approx(float(torch.trace(jac)), abs=1e-5)
    assert est.std() > 0.05 and abs(est.mean().item() - exact) < 5 * est.std().item() / math.sqrt(n)

    m = 300
    y = torch.rand(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 0.8 + 0.1
    kw = dict(estimator="rademacher", rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        want = float(net.log_prob_per_image(y, [torch.Generator()], trace="exact", probes=1, **kw))
        got = net.log_prob_per_image(y.expand(m, -1, -1, -1), [torch.Generator().manual_seed(i) for i in range(m)],
                                     trace="hutchinson", probes=1, **kw)
    assert got.std() > 0.01  # the probes matter: the agreement below is not trivial
    assert abs(got.mean().item() - want) < 5 * got.std().item() / math.sqrt(m), (got.mean(), want, got.std())


def test_linear_dynamics_give_the_closed_form_density_in_evaluation_training_and_sampling():
    """f(z, t) = A z on 4x4 images (one scale, one block, T = 0.7): z(T) = exp(T A) w and
    log p(y) = log N(exp(T A) w; 0, I) + T tr(A) + log |dw/dy| for the logit w of y. The per-image solver
    (exact trace, and Hutchinson, which is v^T A v T for each probe v of the image's generator), the training
    forward (torchdiffeq, its probe from the step's generator) and sampling (exp(-T A) z) all match."""
    fam = family(res=4, scales=1, blocks=1, time_length=0.7, alpha=0.01)
    net = fam.build_networks()["ffjord"]
    a = torch.randn(16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.25
    net.cnfs[0].net = Linear(a.float())
    T, n = 0.7, 5
    y = torch.rand(n, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    w, logdet = net.to_logit(y)
    z = w.flatten(1) @ torch.linalg.matrix_exp(T * a).T
    closed = (-0.5 * (math.log(2 * math.pi) + z ** 2)).sum(1) + T * torch.trace(a) + logdet
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(n)]  # noqa: E731
    kw = dict(estimator="rademacher", rtol=1e-8, atol=1e-8)
    with torch.no_grad():
        exact = net.log_prob_per_image(y, gens(), trace="exact", probes=1, **kw)
        hutch = net.log_prob_per_image(y, gens(), trace="hutchinson", probes=3, **kw)
    assert torch.allclose(exact, closed, atol=1e-4), exact - closed
    v = per_image("rademacher", gens(), (3, 16), "cpu").double()
    quad = torch.einsum("bki,ij,bkj->b", v, a, v) / 3
    assert not torch.allclose(quad, torch.trace(a).expand(n), atol=1e-3)  # the probes' own error, matched exactly
    assert torch.allclose(hutch, closed - T * torch.trace(a) + T * quad, atol=1e-4), hutch - closed

    g = torch.Generator().manual_seed(3)
    logp, kinetic, jacobian = net(y.float(), g, estimator="gaussian", rtol=1e-6, atol=1e-6)
    eps = torch.randn((n, 1, 4, 4), generator=torch.Generator().manual_seed(3)).flatten(1).double()
    train_closed = closed - T * torch.trace(a) + T * torch.einsum("bi,ij,bj->b", eps, a, eps)
    assert torch.allclose(logp.double(), train_closed, atol=1e-3), logp.double() - train_closed
    # RNODE's integrals: int |A z(t)|^2 dt / D and int |eps^T A|^2 dt / D
    ts = torch.linspace(0, T, 2001, dtype=torch.float64)
    ke = torch.stack([((w.flatten(1) @ torch.linalg.matrix_exp(s * a).T) @ a.T).pow(2).sum(1) for s in ts]) / 16
    assert torch.allclose(kinetic.double(), torch.trapezoid(ke, ts, dim=0), rtol=1e-3)
    assert torch.allclose(jacobian.double(), T * (eps @ a).pow(2).sum(1) / 16, rtol=1e-3)
    assert net.last_nfe > 0

    fam_nets = {"ffjord": net}
    gens2 = [torch.Generator().manual_seed(20 + i) for i in range(n)]
    x = fam.sample(fam_nets, gens2, temperature=0.5)
    e = per_image("randn", [torch.Generator().manual_seed(20 + i) for i in range(n)], (1, 4, 4), "cpu").double()
    w_back = (0.5 * e.flatten(1)) @ torch.linalg.matrix_exp(-T * a).T
    y_back = net.from_logit(w_back.view(n, 1, 4, 4))
    diff = (((x.double() + 1) * 127.5).round() - torch.floor(y_back * 256).clamp(0, 255)).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.9  # a pixel may sit on a cell's edge


def test_an_image_depends_on_its_own_generator_only():
    fam = family(scales=2)
    nets = {"ffjord": random_flow(fam)}
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    three, one = fam.sample(nets, gens([4, 5, 6])), fam.sample(nets, gens([5]))
    assert three.shape == (3, 1, 8, 8) and three.min() >= -1 and three.max() <= 1
    assert torch.allclose(three[1:2], one, atol=1e-4) and not torch.allclose(three[0], three[1])
    images = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        lp3 = fam.log_likelihood(nets, images, None, gens([4, 5, 6]), probes=2)
        lp1 = fam.log_likelihood(nets, images[1:2], None, gens([5]), probes=2)
    assert torch.allclose(lp3[1:2], lp1, atol=1e-4, rtol=0)


def test_bad_values_are_refused_naming_the_field():
    base = ["model.family=ffjord"]
    for extra, field in ((["model.scales=0"], "model.scales"), (["model.blocks=0"], "model.blocks"),
                         (["model.hidden=0"], "model.hidden"), (["model.rtol=0"], "model.rtol"),
                         (["model.atol=1.5"], "model.atol"), (["model.time_length=0"], "model.time_length"),
                         (["model.kinetic_energy=-1"], "model.kinetic_energy"),
                         (["model.jacobian_norm=-0.1"], "model.jacobian_norm"), (["model.alpha=0.5"], "model.alpha"),
                         (["model.probes=0"], "model.probes"), (["model.temperature=-1"], "model.temperature"),
                         (["model.trace_estimator=normal"], "model.trace_estimator"),
                         (["model.trace=approx"], "model.trace"), (["model.activation=relu"], "model.activation")):
        with pytest.raises(ConfigError) as e:
            load_config(None, base + extra)
        assert str(e.value).startswith(f"{field}:"), str(e.value)
    with pytest.raises(ConfigError, match=r"^model.scales: 3 scale\(s\) halve the image 2 time\(s\), so "
                                          r"data.resolution must be a multiple of 4, got 30"):
        family(res=30, scales=3)
    fam = family()
    assert likelihood_options(fam, {"probes": 4, "trace": None, "iw_samples": None}) == {"trace": "hutchinson",
                                                                                         "probes": 4}
    assert likelihood_options(fam, {}) == {"trace": "hutchinson", "probes": 1}
    assert likelihood_options(fam, {"trace": "exact"}) == {"trace": "exact"}
    for options, flag in (({"trace": "exact", "probes": 2}, "--probes: the exact trace takes no probes"),
                          ({"probes": 0}, "--probes: must be >= 1"), ({"iw_samples": 2}, "likelihood takes no option")):
        with pytest.raises(SampleError) as e:
            likelihood_options(fam, options)
        assert flag in str(e.value), str(e.value)
    assert "double backward" in fam.compile_problem("ffjord")
    assert "double backward" in fam.engine_problem(3) and "odeint_adjoint" in family(adjoint=True).engine_problem(3)
    assert fam.engine_problem(1) is None and fam.engine_problem(2) is None


# ---------------------------------------------------------------- training as users run it

def ffjord_config(tmp_path, manifest, model=None, **over):
    """A tiny two-scale FFJORD on Fashion-MNIST at 8x8, 10 steps of 4 images per process, loose tolerances,
    the adjoint and RNODE's regularisers on."""
    sections = {"model": {"family": "ffjord", "preset": "tiny", "rtol": 0.01, "atol": 0.01, "adjoint": True,
                          "kinetic_energy": 0.01, "jacobian_norm": 0.01, **(model or {})},
                "data": {"resolution": 8, "resize": "stretch", "workers": 0},
                "train": {"batch_size": 4, "total_kimg": 0.08, "log_every": 5, "checkpoint_every": 5,
                          "sample_every": 0, "sample_num": 4},
                "ema": {"halflife_kimg": [0.05], "rampup": None}}
    return family_config(tmp_path, manifest, sections, over)


@pytest.mark.e2e
def test_training_logs_its_solves_exports_samples_alike_and_scores_bits_per_dim(tmp_path, fm_test_shards, env):
    """10 steps (its exact resume with 2 processes is test_resume's), the function evaluations logged; the export
    samples the same images with 1 and 2 processes; `distgen eval --metrics bpd` gives the direct sum over a small
    test split with the exact trace and with Hutchinson's 2 probes."""
    assert cli_main(["train", str(ffjord_config(tmp_path, fm_test_shards)), "train.max_steps=10"]) == 0
    run_dir = tmp_path / "run"
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [5, 10] and all(math.isfinite(r["loss"]) for r in recs)
    # every step solves 3 blocks (tiny: 8x8, after the squeeze, the last scale), each >= 2 evaluations choosing
    # torchdiffeq's first step and 6 per dopri5 step
    assert all(r["nll/nfe"] >= 24 and r["nll/bpd"] > 0 and r["nll/kinetic"] > 0 for r in recs), recs
    assert (run_dir / "samples" / "step-00000010.png").is_file()

    out = tmp_path / "export"
    assert cli_main(["export", str(run_dir), str(out)]) == 0
    assert (out / "ffjord.safetensors").is_file() and (out / "ffjord_config.json").is_file()
    assert cli_main(["sample", str(out), "--num", "9", "--seed", "2", "--out", str(tmp_path / "one.npz")]) == 0
    run(launch(2) + ["sample", str(out), "--num", "9", "--seed", "2", "--out", str(tmp_path / "two.npz")], env)
    one, two = np.load(tmp_path / "one.npz")["x"], np.load(tmp_path / "two.npz")["x"]
    assert one.shape == (9, 8, 8, 1) and np.array_equal(one, two) and len({i.tobytes() for i in one}) == 9

    from PIL import Image

    from distgen.data import write_shards
    from test_eval import _fm_images

    x, _ = _fm_images(6, offset=500)
    xs = np.stack([np.asarray(Image.fromarray(i).resize((8, 8))) for i in x])
    np.savez(tmp_path / "t.npz", x=xs, y=np.zeros(6, dtype=np.int64))
    write_shards(f"npz:{tmp_path / 't.npz'}", tmp_path / "t", "test", samples_per_shard=4)
    fam, nets, _ = load_ema(out)
    got = {}
    for trace, extra in (("exact", []), ("hutchinson", ["--probes", "2"])):
        res = tmp_path / f"bpd-{trace}.json"
        assert cli_main(["eval", str(out), "--metrics", "bpd", "--test", str(tmp_path / "t" / "test.manifest.json"),
                         "--trace", trace, *extra, "--out", str(res)]) == 0
        got[trace] = json.loads(res.read_text())
        assert got[trace]["bpd_images"] == 6 and got[trace]["bpd_kind"] == "bound"
        assert got[trace]["bpd_trace"] == trace
        with torch.no_grad():
            want = _bpd_direct(fam, nets, xs[..., None], None, per_shard=4, trace=trace,
                               **({"probes": 2} if extra else {}))
        assert got[trace]["bpd"] == pytest.approx(want, rel=1e-6) and 0 < want < 30
    assert got["hutchinson"]["bpd_probes"] == 2 and "bpd_probes" not in got["exact"]
    # The same images, the same dequantisation: the two differ by Hutchinson's error alone, bounded from the
    # exported weights. Block b (D_b dimensions, time T_b) adds tr M, M = int_0^T_b J dt along a path z(t) no probe
    # changes; a Rademacher probe v gives v^T M v, of variance 2 sum_{i != j} S_ij^2 <= 2 ||M||_F^2 <= 2 D_b ||M||_2^2
    # (S = (M + M^T) / 2), and ||M||_2 <= T_b L_b, L_b a Lipschitz constant of the dynamics in z: the product over
    # its layers of (sum over kernel taps of ||W_tap||_2) x (largest gate sigmoid(a t + b) on [0, T_b]); softplus
    # is 1-Lipschitz, the time terms do not depend on z. With 2 probes an image and block, bits/dim (the mean over
    # n images of D = 64 dimensions) has a standard deviation <= sqrt(n sum_b D_b (T_b L_b)^2) / (n D ln 2), and
    # by Chebyshev a correct estimator lands beyond 10 of them for at most 1% of probe draws. The solves' own
    # error at rtol 0.01 is left out: dynamics with T_b L_b < 0.1 barely move z (against rtol 1e-8, ~1e-9 here).
    net, shape, k, var = nets["ffjord"], (1, 8, 8), 0, 0.0
    for op in net.plan:
        if op == "squeeze":
            shape = (shape[0] * 4, shape[1] // 2, shape[2] // 2)
        elif op == "split":
            shape = (shape[0] // 2, *shape[1:])
        else:
            cnf, lip = net.cnfs[k], 1.0
            assert cnf.net.layers[0].conv.in_channels == shape[0]
            for layer in cnf.net.layers:
                w, a, b = (t.detach().double() for t in (layer.conv.weight, layer.gate.weight[:, 0], layer.gate.bias))
                taps = sum(torch.linalg.matrix_norm(w[:, :, i, j], 2)
                           for i in range(w.shape[2]) for j in range(w.shape[3]))
                lip *= float(taps) * float(torch.sigmoid(torch.maximum(b, a * cnf.time_length + b)).max())
            assert cnf.time_length * lip < 0.1
            var, k = var + math.prod(shape) * (cnf.time_length * lip) ** 2, k + 1
    sd = math.sqrt(len(xs) * var) / (len(xs) * 64 * math.log(2))
    assert k == len(net.cnfs) and abs(got["exact"]["bpd"] - got["hutchinson"]["bpd"]) <= 10 * sd, (got, sd)


def test_the_adjoint_gives_the_gradients_of_backpropagation_through_the_solver():
    """The training loss (bits/dim and both RNODE terms) of a random two-scale flow: odeint_adjoint's gradients
    are those of backpropagating through dopri5's steps, to the solvers' tolerance."""
    fam = family(res=4, kinetic_energy=0.1, jacobian_norm=0.1)
    net = random_flow(fam)
    y = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    grads = []
    for adjoint in (False, True):
        net.zero_grad()
        logp, ke, jf = net(y, torch.Generator().manual_seed(2), rtol=1e-7, atol=1e-7, adjoint=adjoint)
        (-logp + 0.1 * ke + 0.1 * jf).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert grads[0].abs().max() > 0.1
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-4), (grads[0] - grads[1]).abs().max()
