"""The API's one error shape, ``{"error": ..., "problems": [...]}``.

Validation errors from pydantic and FastAPI become problems that name the field, in the words
of the README rather than pydantic's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic_core import PydanticCustomError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match

from tracker.api.limits import MAX_ID_LENGTH, MAX_PAGE
from tracker.api.strict_json import StrictJSONResponse
from tracker.retry import DeliveryState
from tracker.status import TaskStatus

#: the methods a 405 answer's Allow header may name
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

#: the pydantic error type of a rule of ours, whose message is already the user's
RULE_ERROR = "api_rule"

#: what each field must be, said once for every way it can be wrong
RULES: Mapping[str, str] = {
    "platform": "must be the name of a configured platform",
    "ids": "must be a non-empty array of task ids",
    "ids[]": (
        f"must be a non-empty string of at most {MAX_ID_LENGTH} printable characters "
        "without surrounding spaces, and not '.' or '..' (no URL could name it)"
    ),
    "webhook_url": "must be a string",
    "endpoint": "must be a string naming a [webhooks.endpoints] entry",
    "events": "must be an array of event names",
    "metadata": "must be a JSON object",
    "since": "must be an ISO 8601 time with a zone, e.g. 2026-11-25T10:00:00Z",
    "until": "must be an ISO 8601 time with a zone, e.g. 2026-11-25T10:00:00Z",
    "limit": f"must be an integer from 1 to {MAX_PAGE}",
    "cursor": "must be a next_cursor value from an earlier page",
    "status": f"must be one of {sorted(s.value for s in TaskStatus)}",
    "state": f"must be one of {sorted(s.value for s in DeliveryState)}",
}
#: where FastAPI says a value came from; the problem names the field only
_SOURCES = frozenset({"body", "query", "path", "header", "cookie"})


class ApiError(Exception):
    """An answer other than success: status code, message, problems and extra headers."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        problems: Iterable[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.problems = list(problems) if problems is not None else None
        self.headers = dict(headers or {})

    def response(self) -> Response:
        """The error as the API answers it."""
        body: dict[str, Any] = {"error": self.message}
        if self.problems is not None:
            body["problems"] = self.problems
        return StrictJSONResponse(body, status_code=self.status_code, headers=self.headers)


def _field(loc: Iterable[int | str]) -> tuple[str, str]:
    """The field as a problem names it (``ids[3]``) and as RULES names it (``ids[]``)."""
    shown, rule = "", ""
    for part in loc:
        if isinstance(part, int):
            shown, rule = f"{shown}[{part}]", f"{rule}[]"
        elif part in _SOURCES and not shown:
            continue
        else:
            shown = f"{shown}.{part}" if shown else part
            rule = f"{rule}.{part}" if rule else part
    return shown, rule


def problem(error: Mapping[str, Any]) -> str:
    """One pydantic error as ``field: what is wrong``."""
    shown, rule = _field(error.get("loc", ()))
    kind = error.get("type", "")
    if kind == "missing":
        text = "required"
    elif kind == "extra_forbidden":
        text = "unknown field"
    elif kind == RULE_ERROR:
        text = str(error.get("msg", ""))  # our own validators phrase it for the user already
    else:
        field = rule.split(".")[0].split("[")[0]
        text = RULES.get(rule) or RULES.get(field) or str(error.get("msg", ""))
    return f"{shown}: {text}" if shown else text


def problems(errors: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every error as a problem, each once, in order."""
    return list(dict.fromkeys(problem(e) for e in errors))


def broken_rule(message: str) -> PydanticCustomError:
    """A validation error whose message is shown to the user as it is."""
    return PydanticCustomError(RULE_ERROR, message)


def unauthorized() -> ApiError:
    """The answer to a request without the right bearer token."""
    return ApiError(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


def allowed_methods(request: Request) -> str:
    """The Allow header of a 405: every method some route of the request's application takes
    at its path (HEAD wherever GET). Starlette's names the first matching route's alone, and
    here each method is a route of its own (a task's GET and DELETE); RFC 9110 wants them all.
    """

    def takes(route: BaseRoute, method: str) -> bool:
        return route.matches({**request.scope, "method": method})[0] == Match.FULL

    routes = request.app.router.routes
    taken = {method for method in METHODS if any(takes(route, method) for route in routes)}
    if "GET" in taken:
        taken.add("HEAD")  # answered wherever GET is (application.HeadAsGet)
    return ", ".join(method for method in METHODS if method in taken)
