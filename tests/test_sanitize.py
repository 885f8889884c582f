"""The one cleaning discipline for outside text and JSON (tracker/sanitize.py)."""

from __future__ import annotations

import codecs
import json
import math
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker import sanitize


def test_clean_text_removes_nul_replaces_lone_surrogates_and_caps() -> None:
    """NUL goes, a lone surrogate becomes U+FFFD, a surrogate pair becomes its character."""
    assert "ab" == sanitize.clean_text("a\x00b")
    assert "a\ufffdb" == sanitize.clean_text("a\ud800b")
    assert "\U0001f600" == sanitize.clean_text("\ud83d\ude00")
    assert "abc" == sanitize.clean_text("abcdef", 3)
    assert "x" * sanitize.MAX_TEXT == sanitize.clean_text("x" * (sanitize.MAX_TEXT + 5))
    sanitize.clean_text("\udfff" * 10).encode("utf-8")  # encodable, whatever came in


def test_clean_json_makes_any_value_strict_json() -> None:
    """NaN, infinities, huge ints, bad keys and strings, tuples and objects all come out as
    something strict JSON and UTF-8 accept.
    """
    dirty = {
        "nan": math.nan,
        "inf": [math.inf, -math.inf],
        "huge": 10**200,
        "fine": 10**20,
        "k\ud800": ("v\x00", object.__name__),
        "nested": {"deeper": [True, None, 1.5]},
    }
    clean = sanitize.clean_json(dirty)
    assert {
        "nan": None,
        "inf": [None, None],
        "huge": None,
        "fine": 10**20,
        "k\ufffd": ["v", "object"],
        "nested": {"deeper": [True, None, 1.5]},
    } == clean
    json.dumps(clean, allow_nan=False, ensure_ascii=False).encode("utf-8")


def test_clean_json_cuts_containers_below_the_depth_cap() -> None:
    """Containers deeper than MAX_DEPTH become null instead of recursing without end."""
    value: object = 1
    for _ in range(sanitize.MAX_DEPTH + 10):
        value = [value]
    clean = sanitize.clean_json(value)
    depth = 0
    while isinstance(clean, list):
        clean, depth = clean[0], depth + 1
    assert (None, sanitize.MAX_DEPTH) == (clean, depth)


def test_loads_reads_odd_values_as_null_and_keeps_the_rest() -> None:
    """NaN, Infinity, an overflowing float and a 5,000-digit integer are null; others stay."""
    body = (
        b'{"a": NaN, "b": Infinity, "c": -Infinity, "d": 1e999, "e": 1'
        + b"0" * 5000
        + b', "f": 12, "g": "x\\u0000y\\ud800"}'
    )
    assert {
        "a": None,
        "b": None,
        "c": None,
        "d": None,
        "e": None,
        "f": 12,
        "g": "xy\ufffd",
    } == sanitize.loads(body)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
        (b"[" * (sanitize.MAX_DEPTH + 1) + b"]" * (sanitize.MAX_DEPTH + 1), "nested deeper"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b'{"a": 1', "not JSON"),
        (b"", "not JSON"),
        (b"<html>", "not JSON"),
        (b'{"a": 1} trailing', "not JSON"),
    ],
)
def test_loads_refuses_answers_that_are_not_strict_json(body: bytes, why: str) -> None:
    """Bad encoding, bad syntax and absurd nesting are BadJSONError, saying which."""
    with pytest.raises(sanitize.BadJSONError, match=why):
        sanitize.loads(body)


def test_dumps_never_raises_and_gives_strict_utf8_json() -> None:
    """Values that json.dumps would refuse or turn into non-JSON come out clean."""
    text = sanitize.dumps({"m": {"s": "\ud800", "n": math.nan}})
    assert '{"m":{"s":"\ufffd","n":null}}' == text
    text.encode("utf-8")


def test_dumps_writes_plain_values_by_orjson_and_the_rest_after_cleaning() -> None:
    """Plain decoded JSON is written by orjson (its exponent: 1e-7); a NUL, a container below
    MAX_DEPTH, a datetime or a non-string key is written as clean_json makes it."""
    assert '{"f":1e-7,"s":"ü","l":[1,null,true]}' == sanitize.dumps(
        {"f": 1e-7, "s": "ü", "l": [1, None, True]}
    )
    assert '{"s":"ab","f":1e-07}' == sanitize.dumps({"s": "a\x00b", "f": 1e-7})
    deep: Any = "x"
    for _ in range(sanitize.MAX_DEPTH + 1):
        deep = [deep]
    assert "[" * sanitize.MAX_DEPTH + "null" + "]" * sanitize.MAX_DEPTH == sanitize.dumps(deep)
    moment = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert '["2026-11-30 12:00:00+00:00"]' == sanitize.dumps([moment])
    assert '{"1":2}' == sanitize.dumps({1: 2})


def test_redact_replaces_secrets_and_their_cut_off_starts() -> None:
    """A whole secret, and a start of one longer than 8 characters, are both redacted."""
    secret = "sk-live-0123456789abcdef"
    text = f"key={secret} and cut={secret[:-1]} and short={secret[:8]}"
    assert (
        f"key={sanitize.REDACTED} and cut={sanitize.REDACTED} and short={secret[:8]}"
        == sanitize.redact(text, [secret])
    )


def test_excerpt_redacts_before_it_cuts() -> None:
    """An answer echoing a key right at the excerpt's edge keeps none of the key."""
    secret = "sk-live-0123456789abcdef"
    body = ("x" * (sanitize.EXCERPT_CHARS - 5) + secret + "tail").encode()
    text = sanitize.excerpt(body, [secret])
    assert secret[:9] not in text
    assert len(text) <= sanitize.EXCERPT_CHARS
    assert text.startswith("x" * (sanitize.EXCERPT_CHARS - 5) + "[reda")


#: examples per fuzz test; docs/reliability.md quotes the total
FUZZ_EXAMPLES = 300

dirty_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(["\x00", "\ud800", "\udfff", "\ud83d", "\ufffd"]),
    ),
    max_size=80,
)
dirty_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**60), max_value=10**60),
    st.floats(allow_nan=True, allow_infinity=True),
    dirty_text,
)
dirty_json = st.recursive(
    dirty_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(dirty_text, inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(dirty_json)
def test_fuzz_clean_json_always_gives_strict_utf8_json(value: object) -> None:
    """Whatever a decoder could produce, cleaned it is strict JSON, UTF-8, NUL-free."""
    text = json.dumps(sanitize.clean_json(value), allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
    assert "\x00" not in text
    careful = json.dumps(
        sanitize.clean_json(value, limit=None),
        allow_nan=False,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    # The same JSON: only a float's exponent may be written differently (1e-7, 1e-07).
    assert json.loads(sanitize.dumps(value)) == json.loads(careful)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.one_of(st.binary(max_size=200), dirty_json.map(lambda v: json.dumps(v).encode())))
def test_fuzz_loads_either_refuses_or_gives_clean_json(body: bytes) -> None:
    """Random bytes and dirty JSON texts: BadJSONError, or a value that dumps strictly and
    equals what the careful path (a hook per integer, a walk over every value) makes of it."""
    try:
        value = sanitize.loads(body)
    except sanitize.BadJSONError:
        with pytest.raises((sanitize.BadJSONError, UnicodeDecodeError)):
            sanitize._loads_carefully(body.decode("utf-8-sig"))
        return
    json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    assert typed(value) == typed(sanitize._loads_carefully(body.decode("utf-8-sig")))


def typed(value: object) -> object:
    """``value`` with the type of every part beside it, and keys in order: 2**64 and
    float(2**64) are equal in Python, but a decoder giving one for the other is wrong."""
    if isinstance(value, dict):
        return ("dict", [(key, typed(item)) for key, item in value.items()])
    if isinstance(value, list):
        return ("list", [typed(item) for item in value])
    return (type(value).__name__, repr(value))


def _nested(depth: int, innermost: object) -> object:
    """``innermost`` inside ``depth`` lists."""
    value = innermost
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"n": 10**sanitize.MAX_INT_DIGITS - 1, "m": 1 - 10**sanitize.MAX_INT_DIGITS}),
        json.dumps({"n": 10**sanitize.MAX_INT_DIGITS, "m": -(10**sanitize.MAX_INT_DIGITS)}),
        "[1" + "0" * 5000 + "]",  # over Python's own limit for int()
        json.dumps({"s": "x" * sanitize.MAX_TEXT, "k" * sanitize.MAX_TEXT: 1}),
        json.dumps({"s": "x" * (sanitize.MAX_TEXT + 1)}),
        json.dumps({"k" * (sanitize.MAX_TEXT + 1): 1}),
        '[{"a": "say \\"hi\\"", "b": true, "c": null, "d": 1.5, "e": 1e999, "f": NaN}]',
        json.dumps(_nested(sanitize.MAX_DEPTH - 1, [])),
        json.dumps(_nested(sanitize.MAX_DEPTH, "deepest")),
        json.dumps(_nested(sanitize.MAX_DEPTH, [])),
        json.dumps(_nested(sanitize.MAX_DEPTH + 1, 0)),
        "[" * 100_000 + "]" * 100_000,
        json.dumps(_nested(sanitize.MAX_DEPTH, ["]]]", "}", "[", "{{"])),
        json.dumps({"a": "[x]", "b": [1, {"c": "}{", "d": '"[]"'}]}),
        *(
            " " * pad + json.dumps(["x" * (sanitize.MAX_TEXT + 1)])
            for pad in (0, 1, 4094, 4095, 4096, 4097)
        ),
        json.dumps({"s": "\u00e9" * (sanitize.MAX_TEXT + 1)}, ensure_ascii=False),
        json.dumps({"s": "\u00e9" * sanitize.MAX_TEXT}, ensure_ascii=False),
        *(
            json.dumps([n, -n, n + 0.5])
            for n in (10**17, 10**18 - 1, 10**18, 2**63, 10**19 - 1, 2**64, 10**19, 10**20)
        ),
        "[1e308, 1e309, -1e400, 1e-400, -0, -0.0, 0.30000000000000004]",
        "[1e308, 1e-400, 4.9e-324, 2.2250738585072011e-308, 1.7976931348623157e308]",
        '[-0, {"a": -0}, -0.0, 0, 0.0]',
        "[0.1234567890123456789, 12345678901234567890e-10]",
        '{"a": 1, "b": 2, "a": 3}',
    ],
    ids=[
        "40 digits",
        "41 digits",
        "5000 digits",
        "strings at the cap",
        "a string over the cap",
        "a key over the cap",
        "escaped quotes, odd scalars",
        "at the depth cap",
        "a scalar at the depth cap",
        "over the depth cap",
        "a scalar over the depth cap",
        "past the recursion limit",
        "over the depth cap, brackets in strings",
        "brackets and quotes in strings",
        *(f"a string over the cap after {pad} spaces" for pad in (0, 1, 4094, 4095, 4096, 4097)),
        "multi-byte characters over the cap",
        "multi-byte characters at the cap",
        *(
            f"{digits} digits, either sign"
            for digits in (
                "18",
                "18 (largest)",
                "19",
                "19 (2**63)",
                "19 (largest)",
                "20 (2**64)",
                "20",
                "21",
            )
        ),
        "floats at the edges",
        "floats at the edges, none overflowing",
        "zeros of either sign",
        "long mantissas",
        "a key twice",
    ],
)
def test_loads_fast_path_gives_what_the_careful_path_gives(text: str) -> None:
    """Answers with nothing to clean skip the integer hook and the walk over every value; at
    every edge of the caps (digits, string length, depth, brackets and quotes inside strings)
    the result, or the refusal, is the careful one, from bytes and from text alike."""
    try:
        expected = sanitize._loads_carefully(text)
    except sanitize.BadJSONError as exc:
        for given in (text.encode(), text):
            with pytest.raises(sanitize.BadJSONError, match=re.escape(str(exc))):
                sanitize.loads(given)
        return
    assert typed(sanitize.loads(text.encode())) == typed(expected)
    assert typed(sanitize.loads(text)) == typed(expected)


def test_a_clean_answer_is_parsed_by_orjson_and_an_odd_one_by_the_json_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast path the tests above compare with the careful one is orjson's, for answers
    it reads as the json module does; past 18 digits (or on a build that reads "-0" as a
    float) the json module reads them."""
    parsed: list[bytes] = []
    orjson_loads = sanitize.orjson.loads

    def counted(raw: bytes) -> object:
        parsed.append(raw)
        return orjson_loads(raw)

    monkeypatch.setattr(sanitize.orjson, "loads", counted)
    clean = b'{"data": [{"id": 1, "status": "SUCCESS", "progress": "100%", "n": -0}]}'
    assert {"data": [{"id": 1, "status": "SUCCESS", "progress": "100%", "n": 0}]} == (
        sanitize.loads(clean)
    )
    taken = [clean] if sanitize._ORJSON_EXACT else []
    assert taken == parsed
    assert [10**19, -(10**19)] == sanitize.loads(json.dumps([10**19, -(10**19)]).encode())
    assert taken == parsed


def test_loads_reads_an_answer_after_a_utf8_bom_as_without_it() -> None:
    """A relay's answer may start with a UTF-8 byte order mark; it is read past."""
    body = json.dumps({"data": [{"id": 1, "status": "SUCCESS"}]}).encode()
    assert typed(sanitize.loads(codecs.BOM_UTF8 + body)) == typed(sanitize.loads(body))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.text(alphabet="[]{}", max_size=40))
def test_a_round_of_the_depth_check_takes_away_the_innermost_containers_of_both_kinds(
    shape: str,
) -> None:
    """One round removes every "[]" and "{}" of the shape at once, and no pair that only
    taking those away brings together (that pair is the next level)."""
    assert sanitize._innermost_gone(shape.encode()) == re.sub(r"\[\]|\{\}", "", shape).encode()


@st.composite
def _mixed_nesting(draw: st.DrawFn) -> object:
    """Lists and objects nested around the depth cap, each level with shallow siblings (no
    bracket inside a string: the check declines those, and the careful path decides)."""
    kinds = draw(
        st.lists(st.booleans(), min_size=sanitize.MAX_DEPTH - 2, max_size=sanitize.MAX_DEPTH + 2)
    )
    value: object = draw(st.sampled_from([0, "x", [], {}]))
    for is_list in kinds:
        sibling = draw(st.sampled_from([None, [], {}, [[]], {"s": [{}]}]))
        value = [value, sibling] if is_list else {"k": value, "s": sibling}
    return value


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(_mixed_nesting())
def test_the_fast_path_takes_lists_and_objects_nested_within_the_cap_and_no_deeper(
    value: object,
) -> None:
    """Whatever mix of lists and objects, the depth check passes a text exactly when it
    nests at most MAX_DEPTH containers deep."""
    text = json.dumps(value)
    within = not sanitize._deeper_than(value, sanitize.MAX_DEPTH)
    assert sanitize._plain(text, text.encode()) is within
