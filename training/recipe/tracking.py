"""Experiment tracking through Accelerate's trackers (``train.report_to``), offline unless told otherwise.

The loop itself only calls ``accelerator.log``; this module chooses the trackers and where they write,
turns the config into hyperparameters every tracker takes, and sends the finished run's test metrics,
baselines and plots. Where the logs go by default (all under ``OUTPUT_DIR``):

- tensorboard: event files in ``OUTPUT_DIR/logs/EXPERIMENT``;
- mlflow: the SQLite store ``OUTPUT_DIR/mlflow.db`` and artifacts in ``OUTPUT_DIR/mlartifacts``, unless
  ``MLFLOW_TRACKING_URI`` (or :attr:`RunLabels.mlflow_tracking_uri`) names another store or a server;
- wandb: offline files in ``OUTPUT_DIR/wandb`` unless ``WANDB_MODE`` says otherwise;
- trackio: its own local store (``TRACKIO_DIR``) unless ``TRACKIO_SPACE_ID`` is set.

A search (``tuneserve tune``) runs each trial as a child run: see :class:`RunLabels` and
:func:`create_parent_run`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError

logger = logging.getLogger(__name__)

LOGS = "logs"
MLFLOW_STORE = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
# What each tracker needs installed (Accelerate silently drops a tracker whose package is missing).
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb", "trackio": "trackio"}

Scalar = str | int | float | bool


@dataclass
class RunLabels:
    """How a run is named in the trackers; a search gives each trial its own.

    Attributes:
        experiment: MLflow experiment, wandb and trackio project, and the tensorboard run directory
            (``OUTPUT_DIR/logs/EXPERIMENT``); default: the config's run name.
        run_name: the run's name inside the experiment; default: the config's run name.
        parent_run_id: MLflow: log this run as a child of that run (tag ``mlflow.parentRunId``).
        group: wandb and trackio: the group the run belongs to (the runs of one search share it).
        tags: MLflow run tags (and wandb tags, as ``key=value``).
        mlflow_tracking_uri: the MLflow store; default: ``MLFLOW_TRACKING_URI``, else ``OUTPUT_DIR/mlflow.db``.
    """

    experiment: str | None = None
    run_name: str | None = None
    parent_run_id: str | None = None
    group: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    mlflow_tracking_uri: str | None = None


def check_installed(report_to: list[str]) -> None:
    """Raises ConfigError naming the package to install for a tracker whose package is absent."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_trackio_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "mlflow": is_mlflow_available, "wandb": is_wandb_available,
                 "trackio": is_trackio_available}
    missing = [name for name in report_to if not available[name]()]
    if missing:
        raise ConfigError("train.report_to: " + "; ".join(
            f"{name} is not installed (pip install {PACKAGES[name]})" for name in missing))


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """A nested config as ``section.key`` -> a value every tracker takes: lists as JSON, null as ``"null"``."""
    flat: dict[str, Scalar] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif value is None:
            flat[name] = "null"
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def prefixed(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """``{prefix}/{name}`` -> value, for the numeric values of ``metrics``."""
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}


def mlflow_tracking_uri(output_dir: Path, explicit: str | None = None) -> str:
    """The MLflow store a run logs to: ``explicit``, else ``MLFLOW_TRACKING_URI``, else SQLite in ``output_dir``."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(output_dir / MLFLOW_STORE).resolve()}"


def create_parent_run(output_dir: str | Path, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                      tracking_uri: str | None = None) -> str:
    """Create (and leave open) an MLflow run for child runs to nest under; returns its id.

    A search calls it once, stores the id with its study, passes it as :attr:`RunLabels.parent_run_id` to each
    trial (with the same ``experiment`` and ``tracking_uri``), and closes it with
    ``MlflowClient(tracking_uri).set_terminated(run_id)`` at the end.
    """
    from mlflow import MlflowClient

    output_dir = Path(output_dir)
    uri = mlflow_tracking_uri(output_dir, tracking_uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        location = None if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") else str(
            (output_dir / MLFLOW_ARTIFACTS).resolve())
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    return client.create_run(experiment_id, run_name=run_name, tags=tags or {}).info.run_id


class RunStopped(Exception):
    """Raised (by an ``on_evaluation`` callback) to stop a run on purpose, as a search prunes a weak trial: its
    tracker runs end as stopped (MLflow KILLED), not as failed."""


_open: list[Tracking] = []  # started and not yet finished: closed as failed if train() raises


class Tracking:
    """The trackers of one run: what the Accelerator is built with, their start, the results, the record."""

    def __init__(self, cfg, labels: RunLabels | None = None):
        labels = labels or RunLabels()
        self.report_to = list(cfg.train.report_to)
        check_installed(self.report_to)
        self.output_dir = Path(cfg.output_dir)
        self.experiment = labels.experiment or cfg.run_name
        self.run_name = labels.run_name or cfg.run_name
        self.labels = labels
        self.cfg = cfg
        self.mlflow_uri = mlflow_tracking_uri(self.output_dir, labels.mlflow_tracking_uri)
        self._previous_mlflow_uri = None
        self.accelerator = None

    @property
    def accelerator_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Accelerator``: the trackers, and the directory tensorboard writes under."""
        if not self.report_to:
            return {}
        from accelerate.utils import ProjectConfiguration

        return {"log_with": self.report_to,
                "project_config": ProjectConfiguration(project_dir=str(self.output_dir),
                                                       logging_dir=str(self.output_dir / LOGS))}

    def start(self, accelerator) -> None:
        """Start every tracker's run (on the main process) with the config as hyperparameters."""
        if not self.report_to:
            return
        self.accelerator = accelerator
        labels = self.labels
        init_kwargs: dict[str, dict[str, Any]] = {}
        if "mlflow" in self.report_to and accelerator.is_main_process:
            import mlflow

            # Accelerate's tracker logs through mlflow's module-level client: point it at this run's store,
            # and give the previous one back in close().
            self._previous_mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI")
            mlflow.set_tracking_uri(self.mlflow_uri)
            local = not (labels.mlflow_tracking_uri or self._previous_mlflow_uri)
            tags = dict(labels.tags)
            if labels.parent_run_id:
                tags["mlflow.parentRunId"] = labels.parent_run_id
            init_kwargs["mlflow"] = {"run_name": self.run_name, "tags": tags or None,
                                     "logging_dir": str((self.output_dir / MLFLOW_ARTIFACTS).resolve()) if local else None}
        init_kwargs["wandb"] = {"name": self.run_name, "dir": str(self.output_dir), "group": labels.group,
                                "tags": [f"{k}={v}" for k, v in labels.tags.items()] or None,
                                "mode": os.environ.get("WANDB_MODE", "offline")}
        init_kwargs["trackio"] = {"name": self.run_name, **({"group": labels.group} if labels.group else {})}
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        _open.append(self)
        hyperparameters = flatten(self.cfg.model_dump(mode="json"))
        hyperparameters["train.lr"] = self.cfg.lr  # 'auto' resolved
        accelerator.init_trackers(self.experiment, config=hyperparameters, init_kwargs=init_kwargs)
        if accelerator.is_main_process:  # (only the main process's trackers have started)
            accelerator.print("tracking: " + "; ".join(f"{name} {where}" for name, where in self.record().items()))

    def record(self) -> dict[str, Any]:
        """Where the logs went (the manifest's ``training.tracking``); empty without trackers."""
        out: dict[str, Any] = {}
        if not self.accelerator or not self.accelerator.is_main_process:  # only the main process's trackers run
            return out
        for name in self.report_to:
            tracker = self.accelerator.get_tracker(name)
            if name == "tensorboard":
                out[name] = Path(tracker.logging_dir).relative_to(self.output_dir).as_posix()
            elif name == "mlflow":
                run = tracker.tracker.info
                out[name] = {"tracking_uri": self.mlflow_uri, "experiment_id": run.experiment_id,
                             "run_id": run.run_id, "run_name": run.run_name}
            elif name == "wandb":
                run = tracker.tracker
                out[name] = {"project": run.project, "run_id": run.id, "mode": os.environ.get("WANDB_MODE", "offline")}
            else:
                out[name] = {"project": self.experiment, "run_name": self.run_name}
        return out

    def log_results(self, result, step: int) -> None:
        """The test metrics, the baselines', and the artifact's plots and manifest where the tracker takes files."""
        if not self.accelerator:
            return
        accelerator = self.accelerator
        values = {**prefixed("test", result.metrics["test"]), **prefixed("best_validation", result.metrics["validation"])}
        for name, metrics in result.baselines.items():
            values.update(prefixed(f"baseline/{name}", metrics))
        accelerator.log(values, step=step)
        plots = sorted((result.artifact_dir / "report").glob("*.png"))
        if "mlflow" in self.report_to:
            mlflow_tracker = accelerator.get_tracker("mlflow")
            for path in plots:
                mlflow_tracker.log_artifact(str(path), artifact_path="report")
            mlflow_tracker.log_artifact(str(result.artifact_dir / "manifest.json"))
        if "tensorboard" in self.report_to:
            writer = accelerator.get_tracker("tensorboard", unwrap=True)
            for path in plots:
                writer.add_image(f"report/{path.stem}", _rgb(path), global_step=step, dataformats="HWC")
            writer.flush()
        if "wandb" in self.report_to:
            accelerator.get_tracker("wandb").log_images({f"report/{p.stem}": [_rgb(p)] for p in plots}, step=step)
        if "trackio" in self.report_to:
            import trackio

            accelerator.get_tracker("trackio").log(
                {f"report/{p.stem}": trackio.Image(str(p), caption=p.stem) for p in plots}, step=step)

    def close(self, failed: bool = False, stopped: bool = False) -> None:
        """After ``accelerator.end_training()``: give back the previous MLflow store. ``failed`` (the run raised):
        first finish every tracker's run as failed (MLflow FAILED, wandb exit code 1), or as stopped with
        ``stopped`` (MLflow KILLED, wandb exit code 255); the process group stays as it is."""
        if self not in _open:
            return
        _open.remove(self)
        main = self.accelerator.is_main_process
        if failed and main:
            for tracker in self.accelerator.trackers:
                # The trackers' own finish() would record a finished run.
                if tracker.name == "mlflow":
                    import mlflow

                    mlflow.end_run(status="KILLED" if stopped else "FAILED")
                elif tracker.name == "wandb":
                    tracker.tracker.finish(exit_code=255 if stopped else 1)
                else:
                    tracker.finish()
        if "mlflow" in self.report_to and main:
            import mlflow

            mlflow.set_tracking_uri(self._previous_mlflow_uri)


def _rgb(path: Path):
    """A PNG as an RGB array (height, width, 3)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def closes_failed_runs(function):
    """Decorate ``train``: a run that raises ends its trackers' runs as failed, so that the next run in the same
    process (a search's next trial) starts cleanly."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        opened = len(_open)
        try:
            return function(*args, **kwargs)
        except BaseException as exc:
            stopped = isinstance(exc, (RunStopped, KeyboardInterrupt))
            while len(_open) > opened:
                try:
                    _open[-1].close(failed=True, stopped=stopped)
                except Exception:  # the original error matters more than a tracker's
                    logger.exception("closing the trackers of a failed run")
                    _open.pop()
            raise

    return wrapper
