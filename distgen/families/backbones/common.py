"""What every backbone shares: the class-label convention and the save/load spec.

A backbone is called ``net(x, noise_cond, class_labels=None)``: ``x`` is [B, C, H, W], ``noise_cond`` a [B]
float (a DDPM timestep, or EDM's c_noise = ln(sigma) / 4: the backbone only embeds it), ``class_labels`` a [B]
long in ``[0, num_classes]`` where ``num_classes`` is the *null class* of classifier-free guidance (the index
the diffusion family drops labels to). A class-conditional backbone given no labels predicts for the null
class; an unconditional one (``num_classes == 0``) refuses labels, so a wiring mistake fails loudly instead of
being silently ignored. The result is a plain tensor shaped like ``x``.
"""

from __future__ import annotations

from typing import Optional

import torch


def conditioning_labels(class_labels: Optional[torch.Tensor], num_classes: int, x: torch.Tensor
                        ) -> Optional[torch.Tensor]:
    """The labels a class-conditional backbone embeds (None -> the null class), None for an unconditional one."""
    if not num_classes:
        if class_labels is not None:
            raise ValueError("this backbone is unconditional (num_classes=0): call it without class_labels")
        return None
    if class_labels is None:
        return torch.full((x.shape[0],), num_classes, dtype=torch.long, device=x.device)
    if class_labels.shape != (x.shape[0],):
        raise ValueError(f"class_labels must be [batch] = [{x.shape[0]}], got {list(class_labels.shape)}")
    return class_labels.to(device=x.device, dtype=torch.long)


def check_input(x: torch.Tensor, channels: int, resolution: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] != resolution or x.shape[3] != resolution:
        raise ValueError(f"expected x of shape [batch, {channels}, {resolution}, {resolution}], got {list(x.shape)}")


def jsonable(value):
    """Tuples as lists, recursively: a backbone's config as its JSON file will hold it."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value
