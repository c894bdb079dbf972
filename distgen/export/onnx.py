"""`distgen export RUN OUT --format onnx`: the graphs a sampler needs as ONNX, plus a standalone sampler.

A family lists its graphs with :meth:`ExportsOnnx.onnx_graphs` (each an
:class:`~distgen.families.capabilities.OnnxGraph`: a small wrapper module with named, documented inputs and outputs;
the first axis of every batched input is dynamic) and describes how to draw images from them with
:meth:`ExportsOnnx.onnx_sampler` (a JSON-able dict read by ``sample_onnx.py``, the file
:mod:`distgen.export.sample_onnx` that this module copies into the export: numpy + onnxruntime only, no torch,
no distgen).

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
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from distgen.families.capabilities import OnnxGraph

OPSET = 18  # ONNX opset of every graph; onnxruntime >= 1.14 runs it
RTOL = 1e-4  # |onnx - torch| <= RTOL * (1 + max|torch|): the checks' tolerance, float32
ONNX_META = "onnx.json"
SAMPLER = "sample_onnx.py"


class OnnxExportError(RuntimeError):
    """A graph could not be written or does not compute what the PyTorch module computes."""


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
    shutil.copy(Path(__file__).with_name(SAMPLER), folder / SAMPLER)
    (folder / ONNX_META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
