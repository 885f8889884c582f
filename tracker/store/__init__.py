"""Persistence: SQLModel tables and the one SQL store behind them (SQLite or PostgreSQL)."""

from __future__ import annotations

from tracker.store.records import (
    AttemptResult as AttemptResult,
)
from tracker.store.records import (
    DeliveryJob as DeliveryJob,
)
from tracker.store.records import (
    DueTask as DueTask,
)
from tracker.store.records import (
    OutboxEntry as OutboxEntry,
)
from tracker.store.records import (
    Registration as Registration,
)
from tracker.store.records import (
    Replan as Replan,
)
from tracker.store.records import (
    TaskUpdate as TaskUpdate,
)
from tracker.store.sql import SchemaMismatchError as SchemaMismatchError
from tracker.store.sql import SqlStore as SqlStore
