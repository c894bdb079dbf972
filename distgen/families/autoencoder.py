"""Stage 1 of latent diffusion: diffusers' ``AutoencoderKL`` (Rombach et al. 2022), trained with distgen.

The loss is LDM's: the reconstruction error summed over pixels (L1 or L2), a KL
term to N(0, I) with a small weight (``kl_weight``, 1e-6 in LDM), and
optionally an adversarial term from a patch discriminator (pix2pix's PatchGAN,
hinge loss) that starts after ``disc_start_kimg``. LDM's LPIPS term is left
out: its VGG weights cannot be downloaded here.

The export is a diffusers ``AutoencoderKL`` folder (``AutoencoderKL.from_pretrained``
loads it) whose ``scaling_factor`` is 1 / std of the latents of the training
data, computed when the export is written (:func:`latent_scaling_factor`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distgen.config.core import ConfigError
from distgen.config.models import AutoencoderConfig
from distgen.families.base import Family, Phase
from distgen.families.capabilities import Calibrates, ExportsDiffusers, ExportsOnnx, OnnxGraph, Reconstructs
from distgen.families.gan.losses import d_fake_term, d_real_term, g_term

# Encoder / decoder sizes. Each level after the first halves the image: f = 2 ** (levels - 1).
PRESETS: dict[str, dict] = {
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4),
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, latent_channels=4),
    # Stable Diffusion's KL-f8 autoencoder (83.7M parameters)
    "kl-f8": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4),
}


def autoencoder_kwargs(preset: str, channels: int, resolution: int) -> dict:
    kw = dict(PRESETS[preset])
    n = len(kw["block_out_channels"])
    kw.update(in_channels=channels, out_channels=channels, sample_size=resolution,
              down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    return kw


def load_autoencoder(folder: str | Path, where: str = "model.autoencoder"):
    """A diffusers AutoencoderKL from a local folder, safetensors only (no pickled code runs)."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{where}: {folder} is not an AutoencoderKL folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{where}: {folder} holds no .safetensors weights (pickled weights are not loaded)")
    try:
        return AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval().requires_grad_(False)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ConfigError(f"{where}: {folder}: {e}") from None


def downsampling(ae) -> int:
    """How many times smaller than the image an ``AutoencoderKL``'s latent side is."""
    return 2 ** (len(ae.config.block_out_channels) - 1)


class KLAutoencoder(nn.Module):
    """``AutoencoderKL`` behind one forward pass that returns what the loss needs, so DDP sees every
    parameter's gradient through its own forward (it wraps ``forward`` only, not ``encode``/``decode``)."""

    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def forward(self, x, generators=None):
        post = self.ae.encode(x).latent_dist
        z = post.sample(generator=generators)
        return self.ae.decode(z).sample, post.kl()


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN: stride-2 4x4 convolutions to a map of real / fake logits, one per patch.
    GroupNorm stands in for BatchNorm, whose per-rank batch statistics would differ under DDP."""

    def __init__(self, channels: int, width: int = 64, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers):
            mods += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        mods += [nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(8, c), nn.LeakyReLU(0.2), nn.Conv2d(c, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


class Autoencoder(Family, Reconstructs, Calibrates, ExportsOnnx, ExportsDiffusers):
    name = "autoencoder"
    config_cls = AutoencoderConfig

    def __init__(self, cfg: AutoencoderConfig, data):
        super().__init__(cfg, data)
        self.scaling_factor = None  # set from the data by calibrate() before an export

    def build_networks(self):
        from diffusers import AutoencoderKL

        nets = {"ae": KLAutoencoder(AutoencoderKL(**autoencoder_kwargs(self.cfg.preset, self.data.channels,
                                                                      self.data.resolution)))}
        if self.cfg.disc_weight > 0:
            nets["disc"] = PatchDiscriminator(self.data.channels, self.cfg.disc_width, self.cfg.disc_layers)
        return nets

    def phases(self):
        ph = [Phase("ae", "ae")]
        if self.cfg.disc_weight > 0:
            ph.append(Phase("disc", "disc"))
        return ph

    def ema_networks(self):
        return ["ae"]

    def shard_blocks(self, network, module):
        # FSDP2: AutoencoderKL's parts (encoder, quant_conv, post_quant_conv, decoder) each sharded on its own. The
        # AutoencoderKL as one unit, gathered around encode and then decode, is freed by the post-backward hook
        # at decode's input, and the backward through encode then found its weights freed ("The tensor has a
        # non-zero number of elements, but its data is not allocated yet"; torch 2.14, gloo; with disc_weight 0
        # as with the discriminator). Each part is called once in a forward.
        return super().shard_blocks(network, module.ae if network == "ae" else module)

    def engine_problem(self, zero_stage):
        if zero_stage == 3 and self.cfg.disc_weight > 0:
            return ("with the adversarial term each network runs outside its own engine in the other's phase, "
                    "and ZeRO-3 keeps parameters partitioned except inside their own engine's forward; use ZeRO-1 "
                    "or ZeRO-2, or disc_weight 0")
        return None

    def load_state_dict(self, state):
        # Checkpoints written before the step context kept a second count of images here; the run's own
        # count (meta.json's nimg, passed to loss as ctx.nimg) replaces it.
        super().load_state_dict({k: v for k, v in state.items() if k != "nimg"})

    def _adversarial(self, nimg: int) -> bool:
        """Whether the adversarial term is on for a step that starts after ``nimg`` images."""
        return self.cfg.disc_weight > 0 and nimg >= self.cfg.disc_start_kimg * 1000

    def loss(self, ctx, nets, batch, generator):
        phase = ctx.phase
        x = batch["image"]
        if phase == "disc":
            with torch.no_grad():
                fake, _ = nets["ae"](x, generator)
            real_logits, fake_logits = nets["disc"](x), nets["disc"](fake)
            on = 1.0 if self._adversarial(ctx.nimg) else 0.0  # before the start the discriminator is not trained
            hinge = (d_real_term("hinge", real_logits).mean(dim=(1, 2, 3))
                     + d_fake_term("hinge", fake_logits).mean(dim=(1, 2, 3)))
            return on * hinge, {"real_logit": real_logits.detach().mean(), "fake_logit": fake_logits.detach().mean()}
        rec, kl = nets["ae"](x, generator)
        err = (rec - x).abs() if self.cfg.recon == "l1" else (rec - x) ** 2
        loss = err.flatten(1).sum(1) + self.cfg.kl_weight * kl
        extras = {"recon_l1": (rec - x).detach().abs().mean(), "kl": kl.detach().mean()}
        if self._adversarial(ctx.nimg):
            g = g_term("hinge", nets["disc"](rec)).mean(dim=(1, 2, 3))
            loss = loss + self.cfg.disc_weight * g * x[0].numel()  # the same per-pixel scale as the sums
            extras["g_adv"] = g.detach().mean()
        return loss, extras

    @torch.no_grad()
    def sample(self, nets, generators, *, labels=None):
        """Decodes of latents drawn from N(0, I): the KL term's prior, a sanity check for grids only
        (the autoencoder is not a generative model on its own; stage 2 learns the latents' distribution)."""
        from diffusers.utils.torch_utils import randn_tensor

        ae = nets["ae"].ae
        size = self.data.resolution // downsampling(ae)
        dev = next(ae.parameters()).device
        z = randn_tensor((len(generators), ae.config.latent_channels, size, size), generator=generators, device=dev)
        return ae.decode(z).sample.clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, nets, images: torch.Tensor, generators) -> torch.Tensor:
        """uint8 NCHW -> reconstructions from the posterior mode, float NCHW on [-1, 1] (``--metrics recon``)."""
        ae = nets["ae"].ae
        return ae.decode(ae.encode(images.float() / 127.5 - 1).latent_dist.mode()).sample.clamp(-1, 1)

    calibration_images = 2048  # training images the export's latent scaling factor is computed from

    def calibrate(self, nets, images: torch.Tensor) -> None:
        g = [torch.Generator().manual_seed(i) for i in range(len(images))]
        self.scaling_factor = latent_scaling_factor(nets["ae"].ae, images.to(next(nets["ae"].parameters()).device), g)

    def export(self, nets, out_dir):
        """A diffusers ``AutoencoderKL`` folder, its ``scaling_factor`` set from the data (:meth:`calibrate`)."""
        ae = nets["ae"].ae
        if self.scaling_factor is not None:
            ae.register_to_config(scaling_factor=float(self.scaling_factor))
        ae.save_pretrained(Path(out_dir), safe_serialization=True)

    def load_export(self, out_dir):
        return {"ae": KLAutoencoder(load_autoencoder(out_dir, where=str(out_dir)))}

    def onnx_graphs(self, nets):
        ae = nets["ae"].ae
        c, r = self.data.channels, self.data.resolution
        lc, side = ae.config.latent_channels, r // downsampling(ae)
        latent = f"[batch, {lc}, {side}, {side}] float32"
        return [OnnxGraph("decoder", DecoderGraph(ae), {"latents": torch.randn(2, lc, side, side)}, ["image"],
                          {"latents": f"{latent} latents (unscaled: a posterior sample, not x scaling factor)",
                           "image": f"[batch, {c}, {r}, {r}] float32 on [-1, 1] (clamped)"}),
                OnnxGraph("encoder", _EncoderGraph(ae), {"image": torch.rand(2, c, r, r) * 2 - 1},
                          ["mean", "logvar"],
                          {"image": f"[batch, {c}, {r}, {r}] float32 images on [-1, 1]",
                           "mean": f"{latent} the posterior's mean (reconstructions decode it)",
                           "logvar": f"{latent} the posterior's log-variance"})]

    def onnx_sampler(self, nets):
        ae = nets["ae"].ae
        side = self.data.resolution // downsampling(ae)
        # as distgen sample: N(0, I) latents decoded (the autoencoder has no prior of its own)
        return {"kind": "decoder", "graph": "decoder", "shape": [ae.config.latent_channels, side, side],
                "scaling_factor": self.scaling_factor, "num_classes": 0}


class DecoderGraph(nn.Module):
    """An AutoencoderKL's decoder: latents -> images clamped to [-1, 1] (this family's
    ONNX graph, and the latent diffusion family's last one)."""

    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def forward(self, latents):
        return self.ae.decode(latents).sample.float().clamp(-1, 1)


class _EncoderGraph(nn.Module):
    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def forward(self, image):
        dist = self.ae.encode(image).latent_dist
        return dist.mean.float(), dist.logvar.float()


@torch.no_grad()
def latent_scaling_factor(ae, images: torch.Tensor, generators=None) -> float:
    """1 / std of posterior samples of ``images`` (float NCHW on [-1, 1]): LDM's ``scale_by_std``, which
    gives the diffusion model latents of unit variance."""
    z = ae.encode(images).latent_dist.sample(generator=generators)
    return float(1 / z.double().std())
