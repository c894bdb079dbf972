"""`distgen export RUN OUT --format onnx`: the graphs a sampler needs as ONNX, plus a standalone sampler.

A family lists its graphs with :meth:`Family.onnx_graphs` (each a small wrapper module with named, documented
inputs and outputs; the first axis of every batched input is dynamic) and describes how to draw images from them
with :meth:`Family.onnx_sampler` (a JSON-able dict read by ``sample_onnx.py``, which this module copies into the
export: numpy + onnxruntime only, no torch, no distgen).

Every graph is checked when it is written: onnxruntime's outputs must equal the PyTorch module's on the
example inputs at two batch sizes (float32, within :data:`RTOL` relative to the output's scale), so a graph that
exports but computes something else fails the export, naming the graph. A graph whose ops ONNX cannot express
falls back to ``torch.export`` (``<name>.pt2``), named as such in ``onnx.json`` with the exporter's reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

OPSET = 18  # ONNX opset of every graph; onnxruntime >= 1.14 runs it
RTOL = 1e-4  # |onnx - torch| <= RTOL * (1 + max|torch|): the checks' tolerance, float32
ONNX_META = "onnx.json"
SAMPLER = "sample_onnx.py"


class OnnxExportError(RuntimeError):
    """A graph could not be written or does not compute what the PyTorch module computes."""


@dataclass
class OnnxGraph:
    """One graph: ``module(**inputs)`` returns a tensor or a tuple matching ``outputs``.

    ``inputs`` maps each input's name to an example (batch first, batch >= 2) and ``docs`` each input's and
    output's name to what it means; ``static`` names inputs without a batch axis (e.g. a scalar temperature).
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


def onnx_versions() -> dict:
    import onnx
    import onnxruntime

    return {"opset": OPSET, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__.split("+")[0]}


def _grown(x: torch.Tensor, n: int) -> torch.Tensor:
    """The example at batch ``n``: rows repeated, then perturbed a little so rows differ (floats only)."""
    reps = x.repeat((n + len(x) - 1) // len(x), *[1] * (x.dim() - 1))[:n]
    if reps.is_floating_point():
        g = torch.Generator().manual_seed(n)
        reps = reps + 0.01 * torch.randn(reps.shape, generator=g, dtype=reps.dtype)
    return reps.clone()


def _export_one(graph: OnnxGraph, path: Path) -> None:
    names = list(graph.inputs)
    batch = torch.export.Dim("batch", min=1)
    shapes = {n: {0: batch} if graph.batched(n) else None for n in names}
    quiet = io.StringIO()
    # The exporter reports every stage on stdout, its optimiser each pass on the log, and warns of axis
    # names it merges: none of it is the user's business unless the export fails (then it is in the error).
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(quiet), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*")
        torch.onnx.export(graph.module, (), str(path), kwargs=dict(graph.inputs), input_names=names,
                          output_names=list(graph.outputs), dynamic_shapes=shapes, opset_version=OPSET, dynamo=True,
                          external_data=False)


def _check(graph: OnnxGraph, path: Path) -> float:
    """Largest |onnxruntime - torch| over the outputs at two batch sizes; raises past the tolerance."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    b = next(len(v) for n, v in graph.inputs.items() if graph.batched(n))
    second = {n: _grown(v, b + 3) if graph.batched(n) else v for n, v in graph.inputs.items()}
    worst = 0.0
    for feed in (graph.inputs, second):
        with torch.no_grad():
            want = graph.module(**feed)
        want = want if isinstance(want, (tuple, list)) else (want,)
        got = sess.run(None, {n: v.numpy() for n, v in feed.items()})
        for name, w, g in zip(graph.outputs, want, got):
            w = w.float().numpy()
            if w.shape != g.shape:
                raise OnnxExportError(f"{path.name}: output {name!r} has shape {list(g.shape)} under onnxruntime, "
                                      f"{list(w.shape)} in PyTorch")
            diff = float(abs(g - w).max()) if w.size else 0.0
            if not diff <= RTOL * (1 + float(abs(w).max() if w.size else 0)):
                raise OnnxExportError(f"{path.name}: output {name!r} differs from PyTorch by {diff:.3g} at batch "
                                      f"{len(w)} (tolerance {RTOL} relative)")
            worst = max(worst, diff)
    return worst


def _spec(graph: OnnxGraph, name: str) -> dict:
    v = graph.inputs[name]
    shape = ["batch", *v.shape[1:]] if graph.batched(name) else list(v.shape)
    return {"name": name, "shape": shape, "dtype": str(v.dtype).replace("torch.", ""), "doc": graph.docs[name]}


def write_onnx(folder: Path, family, nets: dict[str, nn.Module]) -> dict:
    """The family's graphs, ``onnx.json`` and ``sample_onnx.py`` into ``folder``; returns the JSON written."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxExportError(f"--format onnx needs {', '.join(missing)}: pip install onnx onnxscript onnxruntime "
                              f"(or pip install 'distgen[onnx]')")
    graphs = family.onnx_graphs(nets)
    meta = {"format": "distgen-onnx/1", "family": family.name, **onnx_versions(), "graphs": {},
            "sampler": family.onnx_sampler(nets)}
    for g in graphs:
        g.module.eval()
        path = folder / f"{g.name}.onnx"
        entry = {"inputs": [_spec(g, n) for n in g.inputs],
                 "outputs": [{"name": n, "doc": g.docs[n]} for n in g.outputs]}
        try:
            _export_one(g, path)
        except Exception as e:  # noqa: BLE001 - any exporter failure: fall back to torch.export
            root = e.__cause__ or e  # the exporter wraps the cause in a generic "step 1/3 failed"
            reason = f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0]}"[:500]
            path.unlink(missing_ok=True)
            pt2 = folder / f"{g.name}.pt2"
            try:
                ep = torch.export.export(g.module, (), kwargs=dict(g.inputs))
                torch.export.save(ep, str(pt2))
            except Exception as e2:  # noqa: BLE001
                raise OnnxExportError(f"{family.name} graph {g.name!r}: neither ONNX ({reason}) nor torch.export "
                                      f"({type(e2).__name__}: {str(e2).splitlines()[0][:300]}) can express it") from None
            entry.update(file=pt2.name, format="pt2", onnx_error=reason)
        else:
            entry.update(file=path.name, format="onnx", max_abs_diff=_check(g, path))
        meta["graphs"][g.name] = entry
    shutil.copy(Path(__file__).with_name("onnx_sampler.py"), folder / SAMPLER)
    (folder / ONNX_META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


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
