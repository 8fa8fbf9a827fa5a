"""Errors a user can act on. The command line prints their message without a traceback."""


class TuneserveError(Exception):
    """Base class: the message says what was wrong, where, and what is accepted."""


class ConfigError(TuneserveError):
    """The run configuration is invalid."""


class DataError(TuneserveError):
    """Input data is unreadable or inconsistent (names file, row and column)."""


class ArtifactError(TuneserveError):
    """An artifact directory is missing files or does not describe itself correctly."""


class TrainingError(TuneserveError):
    """Training could not go on (for example a non-finite loss)."""
