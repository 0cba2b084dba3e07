"""The adapter's console: uvicorn's logging, with the adapter's own INFO lines (the models it
serves, draining) on the same handler, and without the healthy probes compose and Kubernetes send
every few seconds (a probe that fails is still logged)."""

from __future__ import annotations

import copy
import logging

import uvicorn

PROBE_PATHS = ("/health", "/ping")


class QuietHealthyProbes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        """uvicorn's access records carry (client, method, path, http version, status) as args."""
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) == 5 and args[2] in PROBE_PATHS and args[4] == 200)


def uvicorn_log_config() -> dict:
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["poolserve_adapter"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    # By import path: with several workers the config is pickled to each of them.
    config.setdefault("filters", {})["healthy_probes"] = {"()": "poolserve_adapter.log_config.QuietHealthyProbes"}
    config["handlers"]["access"]["filters"] = ["healthy_probes"]
    return config
