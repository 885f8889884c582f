"""What each delivery attempt leaves for operators: one log line and the delivery metrics."""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from tracker.activity import Series
from tracker.metrics import Metrics
from tracker.retry import DeliveryState
from tracker.sanitize import without_userinfo
from tracker.store.records import AttemptResult

log = structlog.get_logger("tracker.delivery")

#: the tracker_deliveries outcome label of an attempt that left its delivery in each state: a
#: failed attempt with retries left reads "retry" to an operator, though the delivery is pending
OUTCOME_LABELS: Mapping[DeliveryState, str] = {
    DeliveryState.DELIVERED: "delivered",
    DeliveryState.PENDING: "retry",
    DeliveryState.DEAD: "dead",
}


class Journal:
    """Logs and counts attempts once they are recorded in the store."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._outcomes = {
            state: metrics.deliveries.labels(label) for state, label in OUTCOME_LABELS.items()
        }

    def attempted(self, result: AttemptResult) -> None:
        """One line per attempt: delivered at info (operators follow deliveries one by one in
        the journal), a retry at warning, a dead delivery at error.
        """
        job = result.job
        self._outcomes[result.state].inc()
        self._metrics.activity.count(Series.WEBHOOKS)
        self._metrics.delivery_latency.observe(result.latency_ms / 1000)
        fields = {
            "webhook_id": job.webhook_id,
            "event_type": job.event_type,
            "platform": job.platform,
            "task_id": job.task_id,
            # A task's own URL may carry a receiver's password, which no redactor knows.
            "url": without_userinfo(job.url),
            "attempt": job.attempts + 1,
            "status_code": result.status_code,
            "latency_ms": result.latency_ms,
        }
        if result.state == DeliveryState.DELIVERED:
            log.info("webhook_delivered", **fields)
        elif result.state == DeliveryState.DEAD:
            log.error("webhook_dead", error=result.error, **fields)
        else:
            retry_at = result.next_attempt_at
            log.warning(
                "webhook_retry",
                error=result.error,
                retry_in=None if retry_at is None else round(retry_at - result.at.timestamp(), 3),
                **fields,
            )
