"""Model families, by name. Each is one module behind :class:`distgen.families.base.Family`."""

from __future__ import annotations

from distgen.families.autoencoder import Autoencoder
from distgen.families.base import DataInfo, Family, OptimSettings, Phase, PhaseNets, StepContext
from distgen.families.diffusion import Diffusion
from distgen.families.ebm import EBM
from distgen.families.ffjord import FFJORDFamily
from distgen.families.gan import GAN
from distgen.families.glow import GlowFamily
from distgen.families.latent import LatentDiffusion
from distgen.families.pixelcnn import PixelCNN
from distgen.families.pixelrnn import PixelRNN
from distgen.families.score import Score
from distgen.families.translation.cyclegan import CycleGAN
from distgen.families.translation.pix2pix import Pix2Pix
from distgen.families.vae import VAEFamily

# An explicit registry (no string reflection): config ``model.family`` -> class.
FAMILIES: dict[str, type[Family]] = {
    Diffusion.name: Diffusion,
    GAN.name: GAN,
    PixelCNN.name: PixelCNN,
    PixelRNN.name: PixelRNN,
    GlowFamily.name: GlowFamily,
    VAEFamily.name: VAEFamily,
    Autoencoder.name: Autoencoder,
    LatentDiffusion.name: LatentDiffusion,
    Pix2Pix.name: Pix2Pix,
    CycleGAN.name: CycleGAN,
    Score.name: Score,
    EBM.name: EBM,
    FFJORDFamily.name: FFJORDFamily,
}


def build_family(cfg, data: DataInfo) -> Family:
    return FAMILIES[cfg.family](cfg, data)


__all__ = ["FAMILIES", "DataInfo", "Family", "OptimSettings", "Phase", "PhaseNets", "StepContext", "build_family"]
