"""Logging: one JSON object per line (default), or plain text for people at a terminal.

`setup_logging(settings)` configures the root logger once per process; uvicorn's loggers go through the same
handler (its own log config is switched off by `loop serve`). Extra fields passed with `extra={...}` end up in
the JSON object. `open_private_log(path)` opens the log files loop's children write (vLLM's, the worker's)
private to us: they can hold prompts and answers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from loop.config import Settings, tighten

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # httpx logs every request at INFO: that is the proxy's hot path.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def open_private_log(path: Path) -> BinaryIO:
    """Open `path` for appending as a 0600 file in a 0700 folder (an existing, more open one is tightened)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tighten(path.parent, 0o700)
    log_file = open(path, "ab", opener=lambda name, flags: os.open(name, flags, 0o600))  # noqa: SIM115 - returned
    tighten(path, 0o600)
    return log_file
