"""What the routes share: listing parameters, the page they answer, errors they document."""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from fastapi import Query
from fastapi.responses import Response
from pydantic import BeforeValidator, WithJsonSchema

from tracker.api import models
from tracker.api.limits import DEFAULT_PAGE, MAX_PAGE, MAX_ROW_ID
from tracker.api.strict_json import StrictJSONResponse


def blank_is_none(value: Any) -> Any:
    """``?status=`` filters by nothing, as if the parameter were absent."""
    return None if value == "" else value


def _blank_is_default(value: Any) -> Any:
    return DEFAULT_PAGE if value == "" else value


# Query first: pydantic turns its bounds into minimum/maximum in the OpenAPI document only then.
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE), BeforeValidator(_blank_is_default)]
#: a page cursor as next_cursor spells it (decimal digits, no leading zero), or blank for none;
#: the bounds are checked as an int, the document says string so a client passes one through
CURSOR_PATTERN = rf"^([1-9][0-9]{{0,{len(str(MAX_ROW_ID)) - 1}}})?$"
Cursor = Annotated[
    int | None,
    Query(ge=1, le=MAX_ROW_ID, description=f"next_cursor of the page before (1 to {MAX_ROW_ID})"),
    BeforeValidator(blank_is_none),
    WithJsonSchema({"type": "string", "pattern": CURSOR_PATTERN}),
]


def page_json(key: str, items: list[dict[str, Any]], next_cursor: int | None) -> Response:
    """A page: its items under ``key`` and the cursor of the next page (null on the last)."""
    cursor = str(next_cursor) if next_cursor is not None else None
    return StrictJSONResponse({key: items, "next_cursor": cursor})


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": models.ErrorOut, "description": "missing or invalid bearer token"},
    422: {"model": models.ErrorOut, "description": "invalid request; each problem named"},
}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    408: {"model": models.ErrorOut, "description": "body not received within header_timeout"},
    413: {"model": models.ErrorOut, "description": "body over [server].max_body_bytes"},
    415: {"model": models.ErrorOut, "description": "body not sent as JSON"},
}


def request_body(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body the route reads itself (strictly) rather than through FastAPI."""
    schema = {"schema": model.model_json_schema()}
    return {"requestBody": {"required": True, "content": {"application/json": schema}}}
