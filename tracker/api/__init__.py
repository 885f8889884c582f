"""The HTTP API: FastAPI routers over the store, with auth and strict JSON at the edge.

``build`` assembles it; ``views`` is the one place a stored record becomes public JSON.
"""

from __future__ import annotations

from tracker.api.application import build
from tracker.api.serving import (
    ACCEPT_BACKLOG,
    API_THREADS,
    KEEP_ALIVE_TIMEOUT,
    bounded_protocol,
    connection_cap,
)
from tracker.api.state import ApiState
from tracker.api.tasks import validate_registration
from tracker.api.views import delivery_json, task_json

__all__ = [
    "ACCEPT_BACKLOG",
    "API_THREADS",
    "KEEP_ALIVE_TIMEOUT",
    "ApiState",
    "bounded_protocol",
    "build",
    "connection_cap",
    "delivery_json",
    "task_json",
    "validate_registration",
]
