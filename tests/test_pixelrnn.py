"""PixelRNN: the two architectures' receptive fields checked directly (causality, and the field the paper
describes), configuration errors, and training runs as users run them (2 processes with an exact resume and
sampling that does not depend on the process count; 1 process with export, temperature and bits/dim)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distgen.cli import main as cli_main
from distgen.config import build_config
from distgen.config.core import ConfigError
from distgen.families import likelihoods as L
from distgen.families.base import DataInfo
from distgen.families.pixelrnn import PixelRNN, PixelRNNNet, skew, unskew
from distgen.sample import SampleError, generate, likelihood_options, load_ema, sampling_options
from test_likelihood import _bpd_direct, lik_config
from test_train import launch, run

ARCHS = ("row_lstm", "diagonal_bilstm")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---------------------------------------------------------------- receptive fields

def _seen(net, x):
    """[P, P]: which pixels (raster order, any channel) the output at each pixel has a non-zero gradient for.
    One backward pass: image k of a batch of P copies carries the output at pixel k."""
    n = x.shape[2] * x.shape[3]
    xx = x.expand(n, -1, -1, -1).clone().requires_grad_(True)
    out = net(xx).flatten(2)  # [P, params, P]
    out[torch.arange(n), :, torch.arange(n)].sum().backward()
    return xx.grad.abs().sum(1).flatten(1) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_output_at_a_pixel_depends_on_earlier_pixels_only(arch):
    """The mixture at pixel i models all of pixel i's channels (R -> G -> B inside the mixture), so the
    network's output there must not depend on any channel of pixel i or a later one, in raster order."""
    torch.manual_seed(0)
    layers = 2
    for channels in (1, 3):
        net = PixelRNNNet(channels, arch, layers=layers, hidden=4, nr_mix=2)
        x = torch.rand(1, channels, 8, 8) * 2 - 1
        full = net(x)
        seen_all = _seen(net, x)
        for pos in range(64):
            seen = seen_all[pos]
            assert not seen[pos:].any(), f"pixel {pos} depends on itself or a later pixel"
            r, c = divmod(pos, 8)
            earlier = seen[:pos].view(-1)
            if arch == "diagonal_bilstm":
                assert earlier.all(), f"pixel {pos} does not see every earlier pixel"
            else:
                # Row LSTM: every pixel of the triangle above (the 1x3 state-to-state kernel widens the field by
                # one column a row) ...
                tri = [(i, j) for i in range(r) for j in range(8) if abs(j - c) <= r - i]
                assert all(seen[8 * i + j] for i, j in tri), f"pixel {pos} misses part of its triangle"
                # ... but on its own row only 3 pixels (7x7 mask A) + 1 a layer (the masked 1x3 input-to-state)
                # to the left: the context it misses, as the paper says
                for j in range(c):
                    assert bool(seen[8 * r + j]) == (c - j <= 3 + layers), (pos, j)
            # the same through changed values: every pixel from i on replaced, the output at i unchanged
            if pos % 9 == 0:
                y = x.clone().view(1, channels, 64)
                y[:, :, pos:] = torch.rand(1, channels, 64 - pos) * 2 - 1
                assert torch.allclose(net(y.view_as(x))[0, :, r, c], full[0, :, r, c], atol=1e-6)
                if pos:
                    y[:, :, pos - 1] = -y[:, :, pos - 1]  # the pixel just before does matter
                    assert not torch.allclose(net(y.view_as(x))[0, :, r, c], full[0, :, r, c], atol=1e-6)
        # a pass over the first rows gives those rows' outputs unchanged (what sampling relies on)
        assert torch.allclose(net(x[:, :, :3]), full[:, :, :3], atol=1e-6)


def test_skew_moves_row_r_right_by_r_and_unskew_inverts_it():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    s = skew(x)
    assert s.shape == (1, 2, 3, 6)
    for r in range(3):
        assert torch.equal(s[:, :, r, r:r + 4], x[:, :, r]) and s[:, :, r].abs().sum() == x[:, :, r].abs().sum()
    assert torch.equal(unskew(s, 4), x)


def test_temperature_scales_the_mixture_draw():
    torch.manual_seed(2)
    params = torch.randn(1, L.logistic_mixture_params(1, 3)).expand(4000, -1)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4000)]  # noqa: E731
    one = L.logistic_mixture_sample(params, 3, 1, gens())
    assert torch.equal(one, L.logistic_mixture_sample(params, 3, 1, gens(), temperature=1.0))
    # T = 0: the most likely component's mean, rounded to its bin, for every image
    cold = L.logistic_mixture_sample(params, 3, 1, gens(), temperature=0.0)
    logits, means, _, _ = L._split(params[:1, :, None, None], 1, 3)
    mode = means[0, 0, logits[0].argmax(0)].clamp(-1, 1)
    assert (cold == cold[0]).all() and (cold[0] - mode).abs().max() <= 1 / 127.5
    # lower temperatures draw a narrower distribution (logistic noise times T, sharper component choice)
    warm = L.logistic_mixture_sample(params, 3, 1, gens(), temperature=0.5)
    assert warm.std() < one.std()


def test_config_errors_name_the_field():
    for model, field in [({"family": "pixelrnn", "arch": "gru"}, "model.arch"),
                         ({"family": "pixelrnn", "layers": 0}, "model.layers"),
                         ({"family": "pixelrnn", "hidden": 0}, "model.hidden"),
                         ({"family": "pixelrnn", "nr_mix": 0}, "model.nr_mix"),
                         ({"family": "pixelrnn", "temperature": -1}, "model.temperature")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            build_config({"model": model})
    cfg = build_config({"model": {"family": "pixelrnn", "preset": "tiny"}})
    fam = PixelRNN(cfg.model, DataInfo(8, 1, 0))
    assert all(fam.engine_problem(z) is None for z in (None, 1, 2, 3)) and fam.compile_problem("pixelrnn") is None
    with pytest.raises(SampleError, match="--temperature: must be >= 0"):
        sampling_options(fam, {"temperature": -0.5})
    with pytest.raises(SampleError, match=r"takes no sampling option --steps"):
        sampling_options(fam, {"steps": 3})


# ---------------------------------------------------------------- training runs

def rnn_config(tmp_path, manifest, arch, **over):
    return lik_config(tmp_path, manifest, {"family": "pixelrnn", "arch": arch}, **over)


@pytest.mark.e2e
def test_two_processes_sample_what_one_process_samples(trained, tmp_path, env):
    """The shared Diagonal BiLSTM run (2 processes; its exact resume is test_resume's): losses in bits/dim; its
    export samples the same images with 1 and 2 processes, at a temperature."""
    root, _ = trained
    recs = [json.loads(line) for line in (root / "pixelrnn-a" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["loss"] < 16 for r in recs)

    out = tmp_path / "export"
    assert cli_main(["export", str(root / "pixelrnn-a"), str(out)]) == 0
    args = ["sample", str(out), "--num", "5", "--seed", "3", "--temperature", "0.8"]
    assert cli_main([*args, "--out", str(tmp_path / "one.npz")]) == 0
    run(launch(2) + [*args, "--out", str(tmp_path / "two.npz")], env)
    one, two = np.load(tmp_path / "one.npz")["x"], np.load(tmp_path / "two.npz")["x"]
    assert one.shape == (5, 8, 8, 1) and np.array_equal(one, two) and len({i.tobytes() for i in one}) == 5
    fam, nets, _ = load_ema(out)
    mine = generate(fam, nets, 5, seed=3, options={"temperature": 0.8})
    assert np.array_equal(one, np.stack([mine[i][0] for i in range(5)]))


def test_one_process_row_lstm_run_exports_samples_and_reports_bits_per_dim(tmp_path, fm_test_shards, env):
    """Row LSTM (the Diagonal BiLSTM trains in the shared runs): losses in bits/dim falling, export, sampling at a
    temperature, and bits/dim of a test split equal to the direct sum."""
    cfg = rnn_config(tmp_path, fm_test_shards, "row_lstm", train={"total_kimg": 0.08})
    assert cli_main(["train", str(cfg)]) == 0
    out = tmp_path / "export"
    assert cli_main(["export", str(tmp_path / "run"), str(out)]) == 0
    fam, nets, _ = load_ema(out)
    assert nets["pixelrnn"].arch == "row_lstm"
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # below 8 bits/dim, the uniform code of 256 values (where an untrained softmax starts): it learned. (Whether
    # the last batch's loss is below the first's, within a run this short, is noise.)
    late = [r["loss"] for r in recs[len(recs) // 2:]]
    assert all(0 < r["loss"] < 16 for r in recs) and sum(late) / len(late) < 8, [r["loss"] for r in recs]
    # temperature 0: no noise in the draws, so every seed gives the same image
    cold = generate(fam, nets, 3, seed=0, options={"temperature": 0.0})
    assert np.array_equal(cold[0][0], cold[1][0]) and np.array_equal(cold[0][0], cold[2][0])
    warm = generate(fam, nets, 3, seed=0, options={})
    assert len({warm[i][0].tobytes() for i in range(3)}) == 3
    with pytest.raises(SampleError, match=r"'s likelihood takes no option --iw-samples \(it takes: none\)"):
        likelihood_options(fam, {"iw_samples": 4})

    # bits/dim of a small test split: the command's figure is the direct sum over its images
    from PIL import Image

    from distgen.data import write_shards
    from test_eval import _fm_images

    x, y = _fm_images(11, offset=500)
    xs = np.stack([np.asarray(Image.fromarray(i).resize((8, 8))) for i in x])
    np.savez(tmp_path / "t.npz", x=xs, y=y)
    write_shards(f"npz:{tmp_path / 't.npz'}", tmp_path / "t", "test", samples_per_shard=4)
    res = tmp_path / "bpd.json"
    assert cli_main(["eval", str(out), "--metrics", "bpd", "--test", str(tmp_path / "t" / "test.manifest.json"),
                     "--out", str(res)]) == 0
    got = json.loads(res.read_text())
    assert got["bpd_images"] == 11 and got["bpd_kind"] == "exact"
    with torch.no_grad():
        want = _bpd_direct(fam, nets, xs[..., None], None, per_shard=4)
    assert got["bpd"] == pytest.approx(want, rel=1e-6) and 0 < got["bpd"] < 16
