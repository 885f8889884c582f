"""Polling: the engine that wakes when work is due, and the drain that does the work."""

from __future__ import annotations

from tracker.poller.drain import Poller as Poller
from tracker.poller.engine import PollEngine as PollEngine
from tracker.poller.plan import NOT_FOUND_REASON as NOT_FOUND_REASON
from tracker.poller.report import CycleReport as CycleReport
