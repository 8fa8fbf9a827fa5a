"""Start-up checks: a mistake in the service's settings or its model ends the server at once, with one line.

``bentoml serve`` imports the service module in its own process before it starts any worker, so
:func:`checked_settings`, called at import, runs there first: it reads the ``TUNESERVE_*`` variables, finds the
model (an artifact directory or a store tag), reads its manifest and checks that the files the chosen backend
needs are there, all without loading a model. Any failure prints one line naming the variable and what it
accepts, and exits with status 2: no traceback, no worker restarted every few seconds, no port left closed
while the process lives on. A worker that fails later, while loading the model or in its self-test (a corrupt
file, outputs that differ from those recorded at export), stops the server the same way (:func:`stop_server`).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from core.errors import ArtifactError, ConfigError
from service.models import Source, sources
from service.settings import DEFAULT_MODEL, Settings, load_settings

EXIT_STATUS = 2  # a usage error, as argparse and click use it
# Set in the serving process for its workers: the file a failing worker leaves its one line in.
FAILURE_FILE = "TUNESERVE_STARTUP_FAILURE_FILE"


def fail(message: str) -> NoReturn:
    """Print the one line and exit."""
    print(f"tuneserve: cannot start: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_STATUS)


def model_directory(source: Source) -> Path:
    """A served model's directory: the artifact directory, or the store model's.

    Raises:
        ArtifactError: the store has no such model, naming the ways to get one.
    """
    import bentoml

    if source.directory is not None:
        return source.directory
    try:
        stored = bentoml.models.get(source.tag)
    except (bentoml.exceptions.BentoMLException, ValueError) as exc:
        if source.given == f"TUNESERVE_MODEL={DEFAULT_MODEL}":
            raise ArtifactError(
                f"no model to serve: TUNESERVE_MODEL defaults to {DEFAULT_MODEL}, which is not in the BentoML store. "
                "Train and register the demo model with `make demo`, register your own with `tuneserve register "
                "ARTIFACT`, or serve an artifact directory with TUNESERVE_ARTIFACT=DIR") from None
        raise ArtifactError(f"{source.given}: not in the BentoML store ({str(exc).splitlines()[0]}); "
                            "`bentoml models list` shows what is, `tuneserve register ARTIFACT` adds one, or set "
                            "TUNESERVE_ARTIFACT=DIR") from None
    return Path(stored.path)


def serving_process() -> bool:
    """Whether this is the process ``bentoml serve`` runs in (not a worker, not a build, not a test importing the
    service)."""
    program = Path(sys.argv[0])
    return len(sys.argv) > 1 and sys.argv[1] == "serve" and "bentoml" in (program.name, program.parent.name)


def worker_of_server() -> bool:
    """Whether this is a worker of a server that :func:`watch_workers` watches."""
    return bool(os.environ.get(FAILURE_FILE)) and not serving_process()


def checked_settings() -> Settings:
    """The settings; in the serving process, with the model they name found and its files checked, and on any
    mistake one line and exit 2 (elsewhere a mistake raises, as :func:`load_settings` does)."""
    from core.manifest import read_manifest
    from service.backends import check_backend

    if not serving_process():
        return load_settings()
    try:
        settings = load_settings()
        for source in sources(settings):
            directory = model_directory(source)
            try:
                manifest = read_manifest(directory)
                check_backend(directory, manifest, backend=settings.backend)
            except ArtifactError as exc:
                # the artifact's errors start with its directory: name the setting that gave it instead
                raise ArtifactError(f"{source.given}: {str(exc).removeprefix(f'{directory}: ')}") from None
    except (ConfigError, ArtifactError) as exc:
        fail(str(exc))
    return settings


def stop_server(message: str) -> NoReturn:
    """End the whole server from a worker that cannot serve (:func:`worker_of_server`): print the line, leave it
    for the serving process, which then exits with status 2 (:func:`watch_workers`), and stop that process instead
    of letting it start this worker again."""
    Path(os.environ[FAILURE_FILE]).write_text(message + "\n")
    print(f"tuneserve: cannot start: {message}", file=sys.stderr, flush=True)
    os.kill(os.getppid(), signal.SIGTERM)
    os._exit(EXIT_STATUS)


def watch_workers() -> None:
    """In the serving process (elsewhere nothing): give workers a file to leave a start-up failure in, and at exit, where one did,
    print it and exit with status 2 instead of 0."""
    import atexit
    import tempfile

    if not serving_process():
        return
    handle, path = tempfile.mkstemp(prefix="tuneserve-startup-")
    os.close(handle)
    os.environ[FAILURE_FILE] = path
    serving = os.getpid()

    def report() -> None:
        if os.getpid() != serving:
            return
        message = Path(path).read_text().strip() if Path(path).exists() else ""
        Path(path).unlink(missing_ok=True)
        if message:
            sys.stderr.flush()
            os._exit(EXIT_STATUS)

    atexit.register(report)
