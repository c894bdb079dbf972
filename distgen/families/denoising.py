"""The denoising loop of the diffusion families, with classifier-free guidance (Ho & Salimans 2022): the one
torch implementation that ``distgen sample`` runs and that distgen's diffusers pipelines ship.

:mod:`distgen.export.pipelines` writes this module's functions into every ``class_conditional_pipeline.py`` /
``latent_pipeline.py`` it ships (``diffusers.DiffusionPipeline.from_pretrained`` loads them without distgen), so
they use torch and their arguments only: no other import, no name of this module's outside them.
The standalone ONNX sampler's numpy port (``guided`` in :mod:`distgen.export.sample_onnx`) is tested equal to
:func:`guided_prediction` (tests/test_ports.py).
"""

from __future__ import annotations

import torch


def guided_prediction(unet, x, t, labels=None, null_class=None, guidance=1.0):
    """The U-Net's prediction at ``x`` [B, ...] and step ``t``; for class ``labels`` and a guidance weight other
    than 1, uncond + w (cond - uncond), the unconditional pass given the ``null_class`` label its training dropped
    labels to (both passes in one batch of 2B). The network returns a tensor or diffusers' output (``.sample``)."""
    if labels is not None and guidance != 1.0:
        null = torch.full_like(labels, null_class)
        out = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null]))
        cond, uncond = (out if isinstance(out, torch.Tensor) else out.sample).chunk(2)
        return uncond + guidance * (cond - uncond)
    out = unet(x, t, class_labels=labels)
    return out if isinstance(out, torch.Tensor) else out.sample


def denoise(unet, scheduler, x, labels=None, null_class=None, guidance=1.0, generator=None, progress=None):
    """``x`` (noise at the scheduler's first timestep, its timesteps set) denoised step by step: the scheduler's
    update of :func:`guided_prediction` at every timestep. ``progress`` wraps the timesteps (a pipeline's
    progress bar)."""
    timesteps = scheduler.timesteps if progress is None else progress(scheduler.timesteps)
    for t in timesteps:
        xin = scheduler.scale_model_input(x, t)
        out = guided_prediction(unet, xin, t, labels, null_class, guidance)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x
