"""Driving the dashboard over plain HTTP in tests: signing in, reading forms' hidden fields."""

from __future__ import annotations

import html
import re

import httpx

_HIDDEN = re.compile(r'<input type="hidden" name="(?P<name>[a-z_]+)" value="(?P<value>[^"]*)">')


def hidden_fields(page: str) -> dict[str, str]:
    """The hidden inputs of a page (the last one wins when a name repeats)."""
    return {m["name"]: html.unescape(m["value"]) for m in _HIDDEN.finditer(page)}


async def sign_in(client: httpx.AsyncClient, token: str, prefix: str = "/ui") -> str:
    """Sign ``client`` in with ``token``; returns the session's CSRF token.

    Raises AssertionError when the dashboard does not accept the token.
    """
    form = await client.get(f"{prefix}/login")
    fields = hidden_fields(form.text)
    answer = await client.post(
        f"{prefix}/login", data={"token": token, "login_csrf": fields["login_csrf"]}
    )
    if answer.status_code != 303:
        raise AssertionError(f"sign-in refused with {answer.status_code}")
    overview = await client.get(f"{prefix}/")
    return hidden_fields(overview.text)["csrf"]
