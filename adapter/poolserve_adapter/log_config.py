"""The console of the adapter and of the stack around it: uvicorn's logging, with every line of ours
(the adapter's models and draining, the stack's start-up and supervision, other libraries' warnings)
on the same handlers in the same format, and without the lines that only repeat: the healthy probes
compose and Kubernetes send every few seconds (a probe that fails is still logged) and httpx's line
for each Triton metrics fetch of a ``/metrics`` scrape.

Two formats (``--log-format``, ``ADAPTER_LOG_FORMAT``): ``text``, uvicorn's own (``INFO:     ...``),
and ``json``, one JSON object per line with ``time``, ``level``, ``logger`` and ``message`` (and
``exception`` when one is logged), for log collectors.
"""

from __future__ import annotations

import copy
import json
import logging
import logging.config
from datetime import datetime, timezone

PROBE_PATHS = ("/health", "/ping")
LOG_FORMATS = ("text", "json")
# The loggers of this project's own lines: the adapter's, and the stack's (poolserve serve / triton).
OWN_LOGGERS = ("poolserve_adapter", "poolserve_stack")


class QuietHealthyProbes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        """uvicorn's access records carry (client, method, path, http version, status) as args."""
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) == 5 and args[2] in PROBE_PATHS and args[4] == 200)


class JsonLines(logging.Formatter):
    """One JSON object per record, on one line (a message's own newlines are escaped in it)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def uvicorn_log_config(log_format: str = "text") -> dict:
    """uvicorn's logging config with this project's loggers, filters and ``log_format`` (a LOG_FORMATS name)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    import uvicorn  # here: the stack's --help reads LOG_FORMATS without the server

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for name in OWN_LOGGERS:
        config["loggers"][name] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    # Everyone else's warnings, in the same format; httpx logs each request at INFO (one per /metrics scrape).
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    config["loggers"]["httpx"] = {"level": "WARNING"}
    if log_format == "json":
        # By import path, as the filter below: with several workers the config is pickled to each of them.
        config["formatters"] = {name: {"()": "poolserve_adapter.log_config.JsonLines"} for name in ("default", "access")}
    config.setdefault("filters", {})["healthy_probes"] = {"()": "poolserve_adapter.log_config.QuietHealthyProbes"}
    config["handlers"]["access"]["filters"] = ["healthy_probes"]
    return config


def configure_logging(log_format: str = "text") -> None:
    """This process's logging as :func:`uvicorn_log_config` says (the stack's, before uvicorn starts)."""
    logging.config.dictConfig(uvicorn_log_config(log_format))
