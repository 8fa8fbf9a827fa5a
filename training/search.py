"""Hyperparameter search on Optuna: ``tuneserve tune CONFIG``.

The config's ``search:`` section names the values to search (dotted config paths). Each trial is a normal
training run of the config with the trial's values, in ``OUTPUT_DIR/trials/NNN``, judged on the validation
split only: the run stops before the test split (``train(publish=False)``), and reports its monitored
validation metric at each evaluation so that the pruner can stop a weak trial early. A trial that raises is
recorded as failed and the study goes on.

The study lives in Optuna storage: a journal file in OUTPUT_DIR by default (several processes on one machine,
and a study resumes after an interruption), or a database URL (PostgreSQL: workers on many machines). At the
end the best configuration is written as a run config (``best.yaml``), with plots of the search beside it;
``--train-best`` trains it into an artifact whose manifest and card record the study.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import optuna
import sqlalchemy
import yaml

from core.errors import ConfigError, TrainingError
from core.tasks import LOWER_IS_BETTER
from training.config import Config, load_config, with_value
from training.recipe.checkpoint import CHECKPOINTS
from training.recipe.loop import BEST_WEIGHTS, RunResult
from training.recipe.tracking import RunLabels, RunStopped, create_parent_run, mlflow_tracking_uri
from training.run import train

logger = logging.getLogger(__name__)

STUDY_JOURNAL = "study.journal"
TRIALS = "trials"
TRIAL_CONFIG = "config.yaml"
BEST_CONFIG = "best.yaml"
HISTORY_PLOT = "optimization_history.png"
IMPORTANCE_PLOT = "param_importances.png"
PRUNERS = ("median", "hyperband", "none")
SAMPLER = "TPE"


class Pruned(optuna.TrialPruned, RunStopped):
    """A trial pruned at an evaluation: Optuna records it as pruned, the trackers as stopped (not failed)."""


@dataclass
class SearchResult:
    study: optuna.Study
    record: dict[str, Any]  # what the manifest's study section holds (core.manifest.StudyRecord)
    best_config: Path | None  # None: no trial completed
    plots: list[Path]
    labels: RunLabels | None = None  # train.report_to: how the best run joins the search's trackers


def search_labels(cfg: Config, study: optuna.Study, output_dir: Path) -> RunLabels | None:
    """With ``train.report_to``: the trackers' names for the study's runs, which share one MLflow store (the
    study's, or ``MLFLOW_TRACKING_URI``) and, for MLflow, one parent run per store (its id kept with the study)."""
    if not cfg.train.report_to:
        return None
    uri = mlflow_tracking_uri(output_dir)
    parent = None
    if "mlflow" in cfg.train.report_to:
        key = f"mlflow_parent_run_id {uri}"  # workers on other machines may log to stores of their own
        parent = study.user_attrs.get(key)
        if parent is None:
            parent = create_parent_run(output_dir, study.study_name, "search", tags={"optuna.study": study.study_name})
            study.set_user_attr(key, parent)
    return RunLabels(experiment=study.study_name, run_name="search", parent_run_id=parent, group=study.study_name,
                     tags={"optuna.study": study.study_name}, mlflow_tracking_uri=uri)


def close_parent_run(labels: RunLabels | None, record: dict[str, Any]) -> None:
    """Give the MLflow parent run the best validation value so far, and mark it finished."""
    if labels is None or labels.parent_run_id is None:
        return
    from mlflow import MlflowClient

    client = MlflowClient(labels.mlflow_tracking_uri)
    if record.get("best_trial") is not None:
        client.log_metric(labels.parent_run_id, f"best_validation/{record['metric']}", record["best_value"],
                          step=sum(record["trials"].values()))
        client.set_tag(labels.parent_run_id, "best_trial", str(record["best_trial"]))
    client.set_terminated(labels.parent_run_id)


def direction(metric: str) -> Literal["minimize", "maximize"]:
    """Which way the monitored metric improves, as early stopping decides it (core.tasks.is_better)."""
    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


def open_storage(url: str | None, output_dir: Path) -> optuna.storages.BaseStorage:
    """Optuna storage: a journal file in ``output_dir`` (default), another journal file (a path), or a database.

    A database URL (``sqlite:///study.db``, ``postgresql://user@host/db``) gets a heartbeat: a trial whose worker
    died is marked failed by the next worker instead of staying RUNNING for ever.
    """
    if url is None or "://" not in url:
        path = Path(url) if url else output_dir / STUDY_JOURNAL
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if url.startswith(("postgresql://", "postgres://")):  # SQLAlchemy 2.1 would ask for psycopg 3; psycopg2 is ours
        url = "postgresql+psycopg2://" + url.partition("://")[2]
    for attempt in range(1, 4):
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
            # Workers started together on an empty database race to create Optuna's tables (PostgreSQL says so as a
            # unique violation or as "relation ... already exists"); the loser finds them made on its next try.
            if attempt == 3 or (isinstance(error, sqlalchemy.exc.ProgrammingError)
                                and "already exists" not in str(error)):
                raise
            logger.info("another worker is creating the study's tables; trying again")
            time.sleep(attempt)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """``median``: stop a trial below the median of earlier trials at the same evaluation (after 5 trials);
    ``hyperband``: successive halving over evaluations; ``none``: run every trial to its end."""
    if name == "median":
        return optuna.pruners.MedianPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {name!r}: choose one of {', '.join(PRUNERS)}")


def make_sampler(seed: int) -> optuna.samplers.TPESampler:
    # constant_liar: a worker treats trials still running elsewhere as bad, so workers spread out.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def suggest(trial: optuna.Trial, cfg: Config) -> dict[str, Any]:
    """The trial's value for every searched path (parameter names are the config paths)."""
    params = {}
    for path, space in cfg.search.items():
        kind = cfg.search_kind(path)
        if kind == "choices":
            params[path] = trial.suggest_categorical(path, space.choices)
        elif kind == "int":
            params[path] = trial.suggest_int(path, space.low, space.high, log=space.log)
        else:
            params[path] = trial.suggest_float(path, space.low, space.high, log=space.log)
    return params


def configured(cfg: Config, params: dict[str, Any], output_dir: Path | str) -> dict[str, Any]:
    """Raw run config (YAML data): ``cfg`` as written, with ``params`` at their paths, no search, and ``output_dir``."""
    raw = cfg.model_dump(mode="json", exclude_unset=True, exclude={"search"})
    for path, value in params.items():
        raw = with_value(raw, path, value)
    raw["output_dir"] = str(output_dir)
    return raw


def clean_trial(trial_dir: Path) -> None:
    """Remove what only a resumed run would need: checkpoints and the best weights."""
    shutil.rmtree(trial_dir / CHECKPOINTS, ignore_errors=True)
    (trial_dir / BEST_WEIGHTS).unlink(missing_ok=True)


def _write_atomically(path: Path, write) -> None:
    # Several workers may finish at once and write the same file: each stages its own copy, the last rename wins.
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(staged)
    os.replace(staged, path)


def run_search(cfg: Config, *, trials: int | None = None, timeout: float | None = None, seed: int | None = None,
               storage: str | None = None, study_name: str | None = None,
               pruner: str | optuna.pruners.BasePruner = "median") -> SearchResult:
    """Run (or continue) a study of ``cfg.search`` and write the best config and plots to ``OUTPUT_DIR``.

    Args:
        cfg: a run config with a ``search`` section.
        trials: trials this process runs (None: until ``timeout``); several processes add up.
        timeout: seconds after which this process starts no new trial.
        seed: seeds the sampler (default: ``train.seed``); trial N draws from ``seed + N``, so workers sharing
            a study propose different trials and a one-process study is reproducible.
        storage: Optuna storage URL or journal file (default ``OUTPUT_DIR/study.journal``).
        study_name: default: the run name (``name``, or OUTPUT_DIR's name).
        pruner: ``median`` | ``hyperband`` | ``none``, or an Optuna pruner.

    Raises:
        ConfigError: the config has no search section, no budget (trials or timeout) is given, the command runs
            under a multi-process launcher, or the study was created for another direction.
    """
    if not cfg.search:
        raise ConfigError("the config has no search section: add one, e.g. search: {train.lr: {low: 1.0e-4, "
                          "high: 3.0e-3, log: true}}")
    if trials is None and timeout is None:
        raise ConfigError("give --trials or --timeout (or both), or the search never ends")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("tuneserve tune runs one process per trial: start several tune workers on one study "
                          "instead of accelerate launch / torchrun")
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    monitor, seed = cfg.monitor, cfg.train.seed if seed is None else seed
    pruner_name = pruner if isinstance(pruner, str) else type(pruner).__name__
    study = optuna.create_study(storage=open_storage(storage, output_dir), study_name=study_name or cfg.run_name,
                                direction=direction(monitor), sampler=make_sampler(seed),
                                pruner=make_pruner(pruner) if isinstance(pruner, str) else pruner,
                                load_if_exists=True)
    if study.direction.name.lower() != direction(monitor):
        raise ConfigError(f"study {study.study_name!r} was created to {study.direction.name.lower()} its metric; "
                          f"validation {monitor} must {direction(monitor)}: use another --study-name")
    labels = search_labels(cfg, study, output_dir)

    objective = make_objective(cfg, study, seed, output_dir, labels)
    study.optimize(objective, n_trials=trials, timeout=timeout, catch=(Exception,), gc_after_trial=True)
    record = study_record(study, monitor, pruner_name)
    best_config = write_best_config(cfg, study, output_dir) if record.get("best_trial") is not None else None
    close_parent_run(labels, record)
    return SearchResult(study=study, record=record, best_config=best_config, plots=save_plots(study, output_dir),
                        labels=labels and replace(labels, run_name="best"))


def make_objective(cfg: Config, study: optuna.Study, seed: int, output_dir: Path, labels: RunLabels | None
                   ) -> Callable[[optuna.Trial], float]:
    """The study's objective: a trial trains the config with its suggested values (``publish=False``: the test split
    is never touched), reports each validation to the pruner, and returns the monitored validation metric."""
    monitor = cfg.monitor

    def objective(trial: optuna.Trial) -> float:
        # Trial N draws from its own seed: a study shared by workers never proposes one trial twice.
        study.sampler = make_sampler(seed + trial.number)
        params = suggest(trial, cfg)
        trial_dir = output_dir / TRIALS / f"{trial.number:03d}"
        trial.set_user_attr("output_dir", str(trial_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        evaluations = 0

        def report(step: int, metrics: dict[str, float]) -> None:
            nonlocal evaluations
            evaluations += 1
            value = metrics.get(monitor)
            if value is None:
                return
            # Evaluations, not optimizer steps: trials of other batch sizes stay comparable.
            trial.report(value, evaluations)
            if trial.should_prune():
                raise Pruned(f"validation {monitor} {value:.4f} at evaluation {evaluations} (step {step})")

        try:
            raw = configured(cfg, params, trial_dir)
            run_cfg = load_config(raw=raw)
            trial_dir.mkdir(parents=True, exist_ok=True)
            (trial_dir / TRIAL_CONFIG).write_text(yaml.safe_dump(raw, sort_keys=False))
            trial_labels = labels and replace(labels, run_name=f"trial-{trial.number:03d}",
                                              tags={**labels.tags, "optuna.trial": str(trial.number)})
            result: RunResult = train(run_cfg, overwrite=True, publish=False, on_evaluation=report,
                                      labels=trial_labels)
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # kept with the trial: the study records it as failed and goes on
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            clean_trial(trial_dir)
        value = result.metrics["validation"].get(monitor)
        if value is None:
            raise TrainingError(f"trial {trial.number}: validation {monitor} was undefined at every evaluation")
        return value


    return objective


def study_record(study: optuna.Study, metric: str, pruner: str) -> dict[str, Any]:
    """The study in numbers: trials by state, the best trial and, with two complete trials or more, importances."""
    trials = study.get_trials(deepcopy=False)
    record: dict[str, Any] = {
        "name": study.study_name, "metric": metric, "direction": study.direction.name.lower(), "sampler": SAMPLER,
        "pruner": pruner, "trials": dict(Counter(t.state.name for t in trials)), "importances": None,
    }
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return record
    best = study.best_trial
    record.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    if len(complete) >= 2:
        try:
            record["importances"] = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        except (RuntimeError, ValueError) as exc:  # e.g. no parameter varied across the complete trials
            logger.warning("parameter importances not computed: %s", exc)
    return record


def write_best_config(cfg: Config, study: optuna.Study, output_dir: Path) -> Path:
    """The best trial's configuration as a run config (no search section; ``output_dir`` the study's own, so
    that ``tuneserve train`` puts its artifact in OUTPUT_DIR/artifact)."""
    best = study.best_trial
    raw = configured(cfg, best.params, output_dir)
    raw.setdefault("name", cfg.run_name)  # the model keeps the search config's name, not this file's
    load_config(raw=raw)  # a run config, loadable as it is written
    path = output_dir / BEST_CONFIG
    header = (f"# tuneserve train {path}\n"
              f"# The best of study {study.study_name!r}: trial {best.number}, validation {cfg.monitor} "
              f"{best.value:.4f} ({len(study.trials)} trials).\n")
    _write_atomically(path, lambda p: p.write_text(header + yaml.safe_dump(raw, sort_keys=False)))
    return path


def save_plots(study: optuna.Study, output_dir: Path) -> list[Path]:
    """The optimisation history and (two complete trials or more) the parameter importances, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots = {HISTORY_PLOT: optuna_plots.plot_optimization_history} if complete else {}
    if len(complete) >= 2:
        plots[IMPORTANCE_PLOT] = optuna_plots.plot_param_importances
    written = []
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            axes = plot(study)
        figure = axes.figure
        figure.set_size_inches(8, 4.5)
        figure.tight_layout()
        _write_atomically(output_dir / name, partial(figure.savefig, format="png", dpi=120))
        plt.close(figure)
        written.append(output_dir / name)
    return written


def train_best(best_config: Path, record: dict[str, Any], labels: RunLabels | None = None) -> RunResult:
    """Train the best configuration into an artifact whose manifest and model card record the study (``labels``:
    in the trackers, as the search's run ``best``)."""
    from core.manifest import StudyRecord, read_manifest, write_manifest
    from training.publish.card import write_card

    result = train(load_config(best_config), overwrite=True, labels=labels)
    if result.artifact_dir is not None:  # the main process
        manifest = read_manifest(result.artifact_dir)
        manifest.study = StudyRecord(**record)
        write_manifest(manifest, result.artifact_dir)
        write_card(result.artifact_dir, manifest)
    return result
