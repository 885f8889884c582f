"""One path segment of a URL, built so that no client reads it as another path."""

from __future__ import annotations

from urllib.parse import quote

#: segments a client resolves instead of sending (RFC 3986 dot segments)
_DOTS = frozenset({".", ".."})


def segment(value: str) -> str:
    """``value`` as one path segment: "/", "?", "#" and "%" escaped, and a value of one or two
    dots encoded (``%2E``), which httpx or a browser would otherwise resolve: a URL naming
    task ``abc?x``, ``x/../abc`` or ``..`` reaches that task, not another path (for a relay's
    per-id path, with the relay key)."""
    quoted = quote(value, safe="")
    return quoted.replace(".", "%2E") if quoted in _DOTS else quoted
