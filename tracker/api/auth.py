"""Bearer-token checks: for /v1/*, and for the operational routes when the config asks; and
what stands in for them when no token is set (``WebPageGuard``)."""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from tracker.api.errors import ApiError, unauthorized
from tracker.api.state import ApiState, Deps, services
from tracker.config import is_loopback

#: declares the scheme in the OpenAPI document; the check itself is ``authorized``
_bearer = HTTPBearer(auto_error=False, description="one of the [server].api_tokens")


def authorized(request: Request) -> bool:
    """Whether ``request`` carries one of the configured tokens (always, when none is set)."""
    tokens = services(request).state.settings.server.api_tokens
    if not tokens:
        return True  # only possible on a loopback host (config refuses otherwise)
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    # Bytes, as they came: a token with non-ASCII characters is compared, not refused with a
    # TypeError. Starlette decodes header bytes as latin-1, so this gets them back.
    given = presented.encode("latin-1", errors="replace")
    # Compare against every token so timing says nothing about which one nearly matched.
    matches = [hmac.compare_digest(given, t.get_secret_value().encode()) for t in tokens]
    return any(matches)


async def require_token(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """The dependency of every /v1/ route: 401 without a configured token."""
    if not authorized(request):
        raise unauthorized()


async def require_token_for_ops(
    request: Request,
    deps: Deps,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """/metrics, /readyz and the API description need the token when metrics_require_auth.

    It declares the scheme as ``require_token`` does; FastAPI then lists it as required, and
    ``ops.openapi`` says what the setting in force makes of it.
    """
    if deps.state.settings.server.metrics_require_auth and not authorized(request):
        raise unauthorized()


class WebPageGuard:
    """With no token set (an open API, on loopback only), refuses what a web page in a browser
    on this machine could send: programs here may use the API, pages must not.

    A page on another site may POST to loopback without asking (a form, a fetch without a
    content type) and so register tasks or redeliver webhooks; browsers mark such a request
    (Sec-Fetch-Site, Origin). A page on a name its DNS points at 127.0.0.1 meanwhile (DNS
    rebinding) passes for the same site, and could read answers and sign in to the dashboard;
    its Host header then names that site, not a loopback address. Either is a 403.
    """

    def __init__(self, app: ASGIApp, state: ApiState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.state.settings.server.api_tokens:
            refusal = from_a_web_page(Headers(scope=scope))
            if refusal is not None:
                message = f"{refusal}: with no [server].api_tokens, only programs on this host"
                await ApiError(403, message).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def from_a_web_page(headers: Headers) -> str | None:
    """Why a request with ``headers`` may come from a web page rather than a program, or None."""
    host = headers.get("host", "")
    try:
        name = urlsplit(f"//{host}").hostname or ""
    except ValueError:
        name = ""
    if not is_loopback(name):
        return f"the Host {host[:100]!r} is not a loopback address"
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"a request from a web page ({site})"
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
        return f"a request from a web page on {origin[:100]!r}"
    return None
