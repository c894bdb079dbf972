"""A diffusers pipeline for distgen's latent diffusion exports: U-Net in latent space, then the autoencoder.

This file is copied into every latent-diffusion export, where
``diffusers.DiffusionPipeline.from_pretrained(EXPORT_DIR)`` loads it (the
export's model_index.json names it), so it must not import distgen.
"""

from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class LatentDiffusionPipeline(DiffusionPipeline):
    """``pipe(batch_size=4)`` unconditionally, or ``pipe(class_labels=[0, 3, 7], guidance_scale=2.0)`` for a
    class-conditional U-Net, whose last class embedding is the null class of classifier-free guidance."""

    def __init__(self, vae, unet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels: Optional[Union[List[int], torch.Tensor]] = None,
                 guidance_scale: float = 1.0,
                 generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 num_inference_steps: int = 50, output_type: str = "pil", return_dict: bool = True):
        device = self.unet.device
        labels = None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, device=device).long()
            batch_size = len(labels)
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, size, size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            xin = self.scheduler.scale_model_input(x, t)
            if labels is not None and guidance_scale != 1.0:
                null = torch.full_like(labels, self.unet.config.num_class_embeds - 1)
                cond, uncond = self.unet(torch.cat([xin, xin]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            else:
                out = self.unet(xin, t, class_labels=labels).sample
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        image = self.vae.decode(x / self.vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
