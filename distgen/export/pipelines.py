"""distgen's own diffusers pipelines, shipped in the exports of models diffusers has no pipeline for: a
class-conditional pixel U-Net (``class_conditional_pipeline.py``), latent diffusion (``latent_pipeline.py``), and
the ``edm`` and ``flow`` formulations, pixel or latent (``edm_pipeline.py``, ``flow_pipeline.py``).

Each export folder gets one self-contained file, named in its ``model_index.json``, that
``diffusers.DiffusionPipeline.from_pretrained(EXPORT_DIR, trust_remote_code=True)`` loads without distgen: the
pipeline's class below, preceded by the functions it calls from :mod:`distgen.families.denoising` and
:mod:`distgen.families.karras` (the ones ``distgen sample`` runs), all copied as source by :func:`write_pipeline`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, EDMDPMSolverMultistepScheduler, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from distgen.families import denoising, karras
from distgen.families.capabilities import DiffusersPipeline
from distgen.families.denoising import denoise, guided_prediction
from distgen.families.karras import sample_euler, sample_flow_heun, sample_heun


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    """``pipe(class_labels=[0, 3, 7], guidance_scale=2.0)``: one image per label.

    The U-Net's last class embedding is the null class its training dropped
    labels to (classifier-free guidance, Ho & Salimans 2022).
    """

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_labels: Union[List[int], torch.Tensor], guidance_scale: float = 1.0,
                 generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 num_inference_steps: int = 50, output_type: str = "pil", return_dict: bool = True):
        device = self.unet.device
        labels = torch.as_tensor(class_labels, device=device).long()
        size = self.unet.config.sample_size
        shape = (len(labels), self.unet.config.in_channels, size, size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = denoise(self.unet, self.scheduler, x, labels, self.unet.config.num_class_embeds - 1, guidance_scale,
                    generator=generator, progress=self.progress_bar)
        image = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


class LatentDiffusionPipeline(DiffusionPipeline):
    """``pipe(batch_size=4)`` unconditionally, or ``pipe(class_labels=[0, 3, 7], guidance_scale=2.0)`` for a
    class-conditional U-Net, whose last class embedding is the null class of classifier-free guidance; the
    U-Net denoises in latent space, then the autoencoder decodes."""

    def __init__(self, vae, unet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels: Optional[Union[List[int], torch.Tensor]] = None,
                 guidance_scale: float = 1.0,
                 generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 num_inference_steps: int = 50, output_type: str = "pil", return_dict: bool = True):
        device = self.unet.device
        labels, null = None, None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=device).long()
            batch_size, null = len(labels), self.unet.config.num_class_embeds - 1
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, size, size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = denoise(self.unet, self.scheduler, x, labels, null, guidance_scale, generator=generator,
                    progress=self.progress_bar)
        image = self.vae.decode(x / self.vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def ode_start(pipe, batch_size, class_labels, generator):
    """The class labels (None: unconditional; default: image i gets class i mod num_classes, as ``distgen
    sample``) and the standard normal noise, float32, one generator per image as ``distgen sample`` draws it."""
    cfg, device = pipe.config, pipe.device
    labels = None
    if cfg.num_classes:
        if class_labels is None:
            class_labels = [i % cfg.num_classes for i in range(batch_size)]
        labels = torch.as_tensor(class_labels, device=device).long()
        batch_size = len(labels)
    elif class_labels is not None:
        raise ValueError("class_labels: this model is unconditional")
    shape = (batch_size, cfg.channels, cfg.sample_size, cfg.sample_size)
    return labels, randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)


def ode_images(pipe, x, output_type, return_dict):
    """The sampler's result as images on [0, 1] (latents decoded by the vae first), numpy NHWC or PIL."""
    if pipe.vae is not None:
        x = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    image = (x.clamp(-1, 1) / 2 + 0.5).cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "pil":
        image = pipe.numpy_to_pil(image)
    if not return_dict:
        return (image,)
    return ImagePipelineOutput(images=image)


class EDMPipeline(DiffusionPipeline):
    """distgen's ``edm`` formulation (Karras et al. 2022): ``pipe(batch_size=4)``, or ``pipe(class_labels=[0, 3],
    guidance_scale=2.0)`` for a class-conditional network, whose null class (the label its training dropped labels
    to, for classifier-free guidance) is ``num_classes``; with a ``vae``, latent diffusion, decoded at the end.
    ``sampler`` heun (distgen's default), euler or dpmpp_2m; left out, the sampler, steps and guidance are the
    model's defaults (this folder's model_index.json).

    The network F is called inside EDM's preconditioning D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4),
    which the scheduler, diffusers' ``EDMEulerScheduler`` (prediction_type "epsilon": c_out = +sigma sigma_d /
    sqrt(sigma^2 + sigma_d^2)), applies on its Karras sigmas (sigma_max -> sigma_min, rho; then 0):

    - euler: the scheduler's own step (equal to distgen's ``sample_euler``: 0 difference measured);
    - dpmpp_2m: diffusers' ``EDMDPMSolverMultistepScheduler`` (dpmsolver++, order 2, final sigma 0) built from the
      same config (equal to distgen's ``sample_dpmpp_2m`` within 2e-6 on images on [-1, 1]);
    - heun: diffusers has no EDM Heun scheduler (``HeunDiscreteScheduler`` takes its sigmas from a DDPM beta
      schedule), so the loop is distgen's ``sample_heun`` (EDM's Algorithm 2), shipped in this file, on the
      scheduler's sigmas and preconditioning.

    Two departures from the scheduler's stock use, both to sample what distgen samples: the noise starts at
    sigma_max (EDM's Algorithm 2), not at ``init_noise_sigma`` = sqrt(sigma_max^2 + 1); and with churn (s_churn
    > 0) euler runs distgen's ``sample_euler`` too, since ``EDMEulerScheduler.step`` adds the churn noise after
    the network has seen the unchurned x (Algorithm 2 evaluates D at the churned x and sigma).
    """

    _optional_components = ["vae"]

    def __init__(self, unet, scheduler, vae=None, channels=3, sample_size=32, num_classes=0, sampler="heun",
                 num_inference_steps=32, guidance_scale=1.0, s_churn=0.0, s_min=0.0, s_max=None, s_noise=1.0):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(channels=channels, sample_size=sample_size, num_classes=num_classes,
                                sampler=sampler, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, s_churn=s_churn, s_min=s_min, s_max=s_max,
                                s_noise=s_noise)

    @torch.no_grad()
    def __call__(self, batch_size=1, class_labels=None, guidance_scale=None, num_inference_steps=None,
                 sampler=None, generator=None, output_type="pil", return_dict=True):
        cfg = self.config
        sampler = sampler or cfg.sampler
        if sampler not in ("heun", "euler", "dpmpp_2m"):
            raise ValueError(f"sampler: heun, euler or dpmpp_2m, not {sampler!r}")
        g = cfg.guidance_scale if guidance_scale is None else guidance_scale
        steps = num_inference_steps or cfg.num_inference_steps
        labels, x = ode_start(self, batch_size, class_labels, generator)
        null = cfg.num_classes
        sched = self.scheduler
        if sampler == "dpmpp_2m":
            c = sched.config
            sched = EDMDPMSolverMultistepScheduler(sigma_min=c.sigma_min, sigma_max=c.sigma_max,
                                                   sigma_data=c.sigma_data, rho=c.rho, prediction_type="epsilon",
                                                   algorithm_type="dpmsolver++", solver_order=2,
                                                   final_sigmas_type="zero")
        sched.set_timesteps(steps, device=x.device)
        x = x * sched.sigmas[0].to(x.device)
        if sampler == "dpmpp_2m" or (sampler == "euler" and not cfg.s_churn):
            for t in self.progress_bar(sched.timesteps):
                out = guided_prediction(self.unet, sched.scale_model_input(x, t), t, labels, null, g)
                x = sched.step(out, t, x).prev_sample
        else:
            def denoise(x, sigma):  # D(x; sigma) at a float sigma, guided
                s = torch.tensor(sigma, dtype=x.dtype, device=x.device)
                out = guided_prediction(self.unet, sched.precondition_inputs(x, s), sched.precondition_noise(s),
                                        labels, null, g)
                return sched.precondition_outputs(x, out.to(x.dtype), s)

            def noise(like):  # the churn's fresh noise, from the images' own generators
                return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)

            loop = sample_heun if sampler == "heun" else sample_euler
            x, _ = loop(denoise, x, sched.sigmas.tolist(), s_churn=cfg.s_churn, s_min=cfg.s_min,
                        s_max=cfg.s_max, s_noise=cfg.s_noise, noise=noise)
        return ode_images(self, x, output_type, return_dict)


class FlowMatchingPipeline(DiffusionPipeline):
    """distgen's ``flow`` formulation (rectified flow / flow matching): ``pipe(batch_size=4)``, or
    ``pipe(class_labels=[0, 3], guidance_scale=2.0)`` for a class-conditional network (null class
    ``num_classes``); with a ``vae``, latent diffusion. ``sampler`` euler (distgen's default) or heun; the network
    predicts v = eps - x0 and sees 1000 t, the scheduler's timesteps (distgen's FLOW_T_SCALE).

    The scheduler is diffusers' ``FlowMatchEulerDiscreteScheduler`` with the model's timestep shift, given
    distgen's times explicitly: ``set_timesteps(sigmas=[1 - i / n, i < n])``, which it shifts (s t / (1 + (s - 1)
    t)) and ends at 0. Its default grid, linspace(1, 1/1000, n), is not distgen's 1 - i / n.

    - euler: the scheduler's own step (equal to distgen's ``sample_flow_euler`` within 2e-6 measured);
    - heun: distgen's ``sample_flow_heun``, shipped in this file, on the scheduler's times. Diffusers'
      ``FlowMatchHeunDiscreteScheduler`` differs in two ways: its set_timesteps takes no custom times (its default
      grid, as above), and it takes the last step into t = 0 by Euler alone (2n - 1 network evaluations) where
      distgen corrects that step too (v is defined at t = 0; 2n evaluations).
    """

    _optional_components = ["vae"]

    def __init__(self, unet, scheduler, vae=None, channels=3, sample_size=32, num_classes=0, sampler="euler",
                 num_inference_steps=32, guidance_scale=1.0):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(channels=channels, sample_size=sample_size, num_classes=num_classes,
                                sampler=sampler, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale)

    @torch.no_grad()
    def __call__(self, batch_size=1, class_labels=None, guidance_scale=None, num_inference_steps=None,
                 sampler=None, generator=None, output_type="pil", return_dict=True):
        cfg = self.config
        sampler = sampler or cfg.sampler
        if sampler not in ("euler", "heun"):
            raise ValueError(f"sampler: euler or heun, not {sampler!r}")
        g = cfg.guidance_scale if guidance_scale is None else guidance_scale
        n = num_inference_steps or cfg.num_inference_steps
        labels, x = ode_start(self, batch_size, class_labels, generator)
        null, sched = cfg.num_classes, self.scheduler
        sched.set_timesteps(sigmas=[1 - i / n for i in range(n)], device=x.device)
        if sampler == "euler":
            for t in self.progress_bar(sched.timesteps):
                x = sched.step(guided_prediction(self.unet, x, t, labels, null, g), t, x).prev_sample
        else:
            scale = sched.config.num_train_timesteps

            def velocity(x, t):  # v(x, t) at a float t, guided
                tt = torch.tensor(t * scale, dtype=x.dtype, device=x.device)
                return guided_prediction(self.unet, x, tt, labels, null, g).to(x.dtype)

            x, _ = sample_flow_heun(velocity, x, sched.sigmas.tolist())
        return ode_images(self, x, output_type, return_dict)


# The shipped pipelines by class name: the class, the file each export holds (its model_index.json names file
# and class) and the functions copied before the class, in order
_ODE = (denoising.guided_prediction, ode_start, ode_images)
PIPELINES = {"ClassConditionalDDPMPipeline": (ClassConditionalDDPMPipeline, "class_conditional_pipeline",
                                              (denoising.guided_prediction, denoising.denoise)),
             "LatentDiffusionPipeline": (LatentDiffusionPipeline, "latent_pipeline",
                                         (denoising.guided_prediction, denoising.denoise)),
             "EDMPipeline": (EDMPipeline, "edm_pipeline", (*_ODE, karras._churn, karras.sample_euler,
                                                           karras.sample_heun)),
             "FlowMatchingPipeline": (FlowMatchingPipeline, "flow_pipeline", (*_ODE, karras.sample_flow_heun))}
_IMPORTS = ("import math\nfrom typing import Callable, List, Optional, Union\n\nimport torch\n"
            "from diffusers import DiffusionPipeline, EDMDPMSolverMultistepScheduler, ImagePipelineOutput\n"
            "from diffusers.utils.torch_utils import randn_tensor\n\n"
            "Noise = Optional[Callable[[torch.Tensor], torch.Tensor]]  # the annotation of karras' samplers\n")


def pipeline_source(name: str) -> str:
    """The self-contained file of pipeline ``name``: torch and diffusers imports, the functions it calls (the ones
    ``distgen sample`` runs), the class."""
    cls, stem, functions = PIPELINES[name]
    head = (f'"""distgen\'s diffusers pipeline {name}, shipped with this export.\n\n'
            f'``diffusers.DiffusionPipeline.from_pretrained(EXPORT_DIR, trust_remote_code=True)`` loads it (the\n'
            f'export\'s model_index.json names it); it needs torch and diffusers only, not distgen.\n"""\n\n')
    loop = "\n\n".join(inspect.getsource(f) for f in functions)
    return f"{head}{_IMPORTS}\n\n{loop}\n\n{inspect.getsource(cls)}"


def write_pipeline(folder: Path, spec: DiffusersPipeline) -> None:
    """Pipeline ``spec.pipeline`` saved into ``folder`` with its components (safetensors weights) and settings,
    its code beside them, named in ``model_index.json`` so that from_pretrained builds it from the folder."""
    cls, stem, _ = PIPELINES[spec.pipeline]
    folder = Path(folder)
    cls(**spec.components).save_pretrained(folder, safe_serialization=True)
    (folder / f"{stem}.py").write_text(pipeline_source(spec.pipeline))
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = [stem, spec.pipeline]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
