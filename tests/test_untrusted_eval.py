"""Files evaluation reads back are untrusted: reference statistics (.npz), the reference cache, the manifest's
image count, feature-extractor files and weights. Bad ones stop with an EvalError whose first line names the
file and the member or key (a cache is recomputed instead, saying why in one line), never a nan, a negative
FID or a traceback, and nothing they declare is allocated or run before it is checked."""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import os
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save_file

from distgen.config import DataConfig
from distgen.data import write_shards
from distgen.errors import EvalError
from distgen.evaluate import EvalSpec, Evaluator
from distgen.evaluate import refstats
from distgen.evaluate.command import format_results
from distgen.evaluate.extractors import BUNDLED, DOMAIN_FORMAT, Extractor
from conftest import REPO
from test_train import run, tiny_config

D = 256  # the bundled Fashion-MNIST extractor's features (ResNet of width 32: 8 x 32)
EPS32 = float(np.finfo(np.float32).eps)


def first_line(e: pytest.ExceptionInfo) -> str:
    return str(e.value).splitlines()[0]


def fm_images(n: int, offset: int = 0) -> np.ndarray:
    from distgen.data.sources import open_source

    items = itertools.islice(open_source("fashion-mnist", "test").items(), offset, offset + n)
    return np.stack([i[0] for i in items])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """30 Fashion-MNIST test images in 3 shards with a manifest."""
    root = tmp_path_factory.mktemp("ref")
    np.savez(root / "x.npz", x=fm_images(30, offset=3000))
    write_shards(f"npz:{root / 'x.npz'}", root / "ref", "test", samples_per_shard=10)
    return root / "ref" / "test.manifest.json"


def evaluator(ref, metrics=("fid", "kid"), log=None, **kw) -> Evaluator:
    return Evaluator(EvalSpec(metrics=metrics, ref=[str(ref)], feature_extractor="fashion-mnist", kid_subset_size=8,
                              batch_size=16, **kw), log=log if log is not None else (lambda _m: None))


@functools.lru_cache(maxsize=1)
def _generated() -> dict[str, torch.Tensor]:
    ex = Extractor("fashion-mnist", {"fid": None})
    return ex(torch.from_numpy(fm_images(12, offset=5000))[:, None].contiguous())


def generated() -> dict[str, torch.Tensor]:
    """Features of 12 images as the bundled extractor gives them (real test images stand in for samples)."""
    return {k: v.clone() for k, v in _generated().items()}


def statistics(n: int = 40, d: int = D, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return f.mean(0), np.cov(f, rowvar=False), f


# --------------------------------------------------------------------------- 1. --ref STATS.npz
def test_a_stats_file_of_mu_and_sigma_gives_fid_and_says_what_is_skipped(tmp_path):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    gen = generated()
    mu, sigma, _ = statistics()
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)  # pytorch-fid's / torch-fidelity's layout
    res = evaluator(tmp_path / "stats.npz").run(features=gen)
    want = fid_statistics_to_metric(fid_features_to_statistics(gen["features"]),
                                    {"mu": mu.astype(np.float32), "sigma": sigma}, False)["frechet_inception_distance"]
    assert res["fd_domain"] == want and np.isfinite(want)  # FD in the domain classifier's space, not FID
    assert res["skipped"] == {"kid": f"the statistics file {tmp_path / 'stats.npz'} holds no 'features' array"}
    assert res["ref_images"] is None  # not recorded: not invented
    assert "reference: image count not recorded (cache none)" in format_results(res)
    # with features (and a count that agrees with them), KID too; the count is the file's
    _, _, f = statistics(n=20)
    np.savez(tmp_path / "full.npz", mu=mu, sigma=sigma, features=f, num=np.int64(20))
    res = evaluator(tmp_path / "full.npz").run(features=gen)
    assert res["fd_domain"] == want and np.isfinite(res["kid_domain_mean"]) and res["ref_images"] == 20
    assert "skipped" not in res


BAD_FILES = {
    # name: (arrays, member named first, what the message says)
    "nan_mu": (lambda mu, s, f: dict(mu=np.where(np.arange(D) == 3, np.nan, mu), sigma=s), "mu", "not finite"),
    "inf_sigma": (lambda mu, s, f: dict(mu=mu, sigma=np.where(np.eye(D) > 0, np.inf, s)), "sigma", "not finite"),
    "minus_identity": (lambda mu, s, f: dict(mu=mu, sigma=-np.eye(D)), "sigma", "not positive semi-definite"),
    "asymmetric": (lambda mu, s, f: dict(mu=mu, sigma=s + np.triu(np.ones((D, D)), 1)), "sigma", "not symmetric"),
    "string_mu": (lambda mu, s, f: dict(mu=np.array(["a"] * D), sigma=s), "mu", "expected real numbers"),
    "complex_mu": (lambda mu, s, f: dict(mu=mu + 1j, sigma=s), "mu", "expected real numbers"),
    "float16_sigma": (lambda mu, s, f: dict(mu=mu, sigma=s.astype(np.float16)), "sigma", "float32 or float64"),
    "mu_beyond_float32": (lambda mu, s, f: dict(mu=np.full(D, 1e300), sigma=s), "mu", "not finite"),
    # PSD and symmetric, but beyond what float32 features' covariance holds: FID's product would overflow
    "sigma_beyond_float32_squared": (lambda mu, s, f: dict(mu=mu, sigma=s * 1e80), "sigma",
                                     "more than a covariance of float32 features holds"),
    "sigma_shape": (lambda mu, s, f: dict(mu=mu, sigma=s[:, :-1]), "sigma", f"expected [D, D] = [{D}, {D}]"),
    "mu_matrix": (lambda mu, s, f: dict(mu=s, sigma=s), "mu", "expected a vector"),
    "nan_features": (lambda mu, s, f: dict(mu=mu, sigma=s, features=np.where(f > 2, np.nan, f)), "features",
                     "not finite"),
    "features_of_another_dim": (lambda mu, s, f: dict(mu=mu, sigma=s, features=f[:, :-1]), "features",
                                f"{D - 1} per image, but mu has {D}"),
    "num_zero": (lambda mu, s, f: dict(mu=mu, sigma=s, num=np.int64(0)), "num", "out of range"),
    "num_not_features": (lambda mu, s, f: dict(mu=mu, sigma=s, features=f, num=np.int64(41)), "num",
                         "41 images, but 'features' holds 40"),
    "num_float": (lambda mu, s, f: dict(mu=mu, sigma=s, num=np.float64(40.5)), "num", "expected one integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_stats_file_is_refused_naming_the_file_and_member(case, tmp_path):
    make, member, says = BAD_FILES[case]
    path = tmp_path / f"{case}.npz"
    np.savez(path, **make(*statistics()))
    with pytest.raises(EvalError) as e:
        evaluator(path).run(features=generated())
    assert first_line(e).startswith(f"{path}: {member}: ") and says in first_line(e), first_line(e)


def test_a_figure_that_comes_out_not_finite_is_skipped_saying_why(tmp_path, monkeypatch):
    """The last line of defence: features out of float range (an extractor whose weights overflow) make FID nan;
    it is reported as skipped (the command then exits 1), never as a number."""
    mu, sigma, f = statistics()
    np.savez(tmp_path / "ok.npz", mu=mu, sigma=sigma, features=f)
    gen = generated()
    gen["features"][0, 0] = float("inf")
    res = evaluator(tmp_path / "ok.npz").run(features=gen)
    assert "fd_domain" not in res and "kid_domain_mean" not in res and set(res["skipped"]) == {"fid", "kid"}
    assert res["skipped"]["fid"] == (f"the extractor distgen-domain ({BUNDLED['fashion-mnist']}) gave NaN or "
                                     f"infinite values in its 'features' output for 1 of 12 images")
    # finite features whose FID still is not a number (here: a computation that overflows) are skipped too
    import distgen.evaluate.fidelity as fidelity

    real = fidelity.fid_statistics_to_metric
    monkeypatch.setattr(fidelity, "fid_statistics_to_metric", lambda *a: {k: v * math.inf for k, v in real(*a).items()})
    res = evaluator(tmp_path / "ok.npz").run(features=generated())
    assert "fd_domain" not in res and res["skipped"]["fid"].startswith(
        f"came out fd_domain inf (not finite) against the reference {tmp_path / 'ok.npz'}")
    assert np.isfinite(res["kid_domain_mean"])


def test_stats_file_pairs_and_dimensions_are_named(tmp_path):
    mu, sigma, f = statistics()
    cases = {"mu_alone": (dict(mu=mu, features=f), "holds 'mu' without 'sigma'"),
             "sigma_alone": (dict(sigma=sigma), "holds 'sigma' without 'mu'"),
             "nothing": (dict(x=mu), "holds neither 'mu' and 'sigma' nor 'features'"),
             "another_extractor": (dict(mu=mu[:10], sigma=sigma[:10, :10]),
                                   f"statistics of dimension 10, but the extractor's features have {D}")}
    for name, (arrays, says) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        for metrics in (("fid",), ("kid",)):  # mu without sigma was a KeyError traceback without fid
            with pytest.raises(EvalError) as e:
                evaluator(tmp_path / f"{name}.npz", metrics=metrics).run(features=generated())
            assert first_line(e).startswith(f"{tmp_path / name}.npz: {says}"), first_line(e)
    # an object array is refused from its header, never unpickled
    np.savez(tmp_path / "objects.npz", mu=np.array([object()] * 3, dtype=object), sigma=sigma)
    with pytest.raises(EvalError) as e:
        evaluator(tmp_path / "objects.npz").run(features=generated())
    assert first_line(e).startswith(f"{tmp_path / 'objects.npz'}: mu.npy: holds Python objects")


def test_the_covariance_tolerance_follows_from_float_rounding():
    """sigma is accepted when symmetric within tol * max|sigma| and no eigenvalue is below -tol * the largest, tol =
    D * eps32 (refstats.covariance_tolerance); each case sits a factor of 2 inside or outside that bound, far from
    the float64 error of building and factorising the matrices (about D * eps64, 10^-8 of tol)."""
    d = 64
    tol = refstats.covariance_tolerance(d)
    assert tol == d * EPS32
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((d, d)))

    def spectrum(lowest: float) -> np.ndarray:
        lam = np.linspace(1.0, 2.0, d)
        lam[0] = lowest * 2.0  # relative to the largest eigenvalue, 2
        s = (q * lam) @ q.T
        return (s + s.T) / 2

    assert refstats.covariance_problem(spectrum(-tol / 2)) is None
    assert "not positive semi-definite" in refstats.covariance_problem(spectrum(-2 * tol))
    asym = np.zeros((d, d))
    asym[0, 1] = 1.0
    assert refstats.covariance_problem(np.eye(d) + tol / 2 * asym) is None
    assert "not symmetric" in refstats.covariance_problem(np.eye(d) + 2 * tol * asym)
    # A singular covariance (10 samples in 64 dimensions) rounded to float32: Weyl's bound puts its eigenvalues
    # no lower than -eps32/2 * sqrt(D) * the largest, inside tol. It is a covariance and must pass.
    f = np.random.default_rng(2).standard_normal((10, d))
    s32 = np.cov(f, rowvar=False).astype(np.float32).astype(np.float64)
    assert np.linalg.eigvalsh(s32)[0] < 0  # float rounding did make it slightly indefinite
    assert refstats.covariance_problem(s32) is None


def _npy(shape, dtype="<f4", data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def test_sizes_are_checked_from_the_headers_before_anything_is_unpacked(tmp_path, monkeypatch):
    mu, sigma, _ = statistics()
    # a .npy header that declares 8 TB of features with none behind it: numpy would allocate them first
    path = tmp_path / "declares.npz"
    np.savez(path, mu=mu, sigma=sigma)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("features.npy", _npy((1 << 30, 2048)))
    with pytest.raises(EvalError) as e:
        evaluator(path).run(features=generated())
    assert first_line(e).startswith(f"{path}: features.npy: its header declares [1073741824, 2048] of float32 "
                                    f"(8796093022208 bytes), but the member holds 0")
    # a zip bomb: a member whose zip header says it unpacks to more than distgen reads (the limit lowered so
    # that the test makes it in a moment: 2 MiB of zeros compress to a few KB)
    monkeypatch.setattr(refstats, "MAX_STATS_BYTES", 1 << 20)
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, mu=np.zeros(D, np.float32), sigma=np.zeros((D, D)),
                        features=np.zeros((2048, D), np.float32))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(EvalError) as e:
        evaluator(bomb).run(features=generated())
    assert first_line(e).startswith(f"{bomb}: its arrays unpack to ") and "(features.npy: 2097280)" in first_line(e)
    monkeypatch.setattr(refstats, "MAX_FILE_BYTES", 1000)
    with pytest.raises(EvalError, match=r"more than a statistics file may hold \(1000\)"):
        evaluator(bomb).run(features=generated())
    with pytest.raises(EvalError, match=r"not a readable \.npz statistics file"):
        (tmp_path / "text.npz").write_text("mu")
        evaluator(tmp_path / "text.npz").run(features=generated())
    # a member whose compressed bytes are damaged (zlib's own error, not a traceback)
    monkeypatch.undo()
    np.savez_compressed(tmp_path / "ok.npz", mu=mu, sigma=sigma)
    data = bytearray((tmp_path / "ok.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "ok.npz") as z:
        at = z.getinfo("sigma.npy").header_offset + 200
    data[at:at + 64] = b"\xff" * 64
    (tmp_path / "damaged.npz").write_bytes(bytes(data))
    with pytest.raises(EvalError) as e:
        evaluator(tmp_path / "damaged.npz").run(features=generated())
    assert first_line(e).startswith(f"{tmp_path / 'damaged.npz'}: not a readable .npz statistics file ("), \
        first_line(e)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shards):
    """A diffusion run of one step (the CLI needs a model to evaluate; the reference is read before sampling)."""
    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config(root, shards, train={"total_kimg": 0.008, "log_every": 1, "checkpoint_every": 1,
                                           "sample_every": 0})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run([sys.executable, "-m", "distgen", "train", str(cfg)], env)  # asserts exit 0, with stdout and stderr
    return root / "run"


@pytest.mark.e2e
def test_the_command_line_prints_one_error_line_and_exits_2(run_dir, tmp_path, capsys):
    from distgen.cli import main

    mu, _, _ = statistics()
    np.savez(tmp_path / "neg.npz", mu=mu, sigma=-np.eye(D))
    code = main(["eval", str(run_dir), "--metrics", "fid", "--num-samples", "4", "--ref", str(tmp_path / "neg.npz"),
                 "--feature-extractor", "fashion-mnist", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[0].startswith(f"distgen: error: {tmp_path / 'neg.npz'}: sigma: not positive semi-definite")
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------- 2. the reference cache
@pytest.mark.e2e
def test_a_cache_that_fails_any_check_is_ignored_recomputed_and_said_in_one_line(shards, tmp_path):
    cache = tmp_path / "cache"
    first = evaluator(shards, cache_dir=str(cache))
    ref = first.reference(DataConfig(resolution=28, channels=1, workers=0))
    assert ref.cache == "miss" and ref.num == 30
    (path,) = cache.glob("ref-*.safetensors")
    with safe_open(str(path), "pt") as f:
        good_meta = f.metadata()
    good = load(path.read_bytes())  # copies: the file is rewritten below, and a memory map of it would crash
    assert set(good) == {"mu", "sigma", "features/features"}

    ev = evaluator(shards, cache_dir=str(cache))  # one extractor for every attempt; the reference read anew

    def attempt() -> tuple[str, list[str]]:
        logs = []
        ev._reference, ev.log = None, logs.append
        r = ev.reference(DataConfig(resolution=28, channels=1, workers=0))
        assert r.num == 30 and np.array_equal(r.stats["mu"], ref.stats["mu"])
        assert torch.equal(r.features["features"], ref.features["features"])
        return r.cache, logs

    assert attempt() == ("hit", [])
    mu, sigma, feats = good["mu"], good["sigma"], good["features/features"]
    nan_mu, nan_feats = mu.clone(), feats.clone()
    nan_mu[0] = nan_feats[3, 5] = float("nan")
    cases = {
        "truncated_header": (200, "not a safetensors file (header of "),
        "truncated_data": (-100, "does not fit its bytes"),
        "format": ({}, {"format": "distgen-refstats/0"}, "format 'distgen-refstats/0'"),
        "num_text": ({}, {"num": "thirty"}, "num 'thirty' is not an image count"),
        "num_one": ({}, {"num": "1"}, "num '1' is not an image count"),
        "description": ({}, {"description": json.dumps({"format": "other"})}, "its description differs"),
        "description_not_json": ({}, {"description": "{"}, "description: not readable JSON"),
        "nan_mu": ({"mu": nan_mu}, {}, "mu: 1 value(s) not finite"),
        "negative_sigma": ({"sigma": -sigma - torch.eye(D, dtype=sigma.dtype)}, {},
                           "sigma: not positive semi-definite"),
        "asymmetric_sigma": ({"sigma": sigma + torch.triu(torch.ones(D, D, dtype=sigma.dtype), 1)}, {},
                             "sigma: not symmetric"),
        "nan_features": ({"features/features": nan_feats}, {}, "features: 1 value(s) not finite"),
        "features_count": ({"features/features": feats[:-1]}, {}, "num: 30 images, but 'features' holds 29"),
        "another_dim": ({"mu": mu[:8], "sigma": sigma[:8, :8].contiguous(),
                         "features/features": feats[:, :8].contiguous()}, {},
                        f"statistics of dimension 8, but the extractor's features have {D}"),
        "dtype": ({"mu": mu.double()}, {}, "mu: dtype float64, distgen writes float32"),
        "unknown_tensor": ({"extra": mu.clone()}, {}, "holds tensors distgen does not write here (extra)"),
        "no_features": ({"features/features": None}, {}, "holds no features, which KID and precision/recall need"),
        "no_stats": ({"mu": None, "sigma": None}, {}, "holds no mu and sigma, which FID needs"),
        # consistent in itself, but of another count than the manifest records
        "not_the_manifest": ({"features/features": torch.cat([feats, feats[:1]])}, {"num": "31"},
                             "holds statistics of 31 images, the manifest records 30"),
    }
    for name, case in cases.items():
        if isinstance(case[0], int):
            path.write_bytes(path.read_bytes()[:case[0]])
            says = case[1]
        else:
            tensors, meta, says = case
            t = {k: v for k, v in {**good, **tensors}.items() if v is not None}
            save_file(t, str(path), metadata={**good_meta, **meta})
        status, logs = attempt()
        assert status == "miss" and len(logs) == 2, (name, logs)  # the line, then the pass's own "30 images"
        assert logs[0].startswith(f"distgen eval: ignoring the reference cache {path}: ") and says in logs[0], \
            (name, logs[0])
        assert logs[0].endswith("; recomputing it") and "\n" not in logs[0]
        assert attempt() == ("hit", [])  # rewritten whole


def test_a_cache_that_cannot_be_written_costs_a_line_not_the_evaluation(shards, tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    logs = []
    ref = evaluator(shards, cache_dir=str(tmp_path / "cache" / "sub"), log=logs.append).reference(
        DataConfig(resolution=28, channels=1, workers=0))
    assert ref.num == 30 and ref.cache == "miss"
    assert any(line.startswith(f"distgen eval: could not write the reference cache {tmp_path / 'cache' / 'sub'}")
               for line in logs), logs


# --------------------------------------------------------------------------- 3. the reference count
def test_the_reference_pass_must_read_what_the_manifest_records(tmp_path):
    """With data.on_error skip, a sample that does not decode is skipped: the statistics would then be of
    other images than the manifest lists, so evaluation refuses them, naming the manifest. (A manifest whose
    count is higher than its shard holds, with skip, is the same case.)"""
    np.savez(tmp_path / "x.npz", x=fm_images(20, offset=4000))
    write_shards(f"npz:{tmp_path / 'x.npz'}", tmp_path / "s", "test", samples_per_shard=10)
    manifest = tmp_path / "s" / "test.manifest.json"
    shard = tmp_path / "s" / json.loads(manifest.read_text())["shards"][1]["name"]
    whole = shard.read_bytes()
    data = bytearray(whole)
    at = data.index(b"\x89PNG")
    data[at + 16:at + 48] = bytes(32)  # one image's header overwritten; the shard keeps its size
    shard.write_bytes(bytes(data))
    cfg = DataConfig(resolution=28, channels=1, workers=0, on_error="skip")
    with pytest.raises(EvalError) as e:
        evaluator(manifest, cache_dir=str(tmp_path / "cache")).reference(cfg)
    assert first_line(e) == (f"{manifest}: the manifest records 20 images, the reference pass read 19 (1 bad "
                             f"sample(s) skipped: data.on_error is skip); `distgen data verify {manifest}` checks "
                             f"the shards against it")
    # a count raised in the manifest (its total too, so the manifest is consistent in itself)
    m = json.loads(manifest.read_text())
    shard.write_bytes(whole)  # its 10 samples again
    m["shards"][1]["count"] = 11
    m["shards"][1].pop("sha256", None)
    m["total"] = 21
    manifest.write_text(json.dumps(m))
    with pytest.raises(EvalError) as e:
        evaluator(manifest, cache_dir=str(tmp_path / "cache")).reference(cfg)
    assert first_line(e).startswith(f"{manifest}: the manifest records 21 images, the reference pass read 20")


# --------------------------------------------------------------------------- 4. extractor files and weights
def _domain_file(path: Path, info: dict | str | None, tensors: dict | None = None) -> Path:
    with safe_open(str(BUNDLED["fashion-mnist"]), "pt") as f:
        bundled = {k: f.get_tensor(k) for k in f.keys()}
        meta = {"format": DOMAIN_FORMAT}
        if info is not None:
            base = json.loads(f.metadata()["info"])
            meta["info"] = info if isinstance(info, str) else json.dumps({**base, **info})
    save_file(tensors if tensors is not None else bundled, str(path), metadata=meta)
    return path


def test_a_feature_extractor_file_is_checked_before_a_network_is_built(tmp_path):
    from distgen.evaluate.extractors import DomainResNet

    cases = {
        "classes": ({"num_classes": 10 ** 9}, "info.num_classes: 1000000000 is out of range [2, 100000]"),
        "width": ({"width": 1 << 20}, "info.width: 1048576 is out of range [1, 512]"),
        "arch": ({"arch": "vit"}, "info.arch: 'vit' is not one of 'cnn', 'resnet'"),
        "resolution": ({"resolution": 100_000}, "info.resolution: 100000 is out of range [1, 1024]"),
        "string_width": ({"width": "32"}, "info.width: expected an integer, got a string '32'"),
        "nan_calibration": ('{"arch": "resnet", "num_classes": 10, "width": 32, "resolution": 28, "test_accuracy": '
                            '0.9, "test_images": 10, "calibration": {"reference": "r", "rows": [{"what": "w", '
                            '"short": "s", "fd": NaN}], "path": {"what": "w", "short": "s", "fd": 1}, '
                            '"weakest_ratio": 2}}', "info.calibration.rows[0].fd: must be finite, got nan"),
        "accuracy": ({"test_accuracy": 92.4}, "info.test_accuracy: 92.4 is out of range [0, 1]"),
        "cnn_width": ({"arch": "cnn", "width": 12}, "info: width: 12 is not a multiple of 8, which the cnn arch needs"),
        "not_json": ("{'arch': 'resnet'}", "info: not readable JSON"),
        "no_info": (None, "its metadata lacks 'info'"),
        # tensors of another network than the info describes
        "tensors": ({"width": 64}, "its tensors are not those of the network its info describes (wrong shape "
                                   "stem.0.weight [32, 3, 3, 3] (expected [64, 3, 3, 3])"),
    }
    for name, (info, says) in cases.items():
        path = _domain_file(tmp_path / f"{name}.safetensors", info)
        with pytest.raises(EvalError) as e:
            Extractor(str(path), {"fid": None})
        assert first_line(e).startswith(f"{path}: ") and says in first_line(e), (name, first_line(e))
    weights = DomainResNet(10, 8).state_dict()
    weights["head.weight"][0, 0] = float("nan")
    path = _domain_file(tmp_path / "nan.safetensors", {"width": 8}, weights)
    with pytest.raises(EvalError) as e:
        Extractor(str(path), {"fid": None})
    assert first_line(e) == f"{path}: tensor(s) head.weight hold NaN or infinite values"
    with pytest.raises(EvalError, match=r"^--feature-extractor .*nope\.safetensors: no such file"):
        Extractor(str(tmp_path / "nope.safetensors"), {"fid": None})


class Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_inception_weights_are_refused_without_running_them(shards, tmp_path):
    marker = tmp_path / "ran"
    blob = pickle.dumps({"w": Payload(marker)}, protocol=2)
    pickle.loads(blob).get("w").close()  # the payload is real: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    (tmp_path / "plain.pth").write_bytes(blob)  # a bare pickle, as torch's legacy format starts
    torch.save({"w": Payload(marker)}, tmp_path / "zipped.pth")  # torch's zip format (saving runs nothing)
    assert not marker.exists()
    for name in ("plain.pth", "zipped.pth"):
        spec = EvalSpec(metrics=("fid",), ref=[str(shards)], inception_weights=str(tmp_path / name))
        with pytest.raises(EvalError) as e:
            Evaluator(spec)
        assert first_line(e).startswith(f"{tmp_path / name}: not a weights file distgen can read (it pickles io.open)"
                                        ), first_line(e)  # the global named, torch's own advice to unpickle anyway not
        assert not marker.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_weights_that_describe_more_than_they_hold_are_refused(tmp_path, monkeypatch):
    """A stride-0 view rebuilds from one stored number into any size; a CLIP file's key counts and shapes size the
    network build_model makes. Neither gets to allocate what the file does not hold."""
    from distgen.evaluate import foundation
    from distgen.evaluate.extractors import load_weights

    torch.save({"w": torch.zeros(1).expand(300, 300)}, tmp_path / "expanded.pth")
    with pytest.raises(EvalError) as e:
        load_weights(tmp_path / "expanded.pth")
    assert first_line(e).startswith(f"{tmp_path / 'expanded.pth'}: w: a [300, 300] tensor on a storage of 4 bytes")

    class Expanded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("b", torch.zeros(1).expand(300, 300))

        def forward(self, x):
            return x + self.b.sum()

    torch.jit.save(torch.jit.script(Expanded()), tmp_path / "expanded.pt")
    with pytest.raises(EvalError) as e:
        foundation.read_tensors(tmp_path / "expanded.pt")
    assert "a tensor of [300, 300] on a storage of 1 elements" in first_line(e)

    # 40 layers of width 1024 (500M parameters, 2 GB) described by 40 one-number tensors and a 12 KB conv1
    w = 1024
    state = {"visual.conv1.weight": torch.zeros(w, 3, 1, 1), "visual.positional_embedding": torch.zeros(5, w),
             "visual.proj": torch.zeros(w, 8), "visual.class_embedding": torch.zeros(w)}
    state.update({f"visual.transformer.resblocks.{i}.attn.in_proj_weight": torch.zeros(1) for i in range(40)})
    save_file(state, str(tmp_path / "clip.safetensors"))
    devices = []
    real = foundation.build_model

    def spy(state_dict, dtype):
        devices.append(torch.empty(0).device.type)  # where build_model allocates its network
        return real(state_dict, dtype)

    monkeypatch.setattr(foundation, "build_model", spy)
    with pytest.raises(EvalError) as e:
        foundation.ClipExtractor("clip-vit-b-32", ["clip"], str(tmp_path / "clip.safetensors"))
    assert first_line(e).startswith(f"{tmp_path / 'clip.safetensors'}: not clip-vit-b-32 weights")
    assert devices == ["meta"]  # the described network was never allocated


def test_fit_features_takes_bounded_numbers_from_the_manifest(shards, tmp_path):
    from distgen.evaluate.fit import fit_features

    m = json.loads(shards.read_text())
    m.update(num_classes=10, class_names=[str(i) for i in range(10)], image_size=[4096, 4096])
    (shards.parent / "big.manifest.json").write_text(json.dumps(m))
    with pytest.raises(EvalError) as e:
        fit_features([str(shards.parent / "big.manifest.json")], tmp_path / "f.safetensors", test=[str(shards)])
    assert first_line(e) == f"{shards.parent / 'big.manifest.json'}: image_size[0]: 4096 is out of range [1, 1024]"
    m["image_size"] = [28, 28]
    (shards.parent / "ok.manifest.json").write_text(json.dumps(m))
    for width, says in ((0, "--width 0: from 1 to 512"), (12, "--width 12: from 1 to 512 and a multiple of 8")):
        with pytest.raises(EvalError, match=says):
            fit_features([str(shards.parent / "ok.manifest.json")], tmp_path / "f.safetensors", test=[str(shards)],
                         width=width, arch="cnn" if width == 12 else "resnet")
