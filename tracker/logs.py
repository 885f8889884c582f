"""structlog configuration: JSON lines for journald/pipes, a readable console on a TTY."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from tracker import sanitize

__all__ = ["REDACTED", "configure", "get_level", "reset", "set_level"]

REDACTED = "[redacted]"

LogFormat = Literal["auto", "json", "console"]
_Renderer = Callable[[WrappedLogger, str, EventDict], str | bytes]

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}

# syslog priorities (sd-daemon(3)); journald's SyslogLevelPrefix= strips "<N>" and files the line
# at that priority, so `journalctl -p err` works on JSON lines too.
_SYSLOG_PRIORITY: dict[str, int] = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "error": 3,
    "critical": 2,
}

# stdlib loggers (uvicorn, apscheduler, httpx) are chatty at INFO; only their problems matter.
_STDLIB_FLOOR = logging.WARNING

#: lines one warning-or-worse event may write in a burst before it is rate limited
LOG_BURST = 50
#: lines per second one warning-or-worse event may write once its burst is spent
LOG_RATE = 5.0
#: events whose rate is tracked at once; beyond, the quietest are forgotten
_MAX_TRACKED_EVENTS = 1024


class _RateLimiter:
    """A token bucket per event: a flood of one warning cannot fill the journal.

    Info and debug lines are not limited: they count work done (one per cycle, one per
    delivery) and are bounded by it. A line let through after others were dropped says how
    many (`suppressed`).
    """

    def __init__(
        self,
        burst: int = LOG_BURST,
        rate: float = LOG_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = burst
        self._rate = rate
        self._clock = clock
        self._lock = threading.Lock()
        #: event -> (tokens, when they were counted, lines dropped since the last one written)
        self._buckets: dict[str, tuple[float, float, int]] = {}

    def take(self, key: str) -> int | None:
        """None when this line is to be dropped, else how many were dropped before it."""
        now = self._clock()
        with self._lock:
            tokens, then, dropped = self._buckets.get(key, (float(self._burst), now, 0))
            tokens = min(float(self._burst), tokens + (now - then) * self._rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now, dropped + 1)
                return None
            if key not in self._buckets and len(self._buckets) >= _MAX_TRACKED_EVENTS:
                self._buckets.clear()
            self._buckets[key] = (tokens - 1.0, now, 0)
            return dropped

    def __call__(
        self, _logger: WrappedLogger, method_name: str, event_dict: EventDict
    ) -> EventDict:
        """The structlog processor."""
        if _LEVELS.get(method_name, logging.INFO) < logging.WARNING:
            return event_dict
        dropped = self.take(str(event_dict.get("event")))
        if dropped is None:
            raise structlog.DropEvent
        if dropped:
            event_dict["suppressed"] = dropped
        return event_dict


class _StdlibRateFilter(logging.Filter):
    """The same limit for stdlib records (uvicorn's complaints about bad connections)."""

    def __init__(self, limiter: _RateLimiter) -> None:
        super().__init__()
        self._limiter = limiter

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether the record is written."""
        dropped = self._limiter.take(f"{record.name}:{record.msg}")
        if dropped is None:
            return False
        if dropped:
            record.msg = f"{record.msg} ({dropped} similar lines suppressed)"
        return True


class _State:
    """Mutable settings read on every log call, so set_level works on already-bound loggers."""

    level: int = logging.INFO
    handler: logging.Handler | None = None
    limiter: _RateLimiter = _RateLimiter()
    # The root logger's level before the first configure(), for reset().
    saved_root_level: int | None = None


_state = _State()


def _parse_level(level: str) -> int:
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of debug, info, warning, error, critical"
        ) from None


def _filter_by_level(_logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # Runs first so dropped events cost one dict lookup; reads _state on every call, which is
    # what lets a reload lower or raise the level for loggers bound before it.
    if _LEVELS.get(method_name, logging.INFO) < _state.level:
        raise structlog.DropEvent
    return event_dict


class _Redactor:
    """Replaces every occurrence of each secret inside string values (nested too)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        return {key: self._clean(value) for key, value in event_dict.items()}

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            # A cut-off start of a secret counts too (sanitize.redact).
            return sanitize.redact(value, self._secrets)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {key: self._clean(item) for key, item in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._clean(item) for item in value]
        # The renderers would repr() other objects (exceptions) after redaction had run; do it
        # here, as they would, so an error message that echoes a key is caught as well.
        return self._clean(repr(value))


class _SyslogPrefixed:
    """Wraps a renderer and prefixes each line with its syslog priority, '<3>' for errors."""

    def __init__(self, renderer: _Renderer) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        priority = _SYSLOG_PRIORITY.get(str(event_dict.get("level", "")), 6)
        line = self._renderer(logger, name, event_dict)
        if isinstance(line, bytes):
            line = line.decode()
        return f"<{priority}>{line}"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _under_systemd(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))


def _connected_to_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when JOURNAL_STREAM is set and (if checkable) names this very stream."""
    journal_stream = environ.get("JOURNAL_STREAM", "")
    if not journal_stream:
        return False
    try:
        device, inode = (int(part) for part in journal_stream.split(":", 1))
    except ValueError:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        # An in-memory stream (tests, wrappers) cannot be checked: trust the environment.
        return True
    # sd_journal_stream_fd(3): a redirected stdout inherits JOURNAL_STREAM but not the socket.
    return (stat.st_dev, stat.st_ino) == (device, inode)


def configure(
    *,
    level: str = "info",
    fmt: LogFormat = "auto",
    stream: TextIO | None = None,
    environ: Mapping[str, str] = os.environ,
    secrets: Sequence[str] = (),
) -> None:
    """Configure structlog and the stdlib root logger to write to `stream` (default stdout).

    Safe to call again (e.g. on reload); the previous stdlib handler is replaced, not stacked.
    """
    numeric_level = _parse_level(level)
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; expected auto, json or console")
    out = sys.stdout if stream is None else stream
    tty = _is_tty(out)
    use_json = fmt == "json" or (fmt == "auto" and (not tty or _under_systemd(environ)))

    renderer: _Renderer
    if use_json:
        renderer = structlog.processors.JSONRenderer(serializer=json.dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=tty)
    if _connected_to_journal(out, environ):
        renderer = _SyslogPrefixed(renderer)

    # Shared by structlog events and foreign (stdlib) records, after each has its event dict.
    shared: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.StackInfoRenderer(),
        # Plain-text tracebacks even on the console: they must pass through the redactor.
        structlog.processors.format_exc_info,
    ]
    if any(secrets):
        shared.append(_Redactor(secrets))

    _state.level = numeric_level
    _state.limiter = _RateLimiter()
    structlog.configure(
        processors=[
            _filter_by_level,
            _state.limiter,
            structlog.contextvars.merge_contextvars,
            *shared,
            renderer,
        ],
        # Level filtering is the _filter_by_level processor, so this wrapper filters nothing: a
        # make_filtering_bound_logger(level) class is fixed per bound logger and a logger bound
        # before a reload would keep the old level.
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        # Caching would freeze the configuration into loggers on first use; reload reconfigures.
        cache_logger_on_first_use=False,
        context_class=dict,
    )
    _route_stdlib(out, shared, renderer)


def _route_stdlib(out: TextIO, shared: list[Processor], renderer: _Renderer) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            *shared,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(_StdlibRateFilter(_state.limiter))
    root = logging.getLogger()
    if _state.saved_root_level is None:
        _state.saved_root_level = root.level
    if _state.handler is not None:
        root.removeHandler(_state.handler)
    root.addHandler(handler)
    _state.handler = handler
    _apply_stdlib_level()


def _apply_stdlib_level() -> None:
    stdlib_level = max(_STDLIB_FLOOR, _state.level)
    logging.getLogger().setLevel(stdlib_level)
    if _state.handler is not None:
        _state.handler.setLevel(stdlib_level)


def set_level(level: str) -> None:
    """Change the level at runtime; applies to loggers already bound, and to stdlib logging."""
    _state.level = _parse_level(level)
    _apply_stdlib_level()


def get_level() -> str:
    """The current level name, e.g. 'info'."""
    return logging.getLevelName(_state.level).lower()


def reset() -> None:
    """Undo configure(): structlog defaults, our root handler removed, root level restored."""
    structlog.reset_defaults()
    root = logging.getLogger()
    if _state.handler is not None:
        root.removeHandler(_state.handler)
        _state.handler = None
    if _state.saved_root_level is not None:
        root.setLevel(_state.saved_root_level)
        _state.saved_root_level = None
    _state.level = logging.INFO
