"""The wire format: W3C baggage and trace context, shared by both directions.

What a header looks like, whichever way it goes: the baggage member
encoding and its limits, the ``traceparent`` rule, which fields never travel
as baggage, and how header lines are read from any mapping.  Reading a
request is :mod:`ctxrelay._inbound`; writing one is :mod:`ctxrelay._outbound`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from urllib.parse import quote, unquote_plus

from ._context import REQUEST_ID, validate_field
from ._policy import Policy

__all__ = [
    "BAGGAGE",
    "OWS",
    "TRACEPARENT",
    "TRACESTATE",
    "encode_member",
    "header_lines",
    "limit_members",
    "not_baggage",
    "parse_baggage",
    "valid_traceparent",
]

_log = logging.getLogger("ctxrelay")

BAGGAGE = "baggage"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# W3C baggage-octet is %x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E.  We also
# encode "%" (so decoding is unambiguous) and "+": OpenTelemetry Python
# decodes with unquote_plus, so a bare "+" would arrive there as a space.
_SAFE = "!#$&'()*-./:<=>?@[]^_`{|}~"
_PLAIN = re.compile(r"[A-Za-z0-9!#$&'()*\-./:<=>?@\[\]^_`{|}~]*\Z")
OWS = " \t"
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(?:-.*)?\Z")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


# -- baggage -----------------------------------------------------------------
def encode_member(name: str, value: str) -> str:
    """One baggage member ``name=value``, the value percent-encoded (UTF-8)."""
    if _PLAIN.match(value):  # most values (ids, tags) need no encoding at all
        return f"{name}={value}"
    return f"{name}={quote(value, safe=_SAFE)}"


def limit_members(members: list[tuple[str, str]], policy: Policy) -> list[tuple[str, str]]:
    """Drop whole members, largest first (ties: the later one), to fit the limits.

    Largest first keeps the most fields: one oversized value costs itself,
    not the small tags (tenant, canary) that were bound before it.
    """
    total = sum(len(member) for _, member in members) + max(len(members) - 1, 0)
    if len(members) <= policy.max_baggage_fields and total <= policy.max_baggage_bytes:
        return members
    order = sorted(range(len(members)), key=lambda i: (-len(members[i][1]), -i))
    dropped: set[int] = set()
    count = len(members)
    for i in order:
        if count <= policy.max_baggage_fields and total <= policy.max_baggage_bytes:
            break
        dropped.add(i)
        count -= 1
        total -= len(members[i][1]) + (1 if count else 0)
    names = [members[i][0] for i in sorted(dropped)]
    _log.warning(
        "ctxrelay: baggage over its limits (%d fields, %d bytes): dropped fields %s",
        policy.max_baggage_fields,
        policy.max_baggage_bytes,
        names,
    )
    return [m for i, m in enumerate(members) if i not in dropped]


def parse_baggage(
    header: str, policy: Policy, skip: AbstractSet[str], dropped: list[str] | None = None
) -> dict[str, str]:
    """The fields of a ``baggage`` header; a member it leaves out (over the
    limits, malformed, named like a field of its own, invalid) adds
    ``"baggage"`` to ``dropped`` when given."""
    limit = policy.max_baggage_bytes
    if len(header) > limit:
        # Keep whole members only: cut after the last comma within the limit.
        _log.debug("ctxrelay: inbound baggage over %d bytes; the rest is dropped", limit)
        header = header[: header.rfind(",", 0, limit + 1) + 1]
        if dropped is not None:
            dropped.append(BAGGAGE)
    fields: dict[str, str] = {}
    for raw in header.split(","):
        if not raw.strip(OWS):
            continue  # an empty member: nothing to keep or lose
        if len(fields) >= policy.max_baggage_fields:
            _log.debug("ctxrelay: inbound baggage over %d fields", policy.max_baggage_fields)
            if dropped is not None:
                dropped.append(BAGGAGE)
            break
        name, sep, value = raw.split(";", 1)[0].partition("=")  # properties not relayed
        name = name.strip(OWS)
        if not sep or name in skip:
            if dropped is not None:
                dropped.append(BAGGAGE)
            continue
        value = value.strip(OWS)
        if "%" in value or "+" in value:  # OpenTelemetry Python writes a space as "+"
            value = unquote_plus(value, errors="replace")
        try:
            validate_field(name, value)
        except (TypeError, ValueError) as exc:
            _log.debug("ctxrelay: dropped baggage member: %s", exc)
            if dropped is not None:
                dropped.append(BAGGAGE)
            continue
        fields[name] = value
    return fields


_not_baggage_memo: tuple[Policy | None, frozenset[str]] = (None, frozenset())


def not_baggage(policy: Policy) -> frozenset[str]:
    """Field names that never travel as baggage: headers of their own, local ones."""
    global _not_baggage_memo
    memo_policy, names = _not_baggage_memo
    if memo_policy is not policy:
        names = frozenset(policy.capture | policy.local | {REQUEST_ID, TRACEPARENT, TRACESTATE})
        _not_baggage_memo = (policy, names)
    return names


def header_lines(headers: object) -> Iterable[tuple[object, object]]:
    multi = getattr(headers, "multi_items", None)  # ctxrelay.Headers, httpx, starlette
    if callable(multi):
        items: Iterable[tuple[object, object]] = multi()
    elif isinstance(headers, Mapping):
        items = headers.items()
    else:
        items = headers  # type: ignore[assignment]
    return items


def valid_traceparent(value: str) -> bool:
    if _TRACEPARENT.match(value) is None:
        return False
    # The pattern fixes the positions: version-trace_id-span_id-flags[-rest].
    version = value[:2]
    if version == "ff" or (version == "00" and len(value) > 55):
        return False
    return value[3:35] != _ZERO_TRACE and value[36:52] != _ZERO_SPAN
