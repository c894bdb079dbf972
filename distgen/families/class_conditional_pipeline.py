"""A diffusers pipeline for class-conditional pixel U-Nets, with classifier-free guidance.

This file is copied into every class-conditional export, where
``diffusers.DiffusionPipeline.from_pretrained(EXPORT_DIR)`` loads it (the
export's model_index.json names it), so it must not import distgen.
"""

from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


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
        null = torch.full_like(labels, self.unet.config.num_class_embeds - 1)
        size = self.unet.config.sample_size
        shape = (len(labels), self.unet.config.in_channels, size, size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            xin = self.scheduler.scale_model_input(x, t)
            if guidance_scale != 1.0:
                cond, uncond = self.unet(torch.cat([xin, xin]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            else:
                out = self.unet(xin, t, class_labels=labels).sample
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        image = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
