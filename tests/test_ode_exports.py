"""The exports of the diffusion families' ``edm`` and ``flow`` formulations: the diffusers folder
(EDMPipeline / FlowMatchingPipeline, shipped in it) and the ONNX export with the standalone ``sample_onnx.py``
sample what ``distgen sample`` samples from the same noise, pixel and latent, class-conditional with guidance;
``sample_onnx.py`` refuses a bad onnx.json field naming it.

Tolerances. diffusers: the pipelines run the same float32 torch arithmetic as distgen up to the order of a few
operations (EDMEulerScheduler's and FlowMatchEulerDiscreteScheduler's steps, sigmas rounded to float32 once more
in the shipped loops); 2e-6 is the largest difference measured on images on [0, 1], the bound 1e-5. ONNX:
the numpy sampler runs in float64 on the graphs' float32 outputs, the torch side in float32, so the two differ by
float32 roundings of values up to sigma_max x |noise| (hundreds), which Heun's correction divides by the next
sigma (sigma_min = 0.002 at the last level): 6e-5 is the largest seen, the bound 2e-4. A sampler that is wrong in
any one thing (its grid, its order, its guidance) is off by more than 1e-2 (the mutants below).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distgen.config.core import build_dataclass
from distgen.export import sample_onnx
from distgen.export.native import write_format
from distgen.families import FAMILIES, DataInfo
from distgen.families.capabilities import ExportsDiffusers, ExportsOnnx, offers

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = [0, 2, 1]


def family(tmp_path: Path, name: str, form: str, **model):
    """A tiny model of ``name`` (diffusion on 8 px, latent_diffusion on 16 px through a tiny 2x autoencoder) in
    formulation ``form``, its networks in eval mode with seeded weights."""
    cls = FAMILIES[name]
    model = {"family": name, "preset": "tiny", "formulation": form, "sample_steps": 3, **model}
    res = 8
    if name == "latent_diffusion":
        from diffusers import AutoencoderKL

        from distgen.families.autoencoder import autoencoder_kwargs

        torch.manual_seed(0)
        AutoencoderKL(**autoencoder_kwargs("tiny", 1, 16), scaling_factor=0.7).save_pretrained(tmp_path / "ae")
        model["autoencoder"], res = str(tmp_path / "ae"), 16
    fam = cls(build_dataclass(cls.config_cls, model, "model"), DataInfo(res, 1, 3))
    torch.manual_seed(0)
    nets = {k: v.eval().requires_grad_(False) for k, v in fam.build_networks().items()}
    return fam, nets


def gens(n: int = 3) -> list:
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


# --------------------------------------------------------------------------- diffusers
DIFFUSERS_CASES = [  # (family, formulation, model options, guidance)
    ("diffusion", "edm", dict(class_conditional=True, edm_uncertainty=True, s_churn=10.0, s_min=0.05, s_max=50.0),
     2.0),
    ("diffusion", "flow", dict(flow_shift=3.0), None),
    ("latent_diffusion", "edm", dict(class_conditional=True), 2.0),
    ("latent_diffusion", "flow", dict(class_conditional=True, guidance_scale=1.5), 2.0),
]


@pytest.mark.parametrize("name,form,model,guidance", DIFFUSERS_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in DIFFUSERS_CASES])
def test_the_diffusers_folder_samples_what_distgen_samples(name, form, model, guidance, tmp_path, monkeypatch):
    """``DiffusionPipeline.from_pretrained`` builds the shipped pipeline from the export where distgen cannot be
    imported; for every sampler of the formulation, and with no arguments at all (the model's defaults), it draws
    from the same generators what ``distgen sample`` draws from the export (family.sample on load_export, as the
    CLI does). The pixel edm case has EDM2's uncertainty head (left out of unet/) and churn (fresh noise from the
    same generators)."""
    from diffusers import DiffusionPipeline

    fam, nets = family(tmp_path, name, form, **model)
    assert offers(fam, ExportsDiffusers) and offers(fam, ExportsOnnx)
    out = tmp_path / "export"
    write_format(out, fam, nets)
    stem = {"edm": "edm_pipeline", "flow": "flow_pipeline"}[form]
    source = (out / f"{stem}.py").read_text()
    assert not re.search(r"^\s*(from|import) distgen", source, re.M)
    index = json.loads((out / "model_index.json").read_text())
    assert {v[0] for v in index.values() if isinstance(v, list) and len(v) == 2} <= {"diffusers", None, stem}
    with monkeypatch.context() as m:  # the folder loads and samples where `import distgen` fails
        for mod in [k for k in sys.modules if k == "distgen" or k.startswith("distgen.")]:
            m.setitem(sys.modules, mod, None)  # every distgen module, loaded or not, fails to import
        pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        pipe(batch_size=1, num_inference_steps=2, output_type="np")
    assert type(pipe).__name__ == {"edm": "EDMPipeline", "flow": "FlowMatchingPipeline"}[form]
    assert (pipe.vae is not None) == (name == "latent_diffusion")
    loaded = fam.load_export(out)  # what `distgen sample EXPORT` samples with
    cond = fam.num_classes > 0
    labels = torch.tensor(LABELS) if cond else None
    differ = []
    for sampler in fam.form.samplers:
        want = fam.sample(loaded, gens(), labels=labels, steps=4, sampler=sampler, guidance=guidance)
        got = pipe(batch_size=3, class_labels=LABELS if cond else None, guidance_scale=guidance,
                   num_inference_steps=4, sampler=sampler, generator=gens(), output_type="np").images
        want = (want / 2 + 0.5).permute(0, 2, 3, 1).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5, sampler
        differ.append(want)
    assert min(np.abs(a - b).max() for a, b in zip(differ, differ[1:])) > 1e-3  # the samplers differ
    # no arguments: the model's sampler, steps and guidance, image i of class i mod K, as `distgen sample`
    want = fam.sample(loaded, gens(), labels=torch.tensor([0, 1, 2]) if cond else None)
    got = pipe(batch_size=3, generator=gens(), output_type="np").images
    assert np.abs(got - (want / 2 + 0.5).permute(0, 2, 3, 1).numpy()).max() <= 1e-5


# --------------------------------------------------------------------------- ONNX
def mirrored_noise(monkeypatch, rngs):
    """distgen's family.sample draws its noise (the start, the churn) with diffusers' randn_tensor: here from numpy
    generators like sample_onnx.py's, in the same order, so both sides start from the same noise."""
    import diffusers.utils.torch_utils as tu

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(sample_onnx._normal(rngs, tuple(shape[1:]))).to(dtype or torch.float32)

    monkeypatch.setattr(tu, "randn_tensor", randn)


@pytest.mark.e2e
def test_the_onnx_export_samples_what_distgen_samples(tmp_path, monkeypatch):
    """Latent edm, class-conditional, guided: sample_onnx.py's samplers on the exported denoiser and decoder graphs
    (onnxruntime) equal distgen's family.sample from the same noise for heun, euler and dpmpp_2m; the standalone
    script, run where torch cannot be imported, writes the same images (uint8, within one level)."""
    from test_onnx import standalone

    from distgen.export.onnx import write_onnx

    fam, nets = family(tmp_path, "latent_diffusion", "edm", class_conditional=True, guidance_scale=2.0)
    out = tmp_path / "onnx"
    out.mkdir()
    meta = write_onnx(out, fam, nets)
    assert sorted(meta["graphs"]) == ["decoder", "denoiser"] and meta["sampler"]["kind"] == "edm"
    ex = sample_onnx.Export(out)
    n, idx = 3, np.arange(3)
    results = []
    for sampler in ("heun", "euler", "dpmpp_2m"):
        opts = SimpleNamespace(sampler=sampler, steps=3, guidance=None, labels=None)
        got = sample_onnx.sample_edm(ex, [np.random.default_rng([0, i]) for i in idx], idx, opts)
        mirrored_noise(monkeypatch, [np.random.default_rng([0, i]) for i in idx])
        want = fam.sample(nets, gens(n), labels=torch.tensor(idx % 3), steps=3, sampler=sampler).numpy()
        assert np.abs(got - want).max() <= 2e-4, sampler
        results.append(got)
    assert min(np.abs(a - b).max() for a, b in zip(results, results[1:])) > 1e-2  # the samplers differ
    standalone(out, "--num", "3", "--seed", "0", "--steps", "3", "--npz", str(tmp_path / "x.npz"), "--out",
               str(tmp_path / "png"))
    u8 = lambda x: np.clip(np.round((x[:, 0] + 1) * 127.5), 0, 255)  # noqa: E731 - sample_onnx's to_uint8, grey
    assert np.abs(np.load(tmp_path / "x.npz")["x"].astype(float) - u8(results[0])).max() <= 1  # heun: the default


# --------------------------------------------------------------------------- onnx.json's new fields
EDM_SPEC = {"kind": "edm", "graph": "denoiser", "sampler": "heun", "shape": [1, 8, 8], "steps": 3, "num_classes": 3,
            "guidance": 1.0, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "s_churn": 0.0, "s_min": 0.0,
            "s_max": None, "s_noise": 1.0, "decoder": "decoder", "scaling_factor": 0.7}
FLOW_SPEC = {"kind": "flow", "graph": "velocity", "sampler": "euler", "shape": [1, 8, 8], "steps": 3,
             "num_classes": 0, "guidance": 1.0, "shift": 3.0, "t_scale": 1000.0}
BAD = [(EDM_SPEC, "graph", "unet"), (EDM_SPEC, "graph", 3), (EDM_SPEC, "sampler", "ddim"), (EDM_SPEC, "steps", 0),
       (EDM_SPEC, "steps", 2.5), (EDM_SPEC, "steps", True), (EDM_SPEC, "num_classes", -1),
       (EDM_SPEC, "guidance", -0.5), (EDM_SPEC, "guidance", "2"), (EDM_SPEC, "sigma_min", 0),
       (EDM_SPEC, "sigma_max", 0.001), (EDM_SPEC, "sigma_max", None), (EDM_SPEC, "rho", -7),
       (EDM_SPEC, "s_churn", -1), (EDM_SPEC, "s_min", [0]), (EDM_SPEC, "s_max", -1.0), (EDM_SPEC, "s_noise", 0.0),
       (EDM_SPEC, "decoder", "nowhere"), (EDM_SPEC, "scaling_factor", 0), (EDM_SPEC, "shape", [8, 8]),
       (FLOW_SPEC, "sampler", "heun2"), (FLOW_SPEC, "shift", 0), (FLOW_SPEC, "t_scale", -1000.0),
       (FLOW_SPEC, "steps", 10 ** 6), (FLOW_SPEC, "steps", "missing")]


@pytest.mark.parametrize("spec,key,value", BAD, ids=[f"{s['kind']}-{k}-{v}" for s, k, v in BAD])
def test_read_meta_refuses_a_bad_field_naming_it(spec, key, value, tmp_path):
    graphs = {g: {"file": f"{g}.onnx"} for g in ("denoiser", "velocity", "decoder")}
    path = tmp_path / "onnx.json"
    path.write_text(json.dumps({"graphs": graphs, "sampler": spec}))
    assert sample_onnx.read_meta(path)["sampler"] == spec  # the good one reads
    bad = dict(spec)
    if value == "missing":
        del bad[key]
    else:
        bad[key] = value
    path.write_text(json.dumps({"graphs": graphs, "sampler": bad}))
    with pytest.raises(SystemExit) as e:
        sample_onnx.read_meta(path)
    first = str(e.value.code).splitlines()[0]
    assert first.startswith(f"{path}: sampler.{key}: "), first


# --------------------------------------------------------------------------- the DiT and EDM2 backbones' exports
BACKBONE_CASES = [  # (family, backbone, formulation, model options, the export's files)
    ("diffusion", "dit", "flow", dict(class_conditional=True), ["transformer"]),
    ("diffusion", "edm2", "edm", dict(edm_uncertainty=True), ["unet.safetensors", "unet_config.json"]),
    ("latent_diffusion", "edm2", "edm", dict(class_conditional=True),
     ["unet.safetensors", "unet_config.json", "vae"]),
    # DiTPipeline's folder: class-conditional latent diffusion in ddpm
    ("latent_diffusion", "dit", "ddpm", dict(class_conditional=True),
     ["model_index.json", "scheduler", "transformer", "vae"]),
]


@pytest.mark.parametrize("name,backbone,form,model,files", BACKBONE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in BACKBONE_CASES])
def test_a_backbone_export_samples_what_the_model_samples(name, backbone, form, model, files, tmp_path, monkeypatch):
    """`distgen export` of a DiT or EDM2 model (write_format, as the CLI calls it) loads back (load_export, what
    `distgen sample EXPORT` reads) to the same samples, bit for bit; a class-conditional latent DiT in ddpm is a
    folder diffusers' own DiTPipeline loads, where distgen cannot be imported, and samples the same images."""
    fam, nets = family(tmp_path, name, form, backbone=backbone, **model)
    assert offers(fam, ExportsDiffusers) == (backbone == "dit" and name == "latent_diffusion")
    out = tmp_path / "export"
    write_format(out, fam, nets)  # what `distgen export` writes beside distgen.json
    assert sorted(p.name for p in out.iterdir()) == files
    labels = torch.tensor(LABELS) if fam.num_classes else None
    want = fam.sample(nets, gens(), labels=labels, guidance=2.0 if fam.num_classes else None)
    loaded = fam.load_export(out)
    assert type(loaded["unet"]).__name__ == {"dit": "DiT", "edm2": "EDM2UNet"}[backbone]
    assert torch.equal(fam.sample(loaded, gens(), labels=labels, guidance=2.0 if fam.num_classes else None), want)
    if offers(fam, ExportsDiffusers):
        from diffusers import DiTPipeline

        with monkeypatch.context() as m:
            for mod in [k for k in sys.modules if k == "distgen" or k.startswith("distgen.")]:
                m.setitem(sys.modules, mod, None)
            pipe = DiTPipeline.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        got = pipe(class_labels=LABELS, guidance_scale=2.0, num_inference_steps=fam.cfg.sample_steps,
                   generator=gens(), output_type="np").images
        assert np.abs(got - (want / 2 + 0.5).permute(0, 2, 3, 1).numpy()).max() <= 1e-5


@pytest.mark.e2e
@pytest.mark.parametrize("backbone,form", [("dit", "flow"), ("edm2", "edm")])
def test_a_backbone_onnx_export_samples_what_distgen_samples(backbone, form, tmp_path, monkeypatch):
    """The DiT's velocity and EDM2's preconditioned denoiser as ONNX graphs: sample_onnx.py's samplers on them
    (onnxruntime) equal the family's from the same noise (the bound of the ONNX test above)."""
    from distgen.export.onnx import write_onnx

    fam, nets = family(tmp_path, "diffusion", form, backbone=backbone, class_conditional=True, guidance_scale=2.0)
    out = tmp_path / "onnx"
    out.mkdir()
    meta = write_onnx(out, fam, nets)
    assert meta["sampler"]["kind"] == form
    ex = sample_onnx.Export(out)
    idx = np.arange(3)
    opts = SimpleNamespace(sampler=None, steps=3, guidance=None, labels=None)
    run = sample_onnx.sample_edm if form == "edm" else sample_onnx.sample_flow
    got = run(ex, [np.random.default_rng([0, i]) for i in idx], idx, opts)
    mirrored_noise(monkeypatch, [np.random.default_rng([0, i]) for i in idx])
    want = fam.sample(nets, gens(3), labels=torch.tensor(idx % 3), steps=3).numpy()
    assert np.abs(got - want).max() <= 2e-4
