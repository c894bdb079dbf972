"""What a family may offer beyond the core contract of :class:`distgen.families.base.Family`.

A family declares a capability by inheriting its class (``class VAEFamily(Family, Likelihood, Reconstructs,
Interpolates, ExportsOnnx)``) and implementing its methods. :func:`offers` (and :func:`missing`, which says
why not) is the one place that asks whether a family has one: evaluation, sampling, translation and export call
it, never ``hasattr``. A configuration may switch a declared capability off (score models' NCSN has no
likelihood, an EBM classifies only as JEM): the family says so, and why, in ``Family.capabilities_off``.

``distgen families`` prints the table of families x capabilities from these declarations
(:mod:`distgen.families.table`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn


def checked_options(options: dict[str, Any], allowed, refusal: str) -> dict[str, Any]:
    """The options that are set, or a ValueError ``<refusal> --a, --b (it takes: ...)`` naming those set but not
    ``allowed``, as command-line flags."""
    given = {k: v for k, v in options.items() if v is not None}
    bad = sorted(set(given) - set(allowed))
    if bad:
        flags = lambda names: ", ".join("--" + n.replace("_", "-") for n in names)  # noqa: E731
        raise ValueError(f"{refusal} {flags(bad)} (it takes: {flags(allowed) or 'none'})")
    return given


class Capability:
    """Base of the optional capabilities. ``column`` names it in ``distgen families``' table; ``lacking`` ends
    the sentence ``the <name> family ...`` that says a family does not offer it."""

    column: ClassVar[str] = ""
    lacking: ClassVar[str] = ""


class Likelihood(Capability):
    """log p(x) of discrete images, exact or a bound: the ``bpd`` metric (bits per dimension)."""

    column = "bits/dim"
    lacking = "supplies no log-likelihood"
    likelihood: ClassVar[str] = "exact"  # or "bound" (reported as bpd_kind)
    # Keyword options of log_likelihood() (``distgen eval`` flags, e.g. a VAE's --iw-samples); others are refused
    likelihood_options: ClassVar[tuple[str, ...]] = ()

    def check_likelihood_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The log-likelihood options that are set, or a ValueError naming any this family does not take."""
        return checked_options(options, self.likelihood_options, f"the {self.name} family's likelihood takes no option")

    def log_likelihood(self, nets: dict[str, nn.Module], images: torch.Tensor, labels: Optional[torch.Tensor],
                       generators: list[torch.Generator], **options) -> torch.Tensor:
        """log p(x) in nats per image (or a lower bound) of uint8 NCHW ``images``, discrete pixel values.
        One generator per image for anything stochastic (dequantisation noise, posterior samples)."""
        raise NotImplementedError


class Reconstructs(Capability):
    """Images back through the model's latent: the ``recon`` metric (PSNR / SSIM)."""

    column = "recon"
    lacking = "does not reconstruct images"

    def reconstruct(self, nets: dict[str, nn.Module], images: torch.Tensor, generators) -> torch.Tensor:
        """Reconstructions of uint8 NCHW ``images``, float NCHW on [-1, 1]."""
        raise NotImplementedError


class Interpolates(Capability):
    """A path in latent space between two images (``distgen sample --interpolate``)."""

    column = "interpolate"
    lacking = "has no latent interpolation"

    def interpolate(self, nets: dict[str, nn.Module], a: torch.Tensor, b: torch.Tensor, steps: int = 8
                    ) -> torch.Tensor:
        """``steps`` images from image ``a`` to image ``b`` (uint8 CHW), float NCHW on [-1, 1]."""
        raise NotImplementedError


class Classifies(Capability):
    """Class logits of images (JEM): the ``accuracy`` metric."""

    column = "classify"
    lacking = "does not classify images"

    def classify(self, nets: dict[str, nn.Module], images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, K] of float NCHW ``images`` on [-1, 1]."""
        raise NotImplementedError


class Translates(Capability):
    """Maps input images of domain A to domain B (and CycleGAN B to A) instead of sampling from noise:
    ``distgen sample --input`` and the ``paired`` / ``target_class`` metrics."""

    column = "translate"
    lacking = "translates nothing (pix2pix and CycleGAN do)"
    directions: ClassVar[tuple[str, ...]] = ("AtoB",)

    def check_direction(self, direction: Optional[str]) -> str:
        """``direction`` (None: AtoB) if this translator maps that way, else a ValueError naming --direction."""
        d = direction or "AtoB"
        if d not in self.directions:
            raise ValueError(f"--direction: the {self.name} family translates {' and '.join(self.directions)}, "
                             f"not {d}")
        return d

    def translate(self, nets: dict[str, nn.Module], images: torch.Tensor, direction: str = "AtoB") -> torch.Tensor:
        """Float NCHW ``images`` on [-1, 1] of the input domain, translated (float NCHW on [-1, 1])."""
        raise NotImplementedError


class Calibrates(Capability):
    """An export that depends on the data (the autoencoder's latent scaling factor): ``calibrate`` sees the
    first ``calibration_images`` training images before :meth:`Family.export`."""

    column = "calibrates"
    lacking = "needs no calibration"
    calibration_images: ClassVar[int] = 0

    def calibrate(self, nets: dict[str, nn.Module], images: torch.Tensor) -> None:
        raise NotImplementedError


@dataclass
class OnnxGraph:
    """One graph a family describes for its ONNX export: ``module(**inputs)`` returns a tensor or a tuple
    matching ``outputs``.

    ``inputs`` maps each input's name to an example (batch first, batch >= 2) and ``docs`` each input's and
    output's name to what it means; ``static`` names inputs without a batch axis (e.g. a scalar temperature).
    :mod:`distgen.export.onnx` writes and checks it.
    """

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    docs: dict[str, str]
    static: tuple[str, ...] = ()

    def batched(self, name: str) -> bool:
        """Whether input ``name`` has the dynamic batch axis (0-dim inputs never do)."""
        return name not in self.static and self.inputs[name].dim() > 0


class ExportsOnnx(Capability):
    """ONNX graphs and a standalone numpy sampler (``distgen export --format onnx``). The family describes its
    graphs (:class:`OnnxGraph`); :mod:`distgen.export.onnx` writes them."""

    column = "ONNX"
    lacking = "has no ONNX export yet"

    def onnx_graphs(self, nets: dict[str, nn.Module]) -> list[OnnxGraph]:
        """The graphs a standalone sampler needs (EMA ``nets``, eval mode)."""
        raise NotImplementedError

    def onnx_sampler(self, nets: dict[str, nn.Module]) -> dict:
        """How ``sample_onnx.py`` draws images from those graphs: ``{"kind": ..., ...}`` (JSON-able)."""
        raise NotImplementedError


@dataclass(frozen=True)
class DiffusersPipeline:
    """A diffusers pipeline that distgen ships because diffusers has none that fits (class labels with
    classifier-free guidance, a latent decoder): ``pipeline`` names its class in :mod:`distgen.export.pipelines`,
    ``components`` the modules it is saved with (``unet``, ``scheduler``, ``vae``)."""

    pipeline: str
    components: dict[str, Any] = field(default_factory=dict)


class ExportsDiffusers(Capability):
    """The native export is a diffusers pipeline folder (``DiffusionPipeline.from_pretrained`` loads it)."""

    column = "diffusers"
    lacking = "exports no diffusers pipeline"

    def diffusers_pipeline(self, nets: dict[str, nn.Module]) -> Optional[DiffusersPipeline]:
        """The pipeline distgen ships for this model, which :mod:`distgen.export` saves with its code beside it
        (named in ``model_index.json``) instead of calling :meth:`Family.export`; None (the default): the
        family's ``export`` writes a stock diffusers pipeline itself."""
        return None


# The table's columns, in order
CAPABILITIES: tuple[type[Capability], ...] = (Likelihood, Reconstructs, Interpolates, Classifies, Translates,
                                              Calibrates, ExportsOnnx, ExportsDiffusers)


def offers(family, capability: type[Capability]) -> bool:
    """Whether ``family`` offers ``capability``: declared (inherited) and, for an instance, not switched off by
    its configuration. ``family`` may be a class (what it declares) or an instance."""
    return missing(family, capability) is None


def missing(family, capability: type[Capability]) -> Optional[str]:
    """None if ``family`` offers ``capability``, else why not (``the vae family does not classify images``)."""
    declared = issubclass(family, capability) if isinstance(family, type) else isinstance(family, capability)
    if not declared:
        return f"the {family.name} family {capability.lacking}"
    if not isinstance(family, type):
        off = family.capabilities_off().get(capability)
        if off:
            return f"the {family.name} family {capability.lacking} {off}"
    return None
