"""Tests for Standard Webhooks signing and verification, cross-checked with standardwebhooks."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from tracker.signing import (
    InvalidSignature,
    decode_secret,
    new_message_id,
    new_secret,
    sign,
    signature_header,
    verify,
    webhook_headers,
)

BODY = b'{"type":"task.succeeded","data":{"id":"t1"}}'
KNOWN_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_new_secret_is_prefixed_base64_of_32_bytes() -> None:
    """A new secret is whsec_ plus base64 of 32 random bytes, different every time."""
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert decode_secret(secret) == base64.b64decode(secret[6:])
    assert new_secret() != secret


def test_new_message_id_shape() -> None:
    """A message id is msg_ plus 26 url-safe characters and never contains a full stop."""
    ids = {new_message_id() for _ in range(200)}
    assert len(ids) == 200
    for msg_id in ids:
        assert msg_id.startswith("msg_")
        suffix = msg_id.removeprefix("msg_")
        assert len(suffix) == 26
        assert "." not in msg_id
        assert set(suffix) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


def test_new_message_ids_use_the_whole_alphabet_at_every_position() -> None:
    """Every one of the 64 characters turns up, and no position of the 26 is fixed: an id's
    randomness is not cut short by how it is drawn."""
    suffixes = [new_message_id().removeprefix("msg_") for _ in range(2000)]
    assert len(set("".join(suffixes))) == 64
    for position in range(26):
        assert len({suffix[position] for suffix in suffixes}) > 40


def test_decode_secret_tolerates_missing_padding_and_prefix() -> None:
    """Secrets decode with or without the whsec_ prefix and with padding stripped."""
    key = bytes(range(31))  # 31 bytes -> base64 needs one "=" of padding
    padded = base64.b64encode(key).decode()
    assert padded.endswith("=")
    assert decode_secret("whsec_" + padded) == key
    assert decode_secret("whsec_" + padded.rstrip("=")) == key
    assert decode_secret(padded) == key


@pytest.mark.parametrize("bad", ["whsec_not base64!!", "whsec_", "whsec_abcde"])
def test_decode_secret_rejects_garbage_without_echoing_it(bad: str) -> None:
    """A malformed secret raises ValueError whose message does not contain the secret."""
    with pytest.raises(ValueError, match="webhook secret") as info:
        decode_secret(bad)
    payload = bad.removeprefix("whsec_")
    if payload:
        assert payload not in str(info.value)


def test_sign_matches_the_standard_webhooks_test_vector() -> None:
    """sign() reproduces the signature the standardwebhooks library computes for a fixed input."""
    timestamp = 1_614_265_330
    expected = Webhook(KNOWN_SECRET).sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek", datetime.fromtimestamp(timestamp, UTC), BODY.decode()
    )
    assert sign(KNOWN_SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", timestamp, BODY) == expected
    assert expected.startswith("v1,")


def test_sign_accepts_raw_key_bytes() -> None:
    """A bytes secret is used as the raw HMAC key, like the reference library does."""
    key = decode_secret(KNOWN_SECRET)
    assert sign(key, "msg_1", 10, BODY) == sign(KNOWN_SECRET, "msg_1", 10, BODY)


@pytest.mark.parametrize("msg_id", ["", "msg.1"])
def test_sign_refuses_ids_that_make_the_content_ambiguous(msg_id: str) -> None:
    """An empty id or one containing a full stop is refused."""
    with pytest.raises(ValueError, match="message id"):
        sign(KNOWN_SECRET, msg_id, 10, BODY)


def test_library_verifies_our_headers_with_one_secret() -> None:
    """standardwebhooks' Webhook.verify accepts headers produced by webhook_headers."""
    secret = new_secret()
    headers = webhook_headers([secret], new_message_id(), int(time.time()), BODY)
    assert headers["content-type"] == "application/json"
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}
    assert Webhook(secret).verify(BODY, headers) == {"type": "task.succeeded", "data": {"id": "t1"}}


def test_library_verifies_with_either_secret_during_rotation() -> None:
    """With two signing secrets, the header carries two signatures and either key verifies."""
    old, new = new_secret(), new_secret()
    headers = webhook_headers([old, new], new_message_id(), int(time.time()), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(BODY, headers, json_parse=False)
    Webhook(new).verify(BODY, headers, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers, json_parse=False)


def test_our_verify_accepts_the_library_signature() -> None:
    """verify() accepts a signature made by standardwebhooks' Webhook.sign."""
    secret = new_secret()
    now = datetime.now(UTC)
    timestamp = int(now.timestamp())
    signature = Webhook(secret).sign("msg_abc", now, BODY.decode())
    headers = {
        "Webhook-Id": "msg_abc",
        "WEBHOOK-TIMESTAMP": str(timestamp),
        "webhook-signature": signature,
    }
    verify(secret, BODY, headers, now=now.timestamp())


def _headers(secret: str, timestamp: int, body: bytes = BODY) -> dict[str, str]:
    return webhook_headers([secret], "msg_fixed", timestamp, body)


def test_verify_rejects_tampered_body() -> None:
    """A body changed after signing fails with a signature mismatch."""
    secret = new_secret()
    headers = _headers(secret, 1000)
    with pytest.raises(InvalidSignature, match="no matching v1 signature"):
        verify(secret, BODY + b" ", headers, now=1000)


def test_verify_rejects_wrong_secret() -> None:
    """A signature made with another secret fails with a signature mismatch."""
    headers = _headers(new_secret(), 1000)
    with pytest.raises(InvalidSignature, match="no matching v1 signature"):
        verify(new_secret(), BODY, headers, now=1000)


@pytest.mark.parametrize(
    ("now", "message"), [(1000 + 301, "too old"), (1000 - 301, "future"), (1000 + 300, None)]
)
def test_verify_enforces_the_timestamp_tolerance(now: float, message: str | None) -> None:
    """A timestamp more than 300 s away from now is rejected; exactly 300 s is accepted."""
    secret = new_secret()
    headers = _headers(secret, 1000)
    if message is None:
        verify(secret, BODY, headers, now=now)
    else:
        with pytest.raises(InvalidSignature, match=message):
            verify(secret, BODY, headers, now=now)


def test_verify_reports_missing_and_malformed_headers() -> None:
    """Missing headers and a timestamp that is no number name the failing check."""
    secret = new_secret()
    headers = _headers(secret, 1000)
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        partial = {k: v for k, v in headers.items() if k != name}
        with pytest.raises(InvalidSignature, match=f"missing {name}"):
            verify(secret, BODY, partial, now=1000)
    for bad in ("soon", " ", "nan", "inf", "1e400"):
        with pytest.raises(InvalidSignature, match="not a number of seconds"):
            verify(secret, BODY, {**headers, "webhook-timestamp": bad}, now=1000)


@pytest.mark.parametrize(
    "written",
    [
        *("{t}", "0{t}", "{t}.0", "{t}.75", " {t} ", "{t}e0", "{t}.9999996", "{t}.9999994"),
        *("{t}.5x", "0x{t}", "{t}-", "-{t}"),
    ],
)
def test_verify_reads_the_timestamp_header_as_the_library_does(written: str) -> None:
    """Whatever way a sender writes the timestamp (zero-padded, with a fraction, padded with
    spaces), verify() accepts the request exactly when standardwebhooks' Webhook.verify does,
    whether it was signed over that second or the next (a fraction within half a
    microsecond of the next second counts as the next, as the library reads it)."""
    secret = new_secret()
    now = int(time.time())
    for signed_as in (now, now + 1):
        headers = _headers(secret, signed_as)
        headers["webhook-timestamp"] = written.format(t=now)
        try:
            Webhook(secret).verify(BODY, headers)
        except WebhookVerificationError:
            with pytest.raises(InvalidSignature):
                verify(secret, BODY, headers, now=time.time())
        else:
            verify(secret, BODY, headers, now=time.time())


def test_verify_skips_malformed_and_foreign_tokens() -> None:
    """Tokens without a comma, other versions and bad base64 are skipped, not fatal."""
    secret = new_secret()
    headers = _headers(secret, 1000)
    good = headers["webhook-signature"]
    noisy = f"garbage v1a,AAAA v1,%%%notb64 {good}"
    verify(secret, BODY, {**headers, "webhook-signature": noisy}, now=1000)
    with pytest.raises(InvalidSignature, match="no matching"):
        verify(secret, BODY, {**headers, "webhook-signature": "garbage v1a,AAAA"}, now=1000)


def test_signature_header_needs_a_secret() -> None:
    """Signing with no secret at all is an error rather than an empty header."""
    with pytest.raises(ValueError, match="at least one"):
        signature_header([], "msg_1", 1, BODY)


@given(
    body=st.binary(max_size=2048),
    msg_id=st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="."), min_size=1, max_size=40
    ),
    timestamp=st.integers(min_value=0, max_value=2**40),
    key=st.binary(min_size=1, max_size=64),
)
def test_round_trip_over_arbitrary_input(
    body: bytes, msg_id: str, timestamp: int, key: bytes
) -> None:
    """Whatever the body, id, time and key, our headers verify and any body change does not."""
    secret = "whsec_" + base64.b64encode(key).decode()
    headers = webhook_headers([secret], msg_id, timestamp, body)
    verify(secret, body, headers, now=timestamp)
    with pytest.raises(InvalidSignature):
        verify(secret, body + b"x", headers, now=timestamp)
