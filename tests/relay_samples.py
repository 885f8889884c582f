"""Canned relay answers, shaped after the documents and sources in research/relay-apis.md."""

from __future__ import annotations

from typing import Any

LUMA_ID = "9d4b7516-77e5-481a-b015-48313946f33b"


def luma_item(
    task_id: str = LUMA_ID,
    status: str = "IN_PROGRESS",
    *,
    state: str = "processing",
    iso_times: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """One TaskDto of the seed document's `POST /luma/tasks` answer."""
    return {
        "id": 13917,
        "created_at": "2024-07-01T07:35:13.568Z" if iso_times else 1719819313,
        "updated_at": "2024-07-01T07:35:23.654Z" if iso_times else 1719819323,
        "task_id": task_id,
        "platform": "luma_free",
        "action": "LUMA_VIDEO",
        "status": status,
        "fail_reason": "",
        "submit_time": 1719819313,
        "start_time": 1719819323,
        "finish_time": 0,
        "data": {
            "id": task_id,
            "liked": None,
            "state": state,
            "video": None,
            "prompt": "cat dance",
            "created_at": "2024-07-01T07:35:13.498000Z",
            "estimate_wait_seconds": None,
        },
        **extra,
    }


def envelope(data: Any, code: Any = "success", message: str = "") -> dict[str, Any]:
    """The new-api `{code, message, data}` envelope."""
    return {"code": code, "message": message, "data": data}


#: The seed document's sample answer, verbatim.
LUMA_SEED_ANSWER = envelope([luma_item()])

#: A raw official-style Luma object, as v98store answers `/luma/tasks` (a bare array, no DTO).
RAW_LUMA_OBJECT: dict[str, Any] = {
    "id": "0f3ea4aa-10e7-4dae-af0b-263ab4ac45f9",
    "state": "completed",
    "failure_reason": None,
    "created_at": "2024-11-23T08:12:25.858Z",
    "assets": {"video": "https://storage.cdn-luma.com/dream_machine/0f3e/video.mp4"},
    "request": {"prompt": "a teddy bear in a hot tub"},
}

SUNO_ID = "346c5d10-a4a1-4f49-a851-66a7dab6cfd5"


def suno_item(
    status: str = "IN_PROGRESS", progress: Any = "0%", clip_status: str = "streaming"
) -> dict[str, Any]:
    """One `POST /suno/fetch` TaskDto whose `data` is the list of clips."""
    clips = [
        {
            "id": f"e989e2b4-5bf0-4b7c-9e7a-1f0f3c3c3c3{n}",
            "title": "Sunny day",
            "status": clip_status,
            "audio_url": f"https://cdn1.suno.ai/e989{n}.mp3",
            "model_name": "chirp-v3",
        }
        for n in (1, 2)
    ]
    return {
        "task_id": SUNO_ID,
        "notify_hook": "",
        "action": "MUSIC",
        "status": status,
        "fail_reason": "",
        "submit_time": 1716191749,
        "start_time": 1716191786,
        "finish_time": 0,
        "progress": progress,
        "data": clips,
    }


def mj_task(
    task_id: str, status: str, progress: str, *, fail_reason: str | None = None
) -> dict[str, Any]:
    """One camelCase midjourney-proxy task (times in milliseconds)."""
    done = status == "SUCCESS"
    return {
        "id": task_id,
        "action": "IMAGINE",
        "status": status,
        "prompt": "猫猫",
        "promptEn": "Cat",
        "description": "/imagine 猫猫",
        "submitTime": 1689231405854,
        "startTime": 1689231442755,
        "finishTime": 1689231544312 if status in ("SUCCESS", "FAILURE") else None,
        "progress": progress,
        "imageUrl": "https://cdn.discordapp.com/attachments/1/2/cat.png" if done else None,
        "failReason": fail_reason,
        "properties": {"finalPrompt": "Cat"},
    }


MJ_ANSWER = [
    mj_task("14001929738841620", "SUCCESS", "100%"),
    mj_task("14001929738841621", "IN_PROGRESS", "45%"),
    mj_task("14001929738841622", "FAILURE", "", fail_reason="Banned prompt: cat"),
    mj_task("14001929738841623", "MODAL", "0%"),
    mj_task("14001929738841624", "CANCEL", "0%"),
    mj_task("14001929738841625", "NOT_START", "0%"),
]

VIDEO_ID = "task_8fKq3ZQm2yV0r7tWcN1bLx4sPdE6aGhJ"


def video_dto(
    status: str = "IN_PROGRESS", progress: Any = "30%", fail_reason: str = "", **extra: Any
) -> dict[str, Any]:
    """A `GET /v1/video/generations/{task_id}` TaskDto (Runway through a relay)."""
    return {
        "task_id": VIDEO_ID,
        "action": "generate",
        "status": status,
        "fail_reason": fail_reason,
        "submit_time": 1735714800,
        "start_time": 1735714805,
        "finish_time": 0,
        "progress": progress,
        "data": {"id": "2c3ab6a8-runway", "status": "RUNNING", "progress": 0.45},
        **extra,
    }


KLING_ID = "CjikY2dnhWEAAAAAAVoGUg"


def kling_dto(status: str, fail_reason: str = "") -> dict[str, Any]:
    """new-api's TaskDto for a Kling task (the raw Kling answer under `data`)."""
    return {
        "task_id": KLING_ID,
        "action": "text2video",
        "status": status,
        "fail_reason": fail_reason,
        "submit_time": 1735714800,
        "start_time": 1735714805,
        "finish_time": 1735714900,
        "progress": "100%",
        "data": {
            "task_id": KLING_ID,
            "task_status": "failed" if status == "FAILURE" else "succeed",
            "task_status_msg": fail_reason,
        },
    }


#: one-hub serves the stored raw Kling answer (code 0, not "success").
KLING_RAW_ANSWER: dict[str, Any] = {
    "code": 0,
    "message": "SUCCEED",
    "request_id": "CjMSOWdnhWEAAAAAAVjvOg",
    "data": {
        "task_id": KLING_ID,
        "task_status": "failed",
        "task_status_msg": "Failure to pass the risk control system",
        "created_at": 1722769557708,
        "updated_at": 1722769562390,
        "task_result": {},
    },
}

#: new-api's `/v1/videos/{task_id}` OpenAI video object.
OPENAI_VIDEO_OBJECT: dict[str, Any] = {
    "id": VIDEO_ID,
    "object": "video",
    "model": "sora-2",
    "status": "failed",
    "progress": 100,
    "created_at": 1735714800,
    "completed_at": 1735714900,
    "metadata": {},
    "error": {"message": "content policy violation", "code": "moderation_blocked"},
}

TASK_NOT_EXIST = {"code": "task_not_exist", "message": "task_not_exist", "data": None}

REPLICATE_ID = "gm3qorzdhgbfurvjtvhg6dckhu"


def prediction(status: str, **extra: Any) -> dict[str, Any]:
    """A Replicate prediction object (`GET /v1/predictions/{id}`)."""
    return {
        "id": REPLICATE_ID,
        "model": "minimax/video-01",
        "version": "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa",
        "input": {"prompt": "a cat dancing"},
        "logs": "",
        "output": None,
        "error": None,
        "status": status,
        "created_at": "2024-11-23T08:12:25.858Z",
        "started_at": "2024-11-23T08:12:26.101Z",
        "completed_at": None,
        "urls": {
            "get": f"https://api.replicate.com/v1/predictions/{REPLICATE_ID}",
            "cancel": f"https://api.replicate.com/v1/predictions/{REPLICATE_ID}/cancel",
        },
        **extra,
    }
