"""The dashboard as a sub-application: what it is built from, how pages render, who may see them."""

from __future__ import annotations

import dataclasses
import http
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any

import jinja2
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tracker import clock as clock_module
from tracker.activity import Activity
from tracker.api.errors import allowed_methods
from tracker.api.models import could_be_stored
from tracker.clock import Clock
from tracker.config import Settings
from tracker.dashboard.figures import CountsCache
from tracker.dashboard.sessions import COOKIE, Session, Sessions, SignInThrottle
from tracker.paths import segment
from tracker.store import SqlStore
from tracker.store.dashboard_queries import DashboardQueries

#: where the dashboard is served
PREFIX = "/ui"

#: what every dashboard answer carries: no script at all, nothing from elsewhere, no framing,
#: no caching of pages that show tasks, no Referer leaking search text
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclasses.dataclass(slots=True)
class Dashboard:
    """Everything the pages read from: the store, the clock, live settings and figures."""

    store: SqlStore
    clock: Clock
    #: the settings in force (a reload may change the API tokens)
    settings: Callable[[], Settings]
    platforms: Sequence[str]
    activity: Activity | None = None
    #: seconds the poll cycle runs behind, None when the poller does not say
    poll_lag: Callable[[], float | None] | None = None
    sessions: Sessions = dataclasses.field(init=False)
    sign_ins: SignInThrottle = dataclasses.field(init=False)
    queries: DashboardQueries = dataclasses.field(init=False)
    counts: CountsCache = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        lifetime = self.settings().dashboard.session_lifetime
        self.sessions = Sessions(self.store, lifetime, time.time)
        self.sign_ins = SignInThrottle(time.monotonic)
        self.queries = DashboardQueries(self.store)
        self.counts = CountsCache(self.store.stats, self.clock)

    def still_accepted(self, session: Session) -> bool:
        """Whether the token ``session`` signed in with still signs in (a token taken out of
        the config ends the sessions it opened); with none configured, no token is needed."""
        return session.signed_in_with(self.accepted_tokens() or [""])

    def accepted_tokens(self) -> list[str]:
        """Tokens that sign in: every API token and the dashboard's own."""
        settings = self.settings()
        tokens = [t.get_secret_value() for t in settings.server.api_tokens]
        if settings.dashboard.token is not None:
            tokens.append(settings.dashboard.token.get_secret_value())
        return tokens

    def could_hold(self, platform: str, task_id: str) -> bool:
        """Whether a task could be stored under these names (`models.could_be_stored`)."""
        return could_be_stored(self.platforms, platform, task_id)


class SignInRequired(Exception):  # noqa: N818 - a redirect, not an error
    """The request has no live session."""


def dashboard_of(request: Request) -> Dashboard:
    """The dashboard a request reached (a FastAPI dependency)."""
    found: Dashboard = request.app.state.dashboard
    return found


async def live_session(request: Request) -> Session | None:
    """The request's live session (its token still accepted), None without one."""
    dash = dashboard_of(request)
    session = await run_in_threadpool(dash.sessions.get, request.cookies.get(COOKIE))
    if session is None or not dash.still_accepted(session):
        return None
    return session


async def session_of(request: Request) -> Session:
    """The request's live session; redirects to the sign-in page without one (a dependency)."""
    session = await live_session(request)
    if session is None:
        raise SignInRequired
    return session


SessionDep = Annotated[Session, Depends(session_of)]


def href(request: Request, path: str) -> str:
    """An absolute path under the dashboard's mount point."""
    return f"{request.scope.get('root_path', '')}{path}"


def _age(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "n/a"
    seconds = (now - moment).total_seconds()
    if seconds < 0:
        return f"in {_span(-seconds)}"
    return f"{_span(seconds)} ago"


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _when(moment: datetime | None) -> str:
    """A time as the pages show it: UTC to the millisecond, readable at a glance."""
    if moment is None:
        return ""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _from_epoch(seconds: float) -> str:
    return _when(datetime.fromtimestamp(seconds, UTC))


def _pretty(value: Any, limit: int = 20_000) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + "\n... (cut)"


def environment() -> jinja2.Environment:
    """The template environment: templates shipped in the package, everything escaped."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tracker.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["iso"] = clock_module.isoformat
    env.filters["when"] = _when
    env.filters["pretty"] = _pretty
    env.filters["epoch"] = _from_epoch
    env.filters["segment"] = segment
    env.globals["age"] = _age
    return env


class Renderer:
    """Renders a page with what every page needs (the session's CSRF token, the mount path)."""

    def __init__(self) -> None:
        self.env = environment()

    def page(
        self,
        request: Request,
        name: str,
        *,
        session: Session | None,
        status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        """``name`` rendered as an HTML answer."""
        dash = dashboard_of(request)
        html = self.env.get_template(name).render(
            base=href(request, ""),
            csrf=session.csrf if session is not None else "",
            signed_in=session is not None,
            now=dash.clock.now(),
            **context,
        )
        return HTMLResponse(html, status_code=status_code)


RENDER = Renderer()


def _stylesheet() -> bytes:
    return resources.files("tracker.dashboard").joinpath("static/dashboard.css").read_bytes()


def _error_page(request: Request, exc: HTTPException) -> Response:
    """The dashboard's error page for an HTTP error raised by routing (404, 405), with the
    error's headers (a 405's Allow names every method the path takes, not the router's one)."""
    status_code = exc.status_code
    headers = dict(exc.headers or {})
    if status_code == 404:
        problems = ["There is no dashboard page at this address."]
    elif status_code == 405:
        headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
        headers["Allow"] = allowed = allowed_methods(request)
        problems = [f"This page does not take a {request.method} request (it takes {allowed})."]
    else:
        problems = ["The dashboard could not answer this request."]
    try:
        title = http.HTTPStatus(status_code).phrase
    except ValueError:
        title = "Error"
    response = RENDER.page(
        request, "error.html", session=None, status_code=status_code, title=title,
        problems=problems, again=href(request, "/"), again_label="Go to the overview",
    )  # fmt: skip
    response.headers.update(headers)
    return response


def build(dashboard: Dashboard) -> FastAPI:
    """The dashboard sub-application, to mount at PREFIX."""
    # Imported here: the page modules import this one for its dependencies.
    from tracker.dashboard import actions, pages  # noqa: PLC0415

    ui = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    ui.state.dashboard = dashboard
    css = _stylesheet()

    @ui.middleware("http")
    async def _headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @ui.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        # A mistyped address or a wrong method gets the dashboard's own page, not the API's
        # JSON; it says what the visitor did wrong and nothing of the routes or the code.
        return _error_page(request, exc)

    @ui.exception_handler(SignInRequired)
    async def _to_sign_in(request: Request, _exc: SignInRequired) -> Response:
        return RedirectResponse(href(request, "/login"), status_code=303)

    @ui.get("/static/dashboard.css")
    async def stylesheet() -> Response:
        return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    ui.include_router(actions.router)
    ui.include_router(pages.router)
    return ui


def mount(app: FastAPI, dashboard: Dashboard) -> None:
    """Serve the dashboard under PREFIX of ``app`` when the settings enable it."""
    if dashboard.settings().dashboard_enabled():
        app.mount(PREFIX, build(dashboard))

        # The app redirects no slashes (tracker/api/application.py): the address people type
        # is sent to the dashboard's own.
        async def to_dashboard(request: Request) -> RedirectResponse:
            return RedirectResponse(f"{request.scope.get('root_path', '')}{PREFIX}/", 307)

        app.add_api_route(PREFIX, to_dashboard, include_in_schema=False, methods=["GET"])
