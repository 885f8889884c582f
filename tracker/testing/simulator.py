"""A simulated relay on loopback speaking the new-api, midjourney-proxy and Replicate formats."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, cast

from tracker.testing.loopback import LoopbackServer, QuietHandler

FAMILIES: Final = frozenset({"luma", "suno", "midjourney", "video", "kling", "replicate"})
#: Whole-answer faults `fail_next` queues: each spoils one request whatever its path.
FAULT_KINDS: Final = frozenset(
    {
        "http_500",
        "http_429",
        "code_error",
        "bad_json",
        "wrong_shape",
        "slow",
        # more statuses and bodies no relay should send
        "http_502_html",
        "http_503_empty",
        "http_200_empty",
        "truncated_json",
        "text_plain",
        "invalid_utf8",
        "deep_nesting",
        "nan_answer",
        "huge_number",
        "null_envelope",
        "junk_items",
        # the transport itself
        "stall",
        "trickle",
        "huge_body",
        "huge_chunked",
        "reset",
        "hang_up",
        # an error page quoting the request, key and all
        "echo_key",
    }
)
#: Item faults `poison` attaches to one task: its item is malformed in every answer.
POISON_KINDS: Final = frozenset(
    {
        "nul",
        "surrogate",
        "nan",
        "long_strings",
        "huge_int",
        "odd_types",
        "null_fields",
        "duplicate_conflict",
        "unasked_extra",
        "deep_result",
    }
)
#: bytes a `huge_body` or `huge_chunked` answer declares or sends (it stops when the client goes)
HUGE_BODY_BYTES: Final = 400 * 1024 * 1024
#: integer digits of a `huge_number` or `huge_int` value
HUGE_DIGITS: Final = 5000
_HUGE_MARK: Final = "__sim_huge_int__"
RESULT_HOST: Final = "https://cdn.example.invalid"
PROMPT: Final = "cat dance"

# new-api writes finish_time for these; CANCEL is midjourney's own terminal word.
_FINISHED: Final = frozenset({"SUCCESS", "FAILURE", "CANCEL"})
_LUMA_STATES: Final = {
    "NOT_START": "pending",
    "SUBMITTED": "pending",
    "QUEUED": "pending",
    "IN_PROGRESS": "processing",
    "SUCCESS": "completed",
    "FAILURE": "failed",
}
_SUNO_CLIP_STATES: Final = {
    "NOT_START": "submitted",
    "SUBMITTED": "submitted",
    "QUEUED": "queued",
    "IN_PROGRESS": "streaming",
    "SUCCESS": "complete",
    "FAILURE": "error",
}
_KLING_STATES: Final = {
    "NOT_START": "submitted",
    "SUBMITTED": "submitted",
    "QUEUED": "submitted",
    "IN_PROGRESS": "processing",
    "SUCCESS": "succeed",
    "FAILURE": "failed",
}
# new-api's ToVideoStatus: anything it does not list, NOT_START included, is "unknown".
_OPENAI_VIDEO_STATES: Final = {
    "SUBMITTED": "queued",
    "QUEUED": "queued",
    "IN_PROGRESS": "in_progress",
    "SUCCESS": "completed",
    "FAILURE": "failed",
}
_REPLICATE_STATES: Final = {
    "NOT_START": "starting",
    "SUBMITTED": "starting",
    "QUEUED": "starting",
    "IN_PROGRESS": "processing",
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "CANCEL": "canceled",
}
_UNAUTHORIZED: Final = {"code": "unauthorized", "message": "invalid token", "data": None}
_TASK_NOT_EXIST: Final = {"code": "task_not_exist", "message": "task_not_exist", "data": None}


@dataclass(frozen=True, slots=True)
class Step:
    """One state of a scripted task: a new-api status word, a progress string, a reason."""

    status: str
    progress: str | None
    fail_reason: str = ""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the simulator received; `json_body` is the parsed body or None."""

    method: str
    path: str
    headers: dict[str, str]
    json_body: Any
    at: float


def default_script(family: str, task_id: str) -> tuple[Step, ...]:
    """The script a task gets when none is given: success, or failure if the id says `fail`."""
    running = (
        Step("NOT_START", "0%"),
        Step("SUBMITTED", "10%"),
        Step("IN_PROGRESS", "30%"),
        Step("IN_PROGRESS", "60%"),
    )
    if "fail" not in task_id:
        return (*running, Step("SUCCESS", "100%"))
    # midjourney-proxy blanks progress on failure; new-api sets it to 100%.
    progress = "" if family == "midjourney" else "100%"
    return (*running, Step("FAILURE", progress, f"simulated failure of {task_id}"))


@dataclass(slots=True)
class _Task:
    row_id: int
    script: tuple[Step, ...]
    created_wall: float
    began: float  # monotonic time step 0 of the current script began
    began_wall: float


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What a task looks like at one instant; times are unix seconds (floats), 0 = not yet."""

    task_id: str
    row_id: int
    step: Step
    created: float
    updated: float
    started: float
    finished: float

    @property
    def status(self) -> str:
        return self.step.status

    @property
    def progress(self) -> str:
        return self.step.progress or ""


def _snapshot(task_id: str, task: _Task, now: float, step_seconds: float) -> _Snapshot:
    last = len(task.script) - 1
    if step_seconds <= 0:
        index = last
    else:
        index = min(last, max(0, math.floor((now - task.began) / step_seconds)))

    def wall(i: int) -> float:
        return task.began_wall + i * max(step_seconds, 0.0)

    started = finished = 0.0
    for i, step in enumerate(task.script[: index + 1]):
        if step.status == "IN_PROGRESS" and not started:
            started = wall(i)
        if step.status in _FINISHED and not finished:
            finished = wall(i)
        elif step.status not in _FINISHED:
            finished = 0.0
    if finished and not started:
        started = finished
    return _Snapshot(
        task_id=task_id,
        row_id=task.row_id,
        step=task.script[index],
        created=task.created_wall,
        updated=wall(index),
        started=started,
        finished=finished,
    )


# Batch answers repeat the same few timestamps per task; formatting them dominated profiles.
@functools.lru_cache(maxsize=1 << 16)
def _iso(ts: float, timespec: str = "milliseconds") -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def _iso_or_none(ts: float) -> str | None:
    return _iso(ts, "microseconds") if ts else None


def _ms_or_none(ts: float) -> int | None:
    return round(ts * 1000) if ts else None


def _video_url(task_id: str) -> str:
    return f"{RESULT_HOST}/{task_id}.mp4"


def _progress_int(progress: str) -> int:
    with contextlib.suppress(ValueError):
        return int(progress.rstrip("%") or 0)
    return 0


def _luma_item(snap: _Snapshot, *, int_times: bool, wait: float | None = None) -> dict[str, Any]:
    video = None
    if snap.status == "SUCCESS":
        video = {
            "url": _video_url(snap.task_id),
            "width": 1360,
            "height": 752,
            "thumbnail": f"{RESULT_HOST}/{snap.task_id}.jpg",
        }
    created: int | str = int(snap.created) if int_times else _iso(snap.created)
    updated: int | str = int(snap.updated) if int_times else _iso(snap.updated)
    return {
        "id": snap.row_id,
        "created_at": created,
        "updated_at": updated,
        "task_id": snap.task_id,
        "platform": "luma_free",
        "action": "LUMA_VIDEO",
        "status": snap.status,
        "fail_reason": snap.step.fail_reason,
        "submit_time": int(snap.created),
        "start_time": int(snap.started),
        "finish_time": int(snap.finished),
        "progress": snap.progress,
        "data": {
            "id": snap.task_id,
            "prompt": PROMPT,
            "state": _LUMA_STATES.get(snap.status, snap.status.lower()),
            "video": video,
            "liked": None,
            "created_at": _iso(snap.created, "microseconds"),
            "estimate_wait_seconds": wait if snap.status not in _FINISHED else None,
        },
    }


def _task_dto(snap: _Snapshot, action: str, data: object) -> dict[str, Any]:
    return {
        "task_id": snap.task_id,
        "notify_hook": "",
        "action": action,
        "status": snap.status,
        "fail_reason": snap.step.fail_reason,
        "submit_time": int(snap.created),
        "start_time": int(snap.started),
        "finish_time": int(snap.finished),
        "progress": snap.progress,
        "data": data,
    }


def _suno_item(snap: _Snapshot) -> dict[str, Any]:
    clip_status = _SUNO_CLIP_STATES.get(snap.status, snap.status.lower())
    clips = []
    for n in (1, 2):
        clip_id = f"{snap.task_id}-{n}"
        audio_url = ""
        if clip_status == "complete":
            audio_url = f"{RESULT_HOST}/{clip_id}.mp3"
        elif clip_status == "streaming":
            audio_url = f"{RESULT_HOST}/stream/{clip_id}"
        clips.append(
            {"id": clip_id, "title": f"{PROMPT} {n}", "status": clip_status, "audio_url": audio_url}
        )
    return _task_dto(snap, "MUSIC", clips)


def _mj_item(snap: _Snapshot) -> dict[str, Any]:
    done = snap.status == "SUCCESS"
    return {
        "id": snap.task_id,
        "action": "IMAGINE",
        "status": snap.status,
        "prompt": PROMPT,
        "promptEn": PROMPT,
        "description": f"/imagine {PROMPT}",
        "submitTime": _ms_or_none(snap.created),
        "startTime": _ms_or_none(snap.started),
        "finishTime": _ms_or_none(snap.finished),
        "imageUrl": f"{RESULT_HOST}/{snap.task_id}.png" if done else None,
        "progress": snap.progress,
        "failReason": snap.step.fail_reason or None,
        "properties": {"finalPrompt": PROMPT},
    }


def _video_dto(snap: _Snapshot) -> dict[str, Any]:
    done = snap.status == "SUCCESS"
    record = {
        "id": snap.task_id,
        "object": "video",
        "model": "sim-video",
        "status": _OPENAI_VIDEO_STATES.get(snap.status, "unknown"),
        "progress": _progress_int(snap.progress),
        "created_at": int(snap.created),
        "completed_at": int(snap.finished) or None,
        "video_url": _video_url(snap.task_id) if done else None,
        "error": {"message": snap.step.fail_reason} if snap.step.fail_reason else None,
    }
    dto = _task_dto(snap, "generate", record)
    if done:
        dto["result_url"] = _video_url(snap.task_id)
    return dto


def _kling_dto(snap: _Snapshot, action: str) -> dict[str, Any]:
    done = snap.status == "SUCCESS"
    videos = [{"id": f"{snap.task_id}-v", "url": _video_url(snap.task_id), "duration": "5"}]
    record = {
        "task_id": snap.task_id,
        "task_status": _KLING_STATES.get(snap.status, snap.status.lower()),
        "task_status_msg": snap.step.fail_reason,
        "created_at": _ms_or_none(snap.created),
        "updated_at": _ms_or_none(snap.updated),
        "task_result": {"videos": videos} if done else {},
    }
    dto = _task_dto(snap, action, record)
    if done:
        dto["result_url"] = _video_url(snap.task_id)
    return dto


def _prediction(snap: _Snapshot, base_url: str) -> dict[str, Any]:
    status = _REPLICATE_STATES.get(snap.status, snap.status)
    get_url = f"{base_url}/v1/predictions/{snap.task_id}"
    return {
        "id": snap.task_id,
        "model": "sim/video-model",
        "version": "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa",
        "input": {"prompt": PROMPT},
        "logs": "",
        "output": [_video_url(snap.task_id)] if status == "succeeded" else None,
        "error": snap.step.fail_reason or None,
        "status": status,
        "created_at": _iso(snap.created, "microseconds"),
        "started_at": _iso_or_none(snap.started),
        "completed_at": _iso_or_none(snap.finished),
        "urls": {"get": get_url, "cancel": f"{get_url}/cancel"},
    }


class _RelayHandler(QuietHandler):
    @property
    def _owner(self) -> SimulatedRelay:
        return cast("SimulatedRelay", self.server.owner)

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        answer = self._owner._answer(
            self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, raw
        )
        if answer.transport in ("reset", "hang_up"):
            self._drop(reset=answer.transport == "reset")
            return
        chunked = answer.transport == "huge_chunked"
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            size = HUGE_BODY_BYTES if answer.transport == "huge_body" else len(answer.body)
            self.send_header("Content-Length", str(size))
        for name, value in answer.extra.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self._send_body(answer)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _send_body(self, answer: _Answer) -> None:
        owner = self._owner
        if answer.transport == "stall":
            self.wfile.flush()
            owner.stopping.wait(owner.stall_seconds)
            self.close_connection = True
        elif answer.transport == "trickle":
            for byte in answer.body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if owner.stopping.wait(owner.trickle_seconds):
                    break
        elif answer.transport in ("huge_body", "huge_chunked"):
            filler = b" " * 65536
            for _ in range(HUGE_BODY_BYTES // len(filler)):
                if answer.transport == "huge_chunked":
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(filler), filler))
                else:
                    self.wfile.write(filler)
                if owner.stopping.is_set():
                    break
            self.close_connection = True
        else:
            self.wfile.write(answer.body)

    def _drop(self, *, reset: bool) -> None:
        """Close without answering; with ``reset``, abort the connection (TCP RST)."""
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True


class _Answer(NamedTuple):
    status: int
    body: bytes
    content_type: str
    extra: dict[str, str]
    #: how the body goes out: "whole", or a transport fault kind (stall, trickle, ...)
    transport: str = "whole"


def _json_answer(status: int, payload: object, extra: dict[str, str] | None = None) -> _Answer:
    try:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        body = text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (a poisoned item) can only go out as a \uXXXX escape.
        text = json.dumps(payload, separators=(",", ":"))
        body = text.encode()
    if _HUGE_MARK.encode() in body:
        body = body.replace(f'"{_HUGE_MARK}"'.encode(), b"1" + b"0" * (HUGE_DIGITS - 1))
    return _Answer(status, body, "application/json", extra or {})


class SimulatedRelay(LoopbackServer):
    """A relay on 127.0.0.1 whose tasks walk through scripted statuses, with injectable faults.

    A task advances one script step every `step` seconds from when it was created (`step=0`
    jumps straight to the last step). Faults queued by `fail_next` are consumed by the next
    requests whatever their path, before authentication is checked; `slow` delays the answer
    and then serves the request normally. `requests` keeps the newest `record_limit` requests.
    """

    handler = _RelayHandler
    kind = "simulated relay"

    def __init__(
        self,
        *,
        api_key: str = "sk-sim",
        step: float = 1.0,
        auto_create: bool = True,
        seed: int = 0,
        record_limit: int | None = 10_000,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.step = step
        self.auto_create = auto_create
        self.luma_bare_array = False
        self.luma_int_times = False
        #: what Luma items say in data.estimate_wait_seconds while not finished
        self.luma_estimate_wait: float | None = None
        self.slow_seconds = 2.0
        #: how long a `stall` answer holds its body back (it ends sooner when the relay stops)
        self.stall_seconds = 60.0
        #: seconds between two bytes of a `trickle` answer
        self.trickle_seconds = 0.05
        #: set while stopping, so stalled and trickling answers end
        self.stopping = threading.Event()
        super().__init__(host=host, port=port)
        # Order shuffling is for realism, not security.
        self._rng = random.Random(seed)  # noqa: S311
        self._tasks: dict[tuple[str, str], _Task] = {}
        self._hidden: set[tuple[str, str]] = set()
        self._faults: deque[str] = deque()
        self._poisons: dict[tuple[str, str], str] = {}
        # Bounded so a benchmark's thousands of 1000-id batches do not eat the memory; 0 = off.
        self._requests: deque[RecordedRequest] = deque(maxlen=record_limit)
        self._next_row_id = 1

    @property
    def url(self) -> str:
        return self.base_url

    # -- scripting ---------------------------------------------------------------------------

    def add(self, family: str, task_id: str, script: Sequence[Step] | None = None) -> None:
        """Create (or restart) a task whose clock starts now; None means the default script."""
        _check_family(family)
        steps = tuple(script) if script is not None else default_script(family, task_id)
        if not steps:
            raise ValueError(f"script for {family}/{task_id} has no steps")
        with self._lock:
            self._create(family, task_id, steps)

    def set(
        self,
        family: str,
        task_id: str,
        status: str,
        progress: str | None = None,
        fail_reason: str = "",
    ) -> None:
        """Pin a task to one state from now on, creating it if needed."""
        _check_family(family)
        step = Step(status, progress, fail_reason)
        now, wall = time.monotonic(), time.time()
        with self._lock:
            task = self._tasks.get((family, task_id))
            if task is None:
                self._create(family, task_id, (step,))
            else:
                task.script, task.began, task.began_wall = (step,), now, wall

    def hide(self, family: str, task_id: str) -> None:
        """Leave the id out of every answer, as relays do with ids they do not know."""
        _check_family(family)
        with self._lock:
            self._hidden.add((family, task_id))

    def unhide(self, family: str, task_id: str) -> None:
        _check_family(family)
        with self._lock:
            self._hidden.discard((family, task_id))

    def status_of(self, family: str, task_id: str) -> Step | None:
        """The step a task is on now, or None if the relay does not know it."""
        with self._lock:
            task = self._tasks.get((family, task_id))
            if task is None:
                return None
            return _snapshot(task_id, task, time.monotonic(), self.step).step

    def fail_next(self, kind: str, count: int = 1) -> None:
        """Make the next `count` requests fail with `kind` (see FAULT_KINDS)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        with self._lock:
            self._faults.extend([kind] * count)

    def poison(self, family: str, task_id: str, kind: str) -> None:
        """Make this task's item malformed in every answer from now on (see POISON_KINDS)."""
        _check_family(family)
        if kind not in POISON_KINDS:
            raise ValueError(
                f"unknown poison kind {kind!r}; expected one of {sorted(POISON_KINDS)}"
            )
        with self._lock:
            self._poisons[family, task_id] = kind

    def start(self) -> SimulatedRelay:
        """Serve (again)."""
        self.stopping.clear()
        super().start()
        return self

    def stop(self) -> None:
        """Stop serving; stalled and trickling answers end."""
        self.stopping.set()
        super().stop()

    @property
    def pending_faults(self) -> int:
        """Faults queued by `fail_next` and not served yet."""
        with self._lock:
            return len(self._faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _create(self, family: str, task_id: str, script: tuple[Step, ...]) -> _Task:
        wall = time.time()
        task = _Task(self._next_row_id, script, wall, time.monotonic(), wall)
        self._next_row_id += 1
        self._tasks[family, task_id] = task
        return task

    def _lookup(self, family: str, task_id: str, now: float) -> _Snapshot | None:
        """Snapshot of a visible task, auto-creating it if allowed; caller holds the lock."""
        key = (family, task_id)
        if key in self._hidden:
            return None
        task = self._tasks.get(key)
        if task is None:
            if not self.auto_create:
                return None
            task = self._create(family, task_id, default_script(family, task_id))
        return _snapshot(task_id, task, now, self.step)

    # -- HTTP --------------------------------------------------------------------------------

    def _answer(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> _Answer:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        with self._lock:
            self._requests.append(RecordedRequest(method, path, headers, body, time.monotonic()))
            fault = self._faults.popleft() if self._faults else None
        if fault == "slow":
            time.sleep(self.slow_seconds)
        elif fault == "echo_key":
            quoted = headers.get("authorization") or headers.get("mj-api-secret") or ""
            page = f"<html>502: upstream refused request with {quoted}</html>"
            return _Answer(502, page.encode(), "text/html", {})
        elif fault is not None and fault not in _SPOILERS:
            return _fault_answer(fault)
        route = path.split("?", 1)[0].rstrip("/")
        if not self._authorized(route, headers):
            return _json_answer(401, _UNAUTHORIZED)
        answer = self._route(method, route, body)
        return answer if fault is None or fault == "slow" else _spoil(answer, fault)

    def _authorized(self, route: str, headers: dict[str, str]) -> bool:
        if headers.get("authorization") == f"Bearer {self.api_key}":
            return True
        return route.startswith("/mj/") and headers.get("mj-api-secret") == self.api_key

    def _route(self, method: str, route: str, body: Any) -> _Answer:
        parts = route.strip("/").split("/")
        if method == "POST" and route in (
            "/luma/tasks",
            "/suno/fetch",
            "/mj/task/list-by-condition",
        ):
            ids = body.get("ids") if isinstance(body, dict) else None
            if ids is not None and not isinstance(ids, list):
                return _json_answer(
                    400, {"code": "invalid_request", "message": "ids must be a list", "data": None}
                )
            return self._batch(route, [i for i in ids or [] if isinstance(i, str)])
        if method == "GET":
            if len(parts) == 4 and parts[:3] == ["v1", "video", "generations"]:
                return self._single("video", parts[3], "")
            if (
                len(parts) == 5
                and parts[:3] == ["kling", "v1", "videos"]
                and parts[3] in ("text2video", "image2video")
            ):
                return self._single("kling", parts[4], parts[3])
            if len(parts) == 3 and parts[:2] == ["v1", "predictions"]:
                return self._single("replicate", parts[2], "")
        error = {"code": "not_found", "message": f"no route for {method} {route}", "data": None}
        return _json_answer(404, error)

    def _batch(self, route: str, ids: list[str]) -> _Answer:
        family = {"/luma/tasks": "luma", "/suno/fetch": "suno"}.get(route, "midjourney")
        now = time.monotonic()
        with self._lock:
            snaps = [s for i in dict.fromkeys(ids) if (s := self._lookup(family, i, now))]
            self._rng.shuffle(snaps)
            bare_luma, int_times = self.luma_bare_array, self.luma_int_times
            wait = self.luma_estimate_wait
            poisons = dict(self._poisons)
        if family == "midjourney":
            items = [_mj_item(s) for s in snaps]
        elif family == "suno":
            items = [_suno_item(s) for s in snaps]
        else:
            items = [_luma_item(s, int_times=int_times, wait=wait) for s in snaps]
        items = [
            poisoned
            for snap, item in zip(snaps, items, strict=True)
            for poisoned in _poisoned(item, poisons.get((family, snap.task_id)))
        ]
        if family == "midjourney" or bare_luma:
            return _json_answer(200, items)
        return _json_answer(200, {"code": "success", "message": "", "data": items})

    def _single(self, family: str, task_id: str, action: str) -> _Answer:
        with self._lock:
            snap = self._lookup(family, task_id, time.monotonic())
            poison = self._poisons.get((family, task_id))
        if family == "replicate":
            if snap is None:
                return _json_answer(404, {"detail": "Not found."})
            return _json_answer(200, _poisoned(_prediction(snap, self.base_url), poison)[0])
        if snap is None:
            return _json_answer(400, _TASK_NOT_EXIST)
        dto = _kling_dto(snap, action) if family == "kling" else _video_dto(snap)
        dto = _poisoned(dto, poison)[0]
        return _json_answer(200, {"code": "success", "message": "", "data": dto})


#: faults that spoil the real answer (or how it is sent) rather than replace it
_SPOILERS: Final = frozenset(
    {"truncated_json", "text_plain", "stall", "trickle", "huge_body", "huge_chunked"}
    | {"reset", "hang_up"}
)
_STATUS_KEYS: Final = ("status", "state")
_REASON_KEYS: Final = ("fail_reason", "failReason", "error")
_ID_KEYS: Final = ("task_id", "id")


def _spoil(answer: _Answer, kind: str) -> _Answer:
    if kind == "truncated_json":
        return answer._replace(body=answer.body[: max(1, len(answer.body) // 2)])
    if kind == "text_plain":
        return answer._replace(content_type="text/plain; charset=utf-8")
    return answer._replace(transport=kind)


def _poisoned(item: dict[str, Any], kind: str | None) -> list[dict[str, Any]]:
    """``item`` spoiled the ``kind`` way (see POISON_KINDS), possibly as several items."""
    if kind is None:
        return [item]
    item = dict(item)
    if kind == "duplicate_conflict":
        # The same id again, still running: a stale replica beside a fresh one.
        other = {**item, "status": "IN_PROGRESS", "progress": "50%"}
        return [item, other]
    if kind == "unasked_extra":
        key = next(k for k in _ID_KEYS if k in item)
        return [item, {**item, key: f"unasked-{item[key]}"}]
    spoiled = _SPOILED_FIELDS[kind](item)
    # Fields are spoiled only where the item has them.
    for field in (*_STATUS_KEYS, *_REASON_KEYS, "progress"):
        if field in item and field in spoiled:
            item[field] = spoiled[field]
    item.update({k: v for k, v in spoiled.items() if k.startswith("x_")})
    return [item]


def _status_of(item: dict[str, Any]) -> str:
    word = item.get("status", item.get("state", ""))
    return word if isinstance(word, str) else ""


def _deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value]
    return value


_SPOILED_FIELDS: Final[dict[str, Any]] = {
    "nul": lambda item: {
        "status": _status_of(item) + "\x00",
        "progress": "5\x000%",
        **dict.fromkeys(_REASON_KEYS, "bad\x00reason"),
        "x_note": "a\x00b",
    },
    "surrogate": lambda _item: {
        **dict.fromkeys(_REASON_KEYS, "lone \ud800 surrogate"),
        "progress": "\udc00",
        "x_note": "\ud83d",
    },
    "nan": lambda _item: {"progress": math.nan, "x_score": math.inf, "x_low": -math.inf},
    "long_strings": lambda item: {
        "status": _status_of(item) + "_" + "X" * 200,
        "progress": "9" * 100 + "%",
        **dict.fromkeys(_REASON_KEYS, "r" * 100_000),
    },
    "huge_int": lambda _item: {"progress": _HUGE_MARK, "x_seed": _HUGE_MARK},
    "odd_types": lambda _item: {
        "status": 42,
        "state": 42,
        "progress": [1, 2],
        **{key: {"nested": {"deep": True}} for key in _REASON_KEYS},
    },
    "null_fields": lambda _item: {
        "status": None,
        "state": None,
        "progress": None,
        **dict.fromkeys(_REASON_KEYS),
    },
    "deep_result": lambda _item: {"x_deep": _deep(40)},
}


def _fault_answer(kind: str) -> _Answer:
    if kind == "http_500":
        error = {"code": "internal_error", "message": "simulated upstream failure", "data": None}
        return _json_answer(500, error)
    if kind == "http_429":
        error = {"code": "rate_limited", "message": "too many requests", "data": None}
        return _json_answer(429, error, {"Retry-After": "1"})
    if kind == "code_error":
        return _json_answer(200, {"code": "fail", "message": "upstream busy", "data": None})
    if kind == "bad_json":
        # What a CDN error page in front of a relay looks like.
        html = b"<html><body>502 Bad Gateway</body></html>"
        return _Answer(200, html, "text/html; charset=utf-8", {})
    return _odd_answer(kind)


_JSON: Final = "application/json"
_JUNK_ITEMS: Final = [1, "x", None, [], {"task_id": None}, {"task_id": {}}, {"id": [1]}]
_ODD_ANSWERS: Final[dict[str, _Answer]] = {
    "http_502_html": _Answer(502, b"<html><body>502 Bad Gateway</body></html>", "text/html", {}),
    "http_503_empty": _Answer(503, b"", "text/plain", {}),
    "http_200_empty": _Answer(200, b"", _JSON, {}),
    "invalid_utf8": _Answer(200, b'{"code":"success","message":"\xff\xfe","data":[]}', _JSON, {}),
    "deep_nesting": _Answer(200, b"[" * 100_000 + b"]" * 100_000, _JSON, {}),
    "nan_answer": _Answer(200, b"NaN", _JSON, {}),
    "huge_number": _Answer(200, b"1" + b"0" * (HUGE_DIGITS - 1), _JSON, {}),
    "null_envelope": _json_answer(200, {"code": "success", "message": "", "data": None}),
    "junk_items": _json_answer(200, {"code": "success", "message": "", "data": _JUNK_ITEMS}),
}


def _odd_answer(kind: str) -> _Answer:
    return _ODD_ANSWERS.get(
        kind, _json_answer(200, {"code": "success", "message": "", "data": "unexpected"})
    )


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the simulated relay in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m tracker.testing.simulator", description=__doc__
    )
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--step", type=float, default=1.0, help="seconds per status step")
    parser.add_argument("--api-key", default="sk-sim")
    args = parser.parse_args(argv)
    with SimulatedRelay(api_key=args.api_key, step=args.step, port=args.port) as relay:
        print(f"simulated relay on {relay.base_url} (key {args.api_key})", flush=True)  # noqa: T201
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
