"""distgen's own diffusers pipelines, shipped in the exports of models diffusers has no pipeline for: a
class-conditional pixel U-Net (``class_conditional_pipeline.py``) and latent diffusion (``latent_pipeline.py``).

Each export folder gets one self-contained file, named in its ``model_index.json``, that
``diffusers.DiffusionPipeline.from_pretrained(EXPORT_DIR, trust_remote_code=True)`` loads without distgen: the
pipeline's class below, preceded by the denoising loop of :mod:`distgen.families.denoising` (the one
``distgen sample`` runs), both copied as source by :func:`write_pipeline`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from distgen.families import denoising
from distgen.families.capabilities import DiffusersPipeline
from distgen.families.denoising import denoise


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


# The shipped pipelines by class name: the file each export holds (its model_index.json names file and class)
PIPELINES = {"ClassConditionalDDPMPipeline": (ClassConditionalDDPMPipeline, "class_conditional_pipeline"),
             "LatentDiffusionPipeline": (LatentDiffusionPipeline, "latent_pipeline")}
_IMPORTS = ("from typing import List, Optional, Union\n\nimport torch\nfrom diffusers import DiffusionPipeline, "
            "ImagePipelineOutput\nfrom diffusers.utils.torch_utils import randn_tensor\n")


def pipeline_source(name: str) -> str:
    """The self-contained file of pipeline ``name``: torch and diffusers imports, the denoising loop, the class."""
    cls, stem = PIPELINES[name]
    head = (f'"""distgen\'s diffusers pipeline {name}, shipped with this export.\n\n'
            f'``diffusers.DiffusionPipeline.from_pretrained(EXPORT_DIR, trust_remote_code=True)`` loads it (the\n'
            f'export\'s model_index.json names it); it needs torch and diffusers only, not distgen.\n"""\n\n')
    loop = "\n\n".join(inspect.getsource(f) for f in (denoising.guided_prediction, denoising.denoise))
    return f"{head}{_IMPORTS}\n\n{loop}\n\n{inspect.getsource(cls)}"


def write_pipeline(folder: Path, spec: DiffusersPipeline) -> None:
    """Pipeline ``spec.pipeline`` saved into ``folder`` with its components (safetensors weights), its code beside
    them, named in ``model_index.json`` so that from_pretrained builds it from the folder."""
    cls, stem = PIPELINES[spec.pipeline]
    folder = Path(folder)
    cls(**spec.components).save_pretrained(folder, safe_serialization=True)
    (folder / f"{stem}.py").write_text(pipeline_source(spec.pipeline))
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = [stem, spec.pipeline]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
