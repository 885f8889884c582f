"""Tests for the simulated relay, spoken to over real HTTP on loopback."""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tracker.testing.simulator import FAULT_KINDS, SimulatedRelay, Step

AUTH = {"Authorization": "Bearer sk-sim"}
TASK_DTO_KEYS = {
    "task_id",
    "notify_hook",
    "action",
    "status",
    "fail_reason",
    "submit_time",
    "start_time",
    "finish_time",
    "progress",
    "data",
}


@pytest.fixture(name="relay")
def _relay() -> Iterator[SimulatedRelay]:
    # A long step keeps tasks on their first state unless a test says otherwise.
    with SimulatedRelay(step=60.0) as relay:
        yield relay


@pytest.fixture(name="done_relay")
def _done_relay() -> Iterator[SimulatedRelay]:
    # step=0 puts every task on the last step of its script at once.
    with SimulatedRelay(step=0.0) as relay:
        yield relay


def client_for(relay: SimulatedRelay, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=relay.base_url, headers=AUTH, **kwargs)


def luma(relay: SimulatedRelay, *ids: str) -> Any:
    with client_for(relay) as client:
        response = client.post("/luma/tasks", json={"ids": list(ids)})
    assert response.status_code == 200
    return response.json()


def test_luma_item_has_the_seed_doc_shape(relay: SimulatedRelay) -> None:
    """A Luma batch answer is the success envelope holding items with every seed-doc field."""
    answer = luma(relay, "t1")

    assert {k: answer[k] for k in ("code", "message")} == {"code": "success", "message": ""}
    [item] = answer["data"]
    assert {
        "id",
        "created_at",
        "updated_at",
        "task_id",
        "platform",
        "action",
        "status",
        "fail_reason",
        "submit_time",
        "start_time",
        "finish_time",
        "progress",
        "data",
    } == set(item)
    assert (item["task_id"], item["platform"], item["action"]) == ("t1", "luma_free", "LUMA_VIDEO")
    assert (item["status"], item["progress"], item["fail_reason"]) == ("NOT_START", "0%", "")
    assert isinstance(item["id"], int)
    assert item["created_at"].endswith("Z")
    assert item["submit_time"] > 1_600_000_000
    assert (item["start_time"], item["finish_time"]) == (0, 0)
    vendor = item["data"]
    assert {
        "id",
        "prompt",
        "state",
        "video",
        "liked",
        "created_at",
        "estimate_wait_seconds",
    } == set(vendor)
    assert (vendor["id"], vendor["state"], vendor["video"]) == ("t1", "pending", None)


def test_luma_success_carries_the_video(done_relay: SimulatedRelay) -> None:
    """A finished Luma task has state completed, all three times and the video URL."""
    [item] = luma(done_relay, "t1")["data"]

    assert (item["status"], item["progress"]) == ("SUCCESS", "100%")
    assert 0 < item["submit_time"] <= item["start_time"] <= item["finish_time"]
    assert item["data"]["state"] == "completed"
    assert item["data"]["video"]["url"] == "https://cdn.example.invalid/t1.mp4"
    assert {"url", "width", "height", "thumbnail"} == set(item["data"]["video"])


def test_luma_bare_array_and_int_times(relay: SimulatedRelay) -> None:
    """The Luma options answer a bare array and integer created_at/updated_at."""
    relay.luma_bare_array = True
    relay.luma_int_times = True

    answer = luma(relay, "t1")

    assert isinstance(answer, list)
    assert isinstance(answer[0]["created_at"], int)
    assert isinstance(answer[0]["updated_at"], int)


def test_failing_id_ends_in_failure_with_reason(done_relay: SimulatedRelay) -> None:
    """An id containing 'fail' ends with FAILURE, a reason and a failed vendor state."""
    [item] = luma(done_relay, "will-fail-1")["data"]

    assert (item["status"], item["progress"]) == ("FAILURE", "100%")
    assert "will-fail-1" in item["fail_reason"]
    assert item["finish_time"] > 0
    assert (item["data"]["state"], item["data"]["video"]) == ("failed", None)


def test_suno_items_are_task_dtos_with_clip_lists(done_relay: SimulatedRelay) -> None:
    """Suno answers TaskDtos whose data is a list of complete clips with audio URLs."""
    with client_for(done_relay) as client:
        answer = client.post("/suno/fetch", json={"ids": ["s1"], "action": "MUSIC"}).json()

    assert answer["code"] == "success"
    [item] = answer["data"]
    assert set(item) == TASK_DTO_KEYS
    assert (item["action"], item["status"], item["progress"]) == ("MUSIC", "SUCCESS", "100%")
    assert isinstance(item["data"], list)
    assert item["data"]
    for clip in item["data"]:
        assert {"id", "title", "status", "audio_url"} == set(clip)
        assert clip["status"] == "complete"
        assert clip["audio_url"].endswith(".mp3")


def test_midjourney_answers_a_bare_camel_case_array(relay: SimulatedRelay) -> None:
    """Midjourney answers a bare array of camelCase tasks with null times before they happen."""
    with client_for(relay) as client:
        answer = client.post("/mj/task/list-by-condition", json={"ids": ["m1"]}).json()

    [task] = answer
    assert {
        "id",
        "action",
        "status",
        "prompt",
        "promptEn",
        "description",
        "submitTime",
        "startTime",
        "finishTime",
        "imageUrl",
        "progress",
        "failReason",
        "properties",
    } == set(task)
    assert (task["id"], task["action"], task["status"]) == ("m1", "IMAGINE", "NOT_START")
    assert task["submitTime"] > 1_600_000_000_000  # milliseconds
    assert (task["startTime"], task["finishTime"]) == (None, None)


def test_midjourney_failure_has_empty_progress(done_relay: SimulatedRelay) -> None:
    """A failed midjourney task shows progress "" like midjourney-proxy, with a reason."""
    with client_for(done_relay) as client:
        [task] = client.post("/mj/task/list-by-condition", json={"ids": ["m-fail"]}).json()

    assert (task["status"], task["progress"]) == ("FAILURE", "")
    assert task["failReason"]
    assert task["finishTime"] > 1_600_000_000_000
    assert task["imageUrl"] is None


def test_video_task_dto_gets_result_url_on_success(done_relay: SimulatedRelay) -> None:
    """The per-id video endpoint wraps a TaskDto with result_url once SUCCESS."""
    with client_for(done_relay) as client:
        answer = client.get("/v1/video/generations/v1").json()

    assert (answer["code"], answer["message"]) == ("success", "")
    dto = answer["data"]
    assert TASK_DTO_KEYS | {"result_url"} == set(dto)
    assert dto["result_url"] == "https://cdn.example.invalid/v1.mp4"
    assert isinstance(dto["data"], dict)


def test_video_before_success_has_no_result_url(relay: SimulatedRelay) -> None:
    """A video task that is not finished has no result_url field."""
    with client_for(relay) as client:
        dto = client.get("/v1/video/generations/v1").json()["data"]

    assert set(dto) == TASK_DTO_KEYS
    assert dto["status"] == "NOT_START"


@pytest.mark.parametrize("action", ["text2video", "image2video"])
def test_kling_task_dto_holds_a_kling_record(done_relay: SimulatedRelay, action: str) -> None:
    """The Kling endpoint answers a TaskDto whose data is Kling's own task record."""
    with client_for(done_relay) as client:
        dto = client.get(f"/kling/v1/videos/{action}/k1").json()["data"]

    assert TASK_DTO_KEYS | {"result_url"} == set(dto)
    assert ("SUCCESS", action) == (dto["status"], dto["action"])
    assert dto["data"]["task_status"] == "succeed"
    assert dto["result_url"] == dto["data"]["task_result"]["videos"][0]["url"]


def test_kling_rejects_unknown_action(relay: SimulatedRelay) -> None:
    """Only text2video and image2video are Kling routes."""
    with client_for(relay) as client:
        response = client.get("/kling/v1/videos/lipsync/k1")

    assert response.status_code == 404
    assert response.json()["error"]["message"].startswith("Invalid URL (GET /kling/")


def test_replicate_prediction_shape(done_relay: SimulatedRelay) -> None:
    """A finished Replicate prediction is succeeded with a list of output URLs."""
    with client_for(done_relay) as client:
        prediction = client.get("/v1/predictions/p1").json()

    assert {
        "id",
        "model",
        "version",
        "input",
        "logs",
        "output",
        "error",
        "status",
        "created_at",
        "started_at",
        "completed_at",
        "urls",
    } == set(prediction)
    assert (prediction["status"], prediction["error"]) == ("succeeded", None)
    assert prediction["output"] == ["https://cdn.example.invalid/p1.mp4"]
    assert prediction["completed_at"].endswith("Z")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("NOT_START", "starting"),
        ("SUBMITTED", "starting"),
        ("QUEUED", "starting"),
        ("IN_PROGRESS", "processing"),
        ("SUCCESS", "succeeded"),
        ("FAILURE", "failed"),
        ("CANCEL", "canceled"),
        ("BOGUS_WORD", "BOGUS_WORD"),
    ],
)
def test_replicate_status_mapping(relay: SimulatedRelay, status: str, expected: str) -> None:
    """Script statuses map onto Replicate's words, unknown words pass through."""
    relay.set("replicate", "p1", status, fail_reason="boom" if status == "FAILURE" else "")

    with client_for(relay) as client:
        prediction = client.get("/v1/predictions/p1").json()

    assert expected == prediction["status"]
    assert ("boom" if status == "FAILURE" else None) == prediction["error"]


def test_unknown_route_is_new_apis_invalid_url_404(relay: SimulatedRelay) -> None:
    """Any path the relay does not serve answers 404 with new-api's own error body."""
    with client_for(relay) as client:
        responses = [client.get("/v1/chat/completions"), client.put("/luma/tasks", json={})]

    assert [r.status_code for r in responses] == [404, 404]
    assert [r.json()["error"]["message"] for r in responses] == [
        "Invalid URL (GET /v1/chat/completions)",
        "Invalid URL (PUT /luma/tasks)",
    ]


def test_ids_must_be_a_list(relay: SimulatedRelay) -> None:
    """A batch body whose ids is not a list is a 400."""
    with client_for(relay) as client:
        response = client.post("/luma/tasks", json={"ids": "t1"})

    assert response.status_code == 400


def test_tasks_advance_one_step_per_period_and_stay_on_the_last() -> None:
    """A task walks its whole script one step per period and then stays on the last step."""
    script = [Step("SUBMITTED", "10%"), Step("IN_PROGRESS", "50%"), Step("SUCCESS", "100%")]
    # 0.1 s steps polled every 10 ms: only a 100 ms stall of the test could skip a step.
    with SimulatedRelay(step=0.1, auto_create=False) as relay, client_for(relay) as client:
        relay.add("luma", "t1", script)
        seen: list[tuple[str, str]] = []
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and seen[-1:] != [("SUCCESS", "100%")]:
            [item] = client.post("/luma/tasks", json={"ids": ["t1"]}).json()["data"]
            if not seen or seen[-1] != (item["status"], item["progress"]):
                seen.append((item["status"], item["progress"]))
            time.sleep(0.01)
        time.sleep(0.25)
        [after] = client.post("/luma/tasks", json={"ids": ["t1"]}).json()["data"]

    assert [(s.status, s.progress) for s in script] == seen
    assert after["status"] == "SUCCESS"
    assert after["start_time"] > 0


def test_set_pins_a_raw_status_word(relay: SimulatedRelay) -> None:
    """set() pins a task to any word, which the answer carries unchanged."""
    relay.set("luma", "t1", "WEIRD_WORD", "42%")

    [item] = luma(relay, "t1")["data"]

    assert (item["status"], item["progress"]) == ("WEIRD_WORD", "42%")
    assert Step("WEIRD_WORD", "42%") == relay.status_of("luma", "t1")


def test_set_replaces_a_running_script(relay: SimulatedRelay) -> None:
    """set() on a known task keeps its row id and submit time but replaces its state."""
    [before] = luma(relay, "t1")["data"]
    relay.set("luma", "t1", "FAILURE", "100%", "content policy")

    [after] = luma(relay, "t1")["data"]

    assert (before["id"], before["submit_time"]) == (after["id"], after["submit_time"])
    assert (after["status"], after["fail_reason"]) == ("FAILURE", "content policy")
    assert after["finish_time"] > 0


def test_hide_leaves_ids_out_everywhere(relay: SimulatedRelay) -> None:
    """Hidden ids are omitted from batches and unknown to per-id endpoints until unhidden."""
    relay.hide("luma", "gone")
    relay.hide("video", "gone")
    relay.hide("replicate", "gone")

    with client_for(relay) as client:
        batch = client.post("/luma/tasks", json={"ids": ["gone", "here"]}).json()["data"]
        video = client.get("/v1/video/generations/gone")
        prediction = client.get("/v1/predictions/gone")
        relay.unhide("luma", "gone")
        batch_after = client.post("/luma/tasks", json={"ids": ["gone"]}).json()["data"]

    assert [item["task_id"] for item in batch] == ["here"]
    assert (video.status_code, video.json()["code"]) == (400, "task_not_exist")
    assert (prediction.status_code, prediction.json()) == (404, {"detail": "Not found."})
    assert [item["task_id"] for item in batch_after] == ["gone"]


def test_without_auto_create_only_added_tasks_exist() -> None:
    """With auto_create off unknown ids are dropped from batches and 400/404 per id."""
    with SimulatedRelay(auto_create=False) as relay, client_for(relay) as client:
        relay.add("suno", "known")
        batch = client.post("/suno/fetch", json={"ids": ["known", "stranger"]}).json()
        kling = client.get("/kling/v1/videos/text2video/stranger")
        prediction = client.get("/v1/predictions/stranger")

    assert [item["task_id"] for item in batch["data"]] == ["known"]
    assert (kling.status_code, kling.json()["code"]) == (400, "task_not_exist")
    assert prediction.status_code == 404
    assert relay.status_of("suno", "stranger") is None


def test_batch_order_is_shuffled_reproducibly() -> None:
    """Batch answers come in a seeded order that is not the request order."""
    ids = [f"t{n}" for n in range(20)]
    orders = []
    for _ in range(2):
        with SimulatedRelay(seed=7) as relay:
            orders.append([item["task_id"] for item in luma(relay, *ids)["data"]])

    assert sorted(ids) == sorted(orders[0])
    assert ids != orders[0]
    assert orders[0] == orders[1]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "sk-sim"},
        {"mj-api-secret": "sk-sim"},
    ],
)
def test_wrong_credentials_get_401(relay: SimulatedRelay, headers: dict[str, str]) -> None:
    """Without the right bearer token (mj-api-secret only counts for /mj/) the relay says 401."""
    response = httpx.post(f"{relay.base_url}/luma/tasks", json={"ids": ["t1"]}, headers=headers)

    assert response.status_code == 401
    assert response.json() == {"code": "unauthorized", "message": "invalid token", "data": None}


def test_midjourney_accepts_mj_api_secret(relay: SimulatedRelay) -> None:
    """Midjourney routes accept the key in the mj-api-secret header."""
    response = httpx.post(
        f"{relay.base_url}/mj/task/list-by-condition",
        json={"ids": ["m1"]},
        headers={"mj-api-secret": "sk-sim"},
    )

    assert response.status_code == 200
    assert [task["id"] for task in response.json()] == ["m1"]


def test_custom_api_key(relay: SimulatedRelay) -> None:
    """The bearer token checked is the configured api_key."""
    with SimulatedRelay(api_key="sk-other") as other:
        ok = httpx.get(
            f"{other.base_url}/v1/predictions/p", headers={"Authorization": "Bearer sk-other"}
        )
        default = httpx.get(f"{other.base_url}/v1/predictions/p", headers=AUTH)

    assert (ok.status_code, default.status_code) == (200, 401)


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("http_500", 500),
        ("http_429", 429),
        ("code_error", 200),
        ("bad_json", 200),
        ("wrong_shape", 200),
    ],
)
def test_fault_is_consumed_by_the_next_request(
    relay: SimulatedRelay, kind: str, status: int
) -> None:
    """Each fault kind spoils exactly the next request, in its documented way."""
    relay.fail_next(kind)

    with client_for(relay) as client:
        spoiled = client.post("/luma/tasks", json={"ids": ["t1"]})
        normal = client.post("/luma/tasks", json={"ids": ["t1"]})

    assert status == spoiled.status_code
    if kind == "bad_json":
        with pytest.raises(ValueError, match="Expecting value"):
            spoiled.json()
    else:
        body = spoiled.json()
        assert {
            "http_500": "internal_error",
            "http_429": "rate_limited",
            "code_error": "fail",
            "wrong_shape": "success",
        }[kind] == body["code"]
        if kind == "code_error":
            assert body == {"code": "fail", "message": "upstream busy", "data": None}
        if kind == "wrong_shape":
            assert isinstance(body["data"], str)
        if kind == "http_429":
            assert spoiled.headers["retry-after"] == "1"
    assert (normal.status_code, normal.json()["code"]) == (200, "success")


def test_fault_count_and_order(relay: SimulatedRelay) -> None:
    """Faults queue up: count repeats a kind and kinds are consumed in the order given."""
    relay.fail_next("http_500", count=2)
    relay.fail_next("http_429")

    with client_for(relay) as client:
        codes = [client.get("/v1/predictions/p1").status_code for _ in range(4)]

    assert codes == [500, 500, 429, 200]


def test_slow_fault_times_the_client_out(relay: SimulatedRelay) -> None:
    """A slow fault holds the answer past the client timeout; the next request is served."""
    relay.slow_seconds = 0.3
    relay.fail_next("slow")

    with client_for(relay, timeout=0.1) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/luma/tasks", json={"ids": ["t1"]})
        response = client.post("/luma/tasks", json={"ids": ["t1"]})

    assert response.status_code == 200


def test_latency_holds_every_answer_until_set_back_to_zero(relay: SimulatedRelay) -> None:
    """With a latency every answer waits (here past the client timeout), not just the next
    one as with the slow fault; back at 0 the relay answers at once again."""
    relay.latency = 0.3

    with client_for(relay, timeout=0.1) as client:
        for _ in range(2):
            with pytest.raises(httpx.ReadTimeout):
                client.post("/luma/tasks", json={"ids": ["t1"]})
        relay.latency = 0.0
        response = client.post("/luma/tasks", json={"ids": ["t1"]})

    assert response.status_code == 200
    assert relay.pending_faults == 0


def test_fail_next_rejects_unknown_kinds(relay: SimulatedRelay) -> None:
    """A fault kind that does not exist is an error naming the valid ones."""
    with pytest.raises(ValueError, match="http_500"):
        relay.fail_next("meltdown")

    assert "slow" in FAULT_KINDS


def test_add_rejects_unknown_family_and_empty_script(relay: SimulatedRelay) -> None:
    """add() refuses a family it cannot serve and a script with no steps."""
    with pytest.raises(ValueError, match="family"):
        relay.add("runway", "t1")
    with pytest.raises(ValueError, match="no steps"):
        relay.add("luma", "t1", [])


def test_requests_are_recorded_with_lowercased_headers(relay: SimulatedRelay) -> None:
    """Every request is recorded with its method, path, lowercased headers and parsed body."""
    with client_for(relay) as client:
        client.post("/luma/tasks", json={"ids": ["t1"]}, headers={"X-Trace": "abc"})
        client.get("/v1/predictions/p1?x=1")

    first, second = relay.requests
    assert (first.method, first.path, first.json_body) == ("POST", "/luma/tasks", {"ids": ["t1"]})
    assert first.headers["x-trace"] == "abc"
    assert first.headers["authorization"] == "Bearer sk-sim"
    assert (second.method, second.path, second.json_body) == ("GET", "/v1/predictions/p1?x=1", None)
    assert first.at <= second.at <= time.monotonic()

    relay.clear_requests()

    assert relay.requests == []


def test_keep_alive_serves_many_requests_on_one_connection(relay: SimulatedRelay) -> None:
    """HTTP/1.1 keep-alive: several answers arrive on one socket."""
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=2)
    try:
        conn.request("GET", "/v1/predictions/p1", headers=AUTH)
        conn.getresponse().read()
        sock = conn.sock
        for _ in range(3):
            conn.request("POST", "/luma/tasks", body=b'{"ids":["t1"]}', headers=AUTH)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        assert sock is conn.sock
    finally:
        conn.close()


def test_restart_keeps_port_and_tasks() -> None:
    """After stop() and start() the relay is back on the same port with the same tasks."""
    relay = SimulatedRelay(step=60.0).start()
    try:
        [before] = luma(relay, "t1")["data"]
        port = relay.port
        relay.stop()
        with pytest.raises(RuntimeError, match="not running"):
            _ = relay.base_url
        relay.start()
        [after] = luma(relay, "t1")["data"]
    finally:
        relay.stop()

    assert port == relay._port
    assert before["id"] == after["id"]


def test_stop_closes_idle_keep_alive_connections() -> None:
    """stop() cuts pooled connections so clients see the relay go away."""
    with SimulatedRelay() as relay, client_for(relay, timeout=1.0) as client:
        assert client.get("/v1/predictions/p1").status_code == 200
        relay.stop()
        with pytest.raises(httpx.TransportError):
            client.get("/v1/predictions/p1")
