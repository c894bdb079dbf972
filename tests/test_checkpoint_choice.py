"""``--checkpoint step-N|latest|best`` on sample, export, eval and ema: the named checkpoint's weights are the ones
used (compared with the checkpoint's own tensors), and a missing, cut-off, damaged or ill-formed name is refused
naming it and listing what the run has. The runs are the suite's shared ones (conftest.trained: checkpoints at
steps 4 and 6), copied, so nothing here trains."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distgen import checkpoint as ckpt
from distgen.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(trained, tmp_path_factory):
    """Copies of the diffusion run (with a best/ made of step 4's EMA weights) and of its power-EMA variant."""
    root, _ = trained
    out = tmp_path_factory.mktemp("choice")
    run = out / "diffusion"
    shutil.copytree(root / "diffusion-a", run)
    shutil.copytree(root / "diffusion-power-a", out / "power")
    cp4 = run / "checkpoints" / "step-00000004"
    meta = ckpt.read_meta(cp4)
    ckpt.write_best(run / "best", {"unet": load_file(cp4 / "ema0-unet.safetensors")},
                    {"step": 4, "nimg": meta["nimg"], "best": {"metric": "fid", "value": 9.0, "step": 4},
                     "family": meta["family"], "data_info": meta["data_info"], "config": meta["config"]})
    return run, out / "power"


def ema0(run, step):
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "ema0-unet.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_name_loads_that_checkpoints_weights(runs):
    from distgen.sample import load_ema

    run, _ = runs
    assert not same(ema0(run, 4), ema0(run, 6))  # else the comparisons below prove nothing
    for name, step in (("step-4", 4), ("step-00000004", 4), ("latest", 6), (None, 6), ("best", 4)):
        _, nets, _ = load_ema(run, checkpoint=name)
        assert same(nets["unet"].state_dict(), ema0(run, step)), name


def test_sample_with_a_checkpoint_draws_from_it(runs, tmp_path, capsys):
    run, _ = runs
    outs = {}
    for name in ("step-4", "step-6", None):
        out = tmp_path / f"{name}.npz"
        assert main(["sample", str(run), "--num", "2", "--out", str(out)] + (["--checkpoint", name] if name else [])) == 0
        outs[name] = np.load(out)["x"]
    assert np.array_equal(outs["step-6"], outs[None]) and not np.array_equal(outs["step-4"], outs[None])
    assert "(step-4)" in capsys.readouterr().out


def test_export_with_a_checkpoint_writes_its_weights(runs, tmp_path):
    from distgen.export.native import export

    run, _ = runs
    out = export(run, tmp_path / "x", checkpoint="step-4")
    assert json.loads((out / "distgen.json").read_text())["source"]["step"] == 4
    assert same(load_file(out / "unet" / "diffusion_pytorch_model.safetensors"), ema0(run, 4))


def test_eval_with_a_checkpoint_evaluates_its_weights(runs, monkeypatch, capsys):
    """The evaluator is replaced by one that keeps the weights it is handed: what is evaluated is the question,
    not the metric (test_eval.py covers those)."""
    from distgen.evaluate import command

    seen = {}

    class Keeps:
        def __init__(self, spec, device):
            pass

        def run(self, family, nets, data):
            seen.update({k: v.clone() for k, v in nets["unet"].state_dict().items()})
            return {"extractor": None, "seconds": 0.0}

    monkeypatch.setattr(command, "Evaluator", Keeps)
    assert main(["eval", str(run_of(runs)), "--num-samples", "2", "--metrics", "fid", "--checkpoint", "step-4"]) == 0
    assert same(seen, ema0(run_of(runs), 4))
    assert "(step-4)" in capsys.readouterr().out


def run_of(runs):
    return runs[0]


def test_ema_with_a_checkpoint_reconstructs_as_of_its_step(runs, tmp_path):
    """Snapshots every step (8 samples) to step 6; step 4's checkpoint is at 32 samples: the reconstruction uses
    the snapshots up to it, the default all six."""
    _, power = runs
    for name, kimg, step in (("step-4", 0.032, 4), (None, 0.048, 6)):
        out = tmp_path / f"ema-{name}"
        assert main(["ema", str(power), "--sigma-rel", "0.05", "--out", str(out)]
                    + (["--checkpoint", name] if name else [])) == 0
        assert json.loads((out / "posthoc.json").read_text())["kimg"] == pytest.approx(kimg)
        source = json.loads((out / "sigma-0.050" / "distgen.json").read_text())["source"]
        assert source["checkpoint"].endswith(f"step-{step:08d}") and source["posthoc_ema"]["kimg"] == pytest.approx(kimg)


@pytest.mark.parametrize("name, said", [
    ("step-5", "step-00000005: no such checkpoint; {run} has: step-00000004, step-00000006; best"),
    ("step-8", "step-00000008 is incomplete (its save was cut off: .tmp-step-00000008)"),
    ("../x", "'../x' is not a plain file name (it holds a path separator)"),
    ("..", "'..' is not a file name"),
    ("step-4/../../x", "holds a path separator"),
    ("newest", "expected step-N (e.g. step-4 or step-00000004), latest or best"),
    ("step-123456789", "a step of more than 8 digits"),
])
def test_bad_names_are_refused_listing_what_exists(runs, tmp_path, capsys, name, said):
    run, _ = runs
    cut = run / "checkpoints" / ".tmp-step-00000008"  # a save cut off: never loaded, not even when named
    cut.mkdir(exist_ok=True)
    try:
        for cmd in (["sample", str(run), "--num", "1", "--out", str(tmp_path / "x.png")],
                    ["export", str(run), str(tmp_path / "e")]):
            assert main(cmd + ["--checkpoint", name]) == 2
            err = capsys.readouterr().err
            assert "distgen: error: --checkpoint" in err and said.format(run=run) in err, err
    finally:
        cut.rmdir()
    assert not (tmp_path / "e").exists() and not (tmp_path / "x.png").exists()


def test_a_damaged_or_absent_choice_is_refused_and_never_replaced_by_another(runs, tmp_path, capsys):
    """A damaged step-4 is named with its bad file; latest would fall back past a damaged checkpoint, a named
    one never does. best where the run kept none, and --checkpoint on an export, are refused too."""
    run, power = runs
    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    weights = damaged / "checkpoints" / "step-00000004" / "ema0-unet.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["sample", str(damaged), "--num", "1", "--out", str(tmp_path / "x.png"), "--checkpoint", "step-4"]) == 2
    err = capsys.readouterr().err
    assert f"{damaged}/checkpoints/step-00000004 does not load" in err and "ema0-unet.safetensors" in err, err
    assert main(["export", str(power), str(tmp_path / "e"), "--checkpoint", "best"]) == 2
    assert f"{power}/best: no best weights" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "e")]) == 0
    assert main(["sample", str(tmp_path / "e"), "--num", "1", "--out", str(tmp_path / "y.png"),
                 "--checkpoint", "step-4"]) == 2
    assert "is not a run folder (no checkpoints/)" in capsys.readouterr().err
