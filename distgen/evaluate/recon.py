"""``recon``: the family reconstructs the test split (a VAE, :class:`distgen.families.capabilities.Reconstructs`);
PSNR and SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) per image on the 0..255 scale, averaged over
every image once. :func:`psnr` and :func:`ssim` also score translations against their ground truth."""

from __future__ import annotations

import torch

from distgen import dist
from distgen.errors import EvalError
from distgen.evaluate.passes import batches_of_test_split
from distgen.evaluate.spec import EvalSpec


def recon(family, nets, data_cfg, spec: EvalSpec, device: torch.device) -> dict:
    """Mean PSNR and SSIM of the family's reconstructions of the test split."""
    from distgen.sample import to_uint8

    psnr_sum, ssim_sum, n = 0.0, 0.0, 0
    with torch.no_grad():
        for x, _labels, gens in batches_of_test_split(spec, data_cfg, "recon", device):
            rec = torch.from_numpy(to_uint8(family.reconstruct(nets, x, gens))).permute(0, 3, 1, 2)
            p, q = psnr(x.cpu(), rec), ssim(x.cpu(), rec)
            psnr_sum += float(p.sum())
            ssim_sum += float(q.sum())
            n += x.shape[0]
    psnr_sum, ssim_sum, n = dist.all_reduce_floats([psnr_sum, ssim_sum, float(n)])
    if n == 0:
        raise EvalError(f"recon: the test shards {spec.test} hold no images")
    return {"psnr": psnr_sum / n, "ssim": ssim_sum / n, "recon_images": int(n)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 NCHW images (peak 255); identical images give +inf."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of uint8 NCHW images: Gaussian-weighted local statistics over the
    window positions that fit inside the image, averaged over positions and channels. Images smaller
    than the window use the largest odd window that fits."""
    import torch.nn.functional as F

    x, y = a.double(), b.double()
    c = x.shape[1]
    size = min(size, (min(x.shape[2:]) - 1) // 2 * 2 + 1)
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(c, 1, size, size)
    f = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return m.flatten(1).mean(1)
