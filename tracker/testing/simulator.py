"""A simulated relay on loopback speaking the new-api, midjourney-proxy and Replicate formats."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, cast

from tracker.testing.loopback import LoopbackServer, QuietHandler

FAMILIES: Final = frozenset({"luma", "suno", "midjourney", "video", "kling", "replicate"})
FAULT_KINDS: Final = frozenset(
    {"http_500", "http_429", "code_error", "bad_json", "wrong_shape", "slow"}
)
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
        status, body, content_type, extra = self._owner._answer(
            self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, raw
        )
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


_Answer = tuple[int, bytes, str, dict[str, str]]


def _json_answer(status: int, payload: object, extra: dict[str, str] | None = None) -> _Answer:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return status, body, "application/json", extra or {}


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
        super().__init__(host=host, port=port)
        # Order shuffling is for realism, not security.
        self._rng = random.Random(seed)  # noqa: S311
        self._tasks: dict[tuple[str, str], _Task] = {}
        self._hidden: set[tuple[str, str]] = set()
        self._faults: deque[str] = deque()
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
        elif fault is not None:
            return _fault_answer(fault)
        route = path.split("?", 1)[0].rstrip("/")
        if not self._authorized(route, headers):
            return _json_answer(401, _UNAUTHORIZED)
        return self._route(method, route, body)

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
        if family == "midjourney":
            return _json_answer(200, [_mj_item(s) for s in snaps])
        if family == "suno":
            items = [_suno_item(s) for s in snaps]
        else:
            items = [_luma_item(s, int_times=int_times, wait=wait) for s in snaps]
            if bare_luma:
                return _json_answer(200, items)
        return _json_answer(200, {"code": "success", "message": "", "data": items})

    def _single(self, family: str, task_id: str, action: str) -> _Answer:
        with self._lock:
            snap = self._lookup(family, task_id, time.monotonic())
        if family == "replicate":
            if snap is None:
                return _json_answer(404, {"detail": "Not found."})
            return _json_answer(200, _prediction(snap, self.base_url))
        if snap is None:
            return _json_answer(400, _TASK_NOT_EXIST)
        dto = _kling_dto(snap, action) if family == "kling" else _video_dto(snap)
        return _json_answer(200, {"code": "success", "message": "", "data": dto})


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
        return 200, b"<html><body>502 Bad Gateway</body></html>", "text/html; charset=utf-8", {}
    return _json_answer(200, {"code": "success", "message": "", "data": "unexpected"})


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
