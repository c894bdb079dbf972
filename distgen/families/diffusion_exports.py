"""The diffusion families' exports, apart from their training and sampling (:mod:`distgen.families.diffusion`):
which capabilities a formulation x backbone pair has, the folder each writes and reads back, and its ONNX graphs.

- ``unet`` (diffusers' UNet2DModel): ddpm writes diffusers' DDPMPipeline (unconditional) or distgen's shipped
  ClassConditionalDDPMPipeline / LatentDiffusionPipeline; edm and flow the shipped EDMPipeline /
  FlowMatchingPipeline (:mod:`distgen.export.pipelines`).
- ``dit``: diffusers' own DiTPipeline for class-conditional latent diffusion in ddpm, else the ``transformer/``
  folder diffusers' DiTTransformer2DModel loads (:mod:`distgen.families.backbones.dit_diffusers`).
- ``edm2``: distgen's own network, its safetensors and config (``unet.safetensors``, ``unet_config.json``).

Every pair exports ONNX with ``sample_onnx.py``'s samplers for its formulation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distgen.families.capabilities import DiffusersPipeline, ExportsDiffusers, OnnxGraph
from distgen.families.formulations import FLOW_T_SCALE, backbone, prediction


class DiffusionExports:
    """The export side of :class:`distgen.families.diffusion.Diffusion` (a mixin: ``self`` is the family)."""

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
        from distgen.families.backbones.dit_diffusers import save_dit_transformer, write_dit_pipeline

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
            from distgen.families.backbones.dit_diffusers import load_dit_transformer

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
