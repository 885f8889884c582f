"""Standard Webhooks (v1, HMAC-SHA256) secrets, signatures, headers and verification."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import secrets as csprng  # the signing helpers take a `secrets` parameter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

SECRET_PREFIX = "whsec_"  # noqa: S105 - the spec's prefix, not a credential
MESSAGE_ID_PREFIX = "msg_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300.0

_SECRET_BYTES = 32
_MESSAGE_ID_CHARS = 26
#: random bytes behind a message id: their URL-safe base64 has 27 characters, 26 of them whole
_MESSAGE_ID_BYTES = 20


class InvalidSignature(Exception):  # noqa: N818 - `except InvalidSignature` reads as what failed
    """A webhook failed verification; the message says which check failed."""


def new_secret() -> str:
    """Return a fresh endpoint secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(csprng.token_bytes(_SECRET_BYTES)).decode("ascii")


def new_message_id() -> str:
    """Return a fresh message id: ``msg_`` + 26 url-safe random characters (never a ".")."""
    # One read of the system's random source per id: a choice per character read it 26 times
    # (27 us an id, against 0.7). URL-safe base64 holds no ".", which separates the fields of
    # the signed content, and each character kept stands for 6 whole random bits.
    return MESSAGE_ID_PREFIX + csprng.token_urlsafe(_MESSAGE_ID_BYTES)[:_MESSAGE_ID_CHARS]


def decode_secret(secret: str) -> bytes:
    """Return the key bytes of a ``whsec_``-prefixed (or bare) base64 secret."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        # the standardwebhooks libraries accept unpadded secrets, so do we
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        # never echo the secret: this message can end up in logs
        raise ValueError("webhook secret is not valid base64 (expected whsec_<base64>)") from None
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def _key(secret: str | bytes) -> bytes:
    if isinstance(secret, bytes):
        if not secret:
            raise ValueError("webhook secret is empty")
        return secret
    return decode_secret(secret)


def _whole_seconds(seconds: float) -> int:
    """The whole seconds the library signs for a timestamp: it reads it as a datetime, to the
    microsecond (rounded), then floors ("1796080895.9999996" signs as "1796080896"). Past
    the years a datetime holds (which the library refuses), the float's own floor."""
    try:
        return math.floor(datetime.fromtimestamp(seconds, UTC).timestamp())
    except (OverflowError, ValueError, OSError):
        return math.floor(seconds)


def _signed_content(msg_id: str, timestamp: int | str, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def sign(secret: str | bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return ``v1,<base64 HMAC-SHA256>`` over ``msg_id.timestamp.body``."""
    if not msg_id or "." in msg_id:
        # a "." in the id would make the signed content ambiguous
        raise ValueError("webhook message id must be non-empty and must not contain '.'")
    digest = hmac.new(_key(secret), _signed_content(msg_id, timestamp, body), hashlib.sha256)
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest.digest()).decode('ascii')}"


def signature_header(
    secrets: Sequence[str | bytes], msg_id: str, timestamp: int, body: bytes
) -> str:
    """Return the ``webhook-signature`` value: one signature per secret, space separated."""
    if not secrets:
        raise ValueError("at least one webhook secret is needed to sign")
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)


def webhook_headers(
    secrets: Sequence[str | bytes], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Return the Standard Webhooks headers (plus the JSON content type) for one attempt."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(secrets, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def verify(
    secret: str | bytes,
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> None:
    """Raise InvalidSignature unless ``headers`` carry a fresh, matching v1 signature."""
    lowered = {name.lower(): value for name, value in headers.items()}
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        if not lowered.get(name):
            raise InvalidSignature(f"missing {name} header")
    msg_id = lowered["webhook-id"]
    # Read as the standardwebhooks library reads it, so that what it accepts is accepted
    # here: any number of seconds, signed as the whole seconds it falls in ("01796080895"
    # and "1796080895.0" sign as "1796080895").
    try:
        seconds = float(lowered["webhook-timestamp"])
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise InvalidSignature("webhook-timestamp is not a number of seconds")
    if seconds < now - tolerance:
        raise InvalidSignature("webhook-timestamp is too old")
    if seconds > now + tolerance:
        raise InvalidSignature("webhook-timestamp is too far in the future")

    content = _signed_content(msg_id, str(_whole_seconds(seconds)), body)
    expected = hmac.new(_key(secret), content, hashlib.sha256).digest()
    for token in lowered["webhook-signature"].split():
        version, comma, encoded = token.partition(",")
        if not comma or version != SIGNATURE_VERSION:
            continue
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(expected, candidate):
            return
    raise InvalidSignature("no matching v1 signature in webhook-signature")
