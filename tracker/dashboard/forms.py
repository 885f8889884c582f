"""Reading a dashboard form: the body capped while it streams, then parsed with tight limits.

Every dashboard form is small (a token or a CSRF token, and at most two times), so a body is
read whole, and only up to MAX_FORM_BYTES (or ``[server].max_body_bytes`` when smaller), as
the API reads its JSON; the fields are then parsed from those bytes, at most MAX_FORM_FIELDS
of at most MAX_FIELD_BYTES each, and no files. What a form may cost is bounded before any
token is looked at, signed in or not.
"""

from __future__ import annotations

from fastapi import Request
from starlette.formparsers import MultiPartException
from starlette.types import Message

from tracker.api.body import read_capped
from tracker.api.errors import ApiError
from tracker.dashboard.web import dashboard_of

#: the largest form body the dashboard reads, in bytes ([server].max_body_bytes if smaller)
MAX_FORM_BYTES = 16 * 1024
#: fields one form may carry: the dashboard's own carry three at most
MAX_FORM_FIELDS = 8
#: bytes one field may take as sent, encoded (the longest is a sign-in token)
MAX_FIELD_BYTES = 4 * 1024


class FormError(Exception):
    """A form the dashboard does not read: too large, too slow, or malformed."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


async def read_form(request: Request) -> dict[str, str]:
    """The posted form's text fields (the last of a repeated name wins).

    Raises FormError: 413 for a body over the cap (declared, or found while it streams),
    408 for one slower than ``[server].header_timeout``, 400 for too many or too long fields,
    a file, or a malformed body.
    """
    server = dashboard_of(request).settings().server
    cap = min(MAX_FORM_BYTES, server.max_body_bytes)
    limit = "[server].max_body_bytes" if cap == server.max_body_bytes else "the dashboard's limit"
    try:
        body = await read_capped(request, cap, server.header_timeout, limit)
    except ApiError as exc:
        raise FormError(exc.status_code, exc.message) from None

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    # Parsed from the bytes already read; without "app" in its scope Starlette raises its
    # own error for a bad form (not an HTTPException answered as JSON).
    scope = {key: value for key, value in request.scope.items() if key != "app"}
    parsed = Request(scope, replay)
    try:
        form = await parsed.form(
            max_files=0, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
        )
    except MultiPartException as exc:
        raise FormError(400, f"form refused: {exc.message}") from None
    return {name: value for name, value in form.items() if isinstance(value, str)}
