"""The GAN family: MLP, DCGAN, BigGAN-, StyleGAN2-style and progressive (ProGAN) networks behind one set of phases.

Phases (the trainer runs them; it knows nothing of GANs):

- ``D`` every step: real vs fake (fakes from the frozen generator, no graph),
  with WGAN-GP's penalty and InfoGAN's mutual-information term when enabled;
- ``D_r1`` every ``r1_every`` steps: lazy R1 (Karras et al. 2020), scaled by the interval;
- ``G`` every ``d_steps`` steps (k discriminator steps per generator step),
  through the frozen discriminator;
- the arch's own lazy regularisers after them: ``G_pl`` every ``pl_every``
  steps, StyleGAN2's path-length regulariser.

Phases of a network share its optimizer; lazy intervals correct its lr and
betas as StyleGAN2 does. The trainer keeps the generator's EMA, which is what
samples, evaluates and exports. Augmentation (DiffAugment or ADA) is applied
to real and fake alike; ADA's p is family state, stored in checkpoints.

This module holds what every arch shares: the adversarial losses
(:mod:`.losses`), R1, augmentation (:mod:`.augment`), labels, InfoGAN's codes
(:mod:`.latents`), sampling and export. What differs between archs (the
networks, how the generator is called, extra phases and regularisers,
ProGAN's growth as a function of ``ctx.nimg``, StyleGAN2's path-length mean)
is the arch object's (:mod:`.archs`), picked once by ``model.arch``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distgen import dist
from distgen.config.core import ConfigError
from distgen.config.models import GANConfig
from distgen.families.base import DataInfo, Family, OptimSettings, Phase, load_module, save_module
from distgen.families.capabilities import ExportsOnnx, OnnxGraph
from distgen.families.gan.archs import ARCHS, Arch
from distgen.families.gan.augment import ADA, augment
from distgen.families.gan.losses import d_loss, g_loss, gradient_penalty, r1_penalty

GENERATOR_CONFIG = "generator_config.json"


class GAN(Family, ExportsOnnx):
    name = "gan"
    config_cls = GANConfig
    sample_options = ("truncation",)

    def validate_sample_options(self, options):
        problem = self.arch.config.truncation_problem(options.get("truncation"))
        if problem is not None:
            raise ValueError(f"--truncation: {problem}" + ("; sample without it" if self.arch.config.truncation is None
                                                           else ""))

    def __init__(self, cfg: GANConfig, data: DataInfo):
        super().__init__(cfg, data)
        if cfg.conditional and data.num_classes < 1:
            raise ConfigError("model.conditional needs labelled data (the training manifest lists no classes)")
        self.num_classes = data.num_classes if cfg.conditional else 0
        self.arch: Arch = ARCHS[cfg.arch](cfg, data, self.num_classes)
        self.latents = self.arch.latents
        self.ops = tuple(cfg.augment_ops)
        self.ada = ADA(cfg.ada_target, cfg.ada_interval, cfg.ada_kimg) if cfg.augment == "ada" else None
        self.loss_kind = cfg.loss_kind

    # ---- networks
    def build_networks(self):
        return self.arch.build()

    def _regularisers(self) -> list[Phase]:
        """Lazy regularisers (every k steps, scaled by k): R1, and the arch's own."""
        c = self.cfg
        return ([Phase("D_r1", "D", c.r1_every, twice=True)] if c.r1_gamma > 0 else []) + self.arch.phases()

    def phases(self):
        lazy = self._regularisers()
        return [Phase("D", "D", twice=self.loss_kind == "wgan-gp"), *(p for p in lazy if p.network == "D"),
                Phase("G", "G", self.cfg.d_steps), *(p for p in lazy if p.network == "G")]

    def ema_networks(self):
        return ["G"]

    def optim_settings(self, network):
        c = self.cfg
        scale = c.d_lr_scale if network == "D" else c.g_lr_scale
        every = max([p.every for p in self._regularisers() if p.network == network], default=1)
        if every == 1:
            return OptimSettings(scale)
        ratio = every / (every + 1)  # StyleGAN2: lazy regularisation steps the same optimizer
        return OptimSettings(scale * ratio, ratio)

    def compile_problem(self, network):
        c = self.cfg
        if network == "D" and (c.r1_gamma > 0 or self.loss_kind == "wgan-gp"):
            what = "R1" if c.r1_gamma > 0 else "wgan-gp's gradient penalty"
            return f"{what} differentiates through it twice, which torch.compile does not support"
        return self.arch.compile_problem(network)

    def flops_problem(self):
        return "ProGAN's networks grow as it trains" if self.cfg.arch == "progan" else None

    def checkpoint_activations(self, network, module):
        why = super().checkpoint_activations(network, module)  # the arch's G and D list their blocks, or not
        return why and (f"the {self.cfg.arch} arch's {network} is a few plain layers, no blocks to checkpoint "
                        f"(biggan, stylegan2 and progan have them)")

    def engine_problem(self, zero_stage):
        if zero_stage == 3:
            return ("a GAN runs each network outside its own engine in the other's phase (the frozen discriminator "
                    "in the generator step, the generator in the discriminator step), and ZeRO-3 keeps parameters "
                    "partitioned except inside their own engine's forward; use ZeRO-1 or ZeRO-2")
        problem = self.arch.engine_problem(zero_stage)
        if problem is None and self.loss_kind == "wgan":
            problem = ("WGAN's weight clipping edits the discriminator's weights after its optimizer step, and ZeRO's "
                       "optimizer keeps its own fp32 copy of them that would undo the clipping; use loss hinge or "
                       "nonsaturating")
        return problem

    def shard_blocks(self, network, module):
        return [] if self.arch.shards_whole(network) else super().shard_blocks(network, module)

    def after_step(self, phase, raw):
        if phase == "D" and self.loss_kind == "wgan":
            with torch.no_grad():
                for p in raw["D"].parameters():
                    p.clamp_(-self.cfg.clip, self.cfg.clip)

    def state_dict(self):
        return {**self.arch.state_dict(), **({"ada": self.ada.state_dict()} if self.ada else {})}

    def load_state_dict(self, state):
        # Checkpoints written before the step context kept ProGAN's own count of images (nimg) here; the run's
        # count (meta.json's nimg, passed to loss as ctx.nimg) replaces it. Every arch wrote pl_mean.
        self.arch.load_state_dict({k: v for k, v in state.items() if k not in ("nimg", "ada")})
        if self.ada is not None:
            if "ada" not in state:
                raise ValueError("the checkpoint holds no ADA state but model.augment is ada")
            self.ada.load_state_dict(state["ada"])

    # ---- the phases' losses: one method per shared phase, looked up by name; the arch's own phases are its
    def _labels(self, batch: dict):
        if not self.num_classes:
            return None
        if "label" not in batch:
            raise ConfigError("model.conditional: the batch carries no labels (set data.labels=true)")
        return batch["label"].to(batch["image"].device)

    def _aug(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.cfg.augment == "none":
            return x
        return augment(x, self.ops, 1.0 if self.ada is None else self.ada.p, g)

    def loss(self, ctx, nets, batch, generator):
        losses = {"D": self._d_loss, "D_r1": self._r1_loss, "G": self._g_loss}
        real, labels = batch["image"], self._labels(batch)
        if ctx.phase not in losses:
            return self.arch.phase_loss(ctx, nets, real, labels, generator)
        return losses[ctx.phase](ctx, nets, real, labels, generator)

    def _with_info(self, loss, extras: dict, q, codes: dict):
        """InfoGAN's term, when the model has codes."""
        info = self.latents.info_loss(q, codes)
        if info is not None:
            loss = loss + self.cfg.info_weight * info
            extras["info"] = info.detach().mean()
        return loss, extras

    def _d_loss(self, ctx, nets, real, labels, g):
        c, D, arch = self.cfg, nets["D"], self.arch
        arch.begin_step(ctx, nets.raw)
        real, labels = arch.reals(ctx, real, labels)
        kw = arch.d_kwargs(ctx)
        with torch.no_grad():
            fake, codes = arch.fake(nets["G"], real.shape[0], labels, g, real.device, ctx, update_stats=False)
        real_in, fake_in = self._aug(real, g), self._aug(fake, g)
        r, _ = D(real_in, labels, **kw)
        f, q = D(fake_in, labels, **kw)
        r, f = r.float(), f.float()
        loss = d_loss(self.loss_kind, r, f)
        drift = c.drift_weight
        if drift > 0:  # ProGAN's drift penalty: keeps the critic's scores from wandering away from 0
            loss = loss + drift * r.square()
        r, f = r.detach(), f.detach()  # for the logged numbers below
        # accuracy on real vs fake: threshold 0 for logistic / hinge scores, the batch mean for a critic's,
        # 0.5 for least squares (midway between its fake and real targets, 0 and 1)
        kind = self.loss_kind
        t = torch.cat([r, f]).mean().detach() if kind.startswith("wgan") else 0.5 if kind == "lsgan" else 0.0
        extras = {"real": r.mean(), "fake": f.mean(), "acc": 0.5 * ((r > t).float().mean() + (f < t).float().mean())}
        if kind == "wgan-gp":
            # Through the plain module: DeepSpeed takes torch.autograd.grad on its engine's output for a backward
            # pass of its own and reduces gradients early (an IndexError in reduce_ipg_grads). The critic's
            # engine forwards above hold every parameter, so DDP / DeepSpeed still synchronise all gradients
            # (as score's sliced score matching).
            plain = nets.raw["D"] if hasattr(nets, "raw") else D
            gp = gradient_penalty(lambda x: plain(x, labels, **kw)[0], real_in, fake_in, g)
            loss = loss + c.gp_weight * gp
            extras["gp"] = gp.detach().mean()
        loss, extras = self._with_info(loss, extras, q, codes)
        if self.ada is not None:
            # ADA's overfitting heuristic is E[sign(D(real))] about the decision threshold: 0.5 for lsgan
            self.ada.observe(r - 0.5 if kind == "lsgan" else r, dist.all_reduce_floats)
            extras["ada_p"] = self.ada.p
        return loss, extras

    def _r1_loss(self, ctx, nets, real, labels, g):
        c = self.cfg
        real, labels = self.arch.reals(ctx, real, labels)
        x = real.detach().requires_grad_(True)
        r, q = nets["D"](self._aug(x, g), labels, **self.arch.d_kwargs(ctx))
        pen = r1_penalty(r, x)
        # "+ 0 x outputs" keeps every parameter in the graph, as DDP without unused-parameter search needs
        loss = pen * (c.r1_gamma / 2 * c.r1_every) + r.float() * 0
        if q is not None:
            loss = loss + q.float().sum(1) * 0
        return loss, {"r1": pen.detach().mean()}

    def _g_loss(self, ctx, nets, real, labels, g):
        arch = self.arch
        real, labels = arch.reals(ctx, real, labels)
        fake, codes = arch.fake(nets["G"], real.shape[0], labels, g, real.device, ctx, update_stats=True)
        f, q = nets["D"](self._aug(fake, g), labels, **arch.d_kwargs(ctx))
        loss = g_loss(self.loss_kind, f.float())
        term, extras = arch.generator_terms(ctx, nets)  # BigGAN's orthogonal regularisation, ProGAN's growth
        if term is not None:
            loss = loss + term
        return self._with_info(loss, extras, q, codes)

    # ---- sampling and export
    @torch.no_grad()
    def sample(self, nets, generators, *, labels=None, truncation=None):
        G = nets["G"]
        device = next(G.parameters()).device
        t = self.cfg.truncation if truncation is None else truncation
        self.validate_sample_options({"truncation": t})  # for callers of sample() itself
        # One generator per image: an image depends on its own seed only.
        z = torch.cat([self.arch.sample_z(gen, t) for gen in generators]).to(device)
        if self.num_classes:
            if labels is None:
                labels = torch.tensor([i % self.num_classes for i in range(len(generators))])
            labels = labels.to(device)
        else:
            labels = None
        return self.arch.sample(G, z, labels, t).float().clamp(-1, 1)

    def export(self, nets, out_dir):
        """The EMA generator as ``generator.safetensors`` and a JSON that rebuilds it (``arch`` + constructor kwargs)."""
        lat = self.latents
        save_module(out_dir, "generator", nets["G"], {
            "arch": self.arch.name, "kwargs": self.arch.generator_kwargs(), "noise_dim": lat.noise_dim,
            "info_categorical": lat.n_cat, "info_continuous": lat.n_cont, "truncation": self.cfg.truncation,
            **self.arch.export_spec(nets["G"])})  # ProGAN: the (resolution, alpha) it samples at

    def load_export(self, out_dir):
        def build(spec):
            if spec["arch"] not in ARCHS:
                raise ValueError(f"{Path(out_dir) / GENERATOR_CONFIG}: unknown arch {spec['arch']!r}")
            return ARCHS[spec["arch"]].generator(**spec["kwargs"])

        return {"G": load_module(out_dir, "generator", build)}

    def onnx_graphs(self, nets):
        lat, psi = self.latents, self.arch.config.truncation == "psi"
        inputs = {"z": torch.randn(2, lat.dim)}
        docs = {"z": f"[batch, {lat.dim}] float32: {lat.noise_dim} N(0, 1) values"
                     + (f", then InfoGAN's categorical code one-hot ({lat.n_cat})" if lat.n_cat else "")
                     + (f", then its continuous codes U(-1, 1) ({lat.n_cont})" if lat.n_cont else ""),
                "image": f"[batch, {self.data.channels}, {self.data.resolution}, {self.data.resolution}] float32 "
                         f"on [-1, 1] (clamped)"}
        if self.num_classes:
            inputs["labels"] = torch.arange(2) % self.num_classes
            docs["labels"] = f"[batch] int64 class indices in [0, {self.num_classes})"
        if psi:
            inputs["truncation"] = torch.tensor(0.7)
            docs["truncation"] = "scalar float32 psi of the truncation trick, w <- w_avg + psi (w - w_avg); 1 = off"
        fixed = self.arch.graph_kwargs(nets["G"])  # ProGAN: the stage it samples at, a constant of the graph
        return [OnnxGraph("generator", _GeneratorGraph(nets["G"], self.num_classes > 0, psi, fixed), inputs,
                          ["image"], docs, static=("truncation",))]

    def onnx_sampler(self, nets):
        lat = self.latents
        return {"kind": "gan", "graph": "generator", "noise_dim": lat.noise_dim, "info_categorical": lat.n_cat,
                "info_continuous": lat.n_cont, "num_classes": self.num_classes, "truncation": self.cfg.truncation,
                # StyleGAN2 truncates w (an input of the graph, "psi"); the others resample |z| beyond the
                # threshold ("resample"), except ProGAN, which has no truncation trick (None)
                "truncation_kind": self.arch.config.truncation}


class _GeneratorGraph(nn.Module):
    """G(z[, labels][, truncation]) -> image clamped to [-1, 1], the graph of a GAN's ONNX export."""

    def __init__(self, G: nn.Module, conditional: bool, style: bool, fixed: dict):
        super().__init__()
        self.G, self.conditional, self.style, self.fixed = G, conditional, style, fixed

    def forward(self, z, labels=None, truncation=None):
        kw = {"truncation": truncation} if self.style else dict(self.fixed)
        return self.G(z, labels if self.conditional else None, **kw).float().clamp(-1, 1)

