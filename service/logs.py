"""A request id on every log line written while a request is being handled.

The RequestId middleware sets `current_request_id`; a filter on every root handler appends it
to the message, so BentoML's access line and graft's own lines of one request share it.
Request bodies and headers are never logged.
"""

from __future__ import annotations

import contextvars
import logging

current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("graft_request_id", default="")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = current_request_id.get()
        if rid and not getattr(record, "_graft_rid", False):
            record.msg = f"{record.msg} [request_id={rid}]"
            record._graft_rid = True
        return True


class ClientErrorTraceFilter(logging.Filter):
    """Drop BentoML's "Exception on /bentoml/... [POST]" traceback when the exception is a client's
    bad input (a 4xx that service/bento_api.py raised on purpose): the access log already has the
    line, and a stream of bad requests must not fill the log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and getattr(exc, "error_code", 500) < 500 and record.levelno >= logging.ERROR)


_FILTER = RequestIdFilter()
# The logger of BentoML's API endpoint wrapper (bentoml/_internal/server/http_app.py, log_exception).
BENTOML_API_LOGGER = "bentoml._internal.server.http_app"


def install_request_id_logging() -> None:
    """Attach the filter to every handler of the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    logging.getLogger("graft").setLevel(logging.INFO)
    api_log = logging.getLogger(BENTOML_API_LOGGER)
    if not any(isinstance(f, ClientErrorTraceFilter) for f in api_log.filters):
        api_log.addFilter(ClientErrorTraceFilter())
