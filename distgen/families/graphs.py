"""Helpers a family uses to describe its ONNX graphs (:class:`~distgen.families.capabilities.OnnxGraph`): a
latent input flattened into one noise vector per image, its documentation, and a network's input gradient as
plain operators. Families own them; :mod:`distgen.export.onnx` only writes what they describe.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def split_flat(eps: torch.Tensor, shapes: list) -> list[torch.Tensor]:
    """[B, sum of sizes] -> one [B, *shape] tensor per shape: a graph takes all of an image's latent noise as
    one input, so a sampler draws one vector per image whatever the number of groups or levels."""
    out, at = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(eps[:, at:at + size].reshape(eps.shape[0], *shape))
        at += size
    return out


def latent_docs(shapes: list, what: str) -> str:
    total = sum(math.prod(s) for s in shapes)
    return (f"[batch, {total}] float32 N(0, 1) noise: the {what} {', '.join(str(list(s)) for s in shapes)}, "
            f"each flattened in C order and concatenated")


def _conv_input_grad(grad_out, inp, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                     groups, mask):
    """aten.convolution_backward when only the input's gradient is asked for: the transposed convolution of
    the output's gradient. ONNX has no convolution_backward; it has ConvTranspose."""
    if transposed or mask[1] or mask[2] or inp.dim() != 4:
        raise NotImplementedError("only a 2-D convolution's input gradient is written as a transposed convolution")
    k = weight.shape[2:]
    pad = [inp.shape[2 + i] - ((grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
           for i in range(2)]
    return torch.nn.functional.conv_transpose2d(grad_out, weight, None, stride, padding, pad, groups, dilation), None, None


class InputGradient(nn.Module):
    """``fn(module, x)`` -> (value [B], d value.sum() / dx), as one graph ONNX can express.

    An ONNX graph has no autograd, so the backward pass is traced into plain operators: ``make_fx`` with
    symbolic shapes (the batch stays dynamic) and the core ATen decompositions, the convolutions' input
    gradients written as transposed convolutions. The module's weights are traced as inputs and held here
    as buffers, so the exporter makes them the graph's constants. Langevin samplers (EBMs) need this.
    """

    def __init__(self, module: nn.Module, fn, example: torch.Tensor):
        super().__init__()
        from torch.fx.experimental.proxy_tensor import make_fx

        state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        names = list(state)

        def traced(x, *tensors):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                value = fn(lambda y: torch.func.functional_call(module, dict(zip(names, tensors)), (y,)), x)
                return value.detach(), torch.autograd.grad(value.sum(), x)[0]

        table = {**torch._decomp.core_aten_decompositions(), torch.ops.aten.convolution_backward.default: _conv_input_grad}
        tensors = [state[n].detach() for n in names]
        self.graph = make_fx(traced, decomposition_table=table, tracing_mode="symbolic")(example, *tensors)
        self.n = len(tensors)
        for i, t in enumerate(tensors):
            self.register_buffer(f"w{i}", t.clone())

    def forward(self, image):
        return tuple(self.graph(image, *[getattr(self, f"w{i}") for i in range(self.n)]))
