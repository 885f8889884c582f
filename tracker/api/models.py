"""What the API takes and answers, as pydantic models (they are also its OpenAPI schema)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictStr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from tracker import clock, status
from tracker.api.errors import broken_rule
from tracker.api.limits import (
    MAX_ID_LENGTH,
    MAX_IDS,
    MAX_METADATA_BYTES,
    MAX_YEAR,
    MIN_YEAR,
)
from tracker.retry import DeliveryState
from tracker.status import EventType

# -- requests --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RegistrationRules:
    """What a registration is checked against besides its shape: the live configuration."""

    platforms: Sequence[str]
    endpoints: Collection[str]
    has_default_url: bool


def is_task_id(value: str) -> bool:
    """Whether ``value`` can be a task id: what a registration accepts."""
    # A URL's path cannot hold these as a segment: GET /v1/tasks/luma/.. is /v1/tasks.
    return _storable_id(value) and value not in {".", ".."}


def _storable_id(value: str) -> bool:
    """Whether a task id can be stored: what registrations ever accepted (the two dot ids
    too, before they were refused)."""
    return 0 < len(value) <= MAX_ID_LENGTH and value.isprintable() and value.strip() == value


def could_be_stored(platforms: Collection[str], platform: str, task_id: str) -> bool:
    """Whether a task could be stored under these names, answered without a query: a NUL in
    a parameter is an error on PostgreSQL, not a miss."""
    return platform in platforms and _storable_id(task_id)


def _printable_id(value: str) -> str:
    if not is_task_id(value):
        raise ValueError("not printable")  # shown as the ids[] rule, which says it all
    return value


TaskId = Annotated[
    StrictStr, Field(min_length=1, max_length=MAX_ID_LENGTH), AfterValidator(_printable_id)
]
# A string checked by the list's validator, so one unknown name is one "events:" problem.
EventName = Annotated[
    StrictStr, WithJsonSchema({"type": "string", "enum": sorted(e.value for e in EventType)})
]


def _rules(info: ValidationInfo) -> RegistrationRules | None:
    return info.context if isinstance(info.context, RegistrationRules) else None


class RegistrationIn(BaseModel):
    """POST /v1/tasks: the ids of one platform to track, and where their events go."""

    model_config = ConfigDict(extra="forbid")

    platform: StrictStr
    ids: Annotated[list[TaskId], Field(min_length=1, max_length=MAX_IDS)]
    webhook_url: StrictStr | None = None
    endpoint: StrictStr | None = None
    events: list[EventName] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("platform")
    @classmethod
    def _known_platform(cls, value: str, info: ValidationInfo) -> str:
        rules = _rules(info)
        if rules is not None and value not in rules.platforms:
            raise broken_rule(f"must be one of {sorted(rules.platforms)}, got {value!r:.80}")
        return value

    @field_validator("ids", mode="before")
    @classmethod
    def _not_too_many(cls, value: Any) -> Any:
        # Before the items, so a huge list is refused without checking each id.
        if isinstance(value, list) and len(value) > MAX_IDS:
            raise broken_rule(f"at most {MAX_IDS} ids per request, got {len(value)}")
        return value

    @field_validator("endpoint")
    @classmethod
    def _known_endpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        rules = _rules(info)
        if value is not None and rules is not None and value not in rules.endpoints:
            raise broken_rule(f"must name a [webhooks.endpoints] entry {sorted(rules.endpoints)}")
        return value

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: list[str] | None) -> list[str] | None:
        known = sorted(e.value for e in EventType)
        unknown = sorted(set(value or ()) - set(known))
        if unknown:
            raise broken_rule(f"unknown {unknown}; known {known}")
        return value

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
            if size > MAX_METADATA_BYTES:
                raise broken_rule(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
        return value

    @model_validator(mode="after")
    def _one_destination(self, info: ValidationInfo) -> RegistrationIn:
        if self.webhook_url is not None and self.endpoint is not None:
            raise broken_rule("endpoint: give either webhook_url or endpoint, not both")
        rules = _rules(info)
        unaddressed = self.webhook_url is None and self.endpoint is None
        if unaddressed and rules is not None and not rules.has_default_url:
            raise broken_rule("webhook_url: required, as the config sets no [webhooks].url")
        return self


def _zoned_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("not a string")  # noqa: TRY004 - pydantic reports ValueError only
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("not ISO 8601") from None
    if parsed.tzinfo is None:
        raise ValueError("no zone")
    try:
        utc = parsed.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not MIN_YEAR <= utc.year <= MAX_YEAR:
        raise broken_rule(f"must lie between the years {MIN_YEAR} and {MAX_YEAR} in UTC")
    return utc


ZonedTime = Annotated[datetime, BeforeValidator(_zoned_time)]


class RecoverIn(BaseModel):
    """POST /v1/deliveries/recover: the window of dead deliveries to queue again."""

    model_config = ConfigDict(extra="forbid")

    since: ZonedTime
    until: ZonedTime | None = None


# -- answers ---------------------------------------------------------------------------------

#: answered as RFC 3339 text in UTC with a Z, which the document calls a date-time
Timestamp = Annotated[
    datetime,
    PlainSerializer(clock.isoformat, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)


class ErrorOut(_Out):
    """Every error the API answers."""

    error: str
    problems: list[str] | None = None


class RegisteredOut(_Out):
    """What a registration did: ids new to the tracker, and ids it already tracked."""

    registered: list[str]
    existing: list[str]


class TransitionOut(_Out):
    """One status change of a task."""

    from_: status.TaskStatus = Field(validation_alias="from_status", serialization_alias="from")
    to: status.TaskStatus = Field(validation_alias="to_status")
    upstream_status: str | None
    progress: int | None
    at: Timestamp


class TaskSummaryOut(_Out):
    """A task as listings show it."""

    platform: str
    task_id: str
    status: status.TaskStatus
    upstream_status: str | None
    progress: int | None
    upstream_progress: str | None
    fail_reason: str
    metadata: dict[str, Any]
    webhook_url: str | None
    endpoint: str | None
    events: list[EventType] | None
    result: dict[str, Any] | None
    created_at: Timestamp
    updated_at: Timestamp
    finished_at: Timestamp | None

    @field_validator("metadata", mode="before")
    @classmethod
    def _no_metadata_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class TaskOut(TaskSummaryOut):
    """A task with its status history, oldest first."""

    transitions: list[TransitionOut]


class TaskPageOut(_Out):
    """A page of tasks, newest first."""

    tasks: list[TaskSummaryOut]
    next_cursor: str | None


class AttemptOut(_Out):
    """One attempt to deliver a webhook."""

    at: Timestamp
    url: str
    status_code: int | None
    error: str | None
    latency_ms: float
    response: str = Field(validation_alias="response_excerpt")


class DeliveryOut(_Out):
    """A webhook delivery with every attempt."""

    id: int
    webhook_id: str
    platform: str
    task_id: str
    event_type: EventType
    url: str
    endpoint: str | None
    state: DeliveryState
    attempts: int
    next_attempt_at: Timestamp | None
    created_at: Timestamp
    last_attempt_at: Timestamp | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: Timestamp | None
    log: list[AttemptOut]


class DeliveryListOut(_Out):
    """A task's deliveries, oldest first."""

    deliveries: list[DeliveryOut]


class DeliveryPageOut(_Out):
    """A page of deliveries, newest first."""

    deliveries: list[DeliveryOut]
    next_cursor: str | None


class RequeuedOut(_Out):
    """The ids of the deliveries queued again."""

    requeued: list[int]


class HealthOut(_Out):
    """Liveness."""

    status: Literal["ok"]


class ReadyOut(_Out):
    """Readiness, with the reasons when not ready."""

    status: Literal["ready", "unavailable"]
    reasons: list[str] | None = None
