"""Small things a new user trips on (issue 42, part 5): sample into a folder of files, metric names by feature
space, the demo's help, threads per process. All in-process and cheap: no training, no sampling."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from distgen import threads
from distgen.cli import _parser, main as cli
from distgen.config.core import ConfigError
from distgen.config.schema import EvalConfig, result_key


@pytest.fixture(autouse=True)
def _keep_threads(monkeypatch):
    """The commands below set torch's thread count and $OMP_NUM_THREADS in this process: put both back."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setattr(threads, "chosen", None)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- a. sample --out FOLDER
def test_sample_refuses_a_folder_of_files_unless_forced(tmp_path, capsys):
    out = tmp_path / "pictures"
    out.mkdir()
    (out / "000000.png").write_bytes(b"the user's own picture")
    for extra in ([], ["--input", str(tmp_path / "in.png")]):  # sampling, and a translator's outputs
        assert cli(["sample", str(tmp_path / "run"), "--num", "2", *extra, "--out", str(out)]) == 2
        first = capsys.readouterr().err.splitlines()[0]
        assert first.startswith(f"distgen: error: --out {out}: the folder is not empty (000000.png)")
        assert "Write into a new or empty folder, or pass --force" in first
    assert (out / "000000.png").read_bytes() == b"the user's own picture"
    # with --force, or into an empty folder, the output check passes (and the missing run is what stops it)
    (tmp_path / "empty").mkdir()
    for args in (["--out", str(out), "--force"], ["--out", str(tmp_path / "empty")]):
        assert cli(["sample", str(tmp_path / "run"), "--num", "2", *args]) == 2
        assert "neither a run folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- b. metrics named by feature space
def test_a_domain_classifiers_figures_are_fd_not_fid():
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from distgen.evaluate.command import format_results
    from distgen.evaluate.extractors import DOMAIN
    from distgen.evaluate.fidelity import fidelity_metrics

    g = torch.Generator().manual_seed(0)
    gen, real = torch.randn(24, 6, generator=g), torch.randn(24, 6, generator=g)
    ext = SimpleNamespace(name=DOMAIN, layers={m: "features" for m in ("fid", "kid", "prc")}, weights="f")
    ref = SimpleNamespace(stats=fid_features_to_statistics(real), features={"features": real}, source="ref")
    res = fidelity_metrics(["fid", "kid", "prc"], {"features": gen}, ref, ext, 8, "ref", {}, lambda _m: None)
    assert set(res) == {"fd_domain", "kid_domain_mean", "kid_domain_std", "kid_subset_size", "precision_domain",
                        "recall_domain", "f_score_domain"}
    table = format_results(res, "fashion-mnist")
    assert "FD_fashion-mnist " in table and "KID_fashion-mnist " in table and "FID" not in table
    assert "FD_fm " in format_results(res, "features/fm.safetensors")
    assert "FD_DINOv2 " in format_results({"fd_dinov2": 1.0}, "dinov2-vit-l-14")
    assert "FID " in format_results({"fid": 1.0}, "inception")
    for spec in ("fashion-mnist", "/x/fm.safetensors", DOMAIN):
        assert result_key("fid", spec) == "fd_domain" and result_key("kid_std", spec) == "kid_domain_std"
    assert result_key("fid", "inception") == result_key("fid", None) == "fid"
    # training keeps its best weights by the same names; a config that asks for another space's is refused
    assert EvalConfig(metrics=("fid",), feature_extractor="fashion-mnist").best_key == "fd_domain"
    EvalConfig(best_metric="fd_domain", feature_extractor="fashion-mnist").validate("eval")
    with pytest.raises(ConfigError, match="eval.best_metric: fd_dinov2 is not computed with feature_extractor "
                                          "fashion-mnist"):
        EvalConfig(best_metric="fd_dinov2", feature_extractor="fashion-mnist").validate("eval")


# --------------------------------------------------------------------------- c. the demo's help
def test_the_demo_help_says_what_the_demo_does():
    sub = next(a for a in _parser()._actions if a.dest == "cmd")
    short = next(a.help for a in sub._choices_actions if a.dest == "demo")
    for step in ("shard Fashion-MNIST", "train", "2 processes", "export", "sample", "FD"):
        assert step in short and step in sub.choices["demo"].description, step


# --------------------------------------------------------------------------- d. threads per process
def test_threads_follow_the_cores_and_the_local_processes_unless_told(tmp_path):
    assert threads.choose({}, cores=2) == (2, "2 core(s) / 1 process(es) on this machine")
    assert threads.choose({"LOCAL_WORLD_SIZE": "2"}, cores=2)[0] == 1
    assert threads.choose({"LOCAL_WORLD_SIZE": "3"}, cores=16)[0] == 5
    assert threads.choose({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, cores=2)[0] == 1  # never 0
    # the user (or the launcher) decides: $OMP_NUM_THREADS, then $DISTGEN_THREADS over it, auto for distgen's
    assert threads.choose({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, cores=2) == (3, "$OMP_NUM_THREADS")
    assert threads.choose({"OMP_NUM_THREADS": "1", "DISTGEN_THREADS": "4"}, cores=2) == (4, "$DISTGEN_THREADS")
    assert threads.choose({"OMP_NUM_THREADS": "1", "DISTGEN_THREADS": "auto", "LOCAL_WORLD_SIZE": "2"},
                          cores=16)[0] == 8
    with pytest.raises(ConfigError, match=r"\$DISTGEN_THREADS='0': must be a whole number >= 1, or auto"):
        threads.choose({"DISTGEN_THREADS": "0"})
    # a container's CPU quota counts as cores
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cpu_quota(tmp_path) is None


@pytest.mark.parametrize("argv", [
    ["train", "{tmp}/none.yaml"],
    ["sample", "{tmp}/run", "--num", "1", "--out", "{tmp}/x.png"],
    ["eval", "{tmp}/run", "--num-samples", "2"],
    ["eval", "fit-features", "{tmp}/none.manifest.json", "{tmp}/f.safetensors"],
    ["export", "{tmp}/run", "{tmp}/out"],
    ["ema", "{tmp}/run", "--sigma-rel", "0.1", "--out", "{tmp}/out"],
], ids=lambda a: " ".join(a[:2]).replace(" {tmp}/run", "").replace(" {tmp}/none.yaml", ""))
def test_every_torch_command_sets_its_threads_first(tmp_path, monkeypatch, argv):
    monkeypatch.setenv("DISTGEN_THREADS", "3")  # not torch's default here, nor the tests' 1
    assert cli([a.format(tmp=tmp_path) for a in argv]) == 2  # each stops at the missing input, threads set
    assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    assert threads.describe() == "CPU threads 3 per process ($DISTGEN_THREADS)"
