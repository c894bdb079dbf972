"""FFJORD (Grathwohl et al. 2019): a multiscale continuous normalising flow with free-form dynamics.

Each CNF block moves its input along dz/dt = f(z, t) for t in [0, T], f a stack of concatsquash
convolutions (a convolution whose output is gated and shifted by functions of t). By the instantaneous
change of variables, log p(z(0)) = log p(z(T)) + int_0^T tr(df/dz) dt. The multiscale architecture is
FFJORD's (after RealNVP / Glow): ``scales`` levels, each ``blocks`` CNFs on the image, then (all but the
last) a squeeze (2x2 pixels -> 4x channels), ``blocks`` CNFs more, and half the channels factored out to the
N(0, I) prior; the last level's output gets the prior too.

Pixels are dequantised uniformly, y = (x + u) / 256 on [0, 1], then taken through the logit transform
w = logit(alpha + (1 - 2 alpha) y) (FFJORD's alpha = 1e-6 on MNIST), whose Jacobian enters the density:
log P(x) >= log p(w) + log |dw/dy| - D log 256, the bits/dim bound (``bpd_kind: bound``).

Training solves a batch with torchdiffeq's dopri5 (``odeint``, or ``odeint_adjoint`` with ``model.adjoint``)
and estimates the trace by Hutchinson's estimator with one Gaussian or Rademacher probe per image and block
held through the solve, a vector-Jacobian product per function evaluation. RNODE's regularisers (Finlay et
al. 2020) integrate |f|^2 (kinetic energy) and |eps^T df/dz|^2 (a Jacobian Frobenius-norm estimate) along
the same solve; both make the dynamics simpler and the solver's steps fewer.

Evaluation and sampling use the per-image Dormand-Prince solver of :mod:`distgen.families.ode` instead:
torchdiffeq steps a whole batch with one step size (chosen by its worst image), so a log-likelihood or a
sample would depend on the batch around the image and on the number of processes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distgen.config.core import ConfigError
from distgen.config.models import FFJORDConfig
from distgen.families.base import DataInfo, Family, Phase, load_module, save_module
from distgen.families.capabilities import ExportsOnnx, Likelihood, OnnxGraph
from distgen.families.glow import squeeze, unsqueeze
from distgen.families.ode import dequantize, exact_divergence, hutchinson_divergence, per_image, rk45

LOG2PI = math.log(2 * math.pi)

# scales, CNF blocks per stage, the dynamics' width and hidden layers.
# paper: FFJORD's multiscale MNIST / CIFAR-10 model (dims 64,64,64, 2 blocks; 0.99 / 3.40 bits/dim).
PRESETS: dict[str, dict] = {
    "tiny": dict(scales=2, blocks=1, hidden=8, layers=1),
    "small": dict(scales=2, blocks=1, hidden=32, layers=2),
    "paper": dict(scales=3, blocks=2, hidden=64, layers=3),
}
# dopri5's rtol = atol by preset: the paper's 1e-5; looser for the CPU presets, where a tight solve costs
# several times the function evaluations (the bits/dim are then a solver-error-limited estimate).
TOLERANCES = {"tiny": 1e-3, "small": 1e-3, "paper": 1e-5}


class ConcatSquashConv2d(nn.Module):
    """conv(x) * sigmoid(a t + b) + c t, per output channel (FFJORD's ConcatSquashConv2d). ``t`` is a
    scalar or one time per image."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
        self.gate = nn.Linear(1, cout)
        self.shift = nn.Linear(1, cout, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(-1, 1).to(x.dtype)
        return self.conv(x) * torch.sigmoid(self.gate(tt))[:, :, None, None] + self.shift(tt)[:, :, None, None]


class Dynamics(nn.Module):
    """f(z, t): ``layers`` hidden concatsquash convolutions of ``hidden`` channels and one back to ``channels``,
    a smooth activation between (FFJORD's ODEnet with strides 1). The last layer starts at zero: each block
    starts as the identity, whose solve takes the fewest steps."""

    def __init__(self, channels: int, hidden: int, layers: int, activation: str):
        super().__init__()
        widths = [channels] + [hidden] * layers + [channels]
        self.layers = nn.ModuleList(ConcatSquashConv2d(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = F.softplus if activation == "softplus" else torch.tanh
        last = self.layers[-1]
        for p in (last.conv.weight, last.conv.bias, last.shift.weight):
            nn.init.zeros_(p)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


class CNF(nn.Module):
    """One CNF block. As torchdiffeq's ODE function (``forward(t, states)``) it carries the augmented state
    (z, -int div, int |f|^2 / D, int |eps^T J|^2 / D) with the probe ``eps`` set by :meth:`integrate`."""

    def __init__(self, channels: int, hidden: int, layers: int, activation: str, time_length: float):
        super().__init__()
        self.net = Dynamics(channels, hidden, layers, activation)
        self.time_length = time_length
        self.eps = None
        self.nfe = 0  # function evaluations since the last integrate (forward; with the adjoint, backward too)

    def forward(self, t, states):
        z = states[0]
        self.nfe += 1
        graph = torch.is_grad_enabled()  # off in the adjoint's forward solve, which keeps no graph
        with torch.enable_grad():
            if not (graph and z.requires_grad):  # the data, or the adjoint's forward solve: a leaf to differentiate
                z = z.detach().requires_grad_(True)
            dz = self.net(t, z)
            # create_graph: the loss differentiates the divergence in the weights (a double backward)
            (vjp,) = torch.autograd.grad(dz, z, self.eps, create_graph=graph)
        if not graph:
            dz = dz.detach()
        d = z[0].numel()
        div = (vjp * self.eps).flatten(1).sum(1)
        return dz, -div, dz.pow(2).flatten(1).sum(1) / d, vjp.pow(2).flatten(1).sum(1) / d

    def integrate(self, z, eps, rtol: float, atol: float, adjoint: bool):
        """(z(T), -int div, kinetic, jacobian) from z(0) = z for the whole batch (torchdiffeq's dopri5)."""
        from torchdiffeq import odeint, odeint_adjoint

        self.eps, self.nfe = eps, 0
        zero = z.new_zeros(len(z))
        t = torch.tensor([0.0, self.time_length], device=z.device, dtype=z.dtype)
        solve = odeint_adjoint if adjoint else odeint
        out = solve(self, (z, zero, zero, zero), t, rtol=rtol, atol=atol, method="dopri5")
        return tuple(o[-1] for o in out)


class FFJORD(nn.Module):
    """log p(y) of images y on [0, 1] (the logit transform, then the multiscale CNF, then N(0, I))."""

    # FSDP2 gathers these weights in float32 under bf16 / fp16 (distgen.engines_fsdp.half_weights_problem)
    float32_forward = "its ODE solves run in float32 whatever the run's precision"

    def __init__(self, channels: int = 1, resolution: int = 28, scales: int = 2, blocks: int = 2, hidden: int = 64,
                 layers: int = 3, activation: str = "softplus", time_length: float = 1.0, alpha: float = 1e-6):
        super().__init__()
        if resolution % 2 ** (scales - 1):
            raise ValueError(f"resolution {resolution} does not halve {scales - 1} times")
        self.alpha = alpha
        self.cnfs = nn.ModuleList()
        self.plan: list[str] = []  # "cnf", "squeeze" or "split", in the data -> noise direction
        self.cnf_shapes: list[tuple[int, int, int]] = []
        self.z_shapes: list[tuple[int, int, int]] = []  # the factored-out latents, then the last level's
        c, r = channels, resolution

        def cnfs():
            for _ in range(blocks):
                self.cnfs.append(CNF(c, hidden, layers, activation, time_length))
                self.cnf_shapes.append((c, r, r))
                self.plan.append("cnf")

        for i in range(scales):
            cnfs()
            if i < scales - 1:
                c, r = c * 4, r // 2
                self.plan.append("squeeze")
                cnfs()
                self.plan.append("split")
                self.z_shapes.append((c - c // 2, r, r))
                c = c // 2
        self.z_shapes.append((c, r, r))

    # -- the logit transform (FFJORD's LogitTransform) and the prior
    def to_logit(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w = logit(alpha + (1 - 2 alpha) y) and log |dw/dy| per image."""
        s = self.alpha + (1 - 2 * self.alpha) * y
        w = torch.log(s) - torch.log1p(-s)
        return w, (math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)

    def from_logit(self, w: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(w) - self.alpha) / (1 - 2 * self.alpha)

    @staticmethod
    def prior_logp(zs) -> torch.Tensor:
        return sum((-0.5 * (LOG2PI + z ** 2)).flatten(1).sum(1) for z in zs)

    # -- training: the batch through torchdiffeq
    def forward(self, y: torch.Tensor, generator: torch.Generator, *, estimator: str = "rademacher",
                rtol: float = 1e-5, atol: float = 1e-5, adjoint: bool = False):
        """(log p(y), kinetic energy, Jacobian norm) per image, each probe drawn from ``generator``; the
        function evaluations of the solves are left in ``self.last_nfe``."""
        # float32 whatever the run's precision: a bf16 f would make the adaptive solver crawl
        with torch.autocast(y.device.type, enabled=False):
            h, delta = self.to_logit(y.float())
            kinetic = jacobian = h.new_zeros(len(h))
            zs, nfe, k = [], 0, 0
            for op in self.plan:
                if op == "cnf":
                    if estimator == "rademacher":
                        eps = torch.randint(0, 2, h.shape, generator=generator, device=h.device).to(h.dtype) * 2 - 1
                    else:
                        eps = torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
                    cnf = self.cnfs[k]
                    h, minus_int_div, ke, jf = cnf.integrate(h, eps, rtol, atol, adjoint)
                    delta, kinetic, jacobian = delta - minus_int_div, kinetic + ke, jacobian + jf
                    nfe, k = nfe + cnf.nfe, k + 1
                elif op == "squeeze":
                    h = squeeze(h)
                else:
                    half = h.shape[1] // 2
                    h, z = h[:, :half], h[:, half:]
                    zs.append(z)
            self.last_nfe = nfe
            return self.prior_logp(zs + [h]) + delta, kinetic, jacobian

    # -- evaluation and sampling: each image its own solver steps
    def log_prob_per_image(self, y: torch.Tensor, generators: list[torch.Generator], *, trace: str, probes: int,
                           estimator: str, rtol: float, atol: float) -> torch.Tensor:
        """log p(y) per image (float64), y float64 on [0, 1]. ``trace`` exact: the divergence by one backward
        pass per dimension; hutchinson: the mean over ``probes`` probes per image and block, drawn from the
        image's generator block by block and held through the block's solve."""
        h, delta = self.to_logit(y)
        zs, k = [], 0
        for op in self.plan:
            if op == "squeeze":
                h = squeeze(h)
                continue
            if op == "split":
                half = h.shape[1] // 2
                h, z = h[:, :half], h[:, half:]
                zs.append(z)
                continue
            net, shape = self.cnfs[k].net, h.shape[1:]
            d = h[0].numel()
            v = per_image(estimator, generators, (probes, *shape), h.device) if trace == "hutchinson" else None

            def f(state, t, rows, net=net, shape=shape, d=d, v=v):
                with torch.enable_grad():
                    x = state[:, :d].view(-1, *shape).float().requires_grad_(True)
                    dz = net(t.float(), x)
                    div = exact_divergence(dz, x) if v is None else hutchinson_divergence(dz, x, v[rows])
                return torch.cat([dz.detach().double().flatten(1), div.detach().double()[:, None]], 1)

            out = rk45(f, torch.cat([h.flatten(1), h.new_zeros(len(h), 1)], 1), 0.0, self.cnfs[k].time_length,
                       rtol, atol=atol, what="an FFJORD block (model.rtol / model.atol)")
            h, delta = out[:, :d].view(-1, *shape), delta + out[:, d]
            k += 1
        return self.prior_logp(zs + [h]) + delta

    def decode(self, eps: list[torch.Tensor], *, temperature: float, rtol: float, atol: float) -> torch.Tensor:
        """y on [0, 1] from standard normals shaped like ``z_shapes`` (scaled by ``temperature``): each block
        solved backwards from T to 0, image by image."""
        zs = [temperature * e.double() for e in eps]
        h, k, split = zs[-1], len(self.cnfs), len(zs) - 1
        for op in reversed(self.plan):
            if op == "split":
                split -= 1
                h = torch.cat([h, zs[split]], 1)
            elif op == "squeeze":
                h = unsqueeze(h)
            else:
                k -= 1
                net, shape = self.cnfs[k].net, h.shape[1:]

                def f(state, t, rows, net=net, shape=shape):
                    return net(t.float(), state.view(-1, *shape).float()).double().flatten(1)

                h = rk45(f, h.flatten(1), self.cnfs[k].time_length, 0.0, rtol, atol=atol,
                         what="an FFJORD block (model.rtol / model.atol)").view(-1, *shape)
        return self.from_logit(h)


# ---------------------------------------------------------------- the family

class FFJORDFamily(Family, Likelihood, ExportsOnnx):
    name = "ffjord"
    config_cls = FFJORDConfig
    likelihood = "bound"  # uniform dequantisation: E[log p(y)] - D log 256 <= log P(x)
    EXPORT = "ffjord"
    progress_scalars = ("nll/bpd", "nll/nfe")

    def __init__(self, cfg: FFJORDConfig, data: DataInfo):
        super().__init__(cfg, data)
        scales = self.net_kwargs()["scales"]
        if data.resolution % 2 ** (scales - 1):
            raise ConfigError(f"model.scales: {scales} scale(s) halve the image {scales - 1} time(s), so "
                              f"data.resolution must be a multiple of {2 ** (scales - 1)}, got {data.resolution}")
        self.rtol = cfg.rtol or TOLERANCES[cfg.preset]
        self.atol = cfg.atol or TOLERANCES[cfg.preset]

    def net_kwargs(self) -> dict:
        kw = dict(PRESETS[self.cfg.preset])
        kw.update({k: getattr(self.cfg, k) for k in ("scales", "blocks", "hidden", "layers") if getattr(self.cfg, k)})
        return dict(channels=self.data.channels, resolution=self.data.resolution, activation=self.cfg.activation,
                    time_length=self.cfg.time_length, alpha=self.cfg.alpha, **kw)

    def build_networks(self):
        return {"ffjord": FFJORD(**self.net_kwargs())}

    def phases(self):
        return [Phase("nll", "ffjord")]

    def engine_problem(self, zero_stage):
        if zero_stage == 3 and self.cfg.adjoint:
            return ("odeint_adjoint (model.adjoint) solves for the weights' gradients in its own backward pass, "
                    "reading weights that ZeRO-3 has partitioned away (size-0 storage); use ZeRO-1 or ZeRO-2")
        if zero_stage == 3:
            return ("FFJORD's loss differentiates Hutchinson's vector-Jacobian product (a double backward), whose "
                    "convolutions need weights that ZeRO-3 has already released (a size-0 weight in the backward); "
                    "use ZeRO-1 or ZeRO-2")
        return None

    def shard_blocks(self, network, module):
        # FSDP2 shards the whole network as one unit: one all-gather around FFJORD's forward and one around its
        # backward, however many steps the solver takes. A CNF block as a unit gathers (and reduces) at every
        # function evaluation, whose number differs between ranks (their images differ): the collectives went out
        # of step (150 vs 162 evaluations, gloo "Received data size doesn't match expected size"). And
        # odeint_adjoint takes a block's parameters before the block's forward: as a unit, sharded DTensors ("got
        # mixed torch.Tensor and DTensor" in its backward solve); inside the network's unit they are the gathered
        # weights the solves read, whose gradients it returns to FSDP2's reduce-scatter (tests/scripts/fsdp_twice.py)
        return []

    def flops_problem(self):
        return "FFJORD's adaptive ODE solver takes as many steps as the learned dynamics need, which vary as it trains"

    def compile_problem(self, network):
        return "FFJORD's loss differentiates Hutchinson's vector-Jacobian product in the weights (a double backward)"

    def loss(self, ctx, nets, batch, generator):
        x = batch["image"]
        u = torch.rand(x.shape, device=x.device, generator=generator)
        y = (((x.float() + 1) * 127.5).round() + u) / 256  # back onto the 256-value grid, then dequantised
        logp, kinetic, jacobian = nets["ffjord"](y, generator, estimator=self.cfg.trace_estimator, rtol=self.rtol,
                                                 atol=self.atol, adjoint=self.cfg.adjoint)
        dims = x[0].numel()
        bpd = -(logp - dims * math.log(256)) / (dims * math.log(2))
        loss = bpd + self.cfg.kinetic_energy * kinetic + self.cfg.jacobian_norm * jacobian
        # nfe: the forward solves' function evaluations, all blocks (what makes a CNF step slow)
        return loss, {"bpd": bpd.detach().mean(), "nfe": float(nets.raw["ffjord"].last_nfe),
                      "kinetic": kinetic.detach().mean(), "jacobian": jacobian.detach().mean()}

    likelihood_options = ("probes", "trace")

    def check_likelihood_options(self, options):
        given = super().check_likelihood_options(options)
        if given.get("trace") not in (None, "hutchinson", "exact"):
            raise ValueError(f"--trace: hutchinson or exact, got {given['trace']}")
        if given.get("probes") is not None and given["probes"] < 1:
            raise ValueError(f"--probes: must be >= 1, got {given['probes']}")
        trace = given.get("trace") or self.cfg.trace
        if given.get("probes") is not None and trace == "exact":
            raise ValueError("--probes: the exact trace takes no probes (--trace hutchinson estimates with probes)")
        # the defaults filled in, so that every bits/dim record states how its trace was taken (bpd_trace,
        # bpd_probes)
        if trace == "exact":
            return {"trace": trace}
        return {"trace": trace, "probes": given.get("probes") or self.cfg.probes}

    def log_likelihood(self, nets, images, labels, generators, probes=None, trace=None):
        """log p(x) in nats per image, a stochastic lower bound on the discrete image's log-likelihood: the
        dequantised y = (x + u) / 256 (the image generator's first draw), then the divergence exactly or by
        Hutchinson's estimator (the image generator's next draws), minus D log 256."""
        with torch.autocast(images.device.type, enabled=False):
            y = dequantize(images, generators)
            logp = nets["ffjord"].log_prob_per_image(
                y, generators, trace=trace or self.cfg.trace, probes=probes or self.cfg.probes,
                estimator=self.cfg.trace_estimator, rtol=self.rtol, atol=self.atol)
        return logp - images[0].numel() * math.log(256)

    sample_options = ("temperature",)

    @torch.no_grad()
    def sample(self, nets, generators, *, labels=None, temperature=None):
        net = nets["ffjord"]
        device = next(net.parameters()).device
        t = self.cfg.temperature if temperature is None else temperature
        self.validate_sample_options({"temperature": t})
        eps = [per_image("randn", generators, shape, device) for shape in net.z_shapes]
        with torch.autocast(device.type, enabled=False):
            y = net.decode(eps, temperature=t, rtol=self.rtol, atol=self.atol)
        x255 = torch.floor(y * 256).clamp(0, 255)  # the pixel whose dequantisation cell holds y
        return (x255 / 127.5 - 1).float()

    def export(self, nets, out_dir):
        save_module(out_dir, self.EXPORT, nets["ffjord"], {"class": "FFJORD", "kwargs": self.net_kwargs()})

    def load_export(self, out_dir):
        return {"ffjord": load_module(out_dir, self.EXPORT, lambda spec: FFJORD(**spec["kwargs"]))}

    def onnx_graphs(self, nets):
        net = nets["ffjord"]
        graphs = []
        for k, (cnf, shape) in enumerate(zip(net.cnfs, net.cnf_shapes)):
            dims = f"[batch, {', '.join(map(str, shape))}]"
            graphs.append(OnnxGraph(f"dynamics_{k}", _DynamicsGraph(cnf.net),
                                    {"z": torch.randn(2, *shape), "t": torch.tensor([0.0, 0.5])}, ["dzdt"],
                                    {"z": f"{dims} float32 state of CNF block {k} (in the noise -> data plan)",
                                     "t": f"[batch] float32 times on [0, {cnf.time_length}]",
                                     "dzdt": f"{dims} float32 the block's dynamics f(z, t)"}))
        return graphs

    def onnx_sampler(self, nets):
        net = nets["ffjord"]
        return {"kind": "cnf", "plan": list(net.plan), "z_shapes": [list(s) for s in net.z_shapes],
                "cnf_shapes": [list(s) for s in net.cnf_shapes],
                "time_lengths": [float(c.time_length) for c in net.cnfs], "alpha": net.alpha,
                "rtol": self.rtol, "atol": self.atol, "temperature": self.cfg.temperature, "num_classes": 0}


class _DynamicsGraph(nn.Module):
    def __init__(self, dynamics: nn.Module):
        super().__init__()
        self.dynamics = dynamics

    def forward(self, z, t):
        return self.dynamics(t, z).float()
