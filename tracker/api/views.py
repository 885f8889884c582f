"""The one place a stored record becomes the JSON the API (and the CLI) shows."""

from __future__ import annotations

from typing import Any

from tracker.api import models
from tracker.store.records import DeliveryRecord, TaskRecord


def task_json(task: TaskRecord, *, with_history: bool = True) -> dict[str, Any]:
    """A task as the API shows it; listings leave the history out."""
    model = models.TaskOut if with_history else models.TaskSummaryOut
    return model.model_validate(task).model_dump(mode="json", by_alias=True)


def delivery_json(delivery: DeliveryRecord) -> dict[str, Any]:
    """A delivery and its attempt log as the API shows it."""
    return models.DeliveryOut.model_validate(delivery).model_dump(mode="json", by_alias=True)
