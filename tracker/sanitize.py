"""One discipline for what comes from outside (relay answers, receiver answers, old rows).

Text that reaches the database or a webhook body is cleaned here, and only here:

- NUL characters are removed (PostgreSQL text cannot hold them);
- lone UTF-16 surrogates (``"\\ud800"`` in a JSON string) become U+FFFD, as they cannot be
  encoded as UTF-8;
- strings are cut to a stated length (the caps below);
- NaN and +-Infinity, which JSON cannot carry, become ``null``, as do integers longer than
  `MAX_INT_DIGITS` digits.

Relay answers are parsed strictly by `loads`: valid UTF-8, at most `MAX_DEPTH` levels of
nesting, nothing after the value. An answer that breaks those rules is unusable as a whole
(`BadJSONError`); a value that merely cannot be stored is cleaned, so one bad field never
costs the other items of the answer.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

import orjson

#: characters kept of an upstream status word or progress text (the columns hold 64)
MAX_WORD: Final = 64
#: characters kept of a failure reason
MAX_REASON: Final = 2000
#: characters kept of any other string inside a stored upstream item or metadata
MAX_TEXT: Final = 8192
#: deepest nesting of arrays and objects accepted in an answer (real ones use under 10)
MAX_DEPTH: Final = 64
#: longest integer kept as a number; longer ones become null (ids are strings, or short)
MAX_INT_DIGITS: Final = 40
#: longest run of digits in an answer that orjson parses: a negative integer of 19 digits
#: may lie below the 64-bit range, which orjson reads as a float; the json module reads those
ORJSON_DIGITS: Final = 18
#: whether this orjson reads "-0" as the json module does (an int): a build without yyjson
#: reads it as the float -0.0, and is then not used
_ORJSON_EXACT: Final = type(orjson.loads(b"-0")) is int
#: characters of an answer quoted in an error message or a delivery log, after redaction
EXCERPT_CHARS: Final = 300
#: what a secret found in quoted text is replaced with
REDACTED: Final = "[redacted]"
#: a secret's leading characters that count as the secret when found cut off in quoted text
MIN_SECRET_PREFIX: Final = 9
#: query parameters of a database URL that carry a secret (libpq takes a password there too)
SECRET_QUERY_KEYS: Final = frozenset({"password", "sslpassword"})

_REPLACEMENT: Final = "\ufffd"


class BadJSONError(ValueError):
    """The answer is not strict JSON (or is nested deeper than MAX_DEPTH)."""


def clean_text(value: str, limit: int | None = MAX_TEXT) -> str:
    """``value`` without NUL characters or lone surrogates, cut to ``limit`` characters."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    # An ASCII string (nearly every one; CPython knows it without looking) holds no
    # surrogate, so it needs no trial encoding.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # Through UTF-16, paired surrogates become the one character they stand for and
            # lone ones become U+FFFD.
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if limit is not None and len(value) > limit:
        value = value[:limit]
    return value


def clean_optional(value: str | None, limit: int | None = MAX_TEXT) -> str | None:
    """`clean_text` for a value that may be None."""
    return None if value is None else clean_text(value, limit)


def clean_json(value: Any, *, limit: int | None = MAX_TEXT, depth: int = 0) -> Any:
    """A copy of a decoded JSON value that strict JSON, UTF-8 and PostgreSQL all accept.

    Strings (keys too) go through `clean_text`; NaN and +-Infinity become None; containers
    deeper than MAX_DEPTH become None; tuples become lists; anything that is not a JSON type
    becomes its ``str()``, cleaned.
    """
    if isinstance(value, Mapping | list | tuple):
        if depth >= MAX_DEPTH:
            return None
        if isinstance(value, Mapping):
            return {
                clean_text(str(key), limit): clean_json(item, limit=limit, depth=depth + 1)
                for key, item in value.items()
            }
        return [clean_json(item, limit=limit, depth=depth + 1) for item in value]
    return _clean_scalar(value, limit)


def _clean_scalar(value: Any, limit: int | None) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if _int_fits(value) else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return clean_text(value if isinstance(value, str) else str(value), limit)


def _int_fits(value: int) -> bool:
    # bit_length, not str(): str() of a huge int is itself the slow, refused operation.
    return value.bit_length() <= MAX_INT_DIGITS * 3.33


def _parse_int(text: str) -> int | None:
    digits = len(text) - text.startswith("-")
    return int(text) if digits <= MAX_INT_DIGITS else None


def _parse_float(text: str) -> float | None:
    number = float(text)
    return number if math.isfinite(number) else None


def _no_constant(_name: str) -> None:
    return None


def loads(data: bytes | str) -> Any:
    """Decode one JSON answer strictly, then clean it (see `clean_json`).

    NaN, Infinity, numbers that overflow a float and integers over MAX_INT_DIGITS digits are
    read as null. Raises BadJSONError for anything that is not one valid UTF-8 JSON value
    nested at most MAX_DEPTH deep.
    """
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise BadJSONError(f"not UTF-8 at byte {exc.start}") from None
    # Most answers hold nothing to clean. When the text shows that (a few passes in C over
    # it), a decoder parses it alone, with no hook per integer and no walk over every value,
    # and gives what the careful path would. Anything odd, an error included, takes the
    # careful path, which decides.
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    digits = raw.translate(_DIGITS)
    if _plain(text, raw, digits):
        # orjson, three times faster than the json module on a relay's answer, where it reads
        # what that reads: not past 64-bit integers (it makes them floats), nor after a BOM.
        # What it refuses (NaN, a float that overflows) goes on to the json module.
        if (
            _ORJSON_EXACT
            and b"0" * (ORJSON_DIGITS + 1) not in digits
            and not raw.startswith(codecs.BOM_UTF8)
        ):
            with contextlib.suppress(orjson.JSONDecodeError):
                return orjson.loads(raw)
        with contextlib.suppress(ValueError, RecursionError):
            return json.loads(text, parse_float=_parse_float, parse_constant=_no_constant)
    return _loads_carefully(text)


def _loads_carefully(text: str) -> Any:
    try:
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_no_constant,
        )
    except RecursionError:
        raise BadJSONError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise BadJSONError(f"not JSON: {exc}") from None
    if _deeper_than(value, MAX_DEPTH):
        raise BadJSONError(f"nested deeper than {MAX_DEPTH} levels")
    # The walk costs ten times the parse; most answers have nothing it would change.
    return clean_json(value) if _may_need_cleaning(text) else value


#: a \u escape of NUL or of a UTF-16 surrogate (paired ones too: rare, and then merely slow)
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
#: a stretch of the text this long without a quote may lie inside a string over MAX_TEXT
_QUOTE_EVERY: Final = (MAX_TEXT + 1) // 2
#: the text's bytes with every digit as "0" and everything else as " "
_DIGITS: Final = bytes(ord("0") if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
#: every byte but the brackets and the quote (multi-byte UTF-8 never holds these)
_NOT_STRUCTURE: Final = bytes(b for b in range(256) if b not in b'[]{}"')


def _plain(text: str, raw: bytes, digits: bytes | None = None) -> bool:
    """Whether JSON ``text`` (``raw``, its UTF-8 bytes; ``digits``, those translated by
    _DIGITS) surely holds nothing `clean_json` would change and nests at most MAX_DEPTH deep:
    no NUL or surrogate escape, no string over MAX_TEXT characters, no integer over
    MAX_INT_DIGITS digits. False when unsure.

    Valid JSON is assumed (the decoder checks that); on any other text the answer is moot.
    """
    # One pass finds no backslash in most answers, and then neither escape.
    if b"\\" in raw and (b'\\"' in raw or (b"\\u" in raw and _SUSPECT_ESCAPE.search(text))):
        return False
    # Without escaped quotes, every quote starts or ends a string. A string over MAX_TEXT
    # characters is that many bytes without a quote at least, and so covers a whole aligned
    # stretch of _QUOTE_EVERY bytes.
    for start in range(0, len(raw) - _QUOTE_EVERY + 1, _QUOTE_EVERY):
        if raw.find(b'"', start, start + _QUOTE_EVERY) < 0:
            return False
    # Such an integer is a run of more digits than that (digits in strings only count against).
    if digits is None:
        digits = raw.translate(_DIGITS)
    if b"0" * (MAX_INT_DIGITS + 1) in digits:
        return False
    # Brackets and quotes only; a string without brackets is then a pair of quotes, and a
    # quote left over means some string holds a bracket.
    shape = raw.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in shape:
        return False
    # Each round takes away the containers that hold no other: the rounds are the depth.
    for _ in range(MAX_DEPTH):
        if not shape:
            return True
        shape = _innermost_gone(shape)
    return not shape


def _innermost_gone(shape: bytes) -> bytes:
    """``shape`` (brackets only) without the containers that hold no other container.

    Both kinds at once, as a regular expression of the two would, but in plain C passes (the
    expression steps through the shape a byte at a time): "[]" is marked first, so a "{}"
    made by taking it away ("{[]}") waits for the next round, as the next level.
    """
    return shape.replace(b"[]", b"x").replace(b"{}", b"").replace(b"x", b"")


def _may_need_cleaning(text: str) -> bool:
    """False only when no string in the JSON ``text`` holds NUL, a surrogate or over MAX_TEXT
    characters (NaN and odd numbers are handled while parsing).
    """
    if '\\"' in text or _SUSPECT_ESCAPE.search(text):
        return True
    # Without escaped quotes every string lies whole between two quote characters.
    return max(map(len, text.split('"'))) > MAX_TEXT


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than ``limit`` deep (the outermost one is level 1)."""
    # Level by level, so checking a deep value cannot itself hit the recursion limit.
    level: list[Any] = [value]
    for _ in range(limit + 1):
        below: list[Any] = []
        containers = False
        for item in level:
            if isinstance(item, dict):
                below.extend(item.values())
                containers = True
            elif isinstance(item, list):
                below.extend(item)
                containers = True
        if not containers:
            return False
        level = below
    return True


#: orjson writes only what the json module writes (the rest raises, and takes the walk): no
#: datetimes or dataclasses its own way, no subclasses of dict, list, str or int (a dict
#: subclass may give other items than its storage holds)
_ORJSON_TYPES_ONLY: Final = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def dumps(value: Any) -> str:
    """Compact strict JSON of ``value`` (decoded JSON: dicts, lists, strings, numbers, None,
    string enums) after `clean_json` (never raises for odd values).

    Written by orjson when its text holds nothing `clean_json` would change (`_plain`), five
    to ten times faster than the walk and the json module: a webhook body carries the whole
    upstream item. The text then differs only where JSON lets it (a float's exponent: 1e-7,
    not 1e-07); NaN and the infinities are null either way. Anything else takes the walk.
    """
    with contextlib.suppress(orjson.JSONEncodeError):
        raw = orjson.dumps(value, option=_ORJSON_TYPES_ONLY)
        text = raw.decode()
        if _plain(text, raw):
            return text
    return json.dumps(
        clean_json(value, limit=None), separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret, and every cut-off start of one, replaced by REDACTED.

    A start counts from MIN_SECRET_PREFIX characters on: quoted text cut in the middle of a
    secret must not keep all but its last characters.
    """
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
        if len(secret) > MIN_SECRET_PREFIX:
            text = _redact_prefixes(text, secret)
    return text


def _redact_prefixes(text: str, secret: str) -> str:
    head = secret[:MIN_SECRET_PREFIX]
    start = text.find(head)
    while start != -1:
        end = start + MIN_SECRET_PREFIX
        while end < len(text) and end - start < len(secret) and text[end] == secret[end - start]:
            end += 1
        text = text[:start] + REDACTED + text[end:]
        start = text.find(head, start + len(REDACTED))
    return text


def without_userinfo(url: str) -> str:
    """``url`` as it may be shown (a message, a log line, /readyz): without the user and
    password written before its host (``http://user:pass@relay`` -> ``http://relay``).

    Never raises, and hides them in any text, a URL no parser accepts included. The userinfo
    is what precedes the last "@" of the authority (up to the first "/", "?" or "#"); an "@"
    past a sound authority lies in the path or query, and the URL is shown whole. Past one no
    parser reads (a password holding an unescaped "/", "?" or "#"), everything up to the last
    "@" goes.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" in scheme:  # no scheme at all, or "user:pass@" written before it
        scheme, sep, rest = "", "", url
    if "@" not in rest:
        return url
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    authority = rest[: min(ends, default=len(rest))]
    if "@" in authority:
        return scheme + sep + rest[authority.rindex("@") + 1 :]
    if _SOUND_AUTHORITY.fullmatch(authority):
        return url
    return scheme + sep + rest.rpartition("@")[2]


#: a host (a name, IPv4, or [IPv6]) and an optional port: an authority a parser reads
_SOUND_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(:[0-9]{0,5})?")


def excerpt(body: bytes, secrets: Iterable[str] = (), limit: int = EXCERPT_CHARS) -> str:
    """The start of an answer as clean text for a log line: redacted first, then cut."""
    # Redaction runs on more than is kept, so a secret straddling the cut is still caught.
    text = body[: 4 * limit + 1024].decode("utf-8", "replace")
    return clean_text(redact(text, secrets), limit)
