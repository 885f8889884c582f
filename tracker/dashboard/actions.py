"""Signing in and out, and the dashboard's buttons: each asks first, then says what it did.

Every state-changing request is a POST carrying the session's CSRF token; a GET only ever
shows the confirmation page or the result page. A button's POST answers 303 to its result
page (POST/redirect/GET), so reloading what it did shows it again and does nothing again.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from tracker.api.errors import problems as api_problems
from tracker.api.limits import no_delivery, row_id
from tracker.api.models import RecoverIn
from tracker.dashboard.forms import FormError, read_form
from tracker.dashboard.sessions import (
    COOKIE,
    LOGIN_COOKIE,
    LOGIN_LIFETIME,
    MAX_SIGN_IN_FAILURES,
    SIGN_IN_WINDOW,
    Session,
    csrf_ok,
    login_csrf,
    tokens_match,
)
from tracker.dashboard.web import RENDER, SessionDep, dashboard_of, href, live_session
from tracker.delivery.sending import target_now
from tracker.paths import segment
from tracker.store.records import DeliveryRecord

log = structlog.get_logger("tracker.dashboard")

router = APIRouter()


def _cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=href(request, "/") or "/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


#: what a refused form says: most often a page left open while the browser signed in again
STALE_FORM = (
    "Nothing was done: this page is out of date (you may have signed in again or signed out "
    "in another tab), or the form was forged. Reload the page and try again."
)


def _refused(request: Request, session: Session | None, again: str) -> HTMLResponse:
    """403 for a form without this session's CSRF token, linking to ``again``: the page
    (under the dashboard) to load again, whose forms carry this session's token."""
    log.warning("dashboard_csrf_refused", path=request.url.path)
    return RENDER.page(
        request, "error.html", session=session, status_code=403, title="Refused",
        problems=[STALE_FORM], again=href(request, again), again_label="Load the page again",
    )  # fmt: skip


def _note_form_refused(request: Request, exc: FormError) -> None:
    log.warning("dashboard_form_refused", path=request.url.path, status=exc.status_code)


def _form_refused(request: Request, session: Session | None, exc: FormError) -> HTMLResponse:
    _note_form_refused(request, exc)
    return RENDER.page(
        request, "error.html", session=session, status_code=exc.status_code,
        title="Form refused", problems=[exc.message],
    )  # fmt: skip


async def _checked_form(
    request: Request, session: Session, again: str
) -> dict[str, str] | Response:
    """The posted form's fields, or the page refusing it: a form too large or malformed
    (`forms.read_form`), or one whose CSRF token is not this session's (its page links to
    ``again``, the page to reload)."""
    try:
        fields = await read_form(request)
    except FormError as exc:
        return _form_refused(request, session, exc)
    if csrf_ok(session, fields.get("csrf")):
        return fields
    return _refused(request, session, again)


# -- result pages ----------------------------------------------------------------------------

#: delivery ids a result page lists at most (the rest are counted)
SHOWN_IDS = 200


def _encode(outcome: dict[str, Any]) -> str:
    text = json.dumps(outcome, separators=(",", ":"), ensure_ascii=True)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode(raw: str) -> dict[str, Any] | None:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError):
        return None
    return decoded if isinstance(decoded, dict) else None


def _done(
    request: Request,
    session: Session,
    *,
    title: str,
    lines: list[str],
    requeued: list[int],
    task: tuple[str, str] | None,
) -> RedirectResponse:
    """303 to the page saying what a button did.

    The result travels in that page's URL, signed with a MAC keyed by the session's cookie
    (`Session.sign`): no page shows the cookie, so nobody, the operator included, can make up
    a URL that shows a result which did not happen, and a URL from another session shows
    nothing. Carried in the URL, not in the database or a cookie: any daemon on the database
    shows it (a cookie would have to be shared by every tab; one tab's result would replace
    another's), reloading it shows the same result (when it happened included) and does
    nothing again, and it lasts as long as the session.
    """
    dash = dashboard_of(request)
    outcome = _encode(
        {
            "title": title, "lines": lines, "ids": requeued[:SHOWN_IDS], "count": len(requeued),
            "task": list(task) if task is not None else None, "at": dash.clock.now().timestamp(),
        }
    )  # fmt: skip
    query = urllib.parse.urlencode({"outcome": outcome, "sig": session.sign(outcome)})
    return RedirectResponse(href(request, f"/done?{query}"), status_code=303)


@router.get("/done")
async def done(request: Request, session: SessionDep) -> Response:
    """What a button did, as its POST said (`_done`); shown again on reload, done only once."""
    raw, sig = request.query_params.get("outcome"), request.query_params.get("sig")
    outcome = None
    if raw is not None and sig is not None and session.signed(raw, sig):
        outcome = _decode(raw)
    if outcome is None:
        return RENDER.page(
            request, "error.html", session=session, status_code=404, title="Not found",
            problems=["This result was not given to this session (it may have signed out "
                      "since): see the deliveries and tasks for what is there now."],
        )  # fmt: skip
    task = outcome["task"]
    return RENDER.page(
        request, "done.html", session=session, title=outcome["title"], lines=outcome["lines"],
        requeued=outcome["ids"], more=outcome["count"] - len(outcome["ids"]),
        task=tuple(task) if task is not None else None,
        at=datetime.fromtimestamp(outcome["at"], UTC),
    )  # fmt: skip


# -- sign-in ---------------------------------------------------------------------------------


def _sign_in_page(request: Request, *, problem: str | None, status_code: int) -> HTMLResponse:
    # The browser's one login CSRF token, kept while it holds it: every sign-in form it has
    # open (two tabs) carries the same one, so loading one form does not void another.
    token = login_csrf(request.cookies.get(LOGIN_COOKIE))
    dash = dashboard_of(request)
    response = RENDER.page(
        request, "login.html", session=None, status_code=status_code, login_csrf=token,
        problem=problem, open_access=not dash.accepted_tokens(),
    )  # fmt: skip
    _cookie(request, response, LOGIN_COOKIE, token, max_age=LOGIN_LIFETIME)
    return response


@router.get("/login")
async def sign_in_form(request: Request) -> Response:
    """The sign-in form (a token in a password field, sent by POST, never in the URL); a
    browser already signed in goes to the overview instead (no second session)."""
    if await live_session(request) is not None:
        return RedirectResponse(href(request, "/"), status_code=303)
    return _sign_in_page(request, problem=None, status_code=200)


@router.post("/login")
async def sign_in(request: Request) -> Response:
    """Exchange a token for a session cookie."""
    dash = dashboard_of(request)
    client = request.client.host if request.client else "unknown"
    try:
        form = await read_form(request)  # bounded: [server].header_timeout, MAX_FORM_BYTES
    except FormError as exc:
        _note_form_refused(request, exc)
        return _sign_in_page(request, problem=exc.message, status_code=exc.status_code)
    # Nothing is awaited from here to the count of a refusal: sign-ins sent at once pass this
    # one after another, so they check no more tokens than sign-ins sent one by one.
    wait = math.ceil(dash.sign_ins.wait(client))
    if wait:
        problem = f"too many refused sign-ins from this address; try again in {wait} s"
        held_back = _sign_in_page(request, problem=problem, status_code=429)
        held_back.headers["Retry-After"] = str(wait)
        return held_back
    presented, posted_csrf = form.get("token"), form.get("login_csrf")
    expected = request.cookies.get(LOGIN_COOKIE)
    if posted_csrf is None or expected is None or not tokens_match(posted_csrf, [expected]):
        problem = "this sign-in form was out of date: it is reloaded here, try again"
        return _sign_in_page(request, problem=problem, status_code=403)
    accepted = dash.accepted_tokens()
    # With no token configured the API itself is open (loopback only), so is the dashboard.
    token = presented if presented is not None else ""
    if accepted and not tokens_match(token, accepted):
        log.warning("dashboard_sign_in_refused", client=client)
        if dash.sign_ins.refused(client):
            log.warning(
                "dashboard_sign_ins_held_back", client=client, seconds=SIGN_IN_WINDOW,
                failures=MAX_SIGN_IN_FAILURES,
            )  # fmt: skip
        return _sign_in_page(request, problem="that token is not accepted", status_code=401)
    # The browser's session, if it has one still live (a sign-in form left open in another
    # tab), ends here: its cookie is about to be replaced, and nothing could sign it out after.
    previous = request.cookies.get(COOKIE)
    if previous:
        await run_in_threadpool(dash.sessions.end, previous)
    session = await run_in_threadpool(dash.sessions.start, token if accepted else "")
    log.info("dashboard_signed_in", sessions=await run_in_threadpool(dash.sessions.count))
    response = RedirectResponse(href(request, "/"), status_code=303)
    _cookie(request, response, COOKIE, session.id, max_age=int(dash.sessions.lifetime))
    # The login cookie stays: another sign-in form still open in this browser carries it.
    return response


@router.post("/logout")
async def sign_out(request: Request, session: SessionDep) -> Response:
    """End the session."""
    checked = await _checked_form(request, session, "/")
    if isinstance(checked, Response):
        return checked
    await run_in_threadpool(dashboard_of(request).sessions.end, session.id)
    response = RedirectResponse(href(request, "/login"), status_code=303)
    response.delete_cookie(COOKIE, path=href(request, "/") or "/")
    return response


# -- redeliver one ---------------------------------------------------------------------------


def _goes_to(request: Request, delivery: DeliveryRecord) -> str:
    """Where the confirmation says a redelivery goes, as the deliverer will send it now."""
    webhooks = dashboard_of(request).settings().webhooks
    url = target_now(
        webhooks, url=delivery.url, endpoint=delivery.endpoint, guarded=delivery.guarded
    )
    if url is not None:
        return f"and sent to {url}."
    if delivery.endpoint is not None:
        gone = f"endpoint {delivery.endpoint!r} is no longer in [webhooks.endpoints]"
    else:
        gone = "the config has no [webhooks].url any more"
    return (
        f"but it is not sent: {gone}. It is tried again on the retry schedule until "
        "the config names its target again, then dies."
    )


@router.get("/deliveries/{delivery_id}/redeliver")
async def redeliver_confirm(request: Request, session: SessionDep, delivery_id: str) -> Response:
    """Ask before sending one delivery again, saying where it goes now."""
    pk = row_id(delivery_id)
    if pk is None:
        return _missing(request, session, no_delivery(delivery_id))
    delivery = await run_in_threadpool(dashboard_of(request).store.get_delivery, pk)
    if delivery is None:
        return _missing(request, session, f"no delivery {pk}")
    return RENDER.page(
        request, "confirm.html", session=session, title="Redeliver this webhook?",
        action=href(request, f"/deliveries/{pk}/redeliver"), fields={},
        details=[
            f"Delivery {delivery.id} ({delivery.event_type}) of task {delivery.task_id} "
            f"on {delivery.platform}, now {delivery.state} after {delivery.attempts} attempts.",
            f"It is queued again with the same webhook-id {delivery.webhook_id} "
            + _goes_to(request, delivery),
        ],
        button="Redeliver",
    )  # fmt: skip


@router.post("/deliveries/{delivery_id}/redeliver")
async def redeliver(request: Request, session: SessionDep, delivery_id: str) -> Response:
    """Queue one delivery again, whatever its state, with the same webhook-id."""
    checked = await _checked_form(request, session, f"/deliveries/{segment(delivery_id)}/redeliver")
    if isinstance(checked, Response):
        return checked
    pk = row_id(delivery_id)
    if pk is None:
        return _missing(request, session, no_delivery(delivery_id))
    dash = dashboard_of(request)
    requeued = await run_in_threadpool(lambda: dash.store.requeue(dash.clock.now(), pk=pk))
    if not requeued:
        return _missing(request, session, f"no delivery {pk}")
    log.info("dashboard_redeliver", delivery=pk)
    delivery = await run_in_threadpool(dash.store.get_delivery, pk)
    return _done(
        request, session, title="Queued again",
        lines=[f"Delivery {pk} is queued again and goes out with the next delivery pass."],
        requeued=requeued,
        task=(delivery.platform, delivery.task_id) if delivery is not None else None,
    )  # fmt: skip


def _missing(request: Request, session: Session, problem: str) -> HTMLResponse:
    return RENDER.page(
        request, "error.html", session=session, status_code=404, title="Not found",
        problems=[problem],
    )  # fmt: skip


# -- recover the dead ones of a window -------------------------------------------------------


def _window_time(raw: str | None, name: str, problems: list[str]) -> datetime | None:
    """A time from a form: ISO 8601, read as UTC when it names no zone (datetime-local)."""
    if not raw:
        return None
    try:
        parsed = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError:
        problems.append(f"{name}: must be a time like 2026-11-25T10:00 (UTC)")
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _window(fields: dict[str, str]) -> tuple[datetime | None, datetime | None, list[str]]:
    problems: list[str] = []
    since = _window_time(fields.get("since"), "since", problems)
    until = _window_time(fields.get("until"), "until", problems)
    if since is None and not problems:
        problems.append("since: required")
    if problems or since is None:
        return None, None, problems
    # The API's own bounds: past them a time overflows on its way to UTC or into the database.
    window = {"since": since.isoformat(), "until": until.isoformat() if until else None}
    try:
        checked = RecoverIn.model_validate(window)
    except ValidationError as exc:
        return None, None, api_problems(exc.errors())
    if checked.until is not None and checked.until <= checked.since:
        return None, None, ["until: must be after since"]
    return checked.since, checked.until, []


@router.get("/recover")
async def recover_confirm(request: Request, session: SessionDep) -> Response:
    """Ask before queueing again every dead delivery created in a window."""
    since, until, problems = _window(dict(request.query_params))
    if problems:
        return RENDER.page(
            request, "error.html", session=session, status_code=400, title="Bad request",
            problems=problems,
        )  # fmt: skip
    dash = dashboard_of(request)
    count = await run_in_threadpool(dash.queries.dead_in_window, since, until)
    window = f"from {since:%Y-%m-%d %H:%M:%S} UTC" + (
        f" until {until:%Y-%m-%d %H:%M:%S} UTC" if until is not None else " until now"
    )
    fields = {"since": since.isoformat() if since else ""}
    if until is not None:
        fields["until"] = until.isoformat()
    return RENDER.page(
        request, "confirm.html", session=session, title="Recover dead deliveries?",
        action=href(request, "/recover"), fields=fields,
        details=[f"{count} dead deliveries were created {window}.",
                 "Each is queued again with its own webhook-id."],
        button=f"Recover {count}",
    )  # fmt: skip


@router.post("/recover")
async def recover(request: Request, session: SessionDep) -> Response:
    """Queue again every dead delivery created in the window."""
    fields = await _checked_form(request, session, "/deliveries?state=dead")
    if isinstance(fields, Response):
        return fields
    since, until, problems = _window(fields)
    if problems:
        return RENDER.page(
            request, "error.html", session=session, status_code=400, title="Bad request",
            problems=problems,
        )  # fmt: skip
    dash = dashboard_of(request)
    requeued = await run_in_threadpool(
        lambda: dash.store.requeue(dash.clock.now(), since=since, until=until)
    )
    log.info("dashboard_recover", requeued=len(requeued))
    return _done(
        request, session, title="Recovered",
        lines=[f"{len(requeued)} dead deliveries are queued again."], requeued=requeued, task=None,
    )  # fmt: skip


# -- stop tracking a task --------------------------------------------------------------------


@router.get("/remove/{platform}/{task_id:path}")
async def remove_confirm(
    request: Request, session: SessionDep, platform: str, task_id: str
) -> Response:
    """Ask before forgetting a task."""
    dash = dashboard_of(request)
    task = None
    if dash.could_hold(platform, task_id):
        task = await run_in_threadpool(dash.store.get, platform, task_id)
    if task is None:
        return _missing(request, session, f"no task {task_id!r} on platform {platform!r}")
    return RENDER.page(
        request, "confirm.html", session=session, title="Stop tracking this task?",
        action=href(request, f"/remove/{segment(platform)}/{segment(task_id)}"), fields={},
        details=[f"Task {task_id} on {platform} ({task.status}) is deleted with its history "
                 "and its undelivered webhooks; no webhook follows."],
        button="Stop tracking",
    )  # fmt: skip


@router.post("/remove/{platform}/{task_id:path}")
async def remove(request: Request, session: SessionDep, platform: str, task_id: str) -> Response:
    """Stop tracking a task."""
    checked = await _checked_form(
        request, session, f"/remove/{segment(platform)}/{segment(task_id)}"
    )
    if isinstance(checked, Response):
        return checked
    dash = dashboard_of(request)
    removed = dash.could_hold(platform, task_id) and await run_in_threadpool(
        dash.store.remove, platform, task_id
    )
    if not removed:
        return _missing(request, session, f"no task {task_id!r} on platform {platform!r}")
    log.info("dashboard_remove", platform=platform, task_id=task_id)
    return _done(
        request, session, title="No longer tracked",
        lines=[f"Task {task_id} on {platform} is no longer tracked."], requeued=[], task=None,
    )  # fmt: skip
