"""The config tree of a distgen run. One dataclass per YAML section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from distgen.config.core import check
from distgen.readback import name_problem

TRACKERS = ("tensorboard", "wandb", "mlflow")  # run.trackers (distgen.trackers starts them)


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    dir: Optional[str] = None  # run folder; default runs/<name>
    seed: int = 0  # global seed; rank r of w uses seed * w + r
    # Experiment trackers, through Accelerate's (docs/training.md#experiment-trackers): tensorboard, wandb, mlflow;
    # [] for metrics.jsonl alone. wandb and mlflow come with the `trackers` extra (pip install 'distgen[trackers]').
    trackers: tuple[str, ...] = ("tensorboard",)
    project: str = "distgen"  # the W&B project and MLflow experiment (MLFLOW_EXPERIMENT_NAME overrides)

    def validate(self, path: str) -> None:
        bad = [t for t in self.trackers if t not in TRACKERS]
        check(not bad, f"{path}.trackers", f"unknown tracker(s) {bad}; choose from {', '.join(TRACKERS)}")
        check(len(set(self.trackers)) == len(self.trackers), f"{path}.trackers", "names a tracker twice")
        check(bool(self.project.strip()), f"{path}.project", "must not be empty")
        problem = name_problem(self.name)
        check(problem is None, f"{path}.name", f"{problem}: a run's name is one folder name under runs/ (run.dir "
                                               f"takes a path)")
        check(self.dir is None or bool(self.dir.strip()), f"{path}.dir", "must not be empty")
        check(self.seed >= 0, f"{path}.seed", f"must be >= 0, got {self.seed}")

    @property
    def folder(self) -> str:
        return self.dir or f"runs/{self.name}"


@dataclass(frozen=True)
class DataConfig:
    # Shards to train on: a manifest (.json), a brace pattern of tar paths,
    # pipe: URLs, or a list of any of these.
    train: tuple[str, ...] = ()
    # Shards for evaluation (one exact pass).
    eval: tuple[str, ...] = ()
    # Unpaired image-to-image translation (CycleGAN): domain B's shards for training / evaluation, read as
    # a second independent stream; data.train / data.eval then hold domain A. Empty for every other model
    # (pix2pix's paired shards hold both domains in data.train).
    train_b: tuple[str, ...] = ()
    eval_b: tuple[str, ...] = ()
    resolution: int = 32  # images are resized / centre-cropped to this square size
    channels: int = 1  # 1 (grey) or 3 (RGB); images with another count are bad input
    resize: Literal["center_crop", "stretch"] = "center_crop"
    flip: bool = False  # random horizontal flips in training
    labels: bool = False  # every sample must carry a class label (cls)
    workers: int = 2  # DataLoader worker processes per rank
    shuffle_buffer: int = 2000  # samples held for shuffling in training mode
    on_error: Literal["raise", "skip"] = "raise"  # bad samples: stop, or skip and count

    def validate(self, path: str) -> None:
        check(self.resolution >= 4, f"{path}.resolution", f"must be >= 4, got {self.resolution}")
        check(self.channels in (1, 3), f"{path}.channels", f"must be 1 or 3, got {self.channels}")
        check(self.workers >= 0, f"{path}.workers", f"must be >= 0, got {self.workers}")
        check(self.shuffle_buffer >= 1, f"{path}.shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # per device, per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step (global batch = batch_size x world x grad_accum)
    total_kimg: float = 10.0  # training length, in thousands of samples seen (not epochs)
    lr: float = 2e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_kimg: float = 0.0  # linear learning-rate warm-up
    lr_decay: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up
    # the decay starts here (null: right after warm-up); CycleGAN/pix2pix keep the lr for the first half
    # of training and decay it linearly to zero over the second
    lr_decay_start_kimg: Optional[float] = None
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    skip_grad_norm: Optional[float] = None  # skip an update whose gradient norm (before clipping) exceeds this (VDVAE)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    log_every: int = 10  # steps between records: progress line, metrics.jsonl, trackers
    sample_every: int = 500  # steps between EMA sample grids (0: only at the end)
    sample_num: int = 64  # images in a sample grid
    checkpoint_every: int = 1000  # steps between full checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept
    # Periodic checkpoints written in the background (docs/training.md#asynchronous-checkpoint-saves): the state is
    # copied to host memory at the save, and the files are written, flushed and renamed into place while training
    # goes on. The same bits as a synchronous save; refused under DeepSpeed (its states are written by its engine).
    async_checkpoint: bool = False
    # full: each trained network's weights and optimizer gathered whole and written by rank 0 (safetensors, .pt);
    # sharded: written by every rank with torch.distributed.checkpoint, its own shards (FSDP2, DDP; DeepSpeed has
    # its own). Either resumes at any process count and is read by sample/export/eval (docs/training.md).
    checkpoint_format: Literal["full", "sharded"] = "full"
    max_steps: Optional[int] = None  # stop (with a checkpoint) after this step even if kimg is not reached
    # Speed (docs/training.md#speed); what each resolves to is printed at start. "auto": on with CUDA, off on CPU.
    compile: Union[bool, Literal["auto"]] = "auto"  # torch.compile of the trained networks' forward
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    channels_last: Union[bool, Literal["auto"]] = "auto"  # NHWC weights and images (tensor cores' layout)
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"  # AdamW's kernels; auto: fused on CUDA
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA (float32 work; bf16/fp16 autocast regions unaffected)
    cudnn_benchmark: bool = True  # cuDNN picks the fastest convolution algorithms for the run's shapes (CUDA)
    # One device's dense peak in TFLOP/s at the run's precision, for the records' MFU; null: distgen's table of
    # data-centre GPUs (distgen.telemetry.PEAK_TFLOPS), and no MFU on CPU or a GPU the table lacks
    peak_tflops: Optional[float] = None
    # Memory for compute (docs/training.md#activation-checkpointing): drop the activations inside each block of the
    # trained networks and recompute them in the backward. true: every network of the model that can (a family
    # none of whose networks can is refused); a list: those networks by name (G, D, unet, ...), each of which must
    # take it. The maths is unchanged: a run may resume with it switched.
    activation_checkpointing: Union[bool, tuple[str, ...]] = False

    def validate(self, path: str) -> None:
        check(self.batch_size >= 1, f"{path}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, f"{path}.grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.total_kimg > 0, f"{path}.total_kimg", f"must be > 0, got {self.total_kimg}")
        check(self.lr > 0, f"{path}.lr", f"must be > 0, got {self.lr}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{path}.betas",
              f"must be two numbers in [0, 1), got {list(self.betas)}")
        check(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0")
        check(self.lr_decay_start_kimg is None or self.warmup_kimg <= self.lr_decay_start_kimg <= self.total_kimg,
              f"{path}.lr_decay_start_kimg", "must be in [warmup_kimg, total_kimg] or null")
        check(self.warmup_kimg >= 0, f"{path}.warmup_kimg", "must be >= 0")
        check(self.grad_clip >= 0, f"{path}.grad_clip", "must be >= 0 (0 turns clipping off)")
        check(self.skip_grad_norm is None or self.skip_grad_norm > 0, f"{path}.skip_grad_norm", "must be > 0 or null")
        check(self.max_nonfinite >= 1, f"{path}.max_nonfinite", "must be >= 1")
        for name in ("log_every", "checkpoint_every", "keep_checkpoints", "sample_num"):
            check(getattr(self, name) >= 1, f"{path}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.sample_every >= 0, f"{path}.sample_every", "must be >= 0")
        check(self.max_steps is None or self.max_steps >= 1, f"{path}.max_steps", "must be >= 1 or null")
        check(self.peak_tflops is None or self.peak_tflops > 0, f"{path}.peak_tflops", "must be > 0 or null")
        ac = self.activation_checkpointing
        if not isinstance(ac, bool):
            check(bool(ac) and all(n.strip() for n in ac), f"{path}.activation_checkpointing",
                  "must be true, false or a non-empty list of network names (e.g. [G, D])")
            check(len(set(ac)) == len(ac), f"{path}.activation_checkpointing", f"names a network twice: {list(ac)}")


@dataclass(frozen=True)
class EMAConfig:
    # halflife: EDM's EMAs (halflife_kimg, rampup, decay); power: EDM2's power-function EMAs (power_stds),
    # whose snapshots (snapshot_kimg) let `distgen ema` choose the width after training (docs/training.md).
    kind: Literal["halflife", "power"] = "halflife"
    # EMA half-lives in thousands of samples (EDM's definition); several give several EMAs.
    # The first is the one used for samples, evaluation and export.
    halflife_kimg: tuple[float, ...] = (500.0,)
    rampup: Optional[float] = 0.05  # EDM ramp-up: half-life <= rampup x samples seen; null: none
    decay: Optional[float] = None  # a fixed per-step decay instead of half-lives
    power_stds: tuple[float, ...] = (0.05, 0.10)  # kind power: relative widths sigma_rel; the first is primary
    snapshot_kimg: Optional[float] = None  # kind power: write the EMAs to run_dir/ema-snapshots this often
    snapshot_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"  # the snapshots' floating-point type

    def validate(self, path: str) -> None:
        check(len(self.halflife_kimg) >= 1 and all(h > 0 for h in self.halflife_kimg), f"{path}.halflife_kimg",
              "must be a non-empty list of positive numbers")
        check(self.rampup is None or self.rampup > 0, f"{path}.rampup", "must be > 0 or null")
        check(self.decay is None or 0 < self.decay < 1, f"{path}.decay", "must be in (0, 1) or null")
        # A power profile t^gamma with gamma >= 0 is at most as wide as the uniform average: 1/sqrt(12).
        check(len(self.power_stds) >= 1 and all(0 < s < 12 ** -0.5 for s in self.power_stds), f"{path}.power_stds",
              "must be a non-empty list of widths in (0, 0.2887)")
        check(self.snapshot_kimg is None or self.snapshot_kimg > 0, f"{path}.snapshot_kimg", "must be > 0 or null")
        check(self.snapshot_kimg is None or self.kind == "power", f"{path}.snapshot_kimg",
              "snapshots are of power-function EMAs: set ema.kind=power")


@dataclass(frozen=True)
class ModelConfig:
    """A model family's section; ``family`` picks the dataclass from the lookup the caller passes to
    :func:`distgen.config.load_config` (:data:`distgen.config.models.MODEL_CONFIGS`)."""

    family: str = "diffusion"
    # Fields that only steer sampling (not annotated, so not config keys of their own): a resumed run may
    # change them; any other model field differing from the checkpoint's is refused (--allow-config-change).
    sampling_fields = ()


# Metric names (the evaluator in distgen.evaluate.core computes them; named here so that checking a
# config does not import torch-fidelity).
# paired: L1 / PSNR / SSIM of translations against their ground truth (pix2pix); target_class: the share of
# translations a domain classifier assigns to the target domain's class; accuracy: the test accuracy of a
# family that classifies (JEM)
METRICS = ("fid", "kid", "isc", "prc", "bpd", "recon", "paired", "target_class", "accuracy")
# The fewest images each feature metric can be computed from at all (generated, and reference for fid/kid/prc):
# FID's covariance and KID's unbiased MMD need two; the Inception Score splits the images into 10 groups
# (torch-fidelity's isc_splits), each needing one; precision/recall take every image's 3rd nearest
# neighbour other than itself (prc_neighborhood 3 + 1). Far more are needed for a number that means much.
METRIC_MIN_SAMPLES = {"fid": 2, "kid": 2, "isc": 10, "prc": 4}


# torch-fidelity's DINOv2 and CLIP feature extractors (distgen.evaluate.foundation loads them from local weight
# files).
FOUNDATION_EXTRACTORS = {
    **{f"dinov2-vit-{s}-14": "dinov2" for s in "sblg"},
    **{f"clip-{a}": "clip" for a in ("rn50", "rn101", "rn50x4", "rn50x16", "rn50x64", "vit-b-32", "vit-b-16",
                                     "vit-l-14", "vit-l-14-336px")},
}
INCEPTION_NAMES = ("inception", "inception-v3-compat")  # the spec, and the name the extractor goes by
# A feature metric goes by the name of its feature space, so that a figure is never mistaken for (or compared
# with) one of another space: FID only in InceptionV3's; fd_dinov2, kid_clip_mean, precision_domain, ... in the
# others. "domain" is any distgen domain classifier (the bundled fashion-mnist one, or a fit-features file): one
# fixed name, so that configs (eval.best_metric), readers and TensorBoard see the same key whatever the file is
# called; which classifier it was is in the results' extractor_about.
FEATURE_SPACES = ("dinov2", "clip", "domain")
TAGGED_RESULTS = ("fid", "kid_mean", "kid_std", "precision", "recall", "f_score")


def feature_space(feature_extractor: Optional[str]) -> Optional[str]:
    """The tag of ``feature_extractor``'s feature space (dinov2, clip, domain), or None for InceptionV3."""
    if not feature_extractor or feature_extractor in INCEPTION_NAMES:
        return None
    return FOUNDATION_EXTRACTORS.get(feature_extractor, "domain")


def tagged(key: str, tag: Optional[str]) -> str:
    """``key`` (of TAGGED_RESULTS) in feature space ``tag``: fid -> fd_dinov2, kid_mean -> kid_dinov2_mean,
    precision -> precision_domain; unchanged for InceptionV3 (None) and for other results."""
    if tag is None or key not in TAGGED_RESULTS:
        return key
    if key == "fid":
        return f"fd_{tag}"
    return f"kid_{tag}_{key[4:]}" if key.startswith("kid_") else f"{key}_{tag}"


def result_key(key: str, feature_extractor: Optional[str]) -> str:
    """The name a feature metric's result goes by with ``feature_extractor``: fid -> fd_dinov2 (DINOv2),
    fd_domain (a domain classifier), kid_mean -> kid_dinov2_mean, precision -> precision_clip; unchanged for
    InceptionV3."""
    return tagged(key, feature_space(feature_extractor))


def sample_count_problem(metrics, n: int) -> Optional[str]:
    """Why ``n`` images are too few for one of ``metrics`` (None if enough for all)."""
    for m in metrics:
        need = METRIC_MIN_SAMPLES.get(m, 0)
        if n < need:
            return f"{m} needs at least {need} images, got {n}"
    return None


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # training steps between evaluations of the EMA weights (0: none during training)
    metrics: tuple[str, ...] = ("fid",)  # of fid, kid, isc, prc, bpd, recon, paired, target_class, accuracy
    num_samples: int = 10000  # generated images per evaluation
    ref: tuple[str, ...] = ()  # reference shards / manifest / .npz statistics; default data.train
    batch_size: Optional[int] = None  # images per feature-extractor pass, per process; null: 256 on CUDA, 64 on CPU
    seed: int = 0  # image i of an evaluation is drawn with the seed (seed, i)
    # inception, a DINOv2 / CLIP one (dinov2-vit-s-14 ... dinov2-vit-g-14, clip-vit-b-32, clip-vit-l-14, ...),
    # or a file from `distgen eval fit-features`
    feature_extractor: str = "inception"
    inception_weights: Optional[str] = None  # local InceptionV3 weights (also $DISTGEN_INCEPTION_WEIGHTS)
    # local DINOv2 / CLIP weights; default: the official file name in $TORCH_HOME/hub/checkpoints (never downloaded)
    extractor_weights: Optional[str] = None
    cache_dir: Optional[str] = None  # reference statistics cache; default $DISTGEN_CACHE or ~/.cache/distgen
    kid_subset_size: int = 1000
    best_metric: Optional[str] = None  # keep the EMA weights that score best on this (default: first metric)

    LOWER_IS_BETTER = ("fid", "kid_mean", "bpd", "l1",
                       *(tagged(k, t) for t in FEATURE_SPACES for k in ("fid", "kid_mean")))
    HIGHER_IS_BETTER = ("isc_mean", "precision", "recall", "f_score", "psnr", "ssim", "target_class_share",
                        "accuracy", *(tagged(k, t) for t in FEATURE_SPACES for k in ("precision", "recall", "f_score")))

    def validate(self, path: str) -> None:
        check(self.every >= 0, f"{path}.every", "must be >= 0 (0: no evaluation during training)")
        bad = [m for m in self.metrics if m not in METRICS]
        check(bool(self.metrics) and not bad, f"{path}.metrics",
              f"unknown metric(s) {bad or '(none)'}; choose from {', '.join(METRICS)}")
        check(self.num_samples >= 2, f"{path}.num_samples", "must be >= 2")
        few = sample_count_problem(self.metrics, self.num_samples)
        check(few is None, f"{path}.num_samples", str(few))
        check(self.batch_size is None or self.batch_size >= 1, f"{path}.batch_size", "must be >= 1 or null")
        check(self.kid_subset_size >= 2, f"{path}.kid_subset_size", "must be >= 2")
        names = self.LOWER_IS_BETTER + self.HIGHER_IS_BETTER
        check(self.best_metric is None or self.best_metric in names, f"{path}.best_metric",
              f"must be one of {', '.join(names)}")
        # a result of another feature space would never be computed: the best weights would never be kept
        own = {result_key(k, self.feature_extractor) for k in TAGGED_RESULTS}
        other = {tagged(k, t) for t in FEATURE_SPACES for k in TAGGED_RESULTS} - own
        check(self.best_metric not in other, f"{path}.best_metric",
              f"{self.best_metric} is not computed with feature_extractor {self.feature_extractor} (its feature "
              f"space gives {', '.join(sorted(own))}; the plain names fid, kid_mean, ... follow the extractor)")

    @property
    def best_key(self) -> str:
        """The result that judges the EMA weights (fid -> fd_dinov2 with a DINOv2 extractor, fd_domain with a
        domain classifier)."""
        first = self.metrics[0]
        key = self.best_metric or {"kid": "kid_mean", "isc": "isc_mean", "prc": "f_score", "recon": "psnr",
                                   "paired": "l1", "target_class": "target_class_share"}.get(first, first)
        return result_key(key, self.feature_extractor)

    def better(self, a: float, b: Optional[float]) -> bool:
        """Is ``a`` better than ``b`` for :attr:`best_key`?"""
        if b is None:
            return True
        return a > b if self.best_key in self.HIGHER_IS_BETTER else a < b


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
