"""The models one service serves: one artifact, or a set named by ``TUNESERVE_MODELS``, each loaded, self-tested and
known by a name; a request chooses its model by its ``model`` field (optional where one model is served).

``TUNESERVE_MODELS`` is a comma-separated list of sources, each an artifact directory or a BentoML store tag, or
``NAME=SOURCE`` to name one; a directory that is not itself an artifact stands for each artifact in it. A model's
name is the one given, else its config's ``name`` (the manifest's), else its directory's or tag's name. Two models of
one name are refused: a request could not tell them apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ArtifactError, ConfigError
from core.manifest import MANIFEST_FILE, Manifest, read_manifest
from core.verdict import baseline_verdict
from service.requests import RequestError
from service.settings import Settings

MODELS_VARIABLE = "TUNESERVE_MODELS"


class UnknownModel(RequestError):
    """A request names a model this service does not serve (404)."""

    status = 404


class ModelLoading(RequestError):
    """A request names a model that is being added (503, with Retry-After)."""

    status = 503
    retry_after = 5


@dataclass(frozen=True)
class Source:
    """Where one served model comes from: an artifact directory or a store tag, as the settings wrote it."""

    given: str  # the setting that names it, for messages: "TUNESERVE_MODELS=sentiment:latest"
    directory: Path | None = None
    tag: str | None = None  # a BentoML store tag
    name: str | None = None  # NAME= in TUNESERVE_MODELS

    def located(self, directory: Path) -> Source:
        return Source(self.given, directory, self.tag, self.name)


def sources(settings: Settings) -> list[Source]:
    """The models the settings name, in order, their store tags not yet looked up.

    Raises:
        ConfigError: TUNESERVE_MODELS is set beside TUNESERVE_ARTIFACT, is empty, or names a directory that does not
            exist or holds no artifact.
    """
    if settings.models is None:
        if settings.artifact is not None:
            return [Source(f"TUNESERVE_ARTIFACT={settings.artifact}", directory=Path(settings.artifact))]
        return [Source(f"TUNESERVE_MODEL={settings.model}", tag=settings.model)]
    if settings.artifact is not None:
        raise ConfigError(f"{MODELS_VARIABLE} and TUNESERVE_ARTIFACT are both set: put the artifact in the list "
                          f"({MODELS_VARIABLE}=A,B,...) and unset TUNESERVE_ARTIFACT")
    entries = [entry.strip() for entry in settings.models.split(",") if entry.strip()]
    if not entries:
        raise ConfigError(f"{MODELS_VARIABLE}: no model named; give store tags or artifact directories, "
                          "separated by commas")
    found = [source for entry in entries for source in sources_of(entry, f"{MODELS_VARIABLE}: {entry}")]
    if len(found) > settings.max_models:
        raise ConfigError(f"{MODELS_VARIABLE}: names {len(found)} models, over TUNESERVE_MAX_MODELS={settings.max_models} "
                          "(each costs memory: BENCHMARKS.md, model sets); raise the limit or serve fewer")
    return found


def sources_of(entry: str, given: str, *, many: bool = True) -> list[Source]:
    """The models one entry names: ``[NAME=]DIRECTORY``, ``[NAME=]TAG``, or a directory of artifacts (``many``).

    Raises:
        ConfigError: the directory does not exist or holds no artifact, or NAME= names a directory of artifacts.
    """
    name, _, value = entry.partition("=") if "=" in entry else ("", "", entry)
    name, value = name.strip() or None, value.strip()
    path = Path(value)
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        return [Source(given, directory=path, name=name)]
    if path.is_dir():
        inside = sorted(p for p in path.iterdir() if (p / MANIFEST_FILE).is_file())
        if not inside or not many:
            raise ConfigError(f"{given}: {value} is a directory with no artifact in it (no {MANIFEST_FILE}"
                              f"{' there or in its sub-directories' if many else ''})")
        if name:
            raise ConfigError(f"{given}: {value} holds {len(inside)} artifacts; NAME= names one model, so give "
                              "each its own entry")
        return [Source(f"{given}/{p.name}", directory=p) for p in inside]
    if "/" in value or value.startswith("."):  # a path, not a tag
        raise ConfigError(f"{given}: no such directory")
    return [Source(given, tag=value, name=name)]


@dataclass
class ServedModel:
    """One model the service answers for: its artifact, its backend, and what scores or writes with it."""

    name: str
    tag: str  # what answers report as "model": the store tag, or NAME:local for a directory
    directory: Path
    manifest: Manifest
    backend: Any
    engine: Any  # service.scorer.Scorer or service.writer.Writer
    startup_seconds: float

    @property
    def spec(self):
        return self.manifest.task.spec

    def close(self) -> None:
        """Give back what it holds in shared structures (its adapter in a shared base)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def summary(self) -> dict:
        """What GET /models says of it: the task, the labels, the test metric beside the best baseline, the backend
        and the base model."""
        m = self.manifest
        verdict = baseline_verdict(m)
        return {
            "name": self.name, "model": self.tag, "task": m.task.value, "labels": m.labels,
            "primary_metric": m.primary_metric, "test": m.metrics.get("test", {}).get(m.primary_metric),
            "best_baseline": ({"name": verdict.baseline, "value": verdict.baseline_value, "beaten": verdict.beats}
                              if verdict else None),
            "backend": self.backend.name, "base_model": m.base_model, "method": m.method,
            # the identity of the base graph it shares with the other models that name the same one
            "shared_base": self.backend.shared.base[:16] if hasattr(self.backend, "shared") else None,
            "note": None if hasattr(self.backend, "shared") else self._own_graph_note(),
        }

    def _own_graph_note(self) -> str | None:
        """Why a model of a set runs its own graph rather than a shared base's (None: it never could share one)."""
        export = self.manifest.export
        shared = export.shared_base if export else None
        if shared and shared.get("kept"):
            return "served as its own graph: no other model served here shares its base"
        if shared and shared.get("reason"):
            return f"served as its own graph: it cannot share a base ({shared['reason']})"
        return None


def model_name(source: Source, manifest: Manifest) -> str:
    """The name a request uses: the one given, the config's, or the directory's (the tag's)."""
    if source.name:
        return source.name
    if manifest.name:
        return manifest.name
    return source.tag.partition(":")[0] if source.tag else source.directory.name


def load_model(source: Source, settings: Settings, build: Callable[[Path, Manifest], tuple[Any, Any]]) -> ServedModel:
    """Read a located source's manifest and build its backend and engine (``build``, which self-tests it)."""
    started = time.perf_counter()
    manifest = read_manifest(source.directory)
    name = model_name(source, manifest)
    backend, engine = build(source.directory, manifest)
    tag = source.tag or f"{name}:local"
    return ServedModel(name, tag, source.directory, manifest, backend, engine, time.perf_counter() - started)


@dataclass
class ModelSet:
    """The served models by name, in the order the settings gave them (then in the order added). Adding and
    removing replace the mapping whole, so a request that has its model keeps it."""

    models: dict[str, ServedModel] = field(default_factory=dict)
    loading: set[str] = field(default_factory=set)  # names being added

    @classmethod
    def of(cls, served: list[ServedModel]) -> ModelSet:
        """Raises:
            ArtifactError: two models share a name."""
        models: dict[str, ServedModel] = {}
        for model in served:
            if model.name in models:
                raise ArtifactError(f"two models are named {model.name!r} ({models[model.name].directory} and "
                                    f"{model.directory}): give one another name in its config, or NAME=SOURCE in "
                                    f"{MODELS_VARIABLE}")
            models[model.name] = model
        return cls(models)

    @property
    def names(self) -> list[str]:
        return list(self.models)

    @property
    def first(self) -> ServedModel:
        return next(iter(self.models.values()))

    def get(self, name: str | None) -> ServedModel:
        """The model a request names (None: the only one served).

        Raises:
            UnknownModel: no model of that name is served.
            RequestError: no name given while several models are served.
        """
        if name is None:
            if len(self.models) == 1:
                return self.first
            raise RequestError(f"model: this service serves {len(self.models)} models ({', '.join(self.models)}); "
                               "name one in the request's \"model\" field")
        model = self.models.get(name)
        if model is None and name in self.loading:
            raise ModelLoading(f"model: {name!r} is being added; try again in a few seconds")
        if model is None:
            raise UnknownModel(f"model: no model named {name!r} is served here; served: {', '.join(self.models)} "
                               "(GET /models lists them)")
        return model

    def add(self, model: ServedModel) -> None:
        """Raises:
            ArtifactError: a model of that name is served."""
        if model.name in self.models:
            raise ArtifactError(f"model: {model.name!r} is served already; remove it first (DELETE /models/{model.name})")
        self.models = {**self.models, model.name: model}

    def remove(self, name: str) -> ServedModel:
        """Raises:
            UnknownModel: no model of that name is served."""
        model = self.get(name)
        self.models = {k: v for k, v in self.models.items() if k != name}
        return model

    def __len__(self) -> int:
        return len(self.models)

    def __iter__(self):
        return iter(self.models.values())
