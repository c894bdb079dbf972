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
from pathlib import Path

import torch

from distgen.config.backbones import UNET_PRESETS
from distgen.config.core import ConfigError
from distgen.config.models import DiffusionConfig
from distgen.families.base import DataInfo, Family, Phase
from distgen.families.capabilities import DiffusersPipeline, ExportsDiffusers, ExportsOnnx, Likelihood, OnnxGraph
from distgen.families.formulations import FLOW_T_SCALE, backbone, formulation, prediction

def scheduler_kwargs(cfg: DiffusionConfig) -> dict:
    return dict(num_train_timesteps=cfg.num_train_timesteps, prediction_type=cfg.prediction,
                beta_schedule="squaredcos_cap_v2" if cfg.beta_schedule == "cosine" else "linear",
                beta_start=1e-4, beta_end=0.02, clip_sample=True)


class Diffusion(Family, Likelihood, ExportsOnnx, ExportsDiffusers):
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

    def capabilities_off(self):
        f, b = self.cfg.formulation, self.cfg.backbone
        if b == "edm2":
            return {ExportsDiffusers: "with model.backbone edm2 (EDM2's U-Net is distgen's own network, diffusers "
                                      "has no class for it: the export is its safetensors and config, "
                                      "unet.safetensors and unet_config.json)"}
        if b == "dit" and not (self.name == "latent_diffusion" and f == "ddpm" and self.num_classes):
            return {ExportsDiffusers: "with model.backbone dit, a diffusers pipeline (DiTPipeline) is for "
                                      "class-conditional latent diffusion in formulation ddpm; the export is the "
                                      "transformer/ folder diffusers' DiTTransformer2DModel loads"}
        return {}  # ddpm's stock or shipped pipelines, edm / flow's shipped ones, DiTPipeline

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

    def export(self, nets, out_dir):
        from diffusers import DDPMPipeline

        if self.cfg.backbone == "edm2":  # distgen's own backbone module: its weights and constructor arguments
            from distgen.families.backbones import save_backbone

            save_backbone(out_dir, "unet", backbone(nets["unet"]))
            if nets.get("ae") is not None:  # latent diffusion's autoencoder beside it
                nets["ae"].save_pretrained(Path(out_dir) / "vae", safe_serialization=True)
            return
        if self.cfg.backbone == "dit":
            self.export_dit(nets, Path(out_dir))
            return
        if self.diffusers_pipeline(nets) is not None:
            raise NotImplementedError(f"the {self.name} family's export is distgen's own diffusers pipeline, "
                                      f"written by distgen.export (diffusers_pipeline)")
        # A standard diffusers pipeline folder: DiffusionPipeline.from_pretrained(out_dir) runs it.
        DDPMPipeline(unet=nets["unet"], scheduler=self.scheduler).save_pretrained(out_dir, safe_serialization=True)

    def diffusers_pipeline(self, nets):
        """None for an unconditional pixel ddpm model (the family's ``export`` writes diffusers' DDPMPipeline);
        else the pipeline distgen ships: DDPMPipeline cannot pass class labels (ClassConditionalDDPMPipeline),
        and edm / flow sample with schedulers diffusers has no stock pipeline for (EDMPipeline,
        FlowMatchingPipeline, pixel or latent: :mod:`distgen.export.pipelines` says which diffusers schedulers
        they run and where they ship distgen's own loop). ``unet/`` is the backbone alone (EDM2's uncertainty
        head weights the loss only), the folder ``load_export`` reads."""
        f = self.cfg.formulation
        if self.cfg.backbone != "unet":
            return None  # DiT: diffusers' own DiTPipeline or the transformer/ folder (export_dit); EDM2: distgen's
        if f == "ddpm":
            if not self.num_classes:
                return None
            return DiffusersPipeline("ClassConditionalDDPMPipeline",
                                     {"unet": nets["unet"], "scheduler": self.scheduler})
        shape = self.noise_shape(nets, 1)
        common = dict(unet=backbone(nets["unet"]), vae=nets.get("ae"), channels=shape[1], sample_size=shape[2],
                      num_classes=self.num_classes, sampler=self.cfg.default_sampler,
                      num_inference_steps=self.cfg.sample_steps, guidance_scale=self.cfg.guidance_scale)
        c = self.cfg
        if f == "edm":
            from diffusers import EDMEulerScheduler

            # prediction_type "epsilon" is EDM's c_out = +sigma sigma_d / sqrt(sigma^2 + sigma_d^2), distgen's
            sched = EDMEulerScheduler(sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data,
                                      rho=c.rho, prediction_type="epsilon", final_sigmas_type="zero")
            return DiffusersPipeline("EDMPipeline", {**common, "scheduler": sched, "s_churn": c.s_churn,
                                                     "s_min": c.s_min, "s_max": c.s_max, "s_noise": c.s_noise})
        from diffusers import FlowMatchEulerDiscreteScheduler

        # its timesteps are sigma x num_train_timesteps: the 1000 t distgen's network sees
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(FLOW_T_SCALE), shift=c.flow_shift)
        return DiffusersPipeline("FlowMatchingPipeline", {**common, "scheduler": sched})

    def load_export(self, out_dir):
        return {"unet": self.load_denoiser(Path(out_dir))}

    def export_dit(self, nets, out: Path) -> None:
        """A DiT's export: diffusers' DiTPipeline folder for class-conditional latent diffusion in ddpm (the
        class table laid out as DiTPipeline expects, its null class at row 1000), else the ``transformer/``
        folder diffusers' DiTTransformer2DModel loads (and latent diffusion's ``vae/``)."""
        from distgen.export.dit import save_dit_transformer, write_dit_pipeline

        dit = backbone(nets["unet"])
        if self.name == "latent_diffusion" and self.cfg.formulation == "ddpm" and self.num_classes:
            sampler = self.cfg.default_sampler if self.cfg.default_sampler != "ddpm" else "ddim"
            write_dit_pipeline(out, dit, nets["ae"], self.scheduler, sampler=sampler)
            return
        save_dit_transformer(out / "transformer", dit)
        if nets.get("ae") is not None:
            nets["ae"].save_pretrained(out / "vae", safe_serialization=True)

    def load_denoiser(self, out: Path) -> torch.nn.Module:
        """The denoiser :meth:`export` wrote into ``out``, checked against the data it was trained for."""
        if self.cfg.backbone == "dit":
            from distgen.export.dit import load_dit_transformer

            return load_dit_transformer(out / "transformer", self.num_classes)
        if self.cfg.backbone != "unet":
            from distgen.families.backbones import load_backbone

            net = load_backbone(out, "unet")
            if net.name != self.cfg.backbone:
                from distgen.errors import SampleError

                raise SampleError(f"{out / 'unet_config.json'}: a {net.name} backbone, the export's config says "
                                  f"model.backbone {self.cfg.backbone}")
            return net
        from diffusers import UNet2DModel

        return UNet2DModel.from_pretrained(out / "unet", use_safetensors=True)

    def onnx_graphs(self, nets):
        """ddpm: the U-Net's prediction at integer timesteps, unet(x, t[, labels]); edm: the preconditioned
        denoiser D(x, sigma[, labels]) (EDM2's uncertainty head left out: it weights the loss only); flow: the
        velocity v(x, t[, labels]) at the network's own time input, 1000 t (the sampler scales t, so the graph
        sees the float32 value distgen's network sees)."""
        f = self.cfg.formulation
        shape = self.noise_shape(nets, 2)
        space = "latents x scaling factor" if nets.get("ae") is not None else "images on [-1, 1]"
        dims = ", ".join(map(str, shape[1:]))
        net = backbone(nets["unet"])
        if f == "ddpm":
            inputs = {"x": torch.randn(shape), "t": torch.tensor([999, 10]) % self.cfg.num_train_timesteps}
            docs = {"x": f"[batch, {dims}] float32 noisy {space} at step t",
                    "t": f"[batch] int64 training timesteps in [0, {self.cfg.num_train_timesteps})",
                    "prediction": f"like x: the U-Net's {self.cfg.prediction} prediction"}
            name, module, out = "unet", _UNetGraph(net, self.num_classes > 0), "prediction"
        elif f == "edm":
            inputs = {"x": torch.randn(shape) * 2, "sigma": torch.tensor([2.0, 0.05])}
            docs = {"x": f"[batch, {dims}] float32 noisy {space} at noise level sigma",
                    "sigma": "[batch] float32 noise levels (> 0)",
                    "denoised": "like x: EDM's preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x; "
                                "ln(sigma) / 4)"}
            name, module, out = "denoiser", _EDMDenoiserGraph(net, self.form, self.num_classes > 0), "denoised"
        else:
            inputs = {"x": torch.randn(shape), "t": torch.tensor([900.0, 20.0])}
            docs = {"x": f"[batch, {dims}] float32 {space} on the flow's path at time t / {FLOW_T_SCALE:g}",
                    "t": f"[batch] float32 flow times scaled by {FLOW_T_SCALE:g} (the network's time input)",
                    "velocity": "like x: the predicted velocity eps - x0"}
            name, module, out = "velocity", _UNetGraph(net, self.num_classes > 0), "velocity"
        if self.num_classes:
            inputs["labels"] = torch.tensor([0, self.null_class])
            docs["labels"] = (f"[batch] int64 classes in [0, {self.num_classes}); {self.null_class} is the null "
                              f"class of classifier-free guidance")
        return [OnnxGraph(name, module, inputs, [out], docs)]

    def onnx_sampler(self, nets):
        c = self.cfg
        common = {"shape": list(self.noise_shape(nets, 1)[1:]), "steps": c.sample_steps,
                  "num_classes": self.num_classes, "guidance": c.guidance_scale}
        if c.formulation == "edm":
            return {"kind": "edm", "graph": "denoiser", "sampler": c.default_sampler, **common,
                    "sigma_min": c.sigma_min, "sigma_max": c.sigma_max, "rho": c.rho, "s_churn": c.s_churn,
                    "s_min": c.s_min, "s_max": c.s_max, "s_noise": c.s_noise}
        if c.formulation == "flow":
            return {"kind": "flow", "graph": "velocity", "sampler": c.default_sampler, **common,
                    "shift": c.flow_shift, "t_scale": FLOW_T_SCALE}
        # DPM-Solver++'s multistep update is not written out in sample_onnx.py: a dpmsolver model samples
        # there with DDIM, the deterministic sampler closest to it
        return {"kind": "diffusion", **common,
                "alphas_cumprod": self.scheduler.alphas_cumprod.double().tolist(), "prediction": c.prediction,
                "clip_sample": bool(self.scheduler.config.clip_sample),
                "sampler": c.default_sampler if c.default_sampler in ("ddpm", "ddim") else "ddim"}


class _UNetGraph(torch.nn.Module):
    """net(x, t[, labels])'s prediction (a tensor or diffusers' ``.sample``), the graph of a ddpm model's ONNX
    export (t: integer timesteps) and of a flow model's (t: 1000 x the flow time)."""

    def __init__(self, unet, conditional: bool):
        super().__init__()
        self.unet, self.conditional = unet, conditional

    def forward(self, x, t, labels=None):
        return prediction(self.unet(x, t, class_labels=labels if self.conditional else None)).float()


class _EDMDenoiserGraph(torch.nn.Module):
    """EDM's D(x, sigma[, labels]) with one sigma per row: the formulation's own preconditioning
    (:meth:`distgen.families.formulations.EDM.precondition`) around the backbone."""

    def __init__(self, net, form, conditional: bool):
        super().__init__()
        self.net, self.form, self.conditional = net, form, conditional

    def forward(self, x, sigma, labels=None):
        d, _ = self.form.precondition(self.net, x, sigma.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype),
                                      labels if self.conditional else None)
        return d.float()
