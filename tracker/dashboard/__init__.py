"""The operator's dashboard: server-rendered pages at /ui to look at tasks and replay webhooks."""

from __future__ import annotations

from tracker.dashboard.web import Dashboard as Dashboard
from tracker.dashboard.web import mount as mount
