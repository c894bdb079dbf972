#!/usr/bin/env python3
"""Draw images from a distgen ONNX export with numpy and onnxruntime only: no torch, no distgen.

    python sample_onnx.py [--num 64] [--seed 0] [--batch 16] [--out samples/] [--npz samples.npz]
                          [--steps K] [--sampler ddpm|ddim|heun|euler|dpmpp_2m|pc|langevin] [--guidance W]
                          [--truncation T]
                          [--temperature T] [--step-size E] [--labels 0,1,2]
    python sample_onnx.py --input IMAGE.png|FOLDER|x.npy [--direction AtoB|BtoA] [--out DIR]   (translators)

This file is copied into every `distgen export RUN OUT --format onnx` folder; it reads `onnx.json` beside it
(the graphs' files, inputs and outputs, and the sampler's settings) and draws images the way `distgen sample`
does for that family, writing one PNG per image into --out (and all of them as uint8 NHWC into --npz).
Image i is drawn with numpy's generator seeded by (seed, i), so an image does not depend on the batch it is
drawn in; the seeds do not reproduce torch's random numbers, but the distribution is the same.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent


MAX_META_BYTES = 64 << 20
MAX_VALUES = 4 << 20  # numbers in onnx.json: a 1000-step schedule is a few thousand


def read_meta(path: Path) -> dict:
    """onnx.json, checked before use (it may have been edited or crafted): at most MAX_META_BYTES; every number
    finite and every integer within +-2^31 (sizes, steps, class counts: nothing allocates past that); every
    graph file a plain name in this folder; ``sampler`` and ``graphs`` objects. Exits naming the field."""
    if path.stat().st_size > MAX_META_BYTES:
        sys.exit(f"{path}: larger than {MAX_META_BYTES} bytes; not an onnx.json distgen wrote")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        sys.exit(f"{path}: not readable JSON ({e})")
    if not isinstance(meta, dict) or not isinstance(meta.get("sampler"), dict) or not isinstance(meta.get("graphs"), dict):
        sys.exit(f"{path}: must be an object with 'sampler' and 'graphs' objects")
    stack, seen = [(meta, "")], 0
    while stack:
        v, where = stack.pop()
        seen += 1
        if seen > MAX_VALUES or where.count(".") + where.count("[") > 32:
            sys.exit(f"{path}: {where or 'top level'}: too many values or nested too deep")
        if isinstance(v, dict):
            stack.extend((c, f"{where}.{k}" if where else str(k)) for k, c in v.items())
        elif isinstance(v, list):
            stack.extend((c, f"{where}[{i}]") for i, c in enumerate(v))
        elif isinstance(v, float) and not np.isfinite(v):
            sys.exit(f"{path}: {where}: must be finite, got {v}")
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2 ** 31:
            sys.exit(f"{path}: {where}: {v} is out of range")
    for name, entry in meta["graphs"].items():
        f = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(f, str) or f in ("", ".", "..") or "/" in f or "\\" in f or "\x00" in f:
            sys.exit(f"{path}: graphs.{name}.file: {f!r} is not a plain file name in this folder")
    shape = meta["sampler"].get("shape")
    if shape is not None and (not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape)
                              or int(np.prod(shape, dtype=np.float64)) > 1 << 26):
        sys.exit(f"{path}: sampler.shape: {shape!r} is not an image shape distgen exports")
    spec = meta["sampler"]
    checks = dict(SAMPLER_FIELDS.get(spec.get("kind"), {}))
    if "decoder" in spec:
        checks.update(DECODER_FIELDS)  # latent diffusion's decoder, in every kind that names one
    for key, (ok, what) in checks.items():
        if key not in spec:
            sys.exit(f"{path}: sampler.{key}: missing (must be {what})")
        try:
            good = ok(spec[key], spec, meta)
        except TypeError:  # a comparison with another field of the wrong type: that field is reported below
            good = False
        if not good:
            sys.exit(f"{path}: sampler.{key}: must be {what}, got {json.dumps(spec[key])[:100]}")
    return meta


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _graph(v, meta) -> bool:
    return isinstance(v, str) and v in meta["graphs"]


MAX_STEPS = 100_000
# The fields of the edm and flow samplers in onnx.json: key -> (check(value, sampler, meta), what it must be),
# checked in this order (a bound that names another field comes after that field's own check)
_ODE_FIELDS = {
    "shape": (lambda v, s, m: isinstance(v, list) and len(v) == 3, "[channels, height, width]"),
    "graph": (lambda v, s, m: _graph(v, m), "the name of a graph in 'graphs'"),
    "steps": (lambda v, s, m: _int(v) and 1 <= v <= MAX_STEPS, f"an integer in [1, {MAX_STEPS}]"),
    "num_classes": (lambda v, s, m: _int(v) and 0 <= v < 2 ** 31 - 1, "an integer >= 0"),
    "guidance": (lambda v, s, m: _real(v) and v >= 0, "a number >= 0"),
}
SAMPLER_FIELDS = {
    "edm": {**_ODE_FIELDS,
            "sampler": (lambda v, s, m: v in ("heun", "euler", "dpmpp_2m"), "one of heun, euler, dpmpp_2m"),
            "sigma_min": (lambda v, s, m: _real(v) and v > 0, "a number > 0"),
            "sigma_max": (lambda v, s, m: _real(v) and v > s["sigma_min"], "a number > sampler.sigma_min"),
            "rho": (lambda v, s, m: _real(v) and v > 0, "a number > 0"),
            "s_churn": (lambda v, s, m: _real(v) and v >= 0, "a number >= 0"),
            "s_min": (lambda v, s, m: _real(v) and v >= 0, "a number >= 0"),
            "s_max": (lambda v, s, m: v is None or (_real(v) and v >= s["s_min"]),
                      "null or a number >= sampler.s_min"),
            "s_noise": (lambda v, s, m: _real(v) and v > 0, "a number > 0")},
    "flow": {**_ODE_FIELDS,
             "sampler": (lambda v, s, m: v in ("euler", "heun"), "one of euler, heun"),
             "shift": (lambda v, s, m: _real(v) and v > 0, "a number > 0"),
             "t_scale": (lambda v, s, m: _real(v) and v > 0, "a number > 0")},
}
DECODER_FIELDS = {  # a null decoder: pixel space
    "decoder": (lambda v, s, m: v is None or _graph(v, m), "null or the name of a graph in 'graphs'"),
    "scaling_factor": (lambda v, s, m: s["decoder"] is None or (_real(v) and v > 0), "a number > 0"),
}


class Export:
    """onnx.json and the ONNX sessions of one export folder, opened on first use."""

    def __init__(self, folder: Path):
        self.folder = folder
        meta = folder / "onnx.json"
        if not meta.is_file():
            sys.exit(f"{meta}: not found (this file must sit in a distgen ONNX export folder)")
        self.meta = read_meta(meta)
        self.spec = self.meta["sampler"]
        self._sessions: dict[str, ort.InferenceSession] = {}

    def run(self, graph: str, **feed) -> list[np.ndarray]:
        if graph not in self._sessions:
            entry = self.meta["graphs"][graph]
            path = self.folder / entry["file"]
            if entry.get("format", "onnx") != "onnx":
                sys.exit(f"{path}: a {entry['format']} graph (ONNX could not express it: {entry.get('onnx_error')}); "
                         f"it needs torch to run")
            if not path.is_file():
                sys.exit(f"{path}: not found (named in onnx.json)")
            self._sessions[graph] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return self._sessions[graph].run(None, feed)


# ---------------------------------------------------------------- the families' samplers
# Each takes (export, per-image generators, options) and returns float32 NCHW images on [-1, 1].

def _normal(rngs, shape) -> np.ndarray:
    """[B, *shape] standard normals, row i from image i's own generator."""
    return np.stack([rng.standard_normal(tuple(shape)) for rng in rngs])


def _temperature(spec: dict, opts) -> float:
    t = spec["temperature"] if opts.temperature is None else opts.temperature
    if t < 0:
        sys.exit(f"--temperature: must be >= 0, got {t}")
    return t


def _labels(spec: dict, idx: np.ndarray, opts) -> np.ndarray:
    if opts.labels:
        given = [int(v) for v in opts.labels.split(",")]
        return np.array([given[i % len(given)] for i in idx], dtype=np.int64)
    return (idx % spec["num_classes"]).astype(np.int64)  # as distgen sample: image i gets class i mod K


def sample_gan(ex: Export, rngs, idx, opts) -> np.ndarray:
    s = ex.spec
    t = opts.truncation if opts.truncation is not None else s["truncation"]
    if t is not None and s["truncation_kind"] is None:
        sys.exit("--truncation: this GAN has no truncation trick")
    rows = []
    for rng in rngs:
        z = rng.standard_normal(s["noise_dim"])
        if t is not None and s["truncation_kind"] == "resample":  # BigGAN's trick: redraw |z| beyond t
            while (out := np.abs(z) > t).any():
                z = np.where(out, rng.standard_normal(z.shape), z)
        parts = [z]
        if s["info_categorical"]:
            parts.append(np.eye(s["info_categorical"])[rng.integers(s["info_categorical"])])
        if s["info_continuous"]:
            parts.append(rng.uniform(-1, 1, s["info_continuous"]))
        rows.append(np.concatenate(parts))
    feed = {"z": np.stack(rows).astype(np.float32)}
    if s["num_classes"]:
        feed["labels"] = _labels(s, idx, opts)
    if s["truncation_kind"] == "psi":
        feed["truncation"] = np.array(1.0 if t is None else t, dtype=np.float32)
    return ex.run(s["graph"], **feed)[0]


def _diffusion_timesteps(train_steps: int, steps: int) -> np.ndarray:
    """diffusers' "leading" spacing (DDPMScheduler / DDIMScheduler defaults)."""
    ratio = train_steps // steps
    return (np.arange(steps) * ratio).round()[::-1].astype(np.int64)


def guided(ex: Export, x: np.ndarray, t: np.ndarray, labels, null_class: int, g: float, graph: str = "unet",
           time: str = "t") -> np.ndarray:
    """The graph's output (float64) at x and times t (its input ``time``); for class labels and a guidance weight
    other than 1, uncond + g (cond - uncond) with the null class's pass (classifier-free guidance: the numpy port
    of distgen/families/denoising.py's guided_prediction, both passes in one batch of 2B). EDM's denoiser is
    affine in the network's output, so guiding D is guiding the network inside it."""
    if labels is not None and g != 1.0:
        null = np.full_like(labels, null_class)
        out = ex.run(graph, x=np.concatenate([x, x]).astype(np.float32), **{time: np.concatenate([t, t])},
                     labels=np.concatenate([labels, null]))[0].astype(np.float64)
        cond, uncond = out[:len(x)], out[len(x):]
        return uncond + g * (cond - uncond)
    feed = {"x": x.astype(np.float32), time: t}
    if labels is not None:
        feed["labels"] = labels
    return ex.run(graph, **feed)[0].astype(np.float64)


def sample_diffusion(ex: Export, rngs, idx, opts) -> np.ndarray:
    """DDPM (ancestral, fixed-small variance) or DDIM (eta 0) over the training schedule's alphas, as diffusers'
    DDPMScheduler / DDIMScheduler step; classifier-free guidance for class-conditional models."""
    s = ex.spec
    sampler = opts.sampler or s["sampler"]
    if sampler not in ("ddpm", "ddim"):
        sys.exit(f"--sampler: sample_onnx.py runs ddpm or ddim, not {sampler}")
    ac = np.asarray(s["alphas_cumprod"], dtype=np.float64)
    T = len(ac)
    steps = opts.steps or s["steps"]
    if not 1 <= steps <= T:
        sys.exit(f"--steps: must be in [1, {T}], got {steps}")
    ts = _diffusion_timesteps(T, steps)
    shape = tuple(s["shape"])
    x = _normal(rngs, shape)
    labels = _labels(s, idx, opts) if s["num_classes"] else None
    g = s["guidance"] if opts.guidance is None else opts.guidance
    for t in ts:
        out = guided(ex, x, np.full(len(x), t, dtype=np.int64), labels, s["num_classes"], g)
        prev = t - T // steps
        a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else 1.0)
        if s["prediction"] == "epsilon":
            x0 = (x - np.sqrt(1 - a_t) * out) / np.sqrt(a_t)
        else:  # v-prediction (Salimans & Ho 2022)
            x0 = np.sqrt(a_t) * x - np.sqrt(1 - a_t) * out
        if s["clip_sample"]:
            x0 = np.clip(x0, -1, 1)
        if sampler == "ddim":
            eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
        else:
            alpha, beta = a_t / a_prev, 1 - a_t / a_prev
            mean = (np.sqrt(a_prev) * beta * x0 + np.sqrt(alpha) * (1 - a_prev) * x) / (1 - a_t)
            var = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
            if t > 0:
                mean = mean + np.sqrt(var) * _normal(rngs, shape)
            x = mean
    return _decode(ex, x)


# The EDM and flow samplers: numpy ports of distgen/families/karras.py (tests/test_ports.py holds them equal)

def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> list:
    """Karras' schedule, sigma_max to sigma_min in n levels (n = 1: sigma_max alone), then 0."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + (i / (n - 1) if n > 1 else 0.0) * (lo - hi)) ** rho for i in range(n)] + [0.0]


def flow_times(n: int, shift: float) -> list:
    """n + 1 times from 1 to 0, uniform, then shifted as in training: t <- s t / (1 + (s - 1) t)."""
    return [t if shift == 1.0 else shift * t / (1 + (shift - 1) * t) for t in (1 - i / n for i in range(n + 1))]


def _churn(x, sigma, n, churn, noise):
    """EDM's Algorithm 2, lines 4-6: x raised from sigma to sigma (1 + gamma) by fresh noise; churn = (s_churn,
    s_min, s_max or None, s_noise)."""
    s_churn, s_min, s_max, s_noise = churn
    gamma = min(s_churn / n, np.sqrt(2) - 1) if s_churn > 0 and s_min <= sigma <= (
        np.inf if s_max is None else s_max) else 0.0
    if gamma == 0:
        return x, sigma
    hat = sigma * (1 + gamma)
    return x + np.sqrt(hat ** 2 - sigma ** 2) * s_noise * noise(x), hat


def edm_euler(denoise, x, sigmas, churn=(0.0, 0.0, None, 1.0), noise=None):
    n = len(sigmas) - 1
    for i in range(n):
        x, hat = _churn(x, sigmas[i], n, churn, noise)
        x = x + (sigmas[i + 1] - hat) * (x - denoise(x, hat)) / hat
    return x


def edm_heun(denoise, x, sigmas, churn=(0.0, 0.0, None, 1.0), noise=None):
    """EDM's Algorithm 2: Heun's method, an Euler step alone into sigma = 0."""
    n = len(sigmas) - 1
    for i in range(n):
        x, hat = _churn(x, sigmas[i], n, churn, noise)
        d = (x - denoise(x, hat)) / hat
        nxt = sigmas[i + 1]
        x_next = x + (nxt - hat) * d
        if nxt != 0:
            x_next = x + (nxt - hat) * (d + (x_next - denoise(x_next, nxt)) / nxt) / 2
        x = x_next
    return x


def edm_dpmpp_2m(denoise, x, sigmas, churn=None, noise=None):
    """DPM-Solver++(2M) on sigmas, as k-diffusion's sample_dpmpp_2m (no churn)."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        s, nxt = sigmas[i], sigmas[i + 1]
        if nxt == 0:
            x = denoised
        else:
            h = np.log(s) - np.log(nxt)
            d = denoised
            if old is not None:
                r = (np.log(sigmas[i - 1]) - np.log(s)) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (nxt / s) * x - np.expm1(-h) * d
        old = denoised
    return x


def flow_euler(velocity, x, times):
    for t, nxt in zip(times[:-1], times[1:]):
        x = x + (nxt - t) * velocity(x, t)
    return x


def flow_heun(velocity, x, times):
    """Heun's method on dx/dt = v, the correction on every step (v is defined at t = 0)."""
    for t, nxt in zip(times[:-1], times[1:]):
        v = velocity(x, t)
        pred = x + (nxt - t) * v
        x = x + (nxt - t) * (v + velocity(pred, nxt)) / 2
    return x


EDM_SAMPLERS = {"heun": edm_heun, "euler": edm_euler, "dpmpp_2m": edm_dpmpp_2m}
FLOW_SAMPLERS = {"euler": flow_euler, "heun": flow_heun}


def _ode_options(s: dict, opts, samplers: dict) -> tuple:
    sampler = opts.sampler or s["sampler"]
    if sampler not in samplers:
        sys.exit(f"--sampler: this model samples with {', '.join(samplers)}, not {sampler}")
    steps = opts.steps or s["steps"]
    if steps < 1:
        sys.exit(f"--steps: must be >= 1, got {steps}")
    g = s["guidance"] if opts.guidance is None else opts.guidance
    if g < 0:
        sys.exit(f"--guidance: must be >= 0, got {g}")
    return sampler, steps, g


def sample_edm(ex: Export, rngs, idx, opts, x=None) -> np.ndarray:
    """EDM (distgen's formulation edm): noise at sigma_max carried down Karras' sigmas by Heun, Euler (both with
    EDM's churn if the model has it) or DPM-Solver++(2M), through the denoiser graph D(x, sigma[, labels]),
    classifier-free guided. ``x``: the standard normal start (default: drawn from the images' generators)."""
    s = ex.spec
    sampler, steps, g = _ode_options(s, opts, EDM_SAMPLERS)
    sigmas = karras_sigmas(steps, s["sigma_min"], s["sigma_max"], s["rho"])
    labels = _labels(s, idx, opts) if s["num_classes"] else None
    x = _normal(rngs, s["shape"]) if x is None else x

    def denoise(x, sigma):
        return guided(ex, x, np.full(len(x), sigma, dtype=np.float32), labels, s["num_classes"], g, s["graph"],
                      "sigma")

    churn = (s["s_churn"], s["s_min"], s["s_max"], s["s_noise"])
    x = EDM_SAMPLERS[sampler](denoise, x * sigmas[0], sigmas, churn, lambda like: _normal(rngs, like.shape[1:]))
    return _decode(ex, x)


def sample_flow(ex: Export, rngs, idx, opts, x=None) -> np.ndarray:
    """Flow matching (distgen's formulation flow): dx/dt = v from t = 1 (noise) to 0 on the shifted times by
    Euler or Heun, through the velocity graph v(x, 1000 t[, labels]), classifier-free guided."""
    s = ex.spec
    sampler, steps, g = _ode_options(s, opts, FLOW_SAMPLERS)
    labels = _labels(s, idx, opts) if s["num_classes"] else None
    x = _normal(rngs, s["shape"]) if x is None else x

    def velocity(x, t):
        return guided(ex, x, np.full(len(x), t * s["t_scale"], dtype=np.float32), labels, s["num_classes"], g,
                      s["graph"])

    return _decode(ex, FLOW_SAMPLERS[sampler](velocity, x, flow_times(steps, s["shift"])))


def _decode(ex: Export, x: np.ndarray) -> np.ndarray:
    """Latent diffusion: latents / scaling factor through the autoencoder's decoder; else the images."""
    s = ex.spec
    if s.get("decoder"):
        x = ex.run(s["decoder"], latents=(x / s["scaling_factor"]).astype(np.float32))[0]
    return np.clip(x, -1, 1).astype(np.float32)


def sample_latent_noise(ex: Export, rngs, idx, opts) -> np.ndarray:
    """VAEs and Glow: one N(0, 1) vector per image (all latent groups / levels), scaled inside the graph by the
    prior's mean and scale at the temperature."""
    s = ex.spec
    total = sum(int(np.prod(shape)) for shape in s["latent_shapes"])
    t = _temperature(s, opts)
    feed = {"eps": _normal(rngs, (total,)).astype(np.float32),
            "temperature": np.array(t, dtype=np.float32)}
    if s["num_classes"]:
        feed["labels"] = _labels(s, idx, opts)
    return ex.run(s["graph"], **feed)[0]


def logistic_mixture_sample(params: np.ndarray, nr_mix: int, channels: int, rngs, temperature: float = 1.0
                            ) -> np.ndarray:
    """One pixel per image from PixelCNN++'s discretised logistic mixture: params [B, P] -> values [B, C] on
    the 256-value grid, from nr_mix + C uniforms of each image's generator (:func:`logistic_mixture_draw`)."""
    u = np.clip(np.stack([rng.random(nr_mix + channels) for rng in rngs]), 1e-12, None)
    return logistic_mixture_draw(params, nr_mix, channels, u, temperature)


def logistic_mixture_draw(params: np.ndarray, nr_mix: int, channels: int, u: np.ndarray, temperature: float = 1.0
                          ) -> np.ndarray:
    """The mixture's draw for uniforms u [B, nr_mix + C] in (0, 1): a component by Gumbel-max, then channel by
    channel a logistic draw rounded to its bin, later channels' means moved by the earlier channels' drawn
    values. ``temperature`` T divides the logits and scales the logistic noise (T = 0: the likeliest
    component's means). The numpy port of distgen/families/likelihoods.py's logistic_mixture_draw."""
    b, m, c = len(params), nr_mix, channels
    logits, rest = params[:, :m], params[:, m:].reshape(b, -1, m)
    means, log_scales, coeffs = rest[:, :c], np.maximum(rest[:, c:2 * c], -7.0), np.tanh(rest[:, 2 * c:])
    k = logits.argmax(1) if temperature == 0 else (logits / temperature - np.log(-np.log(u[:, :m]))).argmax(1)
    rows = np.arange(b)
    x = np.zeros((b, c))
    j = 0
    for ch in range(c):
        mean = means[rows, ch, k]
        for i in range(ch):
            mean = mean + coeffs[rows, j, k] * x[:, i]
            j += 1
        uc = u[:, m + ch]
        v = mean + np.exp(log_scales[rows, ch, k]) * temperature * (np.log(uc) - np.log1p(-uc))
        x[:, ch] = np.clip(np.round((v + 1) * 127.5), 0, 255) / 127.5 - 1
    return x


def sample_autoregressive(ex: Export, rngs, idx, opts) -> np.ndarray:
    """PixelCNN++ / PixelRNN: pixel after pixel in raster order, each pixel's channels from one graph call."""
    s = ex.spec
    c, r = s["channels"], s["resolution"]
    x = np.zeros((len(rngs), c, r, r), dtype=np.float32)
    feed = {"labels": _labels(s, idx, opts)} if s["num_classes"] else {}
    t = s.get("temperature", 1.0) if opts.temperature is None else opts.temperature
    if t < 0 or (t != 1 and "temperature" not in s):
        sys.exit(f"--temperature: {'must be >= 0' if t < 0 else 'this model samples at its distribution only'}")
    for i in range(r):
        for j in range(r):
            params = ex.run(s["graph"], image=x, **feed)[0][:, :, i, j].astype(np.float64)
            x[:, :, i, j] = logistic_mixture_sample(params, s["nr_mix"], c, rngs, t)
    return x


def sample_decoder(ex: Export, rngs, idx, opts) -> np.ndarray:
    """An autoencoder: N(0, I) latents through its decoder, as `distgen sample` does (it has no prior)."""
    s = ex.spec
    z = _normal(rngs, s["shape"]).astype(np.float32)
    return ex.run(s["graph"], latents=z)[0]


class SDE:
    """The score family's SDEs (Song et al. 2021): marginal std(t), drift and diffusion coefficients (the numpy
    port of distgen/families/sde.py)."""

    def __init__(self, s: dict):
        self.s, self.kind = s, s["sde"]
        self.ve = self.kind in ("ncsn", "ve")
        self.log_ratio = np.log(s["sigma_max"] / s["sigma_min"])

    def sigma(self, t):
        return self.s["sigma_min"] * np.exp(t * self.log_ratio)

    def log_mean(self, t):
        return -0.25 * t ** 2 * (self.s["beta_max"] - self.s["beta_min"]) - 0.5 * t * self.s["beta_min"]

    def std(self, t):
        if self.ve:
            return self.sigma(t)
        v = -np.expm1(2 * self.log_mean(t))
        return np.sqrt(v) if self.kind == "vp" else v

    def coefficients(self, t):
        if self.ve:
            return 0.0, self.sigma(t) * np.sqrt(2 * self.log_ratio)
        b = self.s["beta_min"] + t * (self.s["beta_max"] - self.s["beta_min"])
        g2 = b if self.kind == "vp" else b * -np.expm1(4 * self.log_mean(t))
        return -0.5 * b, np.sqrt(g2)


def sample_score(ex: Export, rngs, idx, opts) -> np.ndarray:
    """Score models: annealed Langevin dynamics (NCSN) or predictor-corrector sampling (score SDEs), the
    update rules of distgen's score family (SDE.langevin and SDE.pc in distgen/families/sde.py), in float64."""
    s = ex.spec
    sde, shape = SDE(s), tuple(s["shape"])
    sampler = opts.sampler or s["sampler"]
    if sampler not in ("langevin", "pc") or (sampler == "langevin" and not sde.ve):
        sys.exit(f"--sampler: sample_onnx.py runs {'langevin or pc' if sde.ve else 'pc'} for sde {s['sde']}, "
                 f"not {sampler}")
    n = opts.steps or s["steps"]
    if n < 2:
        sys.exit(f"--steps: must be >= 2, got {n}")

    def score(x, t):
        return ex.run(s["graph"], x=x.astype(np.float32), t=np.full(len(x), t, dtype=np.float32))[0].astype(np.float64)

    def noise():
        return _normal(rngs, shape)

    if sampler == "langevin":
        x = np.stack([rng.random(shape) for rng in rngs])  # uniform on [0, 1], as NCSN starts
        eps = opts.step_size or s["step_size"]
        for t in np.linspace(1, 0, n):
            step = eps * (sde.sigma(t) / s["sigma_min"]) ** 2
            for _ in range(s["n_steps_each"]["langevin"]):
                x = x + step * score(x, t) + np.sqrt(2 * step) * noise()
        if s["denoise"]:
            x = x + s["sigma_min"] ** 2 * score(x, 0.0)
    else:
        e = s["sample_eps"]
        grid = lambda i: e + (1 - e) * i / (n - 1)  # noqa: E731
        vp_beta = lambda i: -np.expm1(2 * (sde.log_mean(grid(i)) - (sde.log_mean(grid(i - 1)) if i else 0.0)))  # noqa: E731
        x = noise() * (s["sigma_max"] if sde.ve else 1.0)
        mean = x
        for i in range(n - 1, -1, -1):
            t = grid(i)
            alpha = 1.0 if sde.ve else 1 - vp_beta(i)
            step = 2 * alpha * (s["snr"] * sde.std(t)) ** 2
            for _ in range(s["n_steps_each"]["pc"]):
                x = x + step * score(x, t) + np.sqrt(2 * step) * noise()
            z = noise()
            if s["predictor"] == "reverse_diffusion":
                sc = score(x, t)
                if sde.ve:
                    g2 = sde.sigma(t) ** 2 - (sde.sigma(grid(i - 1)) ** 2 if i else 0.0)
                    mean, g = x + g2 * sc, np.sqrt(g2)
                elif s["sde"] == "vp":
                    b = vp_beta(i)
                    mean, g = (2 - np.sqrt(1 - b)) * x + b * sc, np.sqrt(b)
                else:
                    a, gg = sde.coefficients(t)
                    mean, g = x - (a * x - gg * gg * sc) / n, gg / np.sqrt(n)
                x = mean + g * z
            else:  # Euler-Maruyama
                a, gg = sde.coefficients(t)
                mean = x - (a * x - gg ** 2 * score(x, t)) / n
                x = mean + gg * np.sqrt(1 / n) * z
        x = mean if s["denoise"] else x
    x = x * 2 - 1 if sde.ve else x
    return np.clip(x, -1, 1).astype(np.float32)


def read_png(path: Path) -> np.ndarray:
    """An 8-bit, non-interlaced grey / grey+alpha / RGB / RGBA PNG as uint8 HxWxC (stdlib zlib only)."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        sys.exit(f"{path}: not a PNG file")
    pos, idat, head = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, depth, colour, _, _, interlace = head
    chans = {0: 1, 4: 2, 2: 3, 6: 4}.get(colour)
    if depth != 8 or chans is None or interlace:
        sys.exit(f"{path}: only 8-bit non-interlaced grey or RGB(A) PNGs are read here; convert it, or pass .npy")
    raw, stride = zlib.decompress(idat), w * chans
    out = np.zeros((h, stride), dtype=np.int64)
    for r in range(h):
        f, line = raw[r * (stride + 1)], np.frombuffer(raw, np.uint8, stride, r * (stride + 1) + 1).astype(np.int64)
        up = out[r - 1] if r else np.zeros(stride, dtype=np.int64)
        if f in (0, 2):
            out[r] = (line + (up if f == 2 else 0)) % 256
        else:  # sub, average, Paeth: each byte depends on the one `chans` to its left
            row = out[r]
            for i in range(stride):
                left = row[i - chans] if i >= chans else 0
                ul = up[i - chans] if i >= chans else 0
                if f == 1:
                    pred = left
                elif f == 3:
                    pred = (left + up[i]) // 2
                else:
                    p = left + up[i] - ul
                    pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - ul)
                    pred = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else ul)
                row[i] = (line[i] + pred) % 256
    return out.astype(np.uint8).reshape(h, w, chans)


def load_inputs(arg: str, channels: int, resolution: int) -> np.ndarray:
    """--input: a .npy / .npz ('x') of uint8 NHW or NHWC images, a PNG, or a folder of PNGs -> float NCHW [-1, 1]."""
    p = Path(arg)
    if p.suffix in (".npy", ".npz"):
        x = np.load(p)["x"] if p.suffix == ".npz" else np.load(p)
    elif p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix.lower() == ".png")
        if not files:
            sys.exit(f"{p}: no .png files")
        x = np.stack([read_png(q) for q in files])
    elif p.is_file():
        x = read_png(p)[None]
    else:
        sys.exit(f"{p}: not found")
    x = x[..., None] if x.ndim == 3 else x
    if x.shape[-1] in (2, 4):
        x = x[..., :-1]  # drop alpha
    if x.shape[-1] == 3 and channels == 1:
        x = np.round(x @ np.array([0.299, 0.587, 0.114]))[..., None]
    if x.dtype != np.uint8 and x.max() > 255:
        sys.exit(f"{p}: images must be uint8")
    if x.shape[1:3] != (resolution, resolution) or x.shape[-1] != channels:
        sys.exit(f"{p}: images must be {resolution}x{resolution} with {channels} channel(s), got "
                 f"{x.shape[1]}x{x.shape[2]} with {x.shape[-1]}")
    return (x.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1).astype(np.float32)


def sample_sgld(ex: Export, rngs, idx, opts) -> np.ndarray:
    """EBMs: stochastic gradient Langevin dynamics from uniform noise, x <- clip(x - step dE/dx + noise z, -1, 1)
    (distgen's ebm family; the energy's gradient is a graph of the export)."""
    s = ex.spec
    shape = tuple(s["shape"])
    steps = s["steps"] if opts.steps is None else opts.steps
    size = opts.step_size or s["step_size"]
    x = np.stack([rng.random(shape) for rng in rngs]) * 2 - 1
    for _ in range(steps):
        grad = ex.run(s["graph"], image=x.astype(np.float32))[1].astype(np.float64)
        x = np.clip(x - size * grad + s["noise"] * _normal(rngs, shape), -1, 1)
    return x.astype(np.float32)


# Dormand-Prince 5(4), scipy's RK45 tableau: the numpy port of distgen/families/ode.py's rk45
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def rk45(f, y0: np.ndarray, t0: float, t1: float, rtol: float, atol: float, max_steps: int = 20000) -> np.ndarray:
    """y(t1) of dy/dt = f(y, t) from y(t0) = y0 [B, N], each row with its own adaptive step (scipy's RK45 step
    control per row, as distgen's per-image solver), so an image does not depend on its batch."""
    n, sign = len(y0), (1.0 if t1 > t0 else -1.0)
    y, t, rows = y0.astype(np.float64).copy(), np.full(n, float(t0)), np.arange(n)
    rms = lambda v: np.sqrt((v ** 2).mean(1))  # noqa: E731
    k1 = f(y, t)
    scale = atol + rtol * np.abs(y)
    d0, d1 = rms(y / scale), rms(k1 / scale)
    h0 = np.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / np.maximum(d1, 1e-30))
    h0 = np.minimum(h0, abs(t1 - t0))
    d2 = rms((f(y + sign * h0[:, None] * k1, t + sign * h0) - k1) / scale) / h0
    dm = np.maximum(d1, d2)
    h1 = np.where(dm <= 1e-15, np.maximum(h0 * 1e-3, 1e-6), (0.01 / np.maximum(dm, 1e-30)) ** 0.2)
    h = sign * np.minimum(np.minimum(100 * h0, h1), abs(t1 - t0))
    for _ in range(max_steps):
        if not len(rows):
            return y
        ya, ta, ha = y[rows], t[rows], h[rows]
        ks = [k1[rows]]
        for c, a in zip(_C[1:], _A[1:]):
            yi = ya + ha[:, None] * sum(w * k for w, k in zip(a, ks) if w)
            ks.append(f(yi, ta + c * ha))
        err = ha[:, None] * sum(w * k for w, k in zip(_E, ks) if w)
        norm = rms(err / (atol + rtol * np.maximum(np.abs(ya), np.abs(yi))))
        ok = norm <= 1
        factor = np.clip(0.9 * np.maximum(norm, 1e-10) ** -0.2, 0.2, 10.0)
        factor = np.where(ok, factor, np.minimum(factor, 1.0))
        last = ok & (np.abs(t1 - ta) <= np.abs(ha) * (1 + 1e-12))
        done = rows[ok]
        y[done], k1[done] = yi[ok], ks[-1][ok]
        t[done] = np.where(last[ok], float(t1), ta[ok] + ha[ok])
        h[rows] = sign * np.minimum(np.abs(ha) * factor, np.abs(t1 - t[rows]))
        rows = rows[~last]
    sys.exit(f"the ODE took more than {max_steps} steps at rtol {rtol}: its dynamics may be diverging")


def unsqueeze(x: np.ndarray) -> np.ndarray:
    """[B, 4C, H, W] -> [B, C, 2H, 2W], the inverse of Glow's / FFJORD's squeeze."""
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def sample_cnf(ex: Export, rngs, idx, opts) -> np.ndarray:
    """FFJORD: N(0, T^2 I) latents carried from noise to data through the multiscale CNF, every block's ODE
    solved backwards from its time T to 0 image by image, then the logit transform inverted and quantised."""
    s = ex.spec
    t = _temperature(s, opts)
    zs = [t * _normal(rngs, shape) for shape in s["z_shapes"]]
    h, k, split = zs[-1], len(s["cnf_shapes"]), len(zs) - 1
    for op in reversed(s["plan"]):
        if op == "split":
            split -= 1
            h = np.concatenate([h, zs[split]], 1)
        elif op == "squeeze":
            h = unsqueeze(h)
        else:
            k -= 1
            shape, graph = h.shape[1:], f"dynamics_{k}"

            def f(y, tt, shape=shape, graph=graph):
                out = ex.run(graph, z=y.reshape(-1, *shape).astype(np.float32), t=tt.astype(np.float32))[0]
                return out.reshape(len(y), -1).astype(np.float64)

            h = rk45(f, h.reshape(len(h), -1), s["time_lengths"][k], 0.0, s["rtol"], s["atol"]).reshape(-1, *shape)
    y = (1 / (1 + np.exp(-h)) - s["alpha"]) / (1 - 2 * s["alpha"])
    return (np.clip(np.floor(y * 256), 0, 255) / 127.5 - 1).astype(np.float32)


KINDS = {"gan": sample_gan, "diffusion": sample_diffusion, "edm": sample_edm, "flow": sample_flow,
         "latent_noise": sample_latent_noise,
         "autoregressive": sample_autoregressive, "decoder": sample_decoder, "score": sample_score, "sgld": sample_sgld,
         "cnf": sample_cnf}


# ---------------------------------------------------------------- output

def write_png(path: Path, img: np.ndarray) -> None:
    """A uint8 HxW (grey) or HxWx3 (RGB) image as PNG: stdlib zlib, filter 0 on every row."""
    h, w = img.shape[:2]
    colour = 2 if img.ndim == 3 else 0
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """NCHW on [-1, 1] -> NHWC uint8 (NHW for grey), rounded as distgen sample rounds."""
    u = np.clip(np.round((x.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return u[..., 0] if u.shape[-1] == 1 else u


def translate(ex: Export, opts) -> int:
    """pix2pix / CycleGAN: translate --input's images in --direction, one PNG per input."""
    s = ex.spec
    if not opts.input:
        sys.exit("--input: a translation model translates images: give a PNG, a folder of PNGs or a .npy / .npz")
    d = opts.direction or s["directions"][0]
    if d not in s["directions"]:
        sys.exit(f"--direction: this model translates {' and '.join(s['directions'])}, not {d}")
    x = load_inputs(opts.input, s["channels"], s["resolution"])
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for start in range(0, len(x), opts.batch):
        u = to_uint8(ex.run(d, image=x[start:start + opts.batch])[0])
        for i, img in enumerate(u, start):
            write_png(out / f"{i:06d}.png", img)
        images.append(u)
    if opts.npz:
        np.savez(opts.npz, x=np.concatenate(images))
    print(f"sample_onnx: {len(x)} translations ({d}) -> {out}/")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=64, help="images to draw")
    ap.add_argument("--seed", type=int, default=0, help="image i is drawn with numpy's generator of (seed, i)")
    ap.add_argument("--batch", type=int, default=16, help="images per graph call")
    ap.add_argument("--out", default="samples", help="folder for the PNGs (made if missing)")
    ap.add_argument("--npz", default=None, help="also write all images as uint8 'x' into this .npz")
    ap.add_argument("--steps", type=int, default=None, help="diffusion / score: sampling steps; EBMs: SGLD steps")
    ap.add_argument("--sampler", default=None, help="diffusion: ddpm or ddim; edm: heun, euler or dpmpp_2m; "
                                                    "flow: euler or heun")
    ap.add_argument("--guidance", type=float, default=None, help="class-conditional diffusion: guidance weight")
    ap.add_argument("--truncation", type=float, default=None, help="GANs: psi (StyleGAN2) or the z threshold")
    ap.add_argument("--temperature", type=float, default=None, help="Glow, PixelCNN++, VAEs: prior temperature")
    ap.add_argument("--step-size", type=float, default=None, help="score models (langevin) and EBMs (SGLD): the step size")
    ap.add_argument("--labels", default=None, help="class-conditional models: comma list of classes, cycled")
    ap.add_argument("--input", default=None, help="translation models: a PNG, a folder of PNGs, or a .npy / .npz")
    ap.add_argument("--direction", default=None, help="translation models: AtoB (default) or BtoA (CycleGAN)")
    ap.add_argument("--export", default=str(HERE), help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.num < 1 or opts.batch < 1:
        sys.exit("--num and --batch must be >= 1")
    ex = Export(Path(opts.export))
    kind = ex.spec["kind"]
    if kind == "translate":
        return translate(ex, opts)
    if kind not in KINDS:
        sys.exit(f"{ex.folder / 'onnx.json'}: unknown sampler kind {kind!r} (this sample_onnx.py knows "
                 f"{', '.join(KINDS)})")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for start in range(0, opts.num, opts.batch):
        idx = np.arange(start, min(start + opts.batch, opts.num))
        rngs = [np.random.default_rng([opts.seed, int(i)]) for i in idx]
        u = to_uint8(KINDS[kind](ex, rngs, idx, opts))
        for i, img in zip(idx, u):
            write_png(out / f"{i:06d}.png", img)
        images.append(u)
        print(f"sample_onnx: {idx[-1] + 1}/{opts.num} images", file=sys.stderr)
    if opts.npz:
        np.savez(opts.npz, x=np.concatenate(images))
    print(f"sample_onnx: {opts.num} images -> {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
