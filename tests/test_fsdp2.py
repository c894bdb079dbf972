"""FSDP2 (distgen.engines_fsdp) with 2 CPU processes in bf16, in one `accelerate launch` of
configs/accelerate/fsdp2.yaml: exact resume of diffusion (U-Net; EDM2 with its projection; in fp16 with the sharded
loss scaler; with activation checkpointing), the VAE, StyleGAN2 with R1 and path length (double backwards), the
autoencoder with its discriminator and JEM's spectral-normalised energy network; every family of MODELS (and the GANs of MORE) taking a step, checkpointing and
resuming (or refused at start by name); checkpoints that pass between FSDP2 and DDP; and an FSDP2 checkpoint sampled
and exported with no process group. Sharded checkpoints (train.checkpoint_format=sharded, distgen.checkpoint_dcp) in
the same launch: an exact resume holding what a full checkpoint holds, one resumed and written again under DDP, and
(in this process) with one process over a damaged newer one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import yaml

from distgen import checkpoint as ckpt
from distgen import checkpoint_dcp as dcp_ckpt
from matrix import MODELS, differences, edm2_off_sphere, family_config, launch_matrix, record_differences, \
    records

pytestmark = pytest.mark.e2e  # 2-process trainings (make test-fast leaves these out)

FSDP2_CONFIG = "configs/accelerate/fsdp2.yaml"
STEPS, STOP = 4, 2
LAST = f"checkpoints/step-{STEPS:08d}"
BF16 = {"mixed_precision": "bf16"}
# exact resume: (run, model of MODELS, model settings over it, train settings over BF16)
EXACT = {"diffusion": ("diffusion", {}, {}), "diffusion-edm": ("diffusion-edm", {}, {}), "vae": ("vae", {}, {}),
         "gan-stylegan2-pl": ("gan-stylegan2", {"pl_weight": 2.0, "pl_every": 2}, {}),  # and R1 every 2 steps
         "autoencoder": ("autoencoder", {}, {}),  # disc_weight 0.1: the frozen discriminator's term in the ae phase
         "diffusion-fp16": ("diffusion", {}, {"mixed_precision": "fp16"}),  # ShardedGradScaler, its state saved
         "diffusion-ac": ("diffusion", {}, {"activation_checkpointing": True}),  # diffusers' own checkpointing
         # spectral norm's buffers gather its weights in float32, and SGLD calls the network before the loss does
         "ebm-jem": ("ebm-jem", {}, {})}
# Runs beside MODELS' (a step, a checkpoint, a resume): what FSDP2 shards as one unit (ProGAN's networks, whose
# zero term reads the blocks not yet grown; BigGAN's G with the orthogonal penalty, a registered forward method).
# ProGAN with hinge beside its default wgan-gp (MODELS)
MORE = {"gan-progan-hinge": ("gan-progan", {"loss": "hinge"}),
        "gan-biggan-ortho": ("gan-biggan", {"ortho_weight": 1e-4})}


def _engine(name: str) -> dict:
    """The environment of a call under ``name`` (fsdp2 or ddp): the launcher's FSDP request on or off."""
    return {"ACCELERATE_USE_FSDP": "true" if name == "fsdp2" else "false"}


def _config(root: Path, model: str, run: str, data: dict, over: dict, train: Optional[dict] = None) -> str:
    path = family_config(root, model, run, data, {**BF16, **(train or {})})
    cfg = yaml.safe_load(path.read_text())
    cfg["model"].update(over)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _calls(config: str, plan: list[tuple[int, str]], over: tuple[str, ...] = ()) -> list[dict]:
    """One call per (max_steps, engine)."""
    return [{"config": config, "overrides": [f"train.max_steps={s}", *over], "env": _engine(e)} for s, e in plan]


SHARDED = ("train.checkpoint_format=sharded",)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, matrix_data):
    root = tmp_path_factory.mktemp("fsdp2")
    data = matrix_data
    spec = []
    for run, (model, over, train) in EXACT.items():  # STEPS straight (-a), and STOP then a resume to STEPS (-b)
        for ab, plan in (("a", [(STEPS, "fsdp2")]), ("b", [(STOP, "fsdp2"), (STEPS, "fsdp2")])):
            config = _config(root, model, f"{run}-{ab}", data, over, train)
            spec.append({"name": f"{run}-{ab}", "calls": _calls(config, plan)})
    runs = {**{n: (n, {}) for n in MODELS if n not in EXACT}, **MORE}
    for name, (model, over) in runs.items():  # the engine matrix: a step, a checkpoint, a resume
        spec.append({"name": name, "calls": _calls(_config(root, model, name, data, over), [(1, "fsdp2"), (2, "fsdp2")])})
    for first, then in (("ddp", "fsdp2"), ("fsdp2", "ddp")):  # one engine's checkpoint resumed by the other
        run = f"{first}-then-{then}"
        spec.append({"name": run, "calls": _calls(_config(root, "diffusion", run, data, {}), [(2, first), (4, then)])})
    # sharded: STOP then a resume to STEPS under FSDP2 (the straight run to compare with is diffusion-a, full); one
    # written under FSDP2, resumed and written again under DDP
    for run, plan in (("diffusion-sharded-b", [(STOP, "fsdp2"), (STEPS, "fsdp2")]),
                      ("sharded-fsdp2-then-ddp", [(2, "fsdp2"), (4, "ddp")])):
        spec.append({"name": run, "calls": _calls(_config(root, "diffusion", run, data, {}), plan, SHARDED)})
    return root, launch_matrix(spec, root, 2, FSDP2_CONFIG, timeout=900)


@pytest.mark.parametrize("run", list(EXACT))
def test_fsdp2_resumes_exactly(matrix, run):
    """STEPS straight against STOP then a resume, both under FSDP2 (bf16, or fp16 for diffusion-fp16): the final
    checkpoints (weights, EMAs gathered from their shards, the optimizer states gathered into DDP's layout, RNGs,
    fp16's loss scaler) and every record, bit for bit."""
    root, results = matrix
    for ab in "ab":
        calls = results[f"{run}-{ab}"]["calls"]
        assert all(c.get("rc") == 0 for c in calls), calls
    a, b = root / f"{run}-a", root / f"{run}-b"
    assert differences(a / LAST, b / LAST) == []
    assert record_differences(a, b, STOP) == []
    weights = {n: ckpt.load_tensors(p) for n, p in _weight_files(a / LAST).items()}
    for n, w in weights.items():  # the EMAs were kept as shards and gathered whole: the networks' shapes
        ema = ckpt.load_tensors(a / LAST / f"ema0-{n}.safetensors") if (a / LAST / f"ema0-{n}.safetensors").is_file() \
            else None
        if ema is not None:
            assert {k: v.shape for k, v in ema.items()} == {k: v.shape for k, v in w.items()}
            assert not all(torch.equal(ema[k], w[k]) for k in w if w[k].is_floating_point())  # an average, not a copy
    if run == "diffusion-edm":  # the projection ran on each rank's rows after every step
        assert edm2_off_sphere(weights["unet"]) < 1e-5
    if run == "diffusion-fp16":  # the scaler's state went on over the resume: STEPS steps without an overflow
        scaler = ckpt.load_state(b / LAST / "scaler.pt")
        assert scaler["_growth_tracker"] == STEPS and records(b)[STEPS]["overflow_total"] == 0, scaler
        assert records(a)[1]["loss"] != records(root / "diffusion-a")[1]["loss"]  # not bf16's numbers
    if run == "diffusion-ac":  # on (only these runs ask), and the same maths: the first step's loss as without it
        assert "activation checkpointing unet" in (root / "launch.out").read_text()
        assert records(a)[1]["loss"] == records(root / "diffusion-a")[1]["loss"]
    if run == "ebm-jem":  # every parameter had its gradient at every step, each process's first included (the
        # gradients of autocast's cached casts came a step late: FSDP2.autocast)
        for ab in "ab":
            opt = ckpt.load_state(root / f"{run}-{ab}" / LAST / "optim-E.pt")
            assert len(opt["state"]) == len(opt["param_groups"][0]["params"]) == 20, sorted(opt["state"])
            assert {int(s["step"]) for s in opt["state"].values()} == {STEPS}
        assert sum(k.endswith(("._u", "._v")) for k in weights["E"]) == 20  # power iteration's state, checkpointed


def _weight_files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in folder.glob("*.safetensors") if not p.name.startswith(("ema", "rng", "family"))}


@pytest.mark.parametrize("name", [*MODELS, *MORE])
def test_every_family_steps_checkpoints_and_resumes_under_fsdp2(matrix, name):
    root, results = matrix
    # the exact-resume runs stand for their families here: STOP steps, a checkpoint, a resume to STEPS
    covered = name in EXACT and not EXACT[name][1] and not EXACT[name][2]
    calls, run, last = (results[name]["calls"], root / name, 2) if not covered else \
        (results[f"{name}-b"]["calls"], root / f"{name}-b", STEPS)
    assert [c.get("rc") for c in calls] == [0, 0], calls
    recs = records(run)
    assert sorted(recs) == list(range(1, last + 1)) and recs[last]["nonfinite_total"] == 0
    assert all(math.isfinite(r["loss"]) for r in recs.values())
    assert all(math.isfinite(v) for r in recs.values() for k, v in r.items() if k.startswith("loss/") and v is not None)
    folder = run / "checkpoints" / f"step-{last:08d}"
    # resumed, not started afresh: every optimizer (gathered into DDP's layout) counted each of its phases' steps
    due = _optimizer_steps(run, last)
    for p in folder.glob("optim-*.pt"):
        steps = {int(s["step"]) for s in ckpt.load_state(p)["state"].values()}
        assert steps and max(steps) == due[p.stem[len("optim-"):]] and min(steps) >= 1, (p.name, steps, due)
    ema = ckpt.load_tensors(next(folder.glob("ema0-*.safetensors")))
    assert all(t.dtype in (torch.float32, torch.int64, torch.bool) and torch.isfinite(t.float()).all()
               for t in ema.values())


def _optimizer_steps(run: Path, last: int) -> dict[str, int]:
    """How many times each network's optimizer stepped in ``last`` steps of ``run``: once for each of its phases
    that was due (a GAN's lazy R1 steps D's optimizer again; G steps every d_steps)."""
    from distgen.config import load_config
    from distgen.families import DataInfo, build_family

    cfg = load_config(str(run / "config.yaml"))
    phases = build_family(cfg.model, DataInfo(cfg.data.resolution, 1, 10)).phases()
    return {n: sum(1 for s in range(last) for p in phases if p.network == n and s % p.every == 0)
            for n in {p.network for p in phases}}


@pytest.mark.parametrize("run", ["ddp-then-fsdp2", "fsdp2-then-ddp", "sharded-fsdp2-then-ddp"])
def test_a_checkpoint_resumes_under_the_other_engine(matrix, run):
    """The checkpoint files are the same under DDP and FSDP2 (full state dicts, DDP's optimizer layout; or DCP's
    sharded files, by parameter name): a run goes on under the other engine with its weights, EMAs and Adam's
    moments (not exact: bf16 autocast under DDP, bf16 gathered weights under FSDP2)."""
    root, results = matrix
    assert [c.get("rc") for c in results[run]["calls"]] == [0, 0], results[run]["calls"]
    last = root / run / "checkpoints" / "step-00000004"
    opt = dcp_ckpt.read_full(ckpt.sharded_optimizer_dir(last, "unet")) if run.startswith("sharded") else \
        ckpt.load_state(last / "optim-unet.pt")
    assert {int(s["step"]) for s in opt["state"].values()} == {4}
    recs = records(root / run)
    assert sorted(recs) == [1, 2, 3, 4]
    # The model state per rank (weights, Adam's moments, gradients: counted from the tensors). Each of 2 ranks holds
    # its shard of every tensor, padded to the larger half, and its own step counts: at least half of DDP's whole
    # copy; the goal is at most 0.55 of it.
    ddp, fsdp = (recs[1], recs[3]) if run == "ddp-then-fsdp2" else (recs[3], recs[1])
    assert 0.5 <= fsdp["state_gib"] / ddp["state_gib"] <= 0.55, (fsdp["state_gib"], ddp["state_gib"])


@pytest.mark.parametrize("run", ["diffusion-a", "diffusion-sharded-b"])
def test_an_fsdp2_checkpoint_samples_and_exports_without_a_process_group(matrix, tmp_path, run):
    from distgen.cli import main as cli

    root, _ = matrix
    assert cli(["sample", str(root / run), "--num", "2", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert cli(["export", str(root / run), str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "distgen.json").is_file()


def _as_full(folder: Path, out: Path) -> Path:
    """A sharded checkpoint folder written out again as a full one (weights whole, the optimizer in DDP's layout:
    states by their parameter's place in the param groups), read in this process without a process group."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.dcp"))
    for d in folder.glob("optim-*.dcp"):
        net = d.name[len("optim-"):-len(".dcp")]
        ckpt.save_tensors(ckpt.weights_file(out, net), dcp_ckpt.read_weights(folder, net))
        by_name = dcp_ckpt.read_full(d)
        index = {n: i for i, n in enumerate(n for g in by_name["param_groups"] for n in g["params"])}
        ckpt.save_state(ckpt.optimizer_file(out, net), {
            "state": dict(sorted((index[n], s) for n, s in by_name["state"].items())),
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]})
    return out


def test_a_sharded_checkpoint_resumes_exactly_and_holds_what_a_full_one_does(matrix, tmp_path):
    """STOP then a resume to STEPS under FSDP2 with sharded checkpoints against STEPS straight with full ones
    (diffusion-a): each rank wrote its own shard, and the weights and Adam's moments assembled whole in this
    process, the EMAs, RNGs and every record are the straight run's, bit for bit."""
    root, results = matrix
    assert [c.get("rc") for c in results["diffusion-sharded-b"]["calls"]] == [0, 0], results["diffusion-sharded-b"]
    b = root / "diffusion-sharded-b" / LAST
    for d in (ckpt.sharded_weights_dir(b, "unet"), ckpt.sharded_optimizer_dir(b, "unet")):
        assert sorted(p.name for p in d.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not ckpt.weights_file(b, "unet").exists() and ckpt.read_meta(b)["checkpoint_format"] == "sharded"
    assert differences(root / "diffusion-a" / LAST, _as_full(b, tmp_path / "full")) == []
    assert record_differences(root / "diffusion-a", root / "diffusion-sharded-b", STOP) == []


@pytest.fixture(scope="module")
def one_process(matrix, tmp_path_factory):
    """diffusion-sharded-b copied, its newest checkpoint's rank-1 weight shard cut short, and resumed with one
    process (FSDP2 asked for, nothing to shard) to STEPS: (run folder, the run's output)."""
    import os

    from conftest import REPO
    from test_train import launch, run

    root, _ = matrix
    copy = tmp_path_factory.mktemp("sharded-1") / "run"
    shutil.copytree(root / "diffusion-sharded-b", copy)
    shard = ckpt.sharded_weights_dir(copy / LAST, "unet") / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    cfg = yaml.safe_load((root / "diffusion-sharded-b.yaml").read_text())
    cfg["run"]["dir"] = str(copy)
    (copy.parent / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **_engine("fsdp2"), "FSDP_VERSION": "2"}
    r = run(launch(1) + ["train", str(copy.parent / "c.yaml"), f"train.max_steps={STEPS}", *SHARDED], env)
    return copy, r.stdout + r.stderr, shard


def test_a_damaged_sharded_checkpoint_is_set_aside_naming_the_file(one_process):
    copy, out, shard = one_process
    assert f"step-{STEPS:08d} does not load ({shard}: truncated" in out, out[-3000:]
    assert (copy / f"{LAST}.damaged").is_dir()


def test_a_sharded_checkpoint_of_two_processes_resumes_with_one(one_process):
    """From step STOP (the newest that loads), resharded from 2 processes' shards to one process's whole tensors:
    Adam's step counts go on from STOP (a fresh start would count STEPS - STOP), and the new checkpoint is one
    process's."""
    copy, _, _ = one_process
    last = copy / LAST
    opt = dcp_ckpt.read_full(ckpt.sharded_optimizer_dir(last, "unet"))
    assert {int(s["step"]) for s in opt["state"].values()} == {STEPS}
    assert sorted(p.name for p in ckpt.sharded_weights_dir(last, "unet").iterdir()) == [".metadata", "__0_0.distcp"]
    changes = ckpt.read_meta(last)["world_size_changes"]
    assert [(c["step"], c["from_world"], c["to_world"]) for c in changes] == [(STOP, 2, 1)]
    assert sorted(json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()) == \
        list(range(1, STEPS + 1))


def test_what_fsdp2_cannot_run_is_refused_naming_the_setting():
    from distgen.engines_fsdp import config_problem

    tc = SimpleNamespace(mixed_precision="bf16", channels_last="auto", compile="auto")
    cpu = torch.device("cpu")
    assert config_problem("2", tc, cpu) is None
    assert "fsdp_version: 2" in config_problem("1", tc, cpu)
    assert config_problem("2", SimpleNamespace(**{**vars(tc), "mixed_precision": "fp16"}), cpu) is None  # scaled
    # fully_shard refuses channels_last weights (tests/scripts/fsdp_shards.py checks it still does)
    assert config_problem("2", SimpleNamespace(**{**vars(tc), "channels_last": True}), cpu).startswith(
        "train.channels_last: FSDP2's fully_shard takes only contiguous parameters")


def test_the_phases_that_differentiate_twice_say_so():
    """Phase.twice, which has FSDP2 hold a network gathered through the phase's backward: R1, wgan-gp's gradient
    penalty, StyleGAN2's path length, sliced score matching; not the other phases (their weights are freed after
    each unit's forward and backward). None of them is refused."""
    from distgen.config import load_config
    from distgen.families import DataInfo, build_family

    def twice(*over: str) -> dict[str, bool]:
        cfg = load_config(None, ["model.preset=tiny", "data.resolution=16", *over])
        family = build_family(cfg.model, DataInfo(16, 1, 10))
        assert family.fsdp_problem() is None
        return {p.name: p.twice for p in family.phases()}

    gan = ("model.family=gan", "model.arch=stylegan2")
    assert twice(*gan) == {"D": False, "G": False}
    assert twice(*gan, "model.r1_gamma=1", "model.pl_weight=2") == {"D": False, "D_r1": True, "G": False,
                                                                     "G_pl": True}
    assert twice("model.family=gan", "model.arch=dcgan", "model.loss=wgan-gp") == {"D": True, "G": False}
    assert twice("model.family=score", "model.objective=ssm", "model.sde=ncsn") == {"score": True}
    assert twice("model.family=score") == {"score": False}


def test_ffjord_is_one_unit_gathered_in_float32():
    """FFJORD, with and without the adjoint, runs under FSDP2 as one unit (a CNF block as a unit gathers at every
    solver step, whose number differs between ranks) with float32 weights (its solves' precision); the gradients
    are tests/scripts/fsdp_twice.py's."""
    from distgen.config import load_config
    from distgen.engines_fsdp import half_weights_problem
    from distgen.families import DataInfo, build_family

    for adjoint in (False, True):
        cfg = load_config(None, ["model.family=ffjord", "model.preset=tiny", "data.resolution=8",
                                 f"model.adjoint={adjoint}"])
        family = build_family(cfg.model, DataInfo(8, 1, 0))
        net = family.build_networks()["ffjord"]
        assert family.fsdp_problem() is None and family.shard_blocks("ffjord", net) == []
        assert half_weights_problem(net) == net.float32_forward


def test_a_double_backward_through_fsdp2_gives_the_whole_networks_gradients(env):
    """tests/scripts/fsdp_twice.py with 2 processes: R1 through DCGAN's sharded discriminator held gathered
    (FSDP2.gathered) gives the gradients of the whole network, twice, and leaves it sharded; without the hold the
    second backward finds its weights freed. So does FFJORD (one unit, float32 weights in a bf16 run), with
    Hutchinson's double backward and with odeint_adjoint's backward solve, its ranks' solves taking different
    numbers of steps."""
    import subprocess
    import sys

    from conftest import REPO
    from distgen.dist import free_port

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(REPO / "tests/scripts/fsdp_twice.py")], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "fsdp_twice: ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def test_the_emas_are_kept_as_shards_and_gathered_whole(env):
    """tests/scripts/fsdp_shards.py with 2 processes: each rank holds part of every EMA, updated as the whole EMA
    would be (bit for bit), gathered whole and sharded again; EDM2's projection of each rank's rows is the
    projection of the whole weight."""
    import subprocess
    import sys

    from conftest import REPO
    from distgen.dist import free_port

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(REPO / "tests/scripts/fsdp_shards.py")], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "fsdp_shards: ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
