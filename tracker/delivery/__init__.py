"""Webhook delivery: claim due outbox rows, sign, POST, record every attempt.

``Deliverer`` (deliverer.py) wires the parts: ``sending`` makes one attempt, the limits come
from tracker.limits (``Admission``), ``passes`` runs claims and per-host lanes, ``outbox``
does the store rounds and ``journal`` logs and counts each attempt.
"""

from __future__ import annotations

from tracker.delivery.deliverer import Deliverer

__all__ = ["Deliverer"]
