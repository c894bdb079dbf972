"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") on diffusers' DiTTransformer2DModel.

The image is cut into ``patch_size`` x ``patch_size`` patches (tokens, with fixed sin-cos position embeddings),
run through ``depth`` transformer blocks conditioned by adaLN-Zero on the sum of a timestep embedding and a
class embedding, and put back together. What this module adds to diffusers' model:

- **One conditioning embedder, as in DiT.** diffusers gives every block its own timestep MLP and class table
  (a converted DiT checkpoint holds the same copy in each); here all blocks share block 0's, so the parameter
  counts are the paper's (DiT-XL/2: 675M; diffusers' per-block copies would add 75M). The state dict holds the
  shared embedder once (under block 0), and loading fills the other blocks' names from it.
- **No label dropout inside the network.** diffusers' LabelEmbedding drops labels to the null class with
  probability 0.1 in training mode, with its own unseeded random numbers and independently in every block;
  the diffusion family drops labels itself (``label_dropout``, seeded), so it is switched off here. The null
  class is index ``num_classes``, the table's extra row, as in DiT.
- **DiT's initialisation**: xavier-uniform linear layers (diffusers splits DiT's fused qkv into three, each
  initialised on its own), zero biases, N(0, 0.02) class table and timestep MLP, and the adaLN-Zero
  modulations and the final layer at zero, so every block starts as the identity and the output is 0.
- **No learned variance**: ``out_channels = channels``; DiT's released models predict a sigma too (2x the
  channels, 0.003% of DiT-XL/2's parameters).
- **Unconditional**: diffusers' DiT always embeds a class; an unconditional backbone has one class, always 0.

Presets: ``tiny`` (tests), ``small`` (Fashion-MNIST demo) and the paper's ``S|B|L|XL`` ``/2|/4|/8`` (Table 1:
S 12 layers, 384 wide, 6 heads; B 12/768/12; L 24/1024/16; XL 28/1152/16), which take 32x32x4 latents at
256 px.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from distgen.config.backbones import DIT_PRESETS
from distgen.families.backbones.common import check_input, conditioning_labels, jsonable

PRESETS: dict[str, dict] = DIT_PRESETS  # distgen.config.backbones: the one home of the presets

_SHARED = re.compile(r"^transformer_blocks\.(\d+)\.norm1\.emb\.(.*)$")


class DiT(nn.Module):
    """DiT as a distgen backbone: ``net(x, noise_cond, class_labels)`` -> a tensor shaped like ``x``."""

    name = "dit"
    PRESETS = PRESETS

    def __init__(self, channels: int, resolution: int, num_classes: int = 0, *, patch_size: int = 2,
                 hidden_size: int = 384, depth: int = 12, num_heads: int = 6):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        if resolution % patch_size:
            raise ValueError(f"dit: resolution {resolution} must be divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"dit: hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.config = jsonable(dict(channels=channels, resolution=resolution, num_classes=num_classes,
                                    patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads))
        self.dit = DiTTransformer2DModel(
            num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads, in_channels=channels,
            out_channels=channels, num_layers=depth, sample_size=resolution, patch_size=patch_size,
            num_embeds_ada_norm=max(num_classes, 1))
        blocks = self.dit.transformer_blocks
        shared = blocks[0].norm1.emb
        for block in blocks[1:]:
            block.norm1.emb = shared
        # the table keeps its null row (index num_classes); the family drops labels, not the network
        shared.class_embedder.dropout_prob = 0.0
        self._init_weights()
        self.register_state_dict_post_hook(_drop_shared)
        self.register_load_state_dict_pre_hook(_fill_shared)

    @torch.no_grad()
    def _init_weights(self):
        dit = self.dit
        for m in dit.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        proj = dit.pos_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        emb = dit.transformer_blocks[0].norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        for layer in [b.norm1.linear for b in dit.transformer_blocks] + [dit.proj_out_1, dit.proj_out_2]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, noise_cond: torch.Tensor, class_labels: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        check_input(x, self.channels, self.resolution)
        labels = conditioning_labels(class_labels, self.num_classes, x)
        if labels is None:
            labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # the one class
        t = noise_cond.reshape(-1).expand(x.shape[0])
        return self.dit(x, t, class_labels=labels, return_dict=False)[0]


def _drop_shared(module, state_dict, prefix, local_metadata):
    """State dict post-hook: the shared embedder once, under block 0."""
    head = prefix + "dit."
    for key in list(state_dict):
        m = _SHARED.match(key[len(head):]) if key.startswith(head) else None
        if m and m.group(1) != "0":
            del state_dict[key]


def _fill_shared(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load pre-hook: the other blocks' names for the shared embedder, from block 0's tensors."""
    head = prefix + "dit.transformer_blocks."
    zero = {k[len(head + "0.norm1.emb."):]: v for k, v in state_dict.items() if k.startswith(head + "0.norm1.emb.")}
    for i in range(1, len(module.dit.transformer_blocks)):
        for rest, v in zero.items():
            state_dict.setdefault(f"{head}{i}.norm1.emb.{rest}", v)
