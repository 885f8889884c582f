"""What the simulated relay's tasks look like in each relay format it speaks.

A task walks through a script of new-api status words (`Step`); `snapshot_of` says where it
is at one instant, and the `*_item`/`*_dto` builders render that snapshot the way new-api
(Luma, Suno, OpenAI-style video, Kling), midjourney-proxy and Replicate answer.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

FAMILIES: Final = frozenset({"luma", "suno", "midjourney", "video", "kling", "replicate"})

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


@dataclass(frozen=True, slots=True)
class Step:
    """One state of a scripted task: a new-api status word, a progress string, a reason."""

    status: str
    progress: str | None
    fail_reason: str = ""


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
class ScriptedTask:
    row_id: int
    script: tuple[Step, ...]
    created_wall: float
    began: float  # monotonic time step 0 of the current script began
    began_wall: float


@dataclass(frozen=True, slots=True)
class Snapshot:
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


def snapshot_of(task_id: str, task: ScriptedTask, now: float, step_seconds: float) -> Snapshot:
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
    return Snapshot(
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


def luma_item(snap: Snapshot, *, int_times: bool, wait: float | None = None) -> dict[str, Any]:
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


def _task_dto(snap: Snapshot, action: str, data: object) -> dict[str, Any]:
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


def suno_item(snap: Snapshot) -> dict[str, Any]:
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


def mj_item(snap: Snapshot) -> dict[str, Any]:
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


def video_dto(snap: Snapshot) -> dict[str, Any]:
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


def kling_dto(snap: Snapshot, action: str) -> dict[str, Any]:
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


def prediction(snap: Snapshot, base_url: str) -> dict[str, Any]:
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


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
