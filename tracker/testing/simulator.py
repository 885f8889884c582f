"""A simulated relay on loopback speaking the new-api, midjourney-proxy and Replicate formats.

The HTTP side lives here (routes, authentication, recorded requests, how a faulty answer goes
out on the wire); the formats are in `relay_formats`, the faults in `relay_faults`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from tracker.testing.loopback import LoopbackServer, QuietHandler
from tracker.testing.relay_faults import (
    FAULT_KINDS,
    HUGE_BODY_BYTES,
    POISON_KINDS,
    SPOILERS,
    Answer,
    fault_answer,
    json_answer,
    poison_item,
    spoil,
    write_body,
)
from tracker.testing.relay_formats import (
    FAMILIES,
    ScriptedTask,
    Snapshot,
    Step,
    check_family,
    default_script,
    kling_dto,
    luma_item,
    mj_item,
    prediction,
    snapshot_of,
    suno_item,
    video_dto,
)

# The relay's public names, wherever they are defined.
__all__ = [
    "FAMILIES",
    "FAULT_KINDS",
    "POISON_KINDS",
    "RecordedRequest",
    "SimulatedRelay",
    "Step",
    "default_script",
    "main",
]

_UNAUTHORIZED: Final = {"code": "unauthorized", "message": "invalid token", "data": None}
_TASK_NOT_EXIST: Final = {"code": "task_not_exist", "message": "task_not_exist", "data": None}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the simulator received; `json_body` is the parsed body or None."""

    method: str
    path: str
    headers: dict[str, str]
    json_body: Any
    at: float


class _RelayHandler(QuietHandler):
    @property
    def _owner(self) -> SimulatedRelay:
        return cast("SimulatedRelay", self.server.owner)

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        answer = self._owner._answer(
            self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, raw
        )
        if answer.transport in ("reset", "hang_up"):
            self._drop(reset=answer.transport == "reset")
            return
        chunked = answer.transport == "huge_chunked"
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            size = HUGE_BODY_BYTES if answer.transport == "huge_body" else len(answer.body)
            self.send_header("Content-Length", str(size))
        for name, value in answer.extra.items():
            self.send_header(name, value)
        self.end_headers()
        owner = self._owner
        try:
            if write_body(
                self.wfile, answer, owner.stopping, owner.stall_seconds, owner.trickle_seconds
            ):
                self.close_connection = True
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _drop(self, *, reset: bool) -> None:
        """Close without answering; with ``reset``, abort the connection (TCP RST)."""
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True


class SimulatedRelay(LoopbackServer):
    """A relay on 127.0.0.1 whose tasks walk through scripted statuses, with injectable faults.

    A task advances one script step every `step` seconds from when it was created (`step=0`
    jumps straight to the last step). Faults queued by `fail_next` are consumed by the next
    requests whatever their path, before authentication is checked; `slow` delays the answer
    and then serves the request normally. `latency` delays every answer by a fixed time, as a
    relay querying its own database does (0, the default, answers at once). `requests` keeps
    the newest `record_limit` requests.
    """

    handler = _RelayHandler
    kind = "simulated relay"

    def __init__(
        self,
        *,
        api_key: str = "sk-sim",
        step: float = 1.0,
        auto_create: bool = True,
        seed: int = 0,
        record_limit: int | None = 10_000,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.step = step
        self.auto_create = auto_create
        self.luma_bare_array = False
        self.luma_int_times = False
        #: what Luma items say in data.estimate_wait_seconds while not finished
        self.luma_estimate_wait: float | None = None
        #: ids a batch query answers at most, the others left out (one-hub: 100); None: all
        self.answer_cap: int | None = None
        self.slow_seconds = 2.0
        #: seconds every answer waits before it goes out (a real relay's database query)
        self.latency = 0.0
        #: how long a `stall` answer holds its body back (it ends sooner when the relay stops)
        self.stall_seconds = 60.0
        #: seconds between two bytes of a `trickle` answer
        self.trickle_seconds = 0.05
        #: set while stopping, so stalled and trickling answers end
        self.stopping = threading.Event()
        super().__init__(host=host, port=port)
        # Order shuffling is for realism, not security.
        self._rng = random.Random(seed)  # noqa: S311
        self._tasks: dict[tuple[str, str], ScriptedTask] = {}
        self._hidden: set[tuple[str, str]] = set()
        self._faults: deque[str] = deque()
        self._poisons: dict[tuple[str, str], str] = {}
        # Bounded so a benchmark's thousands of 1000-id batches do not eat the memory; 0 = off.
        self._requests: deque[RecordedRequest] = deque(maxlen=record_limit)
        self._next_row_id = 1

    @property
    def url(self) -> str:
        return self.base_url

    # -- scripting ---------------------------------------------------------------------------

    def add(self, family: str, task_id: str, script: Sequence[Step] | None = None) -> None:
        """Create (or restart) a task whose clock starts now; None means the default script."""
        check_family(family)
        steps = tuple(script) if script is not None else default_script(family, task_id)
        if not steps:
            raise ValueError(f"script for {family}/{task_id} has no steps")
        with self._lock:
            self._create(family, task_id, steps)

    def set(
        self,
        family: str,
        task_id: str,
        status: str,
        progress: str | None = None,
        fail_reason: str = "",
    ) -> None:
        """Pin a task to one state from now on, creating it if needed."""
        check_family(family)
        step = Step(status, progress, fail_reason)
        now, wall = time.monotonic(), time.time()
        with self._lock:
            task = self._tasks.get((family, task_id))
            if task is None:
                self._create(family, task_id, (step,))
            else:
                task.script, task.began, task.began_wall = (step,), now, wall

    def hide(self, family: str, task_id: str) -> None:
        """Leave the id out of every answer, as relays do with ids they do not know."""
        check_family(family)
        with self._lock:
            self._hidden.add((family, task_id))

    def unhide(self, family: str, task_id: str) -> None:
        check_family(family)
        with self._lock:
            self._hidden.discard((family, task_id))

    def status_of(self, family: str, task_id: str) -> Step | None:
        """The step a task is on now, or None if the relay does not know it."""
        with self._lock:
            task = self._tasks.get((family, task_id))
            if task is None:
                return None
            return snapshot_of(task_id, task, time.monotonic(), self.step).step

    def fail_next(self, kind: str, count: int = 1) -> None:
        """Make the next `count` requests fail with `kind` (see FAULT_KINDS)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        with self._lock:
            self._faults.extend([kind] * count)

    def clear_faults(self) -> None:
        """Drop the faults queued by `fail_next` and not served yet: answer normally again."""
        with self._lock:
            self._faults.clear()

    def poison(self, family: str, task_id: str, kind: str) -> None:
        """Make this task's item malformed in every answer from now on (see POISON_KINDS)."""
        check_family(family)
        if kind not in POISON_KINDS:
            raise ValueError(
                f"unknown poison kind {kind!r}; expected one of {sorted(POISON_KINDS)}"
            )
        with self._lock:
            self._poisons[family, task_id] = kind

    def start(self) -> SimulatedRelay:
        """Serve (again)."""
        self.stopping.clear()
        super().start()
        return self

    def stop(self) -> None:
        """Stop serving; stalled and trickling answers end."""
        self.stopping.set()
        super().stop()

    @property
    def pending_faults(self) -> int:
        """Faults queued by `fail_next` and not served yet."""
        with self._lock:
            return len(self._faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _create(self, family: str, task_id: str, script: tuple[Step, ...]) -> ScriptedTask:
        wall = time.time()
        task = ScriptedTask(self._next_row_id, script, wall, time.monotonic(), wall)
        self._next_row_id += 1
        self._tasks[family, task_id] = task
        return task

    def _lookup(self, family: str, task_id: str, now: float) -> Snapshot | None:
        """Snapshot of a visible task, auto-creating it if allowed; caller holds the lock."""
        key = (family, task_id)
        if key in self._hidden:
            return None
        task = self._tasks.get(key)
        if task is None:
            if not self.auto_create:
                return None
            task = self._create(family, task_id, default_script(family, task_id))
        return snapshot_of(task_id, task, now, self.step)

    # -- HTTP --------------------------------------------------------------------------------

    def _answer(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        with self._lock:
            self._requests.append(RecordedRequest(method, path, headers, body, time.monotonic()))
            fault = self._faults.popleft() if self._faults else None
        if self.latency > 0:
            # One thread per request: the wait costs no CPU and holds up no other answer.
            time.sleep(self.latency)
        if fault == "slow":
            time.sleep(self.slow_seconds)
        elif fault == "echo_key":
            quoted = headers.get("authorization") or headers.get("mj-api-secret") or ""
            page = f"<html>502: upstream refused request with {quoted}</html>"
            return Answer(502, page.encode(), "text/html", {})
        elif fault == "echo_key_code":
            quoted = headers.get("authorization") or headers.get("mj-api-secret") or ""
            key = quoted.removeprefix("Bearer ")
            message = f"token {key} has been disabled"
            return json_answer(200, {"code": "invalid_token", "message": message, "data": None})
        elif fault is not None and fault not in SPOILERS:
            return fault_answer(fault)
        route = path.split("?", 1)[0].rstrip("/")
        if not self._authorized(route, headers):
            return json_answer(401, _UNAUTHORIZED)
        answer = self._route(method, route, body)
        return answer if fault is None or fault == "slow" else spoil(answer, fault)

    def _authorized(self, route: str, headers: dict[str, str]) -> bool:
        if headers.get("authorization") == f"Bearer {self.api_key}":
            return True
        return route.startswith("/mj/") and headers.get("mj-api-secret") == self.api_key

    def _route(self, method: str, route: str, body: Any) -> Answer:
        parts = route.strip("/").split("/")
        if method == "POST" and route in (
            "/luma/tasks",
            "/suno/fetch",
            "/mj/task/list-by-condition",
        ):
            ids = body.get("ids") if isinstance(body, dict) else None
            if ids is not None and not isinstance(ids, list):
                return json_answer(
                    400, {"code": "invalid_request", "message": "ids must be a list", "data": None}
                )
            return self._batch(route, [i for i in ids or [] if isinstance(i, str)])
        if method == "GET":
            if len(parts) == 4 and parts[:3] == ["v1", "video", "generations"]:
                return self._single("video", parts[3], "")
            if (
                len(parts) == 5
                and parts[:3] == ["kling", "v1", "videos"]
                and parts[3] in ("text2video", "image2video")
            ):
                return self._single("kling", parts[4], parts[3])
            if len(parts) == 3 and parts[:2] == ["v1", "predictions"]:
                return self._single("replicate", parts[2], "")
        # new-api's (and one-api's) own answer for a path it does not serve
        error = {
            "message": f"Invalid URL ({method} {route})",
            "type": "invalid_request_error",
            "param": "",
            "code": "",
        }
        return json_answer(404, {"error": error})

    def _batch(self, route: str, ids: list[str]) -> Answer:
        family = {"/luma/tasks": "luma", "/suno/fetch": "suno"}.get(route, "midjourney")
        now = time.monotonic()
        with self._lock:
            snaps = [s for i in dict.fromkeys(ids) if (s := self._lookup(family, i, now))]
            self._rng.shuffle(snaps)
            if self.answer_cap is not None:  # a LIMIT on the relay's query: any that many
                del snaps[self.answer_cap :]
            bare_luma, int_times = self.luma_bare_array, self.luma_int_times
            wait = self.luma_estimate_wait
            poisons = dict(self._poisons)
        if family == "midjourney":
            items = [mj_item(s) for s in snaps]
        elif family == "suno":
            items = [suno_item(s) for s in snaps]
        else:
            items = [luma_item(s, int_times=int_times, wait=wait) for s in snaps]
        items = [
            poisoned
            for snap, item in zip(snaps, items, strict=True)
            for poisoned in poison_item(item, poisons.get((family, snap.task_id)))
        ]
        if family == "midjourney" or bare_luma:
            return json_answer(200, items)
        return json_answer(200, {"code": "success", "message": "", "data": items})

    def _single(self, family: str, task_id: str, action: str) -> Answer:
        with self._lock:
            snap = self._lookup(family, task_id, time.monotonic())
            poison = self._poisons.get((family, task_id))
        if family == "replicate":
            if snap is None:
                return json_answer(404, {"detail": "Not found."})
            return json_answer(200, poison_item(prediction(snap, self.base_url), poison)[0])
        if snap is None:
            return json_answer(400, _TASK_NOT_EXIST)
        dto = kling_dto(snap, action) if family == "kling" else video_dto(snap)
        dto = poison_item(dto, poison)[0]
        return json_answer(200, {"code": "success", "message": "", "data": dto})


def main(argv: Sequence[str] | None = None) -> None:
    """Run the simulated relay in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m tracker.testing.simulator", description=__doc__
    )
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--step", type=float, default=1.0, help="seconds per status step")
    parser.add_argument("--api-key", default="sk-sim")
    args = parser.parse_args(argv)
    with SimulatedRelay(api_key=args.api_key, step=args.step, port=args.port) as relay:
        print(f"simulated relay on {relay.base_url} (key {args.api_key})", flush=True)  # noqa: T201
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
