"""The diffusion families' denoising backbones (``model.backbone``) and their size presets (``model.preset``),
as plain data: the one home of every preset, read by the config check (which imports no torch) and by the
backbone modules of :mod:`distgen.families.backbones`, which build the networks from them.

- ``unet``: diffusers' UNet2DModel (Ho et al. 2020's U-Net): ``tiny`` for tests, ``small`` for the demo,
  ``ddpm-cifar10`` as in the DDPM paper (35.7M parameters).
- ``dit``: DiT (Peebles & Xie 2023): ``tiny``, ``small`` (Fashion-MNIST) and the paper's ``S|B|L|XL`` x
  ``/2|/4|/8`` (Table 1: S 12 layers, 384 wide, 6 heads; B 12/768/12; L 24/1024/16; XL 28/1152/16).
- ``edm2``: EDM2's magnitude-preserving U-Net (Karras et al. 2024): ``tiny``, ``small`` (Fashion-MNIST at 28 or
  32 px) and the paper's ImageNet-512 sizes ``xs`` ... ``xxl`` for 64x64x4 latents (Table 2).
"""

from __future__ import annotations

UNET_PRESETS: dict[str, dict] = {
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "ddpm-cifar10": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2, norm_num_groups=32,
                         dropout=0.1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}

_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

DIT_PRESETS: dict[str, dict] = {
    "tiny": dict(patch_size=2, hidden_size=64, depth=2, num_heads=2),
    # Fashion-MNIST (28 px: 7 x 7 tokens of 4 x 4 patches): as fast to train on a CPU as the small U-Net (patch 2's
    # 196 tokens were 6.5 times slower an image)
    "small": dict(patch_size=4, hidden_size=192, depth=6, num_heads=3),
    **{f"{size}/{p}": dict(patch_size=p, hidden_size=w, depth=d, num_heads=h)
       for size, (d, w, h) in _DIT_SIZES.items() for p in (2, 4, 8)},
}


def _edm2_paper(model_channels: int, dropout: float) -> dict:
    return dict(model_channels=model_channels, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8),
                channels_per_head=64, dropout=dropout)


EDM2_PRESETS: dict[str, dict] = {
    # a few tens of thousands of parameters: for tests
    "tiny": dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(14, 16), channels_per_head=16),
    # Fashion-MNIST at 28 px (levels 28, 14, 7) or 32 px (32, 16, 8): attention at the lowest level. Sized for a
    # CPU budget: twice the small U-Net's time an image (64 channels and 2 blocks a level were 11 times)
    "small": dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(7, 8),
                  channels_per_head=64),
    # EDM2's ImageNet-512 models on 64x64x4 latents (the paper's Table 2 sizes; dropout 0 for xs and s, 0.1 above)
    "xs": _edm2_paper(128, 0.0), "s": _edm2_paper(192, 0.0), "m": _edm2_paper(256, 0.1), "l": _edm2_paper(320, 0.1),
    "xl": _edm2_paper(384, 0.1), "xxl": _edm2_paper(448, 0.1),
}

BACKBONE_PRESETS: dict[str, dict[str, dict]] = {"unet": UNET_PRESETS, "dit": DIT_PRESETS, "edm2": EDM2_PRESETS}
