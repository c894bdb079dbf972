"""Energy-based models: IGEBM (Du & Mordatch 2019) and, as an option on labelled data, JEM (Grathwohl et al. 2020).

One network ``E`` maps an image to K outputs; the energy is ``E(x) = -logsumexp_k f_k(x)`` (K = 1: the
negated output; JEM: K classes, whose logits also classify). The phase ``E`` runs every step:

- negatives by short-run SGLD (:func:`sgld`), ``x <- clamp(x - step_size dE/dx + noise N(0, I), -1, 1)``
  for ``sgld_steps`` steps, started from this rank's replay buffer, except a share ``reinit_freq`` of
  chains restarted from uniform noise (JEM's sample_q); the results go back into the buffer;
- the loss, per sample, is contrastive divergence with IGEBM's energy-magnitude regulariser,
  ``E(x+) - E(x-) + alpha (E(x+)^2 + E(x-)^2)`` (:func:`cd_loss`), plus JEM's cross-entropy of the logits
  of the real image (labels -1, unlabelled, add nothing).

The chains run through the plain module in eval mode (spectral norm's power iteration does not step, and
DDP / DeepSpeed see no extra forward); the loss then runs the engine's forward once on real and negative
images together. Under FSDP2 the plain module is the sharded one (its hooks gather the weights around every
chain step); spectral norm's power-iteration vectors are buffers, not sharded, which every rank updates alike
from the same gathered weight, and the checkpoint holds them. All randomness is the phase's generator, so a
resumed run draws what the straight run drew. The buffer is per-rank state (``family-<rank>.safetensors`` in
every checkpoint), ``buffer_size`` images per process: each rank's chains are revisited at the same rate
whatever the number of processes.

Deviations from the references: the chains pick buffer slots without replacement (JEM draws with
replacement, and two chains writing one slot would be order-dependent on a GPU); every step clamps to the
pixel range (IGEBM does, JEM does not), which makes saturation measurable for :meth:`EBM.health`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from distgen.config.core import ConfigError
from distgen.config.models import EBMConfig
from distgen.families.base import DataInfo, Family, Phase, load_module, save_module
from distgen.families.capabilities import Classifies, ExportsOnnx, OnnxGraph
from distgen.families.graphs import InputGradient

# first stage's channels and residual blocks per stage (3 stages: width x 1, 2, 4)
PRESETS: dict[str, dict] = {
    "tiny": dict(width=8, blocks=1),
    "small": dict(width=16, blocks=1),
    "paper": dict(width=160, blocks=4),  # JEM's WRN-28-10: 6 x 4 + 4 layers, 16 x 10 channels, no batch norm
}
EXPORT = "energy"
BUFFER_FILE = "buffer.safetensors"


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)  # JEM's WRN uses leaky ReLU 0.2


class Block(nn.Module):
    """A wide-ResNet pre-activation block without normalisation (batch norm couples the chains of a batch)."""

    def __init__(self, cin: int, cout: int, stride: int, wrap: Callable[[nn.Module], nn.Module]):
        super().__init__()
        self.conv1 = wrap(nn.Conv2d(cin, cout, 3, stride, 1))
        self.conv2 = wrap(nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = wrap(nn.Conv2d(cin, cout, 1, stride)) if stride != 1 or cin != cout else None

    def forward(self, x):
        h = self.conv2(_act(self.conv1(_act(x))))
        return h + (x if self.skip is None else self.skip(x))


class EnergyNet(nn.Module):
    """Images on [-1, 1] -> ``outputs`` logits: a stem conv, three stages of ``blocks`` blocks (strides 1, 2,
    2; widths x1, x2, x4), global average pooling and a linear head."""

    def __init__(self, channels: int, width: int, blocks: int, outputs: int, spectral: bool = False):
        super().__init__()
        wrap = spectral_norm if spectral else (lambda m: m)
        self.stem = wrap(nn.Conv2d(channels, width, 3, 1, 1))
        layers, c = [], width
        for stage, stride in enumerate((1, 2, 2)):
            for i in range(blocks):
                layers.append(Block(c, width * 2 ** stage, stride if i == 0 else 1, wrap))
                c = width * 2 ** stage
        self.blocks = nn.Sequential(*layers)
        self.head = wrap(nn.Linear(c, outputs))

    def forward(self, x):
        return self.head(_act(self.blocks(self.stem(x))).mean((2, 3)))


def energy(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """E(x) = -logsumexp of the logits, in float32: [B]."""
    return -torch.logsumexp(net(x).float(), 1)


def sgld(energy_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, steps: int, step_size: float,
         noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``steps`` steps of x <- clamp(x - step_size * dE/dx + noise(), -1, 1) (JEM's / IGEBM's decoupled step
    and noise scales), differentiating only with respect to x; returns x detached."""
    with torch.enable_grad():
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(energy_fn(x).sum(), x)
            x = (x.detach() - step_size * grad + noise()).clamp(-1, 1)
    return x.detach()


def chain_starts(buffer: torch.Tensor, b: int, reinit_freq: float, g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """JEM's sample_p_0: ``b`` distinct buffer slots (without replacement), and where each chain starts:
    its slot's image, or with probability ``reinit_freq`` uniform noise on [-1, 1]. Returns (slots, starts,
    restarted), all drawn from ``g``."""
    idx = torch.randperm(buffer.shape[0], generator=g, device=g.device)[:b].to(buffer.device)
    restart = (torch.rand(b, generator=g, device=g.device) < reinit_freq).to(buffer.device)
    fresh = (torch.rand((b, *buffer.shape[1:]), generator=g, device=g.device) * 2 - 1).to(buffer.device)
    return idx, torch.where(restart[:, None, None, None], fresh, buffer[idx]), restart


def cd_loss(e_real: torch.Tensor, e_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """IGEBM's per-sample loss: contrastive divergence plus alpha times the energies' squares."""
    return e_real - e_fake + alpha * (e_real.square() + e_fake.square())


@contextmanager
def eval_mode(net: nn.Module):
    """``net`` in eval mode for the block (spectral norm's power iteration does not step), then as it was."""
    was = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was)


class EBM(Family, Classifies, ExportsOnnx):
    name = "ebm"
    config_cls = EBMConfig
    sample_options = ("steps", "step_size", "from_buffer")

    def __init__(self, cfg: EBMConfig, data: DataInfo):
        super().__init__(cfg, data)
        if cfg.jem:
            if data.num_classes < 2:
                raise ConfigError(f"model.jem: JEM needs labelled data with 2 or more classes (the training "
                                  f"manifest lists {data.num_classes}); set jem false or shard labelled data")
        self.classes = data.num_classes if cfg.jem else 0
        self.buffer: Optional[torch.Tensor] = None  # this rank's replay buffer [buffer_size, C, H, W], float32

    def capabilities_off(self):
        return {} if self.cfg.jem else {Classifies: "unless model.jem"}

    # ---- networks and phases
    def net_kwargs(self) -> dict:
        c, p = self.cfg, PRESETS[self.cfg.preset]
        return {"channels": self.data.channels, "width": c.width or p["width"], "blocks": c.blocks or p["blocks"],
                "outputs": max(self.classes, 1), "spectral": c.spectral_norm}

    def build_networks(self):
        return {"E": EnergyNet(**self.net_kwargs())}

    def phases(self):
        return [Phase("E", "E")]

    def engine_problem(self, zero_stage):
        if zero_stage == 3:
            return ("the SGLD chains run the energy network outside its engine's forward, and ZeRO-3 keeps "
                    "parameters partitioned outside it; use ZeRO-1 or ZeRO-2")
        return None

    # compile_problem: none. SGLD takes a first-order gradient with respect to the input (the loss's backward
    # is a separate one), which compiled forwards support; eval and train mode are two compiled graphs.

    def health(self, record):
        """Stop when a record's mean energy of data or samples, or the gap between them, is beyond
        ``diverge_energy`` in magnitude, or when more than ``diverge_saturation`` of the samples' pixels sit
        at -1 or 1 (the energy's gradient has overwhelmed the step)."""
        c = self.cfg
        if c.diverge_energy > 0:
            for k in ("e_real", "e_fake", "gap"):
                v = record.get(f"E/{k}")
                if v is not None and abs(v) > c.diverge_energy:
                    return (f"the energies diverged: E/{k} {v:.4g} is beyond model.diverge_energy "
                            f"{c.diverge_energy:g} in magnitude")
        sat = record.get("E/saturation")
        if c.diverge_saturation < 1 and sat is not None and sat > c.diverge_saturation:
            return (f"the SGLD samples saturated: {sat:.2%} of their pixels at -1 or 1, beyond "
                    f"model.diverge_saturation {c.diverge_saturation:g}")
        return None

    # ---- the replay buffer: per-rank tensors, in every checkpoint
    def rank_state(self):
        return {} if self.buffer is None else {"buffer": self.buffer}

    def load_rank_state(self, state):
        unknown = sorted(set(state) - {"buffer"})
        if unknown:
            raise ValueError(f"the ebm family's per-rank state holds only 'buffer', got {unknown}")
        self.buffer = state.get("buffer")  # none: a rank the writing run did not have starts a fresh buffer

    def _replay(self, like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """This rank's buffer on ``like``'s device, made (uniform noise, as JEM) or resized to buffer_size."""
        n, shape = self.cfg.buffer_size, like.shape[1:]
        buf = self.buffer
        if buf is not None and buf.shape[1:] != shape:
            raise ValueError(f"the replay buffer holds images of shape {tuple(buf.shape[1:])}, the data "
                             f"{tuple(shape)}")
        have = 0 if buf is None else buf.shape[0]
        if have < n:  # fresh, or a resume with a larger model.buffer_size
            extra = torch.rand((n - have, *shape), generator=g, device=g.device) * 2 - 1
            buf = extra if buf is None else torch.cat([buf.to(g.device), extra])
        self.buffer = buf[:n].to(like.device, torch.float32)
        return self.buffer

    # ---- training
    def loss(self, ctx, nets, batch, generator):
        phase = ctx.phase
        if phase != "E":
            raise ValueError(f"unknown ebm phase {phase!r}")
        c, g = self.cfg, generator
        real = batch["image"]
        b = real.shape[0]
        buf = self._replay(real, g)
        if buf.shape[0] < b:
            raise ConfigError(f"model.buffer_size: must be >= train.batch_size ({b}), got {buf.shape[0]}")
        idx, start, _ = chain_starts(buf, b, c.reinit_freq, g)
        raw = nets.raw["E"]
        with eval_mode(raw):
            neg = sgld(lambda x: energy(raw, x), start, c.sgld_steps, c.sgld_step_size,
                       lambda: c.sgld_noise * torch.randn(start.shape, generator=g, device=g.device))
        neg = torch.where(torch.isnan(neg), start, neg)  # a NaN step (skipped by the loop) leaves no NaN behind
        buf.index_copy_(0, idx, neg)

        logits = nets["E"](torch.cat([real, neg.to(real.dtype)])).float()  # one engine forward
        e = -torch.logsumexp(logits, 1)
        e_real, e_fake = e[:b], e[b:]
        loss = cd_loss(e_real, e_fake, c.energy_reg)
        extras = {"e_real": e_real.detach().mean(), "e_fake": e_fake.detach().mean(),
                  "gap": (e_fake - e_real).detach().mean(), "saturation": (neg.abs() >= 1).float().mean()}
        if c.jem:
            labels = self._labels(batch)
            ce = F.cross_entropy(logits[:b], labels, ignore_index=-1, reduction="none")
            known = (labels >= 0).float()
            extras["ce"] = (ce.detach().sum() / known.sum().clamp_min(1))
            extras["acc"] = ((logits[:b].detach().argmax(1) == labels).float() * known).sum() / known.sum().clamp_min(1)
            loss = loss + ce
        return loss, extras

    def _labels(self, batch: dict) -> torch.Tensor:
        if "label" not in batch:
            raise ConfigError("model.jem: the batch carries no labels (set data.labels=true)")
        return batch["label"].to(batch["image"].device)

    # ---- classification (JEM): the logits of p(y | x); offered only when model.jem
    def classify(self, nets, images):
        net = nets["E"]
        with eval_mode(net):
            return net(images.to(next(net.parameters()).device)).float()

    # ---- sampling and export
    def validate_sample_options(self, options):
        s, size = options.get("steps"), options.get("step_size")
        if s is not None and s < 1:
            raise ValueError(f"--steps: must be >= 1, got {s}")
        if size is not None and not size > 0:
            raise ValueError(f"--step-size: must be > 0, got {size}")
        if options.get("from_buffer") and self.buffer is None:
            raise ValueError("--from-buffer: this model holds no replay buffer (a run's checkpoints and its "
                             "exports keep rank 0's once it has trained a step)")

    def sample(self, nets, generators, *, labels=None, steps=None, step_size=None, from_buffer=None):
        """SGLD from uniform noise (or from the replay buffer, ``from_buffer``), ``steps`` steps. Image i's
        start, buffer slot and noise come from ``generators[i]`` alone, so a batch's make-up changes nothing."""
        c = self.cfg
        steps = c.sample_steps if steps is None else steps
        size = step_size if step_size is not None else (c.sample_step_size or c.sgld_step_size)
        self.validate_sample_options({"steps": steps, "step_size": size, "from_buffer": from_buffer})
        net = nets["E"]
        device = next(net.parameters()).device
        shape = (self.data.channels, self.data.resolution, self.data.resolution)
        if from_buffer:
            buf = self.buffer
            start = torch.stack([buf[int(torch.randint(buf.shape[0], (), generator=g, device=g.device))]
                                 for g in generators]).float()
        else:
            start = torch.stack([torch.rand(shape, generator=g, device=g.device) for g in generators]) * 2 - 1

        def noise():
            return c.sgld_noise * torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]
                                              ).to(device)

        with eval_mode(net):
            return sgld(lambda x: energy(net, x), start.to(device), steps, size, noise)

    def export(self, nets, out_dir):
        """The EMA energy network (``energy.safetensors`` + ``energy_config.json``) and rank 0's replay buffer
        (``buffer.safetensors``, for ``--from-buffer``) when the checkpoint holds one."""
        save_module(out_dir, EXPORT, nets["E"], {"class": "EnergyNet", "kwargs": self.net_kwargs()})
        if self.buffer is not None:
            from distgen.checkpoint import save_tensors

            save_tensors(Path(out_dir) / BUFFER_FILE, {"buffer": self.buffer})

    def onnx_graphs(self, nets):
        c, r = self.data.channels, self.data.resolution
        x = torch.rand(2, c, r, r) * 2 - 1
        net = nets["E"].eval()  # spectral norm's power iteration does not step in eval mode
        graphs = [OnnxGraph("energy_grad", InputGradient(net, lambda f, y: -torch.logsumexp(f(y).float(), 1), x),
                            {"image": x}, ["energy", "grad"],
                            {"image": f"[batch, {c}, {r}, {r}] float32 images on [-1, 1]",
                             "energy": "[batch] float32 E(x) = -logsumexp of the logits",
                             "grad": "like image: dE/dx, the gradient SGLD steps against"})]
        if self.cfg.jem:
            graphs.append(OnnxGraph("classifier", _LogitsGraph(net), {"image": x}, ["logits"],
                                    {"image": f"[batch, {c}, {r}, {r}] float32 images on [-1, 1]",
                                     "logits": f"[batch, {self.data.num_classes}] float32 class logits (JEM)"}))
        return graphs

    def onnx_sampler(self, nets):
        c = self.cfg
        return {"kind": "sgld", "graph": "energy_grad", "shape": [self.data.channels, self.data.resolution,
                                                                   self.data.resolution],
                "steps": c.sample_steps, "step_size": c.sample_step_size or c.sgld_step_size, "noise": c.sgld_noise,
                "num_classes": 0}

    def load_export(self, out_dir):
        from distgen.checkpoint import load_tensors

        net = load_module(out_dir, EXPORT, lambda spec: EnergyNet(**spec["kwargs"]))
        path = Path(out_dir) / BUFFER_FILE
        self.buffer = load_tensors(path)["buffer"] if path.is_file() else None
        return {"E": net}


class _LogitsGraph(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image):
        return self.net(image).float()
