"""Structured JSON logs: one event per line on stderr, with the request's correlation id."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

import structlog


def _json_fallback(value: object) -> Any:
    """What structlog's own JSON renderer does with a value JSON cannot hold."""
    try:
        return value.__structlog__()  # type: ignore[attr-defined]
    except AttributeError:
        return repr(value)


# One encoder for every line: `json.dumps` with options builds a new encoder per call. Same
# output as `JSONRenderer(sort_keys=True)`.
_ENCODE = json.JSONEncoder(sort_keys=True, default=_json_fallback).encode


def _serialize(event_dict: Any, **_: Any) -> str:
    return _ENCODE(event_dict)


_second: tuple[int, str] = (-1, "")


def _timestamp(_logger: Any, _name: str, event_dict: Any) -> Any:
    """`timestamp` as `TimeStamper(fmt="iso", utc=True)` writes it (`…T23:54:32.123456Z`,
    no fraction on a whole second), formatting the date and time only once a second."""
    global _second
    micros = time.time_ns() // 1000
    seconds, fraction = divmod(micros, 1_000_000)
    cached_second, prefix = _second
    if seconds != cached_second:
        prefix = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (seconds, prefix)
    event_dict["timestamp"] = f"{prefix}.{fraction:06d}Z" if fraction else f"{prefix}Z"
    return event_dict


# What `configure_logging` installed: (processors, wrapper class, logger factory, level,
# and the processors as a tuple: `capture_logs` edits the list in place).
_installed: tuple[Any, Any, Any, int, tuple[Any, ...]] | None = None


def configure_logging(level: str = "info") -> None:
    """Route structlog and stdlib logging to one JSON stream. Safe to call more than once."""
    global _installed
    numeric = getattr(logging, level.upper(), logging.INFO)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(serializer=_serialize),
    ]
    wrapper_class = structlog.make_filtering_bound_logger(numeric)
    # One write (line and newline together) and a flush per event, like PrintLogger's
    # output, with less work per line.
    logger_factory = structlog.WriteLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper_class,
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )
    _installed = (processors, wrapper_class, logger_factory, numeric, tuple(processors))
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)
    # aiohttp's access log prints full URLs (query strings can hold codes); ours does not.
    logging.getLogger("aiohttp.access").disabled = True


class PreboundLogger:
    """A structlog logger for a hot path, assembled once per logging configuration.

    `structlog.get_logger()` returns a lazy proxy that assembles a new bound logger on every
    call (~10 µs). `get()` returns one assembled logger and assembles it again whenever
    `structlog.configure` has installed other processors, another wrapper class or logger
    factory (`configure_logging`, or a test's `structlog.testing.capture_logs`), so it logs
    exactly what the proxy would.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._key: tuple[Any, ...] = ()
        self._logger: Any = None
        self._writer: Any = None  # set while configure_logging's setup is the one in force
        self._level = logging.INFO
        self._processors: tuple[Any, ...] = ()

    def get(self) -> Any:
        config = structlog.get_config()
        key = (config["processors"], config["wrapper_class"], config["logger_factory"])
        cached = self._key
        if (
            self._logger is None
            or cached[0] is not key[0]
            or cached[1] is not key[1]
            or cached[2] is not key[2]
        ):
            self._logger = structlog.get_logger(self._name).bind()
            self._key = key
            ours = _installed
            if ours is not None and all(a is b for a, b in zip(key, ours[:3], strict=True)):
                self._writer, self._level, self._processors = key[2](), ours[3], ours[4]
            else:
                self._writer = None
        return self._logger

    def info(self, event: str, **fields: Any) -> None:
        """`get().info(event, **fields)`. Under `configure_logging`'s setup the line is
        rendered here, by the same processors in the same order (minus `format_exc_info`,
        which only acts on `exc_info`), without structlog's generic per-call dispatch."""
        logger = self.get()
        if (
            self._writer is None
            or "exc_info" in fields
            or tuple(self._key[0]) != self._processors  # edited in place since
        ):
            logger.info(event, **fields)
            return
        if self._level > logging.INFO:
            return
        event_dict: dict[str, Any] = {**fields, "event": event}
        structlog.contextvars.merge_contextvars(None, "info", event_dict)
        event_dict["level"] = "info"
        _timestamp(None, "info", event_dict)
        self._writer.msg(_ENCODE(event_dict))
