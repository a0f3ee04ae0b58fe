"""Structured logging for every Railtower process (JSON off a terminal, readable on one)."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "INFO", json: bool | None = None) -> None:
    """Route stdlib and structlog records through one structlog pipeline.

    Args:
        level: minimum level name.
        json: force JSON lines; by default JSON when stderr is not a terminal (CI, services).
    """
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=level, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    # Third-party chatter (matplotlib's unit notes, http clients) stays out of job logs.
    for noisy in ("matplotlib", "PIL", "urllib3", "httpx", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _CurrentStderr:
    """Writes to whatever sys.stderr is now (test runners swap it), not the one at setup."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
