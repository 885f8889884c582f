"""The bounds the API holds every request to (the README's "HTTP API" section states them)."""

from __future__ import annotations

#: ids per registration
MAX_IDS = 1000
#: characters per task id
MAX_ID_LENGTH = 200
#: registration metadata, as compact JSON
MAX_METADATA_BYTES = 4096
#: items per page of a listing, and the default
MAX_PAGE = 1000
DEFAULT_PAGE = 50
#: row ids (delivery ids, cursors) live in INTEGER columns: 32-bit signed on PostgreSQL, so a
#: larger one cannot name a row and would make the query fail rather than miss
MAX_ROW_ID = 2**31 - 1
#: times the API takes (recover's window); what a datetime and an epoch second can both hold
MIN_YEAR = 1970
MAX_YEAR = 9999


def no_delivery(raw: str) -> str:
    """What a request naming delivery ``raw``, not a row id, is told."""
    return f"no delivery {raw[:40]!r}: ids are integers from 1 to {MAX_ROW_ID}"


def row_id(raw: str) -> int | None:
    """The row id (a delivery's, a page cursor) ``raw`` spells; None unless it is ASCII digits
    from 1 to MAX_ROW_ID: int() also reads "²", and a larger id would overflow the column.
    """
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(MAX_ROW_ID)):
        return None
    value = int(raw)
    return value if 1 <= value <= MAX_ROW_ID else None
