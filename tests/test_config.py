"""Config: YAML + dotted overrides into typed, validated dataclasses; errors name the field."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from distgen.config import ConfigError, load_config, to_dict
from test_train import run


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump({
        "run": {"name": "exp1", "seed": 3},
        "data": {"train": ["data/x/train.manifest.json"], "resolution": 28},
        "train": {"batch_size": 32},
    }))
    return p


def test_yaml_and_overrides(cfg_file):
    cfg = load_config(cfg_file, ["train.batch_size=64", "data.flip=true", "run.name=007", "data.train=[a.json, b.json]"])
    assert cfg.train.batch_size == 64 and cfg.data.flip is True
    assert cfg.run.name == "007"  # strings stay strings
    assert cfg.data.train == ("a.json", "b.json") and cfg.data.resolution == 28
    assert cfg.run.seed == 3 and cfg.run.folder == "runs/007"
    assert load_config(cfg_file, ["data.train=one.json"]).data.train == ("one.json",)
    # YAML list syntax around brace patterns (braces are YAML's mapping syntax): the brackets are not kept
    assert load_config(cfg_file, ["data.train=[a-{000000..000001}.tar]"]).data.train == ("a-{000000..000001}.tar",)
    assert load_config(cfg_file, ["data.train=[a-{0..1}.tar, 'b-{x,y}.tar']"]).data.train == ("a-{0..1}.tar",
                                                                                              "b-{x,y}.tar")


@pytest.mark.parametrize("override,match", [
    ("train.batchsize=3", r"train.batchsize: unknown key \(did you mean 'train.batch_size'\?\)"),
    ("nope.x=1", r"nope: unknown key"),
    ("train.batch_size=abc", r"train.batch_size: expected an integer, got 'abc'"),
    ("train.batch_size=1.5", r"train.batch_size: expected an integer"),
    ("train.batch_size=0", r"train.batch_size: must be >= 1, got 0"),
    ("data.channels=2", r"data.channels: must be 1 or 3, got 2"),
    ("data.on_error=ignore", r"data.on_error: 'ignore' is not one of 'raise', 'skip'"),
    ("data.flip=maybe", r"data.flip: expected true or false"),
    ("data.resolution=-4", r"data.resolution: must be >= 4"),
    ("run.name=a/b", r"run.name: 'a/b' is not a plain file name \(it holds a path separator\)"),
    ("train.batch_size", r"train.batch_size: an override must look like key.sub=value"),
    ("train.batch_size.x=1", r"train.batch_size: '.*' is a value, not a section|batch_size"),
    ("eval.metrics=[fid,fdd]", r"eval.metrics: unknown metric\(s\) \['fdd'\]"),
    ("eval.best_metric=loss", r"eval.best_metric: must be one of fid"),
    ("eval.every=-1", r"eval.every: must be >= 0"),
    ("train.total_kimg=.inf", r"train.total_kimg: must be a finite number, got inf"),
    ("train.lr=.nan", r"train.lr: must be a finite number, got nan"),
    ("train.lr=nan", r"train.lr: expected a number, got 'nan'"),
])
def test_errors_name_the_field(cfg_file, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(cfg_file, [override])


def test_too_few_evaluation_samples_for_a_metric(cfg_file):
    with pytest.raises(ConfigError, match=r"eval.num_samples: prc needs at least 4 images, got 3"):
        load_config(cfg_file, ["eval.metrics=[fid,prc]", "eval.num_samples=3"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {resolution: 28\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("data:\n  workers: two\n")
    with pytest.raises(ConfigError, match=r"data.workers: expected an integer, got 'two' \(in .*wrong.yaml\)"):
        load_config(wrong)


def test_resolved_config_round_trips(cfg_file, tmp_path):
    cfg = load_config(cfg_file, ["data.flip=true"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(dumped) == cfg


def test_cli_dry_run_and_error(cfg_file, env_with_repo):
    r = run([sys.executable, "-m", "distgen", "train", str(cfg_file), "train.batch_size=16", "--dry-run"],
            env_with_repo, check=False)
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["train"]["batch_size"] == 16 and shown["run"]["name"] == "exp1"
    r = run([sys.executable, "-m", "distgen", "train", str(cfg_file), "data.workers=-1", "--dry-run"],
            env_with_repo, check=False)
    assert r.returncode == 2 and "data.workers: must be >= 0, got -1" in r.stderr


DRY_RUN = """
import sys
from distgen.cli import main
assert main(["train", sys.argv[1], "model.family=gan", "model.arch=stylegan2", "--dry-run"]) == 0
from distgen.slurm import run_state
assert run_state(sys.argv[1], []) == "new"
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "deepspeed", "accelerate")
               or m.startswith("distgen.families"))
print("HEAVY", heavy)
"""


def test_checking_a_config_imports_neither_torch_nor_any_family(cfg_file, env_with_repo):
    """--dry-run and the launchers' checks on a login node: the config, family sections included, is checked
    without torch or the families' modules (their config dataclasses live in distgen.config.models)."""
    r = subprocess.run([sys.executable, "-c", DRY_RUN, str(cfg_file)], capture_output=True, text=True,
                       env=env_with_repo)
    assert r.returncode == 0, r.stderr
    assert "arch: stylegan2" in r.stdout and "HEAVY []" in r.stdout


def test_every_family_has_its_config_section():
    from distgen.config import MODEL_CONFIGS
    from distgen.families import FAMILIES

    assert {n: f.config_cls for n, f in FAMILIES.items()} == MODEL_CONFIGS
