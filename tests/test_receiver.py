"""Tests for the misbehaving webhook receiver, driven over real HTTP on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Mapping

import httpx
import pytest

from tracker.testing.receiver import Received, Reply, WebhookReceiver


@pytest.fixture(name="receiver")
def _receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


def test_records_every_request_and_answers_204(receiver: WebhookReceiver) -> None:
    """A POST is answered 204 and recorded with path, lowercased headers and raw body."""
    response = httpx.post(receiver.url, content=b'{"a":1}', headers={"Webhook-Id": "msg_1"})

    [received] = receiver.received
    assert response.status_code == 204
    assert receiver.url.endswith("/hooks")
    assert (received.method, received.path, received.body) == ("POST", "/hooks", b'{"a":1}')
    assert received.headers["webhook-id"] == "msg_1"
    assert (received.status, received.verified) == (204, None)
    assert received.json() == {"a": 1}
    assert received.at <= time.monotonic()


def test_any_path_is_accepted(receiver: WebhookReceiver) -> None:
    """Requests to other paths are answered and recorded too."""
    httpx.post(f"{receiver.base_url}/elsewhere/deep?x=1", content=b"hi")

    assert [r.path for r in receiver.received] == ["/elsewhere/deep?x=1"]


def test_scripted_replies_are_used_in_order_then_default(receiver: WebhookReceiver) -> None:
    """Queued replies answer one request each, in order; then the default answers."""
    receiver.reply(
        Reply(status=500, body=b"boom"),
        Reply(status=200, headers={"Content-Type": "application/json"}, body=b'{"ok":true}'),
    )

    with httpx.Client() as client:
        responses = [client.post(receiver.url, content=b"x") for _ in range(3)]
        receiver.default = Reply(status=202, body=b"later")
        last = client.post(receiver.url, content=b"x")

    assert [r.status_code for r in responses] == [500, 200, 204]
    assert [r.content for r in responses] == [b"boom", b'{"ok":true}', b""]
    assert responses[1].headers["content-type"] == "application/json"
    assert (last.status_code, last.content) == (202, b"later")
    assert [r.status for r in receiver.received] == [500, 200, 204, 202]


def test_redirect_reply(receiver: WebhookReceiver) -> None:
    """A redirect is a reply with a Location header."""
    receiver.reply(Reply(status=302, headers={"Location": "http://127.0.0.1:9/elsewhere"}))

    response = httpx.post(receiver.url, content=b"x", follow_redirects=False)

    assert response.status_code == 302
    assert response.headers["location"] == "http://127.0.0.1:9/elsewhere"


def test_delay_outlasts_the_client_timeout_and_is_still_recorded(
    receiver: WebhookReceiver,
) -> None:
    """A delayed reply times the client out; the request was recorded all the same."""
    receiver.reply(Reply(status=200, delay=0.3))

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(receiver.url, content=b"x", timeout=0.1)

    assert [r.status for r in receiver.wait_for(1)] == [200]
    assert httpx.post(receiver.url, content=b"y").status_code == 204


def test_huge_body_can_be_read_partially_and_the_server_survives(
    receiver: WebhookReceiver,
) -> None:
    """A 10 MB answer streams; a client that stops after 64 KiB leaves the server working."""
    size = 10 * 1024 * 1024
    receiver.reply(Reply(status=200, body_size=size))

    with httpx.Client() as client, client.stream("POST", receiver.url, content=b"x") as response:
        assert response.headers["content-length"] == str(size)
        read = 0
        for chunk in response.iter_raw():
            read += len(chunk)
            if read >= 64 * 1024:
                break

    assert 64 * 1024 <= read < size
    assert httpx.post(receiver.url, content=b"again").status_code == 204


def test_huge_body_is_delivered_whole_to_a_patient_client(receiver: WebhookReceiver) -> None:
    """body_size bytes really arrive when the client reads everything."""
    receiver.reply(Reply(status=200, body_size=1_000_003))

    response = httpx.post(receiver.url, content=b"x")

    assert len(response.content) == 1_000_003


def test_verify_hook_marks_requests_and_rejects_with_400() -> None:
    """verify returning means verified=True; raising means verified=False and a 400."""
    seen: list[Mapping[str, str]] = []

    def verify(body: bytes, headers: Mapping[str, str]) -> object:
        seen.append(headers)
        if body != b"good":
            raise ValueError("bad signature")
        return body

    with WebhookReceiver(verify=verify) as receiver, httpx.Client() as client:
        receiver.reply(Reply(status=201))
        bad = client.post(receiver.url, content=b"evil", headers={"Webhook-Id": "m"})
        good = client.post(receiver.url, content=b"good")

    assert (bad.status_code, good.status_code) == (400, 201)
    assert [(r.verified, r.status) for r in receiver.received] == [(False, 400), (True, 201)]
    assert seen[0]["webhook-id"] == "m"


def test_wait_for_returns_once_enough_arrived(receiver: WebhookReceiver) -> None:
    """wait_for blocks until the count is reached by requests sent from another thread."""

    def send() -> None:
        with httpx.Client() as client:
            for n in range(3):
                client.post(receiver.url, content=str(n).encode())

    sender = threading.Thread(target=send)
    sender.start()
    received = receiver.wait_for(3, timeout=5.0)
    sender.join()

    assert sorted(r.body for r in received) == [b"0", b"1", b"2"]


def test_wait_for_times_out_naming_the_counts(receiver: WebhookReceiver) -> None:
    """wait_for raises TimeoutError that says how many were expected and how many came."""
    httpx.post(receiver.url, content=b"x")

    with pytest.raises(TimeoutError, match=r"expected 2 .* received 1"):
        receiver.wait_for(2, timeout=0.1)


def test_on_receive_sees_each_request() -> None:
    """The on_receive callback gets each Received as it is recorded."""
    got: list[Received] = []
    with WebhookReceiver(on_receive=got.append) as receiver:
        httpx.post(receiver.url, content=b"x")

    assert [r.body for r in got] == [b"x"]


def test_chunked_request_bodies_are_decoded(receiver: WebhookReceiver) -> None:
    """A chunked request body is reassembled."""
    httpx.post(receiver.url, content=iter([b"ab", b"cd"]))

    [received] = receiver.received
    assert received.headers.get("transfer-encoding") == "chunked"
    assert received.body == b"abcd"


def test_keep_alive_burst_is_recorded_in_full(receiver: WebhookReceiver) -> None:
    """Hundreds of POSTs over one keep-alive client are all answered and counted."""
    with httpx.Client() as client:
        codes = {client.post(receiver.url, content=b"{}").status_code for _ in range(300)}

    assert codes == {204}
    assert receiver.count == 300


def test_record_limit_keeps_the_newest_but_counts_all() -> None:
    """With a record_limit only the newest requests are kept while count sees them all."""
    with WebhookReceiver(record_limit=2) as receiver, httpx.Client() as client:
        for n in range(5):
            client.post(receiver.url, content=str(n).encode())

    assert [r.body for r in receiver.wait_for(5)] == [b"3", b"4"]
    assert receiver.count == 5


def test_clear_forgets_requests_and_replies(receiver: WebhookReceiver) -> None:
    """clear() empties the record, the count and the reply queue."""
    receiver.reply(Reply(status=500))
    receiver.clear()

    response = httpx.post(receiver.url, content=b"x")

    assert response.status_code == 204
    assert receiver.count == 1


def test_stop_and_restart_on_the_same_port() -> None:
    """A stopped receiver refuses connections and comes back on the same port."""
    receiver = WebhookReceiver().start()
    try:
        url = receiver.url
        receiver.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.post(url, content=b"x")
        receiver.start()
        assert receiver.url == url
        assert httpx.post(url, content=b"x").status_code == 204
    finally:
        receiver.stop()


def test_a_request_cut_off_mid_body_is_not_recorded() -> None:
    """A sender that dies halfway through the body delivered nothing, so nothing is recorded."""
    with WebhookReceiver() as receiver:
        with socket.create_connection(("127.0.0.1", receiver.port)) as sock:
            head = b"POST /hooks HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
            sock.sendall(head + b'{"partial')
        httpx.post(receiver.url, content=b"{}")
        receiver.wait_for(1)

        assert [b"{}"] == [r.body for r in receiver.received]
