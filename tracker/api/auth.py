"""Bearer-token checks: for /v1/*, and for the operational routes when the config asks."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tracker.api.errors import unauthorized
from tracker.api.state import Deps, services

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


async def require_token_for_ops(request: Request, deps: Deps) -> None:
    """/metrics, /readyz and the API description need the token when metrics_require_auth."""
    if deps.state.settings.server.metrics_require_auth and not authorized(request):
        raise unauthorized()
