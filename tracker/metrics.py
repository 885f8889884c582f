"""Prometheus metrics, on a registry of the daemon's own (several daemons may share a process)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tracker.activity import Activity
from tracker.retry import DeliveryState
from tracker.status import TaskStatus
from tracker.store.records import Stats

log = structlog.get_logger("tracker.metrics")

#: the meta key where the daemons keep how late the most overdue task one of them holds
#: unasked is (`Poller.earliest_held`), when it looked, and which daemon it was: {"lag":
#: seconds, "at": epoch seconds, "by": a token of the writer's}, for `tracker stats` in
#: another process (the latest figure wins unless another daemon's larger one is fresh)
HELD_LAG = "poll_held_lag"
#: how often a daemon writes HELD_LAG while it holds late tasks (seconds) ...
HELD_EVERY = 5.0
#: ... and how long `tracker stats` believes it: a daemon that stopped, or holds nothing late
#: any more, leaves a figure that soon says nothing
HELD_FRESH = 3 * HELD_EVERY


class _StoreCollector(Collector):
    """Figures read from the database at scrape time, so they are right after a restart."""

    def __init__(
        self,
        stats: Callable[[], Stats],
        now: Callable[[], float],
        platforms: Iterable[str],
        held: Callable[[], tuple[float, str] | None],
    ) -> None:
        self._stats = stats
        self._now = now
        self._platforms = frozenset(platforms)
        self._held = held

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Tasks by platform and status, outbox depth, oldest pending delivery age, poll lag."""
        up = GaugeMetricFamily(
            "tracker_database_up", "1 when the database answered this scrape's queries, else 0"
        )
        try:
            stats = self._stats()
        except Exception as exc:  # noqa: BLE001 - a scrape must still show the process figures
            log.warning("metrics_store_unavailable", error=f"{type(exc).__name__}: {exc}")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        tasks = GaugeMetricFamily(
            "tracker_tasks", "Tracked tasks by platform and status", labels=["platform", "status"]
        )
        # Every status of every platform, 0 included: a count that drops to 0 reads 0, not
        # "no data" (a sum over statuses, an alert on queued tasks, would go blank).
        platforms = self._platforms | {platform for platform, _ in stats.tasks}
        for platform in sorted(platforms):
            for task_status in TaskStatus:
                count = stats.tasks.get((platform, task_status.value), 0)
                tasks.add_metric([platform, task_status.value], count)
        yield tasks
        depth = GaugeMetricFamily(
            "tracker_outbox_depth", "Webhook deliveries by state", labels=["state"]
        )
        for state in DeliveryState:
            depth.add_metric([state.value], stats.deliveries.get(state, 0))
        yield depth
        oldest = stats.oldest_pending_delivery
        age = 0.0 if oldest is None else max(0.0, self._now() - oldest.timestamp())
        yield GaugeMetricFamily(
            "tracker_oldest_pending_delivery_age_seconds",
            "Age of the oldest webhook delivery not yet delivered",
            value=age,
        )
        yield GaugeMetricFamily(
            "tracker_poll_lag_seconds",
            "How overdue the most overdue live task's poll is (0 when none is overdue)",
            value=poll_lag(stats, self._now(), self._held()),
        )


def poll_lag(stats: Stats, now: float, held: tuple[float, str] | None = None) -> float:
    """Seconds the most overdue live task's poll is late, 0 when none is: the earliest next
    poll in the store, or the planned time (epoch seconds) of ``held``, the most overdue task
    a daemon holds unasked (`Poller.earliest_held`), if earlier."""
    planned = [] if stats.earliest_poll is None else [stats.earliest_poll.timestamp()]
    if held is not None:
        planned.append(held[0])
    return max(0.0, now - min(planned)) if planned else 0.0


def held_lag_text(lag: float, now: float, by: str) -> str:
    """HELD_LAG's value: ``lag`` seconds, as daemon ``by`` saw it at ``now`` (epoch seconds)."""
    return json.dumps({"lag": round(lag, 3), "at": round(now, 3), "by": by})


def _held_lag(text: str | None, now: float) -> tuple[float, str] | None:
    """The lag in a HELD_LAG value and who wrote it, if written within HELD_FRESH of ``now``;
    None for an old, absent or unreadable figure."""
    try:
        value = json.loads(text or "{}")
        lag, at, by = float(value["lag"]), float(value["at"]), str(value.get("by", ""))
    except (ValueError, TypeError, KeyError):
        return None
    return (lag, by) if 0.0 <= now - at <= HELD_FRESH else None


def reported_held_lag(text: str | None, now: float) -> float:
    """The lag a daemon last wrote to HELD_LAG, if within HELD_FRESH of ``now``; else 0 (none
    written, an old or unreadable figure)."""
    held = _held_lag(text, now)
    return 0.0 if held is None else held[0]


def replaces_held_lag(text: str | None, lag: float, now: float, by: str) -> bool:
    """Whether daemon ``by``'s ``lag`` goes over the HELD_LAG value ``text``: unless another
    daemon's larger figure is fresh there, so that with several daemons on one database
    `tracker stats` shows the largest figure among them (its daemon rewrites it every
    HELD_EVERY while late), not whichever wrote last."""
    held = _held_lag(text, now)
    return held is None or held[1] == by or lag >= held[0]


class Metrics:
    """Every metric tracker exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        #: the last hour per minute, for the dashboard (Prometheus keeps only totals)
        self.activity = Activity()
        r = self.registry
        self.transitions = Counter(
            "tracker_transitions", "Status changes recorded", ["platform", "to"], registry=r
        )
        self.upstream_requests = Counter(
            "tracker_upstream_requests",
            "Requests to relays by platform and HTTP status code ('error' when none came back)",
            ["platform", "code"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "tracker_upstream_errors",
            "Relay answers that changed nothing because they were unusable",
            ["platform", "code"],
            registry=r,
        )
        self.ids_per_request = Histogram(
            "tracker_upstream_ids_per_request",
            "Task ids asked about in one relay request",
            ["platform"],
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.cycle_duration = Histogram(
            "tracker_poll_cycle_duration_seconds",
            "Wall time of one poll drain (or of one interval of a longer one)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.deliveries = Counter(
            "tracker_deliveries",
            "Webhook delivery attempts by outcome (delivered, retry, dead)",
            ["outcome"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "tracker_delivery_latency_seconds",
            "Time from sending a webhook to the receiver's answer",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 30),
            registry=r,
        )

    def watch_store(
        self,
        stats: Callable[[], Stats],
        now: Callable[[], float],
        platforms: Iterable[str] = (),
        held: Callable[[], tuple[float, str] | None] = lambda: None,
    ) -> None:
        """Export the database-backed gauges; tracker_tasks shows every status of
        ``platforms`` (the configured ones) and of any other platform with tasks; the poll
        lag counts the tasks the poller holds unasked too (``held``, see `poll_lag`)."""
        self.registry.register(_StoreCollector(stats, now, platforms, held))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
