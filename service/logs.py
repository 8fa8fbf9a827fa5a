"""Server log hygiene: a request refused for its body is one line in the log, not a traceback.

BentoML 1.4 logs every request that fails its pydantic validation (HTTP 400) as an error with the full
traceback, about 20 lines each: a client sending bad JSON in a loop would bury the errors that matter. A client
error is the client's, and the response already names the field; the log keeps one INFO line saying so.
"""

from __future__ import annotations

import logging

# The logger and message with which BentoML reports an exception raised while answering a request.
BENTOML_REQUEST_LOGGER = "bentoml._internal.server.http_app"
_MESSAGE = "Exception on %s [%s]"


class ClientErrorsWithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _MESSAGE or not record.exc_info or record.exc_info[1] is None:
            return True
        exc = record.exc_info[1]
        if not _is_client_error(exc):
            return True
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        record.msg = "Refused %s [%s] (HTTP 400): %s"
        record.args = (*(record.args or ()), first[:300])
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _is_client_error(exc: BaseException) -> bool:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    return isinstance(exc, BentoMLException) and 400 <= int(exc.error_code) < 500


def quiet_client_errors() -> None:
    """Install the filter on BentoML's request logger (once)."""
    logger = logging.getLogger(BENTOML_REQUEST_LOGGER)
    if not any(isinstance(f, ClientErrorsWithoutTraceback) for f in logger.filters):
        logger.addFilter(ClientErrorsWithoutTraceback())
