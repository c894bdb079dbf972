"""``distgen families``: its table is what the code declares (docs/families.md holds the same), and every family
variant of tests/matrix.py does what its row says and refuses, by name, what it does not.

In-process and on CPU: each family and its tiny networks are built with random weights (nothing is trained), so
the figures mean nothing; what is checked is that each listed capability runs and gives the right shapes and
finite values, and that an unlisted one is refused by the one capability check (``missing``) and by evaluation.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from matrix import MODELS

from conftest import REPO
from distgen.cli import main as cli_main
from distgen.config.core import build_dataclass
from distgen.config.schema import DataConfig
from distgen.evaluate import EvalSpec, Evaluator, classify, likelihood, recon
from distgen.families import FAMILIES, DataInfo
from distgen.families import table as ft
from distgen.export.native import write_format
from distgen.families.capabilities import (Calibrates, Classifies, ExportsDiffusers, ExportsOnnx, Interpolates,
                                           Likelihood, Reconstructs, Translates, missing)

# one torch thread: small convolutions on 2 shared cores run many times slower with two spinning pools
pytestmark = pytest.mark.usefixtures("one_thread")

B = 2  # images per check
CLASSES = 10  # Fashion-MNIST's, as tests/matrix.py's runs train on
# each evaluation metric of a test-split pass and the capability (table column) it needs
EVAL_METRICS = {"bpd": Likelihood, "recon": Reconstructs, "accuracy": Classifies}
# Settings that change no capability and make a check cheap: a diffusion bound sums over every timestep (1000 by
# default; 20 as tests/test_eval.py's run), a score model's bound is an adaptive ODE solve (to 1e-5 by default), as
# are edm's and flow's
FAST = {"diffusion": {"num_train_timesteps": 20}, "latent_diffusion": {"num_train_timesteps": 20},
        "score-ve": {"ode_tol": 1e-2}, "diffusion-edm": {"ode_tol": 1e-2}, "diffusion-flow": {"ode_tol": 1e-2}}


# --------------------------------------------------------------------------- the command and its copy in the docs
def _command(capsys, *args) -> str:
    assert cli_main(["families", *args]) == 0
    return capsys.readouterr().out


def test_the_docs_hold_the_commands_table(capsys):
    doc = (REPO / "docs" / "families.md").read_text()
    m = re.search(r"<!-- distgen families: begin -->\n```text\n(.*?)```\n<!-- distgen families: end -->", doc, re.S)
    assert m, "docs/families.md has no table between the distgen families markers"
    assert m.group(1) == _command(capsys), ("docs/families.md's table differs from `distgen families`: paste the "
                                            "command's output between the markers")


def test_the_command_lists_every_family_and_capability(capsys):
    out = _command(capsys)
    header, rule, *rest = out.splitlines()
    assert header.split() == ["family", *ft.COLUMNS]
    for col in ("sample", "bits/dim", "recon", "translate", "classify", "diffusers", "ONNX", "ZeRO"):
        assert col in header.split()
    body = rest[:rest.index("")]
    assert {line.split()[0] for line in body} == set(FAMILIES)
    # the variants that change a capability have rows of their own, marked as depending on the configuration
    start = {name: header.index(f"  {name}") + 2 for name in ft.COLUMNS}

    def cell(label: str, column: str) -> str:
        line = next(line for line in body if line[:start[ft.COLUMNS[0]]].strip() == label)
        return line[start[column]:].split()[0]

    assert cell("score sde=ncsn", "bits/dim") == "no*" and cell("score", "bits/dim") == "yes*"
    assert cell("ebm", "classify") == "no*" and cell("ebm jem=true", "classify") == "yes*"
    assert cell("pix2pix", "sample") == "-" and cell("pix2pix", "translate") == "yes"
    assert cell("vae", "bits/dim") == cell("vae", "recon") == "yes" and cell("gan", "bits/dim") == "-"
    assert cell("gan", "ZeRO") == "1,2" and cell("gan arch=stylegan2 pl_weight=2.0", "ZeRO") == "none"
    assert cell("diffusion", "ZeRO") == "1,2,3"
    assert "score sde=ncsn: no bits/dim: the score family supplies no log-likelihood as an NCSN" in out
    assert "declared but depends on the configuration" in out

    data = json.loads(_command(capsys, "--json"))
    assert data["columns"] == list(ft.COLUMNS)
    assert {r["family"] for r in data["rows"]} == set(FAMILIES)
    by_label = {r["label"]: r for r in data["rows"]}
    assert by_label["score sde=ncsn"]["offers"]["bits/dim"] is False
    assert by_label["score sde=ncsn"]["declared"]["bits/dim"] is True
    assert "bits/dim" in by_label["score"]["depends_on_config"]
    assert by_label["pix2pix"]["offers"]["sample"] is False and by_label["pix2pix"]["offers"]["translate"] is True
    assert by_label["gan"]["zero_stages"] == [1, 2] and "3" in by_label["gan"]["zero_problems"]


# --------------------------------------------------------------------------- each family does what its row says
@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory) -> Path:
    """An untrained tiny autoencoder folder for latent diffusion (as tests/matrix.py's data_sets makes one)."""
    from diffusers import AutoencoderKL

    from distgen.families.autoencoder import autoencoder_kwargs

    out = tmp_path_factory.mktemp("families_table") / "ae"
    torch.manual_seed(0)
    AutoencoderKL(**autoencoder_kwargs("tiny", 1, 16), scaling_factor=0.7).save_pretrained(out)
    return out


def _build(name: str, autoencoder_dir: Path):
    model, res = MODELS[name]
    model = {**model, **FAST.get(name, {})}
    if model["family"] == "latent_diffusion":
        model = {**model, "autoencoder": str(autoencoder_dir)}
    cls = FAMILIES[model["family"]]
    family = cls(build_dataclass(cls.config_cls, model, "model"), DataInfo(res, 1, CLASSES))
    torch.manual_seed(0)
    nets = family.build_networks()
    for n in nets.values():
        n.eval()
    return family, nets, res


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _images(res: int) -> torch.Tensor:
    """B uint8 [B, 1, res, res] images: smooth shapes, not noise (a likelihood model sees plausible pixels)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, res), torch.linspace(-1, 1, res), indexing="ij")
    blobs = torch.stack([(x ** 2 + y ** 2 < 0.5).float(), (x.abs() < 0.4).float()])
    return (blobs[:, None] * 200 + 20).to(torch.uint8)


def _on_unit_range(t: torch.Tensor, shape) -> None:
    assert tuple(t.shape) == tuple(shape), (tuple(t.shape), shape)
    assert t.is_floating_point() and torch.isfinite(t).all() and t.min() >= -1 and t.max() <= 1


@pytest.mark.parametrize("name", sorted(MODELS))
@torch.no_grad()
def test_each_family_does_what_its_row_says(name, autoencoder_dir, tmp_path, monkeypatch):
    family, nets, res = _build(name, autoencoder_dir)
    row = ft.row(family)
    listed = row.offered
    x = _images(res)
    labels = torch.arange(B) % CLASSES
    cond = labels if family.num_classes else None

    # every declared capability that is not listed is refused by name, saying why (capabilities_off)
    for cap in (Likelihood, Reconstructs, Interpolates, Classifies, Translates, Calibrates, ExportsOnnx,
                ExportsDiffusers):
        why = missing(family, cap)
        assert (why is None) == listed[cap.column], (cap.column, why)
        if why is not None:
            assert why.startswith(f"the {family.name} family {cap.lacking}") and row.why.get(cap.column, why) == why

    # sample: from noise, one image per generator
    if listed["sample"]:
        imgs = family.sample(nets, _gens(B), labels=cond, **family.check_sample_options({}))
        _on_unit_range(imgs, (B, 1, res, res))
    else:
        assert listed["translate"]
        with pytest.raises(ValueError, match=f"the {family.name} family translates images rather than sampling"):
            family.sample(nets, _gens(B))

    # translate: every direction it names maps images of the input domain
    if listed["translate"]:
        for d in family.directions:
            _on_unit_range(family.translate(nets, x.float() / 127.5 - 1, d), (B, 1, res, res))

    if listed["interpolate"]:
        # as distgen sample --interpolate calls it: two uint8 CHW images
        _on_unit_range(family.interpolate(nets, x[0], x[1], steps=3), (3, 1, res, res))

    # ONNX: the graphs it describes run on their example inputs (tests/test_onnx.py exports and compares them)
    if listed["ONNX"]:
        graphs = family.onnx_graphs(nets)
        assert graphs
        for g in graphs:
            out = g.module(**g.inputs)
            outs = out if isinstance(out, tuple) else (out,)
            assert len(outs) == len(g.outputs), (g.name, len(outs), g.outputs)
            assert all(torch.isfinite(o).all() for o in outs if o.is_floating_point()), g.name

    # diffusers: the native export is a folder diffusers loads by itself (a pipeline's model_index.json, or a
    # model's config.json naming its diffusers class); without the capability, it is not
    if listed["calibrates"]:
        family.calibrate(nets, x.float() / 127.5 - 1)  # as distgen export calls it: float NCHW on [-1, 1]
    write_format(tmp_path / "export", family, nets)  # as distgen export writes it
    top = {p.name for p in (tmp_path / "export").iterdir()}
    diffusers_folder = "model_index.json" in top or (
        "config.json" in top and "_class_name" in json.loads((tmp_path / "export" / "config.json").read_text()))
    assert diffusers_folder == listed["diffusers"], sorted(top)

    # ZeRO: the stages the table lists are those engine_problem lets through, the others refused with a reason
    for stage in ft.ZERO_STAGES:
        problem = family.engine_problem(stage)
        assert (stage in row.zero_stages()) == (problem is None)
        assert problem is None or (isinstance(problem, str) and problem)

    # bits/dim, recon, classify, through evaluation: a test-split metric runs through the family where the row
    # lists its capability (each call's output checked on the way), and is skipped with missing()'s reason where
    # it does not. One batch stands in for the test shards.
    def one_batch(spec, data_cfg, what, device):
        yield x, (labels if data_cfg.labels or cond is not None else None), _gens(B)

    for module in (likelihood, recon, classify):
        monkeypatch.setattr(module, "batches_of_test_split", one_batch)
    seen = {}

    def spy(method, check):
        real = getattr(family, method)

        def call(*a, **k):
            out = real(*a, **k)
            check(out)
            seen[method] = True
            return out
        monkeypatch.setattr(family, method, call)

    if listed["bits/dim"]:  # log p(x) of uint8 images: one finite value per image
        assert family.likelihood in ("exact", "bound")
        spy("log_likelihood", lambda logp: (logp.shape == (B,) and torch.isfinite(logp).all()) or pytest.fail(
            f"log_likelihood gave {logp}"))
    if listed["recon"]:  # [-1, 1] images of the input's shape
        spy("reconstruct", lambda rec: _on_unit_range(rec, (B, 1, res, res)))
    if listed["classify"]:  # logits over the data's classes
        spy("classify", lambda logits: (logits.shape == (B, CLASSES) and torch.isfinite(logits).all()) or
            pytest.fail(f"classify gave {logits}"))
    spec = EvalSpec(metrics=tuple(EVAL_METRICS), test=["(one batch)"], batch_size=B, likelihood={})
    res = Evaluator(spec, log=lambda s: None).run(family, nets, DataConfig(resolution=res, channels=1))
    for metric, cap in EVAL_METRICS.items():
        if listed[cap.column]:
            assert metric not in res.get("skipped", {}), res["skipped"][metric]
            value = {"bpd": "bpd", "recon": "psnr", "accuracy": "accuracy"}[metric]
            assert isinstance(res[value], float) and not math.isnan(res[value]), res
            assert seen[{"bpd": "log_likelihood", "recon": "reconstruct", "accuracy": "classify"}[metric]]
        else:
            assert res["skipped"][metric] == missing(family, cap)
