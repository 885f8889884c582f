"""The simulated relay's answers, and the faults that replace or spoil them.

`fail_next` queues whole-answer faults (`FAULT_KINDS`): some replace the answer
(`fault_answer`), the `SPOILERS` spoil the real one or how it is sent (`spoil`). `poison`
attaches an item fault (`POISON_KINDS`) to one task (`poison_item`).
"""

from __future__ import annotations

import io
import json
import math
import threading
from typing import Any, Final, NamedTuple

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
        # a new-api error envelope (HTTP 200) whose message quotes the key
        "echo_key_code",
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


class Answer(NamedTuple):
    status: int
    body: bytes
    content_type: str
    extra: dict[str, str]
    #: how the body goes out: "whole", or a transport fault kind (stall, trickle, ...)
    transport: str = "whole"


def write_body(
    wfile: io.BufferedIOBase,
    answer: Answer,
    stopping: threading.Event,
    stall_seconds: float,
    trickle_seconds: float,
) -> bool:
    """Send ``answer``'s body the way its transport says; True when the connection must close.

    A stalled, trickling or endless body ends early once ``stopping`` is set.
    """
    if answer.transport == "stall":
        wfile.flush()
        stopping.wait(stall_seconds)
        return True
    if answer.transport == "trickle":
        for byte in answer.body:
            wfile.write(bytes([byte]))
            wfile.flush()
            if stopping.wait(trickle_seconds):
                break
        return False
    if answer.transport in ("huge_body", "huge_chunked"):
        filler = b" " * 65536
        for _ in range(HUGE_BODY_BYTES // len(filler)):
            if answer.transport == "huge_chunked":
                wfile.write(b"%x\r\n%s\r\n" % (len(filler), filler))
            else:
                wfile.write(filler)
            if stopping.is_set():
                break
        return True
    wfile.write(answer.body)
    return False


def json_answer(status: int, payload: object, extra: dict[str, str] | None = None) -> Answer:
    try:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        body = text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (a poisoned item) can only go out as a \uXXXX escape.
        text = json.dumps(payload, separators=(",", ":"))
        body = text.encode()
    if _HUGE_MARK.encode() in body:
        body = body.replace(f'"{_HUGE_MARK}"'.encode(), b"1" + b"0" * (HUGE_DIGITS - 1))
    return Answer(status, body, "application/json", extra or {})


#: faults that spoil the real answer (or how it is sent) rather than replace it
SPOILERS: Final = frozenset(
    {"truncated_json", "text_plain", "stall", "trickle", "huge_body", "huge_chunked"}
    | {"reset", "hang_up"}
)
_STATUS_KEYS: Final = ("status", "state")
_REASON_KEYS: Final = ("fail_reason", "failReason", "error")
_ID_KEYS: Final = ("task_id", "id")


def spoil(answer: Answer, kind: str) -> Answer:
    if kind == "truncated_json":
        return answer._replace(body=answer.body[: max(1, len(answer.body) // 2)])
    if kind == "text_plain":
        return answer._replace(content_type="text/plain; charset=utf-8")
    return answer._replace(transport=kind)


def poison_item(item: dict[str, Any], kind: str | None) -> list[dict[str, Any]]:
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


def fault_answer(kind: str) -> Answer:
    if kind == "http_500":
        error = {"code": "internal_error", "message": "simulated upstream failure", "data": None}
        return json_answer(500, error)
    if kind == "http_429":
        error = {"code": "rate_limited", "message": "too many requests", "data": None}
        return json_answer(429, error, {"Retry-After": "1"})
    if kind == "code_error":
        return json_answer(200, {"code": "fail", "message": "upstream busy", "data": None})
    if kind == "bad_json":
        # What a CDN error page in front of a relay looks like.
        html = b"<html><body>502 Bad Gateway</body></html>"
        return Answer(200, html, "text/html; charset=utf-8", {})
    return _odd_answer(kind)


_JSON: Final = "application/json"
_JUNK_ITEMS: Final = [1, "x", None, [], {"task_id": None}, {"task_id": {}}, {"id": [1]}]
_ODD_ANSWERS: Final[dict[str, Answer]] = {
    "http_502_html": Answer(502, b"<html><body>502 Bad Gateway</body></html>", "text/html", {}),
    "http_503_empty": Answer(503, b"", "text/plain", {}),
    "http_200_empty": Answer(200, b"", _JSON, {}),
    "invalid_utf8": Answer(200, b'{"code":"success","message":"\xff\xfe","data":[]}', _JSON, {}),
    "deep_nesting": Answer(200, b"[" * 100_000 + b"]" * 100_000, _JSON, {}),
    "nan_answer": Answer(200, b"NaN", _JSON, {}),
    "huge_number": Answer(200, b"1" + b"0" * (HUGE_DIGITS - 1), _JSON, {}),
    "null_envelope": json_answer(200, {"code": "success", "message": "", "data": None}),
    "junk_items": json_answer(200, {"code": "success", "message": "", "data": _JUNK_ITEMS}),
}


def _odd_answer(kind: str) -> Answer:
    return _ODD_ANSWERS.get(
        kind, json_answer(200, {"code": "success", "message": "", "data": "unexpected"})
    )
