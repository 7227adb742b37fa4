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


_FILTER = RequestIdFilter()


def install_request_id_logging() -> None:
    """Attach the filter to every handler of the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    logging.getLogger("graft").setLevel(logging.INFO)
