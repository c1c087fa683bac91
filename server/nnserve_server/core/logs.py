"""Log output: text for terminals, or one JSON object per line for log collectors.

Every line written while a request is being served carries that request's id (the caller's
`x-request-id`, or one the server made); access-log lines add their fields (model, RPC, status,
durations) as keys.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from nnserve_server.core.request_record import CURRENT
from nnserve_server.settings import LOG_FORMATS

JSON = LOG_FORMATS[1]  # one object per line; the other, text, for terminals

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        current = CURRENT.get()
        record.request_id = current.request_id if current is not None else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            line["request_id"] = request_id
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items() if key != "rpc")
        elif getattr(record, "request_id", ""):
            text += f" request_id={getattr(record, 'request_id', '')}"
        return text


def configure(level: str, log_format: str) -> None:
    """Replace the root logger's handlers with one on stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == JSON else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def announce(text: str, log_format: str) -> None:
    """A line for the person (or supervisor) watching stdout: the start-up banner. In json mode it is a
    JSON log object like every other line, so a collector reading the terminal sees one format."""
    if log_format == JSON:
        record = logging.LogRecord("nnserve", logging.INFO, __file__, 0, text, None, None)
        text = JsonFormatter().format(record)
    print(text, flush=True)
