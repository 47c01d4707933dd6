"""The server's one logging configuration: one format on stderr, the `headroom.*` tree at the
configured level, uvicorn's loggers routed through the same handler (uvicorn is given no config
of its own), and the libraries that log per request or draw progress bars kept quiet.

Applied once by `proxy.server.serve`; a library user's own logging setup is never touched.
"""

from __future__ import annotations

import logging
import logging.config
import os
import sys
from typing import Any

__all__ = ["LOG_FORMAT", "configure_logging", "logging_config"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# httpx logs one INFO line per upstream request (the access log already has one per client
# request); sentence-transformers draws a tqdm bar per encode while its logger allows INFO.
_QUIET = ("httpx", "httpcore", "sentence_transformers", "transformers", "huggingface_hub",
          "onnxruntime", "filelock", "urllib3")


def logging_config(level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` document. Only our tree and uvicorn's follow `level`;
    everything else says warnings and errors only."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"format": LOG_FORMAT}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "default",
                       "stream": "ext://sys.stderr"},
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "headroom": {"level": level},
            # uvicorn's own handlers would print a second format; theirs propagate to ours.
            **{name: {"level": level, "handlers": [], "propagate": True}
               for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
            **{name: {"level": "WARNING"} for name in _QUIET},
        },
    }


def configure_logging(level: str) -> None:
    quiet_progress_bars()
    logging.config.dictConfig(logging_config(level))


def quiet_progress_bars() -> None:
    """No tqdm bars in server logs. The variables cover libraries not imported yet (tqdm reads
    TQDM_* once, at import); the calls cover those already imported."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
