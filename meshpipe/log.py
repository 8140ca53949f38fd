"""structlog set-up: one JSON object a line, stable event names, short SID on each line."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(node: str = "", role: str = "", level: str = "info", stream: Any = None) -> None:
    """Configure structlog for one process. ``node`` is the short SID, ``role`` the worker."""
    out = stream if stream is not None else sys.stderr
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=_filtering(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    ctx: dict[str, str] = {}
    if node:
        ctx["node"] = node
    if role:
        ctx["role"] = role
    structlog.contextvars.bind_contextvars(**ctx)


def _filtering(level: str) -> Any:
    return structlog.make_filtering_bound_logger(
        logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    )


def set_level(level: str) -> None:
    """Change the level of a configured process (a reload); the rest stays."""
    structlog.configure(wrapper_class=_filtering(level))


def get(name: str = "meshpipe") -> Any:
    return structlog.get_logger(name)
