"""structlog JSON logging with ``request_id`` on every line.

Standard-library loggers (diffusers, transformers, grpc) go through the same JSON renderer. The request id is
bound per request with ``bind_request`` (a contextvar, so it follows asyncio tasks and ``asyncio.to_thread``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import structlog

NO_REQUEST = "-"


def _ensure_request_id(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    event.setdefault("request_id", NO_REQUEST)
    return event


def setup_logging(service: str, level: str = "info", log_file: str = "") -> None:
    """Configure structlog and the stdlib root logger to write JSON lines (stderr, and ``log_file`` if set)."""
    def add_service(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)
        return event

    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_service,
        _ensure_request_id,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        h.setFormatter(formatter)
        root.addHandler(h)
    root.setLevel(level.upper())
    # third-party chatter stays at warning unless debugging
    for noisy in ("urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    quiet_libraries("debug" if level == "debug" else "error")


def quiet_libraries(level: str = "error") -> None:
    """diffusers/transformers log through our JSON handler (not their own), at ``level``, without progress bars."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()
        lib.disable_default_handler()
        lib.enable_propagation()
        lib.set_verbosity(getattr(logging, level.upper()))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


@contextlib.contextmanager
def bind_request(request_id: str, **fields: Any) -> Iterator[None]:
    """Bind request_id (and fields) to every log line emitted inside the block."""
    tokens = structlog.contextvars.bind_contextvars(request_id=request_id or NO_REQUEST, **fields)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
