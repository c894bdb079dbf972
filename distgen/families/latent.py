"""Latent diffusion, stage 2 (Rombach et al. 2022): the pixel-diffusion family on an autoencoder's latents.

The autoencoder is a diffusers ``AutoencoderKL`` folder, ``model.autoencoder``:
a ``distgen export`` of an ``autoencoder`` run (stage 1) or any local pretrained
one (never a hub download). It is frozen: no phase trains it. Latents are
``scaling_factor x`` posterior samples, drawn each step from the encoder's
distribution (encoding the images on the fly), or from the stored moments of
latent shards written by ``distgen data encode``. Schedulers, samplers and
classifier-free guidance are the pixel family's; samples are decoded at the end.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distgen.config.core import ConfigError
from distgen.config.models import LatentDiffusionConfig
from distgen.families.autoencoder import DecoderGraph, downsampling, load_autoencoder
from distgen.families.capabilities import DiffusersPipeline, Likelihood, OnnxGraph
from distgen.families.diffusion import Diffusion, scheduler_kwargs
from distgen.families.formulations import backbone


def latent_moments(ae, images: torch.Tensor) -> torch.Tensor:
    """The encoder's posterior of float NCHW images as [B, 2C, h, w]: mean and log-variance, unscaled."""
    return ae.encode(images).latent_dist.parameters


def draw_latents(moments: torch.Tensor, scaling_factor: float, generator) -> torch.Tensor:
    """scaling_factor x a posterior sample, from stored moments (the same draw ``latent_dist.sample`` makes)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(moments).sample(generator=generator) * scaling_factor


def latent_shape(net: torch.nn.Module) -> tuple[int, int]:
    """(channels, side) of the latents a denoiser takes: a UNet2DModel's config, a distgen backbone's own."""
    net = backbone(net)
    if hasattr(net, "resolution"):
        return net.channels, net.resolution
    return net.config.in_channels, net.config.sample_size


class LatentDiffusion(Diffusion):
    name = "latent_diffusion"
    config_cls = LatentDiffusionConfig

    def capabilities_off(self):
        return {**super().capabilities_off(),
                Likelihood: "in latent space (the bound of pixel diffusion does not carry over through a decoder)"}

    def scheduler_config(self) -> dict:
        return {**scheduler_kwargs(self.cfg), "clip_sample": False}  # latents are not confined to [-1, 1]

    def build_networks(self):
        ae = load_autoencoder(self.cfg.autoencoder)
        if self.cfg.scaling_factor is not None:
            ae.register_to_config(scaling_factor=float(self.cfg.scaling_factor))
        if ae.config.in_channels != self.data.channels:
            raise ConfigError(f"model.autoencoder: {self.cfg.autoencoder} takes {ae.config.in_channels}-channel "
                              f"images, data.channels is {self.data.channels}")
        f = downsampling(ae)
        if self.data.resolution % f:
            raise ConfigError(f"data.resolution: the autoencoder downsamples by {f}; {self.data.resolution} "
                              "is not a multiple of it")
        side = self.data.resolution // f
        try:
            net = self.denoiser(ae.config.latent_channels, side)
        except ConfigError as e:
            raise ConfigError(f"{e} (the latent side is data.resolution {self.data.resolution} / the autoencoder's "
                              f"downsampling {f} = {side}; change data.resolution, the autoencoder or the preset)"
                              ) from None
        return {"unet": self.form.wrap(net), "ae": ae}

    def ema_networks(self):
        return ["unet"]

    def clean(self, nets, batch, generator):
        ae = nets["ae"]  # frozen: a plain module in every phase
        sf = ae.config.scaling_factor
        if "latent" in batch:  # latent shards: the stored moments
            unet = nets.raw["unet"] if hasattr(nets, "raw") else nets["unet"]  # the module behind any engine
            c, side = latent_shape(unet)
            want = (2 * c, side, side)
            if tuple(batch["latent"].shape[1:]) != want:
                from distgen.errors import DataError

                raise DataError(f"latent shards hold moments of shape {list(batch['latent'].shape[1:])}, the "
                                f"autoencoder model.autoencoder gives {list(want)}: encode with the same autoencoder")
            return draw_latents(batch["latent"], sf, generator)
        with torch.no_grad():
            return draw_latents(latent_moments(ae, batch["image"]), sf, generator)

    def noise_shape(self, nets, n):
        c, side = latent_shape(nets["unet"])
        return (n, c, side, side)

    def finish(self, nets, x):
        ae = nets["ae"]
        return ae.decode(x / ae.config.scaling_factor).sample.clamp(-1, 1)

    def diffusers_pipeline(self, nets):
        """A diffusers folder: ``DiffusionPipeline.from_pretrained(out_dir)`` loads the autoencoder, the U-Net and
        the scheduler into ``LatentDiffusionPipeline`` (ddpm) or the pixel family's EDMPipeline /
        FlowMatchingPipeline with the vae (edm / flow), shipped in the folder, which decode to images."""
        if self.cfg.formulation != "ddpm" or self.cfg.backbone != "unet":
            return super().diffusers_pipeline(nets)
        return DiffusersPipeline("LatentDiffusionPipeline",
                                 {"vae": nets["ae"], "unet": nets["unet"], "scheduler": self.scheduler})

    def load_export(self, out_dir):
        out = Path(out_dir)
        return {"unet": self.load_denoiser(out), "ae": load_autoencoder(out / "vae", where=str(out))}

    def onnx_graphs(self, nets):
        ae = nets["ae"]
        c, side = latent_shape(nets["unet"])
        r = self.data.resolution
        decoder = OnnxGraph("decoder", DecoderGraph(ae), {"latents": torch.randn(2, c, side, side)}, ["image"],
                            {"latents": f"[batch, {c}, {side}, {side}] float32 latents (already divided by the "
                                        f"scaling factor)",
                             "image": f"[batch, {self.data.channels}, {r}, {r}] float32 on [-1, 1] (clamped)"})
        return super().onnx_graphs(nets) + [decoder]

    def onnx_sampler(self, nets):
        return {**super().onnx_sampler(nets), "decoder": "decoder",
                "scaling_factor": float(nets["ae"].config.scaling_factor)}
