"""The GAN family's architectures: one object per ``model.arch`` behind one interface (:class:`Arch`).

An arch builds its generator and discriminator, draws its latents and generates images (one call,
:meth:`Arch.fake` in training and :meth:`Arch.sample` at sampling, whatever the networks take), and declares
what it adds to the family's shared training: lazy regulariser phases of its own (StyleGAN2's path length),
terms of the generator's loss (BigGAN's orthogonal regularisation), the images and arguments of a step (ProGAN's
growth, a function of the step context's images seen), its state in checkpoints, and why it cannot compile or
run under an engine. Its config fields and checks are declared, without torch, by its
:class:`distgen.config.gan_archs.GANArchConfig` (``self.config``).

The networks themselves live in :mod:`~distgen.families.gan.basic` (MLP, DCGAN), :mod:`~.biggan`,
:mod:`~.stylegan2` and :mod:`~.progan`. :data:`ARCHS` is the one place that picks an arch by name.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import nn

from distgen import dist
from distgen.config.core import ConfigError
from distgen.config.gan_archs import GAN_ARCHS
from distgen.families.base import DataInfo, Phase, StepContext
from distgen.families.gan import basic, biggan, progan, stylegan2
from distgen.families.gan.latents import Latents, critic
from distgen.families.gan.losses import path_lengths


class Arch:
    """One arch of the GAN family. Subclasses set the networks' classes, their size presets and ``name`` (a key
    of :data:`distgen.config.gan_archs.GAN_ARCHS`), and override the hooks where they differ from a plain
    ``G(z, labels)`` / ``D(x, labels)`` pair trained by the shared phases alone."""

    name: ClassVar[str]
    generator: ClassVar[type[nn.Module]]
    discriminator: ClassVar[type[nn.Module]]
    presets: ClassVar[dict[str, dict]]

    def __init__(self, cfg: Any, data: DataInfo, num_classes: int):
        self.cfg, self.data, self.num_classes = cfg, data, num_classes
        self.config = GAN_ARCHS[self.name]
        r = data.resolution
        if self.config.power_of_two and (r < 8 or r & (r - 1)):
            raise ConfigError(f"data.resolution: the {self.name} networks need a power of two >= 8, got {r}")
        self.preset = dict(self.presets[cfg.preset])
        self.latents = Latents(int(self.preset["z_dim"]), cfg.info_categorical, cfg.info_continuous)

    # ---- networks
    def generator_kwargs(self) -> dict:
        """The generator's constructor arguments (an export's ``generator_config.json`` keeps them)."""
        return {"resolution": self.data.resolution, "channels": self.data.channels, "num_classes": self.num_classes,
                **self.preset, "z_dim": self.latents.dim}

    def discriminator_kwargs(self) -> dict:
        return dict(self.preset)

    def build(self) -> dict[str, nn.Module]:
        """G, and D with InfoGAN's Q head when the model has codes."""
        G = self.generator(**self.generator_kwargs())
        d = self.data
        body = self.discriminator(d.resolution, d.channels, self.num_classes, **self.discriminator_kwargs())
        return {"G": G, "D": critic(body, d.resolution, d.channels, self.num_classes,
                                    self.latents.n_cat + self.latents.n_cont)}

    # ---- training
    def phases(self) -> list[Phase]:
        """Lazy regularisers of its own (every k steps, scaled by k), after the shared phases."""
        return []

    def phase_loss(self, ctx: StepContext, nets, real: torch.Tensor, labels: Optional[torch.Tensor],
                   g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The per-sample loss of one of :meth:`phases`."""
        raise ValueError(f"unknown GAN phase {ctx.phase!r}")

    def begin_step(self, ctx: StepContext, raw: dict[str, nn.Module]) -> None:
        """Called in the step's first phase (D), with the plain modules."""

    def reals(self, ctx: StepContext, real: torch.Tensor, labels: Optional[torch.Tensor]):
        """The real images (and their labels) as this step's discriminator sees them."""
        return real, labels

    def d_kwargs(self, ctx: StepContext) -> dict:
        """Keyword arguments of the discriminator's forward at this step."""
        return {}

    def fake(self, G: nn.Module, b: int, labels: Optional[torch.Tensor], g: torch.Generator, device,
             ctx: StepContext, *, update_stats: bool) -> tuple[torch.Tensor, dict]:
        """``b`` generated images for a training step, and their InfoGAN codes. ``update_stats``: the generator's
        own phase, where running statistics (StyleGAN2's average w) move."""
        z, codes = self.latents.draw(b, g, device)
        return G(z, labels, **self.train_kwargs(b, g, device, ctx, update_stats)), codes

    def train_kwargs(self, b: int, g: torch.Generator, device, ctx: StepContext, update_stats: bool) -> dict:
        """The generator's keyword arguments in training (drawn after z, from the same generator)."""
        return {}

    def generator_terms(self, ctx: StepContext, nets) -> tuple[Optional[torch.Tensor], dict]:
        """A term added to the generator's loss (None: none) and scalars to log in its phase."""
        return None, {}

    def shards_whole(self, network: str) -> bool:
        """Whether FSDP2 shards ``network`` as one unit (gathered whole around its forward) instead of block by
        block: its forward, or a method registered with it (the module's ``forward_methods``), reads the weights of
        blocks it does not run."""
        return False

    def compile_problem(self, network: str) -> Optional[str]:
        return None

    def engine_problem(self, zero_stage: Optional[int]) -> Optional[str]:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """The arch's keys of the family state (others are the family's, or an older checkpoint's)."""

    # ---- sampling and export
    def sample_z(self, gen: torch.Generator, truncation: Optional[float]) -> torch.Tensor:
        """One image's z for sampling: BigGAN's truncated normal beyond the threshold ``truncation``."""
        return self.latents.one(gen, truncation)

    def sample(self, G: nn.Module, z: torch.Tensor, labels: Optional[torch.Tensor],
               truncation: Optional[float]) -> torch.Tensor:
        return G(z, labels)

    def graph_kwargs(self, G: nn.Module) -> dict:
        """Keyword arguments fixed in the generator's ONNX graph."""
        return {}

    def export_spec(self, G: nn.Module) -> dict:
        """What ``generator_config.json`` records beyond the constructor arguments (for the reader)."""
        return {}


class MLP(Arch):
    """The vanilla GAN (Goodfellow et al. 2014); spectral norm in D on request."""

    name, presets = "mlp", basic.PRESETS["mlp"]
    generator, discriminator = basic.MLPGenerator, basic.MLPDiscriminator

    def discriminator_kwargs(self):
        return {**self.preset, "spectral": self.cfg.spectral_norm}


class DCGAN(MLP):
    """DCGAN (Radford et al. 2016)."""

    name, presets = "dcgan", basic.PRESETS["dcgan"]
    generator, discriminator = basic.DCGANGenerator, basic.DCGANDiscriminator

    def compile_problem(self, network):
        # Measured on an H100 (torch 2.11, bf16, channels_last): compiled, both of DCGAN's networks fail in
        # inductor's convolution_backward over their 4x4 maps ("expected size 256==256, stride 16==1"); eager
        # ran as fast (3590 img/s against 3524 compiled without channels_last).
        return "inductor's convolution backward fails on its 4x4 maps under channels_last (CUDA, torch 2.11)"


class BigGAN(Arch):
    """BigGAN (Brock et al. 2019): its attention resolution, and its orthogonal regularisation of G."""

    name, presets = "biggan", biggan.PRESETS
    generator, discriminator = biggan.Generator, biggan.Discriminator

    def __init__(self, cfg, data, num_classes):
        super().__init__(cfg, data, num_classes)
        r = data.resolution
        valid = biggan.attention_resolutions(r)
        if cfg.attn_res is not None:
            if cfg.attn_res not in valid:
                raise ConfigError(f"model.attn_res: must be one of {list(valid)} at resolution {r}, got {cfg.attn_res}")
            self.preset["attn_res"] = cfg.attn_res
        elif self.preset["attn_res"] not in valid:
            # As BigGAN-PyTorch: the preset's attention resolution (64 for the paper's model) is
            # left out where the network has no such block (its CIFAR model has none).
            self.preset["attn_res"] = 0

    def generator_terms(self, ctx, nets):
        if self.cfg.ortho_weight <= 0:
            return None, {}
        ortho = nets.raw["G"].orthogonal_penalty()
        return self.cfg.ortho_weight * ortho, {"ortho": ortho.detach()}

    def shards_whole(self, network):
        # the penalty reads every weight of G outside its forward: FSDP2 gathers them around orthogonal_penalty
        # (G's forward_methods), which it can only do for the weights of G's own unit
        return network == "G" and self.cfg.ortho_weight > 0


class StyleGAN2(Arch):
    """StyleGAN2 (Karras et al. 2020): style mixing and the average w in training, the truncation trick in W,
    and the lazy path-length regulariser (phase ``G_pl``, every ``pl_every`` steps) with its running mean."""

    name, presets = "stylegan2", stylegan2.PRESETS
    generator, discriminator = stylegan2.Generator, stylegan2.Discriminator

    def __init__(self, cfg, data, num_classes):
        super().__init__(cfg, data, num_classes)
        self.pl_mean = 0.0
        self.num_ws = None  # the generator's count of w inputs, for style mixing

    def build(self):
        nets = super().build()
        self.num_ws = nets["G"].num_ws
        return nets

    def train_kwargs(self, b, g, device, ctx, update_stats):
        kw = dict(noise_gen=g, update_w_avg=update_stats)
        if self.cfg.style_mixing > 0:
            num_ws = self.num_ws
            mix_z, _ = self.latents.draw(b, g, device)
            cutoff = torch.randint(1, num_ws, (b,), device=device, generator=g)
            use = torch.rand(b, device=device, generator=g) < self.cfg.style_mixing
            kw.update(mix_z=mix_z, mix_cutoff=torch.where(use, cutoff, torch.full_like(cutoff, num_ws)))
        return kw

    def phases(self):
        return [Phase("G_pl", "G", self.cfg.pl_every, twice=True)] if self.cfg.pl_weight > 0 else []

    def phase_loss(self, ctx, nets, real, labels, g):
        if ctx.phase != "G_pl":
            return super().phase_loss(ctx, nets, real, labels, g)
        c = self.cfg
        n = max(real.shape[0] // 2, 1)  # StyleGAN2 runs the regulariser on half batches
        z, _ = self.latents.draw(n, g, real.device)
        img, ws = nets["G"](z, labels[:n] if labels is not None else None, noise_gen=g, return_ws=True)
        lengths = path_lengths(img, ws, g)
        # One running mean for all ranks (so a checkpoint holds the state of every rank), in float64 and on the
        # device: summed over the ranks there, never read back in the step.
        full = lambda v: torch.full((), float(v), dtype=torch.float64, device=lengths.device)  # noqa: E731 (no copy)
        sums = dist.all_reduce_tensor_(torch.stack([lengths.detach().double().sum(), full(n)]))
        pl_mean = self.pl_mean if torch.is_tensor(self.pl_mean) else full(self.pl_mean)
        self.pl_mean = pl_mean + c.pl_decay * (sums[0] / sums[1] - pl_mean)
        pen = (lengths - self.pl_mean.to(lengths.dtype)).square()
        loss = pen * (c.pl_weight * c.pl_every) + img[:, 0, 0, 0].float() * 0
        return loss, {"pl_length": sums[0] / sums[1], "pl_penalty": pen.detach().mean()}

    def compile_problem(self, network):
        if network == "G" and self.cfg.pl_weight > 0:
            return "the path-length regulariser differentiates through it twice, which torch.compile does not support"
        return None

    def engine_problem(self, zero_stage):
        if self.cfg.pl_weight > 0:
            return ("the path-length regulariser differentiates the generator's output inside its engine's forward, "
                    "which sets off ZeRO's end-of-backward gradient reduction early (an IndexError in "
                    "reduce_ipg_grads, in fp32 as in bf16); use pl_weight 0 under DeepSpeed, or DDP")
        return None

    def state_dict(self):
        return {"pl_mean": float(self.pl_mean)}

    def load_state_dict(self, state):
        self.pl_mean = float(state.get("pl_mean", 0.0))

    def sample_z(self, gen, truncation):
        return self.latents.one(gen, None)  # truncated in W instead

    def sample(self, G, z, labels, truncation):
        return G(z, labels, truncation=truncation)


class ProGAN(Arch):
    """Progressive GAN (Karras et al. 2018). The growth, (resolution, fade-in alpha), is a pure function of the
    images seen before the step (``ctx.nimg``, the run's count): every phase of a step computes the same, and a
    resume restores it exactly. Training images are box-downsampled to the current resolution (blended during a
    fade), cut to the resolution's batch size (``batch_sizes``); the generator keeps the stage it last trained at
    in its ``growth`` buffer, which its EMA copies and an export keeps, and samples there, upsampled to the full
    resolution."""

    name, presets = "progan", progan.PRESETS
    generator, discriminator = progan.Generator, progan.Discriminator

    def __init__(self, cfg, data, num_classes):
        super().__init__(cfg, data, num_classes)
        # The (res, alpha) the networks last trained at, for the reader of a checkpoint (the steps recompute it)
        self.trained_at = self.stage(StepContext("D"))

    def stage(self, ctx: StepContext) -> tuple[int, float]:
        """(res, alpha) of the step ``ctx`` belongs to."""
        return progan.growth(ctx.nimg, self.data.resolution, self.cfg.stable_kimg, self.cfg.fade_kimg)

    def begin_step(self, ctx, raw):
        """The generator's ``growth`` buffer (which its EMA copies and an export keeps) follows the step's."""
        self.trained_at = res, alpha = self.stage(ctx)
        raw["G"].growth.copy_(torch.tensor([float(res), alpha]))

    def reals(self, ctx, real, labels):
        """The resolution's batch size, and the images box-downsampled (blended during a fade) to it."""
        res, alpha = self.stage(ctx)
        sizes, level = self.cfg.batch_sizes, int(res).bit_length() - 3
        if level < len(sizes):
            real = real[:sizes[level]]
            labels = labels[:sizes[level]] if labels is not None else None
        return progan.fade_reals(real, res, alpha), labels

    def d_kwargs(self, ctx):
        res, alpha = self.stage(ctx)
        return {"res": res, "alpha": alpha}

    def train_kwargs(self, b, g, device, ctx, update_stats):
        return dict(self.d_kwargs(ctx), upsample=False)

    def generator_terms(self, ctx, nets):
        res, alpha = self.stage(ctx)  # the growth, logged as G/res and G/alpha
        return None, {"res": float(res), "alpha": float(alpha)}

    def shards_whole(self, network):
        return True  # the zero term over the blocks not yet grown reads their weights inside the network's forward

    def compile_problem(self, network):
        return ("ProGAN's blocks and fade-in weight change with the growth (a Python float alpha every step of a "
                "fade), which would recompile the graph at every step")

    def state_dict(self):
        res, alpha = self.trained_at
        return {"res": res, "alpha": alpha}

    def load_state_dict(self, state):
        if "res" in state and "alpha" in state:
            self.trained_at = (int(state["res"]), float(state["alpha"]))

    def graph_kwargs(self, G):
        """The stage it samples at (its growth buffer) becomes a constant of the graph."""
        res, alpha = G.growth.tolist()
        return {"res": int(round(res)), "alpha": float(alpha)}

    def export_spec(self, G):
        return {"growth": G.growth.tolist()}  # the (resolution, alpha) it samples at, also in its buffer


# model.arch -> its arch: the one place that branches on the arch's name
ARCHS: dict[str, type[Arch]] = {a.name: a for a in (MLP, DCGAN, BigGAN, StyleGAN2, ProGAN)}
