"""Experiment trackers (``run.trackers``): TensorBoard, Weights & Biases and MLflow, through Accelerate's tracker
classes (:mod:`accelerate.tracking`) handed to the Accelerator (``log_with``) and started by its ``init_trackers``, on
rank 0 only. They get the resolved config as hyperparameters (flat ``section.key`` names), every number of every
metrics.jsonl record at its step (losses, telemetry, evaluation results, the best evaluation so far), and the sample
grids as images.

A resumed run continues its tracker runs, whose ids ``RUN_DIR/trackers.json`` keeps. A tracker that is not installed
stops the run before anything is built, and one that does not start (W&B online without a login, an MLflow server
that does not answer) stops it before its first step, saying what to do; once started, a tracker that fails to log
is reported once and left behind (metrics.jsonl has every record), so that it never ends a long run.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from distgen import dist
from distgen import readback as rb
from distgen.config import Config, to_dict
from distgen.durable import write_text_durably
from distgen.errors import TrainingError

IDS_FILE = "trackers.json"
# tracker -> (the module it needs, what to install)
INSTALL = {"tensorboard": ("tensorboard", "pip install tensorboard"),
           "wandb": ("wandb", "pip install 'distgen[trackers]' (or: pip install wandb)"),
           "mlflow": ("mlflow", "pip install 'distgen[trackers]' (or: pip install mlflow-skinny; mlflow for its UI)")}
_IDS_SCHEMA = rb.Obj({"wandb": rb.Obj({"id": rb.Str(max_len=128)}, extra=True),
                      "mlflow": rb.Obj({"run_id": rb.Str(max_len=128)}, extra=True)},
                     optional=("wandb", "mlflow"), extra=True)


def check_installed(names) -> None:
    """Refuse trackers whose package is missing, naming what to install (Accelerate would leave them out quietly)."""
    missing = [n for n in names if importlib.util.find_spec(INSTALL[n][0]) is None]
    if missing:
        raise TrainingError("run.trackers: " + "; ".join(f"{n} is not installed ({INSTALL[n][1]})" for n in missing))


def hyperparameters(cfg: Config) -> dict[str, Any]:
    """The resolved config as flat ``section.key`` values: numbers, strings and booleans as they are, lists and
    nulls as JSON text (what every tracker's hyperparameters take)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value)

    walk("", to_dict(cfg))
    return out


def scalars(rec: dict) -> dict[str, float]:
    """A record's numbers (not its step, flags or texts): what trackers plot."""
    return {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """``cfg.run.trackers`` as Accelerate tracker objects (:attr:`instances`, for ``Accelerator(log_with=...)``),
    started by :meth:`start` once the run folder and the step to resume from are known."""

    def __init__(self, cfg: Config):
        check_installed(cfg.run.trackers)
        self.cfg, self.dir = cfg, Path(cfg.run.folder)
        self.instances = [self._make(n) for n in cfg.run.trackers]
        self.acc = None  # the Accelerator whose trackers run (rank 0, once started)
        self._failed: set[str] = set()
        self._current = None  # the tracker being set up (named if that fails)

    def _make(self, name: str):
        from accelerate import tracking

        if name == "tensorboard":
            return tracking.TensorBoardTracker("tensorboard", str(self.dir))  # RUN_DIR/tensorboard, as always
        if name == "wandb":
            # the run folder holds W&B's local files too, unless WANDB_DIR says otherwise
            kw = {} if os.environ.get("WANDB_DIR") else {"dir": str(self.dir)}
            return tracking.WandBTracker(self.cfg.run.project, name=self.cfg.run.name, **kw)
        return tracking.MLflowTracker(experiment_name=self.cfg.run.project, run_name=self.cfg.run.name)

    # ---- start
    def start(self, acc, start_step: int) -> None:
        """Every rank: rank 0 starts the trackers (continuing the runs of trackers.json) and stores the config;
        all ranks raise if one did not start."""
        if not self.instances:
            return
        problem = None
        if acc.is_main_process:
            try:
                self._start(acc, start_step)
            except TrainingError as e:
                problem = str(e)
            except Exception as e:  # noqa: BLE001 - whatever the tracker's package raises, said at start
                name = self._current or next((t.name for t in self.instances if not _started(t)), "a tracker")
                problem = f"run.trackers: {name} could not start: {type(e).__name__}: {' '.join(str(e).split())[:600]}"
            if problem:
                self.finish("FAILED")
        problem = next((p for p in dist.all_gather_object(problem) if p), None)
        if problem:
            raise TrainingError(problem)

    def _start(self, acc, start_step: int) -> None:
        ids = self._read_ids()
        for t in self.instances:
            self._current = t.name
            if t.name == "tensorboard":
                # a resumed run's TensorBoard drops the steps after its checkpoint, as metrics.jsonl does
                t.init_kwargs["purge_step"] = start_step + 1
            elif t.name == "wandb" and "wandb" in ids:
                t.init_kwargs.update(id=ids["wandb"]["id"], resume="allow")
            elif t.name == "mlflow":
                _mlflow_uri(self.dir)
                t.run_id = os.environ.get("MLFLOW_RUN_ID") or ids.get("mlflow", {}).get("run_id")
        self.acc, self._current = acc, None
        acc.init_trackers(self.cfg.run.project)  # starts every tracker of log_with; the config follows per tracker
        params = hyperparameters(self.cfg)
        for t in acc.trackers:
            if t.name == "mlflow" and t.run_id:
                self._mlflow_params(t, params)
            elif t.name != "tensorboard" or start_step == 0:  # TensorBoard's hparams: one session per run
                t.store_init_configuration(params)
        self._write_ids(ids)

    def _mlflow_params(self, t, params: dict) -> None:
        """A continued MLflow run takes only parameters it lacks: MLflow refuses to change a logged value."""
        have = t.active_run.data.params
        new = {k: v for k, v in params.items() if k not in have}
        if new:
            t.store_init_configuration(new)
        changed = sorted(k for k, v in params.items() if k in have and have[k] != str(v))
        if changed:
            dist.print0(f"distgen: mlflow: the run keeps its first value of {', '.join(changed[:8])}"
                        f"{' ...' if len(changed) > 8 else ''} (MLflow parameters do not change; config.yaml has "
                        f"this run's)")

    def _read_ids(self) -> dict:
        path = self.dir / IDS_FILE
        if not path.exists():
            return {}
        try:
            return rb.read_json(path, _IDS_SCHEMA, error=ValueError, max_bytes=64 * 1024)
        except ValueError as e:
            raise TrainingError(f"{e}; remove {path} to start new tracker runs") from None

    def _write_ids(self, ids: dict) -> None:
        for t in self.acc.trackers:
            if t.name == "wandb":
                ids["wandb"] = {"id": t.run.id, "project": t.run.project}
            elif t.name == "mlflow":
                import mlflow

                info = t.active_run.info
                ids["mlflow"] = {"run_id": info.run_id, "experiment_id": info.experiment_id,
                                 "tracking_uri": mlflow.get_tracking_uri()}
        if ids:
            write_text_durably(self.dir / IDS_FILE, json.dumps(ids, indent=1) + "\n")

    # ---- during the run (rank 0)
    def log(self, rec: dict) -> None:
        """A metrics.jsonl record's numbers at its step."""
        values = scalars(rec)
        self._each(lambda t: t.log(values, step=rec["step"]), rec["step"])

    def log_image(self, path: Path, step: int) -> None:
        """A sample grid (a PNG of save_grid's) as the image ``samples`` at ``step``."""
        if not self._live():
            return
        import numpy as np
        from PIL import Image

        img = np.asarray(Image.open(path).convert("RGB"))

        def one(t) -> None:
            if t.name == "mlflow":  # Accelerate's MLflow tracker has no log_images
                import mlflow

                mlflow.log_image(img, key="samples", step=step)
            else:
                t.log_images({"samples": img[None]}, step=step,
                             **({"dataformats": "NHWC"} if t.name == "tensorboard" else {}))

        self._each(one, step)

    def _live(self) -> bool:
        return self.acc is not None and bool(self.acc.trackers)

    def _each(self, fn, step: int) -> None:
        if not self._live():
            return
        for t in self.acc.trackers:
            if t.name in self._failed:
                continue
            try:
                fn(t)
            except Exception as e:  # noqa: BLE001 - a tracker's hiccup must not end a long run
                self._failed.add(t.name)
                dist.print0(f"distgen: warning: {t.name}: logging failed at step {step} ({type(e).__name__}: {e}); "
                            f"it gets nothing more in this run (metrics.jsonl has every record)")

    def finish(self, status: str = "FINISHED") -> None:
        """End the tracker runs: FINISHED, KILLED (preempted, to be resumed) or FAILED."""
        if self.acc is None:
            return
        for t in self.acc.trackers:
            if not _started(t):
                continue
            try:
                if t.name == "wandb":
                    t.run.finish(exit_code=0 if status == "FINISHED" else 1)
                elif t.name == "mlflow":
                    import mlflow

                    mlflow.end_run(status)
                else:
                    t.finish()
            except Exception as e:  # noqa: BLE001 - closing a tracker must not hide the run's own outcome
                dist.print0(f"distgen: warning: {t.name}: could not close its run ({type(e).__name__}: {e})")
        self.acc.trackers.clear()
        self.acc = None


def _started(t) -> bool:
    """Has Accelerate's tracker ``t`` started (its ``tracker`` property reads what ``start`` sets)?"""
    try:
        return t.tracker is not None
    except AttributeError:
        return False


def _mlflow_uri(run_dir: Path) -> None:
    """MLflow's tracking URI: MLFLOW_TRACKING_URI (a server, ``sqlite:///...``), else a file store in the run folder
    (``RUN_DIR/mlruns``, beside tensorboard/; ``mlflow ui --backend-store-uri`` reads it). Set each time: MLflow keeps
    the last one set for the whole process, over the environment (another run trained in this process)."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        mlflow.set_tracking_uri(uri)
        return
    # MLflow 3 keeps its file store behind this switch; it needs no database (and no server) on a cluster node
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
    # set_tracking_uri also exports MLFLOW_TRACKING_URI for child processes: the next run trained in this process
    # (a sweep) would take this run's store for the user's choice
    os.environ.pop("MLFLOW_TRACKING_URI", None)
