"""The training loop. It receives a validated Config and knows no model family.

A family (distgen.families) supplies networks, phases and per-sample losses;
this loop runs them on Accelerate (DDP, multi-node, DeepSpeed ZeRO, mixed
precision), keeps EMAs, logs, samples, checkpoints, resumes and handles
preemption. Counting is in samples seen (kimg), never epochs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from distgen import checkpoint as ckpt
from distgen import dist, preemption
from distgen.config import Config, to_dict, to_yaml
from distgen.data import make_loader, resolve_shards
from distgen.ema import EMASet
from distgen.errors import CheckpointError, TrainingError
from distgen.families import DataInfo, Family, PhaseNets, build_family
from distgen.preemption import EXIT_PREEMPTED


def lr_factor(cfg, nimg: int) -> float:
    """Learning-rate multiplier after ``nimg`` samples: linear warm-up, then constant/cosine/linear decay."""
    warm = cfg.warmup_kimg * 1000
    if warm > 0 and nimg < warm:
        return (nimg + 1) / warm
    total = cfg.total_kimg * 1000
    frac = min(max((nimg - warm) / max(total - warm, 1), 0.0), 1.0)
    if cfg.lr_decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.lr_decay == "linear":
        return 1.0 - frac
    return 1.0


def data_info(cfg: Config) -> DataInfo:
    if not cfg.data.train:
        raise TrainingError("data.train: no training shards configured (a manifest, brace pattern or pipe: URLs)")
    meta = resolve_shards(list(cfg.data.train)).meta
    if meta.get("kind") == "latents" and cfg.model.family != "latent_diffusion":
        raise TrainingError(f"data.train: {cfg.data.train[0]} holds latents (distgen data encode), which only "
                            f"model.family latent_diffusion trains on, not {cfg.model.family!r}")
    return DataInfo(cfg.data.resolution, cfg.data.channels, int(meta.get("num_classes") or 0))


class RunLog:
    """Rank-0 outputs of a run: metrics.jsonl, TensorBoard scalars, a progress bar."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = self.bar = None
        if not enabled:
            return
        if self.path.exists():
            self._truncate(start_step)
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        # A bar on a terminal; one line per record in batch logs (SLURM, CI).
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not self.tty)

    def _truncate(self, start_step: int) -> None:
        """A resumed run drops the records written after its checkpoint by the run it replaces. A line that
        is not a JSON record (the torn last line a full disk or a crash leaves) is dropped too, saying so."""
        keep, torn = [], []
        for i, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = rec["step"]
            except (ValueError, TypeError, KeyError):
                torn.append(i)
                continue
            if step <= start_step:
                keep.append(line)
        if torn:
            print(f"distgen: {self.path}: dropped {len(torn)} line(s) that are not whole records "
                  f"(line {', '.join(map(str, torn))}; a torn write)", flush=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.path)

    def _write(self, rec: dict) -> None:
        """One metrics.jsonl line; its numbers (not the step) as TensorBoard scalars."""
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k, v, rec["step"])
        self.tb.flush()

    def record(self, rec: dict) -> None:
        if not self.enabled:
            return
        self._write(rec)
        eta = rec.get("eta_s")
        eta = f"{eta / 60:.1f}m" if eta is not None else "-"
        fmt = lambda v: f"{v:.4f}" if v is not None else "non-finite"  # noqa: E731
        per_phase = {k[5:]: v for k, v in rec.items() if k.startswith("loss/")}
        # one number per phase where there are several (a GAN's D and G)
        loss = " ".join(f"{k} {fmt(v)}" for k, v in per_phase.items()) if per_phase else fmt(rec["loss"])
        if self.tty:
            self.bar.set_postfix(kimg=f"{rec['kimg']:.1f}", loss=loss, sps=f"{rec['samples_per_s']:.0f}", eta=eta)
        else:
            print(f"step {rec['step']:>7d}  kimg {rec['kimg']:8.2f}  loss {loss}  "
                  f"{rec['samples_per_s']:7.1f} samples/s  eta {eta}", flush=True)

    def record_eval(self, rec: dict) -> None:
        """An evaluation's metrics: metrics.jsonl and TensorBoard (eval/<name>), and a line on stdout."""
        if not self.enabled:
            return
        self._write(rec)
        shown = "  ".join(f"{k[5:]} {v:.5g}" for k, v in rec.items()
                          if k.startswith("eval/") and isinstance(v, float))
        msg = f"eval at step {rec['step']}: {shown or 'nothing computed'}"
        if self.tty:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.tb.close()


def _safe_deepspeed_checkpoints(engine) -> None:
    """Make DeepSpeed read its checkpoints with torch.load(weights_only=True) (no pickled code)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from distgen.engines import safe_checkpoint_engine

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = safe_checkpoint_engine(engine.checkpoint_engine)


def _accumulate(interval: dict, phase: str, loss: float, extras: dict) -> None:
    """Add one micro-step's loss and extra scalars to the interval sums."""
    for k, v in {"loss": loss, **extras}.items():
        acc = interval.setdefault(f"{phase}/{k}", [0.0, 0])
        acc[0] += float(v)
        acc[1] += 1


def _interval_means(interval: dict, phases: list[str]) -> dict:
    """Means over the interval and all ranks. ``loss`` is the first phase's (the only one for most
    families); with several phases each also appears as ``loss/<phase>``. None where nothing was finite."""
    total: dict[str, list] = {}
    for part in dist.all_gather_object(interval):
        for k, (sm, n) in part.items():
            t = total.setdefault(k, [0.0, 0])
            t[0] += sm
            t[1] += n
    out = {k: t[0] / t[1] for k, t in sorted(total.items()) if t[1]}
    res = {"loss": out.pop(f"{phases[0]}/loss", None)}
    if len(phases) > 1:
        res[f"loss/{phases[0]}"] = res["loss"]
        for ph in phases[1:]:
            res[f"loss/{ph}"] = out.pop(f"{ph}/loss", None)
    res.update(out)
    return res


def _write_best(folder: Path, emas: dict, best: dict, nimg: int, family, info, cfg: Config) -> None:
    """The primary EMA weights that scored best, as a self-describing folder (`distgen sample/eval/export` read it).

    Written beside the folder and renamed over it, so a crash leaves the previous best intact.
    """
    with ckpt.atomic_dir(folder) as tmp:
        for n, e in emas.items():
            tensors, _ = e.state()
            ckpt.save_tensors(tmp / f"ema0-{n}.safetensors", tensors[0])
        ckpt.write_meta(tmp, {"step": best["step"], "nimg": nimg, "best": best, "family": family.name,
                              "data_info": to_dict(info), "config": to_dict(cfg)})


# --------------------------------------------------------------------------- resuming
# The data's geometry shapes the networks as much as the model section does.
_DATA_SHAPE_FIELDS = ("resolution", "channels")


def config_changes(stored: dict, cfg: Config) -> list[str]:
    """``field: old -> new`` for each model field (and data geometry) that differs between a checkpoint's
    stored config and ``cfg``. Sampling-only fields (a family's ``sampling_fields``) may change freely,
    and a field the stored config lacks (added by a later distgen) keeps its default."""
    now = to_dict(cfg)
    old_model, new_model = stored.get("model", {}), now["model"]
    free = set(getattr(type(cfg.model), "sampling_fields", ()))
    out = [f"model.{k}: {old_model[k]!r} -> {new_model[k]!r}" for k in new_model
           if k in old_model and k not in free and old_model[k] != new_model[k]]
    old_data = stored.get("data", {})
    out += [f"data.{k}: {old_data[k]!r} -> {now['data'][k]!r}" for k in _DATA_SHAPE_FIELDS
            if k in old_data and old_data[k] != now["data"][k]]
    return out


def _read_checkpoint(folder: Path, meta: dict, nets: dict, trained: dict, emas: dict, rank: int,
                     has_scaler: bool) -> dict:
    """Every file of ``folder`` this rank resumes from, read into memory (nothing applied yet), or a
    CheckpointError naming the file that is missing, truncated or refused."""
    use_ds = (folder / "deepspeed").is_dir()
    out = {"tensors": {}, "optim": {}, "ema": {}, "scaler": None, "rng": None}
    for n in nets:
        if use_ds and n in trained:
            state = folder / "deepspeed" / n / "state"
            if not state.is_dir() or not any(state.iterdir()):
                raise CheckpointError(f"{state}: missing or empty (DeepSpeed's states of {n})")
        else:
            out["tensors"][n] = ckpt.load_tensors(folder / f"{n}.safetensors")
    if not use_ds:
        for n in trained:
            out["optim"][n] = ckpt.load_state(folder / f"optim-{n}.pt")
    for n, e in emas.items():
        if n not in meta["ema_steps"]:
            raise CheckpointError(f"{folder / 'meta.json'}: ema_steps lacks {n}")
        out["ema"][n] = [ckpt.load_tensors(folder / f"ema{i}-{n}.safetensors") for i in range(len(e.emas))]
    if has_scaler and (folder / "scaler.pt").is_file():
        out["scaler"] = ckpt.load_state(folder / "scaler.pt")
    out["rng"] = ckpt.read_rng(folder, rank)
    if out["rng"] is None and rank < meta["world_size"]:  # a rank the writing run had must find its states
        raise CheckpointError(f"{folder / f'rng-{rank}.safetensors'}: missing from the checkpoint")
    return out


def _load_weights(module: torch.nn.Module, tensors: dict, path: Path) -> None:
    """load_state_dict with an error that names the file (a size mismatch means another model config)."""
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:400]
        raise TrainingError(f"{path}: does not fit the configured network ({first})") from None


def _load_newest(root: Path, load, main: bool) -> tuple[Optional[Path], Optional[dict]]:
    """Load the newest checkpoint folder that loads on every rank (``load(folder)`` returns its meta).

    A newer folder that fails (on any rank) is reported by file and reason, then renamed
    ``step-NNNNNNNN.damaged`` so that neither this run nor a later one tries it again (its files stay).
    With checkpoint folders of which none loads, the run stops listing them: it never starts afresh
    over them. A TrainingError from ``load`` (a changed config) is not damage and stops the run.
    """
    failures: list[tuple[Path, str]] = []
    for folder in reversed(ckpt.checkpoint_folders(root)):
        why = None
        try:
            meta = load(folder)
        except TrainingError as e:
            if not isinstance(e, CheckpointError):
                raise
            why = ckpt.describe_failure(folder, e)
        except Exception as e:  # anything that goes wrong reading a checkpoint means it is damaged
            why = ckpt.describe_failure(folder, e)
        if why is not None and not main:  # rank 0 reports its own in the summary below
            print(f"distgen: rank {dist.rank()}: checkpoint {folder} does not load: {why}", file=sys.stderr, flush=True)
        if dist.all_reduce_sum(int(why is not None)) == 0:
            if failures and main:
                for bad, reason in failures:
                    aside = ckpt.set_aside(bad)
                    print(f"distgen: {bad.name} does not load ({reason}); kept as {aside.name}, "
                          f"resuming from the newest checkpoint that loads, {folder.name}", flush=True)
            return folder, meta
        failures.append((folder, why or "does not load on another rank"))
    if failures:
        raise TrainingError(ckpt.no_checkpoint_loads(root, failures))
    return None, None


def _count_skips(counters: dict, local_total: int, reported: int) -> int:
    """Add every rank's bad samples skipped since the last call to ``skipped_samples_total``; returns the
    new ``reported`` (this process's total already counted)."""
    counters["skipped_samples_total"] += int(dist.all_reduce_sum(int(local_total - reported)))
    return local_total


def _agreed(flag: bool, world: int) -> bool:
    """Did any rank raise ``flag``? (The same answer on every rank.)"""
    return dist.all_reduce_sum(int(flag)) > 0 if world > 1 else flag


def run_finished(meta: Optional[dict], stop_at: int) -> bool:
    """Has the run whose newest checkpoint says ``meta`` reached ``stop_at`` with its final checkpoint?"""
    return meta is not None and meta.get("reason") == "end" and int(meta.get("step", -1)) >= stop_at


def _is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


class _Trained:
    """One trained network: its Accelerator (one per network under DeepSpeed), engine-wrapped model,
    plain module and optimizer, and which of its parameters are meant to train."""

    def __init__(self, name: str, acc, model, opt, lr_scale: float):
        self.name, self.acc, self.model, self.opt, self.lr_scale = name, acc, model, opt, lr_scale
        # DDP's module directly: accelerate's unwrap_model imports DeepSpeed (about a second) to test for its engine
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.raw = model.module if ddp else acc.unwrap_model(model) if _is_deepspeed(acc) else model
        self.trainable = [p.requires_grad for p in self.raw.parameters()]

    def train_only_this(self, all_trained: list["_Trained"]) -> None:
        """Gradients on for this network, off for the others: a GAN's generator step runs a frozen
        discriminator, its discriminator step a generator whose fakes then need no graph."""
        for t in all_trained:
            for p, keep in zip(t.raw.parameters(), t.trainable):
                p.requires_grad_(keep if t is self else False)

    def restore(self) -> None:
        """Gradients back on where they were meant to be (diffusers' EMA updates only those parameters)."""
        for p, keep in zip(self.raw.parameters(), self.trainable):
            p.requires_grad_(keep)


def _deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def train(cfg: Config, allow_config_change: bool = False) -> int:
    """Train ``cfg``'s run to its end (0), or until a scheduler's signal (:data:`EXIT_PREEMPTED`).

    ``allow_config_change``: resume a checkpoint whose model config differs from ``cfg`` (refused otherwise).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    tc = cfg.train
    # Installed by the CLI before torch was imported; installed here for callers of train() itself.
    preempt = preemption.install()
    # distgen's config is the source of truth: Accelerate would let the launcher's
    # environment (from an accelerate config file) override these arguments.
    os.environ["ACCELERATE_MIXED_PRECISION"] = tc.mixed_precision
    os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(tc.grad_accum)
    os.environ["ACCELERATE_GRADIENT_CLIPPING"] = str(tc.grad_clip)
    info = data_info(cfg)
    family = build_family(cfg.model, info)
    phases = family.phases()
    trained_names = list(dict.fromkeys(p.network for p in phases))
    acc_kw = dict(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                  cpu=dist.cpu_only(), kwargs_handlers=dist.accelerate_handlers())
    plugins = None
    if _deepspeed_requested():
        from distgen.engines import deepspeed_file_precision_problem

        problem = deepspeed_file_precision_problem(tc.mixed_precision)
        if problem:
            raise TrainingError(problem)
    if _deepspeed_requested() and len(trained_names) > 1:
        # Accelerate's route for several trained models under DeepSpeed: one named plugin
        # (all from the launcher's DeepSpeed config) and one Accelerator, hence one engine, per network.
        from accelerate.utils import DeepSpeedPlugin

        plugins = {n: DeepSpeedPlugin() for n in trained_names}
    acc = Accelerator(**acc_kw, deepspeed_plugins=plugins)
    rank, world = acc.process_index, acc.num_processes
    main = acc.is_main_process
    use_ds = acc.distributed_type == DistributedType.DEEPSPEED
    run_dir = Path(cfg.run.folder)
    root = run_dir / "checkpoints"

    # ---- what cannot work fails here, before any compute
    if tc.mixed_precision == "fp16" and acc.device.type == "cpu":
        raise TrainingError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")
    zero_stage = None
    if use_ds:
        from distgen.engines import loss_scale, set_deepspeed_precision

        ds_plugins = plugins or {trained_names[0]: acc.state.deepspeed_plugin}
        for plugin in ds_plugins.values():
            ds_cfg = plugin.deepspeed_config
            # DeepSpeed clips inside its step and needs the per-device batch (no DataLoader is prepared).
            ds_cfg["gradient_clipping"] = tc.grad_clip
            ds_cfg["train_micro_batch_size_per_gpu"] = tc.batch_size
            set_deepspeed_precision(ds_cfg, tc.mixed_precision)
            zero_stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        if tc.skip_grad_norm:
            raise TrainingError("train.skip_grad_norm: DeepSpeed steps inside its own backward, so an update "
                                "cannot be skipped by its gradient norm; unset it or train with DDP")
        problem = family.engine_problem(zero_stage)
        if problem:
            raise TrainingError(f"DeepSpeed ZeRO-{zero_stage}: {problem}")

    def autocast(t: _Trained):
        """The precision context of a phase's loss: Accelerate's autocast (DDP), or under DeepSpeed, whose
        engine autocasts only its own forward, one torch.autocast around the whole phase, so that the
        networks a phase calls outside their engine see the same precision (see distgen.engines)."""
        if use_ds and tc.mixed_precision != "no":
            return torch.autocast(acc.device.type, dtype=torch.bfloat16 if tc.mixed_precision == "bf16" else torch.float16)
        return t.acc.autocast()

    global_batch = tc.batch_size * world * tc.grad_accum
    total_steps = math.ceil(tc.total_kimg * 1000 / global_batch)
    stop_at = min(total_steps, tc.max_steps) if tc.max_steps else total_steps
    if main:
        print(to_yaml(cfg), end="")
        engine = f", ZeRO-{zero_stage}" if use_ds else ""
        if use_ds and len(trained_names) > 1:
            engine += f", one engine per network ({', '.join(trained_names)})"
        print(f"distgen: {world} process(es) on {acc.device} ({acc.distributed_type.value}{engine}), "
              f"mixed precision {tc.mixed_precision}")
        print(f"distgen: global batch {global_batch} = {tc.batch_size} per device x {world} process(es) x "
              f"{tc.grad_accum} accumulation; {total_steps} steps for {tc.total_kimg:g} kimg")
        sys.stdout.flush()

    # ---- networks, optimizers, EMA; the same initial weights on every rank
    torch.manual_seed(cfg.run.seed)
    nets = family.build_networks()
    for n in nets.values():
        n.to(acc.device)

    def on_device(batch: dict) -> dict:
        return {k: (v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    has_checkpoints = bool(ckpt.checkpoint_folders(root))
    if not has_checkpoints and type(family).data_init is not Family.data_init:
        # Data-dependent initialisation (Glow's actnorm) on a fresh run, before engines copy the
        # weights and EMAs start from them; a resumed run has the result in its checkpoint.
        first = make_loader(list(cfg.data.train), dataclasses.replace(cfg.data, workers=0), batch_size=tc.batch_size,
                            mode="train", rank=rank, world=world, seed=cfg.run.seed)
        family.data_init(nets, on_device(next(iter(first))))
    emas = {name: EMASet(nets[name], cfg.ema.halflife_kimg, cfg.ema.rampup, cfg.ema.decay)
            for name in family.ema_networks()}
    trained: dict[str, _Trained] = {}
    for i, name in enumerate(trained_names):
        o = family.optim_settings(name)
        opt = torch.optim.AdamW(nets[name].parameters(), lr=tc.lr * o.lr_scale,
                                betas=tuple(b ** o.beta_power for b in tc.betas), weight_decay=tc.weight_decay)
        net_acc = acc
        if plugins is not None:
            acc.state.select_deepspeed_plugin(name)
            net_acc = acc if i == 0 else Accelerator(**acc_kw)
        model, opt = net_acc.prepare(nets[name], opt)
        trained[name] = _Trained(name, net_acc, model, opt, o.lr_scale)
        if use_ds:
            _safe_deepspeed_checkpoints(model)
    raw = {n: trained[n].raw if n in trained else m for n, m in nets.items()}
    # ---- resume from the newest checkpoint that loads (a damaged newer one is reported and set aside)
    step, nimg, data_start, data_skip = 0, 0, 0, 0
    counters = {"nonfinite_total": 0, "nonfinite_run": 0, "overflow_total": 0, "skipped_updates_total": 0,
                "skipped_samples_total": 0}
    interval: dict[str, list] = {}  # "<phase>/<name>" -> [sum, count] since the last record

    def load(folder: Path) -> dict:
        meta = ckpt.read_meta(folder, ckpt.RESUME_KEYS)
        changed = config_changes(meta["config"], cfg)
        if changed and not allow_config_change:
            raise TrainingError(f"{folder / 'meta.json'}: the run was trained with another model config; "
                                f"changed: {'; '.join(changed)}. Train in a new run folder, or pass "
                                f"--allow-config-change to resume with the new values on purpose")
        if (folder / "deepspeed").is_dir() != use_ds:
            how = "under DeepSpeed" if not use_ds else "without DeepSpeed"
            raise TrainingError(f"{folder}: written {how}; resume it with the engine it was written with")
        read = _read_checkpoint(folder, meta, nets, trained, emas, rank, acc.scaler is not None)
        for n, t in trained.items():
            if use_ds:
                try:
                    t.model.load_checkpoint(str(folder / "deepspeed" / n), tag="state", load_lr_scheduler_states=False)
                except Exception as e:  # a truncated or tampered DeepSpeed file (pickled code is refused)
                    raise CheckpointError(f"{folder / 'deepspeed' / n}: {ckpt.describe_failure(folder, e)}") from None
            else:
                _load_weights(t.raw, read["tensors"][n], folder / f"{n}.safetensors")
                t.opt.load_state_dict(read["optim"][n])
        for n in set(nets) - set(trained):
            _load_weights(nets[n], read["tensors"][n], folder / f"{n}.safetensors")
        if read["scaler"] is not None:
            acc.scaler.load_state_dict(read["scaler"])
        family.load_state_dict(meta.get("family_state", {}))
        for n, e in emas.items():
            e.load(read["ema"][n], meta["ema_steps"][n])
        if read["rng"] is not None:
            ckpt.set_rng_state(*read["rng"])
        return meta

    latest, meta = _load_newest(root, load, main)
    if latest is not None:
        if meta["world_size"] != world and main:
            print(f"distgen: note: {latest} was written by {meta['world_size']} process(es), resuming with {world}")
        changed = config_changes(meta["config"], cfg)
        if changed and main:
            print(f"distgen: resuming with a changed config (--allow-config-change): {'; '.join(changed)}")
        step, nimg, data_start = meta["step"], meta["nimg"], meta["data_start_step"]
        data_skip = meta.get("data_skip", 0)
        counters.update(meta["counters"])
        interval.update(meta["interval"])
    if run_finished(meta, stop_at):
        # A run that already ended (a job requeued after its final checkpoint, say) ends again at once.
        if main:
            print(f"distgen: {run_dir} already finished at step {step} ({nimg / 1000:.1f} kimg); nothing to do")
        acc.end_training()
        return 0
    if main:
        # Written once the checkpoint to resume from is known to load and to fit this config.
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_text_durably(run_dir / "config.yaml", to_yaml(cfg))
        if latest is not None:
            print(f"distgen: resumed from {latest} (step {step}, {nimg / 1000:.1f} kimg)")

    pin = acc.device.type == "cuda"

    def data_iter(start: int):
        loader = make_loader(list(cfg.data.train), cfg.data, batch_size=tc.batch_size, mode="train", rank=rank,
                             world=world, seed=cfg.run.seed, start_step=start, pin_memory=pin)
        return loader, iter(loader)

    loader, batches = data_iter(data_start)
    # A checkpoint taken between periodic ones (a signal, the end) resumes the stream where it was:
    # restart it where it last started and draw the batches already used.
    for _ in range(data_skip):
        next(batches)
    consumed = data_skip  # batches drawn from the current stream
    log = RunLog(run_dir, stop_at, step, main)
    ec = cfg.eval
    evaluator = None
    best = meta.get("best") if latest is not None else None
    if ec.every:
        from distgen.evaluate import Evaluator, spec_from_config

        evaluator = Evaluator(spec_from_config(cfg), acc.device)
        if main and evaluator.skipped:
            for m, why in evaluator.skipped.items():
                print(f"distgen: eval: {m} will be skipped: {why}")
        if all(m in evaluator.skipped for m in ec.metrics):
            evaluator = None  # nothing left to compute; training goes on
    noise = torch.Generator(device=acc.device)
    skipped_data = 0

    def save(reason: str, restart_data: bool = True) -> Path:
        nonlocal loader, batches, skipped_data, data_start, consumed
        boundary = restart_data or (step % tc.checkpoint_every == 0 and counters["nonfinite_run"] == 0)
        tmp = ckpt.tmp_dir(root, step)
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)  # distgen's own temporary folder (.tmp-step-*), never a user's
        acc.wait_for_everyone()
        if use_ds:
            for n, t in trained.items():
                t.model.save_checkpoint(str(tmp / "deepspeed" / n), tag="state")
        if main:
            for n in nets:
                if n not in trained or not use_ds:
                    ckpt.save_tensors(tmp / f"{n}.safetensors", raw[n].state_dict())
            if not use_ds:
                for n, t in trained.items():
                    ckpt.save_state(tmp / f"optim-{n}.pt", t.opt.state_dict())
            if acc.scaler is not None:
                ckpt.save_state(tmp / "scaler.pt", acc.scaler.state_dict())
            ema_steps = {}
            for n, e in emas.items():
                tensors, ema_steps[n] = e.state()
                for i, t in enumerate(tensors):
                    ckpt.save_tensors(tmp / f"ema{i}-{n}.safetensors", t)
            ckpt.write_meta(tmp, {
                "step": step, "nimg": nimg, "world_size": world, "reason": reason,
                # The stream restarts at every checkpoint_every-th step (periodic checkpoints); a checkpoint
                # between those (a signal, the end) notes where the current stream stands.
                "data_start_step": step if boundary else data_start, "data_skip": 0 if boundary else consumed,
                "counters": counters, "interval": interval, "ema_steps": ema_steps, "best": best,
                "family_state": family.state_dict(),
                "family": family.name, "data_info": to_dict(info), "config": to_dict(cfg),
            })
        ckpt.save_rng(tmp, rank)
        acc.wait_for_everyone()
        if use_ds:  # DeepSpeed's own files: flushed once all are written (distgen's own flush as they are written)
            ckpt.sync_tree(tmp / "deepspeed")
            acc.wait_for_everyone()
        final = ckpt.step_dir(root, step)
        if main:
            final = ckpt.finalize(root, step, tc.keep_checkpoints)
        acc.wait_for_everyone()
        if not restart_data:
            return final
        # The data stream restarts from the checkpoint's step in this run too, so a
        # resumed run sees exactly what the uninterrupted one sees.
        skipped_data += loader.skipped
        loader, batches = data_iter(step)
        data_start, consumed = step, 0
        return final

    def ema_view() -> dict:
        """The networks as sampling sees them: primary EMAs, and the frozen ones (an autoencoder) as they are."""
        return {**raw, **{n: e.materialize(0) for n, e in emas.items()}}

    def grid(tag: str) -> Optional[Path]:
        if not main:
            return None
        from distgen.sample import save_grid

        ema_nets = ema_view()
        gens = [torch.Generator(device=acc.device).manual_seed(i) for i in range(tc.sample_num)]
        with torch.no_grad():
            images = family.sample(ema_nets, gens)
        path = run_dir / "samples" / f"{tag}.png"
        save_grid(images, path)
        return path

    def evaluate() -> None:
        """Metrics of the primary EMA weights; the best ones so far are kept in run_dir/best."""
        nonlocal best, t_last
        t0 = time.time()
        ema_nets = ema_view()
        res = evaluator.run(family, ema_nets, cfg.data)
        rec = {"step": step, "kimg": nimg / 1000, **{f"eval/{k}": v for k, v in res.items() if k != "skipped"}}
        log.record_eval(rec)
        value = res.get(ec.best_key)
        if value is not None and ec.better(value, best["value"] if best else None):
            best = {"metric": ec.best_key, "value": value, "step": step}
            if main:
                _write_best(run_dir / "best", emas, best, nimg, family, info, cfg)
        acc.wait_for_everyone()
        t_last += time.time() - t0  # evaluation time does not count against training speed

    for n in set(nets) - set(trained):
        nets[n].requires_grad_(False)  # networks no phase trains (e.g. a frozen autoencoder)
    t_last, n_last = time.time(), nimg
    t_start, n_start = t_last, nimg
    last_good = latest
    skips_reported = 0  # bad samples this process's loaders skipped that are already in the counters
    if _agreed(preempt.flag, world):
        # The signal came during start-up: nothing new to save; the newest checkpoint stays as it is.
        if main:
            print(f"distgen: signal received during start-up, before step {step + 1}; no checkpoint written; "
                  f"exiting with {EXIT_PREEMPTED} (requeue)", flush=True)
        log.close()
        return EXIT_PREEMPTED
    try:
        while step < stop_at:
            lr_mult = lr_factor(tc, nimg)
            step_ok = True
            held = set()  # networks whose update the stabiliser skipped this step: their EMA holds too (VDVAE)
            for pi, p in enumerate(phases):
                if step % p.every:
                    continue
                t = trained[p.network]
                t.train_only_this(list(trained.values()))
                view = PhaseNets({n: t.model if n == p.network else raw[n] for n in nets}, raw)
                for g in t.opt.param_groups:
                    g["lr"] = tc.lr * t.lr_scale * lr_mult
                for micro in range(tc.grad_accum):
                    batch = next(batches)
                    consumed += 1
                    batch = on_device(batch)
                    # Noise of (seed, rank, step, phase, micro-step): no RNG state to carry across resumes.
                    noise.manual_seed(dist.derive_seed(cfg.run.seed, rank, step, pi, micro))
                    # The global RNG too (dropout draws from it): loaders built at a resume draw from it as well,
                    # so only a per-step seed makes the resumed run's dropout masks those of the straight run.
                    torch.manual_seed(dist.derive_seed(cfg.run.seed, rank, step, pi, micro, 1))
                    with t.acc.accumulate(t.model):
                        with autocast(t):
                            per_sample, extras = family.loss(p.name, view, batch, noise)
                        loss = per_sample.float().mean()  # the reduction in float32 whatever the precision
                        finite = bool(torch.isfinite(loss.detach()))
                        if use_ds:  # DeepSpeed steps inside backward: agree on skipping before it
                            finite = dist.all_reduce_sum(int(not finite)) == 0
                        if finite:
                            _accumulate(interval, p.name, float(loss.detach()), extras)
                            scale = loss_scale(t.model) if use_ds and tc.mixed_precision == "fp16" else None
                            t.acc.backward(loss)  # under DeepSpeed also its optimizer step
                            if scale is not None and loss_scale(t.model) < scale:
                                counters["overflow_total"] += 1  # the scaler found inf/nan and skipped the step
                        else:
                            step_ok = False
                        if t.acc.sync_gradients and not use_ds:
                            extreme = False
                            if step_ok:
                                norm = t.acc.clip_grad_norm_(t.model.parameters(), tc.grad_clip if tc.grad_clip > 0
                                                             else float("inf"))
                                if acc.scaler is None and norm is not None and not torch.isfinite(norm):
                                    step_ok = False
                                elif tc.skip_grad_norm and norm is not None and float(norm) > tc.skip_grad_norm:
                                    # VDVAE's stabiliser: an extreme gradient (the same on every rank after
                                    # DDP's all-reduce) skips this update; the step still counts.
                                    extreme = True
                                    held.add(p.network)
                                    counters["skipped_updates_total"] += 1
                            if step_ok and not extreme:
                                t.opt.step()
                                if t.acc.optimizer_step_was_skipped:
                                    counters["overflow_total"] += 1  # fp16 loss scaling found inf, lowered scale
                            t.opt.zero_grad(set_to_none=True)
                        if t.acc.sync_gradients and step_ok:
                            family.after_step(p.name, raw)
            for t in trained.values():
                t.restore()
            step += 1
            if step_ok:
                counters["nonfinite_run"] = 0
                nimg += global_batch
                for n, e in emas.items():
                    if n not in held:
                        e.update(list(trained[n].model.parameters()), nimg, global_batch, network=raw[n])
            else:
                counters["nonfinite_total"] += 1
                counters["nonfinite_run"] += 1
            log.advance()
            diverged = counters["nonfinite_run"] >= tc.max_nonfinite

            if step % tc.log_every == 0 or step == stop_at or diverged:
                if cfg.data.on_error == "skip":
                    skips_reported = _count_skips(counters, skipped_data + loader.skipped, skips_reported)
                means = _interval_means(interval, [p.name for p in phases])
                now = time.time()
                sps = (nimg - n_last) / max(now - t_last, 1e-9)
                avg = (nimg - n_start) / max(now - t_start, 1e-9)  # the ETA uses the whole run's pace
                # null when every step of the interval was non-finite
                rec = {"step": step, "kimg": nimg / 1000, "loss": means.pop("loss"),
                       "lr": tc.lr * lr_mult, "samples_per_s": sps,
                       "eta_s": (stop_at - step) * global_batch / avg if avg > 0 else None,
                       "nonfinite_total": counters["nonfinite_total"], "overflow_total": counters["overflow_total"],
                       "skipped_updates_total": counters["skipped_updates_total"],
                       **({"skipped_samples_total": counters["skipped_samples_total"]}
                          if cfg.data.on_error == "skip" else {}),
                       **means}
                log.record(rec)
                interval.clear()
                t_last, n_last = now, nimg
            if diverged:
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise TrainingError(f"{tc.max_nonfinite} non-finite steps in a row (step {step}); "
                                    f"stopping without saving: {where}")

            # A signal at the last step needs no requeue: the run ends normally below.
            if _agreed(preempt.flag, world) and step < stop_at:
                path = save("preempted", restart_data=False)
                if main:
                    print(f"\ndistgen: signal received: checkpoint {path} written at step {step}; "
                          f"exiting with {EXIT_PREEMPTED} (requeue)")
                log.close()
                return EXIT_PREEMPTED
            # No periodic checkpoint in a non-finite streak: the last one stays the last good one.
            if step % tc.checkpoint_every == 0 and step < stop_at and counters["nonfinite_run"] == 0:
                last_good = save("periodic")
                preemption.hold_for_test(preempt, "periodic")
            if tc.sample_every and step % tc.sample_every == 0 and step < stop_at:
                grid(f"step-{step:08d}")
                acc.wait_for_everyone()
            if evaluator is not None and (step % ec.every == 0 or step == stop_at):
                evaluate()
    finally:
        log.close()

    final = save("end", restart_data=False)
    preemption.hold_for_test(preempt, "final")
    path = grid(f"step-{step:08d}")
    if cfg.data.on_error == "skip":
        skips_reported = _count_skips(counters, skipped_data + loader.skipped, skips_reported)
    skipped = counters["skipped_samples_total"]
    if main:
        print(f"distgen: done at step {step} ({nimg / 1000:.1f} kimg)")
        if skipped:
            print(f"distgen: {skipped} bad input sample(s) skipped in this run (data.on_error=skip; "
                  f"skipped_samples_total in metrics.jsonl)")
        print(f"distgen: run folder  {run_dir}")
        print(f"distgen: checkpoint  {final}")
        print(f"distgen: metrics     {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})")
        if path:
            print(f"distgen: samples     {path}")
        if best:
            print(f"distgen: best        {run_dir / 'best'} ({best['metric']} {best['value']:.5g} at step {best['step']})")
    acc.wait_for_everyone()
    acc.end_training()
    return 0
