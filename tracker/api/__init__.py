"""The HTTP API: FastAPI routers over the store, with auth and strict JSON at the edge.

``build`` assembles it; ``views`` is the one place a stored record becomes public JSON.
"""

from __future__ import annotations

from tracker.api.application import build
from tracker.api.state import ApiState
from tracker.api.tasks import validate_registration
from tracker.api.views import delivery_json, task_json

__all__ = ["ApiState", "build", "delivery_json", "task_json", "validate_registration"]
