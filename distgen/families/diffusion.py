"""Pixel-space diffusion in one of three formulations (``model.formulation``) on one of three backbones
(``model.backbone``: diffusers' UNet2DModel, DiT or EDM2's U-Net; :mod:`distgen.families.backbones`).

``ddpm`` (Ho et al. 2020, the default): training noise from a DDPMScheduler (linear or cosine betas), the network
predicts epsilon or v (Salimans & Ho 2022), and sampling uses DDPM, DDIM (Song et al. 2021) or DPM-Solver++
(Lu et al. 2022). ``edm`` (Karras et al. 2022) and ``flow`` (rectified flow / flow matching): see
:mod:`distgen.families.formulations`, which this family delegates its loss and sampling to. Class conditioning
drops labels to a null class with probability ``label_dropout`` so that classifier-free guidance (Ho & Salimans
2022) works at sampling time, in every formulation. Formulation and backbone compose: every backbone is called
``net(x, noise_cond, class_labels)`` and every formulation calls it so (its network is ``nets["unet"]``, the name
distgen's checkpoints have always used for it, whatever the backbone).
"""

from __future__ import annotations

import math

import torch

from distgen.config.backbones import UNET_PRESETS
from distgen.config.core import ConfigError
from distgen.config.models import DiffusionConfig
from distgen.families.base import DataInfo, Family, Phase
from distgen.families.capabilities import ExportsDiffusers, ExportsOnnx, Likelihood
from distgen.families.diffusion_exports import DiffusionExports
from distgen.families.formulations import formulation


def scheduler_kwargs(cfg: DiffusionConfig) -> dict:
    return dict(num_train_timesteps=cfg.num_train_timesteps, prediction_type=cfg.prediction,
                beta_schedule="squaredcos_cap_v2" if cfg.beta_schedule == "cosine" else "linear",
                beta_start=1e-4, beta_end=0.02, clip_sample=True)


class Diffusion(DiffusionExports, Family, Likelihood, ExportsOnnx, ExportsDiffusers):
    name = "diffusion"
    config_cls = DiffusionConfig

    def __init__(self, cfg: DiffusionConfig, data: DataInfo):
        super().__init__(cfg, data)
        if cfg.class_conditional and data.num_classes < 1:
            raise ConfigError("model.class_conditional needs labelled data (the training manifest lists no classes)")
        self.num_classes = data.num_classes if cfg.class_conditional else 0
        # diffusers is imported where it is used: loading the family registry stays cheap
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(**self.scheduler_config())
        self.form = formulation(cfg, self.scheduler)  # what the network predicts, and how it is sampled

    def scheduler_config(self) -> dict:
        return scheduler_kwargs(self.cfg)

    @property
    def null_class(self) -> int:
        return self.num_classes  # the extra embedding index used for dropped labels

    def unet_kwargs(self, channels: int, side: int) -> dict:
        kw = dict(UNET_PRESETS[self.cfg.preset])
        kw.update(sample_size=side, in_channels=channels, out_channels=channels)
        if self.num_classes:
            kw["num_class_embeds"] = self.num_classes + 1
        return kw

    def denoiser(self, channels: int, side: int) -> torch.nn.Module:
        """The ``model.backbone`` network for ``channels`` x ``side`` x ``side`` inputs (before the formulation's
        wrap). ``unet`` is diffusers' UNet2DModel itself, so its checkpoints and exports are what they were."""
        if self.cfg.backbone == "unet":
            from diffusers import UNet2DModel

            kw = self.unet_kwargs(channels, side)
            down = 2 ** (len(kw["block_out_channels"]) - 1)
            if side % down:
                raise ConfigError(f"model.preset: the {self.cfg.preset!r} U-Net halves its input {down // 2 or 1} "
                                  f"time(s), so its input side ({side}) must be a multiple of {down}; change "
                                  f"data.resolution or the preset")
            return UNet2DModel(**kw)
        from distgen.families.backbones import build_backbone

        try:
            return build_backbone(self.cfg.backbone, channels, side, self.num_classes, self.cfg.preset)
        except ValueError as e:  # the preset does not fit the input (a patch size, the levels of a U-Net)
            raise ConfigError(f"model.preset: {self.cfg.backbone} {self.cfg.preset!r} on {channels} x {side} x "
                              f"{side} inputs: {e}") from None

    def build_networks(self):
        return {"unet": self.form.wrap(self.denoiser(self.data.channels, self.data.resolution))}

    def phases(self):
        return [Phase("denoise", "unet")]

    def clean(self, nets, batch, generator) -> torch.Tensor:
        """What the model denoises: the images (latent diffusion: their latents)."""
        return batch["image"]

    def noise_shape(self, nets, n: int) -> tuple[int, ...]:
        return (n, self.data.channels, self.data.resolution, self.data.resolution)

    def finish(self, nets, x: torch.Tensor) -> torch.Tensor:
        """The sampler's output as images on [-1, 1] (latent diffusion decodes it)."""
        return x.clamp(-1, 1)

    def loss(self, ctx, nets, batch, generator):
        x0 = self.clean(nets, batch, generator)
        drawn = self.form.draw(x0, generator)  # before the labels' dropout: DDPM's order of draws
        labels = None
        if self.num_classes:
            labels = batch["label"].to(x0.device)
            drop = torch.rand(x0.shape[0], device=x0.device, generator=generator) < self.cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.form.loss(nets["unet"], drawn, labels)

    sample_options = ("steps", "sampler", "guidance")

    def validate_sample_options(self, options):
        steps, g, sampler = options.get("steps"), options.get("guidance"), options.get("sampler")
        if sampler is not None and sampler not in self.form.samplers:
            raise ValueError(f"--sampler: the {self.name} family with model.formulation {self.cfg.formulation} "
                             f"samples with {', '.join(self.form.samplers)}, not {sampler}")
        problem = None if steps is None else self.form.steps_problem(steps)
        if problem:
            raise ValueError(f"--steps: {problem}")
        if g is not None and not self.num_classes:
            raise ValueError("--guidance: this model is unconditional (model.class_conditional is false); "
                             "classifier-free guidance needs a class-conditional model")
        if g is not None and g < 0:
            raise ValueError(f"--guidance: must be >= 0, got {g}")

    @torch.no_grad()
    def sample(self, nets, generators, *, labels=None, steps=None, sampler=None, guidance=None):
        from diffusers.utils.torch_utils import randn_tensor

        unet = nets["unet"]
        device = next(unet.parameters()).device
        n = len(generators)
        # One generator per image: an image depends on its own seed only, not on the batch around it.
        x = randn_tensor(self.noise_shape(nets, n), generator=generators, device=device, dtype=torch.float32)
        g = self.cfg.guidance_scale if guidance is None else guidance
        if self.num_classes:
            if labels is None:
                labels = torch.tensor([i % self.num_classes for i in range(n)])
            labels = labels.to(device)
        else:
            labels = None

        def noise(like):  # fresh noise for stochastic samplers, from the images' own generators
            return randn_tensor(like.shape, generator=generators, device=like.device, dtype=like.dtype)

        x, self.last_nfe = self.form.sample(unet, x, labels, self.null_class, g, sampler or self.cfg.default_sampler,
                                            steps or self.cfg.sample_steps, generators, noise)
        return self.finish(nets, x)

    likelihood = "bound"
    likelihood_options = ("probes",)  # edm / flow: Hutchinson probes of the ODE's divergence

    def check_likelihood_options(self, options):
        given = super().check_likelihood_options(options)
        if given and self.cfg.formulation == "ddpm":
            raise ValueError("--probes: the variational bound of model.formulation ddpm takes no probes (edm and "
                             "flow's probability-flow ODE does)")
        return given

    def log_likelihood(self, nets, images, labels, generators, probes=None):
        """log p(x) in nats per image: ddpm's variational bound (:meth:`distgen.families.formulations.DDPM.variational_bound`); edm / flow: the
        probability-flow ODE's, of the dequantised image y = 2 (x + u) / 256 - 1 (u ~ U[0, 1)^D from the
        image's generator, then ``probes`` Rademacher probes from it), log P(x) >= E_u log p(y) - D log 128."""
        if not self.num_classes:
            labels = None  # the data may be labelled; an unconditional model ignores it
        elif labels is None:
            raise ValueError("a class-conditional model needs the labels of the images it scores")
        if self.cfg.formulation == "ddpm":
            return self.form.variational_bound(nets["unet"], images, labels, generators)
        from distgen.families.ode import dequantize, per_image

        y = (dequantize(images, generators) * 2 - 1).float()
        v = per_image("rademacher", generators, (probes or self.cfg.probes, *y.shape[1:]), y.device)
        logp = self.form.log_density(nets["unet"], y, labels, v, self.cfg.ode_tol)
        return logp - y[0].numel() * math.log(128)
