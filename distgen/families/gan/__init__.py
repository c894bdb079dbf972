"""The GAN family: MLP, DCGAN, BigGAN-, StyleGAN2-style and progressive (ProGAN) networks behind one set of phases.

Phases (the trainer runs them; it knows nothing of GANs):

- ``D`` every step: real vs fake (fakes from the frozen generator, no graph),
  with WGAN-GP's penalty and InfoGAN's mutual-information term when enabled;
- ``D_r1`` every ``r1_every`` steps: lazy R1 (Karras et al. 2020), scaled by the interval;
- ``G`` every ``d_steps`` steps (k discriminator steps per generator step),
  through the frozen discriminator;
- ``G_pl`` every ``pl_every`` steps: StyleGAN2's path-length regulariser.

Phases of a network share its optimizer; lazy intervals correct its lr and
betas as StyleGAN2 does. The trainer keeps the generator's EMA, which is what
samples, evaluates and exports. Augmentation (DiffAugment or ADA) is applied
to real and fake alike; ADA's p and the path-length mean are family state,
stored in checkpoints.

ProGAN (arch ``progan``) grows: the resolution and fade-in alpha are a pure
function of the images seen (family state, counted in the ``D`` phase),
training images are box-downsampled to the current resolution here, and the
generator samples at the resolution it was last trained at, upsampled to the
full one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from distgen import dist
from distgen.config.core import ConfigError
from distgen.config.models import GANConfig
from distgen.families.base import DataInfo, Family, OptimSettings, Phase, load_module, save_module
from distgen.families.capabilities import ExportsOnnx, OnnxGraph
from distgen.families.gan import basic, biggan, progan, stylegan2
from distgen.families.gan.augment import ADA, augment
from distgen.families.gan.losses import d_loss, g_loss, gradient_penalty, path_lengths, r1_penalty

# arch -> (generator class, discriminator class, size presets)
ARCHS: dict[str, tuple[type[nn.Module], type[nn.Module], dict[str, dict]]] = {
    "mlp": (basic.MLPGenerator, basic.MLPDiscriminator, basic.PRESETS["mlp"]),
    "dcgan": (basic.DCGANGenerator, basic.DCGANDiscriminator, basic.PRESETS["dcgan"]),
    "biggan": (biggan.Generator, biggan.Discriminator, biggan.PRESETS),
    "stylegan2": (stylegan2.Generator, stylegan2.Discriminator, stylegan2.PRESETS),
    "progan": (progan.Generator, progan.Discriminator, progan.PRESETS),
}
GENERATOR_CONFIG = "generator_config.json"


class Critic(nn.Module):
    """The arch's discriminator, plus InfoGAN's Q head on its features (Chen et al. 2016):
    logits for the categorical code and means of the continuous ones."""

    def __init__(self, body: nn.Module, feature_dim: int, q_out: int):
        super().__init__()
        self.body = body
        self.q = nn.Sequential(nn.Linear(feature_dim, 128), nn.LeakyReLU(0.2), nn.Linear(128, q_out)) if q_out else None

    def forward(self, x, labels=None, **kw):
        logits, h = self.body(x, labels, **kw)  # kw: ProGAN's res and alpha
        return logits, (self.q(h) if self.q is not None else None)


class GAN(Family, ExportsOnnx):
    name = "gan"
    config_cls = GANConfig
    sample_options = ("truncation",)

    def validate_sample_options(self, options):
        t = options.get("truncation")
        if t is not None and self.cfg.arch == "progan":
            raise ValueError("--truncation: ProGAN (model.arch progan) has no truncation trick; sample without it")
        if t is not None and self.cfg.arch != "stylegan2" and t <= 0:
            raise ValueError(f"--truncation: the z threshold must be > 0, got {t}")

    def __init__(self, cfg: GANConfig, data: DataInfo):
        super().__init__(cfg, data)
        if cfg.conditional and data.num_classes < 1:
            raise ConfigError("model.conditional needs labelled data (the training manifest lists no classes)")
        r = data.resolution
        if cfg.arch != "mlp" and (r < 8 or r & (r - 1)):
            raise ConfigError(f"data.resolution: the {cfg.arch} networks need a power of two >= 8, got {r}")
        self.num_classes = data.num_classes if cfg.conditional else 0
        self.g_cls, self.d_cls, presets = ARCHS[cfg.arch]
        self.preset = dict(presets[cfg.preset])
        if cfg.arch == "biggan":
            valid = biggan.attention_resolutions(r)
            if cfg.attn_res is not None:
                if cfg.attn_res not in valid:
                    raise ConfigError(f"model.attn_res: must be one of {list(valid)} at resolution {r}, "
                                      f"got {cfg.attn_res}")
                self.preset["attn_res"] = cfg.attn_res
            elif self.preset["attn_res"] not in valid:
                # As BigGAN-PyTorch: the preset's attention resolution (64 for the paper's model) is
                # left out where the network has no such block (its CIFAR model has none).
                self.preset["attn_res"] = 0
        self.noise_dim = int(self.preset["z_dim"])
        self.n_cat, self.n_cont = cfg.info_categorical, cfg.info_continuous
        self.z_dim = self.noise_dim + self.n_cat + self.n_cont
        self.ops = tuple(cfg.augment_ops)
        self.ada = ADA(cfg.ada_target, cfg.ada_interval, cfg.ada_kimg) if cfg.augment == "ada" else None
        self.pl_mean = 0.0
        self.loss_kind = cfg.loss_kind
        # ProGAN's growth: images trained on so far, and the (resolution, alpha) of the current step
        self.nimg, self.res, self.alpha = 0, r, 1.0
        self.progressive = cfg.arch == "progan"
        if self.progressive:
            self._grow()

    # ---- networks
    def generator_kwargs(self) -> dict:
        return {"resolution": self.data.resolution, "channels": self.data.channels, "num_classes": self.num_classes,
                **self.preset, "z_dim": self.z_dim}

    def build_networks(self):
        G = self.g_cls(**self.generator_kwargs())
        dkw = dict(self.preset)
        if self.cfg.arch in ("mlp", "dcgan"):
            dkw["spectral"] = self.cfg.spectral_norm
        body = self.d_cls(self.data.resolution, self.data.channels, self.num_classes, **dkw)
        # The feature size (for the Q head) from a dummy pass in eval mode, which changes no buffer.
        body.eval()
        with torch.no_grad():
            x = torch.zeros(2, self.data.channels, self.data.resolution, self.data.resolution)
            _, h = body(x, torch.zeros(2, dtype=torch.long) if self.num_classes else None)
        body.train()
        self.num_ws = getattr(G, "num_ws", None)  # StyleGAN2's count of w inputs, for style mixing
        return {"G": G, "D": Critic(body, h.shape[1], self.n_cat + self.n_cont)}

    def phases(self):
        c = self.cfg
        out = [Phase("D", "D")]
        if c.r1_gamma > 0:
            out.append(Phase("D_r1", "D", c.r1_every))
        out.append(Phase("G", "G", c.d_steps))
        if c.pl_weight > 0:
            out.append(Phase("G_pl", "G", c.pl_every))
        return out

    def ema_networks(self):
        return ["G"]

    def optim_settings(self, network):
        c = self.cfg
        scale = c.d_lr_scale if network == "D" else c.g_lr_scale
        every = c.r1_every if network == "D" and c.r1_gamma > 0 else c.pl_every if network == "G" and c.pl_weight > 0 else 1
        if every == 1:
            return OptimSettings(scale)
        ratio = every / (every + 1)  # StyleGAN2: lazy regularisation steps the same optimizer
        return OptimSettings(scale * ratio, ratio)

    def compile_problem(self, network):
        c = self.cfg
        if network == "D" and (c.r1_gamma > 0 or self.loss_kind == "wgan-gp"):
            what = "R1" if c.r1_gamma > 0 else "wgan-gp's gradient penalty"
            return f"{what} differentiates through it twice, which torch.compile does not support"
        if c.arch == "dcgan":
            # Measured on an H100 (torch 2.11, bf16, channels_last): compiled, both of DCGAN's networks fail in
            # inductor's convolution_backward over their 4x4 maps ("expected size 256==256, stride 16==1"); eager
            # ran as fast (3590 img/s against 3524 compiled without channels_last).
            return "inductor's convolution backward fails on its 4x4 maps under channels_last (CUDA, torch 2.11)"
        if network == "G" and c.pl_weight > 0:
            return "the path-length regulariser differentiates through it twice, which torch.compile does not support"
        if c.arch == "progan":
            return ("ProGAN's blocks and fade-in weight change with the growth (a Python float alpha every step of a "
                    "fade), which would recompile the graph at every step")
        return None

    def engine_problem(self, zero_stage):
        if zero_stage == 3:
            return ("a GAN runs each network outside its own engine in the other's phase (the frozen discriminator "
                    "in the generator step, the generator in the discriminator step), and ZeRO-3 keeps parameters "
                    "partitioned except inside their own engine's forward; use ZeRO-1 or ZeRO-2")
        if self.cfg.pl_weight > 0:
            return ("the path-length regulariser differentiates the generator's output inside its engine's forward, "
                    "which sets off ZeRO's end-of-backward gradient reduction early (an IndexError in "
                    "reduce_ipg_grads, in fp32 as in bf16); use pl_weight 0 under DeepSpeed, or DDP")
        if self.loss_kind == "wgan":
            return ("WGAN's weight clipping edits the discriminator's weights after its optimizer step, and ZeRO's "
                    "optimizer keeps its own fp32 copy of them that would undo the clipping; use loss hinge or nonsaturating")
        return None

    def after_step(self, phase, raw):
        if phase == "D" and self.loss_kind == "wgan":
            with torch.no_grad():
                for p in raw["D"].parameters():
                    p.clamp_(-self.cfg.clip, self.cfg.clip)

    def state_dict(self):
        grow = {}
        if self.progressive:  # the images seen, and the (res, alpha) the next step trains at (for the reader)
            res, alpha = progan.growth(self.nimg, self.data.resolution, self.cfg.stable_kimg, self.cfg.fade_kimg)
            grow = {"nimg": self.nimg, "res": res, "alpha": alpha}
        return {"pl_mean": float(self.pl_mean), **grow, **({"ada": self.ada.state_dict()} if self.ada else {})}

    def load_state_dict(self, state):
        self.pl_mean = float(state.get("pl_mean", 0.0))
        if self.progressive:
            # res and alpha follow from the images seen; the stored pair is for reading a checkpoint
            self.nimg = int(state.get("nimg", 0))
            self._grow()
        if self.ada is not None:
            if "ada" not in state:
                raise ValueError("the checkpoint holds no ADA state but model.augment is ada")
            self.ada.load_state_dict(state["ada"])

    # ---- ProGAN's growth
    def _grow(self) -> None:
        """(res, alpha) of the step about to run, from the images seen before it."""
        c = self.cfg
        self.res, self.alpha = progan.growth(self.nimg, self.data.resolution, c.stable_kimg, c.fade_kimg)

    def _grow_kw(self) -> dict:
        """ProGAN's networks run at the current resolution and alpha; the others take no such argument."""
        return {"res": self.res, "alpha": self.alpha} if self.progressive else {}

    def _step_batch(self, nets, real, labels):
        """ProGAN, in the step's first phase (D): count the batch, set the growth for this step (the generator's
        ``growth`` buffer too, which its EMA copies and an export keeps), keep the resolution's batch size, and
        box-downsample (blending during a fade) the real images to the current resolution."""
        if not self.progressive:
            return real, labels
        self._grow()
        self.nimg += real.shape[0] * dist.world_size()
        nets.raw["G"].growth.copy_(torch.tensor([float(self.res), self.alpha]))
        return self._progan_reals(real, labels)

    def _progan_reals(self, real, labels):
        """The other phases (R1, G) use the step's resolution and batch size as set by its D phase."""
        if not self.progressive:
            return real, labels
        sizes, level = self.cfg.batch_sizes, int(self.res).bit_length() - 3
        if level < len(sizes):
            real = real[:sizes[level]]
            labels = labels[:sizes[level]] if labels is not None else None
        return progan.fade_reals(real, self.res, self.alpha), labels

    # ---- latents and images
    def _labels(self, batch: dict) -> Optional[torch.Tensor]:
        if not self.num_classes:
            return None
        if "label" not in batch:
            raise ConfigError("model.conditional: the batch carries no labels (set data.labels=true)")
        return batch["label"].to(batch["image"].device)

    def _latents(self, b: int, g: torch.Generator, device) -> tuple[torch.Tensor, dict]:
        """z with InfoGAN's codes appended, and the codes (categorical index, continuous values)."""
        parts = [torch.randn(b, self.noise_dim, device=device, generator=g)]
        codes = {}
        if self.n_cat:
            codes["cat"] = torch.randint(0, self.n_cat, (b,), device=device, generator=g)
            parts.append(F.one_hot(codes["cat"], self.n_cat).float())
        if self.n_cont:
            codes["cont"] = torch.rand(b, self.n_cont, device=device, generator=g) * 2 - 1
            parts.append(codes["cont"])
        return torch.cat(parts, 1), codes

    def _fake(self, G, b, labels, g, device, *, update_stats: bool) -> tuple[torch.Tensor, dict]:
        z, codes = self._latents(b, g, device)
        kw = dict(self._grow_kw(), upsample=False) if self.progressive else {}
        if self.cfg.arch == "stylegan2":
            kw = dict(noise_gen=g, update_w_avg=update_stats)
            if self.cfg.style_mixing > 0:
                num_ws = self.num_ws
                mix_z, _ = self._latents(b, g, device)
                cutoff = torch.randint(1, num_ws, (b,), device=device, generator=g)
                use = torch.rand(b, device=device, generator=g) < self.cfg.style_mixing
                kw.update(mix_z=mix_z, mix_cutoff=torch.where(use, cutoff, torch.full_like(cutoff, num_ws)))
        return G(z, labels, **kw), codes

    def _info(self, q: Optional[torch.Tensor], codes: dict) -> Optional[torch.Tensor]:
        """InfoGAN's lower bound on I(codes; G(z, codes)) as a per-sample loss: cross-entropy of the
        categorical code, and the Gaussian (unit variance) negative log-likelihood of the continuous ones."""
        if q is None:
            return None
        q = q.float()
        loss = torch.zeros(q.shape[0], device=q.device)
        if self.n_cat:
            loss = loss + F.cross_entropy(q[:, :self.n_cat], codes["cat"], reduction="none")
        if self.n_cont:
            loss = loss + 0.5 * (q[:, self.n_cat:] - codes["cont"]).square().sum(1)
        return loss

    def _aug(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.cfg.augment == "none":
            return x
        return augment(x, self.ops, 1.0 if self.ada is None else self.ada.p, g)

    # ---- the phases' losses: one method per phase, looked up by name
    def loss(self, ctx, nets, batch, generator):
        phase = ctx.phase
        losses = {"D": self._d_loss, "D_r1": self._r1_loss, "G": self._g_loss, "G_pl": self._pl_loss}
        if phase not in losses:
            raise ValueError(f"unknown GAN phase {phase!r}")
        return losses[phase](nets, batch["image"], self._labels(batch), generator)

    def _with_info(self, loss, extras: dict, q, codes: dict):
        """InfoGAN's term, when the model has codes."""
        info = self._info(q, codes)
        if info is not None:
            loss = loss + self.cfg.info_weight * info
            extras["info"] = info.detach().mean()
        return loss, extras

    def _d_loss(self, nets, real, labels, g):
        c, D = self.cfg, nets["D"]
        real, labels = self._step_batch(nets, real, labels)
        kw = self._grow_kw()
        with torch.no_grad():
            fake, codes = self._fake(nets["G"], real.shape[0], labels, g, real.device, update_stats=False)
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

    def _r1_loss(self, nets, real, labels, g):
        c = self.cfg
        real, labels = self._progan_reals(real, labels)
        x = real.detach().requires_grad_(True)
        r, q = nets["D"](self._aug(x, g), labels, **self._grow_kw())
        pen = r1_penalty(r, x)
        # "+ 0 x outputs" keeps every parameter in the graph, as DDP without unused-parameter search needs
        loss = pen * (c.r1_gamma / 2 * c.r1_every) + r.float() * 0
        if q is not None:
            loss = loss + q.float().sum(1) * 0
        return loss, {"r1": pen.detach().mean()}

    def _g_loss(self, nets, real, labels, g):
        c = self.cfg
        real, labels = self._progan_reals(real, labels)
        fake, codes = self._fake(nets["G"], real.shape[0], labels, g, real.device, update_stats=True)
        f, q = nets["D"](self._aug(fake, g), labels, **self._grow_kw())
        loss, extras = g_loss(self.loss_kind, f.float()), {}
        if self.progressive:  # the growth, logged as G/res and G/alpha
            extras.update(res=float(self.res), alpha=float(self.alpha))
        if c.ortho_weight > 0:
            ortho = nets.raw["G"].orthogonal_penalty()
            loss = loss + c.ortho_weight * ortho
            extras["ortho"] = ortho.detach()
        return self._with_info(loss, extras, q, codes)

    def _pl_loss(self, nets, real, labels, g):
        c = self.cfg
        n = max(real.shape[0] // 2, 1)  # StyleGAN2 runs the regulariser on half batches
        z, _ = self._latents(n, g, real.device)
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

    # ---- sampling and export
    def _z_one(self, gen: torch.Generator, threshold: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's z (truncated-normal resampling beyond ``threshold``: BigGAN's truncation trick)."""
        z, _ = self._latents(1, gen, gen.device)
        if threshold is not None:
            noise = z[:, :self.noise_dim]
            while True:
                out = noise.abs() > threshold
                if not out.any():
                    break
                noise = torch.where(out, torch.randn(noise.shape, device=gen.device, generator=gen), noise)
            z = torch.cat([noise, z[:, self.noise_dim:]], 1)
        return z

    @torch.no_grad()
    def sample(self, nets, generators, *, labels=None, truncation=None):
        G = nets["G"]
        device = next(G.parameters()).device
        t = self.cfg.truncation if truncation is None else truncation
        style = self.cfg.arch == "stylegan2"
        self.validate_sample_options({"truncation": t})  # for callers of sample() itself
        # One generator per image: an image depends on its own seed only.
        z = torch.cat([self._z_one(gen, None if style else t) for gen in generators]).to(device)
        if self.num_classes:
            if labels is None:
                labels = torch.tensor([i % self.num_classes for i in range(len(generators))])
            labels = labels.to(device)
        else:
            labels = None
        x = G(z, labels, truncation=t) if style else G(z, labels)
        return x.float().clamp(-1, 1)

    def export(self, nets, out_dir):
        """The EMA generator as ``generator.safetensors`` and a JSON that rebuilds it (``arch`` + constructor kwargs)."""
        save_module(out_dir, "generator", nets["G"], {
            "arch": self.cfg.arch, "kwargs": self.generator_kwargs(), "noise_dim": self.noise_dim,
            "info_categorical": self.n_cat, "info_continuous": self.n_cont, "truncation": self.cfg.truncation,
            # ProGAN: the (resolution, alpha) it samples at, also in its ``growth`` buffer (for the reader)
            **({"growth": nets["G"].growth.tolist()} if self.progressive else {})})

    def load_export(self, out_dir):
        def build(spec):
            if spec["arch"] not in ARCHS:
                raise ValueError(f"{Path(out_dir) / GENERATOR_CONFIG}: unknown arch {spec['arch']!r}")
            return ARCHS[spec["arch"]][0](**spec["kwargs"])

        return {"G": load_module(out_dir, "generator", build)}

    def onnx_graphs(self, nets):
        style = self.cfg.arch == "stylegan2"
        inputs = {"z": torch.randn(2, self.z_dim)}
        docs = {"z": f"[batch, {self.z_dim}] float32: {self.noise_dim} N(0, 1) values"
                     + (f", then InfoGAN's categorical code one-hot ({self.n_cat})" if self.n_cat else "")
                     + (f", then its continuous codes U(-1, 1) ({self.n_cont})" if self.n_cont else ""),
                "image": f"[batch, {self.data.channels}, {self.data.resolution}, {self.data.resolution}] float32 "
                         f"on [-1, 1] (clamped)"}
        if self.num_classes:
            inputs["labels"] = torch.arange(2) % self.num_classes
            docs["labels"] = f"[batch] int64 class indices in [0, {self.num_classes})"
        if style:
            inputs["truncation"] = torch.tensor(0.7)
            docs["truncation"] = "scalar float32 psi of the truncation trick, w <- w_avg + psi (w - w_avg); 1 = off"
        fixed = {}
        if self.progressive:  # the stage it samples at (its growth buffer) becomes a constant of the graph
            res, alpha = nets["G"].growth.tolist()
            fixed = {"res": int(round(res)), "alpha": float(alpha)}
        return [OnnxGraph("generator", _GeneratorGraph(nets["G"], self.num_classes > 0, style, fixed), inputs,
                          ["image"], docs, static=("truncation",))]

    def onnx_sampler(self, nets):
        return {"kind": "gan", "graph": "generator", "noise_dim": self.noise_dim, "info_categorical": self.n_cat,
                "info_continuous": self.n_cont, "num_classes": self.num_classes, "truncation": self.cfg.truncation,
                # StyleGAN2 truncates w (an input of the graph); the others resample |z| beyond the threshold
                "truncation_kind": {"stylegan2": "psi", "progan": None}.get(self.cfg.arch, "resample")}


class _GeneratorGraph(nn.Module):
    """G(z[, labels][, truncation]) -> image clamped to [-1, 1], the graph of a GAN's ONNX export."""

    def __init__(self, G: nn.Module, conditional: bool, style: bool, fixed: dict):
        super().__init__()
        self.G, self.conditional, self.style, self.fixed = G, conditional, style, fixed

    def forward(self, z, labels=None, truncation=None):
        kw = {"truncation": truncation} if self.style else dict(self.fixed)
        return self.G(z, labels if self.conditional else None, **kw).float().clamp(-1, 1)
