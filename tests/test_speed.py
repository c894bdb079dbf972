"""The speed switches (train.compile, channels_last, optimizer_impl) and the step without host reads:
the same training with them as without (exact resume with all of them on is test_resume's), and a non-finite step still
skipped, counted and stopped on once the loop no longer reads the loss back every step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distgen import checkpoint as ckpt
from distgen.cli import main as cli_main
from distgen.config import load_config
from distgen.families import build_family
from distgen.families.base import DataInfo
from distgen.errors import TrainingError
from distgen.speed import resolve
from matrix import differences, record_differences
from test_gan import gan_config
from test_train import REPO, run, tiny_config, weights

PY = [sys.executable, "-m", "distgen"]


def losses_by_step(run_dir: Path) -> dict[int, dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("loss", "D/", "G/"))} for r in recs}


def close(a: dict, b: dict, rtol: float) -> bool:
    return a.keys() == b.keys() and all(
        abs(a[s][k] - b[s][k]) <= rtol * abs(b[s][k]) for s in a for k in a[s] if b[s][k] is not None)


@pytest.mark.parametrize("family", ["diffusion", "gan"])
@pytest.mark.e2e
def test_compile_trains_as_eager_does(family, tmp_path, fm_test_shards, capsys):
    """Ten logged steps with every network compiled against the same run eager: the same weights, batches and
    noise, the compiler reordering float32 sums. Reassociating a sum of n float32 terms moves it by at most
    (n - 1) 2^-24 sum |x_i| (Higham, Accuracy and Stability of Numerical Algorithms, eq. 4.4); the losses' terms
    are non-negative (squared errors, hinge terms) and n <= 2^13 (8 x 784 squared errors; the networks' own sums
    are shorter), so a loss, and a gradient relative to its own terms, moves by at most 2^-11. Adam's step
    lr m/(sqrt(v) + eps) passes a relative change of the gradients on as at most twice that relative change of the
    step, except where a gradient sits at rounding level and may flip sign, where the loss's slope is itself at
    rounding level; the steps moved the loss by about its own size (Adam's early steps are sign steps), so they
    add at most 2 x 2^-11 of it. Each loss stays within 3 x 2^-11 < 2^-9 of eager's. (The GAN's mean scores,
    loss/G, D/real and D/fake, sum terms of both signs, for which no relative bound follows: not compared.)"""
    runs = {}
    over = {"train": {"max_steps": 10, "log_every": 1, "checkpoint_every": 2}}
    # DiT rather than the U-Net: what is checked is the loop's handling of compiled networks, and DiT's identical
    # blocks share inductor's kernels (36 s to compile cold on this machine against the U-Net's 105 s)
    dit = {**over, "model": {"backbone": "dit"}}
    for compiled in (False, True):
        sub = tmp_path / str(compiled)
        cfg = (gan_config(sub, fm_test_shards, {"arch": "mlp", "loss": "hinge"}, **over) if family == "gan"
               else tiny_config(sub, fm_test_shards, **dit))
        assert cli_main(["train", str(cfg), f"train.compile={str(compiled).lower()}"]) == 0  # in this process
        nets = "D, G" if family == "gan" else "unet"
        assert (f"speed: compile {nets} (mode default)" if compiled else "speed: compile off") in capsys.readouterr().out
        runs[compiled] = losses_by_step(sub / "run")
    if family == "diffusion":
        # Compiled, stopped between checkpoints and resumed: the same final checkpoint and records as the compiled
        # run straight through, bit for bit (the same kernels: the recompiles hit inductor's cache)
        cfg = tiny_config(tmp_path / "resumed", fm_test_shards, **dit)
        for last in (3, 10):
            assert cli_main(["train", str(cfg), "train.compile=true", f"train.max_steps={last}"]) == 0
        a, b = tmp_path / "True" / "run", tmp_path / "resumed" / "run"
        assert differences(a / "checkpoints/step-00000010", b / "checkpoints/step-00000010") == []
        assert record_differences(a, b, 3) == []
    assert sorted(runs[True]) == list(range(1, 11))
    keys = {"loss", "loss/D"}  # the hinge loss's terms relu(1 -+ D) are non-negative, as squared errors are
    runs = {c: {s: {k: v for k, v in r.items() if k in keys} for s, r in steps.items()} for c, steps in runs.items()}
    assert all(r for r in runs[False].values()) and close(runs[True], runs[False], rtol=2 ** -9), runs


def test_networks_a_regulariser_differentiates_twice_are_not_compiled():
    """R1 / a gradient penalty / path length need double backward, which torch.compile lacks: those
    networks run eagerly and the start-up line says why; the rest compile."""
    for model, eager in (({"arch": "stylegan2", "r1_gamma": 1.0}, "D"), ({"arch": "mlp", "loss": "wgan-gp"}, "D"),
                         ({"arch": "stylegan2", "pl_weight": 2.0}, "G")):
        cfg = load_config(None, ["model.family=gan", "train.compile=true"] + [f"model.{k}={v}" for k, v in model.items()])
        family = build_family(cfg.model, DataInfo(16, 1, 0))
        s = resolve(cfg.train, torch.device("cpu"), family, ["D", "G"], deepspeed=False)
        assert list(s.not_compiled) == [eager] and s.compiled == [n for n in ("D", "G") if n != eager]
        assert "differentiates through it twice" in s.describe()
    auto = resolve(load_config(None, []).train, torch.device("cpu"), family, ["D", "G"], deepspeed=False)
    assert not auto.compiled and not auto.channels_last and auto.optimizer_impl == "foreach"  # "auto" on CPU
    # DCGAN runs eagerly: compiled under channels_last, inductor's convolution backward failed on an H100
    cfg = load_config(None, ["model.family=gan", "model.arch=dcgan", "train.compile=true"])
    s = resolve(cfg.train, torch.device("cpu"), build_family(cfg.model, DataInfo(16, 1, 0)), ["D", "G"], False)
    assert not s.compiled and sorted(s.not_compiled) == ["D", "G"]


def test_channels_last_is_off_under_deepspeed_and_refused_when_asked_for():
    """DeepSpeed broadcasts parameters through a byte view that channels_last weights cannot take (seen on an
    H100): "auto" leaves it off there, an explicit true is refused naming the field."""
    cfg = load_config(None, ["train.channels_last=auto"])
    family = build_family(cfg.model, DataInfo(16, 1, 0))
    assert not resolve(cfg.train, torch.device("cuda"), family, ["unet"], deepspeed=True).channels_last
    assert resolve(cfg.train, torch.device("cuda"), family, ["unet"], deepspeed=False).channels_last
    on = load_config(None, ["train.channels_last=true"])
    with pytest.raises(TrainingError, match=r"^train\.channels_last: DeepSpeed"):
        resolve(on.train, torch.device("cpu"), family, ["unet"], deepspeed=True)


def probe(tmp_path, cfg: Path, nan_steps: str, *overrides: str) -> dict:
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, str(REPO / "tests/scripts/step_probe.py"), str(cfg), str(out), nan_steps,
                        *overrides], capture_output=True, text=True, cwd=REPO, timeout=600)
    return {**json.loads(out.read_text()), "stderr": r.stderr, "returncode": r.returncode} if out.exists() else \
        {"returncode": r.returncode, "stderr": r.stderr}


@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.e2e
def test_a_nonfinite_step_updates_nothing_without_host_reads(impl, tmp_path, fm_test_shards):
    """NaN losses at steps 3 and 4 of a real run, read back only at the step-8 record: those two steps
    change no weight, no EMA and no optimizer step count; the others do; the record counts 2 and averages
    the finite losses. With fused AdamW the step reads nothing back to the host (the skip happens in the
    kernel); other kernels need one read of the flag per step. (Step 1 starts the data loader, whose seed
    is drawn with a CPU .item().)"""
    cfg = tiny_config(tmp_path, fm_test_shards, train={"max_steps": 8, "log_every": 8, "checkpoint_every": 100})
    res = probe(tmp_path, cfg, "3,4", f"train.optimizer_impl={impl}")
    assert res["returncode"] == 0, res["stderr"][-3000:]
    for s in res["steps"]:
        skipped = s["step"] in (3, 4)
        assert (s["weights_same"], s["ema_same"], s["opt_steps_same"]) == (skipped,) * 3, s
        assert s["finite_weights"]
        if s["step"] > 1:
            assert s["host_reads"] == (0 if impl == "fused" else 1), s
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 8 and rec["nonfinite_total"] == 2 and rec["loss"] > 0


@pytest.mark.e2e
def test_a_nonfinite_streak_found_at_the_record_stops_the_run(tmp_path, fm_test_shards):
    """max_nonfinite=3, NaN from step 7 on, records every 5 steps and a checkpoint at step 5: the streak is
    read at step 10 (4 in a row), the run stops there naming the step-5 checkpoint, whose weights are finite."""
    cfg = tiny_config(tmp_path, fm_test_shards, train={"max_steps": 20, "log_every": 5, "checkpoint_every": 5,
                                                       "max_nonfinite": 3})
    res = probe(tmp_path, cfg, ",".join(map(str, range(7, 21))), "train.optimizer_impl=fused")
    assert res["returncode"] == 2, res["stderr"][-3000:]
    good = tmp_path / "run" / "checkpoints" / "step-00000005"
    assert (f"3 non-finite steps in a row (step 10); stopping without saving: the last good checkpoint is {good}"
            in res["stderr"])
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000005"]
    assert all(torch.isfinite(t).all() for t in weights(good).values())
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 10 and rec["nonfinite_total"] == 4


@pytest.mark.e2e
def test_gpu_throughput_benchmark_runs_on_cpu_with_a_tiny_preset(tmp_path, fm_test_shards, env_with_repo):
    r = run([sys.executable, str(REPO / "benchmarks/gpu_throughput.py"), "--preset", "tiny", "--batch", "8",
             "--steps", "4", "--warmup", "2", "--manifest", str(fm_test_shards), "--resolution", "28",
             "--channels", "1", "--workers", "1", "--no-compile"], env_with_repo)  # compile: test_compile_*
    out = r.stdout
    for line in ("plain loop", "tuned loop", "distgen train", "distgen / tuned", "distgen / plain", "FLOP"):
        assert line in out, out
