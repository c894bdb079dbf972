"""``distgen ema RUN_DIR``: EMAs of chosen widths reconstructed from a run's snapshots (distgen.phema),
written as exports, or a sweep of widths evaluated with any metric of ``distgen eval``, with a table, a
plot and the best width kept as an export."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from distgen import checkpoint as ckpt
from distgen import dist, phema
from distgen.durable import atomic_dir
from distgen.config.schema import METRICS, EvalConfig
from distgen.ema import std_to_exp
from distgen.errors import SampleError

from distgen.ownership import EMA_MARKER as MARKER  # an ema output folder's marker (replaced only with --force)


def _load(nets: dict, weights: dict, where: Path) -> None:
    for n, state in weights.items():
        try:
            nets[n].load_state_dict(state)
        except RuntimeError as e:
            raise SampleError(f"{where}: the snapshots' {n} does not fit the run's network "
                              f"({ckpt.first_line(e)[:300]})") from None


def ema_command(run_dir: str, out_dir: str, *, sigmas: Optional[list[float]] = None,
                sweep: Optional[list[float]] = None, metric: str = "fid", max_residual: float = 0.05,
                force: bool = False, num_samples: int = 10000, baseline: Optional[str] = None,
                eval_kw: Optional[dict] = None, options: Optional[dict] = None, checkpoint: Optional[str] = None) -> int:
    """``checkpoint`` (step-N, latest or best; None: the newest that loads) gives the config and networks, and
    the time of the reconstruction: the snapshots up to its sample count (None: all of them)."""
    from accelerate import PartialState

    from distgen.ownership import check_output_folder
    from distgen.export.native import write_export
    from distgen.sample import newest_ema_checkpoint, sampling_options

    run = Path(run_dir)
    if not (run / "checkpoints").is_dir():
        raise SampleError(f"{run}: not a run folder (no checkpoints/)")
    out = check_output_folder(run, Path(out_dir), force, marker=MARKER, flag="--out")
    if sweep is not None and metric not in METRICS:
        raise SampleError(f"--metric {metric!r}: one of {', '.join(METRICS)}")
    widths = sweep if sweep is not None else sigmas
    # every check before anything is written. A chosen checkpoint is read first: the reconstruction is as of its
    # sample count (the snapshots up to it); by default, as of the last snapshot
    loaded = newest_ema_checkpoint(run, checkpoint) if checkpoint is not None else None
    rec = phema.Reconstruction(run, widths, max_residual, up_to=loaded[1][3]["nimg"] if loaded else None)
    state = PartialState(cpu=dist.cpu_only())
    cp, (cfg, family, nets, meta) = loaded or newest_ema_checkpoint(run)
    missing = set(family.ema_networks()) - set(rec.networks)
    if missing:
        raise SampleError(f"{run / phema.SNAPSHOT_DIR}: the snapshots lack network(s) {sorted(missing)}")
    t_kimg = rec.t / 1000
    source = lambda s, r: {"run": str(run), "checkpoint": str(cp), "posthoc_ema": {  # noqa: E731
        "sigma_rel": s, "gamma": std_to_exp(s), "kimg": t_kimg, "snapshots": len(rec.entries), "residual": float(r)}}
    if dist.is_main():
        lo_hi = f"{rec.range[0]:.3f} to {rec.range[1]:.3f}" if rec.range else "none"
        print(f"distgen ema: {len(rec.entries)} snapshots of sigma_rel {rec.entries[-1]['stds']} up to "
              f"{t_kimg:g} kimg in {run / phema.SNAPSHOT_DIR}; widths they represent within residual "
              f"{max_residual:g}: {lo_hi}")
    summary = {"run": str(run), "kimg": t_kimg, "snapshots": len(rec.entries), "max_residual": max_residual,
               "widths": [{"sigma_rel": s, "gamma": std_to_exp(s), "residual": float(r)}
                          for s, r in zip(rec.sigmas, rec.residual)]}

    if sweep is None:
        results = rec.weights()
        if dist.is_main():
            with atomic_dir(out) as tmp:
                for s, r, w in zip(rec.sigmas, rec.residual, results):
                    _load(nets, w, run / phema.SNAPSHOT_DIR)
                    write_export(tmp / f"sigma-{s:.3f}", family, nets, cfg, meta["data_info"], source(s, r))
                    print(f"  sigma_rel {s:.3f} (gamma {std_to_exp(s):6.2f}): fit residual {r:.2e} -> "
                          f"{out / f'sigma-{s:.3f}'}")
                (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
        dist.barrier()
        return 0

    # ---- the sweep: one width at a time (two copies of the weights in memory), each evaluated
    from distgen.evaluate import Evaluator, spec_from_config

    spec = spec_from_config(cfg, metrics=(metric,), num_samples=num_samples, **(eval_kw or {}))
    # the number a metric is judged by (fid -> fd_dinov2 with a DINOv2 extractor), and which way is better
    judge = EvalConfig(metrics=(metric,), feature_extractor=spec.feature_extractor)
    key, lower = judge.best_key, judge.best_key in EvalConfig.LOWER_IS_BETTER
    spec.sampling = sampling_options(family, options or {})
    evaluator = Evaluator(spec, state.device)
    if metric in evaluator.skipped:
        raise SampleError(f"--metric {metric}: {evaluator.skipped[metric]}")
    rows, best = [], None
    for n in nets.values():
        n.to(state.device).eval().requires_grad_(False)
    for j, (s, r) in enumerate(zip(rec.sigmas, rec.residual)):
        (w,) = rec.weights([j])
        _load(nets, w, run / phema.SNAPSHOT_DIR)
        t0 = time.time()
        value = evaluator.run(family, nets, cfg.data).get(key)
        rows.append({"sigma_rel": s, "gamma": std_to_exp(s), "residual": float(r), key: value})
        if dist.is_main():
            print(f"  sigma_rel {s:.3f} (gamma {std_to_exp(s):6.2f}, residual {r:.1e}): {key} {value:.5g} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if value is not None and judge.better(value, best[1] if best else None):
            best = (j, value, {n: {k: v.detach().cpu().clone() for k, v in sd.items()} for n, sd in w.items()})
    base = None
    if baseline:
        from distgen.sample import load_ema

        b_family, b_nets, _ = load_ema(baseline, state.device)
        base = evaluator.run(b_family, b_nets, cfg.data).get(key)
        if dist.is_main():
            print(f"  baseline {baseline}: {key} {base:.5g}")
    if dist.is_main():
        j, value, weights = best
        summary.update(metric=metric, key=key, lower_is_better=lower, num_samples=num_samples,
                       sampling=spec.sampling, sweep=rows,
                       best={"sigma_rel": rec.sigmas[j], key: value},
                       baseline={"path": baseline, key: base} if baseline else None)
        with atomic_dir(out) as tmp:
            _load(nets, weights, run / phema.SNAPSHOT_DIR)
            write_export(tmp / "best", family, nets, cfg, meta["data_info"], source(rec.sigmas[j], rec.residual[j]))
            (tmp / "sweep.md").write_text(_table(summary))
            _plot(summary, tmp / "sweep.png")
            (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"distgen ema: best sigma_rel {rec.sigmas[j]:.3f}: {key} {value:.5g}"
              + (f" (baseline {base:.5g})" if base is not None else "") + f" -> {out / 'best'}")
        print(f"distgen ema: table {out / 'sweep.md'}, plot {out / 'sweep.png'}, all numbers {out / MARKER}")
    dist.barrier()
    return 0


def _table(summary: dict) -> str:
    key = summary["key"]
    lines = [f"Post-hoc EMA sweep of {summary['run']} at {summary['kimg']:g} kimg ({summary['snapshots']} snapshots), "
             f"{summary['metric']} from {summary['num_samples']} samples "
             f"({'lower' if summary['lower_is_better'] else 'higher'} is better)", "",
             f"| sigma_rel | gamma | fit residual | {key} |", "|---|---|---|---|"]
    for r in summary["sweep"]:
        mark = " **best**" if r["sigma_rel"] == summary["best"]["sigma_rel"] else ""
        lines.append(f"| {r['sigma_rel']:.3f} | {r['gamma']:.2f} | {r['residual']:.1e} | {r[key]:.4g}{mark} |")
    if summary.get("baseline"):
        lines.append(f"| baseline: {summary['baseline']['path']} | | | {summary['baseline'][key]:.4g} |")
    return "\n".join(lines) + "\n"


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = summary["key"]
    xs = [r["sigma_rel"] for r in summary["sweep"]]
    ys = [r[key] for r in summary["sweep"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(xs, ys, "o-", label="reconstructed post-hoc EMA")
    ax.plot([summary["best"]["sigma_rel"]], [summary["best"][key]], "r*", markersize=14, label="best")
    if summary.get("baseline"):
        ax.axhline(summary["baseline"][key], color="gray", linestyle="--", label="baseline")
    ax.set_xlabel("EMA width sigma_rel")
    ax.set_ylabel(key)
    ax.set_title(f"{key} against EMA width, {summary['kimg']:g} kimg")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
