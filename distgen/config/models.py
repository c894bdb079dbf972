"""The ``model`` section of each family: one frozen dataclass per family, chosen by ``model.family``.

They live here, apart from the families' modules (which import torch and diffusers), so that checking a
config (``distgen train --dry-run``, ``launch/submit.py`` on a login node, reading a checkpoint's stored
config) imports neither torch nor any family. :data:`MODEL_CONFIGS` is the lookup a caller hands to
:func:`distgen.config.load_config`; ``distgen.families.FAMILIES`` pairs each name with its family class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from distgen.config.backbones import BACKBONE_PRESETS
from distgen.config.core import check
from distgen.config.formulations import FORMULATIONS, check_formulation_fields
from distgen.config.gan_archs import GAN_ARCHS, check_arch_fields
from distgen.config.schema import ModelConfig

# The differentiable augmentations a GAN may use (implemented in distgen.families.gan.augment).
AUGMENT_OPS = ("flip", "color", "translation", "cutout")


@dataclass(frozen=True)
class DiffusionConfig(ModelConfig):
    """The diffusion families' section: the shared fields, then each formulation's own (flat keys). Which
    fields belong to which formulation, its checks and samplers, is declared in
    :mod:`distgen.config.formulations`: a field of another formulation set away from its default is refused."""

    family: str = "diffusion"
    # the denoising network (distgen.families.backbones) and its size; the presets are each backbone's own
    # (distgen.config.backbones: unet tiny|small|ddpm-cifar10, dit tiny|small|S/2..XL/8, edm2 tiny|small|xs..xxl)
    backbone: Literal["unet", "dit", "edm2"] = "unet"
    preset: str = "small"
    formulation: Literal["ddpm", "edm", "flow"] = "ddpm"
    class_conditional: bool = False  # needs labelled data
    label_dropout: float = 0.1  # P(label -> null class) in training, for classifier-free guidance
    # default for grids and `distgen sample`; null: the formulation's (ddpm: ddim, edm: heun, flow: euler)
    sampler: Optional[Literal["ddpm", "ddim", "dpmsolver", "euler", "heun", "dpmpp_2m"]] = None
    sample_steps: int = 50
    guidance_scale: float = 1.0  # 1: plain conditional sampling
    # -- ddpm
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"
    beta_schedule: Literal["linear", "cosine"] = "linear"  # cosine: Nichol & Dhariwal 2021
    num_train_timesteps: int = 1000
    # -- edm (Karras et al. 2022; the paper's CIFAR-10 values)
    sigma_data: float = 0.5
    p_mean: float = -1.2  # training sigma = exp(N(p_mean, p_std^2))
    p_std: float = 1.2
    sigma_min: float = 0.002  # Karras' sampling schedule
    sigma_max: float = 80.0
    rho: float = 7.0
    edm_uncertainty: bool = False  # EDM2's learned per-sigma loss weighting u(sigma): lambda / e^u x L + u
    s_churn: float = 0.0  # the stochastic samplers' churn (0: the deterministic ODE)
    s_min: float = 0.0  # churn only where s_min <= sigma <= s_max (null: no upper bound)
    s_max: Optional[float] = None
    s_noise: float = 1.0
    # -- flow (rectified flow: x_t = (1 - t) x0 + t eps, the network predicts eps - x0)
    flow_t: Literal["uniform", "logit_normal"] = "logit_normal"  # SD3's training time distribution
    flow_mean: float = 0.0  # logit_normal's
    flow_std: float = 1.0
    flow_shift: float = 1.0  # t <- s t / (1 + (s - 1) t), in training and sampling (1: none)
    # -- edm, flow: bits/dim through the probability-flow ODE
    ode_tol: float = 1e-5  # RK45's rtol = atol (score_sde's 1e-5)
    probes: int = 1  # Hutchinson probes per image (--probes)
    sampling_fields = ("sampler", "sample_steps", "guidance_scale", "s_churn", "s_min", "s_max", "s_noise", "ode_tol",
                       "probes")

    def validate(self, path: str) -> None:
        presets = BACKBONE_PRESETS[self.backbone]
        check(self.preset in presets, f"{path}.preset",
              f"the {self.backbone} backbone's presets are {', '.join(presets)}, not {self.preset!r}")
        check(0 <= self.label_dropout < 1, f"{path}.label_dropout", "must be in [0, 1)")
        check(self.guidance_scale >= 0, f"{path}.guidance_scale", "must be >= 0")
        check_formulation_fields(self, path)

    @property
    def default_sampler(self) -> str:
        """``sampler``, or the formulation's default when it is null."""
        return self.sampler or FORMULATIONS[self.formulation].default_sampler


@dataclass(frozen=True)
class LatentDiffusionConfig(DiffusionConfig):
    family: str = "latent_diffusion"
    autoencoder: str = ""  # an AutoencoderKL folder (distgen export of stage 1, or a local pretrained one)
    scaling_factor: Optional[float] = None  # null: the autoencoder folder's own

    def validate(self, path: str) -> None:
        super().validate(path)
        check(bool(self.autoencoder), f"{path}.autoencoder",
              "is required: an AutoencoderKL folder (distgen export of an autoencoder run, or a local one)")
        check(self.scaling_factor is None or self.scaling_factor > 0, f"{path}.scaling_factor",
              f"must be > 0 or null, got {self.scaling_factor}")


@dataclass(frozen=True)
class AutoencoderConfig(ModelConfig):
    family: str = "autoencoder"
    preset: Literal["tiny", "small", "kl-f8"] = "small"
    recon: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6  # LDM's weight of the KL to N(0, I) against the summed reconstruction error
    disc_weight: float = 0.0  # > 0: add the patch discriminator's adversarial term with this weight
    disc_start_kimg: float = 0.0  # the adversarial term starts after this many thousand images
    disc_layers: int = 2  # stride-2 layers of the patch discriminator
    disc_width: int = 64

    def validate(self, path: str) -> None:
        check(self.kl_weight >= 0, f"{path}.kl_weight", f"must be >= 0, got {self.kl_weight}")
        check(self.disc_weight >= 0, f"{path}.disc_weight", f"must be >= 0, got {self.disc_weight}")
        check(self.disc_start_kimg >= 0, f"{path}.disc_start_kimg", "must be >= 0")
        check(self.disc_layers >= 1, f"{path}.disc_layers", f"must be >= 1, got {self.disc_layers}")
        check(self.disc_width >= 1, f"{path}.disc_width", f"must be >= 1, got {self.disc_width}")


@dataclass(frozen=True)
class GANConfig(ModelConfig):
    """The GAN family's section: the shared fields, then each arch's own (flat keys, as configs write them).
    Which fields belong to which arch, and their checks, is declared by the arch in
    :mod:`distgen.config.gan_archs`: a field that switches on another arch's feature is refused."""

    family: str = "gan"
    arch: Literal["mlp", "dcgan", "biggan", "stylegan2", "progan"] = "dcgan"
    preset: Literal["tiny", "small", "paper"] = "small"
    # lsgan: least squares (Mao et al. 2017); null: the arch's (wgan-gp for progan, as its paper; else nonsaturating)
    loss: Optional[Literal["minimax", "nonsaturating", "hinge", "wgan", "wgan-gp", "lsgan"]] = None
    # weight of the critic's drift penalty eps x D(x_real)^2 (ProGAN's wgan_epsilon, keeping scores near 0);
    # null: 0.001 for progan with wgan-gp, as its paper, else 0
    drift: Optional[float] = None
    d_steps: int = 1  # discriminator steps per generator step
    d_lr_scale: float = 1.0  # two time-scale rule (Heusel et al. 2017): D's lr = train.lr x this
    g_lr_scale: float = 1.0
    gp_weight: float = 10.0  # WGAN-GP's lambda
    clip: float = 0.01  # WGAN's weight clipping bound
    r1_gamma: float = 0.0  # R1 weight gamma (0: off); the penalty is gamma / 2 x ||grad D(x)||^2
    r1_every: int = 16  # lazy R1: every this many steps, scaled by it (1: every step)
    conditional: bool = False  # class labels into G and D (needs labelled data)
    info_categorical: int = 0  # InfoGAN: categories of one categorical code (0: none)
    info_continuous: int = 0  # InfoGAN: continuous codes, uniform in [-1, 1]
    info_weight: float = 1.0  # lambda of the mutual-information term
    augment: Literal["none", "diffaugment", "ada"] = "none"
    augment_ops: tuple[str, ...] = ("color", "translation", "cutout")
    ada_target: float = 0.6  # ADA's r_t target
    ada_interval: int = 4  # discriminator steps between p updates
    ada_kimg: float = 500.0  # p can move 0 -> 1 in this many thousand real images
    truncation: Optional[float] = None  # default at sampling: psi in W (stylegan2) or the z threshold (others)
    # -- mlp / dcgan
    spectral_norm: bool = False  # spectral norm in D for mlp / dcgan (BigGAN always has it in G and D)
    # -- biggan
    ortho_weight: float = 0.0  # BigGAN's orthogonal regularisation beta (1e-4 in the paper; 0: off)
    attn_res: Optional[int] = None  # BigGAN: self-attention at this resolution (0: none; null: the preset's)
    # -- stylegan2
    pl_weight: float = 0.0  # path-length regularisation weight (StyleGAN2; 2 in the paper; 0: off)
    pl_every: int = 4
    pl_decay: float = 0.01  # the running mean of path lengths moves by this fraction a step
    style_mixing: float = 0.9  # StyleGAN2: probability of mixing two latents in a training image
    # -- progan
    # ProGAN's growth (Karras et al. 2018), counted in training images: per doubling from 4x4, fade_kimg fading
    # the new block in, then stable_kimg at its resolution (the paper: 600 + 600); 0 + 0: no growth
    stable_kimg: float = 600.0
    fade_kimg: float = 600.0
    # ProGAN: images per process per step at 4x4, 8x8, ... (the first so many of train.batch_size's batch;
    # () or a shorter list: train.batch_size at the rest)
    batch_sizes: tuple[int, ...] = ()
    sampling_fields = ("truncation",)

    def validate(self, path: str) -> None:
        for name in ("d_steps", "r1_every", "ada_interval"):
            check(getattr(self, name) >= 1, f"{path}.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("d_lr_scale", "g_lr_scale", "clip", "ada_kimg"):
            check(getattr(self, name) > 0, f"{path}.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("gp_weight", "r1_gamma", "pl_weight", "ortho_weight", "info_weight",
                     "info_categorical", "info_continuous"):
            check(getattr(self, name) >= 0, f"{path}.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.info_categorical != 1, f"{path}.info_categorical", "a categorical code needs >= 2 categories")
        check(0 <= self.ada_target <= 1, f"{path}.ada_target", "must be in [0, 1]")
        bad = [o for o in self.augment_ops if o not in AUGMENT_OPS]
        check(not bad, f"{path}.augment_ops", f"unknown op(s) {bad}; choose from {', '.join(AUGMENT_OPS)}")
        check(self.drift is None or self.drift >= 0, f"{path}.drift", f"must be >= 0 or null, got {self.drift}")
        # The arch's own fields and checks, and no field that switches on another arch's feature
        check_arch_fields(self, path)

    @property
    def loss_kind(self) -> str:
        """The loss in use: ``loss``, or the arch's default when it is null."""
        return self.loss or GAN_ARCHS[self.arch].default_loss

    @property
    def drift_weight(self) -> float:
        """The drift penalty's weight: ``drift``, or the arch's with wgan-gp (ProGAN's 0.001) when it is null."""
        if self.drift is not None:
            return self.drift
        return GAN_ARCHS[self.arch].wgan_gp_drift if self.loss_kind == "wgan-gp" else 0.0


@dataclass(frozen=True)
class PixelCNNConfig(ModelConfig):
    family: str = "pixelcnn"
    preset: Literal["tiny", "small", "paper"] = "small"
    nr_resnet: Optional[int] = None  # null: the preset's
    nr_filters: Optional[int] = None
    nr_mix: Optional[int] = None  # logistic components
    dropout: float = 0.5  # in every gated block (0.5 in the paper)
    conditional: bool = False  # class labels into every block (needs labelled data)

    def validate(self, path: str) -> None:
        for k in ("nr_resnet", "nr_filters", "nr_mix"):
            v = getattr(self, k)
            check(v is None or v >= 1, f"{path}.{k}", f"must be >= 1 or null, got {v}")
        check(0 <= self.dropout < 1, f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class PixelRNNConfig(ModelConfig):
    family: str = "pixelrnn"
    preset: Literal["tiny", "small", "paper"] = "small"
    arch: Literal["row_lstm", "diagonal_bilstm"] = "diagonal_bilstm"  # the paper's best (3.00 bits/dim on CIFAR-10)
    layers: Optional[int] = None  # LSTM layers; null: the preset's
    hidden: Optional[int] = None  # LSTM units (the residual stream has twice as many features)
    nr_mix: Optional[int] = None  # logistic components of the output mixture
    temperature: float = 1.0  # default sampling temperature (`distgen sample --temperature`)
    sampling_fields = ("temperature",)

    def validate(self, path: str) -> None:
        for k in ("layers", "hidden", "nr_mix"):
            v = getattr(self, k)
            check(v is None or v >= 1, f"{path}.{k}", f"must be >= 1 or null, got {v}")
        check(self.temperature >= 0, f"{path}.temperature", f"must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class GlowConfig(ModelConfig):
    family: str = "glow"
    preset: Literal["tiny", "small", "paper"] = "small"
    levels: Optional[int] = None  # null: the preset's
    steps: Optional[int] = None  # flow steps per level
    hidden: Optional[int] = None  # coupling network width
    coupling: Literal["affine", "additive"] = "affine"
    conditional: bool = False  # a class-conditional prior (needs labelled data)
    temperature: float = 1.0  # default sampling temperature (`distgen sample --temperature`)
    sampling_fields = ("temperature",)

    def validate(self, path: str) -> None:
        for k in ("levels", "steps", "hidden"):
            v = getattr(self, k)
            check(v is None or v >= 1, f"{path}.{k}", f"must be >= 1 or null, got {v}")
        check(self.temperature >= 0, f"{path}.temperature", f"must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    family: str = "vae"
    arch: Literal["vae", "hvae"] = "vae"
    preset: Literal["tiny", "small", "paper"] = "small"
    likelihood: Literal["logistic", "gaussian", "bernoulli"] = "logistic"  # bernoulli: pixels binarised at 128
    nr_mix: int = 5  # logistic components
    beta: float = 1.0  # the KL's weight in training (beta-VAE; evaluation always uses 1)
    kl_warmup_kimg: float = 0.0  # the KL weight ramps linearly from 0 over this many thousand images
    free_bits: float = 0.0  # nats per latent group (batch mean) below which its KL is not pushed down
    iw_samples: int = 1  # bits/dim: 1 gives the ELBO, k > 1 the importance-weighted bound (--iw-samples)
    temperature: float = 1.0  # default sampling temperature (--temperature)
    sampling_fields = ("temperature", "iw_samples")

    def validate(self, path: str) -> None:
        check(self.nr_mix >= 1, f"{path}.nr_mix", f"must be >= 1, got {self.nr_mix}")
        check(self.beta >= 0, f"{path}.beta", f"must be >= 0, got {self.beta}")
        check(self.kl_warmup_kimg >= 0, f"{path}.kl_warmup_kimg", "must be >= 0")
        check(self.free_bits >= 0, f"{path}.free_bits", "must be >= 0")
        check(self.iw_samples >= 1, f"{path}.iw_samples", f"must be >= 1, got {self.iw_samples}")
        check(self.temperature >= 0, f"{path}.temperature", f"must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class Pix2PixConfig(ModelConfig):
    """pix2pix (Isola et al. 2017): a U-Net translates domain A to B from paired examples, against a
    PatchGAN that sees the input beside the output."""

    family: str = "pix2pix"
    preset: Literal["tiny", "small", "paper"] = "small"
    loss: Literal["nonsaturating", "lsgan"] = "nonsaturating"  # the paper's cGAN loss is the logistic one
    l1_weight: float = 100.0  # the paper's lambda of the L1 term
    norm: Literal["instance", "batch"] = "instance"  # the paper's batch norm at batch size 1 is instance norm
    dropout: float = 0.5  # in the U-Net's three innermost decoder blocks (the paper's noise source)
    d_layers: int = 3  # PatchGAN stride-2 layers: 3 gives the paper's 70x70 receptive field

    def validate(self, path: str) -> None:
        check(self.l1_weight >= 0, f"{path}.l1_weight", f"must be >= 0, got {self.l1_weight}")
        check(0 <= self.dropout < 1, f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.d_layers >= 1, f"{path}.d_layers", f"must be >= 1, got {self.d_layers}")


@dataclass(frozen=True)
class CycleGANConfig(ModelConfig):
    """CycleGAN (Zhu et al. 2017): two ResNet generators A->B and B->A, two PatchGANs, least-squares
    adversarial loss, cycle consistency and an identity term, from unpaired sets (data.train: A,
    data.train_b: B)."""

    family: str = "cyclegan"
    preset: Literal["tiny", "small", "paper"] = "small"
    loss: Literal["lsgan", "nonsaturating"] = "lsgan"
    blocks: Optional[int] = None  # residual blocks per generator (null: the paper's 6 below 256 px, 9 from 256)
    norm: Literal["instance", "batch"] = "instance"
    cycle_weight: float = 10.0  # the paper's lambda
    identity_weight: float = 0.5  # x lambda: the identity term ||G_AB(b) - b|| (0: off)
    pool_size: int = 50  # history of generated images the discriminators are shown (Shrivastava et al.)
    d_layers: int = 3

    def validate(self, path: str) -> None:
        check(self.blocks is None or self.blocks >= 1, f"{path}.blocks", f"must be >= 1 or null, got {self.blocks}")
        for name in ("cycle_weight", "identity_weight", "pool_size"):
            check(getattr(self, name) >= 0, f"{path}.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.d_layers >= 1, f"{path}.d_layers", f"must be >= 1, got {self.d_layers}")


@dataclass(frozen=True)
class EBMConfig(ModelConfig):
    """An energy-based model (IGEBM, Du & Mordatch 2019): contrastive divergence against short-run SGLD
    negatives kept in a replay buffer; with ``jem`` the energy is a classifier's -logsumexp of its logits
    (JEM, Grathwohl et al. 2020) and cross-entropy trains beside the p(x) term."""

    family: str = "ebm"
    preset: Literal["tiny", "small", "paper"] = "small"  # paper: JEM's WRN-28-10
    width: Optional[int] = None  # first stage's channels (null: the preset's)
    blocks: Optional[int] = None  # residual blocks per stage (null: the preset's)
    spectral_norm: bool = False  # on every conv / linear of the energy network (IGEBM's option)
    jem: bool = False  # JEM: K logits, E(x) = -logsumexp, + cross-entropy (needs labelled data)
    sgld_steps: int = 20  # SGLD steps per training step (JEM: 20)
    sgld_step_size: float = 1.0  # x <- x - step_size dE/dx + noise N(0, I) (JEM: 1)
    sgld_noise: float = 0.01  # the noise's standard deviation (JEM: 0.01)
    buffer_size: int = 10000  # replay buffer images per process (JEM: 10000); >= train.batch_size
    reinit_freq: float = 0.05  # share of chains restarted from uniform noise instead of the buffer (JEM: 0.05)
    # alpha of IGEBM's alpha (E(x+)^2 + E(x-)^2), which keeps energies near 0. It also caps the energy gap at
    # 1 / alpha: IGEBM's alpha 1 goes with its step size 10 (on [0, 1] pixels); with step size 1, 0.05
    energy_reg: float = 0.05
    diverge_energy: float = 1000.0  # stop when a record's mean |E| of data or samples, or |gap|, exceeds it (0: off)
    diverge_saturation: float = 0.99  # stop when more than this share of sample pixels sits at +-1 (1: off)
    sample_steps: int = 200  # SGLD steps of `distgen sample` / grids / eval (--steps)
    sample_step_size: Optional[float] = None  # their step size (--step-size; null: sgld_step_size)
    sampling_fields = ("sample_steps", "sample_step_size")

    def validate(self, path: str) -> None:
        for k in ("width", "blocks"):
            v = getattr(self, k)
            check(v is None or v >= 1, f"{path}.{k}", f"must be >= 1 or null, got {v}")
        for k in ("sgld_steps", "buffer_size", "sample_steps"):
            check(getattr(self, k) >= 1, f"{path}.{k}", f"must be >= 1, got {getattr(self, k)}")
        check(self.sgld_step_size > 0, f"{path}.sgld_step_size", f"must be > 0, got {self.sgld_step_size}")
        check(self.sample_step_size is None or self.sample_step_size > 0, f"{path}.sample_step_size",
              f"must be > 0 or null, got {self.sample_step_size}")
        for k in ("sgld_noise", "energy_reg", "diverge_energy"):
            check(getattr(self, k) >= 0, f"{path}.{k}", f"must be >= 0, got {getattr(self, k)}")
        check(0 <= self.reinit_freq <= 1, f"{path}.reinit_freq", f"must be in [0, 1], got {self.reinit_freq}")
        check(0 < self.diverge_saturation <= 1, f"{path}.diverge_saturation",
              f"must be in (0, 1] (1: off), got {self.diverge_saturation}")


@dataclass(frozen=True)
class ScoreConfig(ModelConfig):
    """Score-based models: NCSN / NCSNv2 (Song & Ermon 2019, 2020) over a geometric sequence of noise levels,
    and score SDEs (Song et al. 2021) in continuous time, trained by denoising or sliced (Song et al. 2019)
    score matching. VE / NCSN models see pixels on [0, 1], VP / sub-VP ones on [-1, 1], as in the papers."""

    family: str = "score"
    preset: Literal["tiny", "small", "paper"] = "small"  # paper: NCSN++ (ncsn, ve) / DDPM++ (vp, subvp), deep
    # ncsn: NCSN's discrete levels; ve / vp / subvp: the SDEs of Song et al. 2021, continuous time
    sde: Literal["ncsn", "ve", "vp", "subvp"] = "ve"
    objective: Literal["dsm", "ssm"] = "dsm"  # denoising or sliced score matching (one projection per image)
    sigma_min: float = 0.01  # ncsn, ve: the smallest noise level (pixels on [0, 1]; all papers: 0.01)
    sigma_max: float = 50.0  # the largest (NCSNv2's rule: the largest distance between two training images)
    num_scales: int = 1000  # ncsn: the levels L (NCSN 10, NCSNv2 232 on CIFAR-10); others: the PC sampler's N
    beta_min: float = 0.1  # vp, subvp: beta(0)
    beta_max: float = 20.0  # beta(1)
    likelihood_weighting: bool = False  # continuous DSM weighted by g(t)^2 (Song et al. 2021b) instead of std^2
    sampler: Optional[Literal["langevin", "pc", "ode"]] = None  # null: langevin for ncsn, pc for the SDEs
    sample_steps: Optional[int] = None  # langevin levels / pc steps (null: num_scales; ncsn: its levels only)
    n_steps_each: Optional[int] = None  # Langevin steps per level (null: 5 as NCSNv2) / pc corrector steps (null: 1)
    step_size: float = 6.2e-6  # annealed Langevin's eps: level i steps eps sigma_i^2 / sigma_L^2 (NCSNv2 CIFAR-10)
    snr: float = 0.16  # the pc Langevin corrector's signal-to-noise ratio (0.16 on CIFAR-10)
    predictor: Literal["reverse_diffusion", "euler_maruyama"] = "reverse_diffusion"  # the pc sampler's predictor
    denoise: bool = True  # a last noise-free step at the smallest level (Tweedie's denoising)
    ode_tol: float = 1e-5  # RK45's rtol = atol for ode sampling and bits/dim (the paper's 1e-5)
    probes: int = 1  # bits/dim: Hutchinson probes per image (--probes)
    sampling_fields = ("sampler", "sample_steps", "n_steps_each", "step_size", "snr", "predictor", "denoise",
                       "ode_tol", "probes")

    def validate(self, path: str) -> None:
        check(self.sigma_min > 0, f"{path}.sigma_min", f"must be > 0, got {self.sigma_min}")
        check(self.sigma_max > self.sigma_min, f"{path}.sigma_max",
              f"must be > sigma_min ({self.sigma_min}), got {self.sigma_max}")
        check(self.num_scales >= 2, f"{path}.num_scales", f"must be >= 2, got {self.num_scales}")
        check(self.beta_min > 0, f"{path}.beta_min", f"must be > 0, got {self.beta_min}")
        check(self.beta_max > self.beta_min, f"{path}.beta_max",
              f"must be > beta_min ({self.beta_min}), got {self.beta_max}")
        check(not (self.likelihood_weighting and self.sde == "ncsn"), f"{path}.likelihood_weighting",
              "weights the continuous SDEs' objective (g(t)^2); sde ncsn has discrete levels")
        check(not (self.sampler == "ode" and self.sde == "ncsn"), f"{path}.sampler",
              "ode needs a continuous-time SDE (ve, vp, subvp), not sde ncsn")
        check(not (self.sampler == "langevin" and self.sde in ("vp", "subvp")), f"{path}.sampler",
              f"annealed Langevin dynamics anneals noise levels x + sigma z: sde ncsn or ve, not {self.sde}")
        check(self.sample_steps is None or self.sample_steps >= 2, f"{path}.sample_steps",
              f"must be >= 2 or null, got {self.sample_steps}")
        check(self.sample_steps in (None, self.num_scales) or self.sde != "ncsn", f"{path}.sample_steps",
              f"sde ncsn samples at its num_scales ({self.num_scales}) trained levels; got {self.sample_steps}")
        check(self.n_steps_each is None or self.n_steps_each >= 0, f"{path}.n_steps_each",
              f"must be >= 0 or null, got {self.n_steps_each}")
        check(self.n_steps_each != 0 or self.default_sampler != "langevin", f"{path}.n_steps_each",
              "annealed Langevin dynamics needs >= 1 step per level (0 turns off only the pc corrector)")
        for name in ("step_size", "snr", "ode_tol"):
            check(getattr(self, name) > 0, f"{path}.{name}", f"must be > 0, got {getattr(self, name)}")
        check(self.ode_tol < 1, f"{path}.ode_tol", f"must be < 1, got {self.ode_tol}")
        check(self.probes >= 1, f"{path}.probes", f"must be >= 1, got {self.probes}")

    @property
    def default_sampler(self) -> str:
        return self.sampler or ("langevin" if self.sde == "ncsn" else "pc")


@dataclass(frozen=True)
class FFJORDConfig(ModelConfig):
    """FFJORD (Grathwohl et al. 2019): a multiscale continuous normalising flow, dz/dt = f(z, t) through
    concatsquash convolutions, solved by dopri5, its log-density by Hutchinson's trace estimator; optional
    kinetic-energy and Jacobian-norm regularisers (RNODE, Finlay et al. 2020)."""

    family: str = "ffjord"
    preset: Literal["tiny", "small", "paper"] = "small"  # paper: FFJORD's MNIST / CIFAR-10 multiscale model
    scales: Optional[int] = None  # multiscale levels (each but the last squeezes and factors out half); null: preset
    blocks: Optional[int] = None  # CNF blocks per stage (null: the preset's; FFJORD: 2)
    hidden: Optional[int] = None  # channels of the dynamics' hidden convolutions (FFJORD: 64)
    layers: Optional[int] = None  # hidden convolutions of the dynamics (FFJORD: 3)
    activation: Literal["softplus", "tanh"] = "softplus"  # smooth: the solver's steps follow f's smoothness
    time_length: float = 1.0  # each block integrates t in [0, T]
    rtol: Optional[float] = None  # dopri5's tolerances, training and evaluation (null: the preset's; paper 1e-5)
    atol: Optional[float] = None
    adjoint: bool = False  # odeint_adjoint in training: memory O(1) in the solver's steps, one more solve backward
    trace_estimator: Literal["rademacher", "gaussian"] = "rademacher"  # Hutchinson probes in training
    kinetic_energy: float = 0.0  # RNODE's lambda_K on int |f|^2 dt / D (0: off; RNODE 0.01)
    jacobian_norm: float = 0.0  # RNODE's lambda_J on int |eps^T df/dz|^2 dt / D (0: off; RNODE 0.01)
    alpha: float = 1e-6  # logit transform of the [0, 1] pixels: logit(alpha + (1 - 2 alpha) y) (FFJORD's MNIST)
    trace: Literal["hutchinson", "exact"] = "hutchinson"  # bits/dim's divergence (--trace); exact: D passes
    probes: int = 1  # bits/dim: Hutchinson probes per image and block (--probes)
    temperature: float = 1.0  # default sampling temperature (--temperature)
    sampling_fields = ("trace", "probes", "temperature")

    def validate(self, path: str) -> None:
        for k in ("scales", "blocks", "hidden", "layers"):
            v = getattr(self, k)
            check(v is None or v >= 1, f"{path}.{k}", f"must be >= 1 or null, got {v}")
        for k in ("rtol", "atol"):
            v = getattr(self, k)
            check(v is None or 0 < v < 1, f"{path}.{k}", f"must be in (0, 1) or null, got {v}")
        check(self.time_length > 0, f"{path}.time_length", f"must be > 0, got {self.time_length}")
        for k in ("kinetic_energy", "jacobian_norm"):
            check(getattr(self, k) >= 0, f"{path}.{k}", f"must be >= 0, got {getattr(self, k)}")
        check(0 <= self.alpha < 0.5, f"{path}.alpha", f"must be in [0, 0.5), got {self.alpha}")
        check(self.probes >= 1, f"{path}.probes", f"must be >= 1, got {self.probes}")
        check(self.temperature >= 0, f"{path}.temperature", f"must be >= 0, got {self.temperature}")


# ``model.family`` -> its section's dataclass.
MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    "diffusion": DiffusionConfig,
    "latent_diffusion": LatentDiffusionConfig,
    "autoencoder": AutoencoderConfig,
    "gan": GANConfig,
    "pixelcnn": PixelCNNConfig,
    "pixelrnn": PixelRNNConfig,
    "glow": GlowConfig,
    "vae": VAEConfig,
    "pix2pix": Pix2PixConfig,
    "cyclegan": CycleGANConfig,
    "score": ScoreConfig,
    "ebm": EBMConfig,
    "ffjord": FFJORDConfig,
}
