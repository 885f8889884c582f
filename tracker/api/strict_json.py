"""Strict JSON at the API's edge: what a request body may hold, and answers that are JSON."""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

from starlette.responses import JSONResponse

#: how deeply a request body may nest arrays and objects; registrations need three levels
#: plus what metadata holds, and a deep body costs the parser a stack frame per level
MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


class BodyError(ValueError):
    """A request body that is not strict JSON; the message names what is wrong."""


def _refuse_constant(name: str) -> Any:
    raise BodyError(f"{name} is not a JSON number")


def parse(raw: bytes) -> Any:
    """Decode ``raw`` as UTF-8 JSON with no NaN/Infinity, no lone surrogates, bounded depth."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"not valid UTF-8 at byte {exc.start}") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise BodyError(f"nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError:
        raise BodyError("not valid JSON") from None
    except ValueError as exc:  # an integer too long for int(), or a refused constant
        if isinstance(exc, BodyError):
            raise
        raise BodyError("holds a number too long to read") from None
    _check(value)
    return value


#: the largest finite 64-bit float, as an exact integer
_FLOAT_MAX = int(sys.float_info.max)


def _check(value: Any) -> None:
    """Walk the parsed value iteratively (it may be deep) and refuse what JSON does not allow."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise BodyError(f"nested more than {MAX_DEPTH} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
            if isinstance(item, dict):
                stack.extend((key, depth + 1) for key in item)
        elif isinstance(item, str):
            if _SURROGATE.search(item):
                raise BodyError("holds a lone UTF-16 surrogate (\\ud800-\\udfff), not text")
        elif (isinstance(item, float) and not math.isfinite(item)) or (
            type(item) is int and abs(item) > _FLOAT_MAX
        ):
            # json.loads reads 1e400 as inf, which has no JSON spelling on the way out; an
            # integer literal as large stays exact here, and is infinity to most other readers.
            raise BodyError("holds a number out of the range of a 64-bit float")


def clean(value: Any) -> Any:
    """``value`` with what strict JSON cannot carry replaced: lone surrogates by U+FFFD and
    non-finite floats by null. Rows stored before the edge was strict may still hold them.
    """
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def dumps(value: Any) -> bytes:
    """Strict JSON bytes for ``value``, cleaned first only when it needs it."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        text = json.dumps(clean(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")


class StrictJSONResponse(JSONResponse):
    """Every JSON answer of the API: valid UTF-8, no NaN, whatever the store held."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
