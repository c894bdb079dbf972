"""DINOv2 and CLIP feature extractors: FD / KID / PR equal torch-fidelity's own with 1 and 2 processes, weights
only from local files (missing, pickled and mismatched files refused by name; OpenAI's TorchScript archives
read without running them), and distgen's DINOv2 forward against numbers of the official code."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from distgen.config.schema import EvalConfig, result_key
from distgen.data import write_shards
from distgen.data.shard import file_sha256
from distgen.evaluate import EvalSpec, Evaluator, spec_from_config
from distgen.evaluate.extractors import EvalError, Extractor
from distgen.evaluate.foundation import (ClipExtractor, DinoVisionTransformer, dinov2_model, read_tensors,
                                         weights_file)
from distgen.sample import generate, load_ema, sampling_options
import test_eval
from test_eval import Images, _eval

env, setup = test_eval.env, test_eval.setup  # test_eval's fixtures: a tiny trained run and reference shards

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
NUM = 12  # generated images per evaluation (two ViTs on CPU: kept small)
TF_KEYS = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid_mean",
           "kernel_inception_distance_std": "kid_std", "precision": "precision", "recall": "recall",
           "f_score": "f_score"}


class OpenAIClip(nn.Module):
    """A CLIP image tower and text projection under OpenAI's key names (``visual.*``): ViT-B/32's patch size and
    resolution, but 4 layers of width 256 instead of 12 of 768 to keep the test short (torch-fidelity's
    ``build_model`` reads the architecture from the weights' shapes, so the code path is the same)."""

    def __init__(self):
        from torch_fidelity.feature_extractor_clip import CLIPVisual

        super().__init__()
        self.visual = CLIPVisual(128, 224, 4, 256, 32).visual
        self.text_projection = nn.Parameter(torch.randn(64, 128) / 8)

    def forward(self, x):  # for torch.jit.trace (the text tower's projection is only read for its width)
        return self.visual(x)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, setup):
    """Random weights standing in for the real files: DINOv2 ViT-S/14 (a plain state dict, as Meta's), CLIP
    ViT-B/32 in fp16 as safetensors and as a TorchScript archive (as OpenAI's); and reference shards of 8 real
    images and 8 of the model's own samples (setup's), so that precision and recall are not 1 and 0."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("foundation")
    torch.manual_seed(0)
    torch.save(dinov2_model("dinov2-vit-s-14").state_dict(), root / "dinov2_vits14_pretrain.pth")
    clip = OpenAIClip().eval()
    save_file({k: v.half() for k, v in clip.state_dict().items()}, str(root / "ViT-B-32.safetensors"))
    scripted = torch.jit.trace(clip, torch.zeros(1, 3, 224, 224), check_trace=False).half()
    torch.jit.save(scripted, str(root / "ViT-B-32.pt"))
    x = np.load(setup["root"] / "ref.npz")["x"][12:28]  # 20 real, then 20 samples
    np.savez(root / "ref.npz", x=x)
    write_shards(f"npz:{root / 'ref.npz'}", root / "ref", "test", samples_per_shard=10)
    return {"dinov2": root / "dinov2_vits14_pretrain.pth", "clip": root / "ViT-B-32.safetensors",
            "clip_jit": root / "ViT-B-32.pt", "ref": root / "ref" / "test.manifest.json", "ref_x": x}


def _compare(name, setup, weights, env, tmp_path, tf_weights=None):
    """distgen eval with 2 processes and an in-process Evaluator against torch-fidelity's calculate_metrics."""
    import torch_fidelity

    tag = {"dinov2": "dinov2", "clip": "clip"}[name.split("-")[0]]
    path = weights[tag]
    cache = tmp_path / "cache"
    two, r = _eval(2, setup, {**env, "OMP_NUM_THREADS": "1"}, "--num-samples", str(NUM), "--metrics", "fid,kid,prc",
                   "--ref", str(weights["ref"]), "--feature-extractor", name, "--extractor-weights", str(path),
                   cache=cache, out=tmp_path / "two.json")
    assert {"dinov2": "FD_DINOv2", "clip": "FD_CLIP"}[tag] in r.stdout and two["extractor"] == name
    assert "fid" not in two and "kid_mean" not in two
    family, nets, cfg = load_ema(setup["run"])
    spec = spec_from_config(cfg, metrics=("fid", "kid", "prc", "isc"), num_samples=NUM, ref=[str(weights["ref"])],
                            seed=3, feature_extractor=name, extractor_weights=str(path), cache_dir=str(cache))
    spec.sampling = sampling_options(family, {"steps": 2})
    one = Evaluator(spec, log=lambda s: None).run(family, nets, cfg.data)
    assert (two["ref_cache"], one["ref_cache"]) == ("miss", "hit")  # keyed on the extractor and its weights
    assert "needs the InceptionV3 extractor" in one["skipped"]["isc"]

    got = generate(family, nets, NUM, seed=3, options={"steps": 2})
    gen = np.stack([got[i][0] for i in range(NUM)])
    tf = torch_fidelity.calculate_metrics(
        input1=Images(gen), input2=Images(weights["ref_x"][..., None]), cuda=False, feature_extractor=name,
        feature_extractor_weights_path=tf_weights, fid=True, kid=True, prc=True, kid_subset_size=NUM,
        save_cpu_ram=True, verbose=False)
    assert 0 < tf["f_score"] < 1 and tf["frechet_inception_distance"] > 0  # not a degenerate comparison
    for tf_key, ours in TF_KEYS.items():
        key = result_key(ours, name)  # fd_dinov2, kid_dinov2_mean, ...
        for res in (two, one):
            assert res[key] == pytest.approx(tf[tf_key], rel=1e-4), (key, res[key], tf[tf_key])


@pytest.mark.e2e
def test_dinov2_equals_torch_fidelity_with_1_and_2_processes(setup, weights, env_with_repo, tmp_path, monkeypatch):
    # torch-fidelity builds DINOv2 only through torch.hub.load (download + the repository's code): here it gets
    # distgen's model with the same weights, so its own resize, normalisation and metrics run around it.
    model = dinov2_model("dinov2-vit-s-14")
    model.load_state_dict(torch.load(weights["dinov2"], weights_only=True))
    monkeypatch.setattr(torch.hub, "load", lambda repo, entry, *a, **k: model if entry == "dinov2_vits14" else None)
    _compare("dinov2-vit-s-14", setup, weights, env_with_repo, tmp_path)


@pytest.mark.e2e
def test_clip_equals_torch_fidelity_with_1_and_2_processes(setup, weights, env_with_repo, tmp_path):
    # torch-fidelity reads the TorchScript archive with torch.jit.load; distgen the safetensors copy
    _compare("clip-vit-b-32", setup, weights, env_with_repo, tmp_path, tf_weights=str(weights["clip_jit"]))


def test_dinov2_forward_matches_the_official_code():
    """Numbers printed by facebookresearch/dinov2 (b8931f7) ``DinoVisionTransformer(img_size=518, patch_size=14,
    embed_dim=32, depth=2, num_heads=2, init_values=1.0, block_fn=Block with MemEffAttention, block_chunks=0,
    interpolate_offset=0.1)`` in eval mode, xFormers off, on the same weights and input."""
    net = DinoVisionTransformer(32, 2, 2).eval()
    g = torch.Generator().manual_seed(0)
    net.load_state_dict({k: 0.2 * torch.randn(v.shape, generator=g) for k, v in sorted(net.state_dict().items())})
    x = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        out = net(x)
        pos = net.interpolate_pos_encoding(net.patch_embed(x), 224, 224)
    assert pos.shape == (1, 16 * 16 + 1, 32)  # 37x37 position embeddings resampled to 224 px's 16x16 patches
    assert float(pos[0, 1:, 0].sum()) == pytest.approx(6.39547873, abs=1e-5)
    assert pos[0, 5, :3].tolist() == pytest.approx([-0.15745939, 0.11303046, -0.01538962], abs=1e-6)
    assert out.shape == (2, 32)
    assert out[:, :4].flatten().tolist() == pytest.approx([0.26323649, -0.11393242, 0.15116753, -0.10349882,
                                                           0.26856738, -0.11194079, 0.15130617, -0.10348520], abs=1e-5)
    assert float((out * torch.arange(64.0).reshape(2, 32)).sum()) == pytest.approx(-53.59793854, abs=1e-4)
    # the output is the layer-normed class token
    z = (out - net.norm.bias) / net.norm.weight
    assert z.mean(1).abs().max() < 1e-5 and (z.var(1, unbiased=False) - 1).abs().max() < 1e-3
    assert dinov2_model("dinov2-vit-s-14").pos_embed.shape == (1, 37 * 37 + 1, 384)


def test_torchscript_archive_is_read_without_running_it(weights, monkeypatch, tmp_path):
    from safetensors.torch import load_file
    from torch_fidelity.feature_extractor_clip import FeatureExtractorCLIP

    images = torch.from_numpy(weights["ref_x"][:2])[:, None].expand(-1, 3, -1, -1).contiguous()
    with torch.no_grad():
        theirs = FeatureExtractorCLIP("clip-vit-b-32", ["clip"], str(weights["clip_jit"]))(images)[0]
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load ran"))
    tensors, plain = read_tensors(weights["clip_jit"]), load_file(str(weights["clip"]))
    assert set(tensors) == set(plain) and all(torch.equal(tensors[k], plain[k]) for k in plain)
    with torch.no_grad():
        ours = ClipExtractor("clip-vit-b-32", ["clip"], str(weights["clip_jit"]))(images)[0]
    assert torch.equal(ours, theirs)
    # A visual-only state dict (no text_projection) loads too.
    from safetensors.torch import save_file

    save_file({k: v for k, v in plain.items() if k.startswith("visual.")}, str(tmp_path / "visual.safetensors"))
    with torch.no_grad():
        assert torch.equal(ClipExtractor("clip-vit-b-32", ["clip"], str(tmp_path / "visual.safetensors"))(images)[0],
                           theirs)

    # An archive whose pickle names anything but tensors and module records is refused, not run.
    class Boom:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "ran"),)

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(Boom(), protocol=2))
        z.writestr("evil/code/__torch__.py", "")
    with pytest.raises(EvalError, match=r"evil\.pt: not a TorchScript archive distgen can read safely .*refusing"):
        read_tensors(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()


class Custom:
    pass


def test_missing_pickled_and_mismatched_weights_are_refused_by_name(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    spec = EvalSpec(metrics=("fid", "kid"), ref=[str(weights["ref"])], feature_extractor="dinov2-vit-s-14")
    why = Evaluator(spec).skipped
    assert set(why) == {"fid", "kid"}
    expected = tmp_path / "torch-home" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    for part in (str(expected), "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
                 "--extractor-weights", "eval.extractor_weights", "never downloads"):
        assert part in why["fid"], (part, why["fid"])
    spec.extractor_weights = str(tmp_path / "nope.pth")
    assert f"{tmp_path / 'nope.pth'} (from --extractor-weights" in Evaluator(spec).skipped["fid"]
    # the default location: torch hub's cache, under the official file name (for CLIP also torch-fidelity's)
    expected.parent.mkdir(parents=True)
    os.symlink(weights["dinov2"], expected)
    assert weights_file("dinov2-vit-s-14") == expected
    os.symlink(weights["clip_jit"], expected.parent / "clip-vit-b-32-40d365715913c9da98579312b702a82c18be219cc2a"
                                                      "73407c4526f58eba950af.pt")
    assert weights_file("clip-vit-b-32").name.startswith("clip-vit-b-32-")
    ex = Extractor("dinov2-vit-s-14", {"fid": None})
    assert ex.identity == f"dinov2-vit-s-14:{file_sha256(weights['dinov2'])}"  # reference caches keyed on it

    def refused(path, name="dinov2-vit-s-14"):
        with pytest.raises(EvalError) as e:
            Extractor(name, {"fid": None}, extractor_weights_path=str(path))
        assert str(path) in str(e.value)
        return str(e.value)

    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")
    assert "it pickles torch.nn.modules.linear.Linear" in refused(tmp_path / "module.pth")
    with open(tmp_path / "custom.pkl", "wb") as f:
        pickle.dump({"w": Custom()}, f, protocol=2)  # names its class (protocol 4 gives "it pickles objects")
    assert "it pickles test_eval_foundation.Custom" in refused(tmp_path / "custom.pkl", "clip-vit-b-32")
    torch.save({"pos_embed": torch.zeros(1, 5, 384)}, tmp_path / "wrong.pth")
    assert "not dinov2-vit-s-14 weights (missing" in refused(tmp_path / "wrong.pth")
    assert "not clip-vit-b-32 weights" in refused(weights["dinov2"], "clip-vit-b-32")
    with pytest.raises(EvalError, match="no such extractor; DINOv2 / CLIP ones are dinov2-vit-s-14"):
        Extractor("dinov2-vit-x-14", {"fid": None})


def test_results_go_by_their_own_names():
    assert [result_key(k, "dinov2-vit-s-14") for k in ("fid", "kid_mean", "kid_std", "precision", "f_score", "bpd")] \
        == ["fd_dinov2", "kid_dinov2_mean", "kid_dinov2_std", "precision_dinov2", "f_score_dinov2", "bpd"]
    assert result_key("recall", "clip-vit-l-14") == "recall_clip" and result_key("fid", "inception") == "fid"
    ec = EvalConfig(metrics=("fid",), feature_extractor="dinov2-vit-s-14")
    assert ec.best_key == "fd_dinov2" and ec.better(1.0, 2.0)
    assert EvalConfig(metrics=("prc",), feature_extractor="clip-vit-b-32").best_key == "f_score_clip"
    assert EvalConfig(metrics=("bpd", "fid"), best_metric="kid_mean", feature_extractor="clip-vit-b-32").best_key \
        == "kid_clip_mean"
    assert EvalConfig(metrics=("fid",), feature_extractor="/x/domain.safetensors").best_key == "fd_domain"
