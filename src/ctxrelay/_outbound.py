"""Outbound: the current ``Context`` -> headers, per destination and per hop.

What travels, per field of the current context:

* ``request_id`` as the policy's request id header (``x-request-id``);
* a field named like a captured inbound header (``cookie``, ``x-gray``) as
  that header again, where the destination's route allows it;
* ``traceparent`` / ``tracestate`` as themselves, unless OpenTelemetry has an
  active span that belongs to the context: then OpenTelemetry's headers are
  sent and the relayed ones are not (two conflicting trace parents would
  split the trace).  When OpenTelemetry's global propagator speaks other
  formats (B3, X-Ray, Jaeger), the trace goes out in those, as it writes
  them (:func:`ctxrelay._otel.trace_headers`); an in-house carrier keeps W3C;
* every other field as a W3C ``baggage`` member, percent-encoded; so does
  OpenTelemetry's baggage, less what an untrusted peer sent in.

The policy (:mod:`ctxrelay._policy`) decides what each destination receives;
:func:`inject_hop` applies it again on every redirect hop.  Nothing here
raises into the host program: ``inject`` logs its own failures.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, unquote_plus

from . import _strict
from ._codec import (
    BAGGAGE,
    TRACEPARENT,
    TRACESTATE,
    encode_member,
    limit_members,
    not_baggage,
)
from ._context import FIELD_NAME, REQUEST_ID, Context, current, validate_field
from ._deadline import remaining_ms
from ._otel import BAGGAGE_LISTS, BAGGAGE_PREFIXES, baggage_entries, trace_headers
from ._policy import PROXY_CREDENTIALS, STATE, Origin, Policy, Route, peer_of_client
from ._request import RequestSnapshot

__all__ = ["Sent", "inject", "inject_hop", "outgoing"]

_log = logging.getLogger("ctxrelay")

# -- what an untrusted peer sent as baggage ------------------------------------
# The inbound headers that carry baggage are BAGGAGE_LISTS and
# BAGGAGE_PREFIXES (kept in _otel, which also keeps propagators from writing
# them): W3C's and the Jaeger client's lists (``k=v,k2=v2``), and the Jaeger
# and OpenTracing propagators' one header per entry (``uberctx-k: v``,
# ``ot-baggage-k: v``), all of which OpenTelemetry ships parsers for.


def _readings(text: str, properties: bool) -> set[str]:
    """Every value a baggage parser may make of ``text``: as sent, percent-
    decoded with ``+`` as a space (OpenTelemetry) or not, trimmed, and (when
    ``properties``) with or without its ``;properties`` (OpenTelemetry Python
    keeps them in the value)."""
    parts = {text, text.split(";", 1)[0]} if properties else {text}
    found: set[str] = set()
    for part in parts:
        encoded = "%" in part or "+" in part  # most names and values are not
        for decoded in (part, unquote_plus(part), unquote(part)) if encoded else (part,):
            found.add(decoded.strip())
            if not decoded.isascii():  # read as UTF-8 where we read latin-1
                found.add(decoded.encode("latin-1", "replace").decode("utf-8", "replace").strip())
    return found


def _arrived_lines(request: RequestSnapshot) -> list[tuple[str, str]] | None:
    """Every header line the request arrived with, or None when unknown.

    ``request.headers`` is cleaned: a line holding a control character, or
    past the snapshot's caps, is not in it -- yet OpenTelemetry's middleware
    read it from the server's headers all the same (uvicorn passes a 0x01 byte).
    So the raw lines the snapshot keeps for decoding are read too; when they
    cannot be, None says "assume the peer sent everything".
    """
    lines = list(request.headers.multi_items())
    try:
        raw = request._raw  # (..., decode, raw lines): see RequestSnapshot
        for name, value in raw[6](raw[7]):
            if not isinstance(name, str) or not isinstance(value, str):
                return None
            lines.append((name, value))
    except Exception:
        return None
    return lines


def _baggage_members_sent(header: str, value: str) -> list[str]:
    """The ``name=value`` members a header line carries as baggage (or none)."""
    if header in BAGGAGE_LISTS:
        return value.split(",")  # every line: OpenTelemetry reads only the first
    for prefix in BAGGAGE_PREFIXES:
        if header.startswith(prefix):
            return [f"{header[len(prefix) :]}={value}"]
    return []


def _sent_by_untrusted_peer(ctx: Context, policy: Policy, entries: Mapping[str, str]) -> set[str]:
    """The names of OpenTelemetry baggage ``entries`` whose value the inbound
    request's peer sent in, when the policy does not trust that peer.

    OpenTelemetry's middleware (or any propagator) parses the ``baggage``
    header whoever sent it; ctxrelay's trust rule must hold all the same.
    Entries application code set itself during the request still travel,
    unless they repeat what the peer sent, name and value.  Names match
    case-insensitively and under each reading of the encoding, so a
    ``Tenant`` or ``ten%61nt`` member cannot slip past.  A context without a
    request snapshot (not from the web middleware) has no peer to distrust.
    """
    request = ctx._request
    if request is None or policy.trusts(peer_of_client(request.client)):
        return set()
    lines = _arrived_lines(request)
    if lines is None:
        return set(entries)
    wanted: dict[str, list[str]] = {}
    for name in entries:
        wanted.setdefault(name.strip().casefold(), []).append(name)
    found: set[str] = set()
    for header, line in lines:
        for member in _baggage_members_sent(header.strip().lower(), line):
            raw_name, _, raw_value = member.partition("=")
            hits = {name.casefold() for name in _readings(raw_name, False)} & wanted.keys()
            if not hits:
                continue
            values = _readings(raw_value, True)
            for key in hits:
                found.update(name for name in wanted[key] if entries[name].strip() in values)
    return found


# -- inject ------------------------------------------------------------------
_W3C_TRACE = frozenset({TRACEPARENT, TRACESTATE})


@dataclass(frozen=True)
class Sent:
    """What ctxrelay added to one outgoing request, so a redirect can undo it.

    ``origin`` is the first hop's; ``added`` the header names set on the
    last; ``values`` the exact value set under each (a redirect takes back
    only a header still holding it); ``merged`` the value a ``cookie`` header
    had before ctxrelay added its cookies to it.  A ``Sent`` made or pickled
    before ``values`` existed has none: its ``added`` names are taken back
    whatever they hold, as they were then.
    """

    origin: Origin | None
    added: tuple[str, ...]
    values: tuple[tuple[str, str], ...] = ()
    merged: tuple[tuple[str, str], ...] = ()


def _may_send(name: str, route: Route, policy: Policy, credentials: bool) -> bool:
    if policy.is_sensitive(name):
        return credentials and name.lower() in route.sensitive
    return True


def outgoing(
    ctx: Context, policy: Policy, route: Route, *, credentials: bool = True, formats: bool = True
) -> dict[str, str]:
    """The headers ``route`` receives from ``ctx`` (lowercase names).

    ``credentials=False`` withholds every sensitive header and field: a
    redirect that left the first hop's origin gets none.  ``formats=False``
    writes the trace as W3C ``traceparent``/``tracestate`` whatever
    OpenTelemetry's global propagator speaks: an in-house carrier is read
    back by ctxrelay's ``extract``, which reads W3C.
    """
    out: dict[str, str] = {}
    fields = ctx._fields
    if route.request_id and REQUEST_ID in fields and REQUEST_ID not in policy.local:
        out[policy.request_id_header] = fields[REQUEST_ID]
    if policy.capture:
        for name in policy.capture:
            if name not in fields or name in policy.local:
                continue
            if policy.is_sensitive(name):
                if credentials and name in route.sensitive:
                    out[name] = fields[name]
            elif "*" in route.headers or name in route.headers:
                out[name] = fields[name]
    if route.deadline and ctx._deadline is not None:
        left = remaining_ms(ctx)
        if left is not None:  # the time left, re-read by the receiver's own clock
            out[policy.deadline_header] = str(left)
    if route.trace:
        traceparent = fields.get(TRACEPARENT)
        otel = trace_headers(traceparent, fields.get(TRACESTATE), formats=formats)
        if otel is not None:
            for name, value in otel.items():
                # A propagator's header never replaces one ctxrelay set, and
                # a name the policy calls sensitive needs a route naming it.
                if name in _W3C_TRACE or (
                    name not in out and _may_send(name, route, policy, credentials)
                ):
                    out[name] = value
        elif traceparent is not None:
            out[TRACEPARENT] = traceparent
            tracestate = fields.get(TRACESTATE)
            if tracestate is not None:
                out[TRACESTATE] = tracestate
    if route.baggage:
        baggage = _baggage(ctx, policy, route, credentials)
        if baggage:
            out[BAGGAGE] = baggage
    return out


# The baggage header last written per (context, route, credentials), its own
# fields only: a request's fan-out writes the same one for every call.  A
# context is an immutable value, and so is a policy; the context is held
# weakly (an entry never keeps one alive, and a dead one's recycled id
# misses), the policy and route strongly (so their identity is theirs).
# Bounded in count and size, and started over when full: a stream of fresh
# contexts costs a miss each, never memory.  Only a header written without
# a warning is remembered: one that dropped a field warns on every call.
_MEMO: dict[tuple[int, int, bool], tuple[weakref.ref[Context], Policy, Route, str]] = {}
_MEMO_MAX = 256
_MEMO_VALUE_MAX = 2048


def _baggage(ctx: Context, policy: Policy, route: Route, credentials: bool) -> str:
    """The ``baggage`` header ``route`` receives from ``ctx``; "" for none."""
    otel = baggage_entries()
    if otel:  # OpenTelemetry's baggage is not the context's: never remembered
        members = _own_members(ctx._fields, policy, route, credentials)[0]
        members += _otel_members(ctx, policy, route, credentials, otel)
        return ",".join(member for _, member in limit_members(members, policy))
    key = (id(ctx), id(route), credentials)
    entry = _MEMO.get(key)
    if entry is not None and entry[0]() is ctx and entry[1] is policy and entry[2] is route:
        return entry[3]
    members, clean = _own_members(ctx._fields, policy, route, credentials)
    if not members:
        return ""
    kept = limit_members(members, policy)
    header = ",".join(member for _, member in kept)
    if clean and len(kept) == len(members) and len(header) <= _MEMO_VALUE_MAX:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[key] = (weakref.ref(ctx), policy, route, header)
    return header


def _own_members(
    fields: Mapping[str, str], policy: Policy, route: Route, credentials: bool
) -> tuple[list[tuple[str, str]], bool]:
    """The context's own fields as baggage members, those ``route`` may
    receive; and False when one could not be written (it warned)."""
    skip = not_baggage(policy)
    sensitive = policy.is_sensitive
    allowed = route.sensitive if credentials else frozenset()
    members: list[tuple[str, str]] = []
    clean = True
    for name, value in fields.items():
        if name in skip or (sensitive(name) and name.lower() not in allowed):
            continue
        try:
            members.append((name, encode_member(name, value)))
        except UnicodeEncodeError:  # a lone surrogate: not representable in UTF-8
            _log.warning("ctxrelay: field %r cannot travel in baggage: not UTF-8", name)
            clean = False
    return members, clean


def _otel_members(
    ctx: Context,
    policy: Policy,
    route: Route,
    credentials: bool,
    entries: Mapping[str, object],
) -> list[tuple[str, str]]:
    """OpenTelemetry's baggage ``entries`` as members: ctxrelay's own fields
    win, and what an untrusted peer sent in stays behind."""
    fields = ctx._fields
    skip = not_baggage(policy)
    otel = {
        name: entry
        for name, entry in entries.items()
        if isinstance(entry, str) and name not in fields and name not in skip
    }
    if otel:
        # What an untrusted peer's baggage header put there stays behind,
        # whichever library parsed it: ctxrelay's extract() would not have.
        for name in _sent_by_untrusted_peer(ctx, policy, otel):
            del otel[name]
    members: list[tuple[str, str]] = []
    for name, entry in otel.items():
        if not FIELD_NAME.match(name) or not _may_send(name, route, policy, credentials):
            continue
        try:
            validate_field(name, entry)
            members.append((name, encode_member(name, entry)))
        except (ValueError, UnicodeEncodeError):
            continue
    return members


def _present(headers: MutableMapping[str, Any]) -> set[str]:
    return {name.lower() for name in headers}


def _set_missing(headers: MutableMapping[str, Any], new: Mapping[str, str]) -> tuple[str, ...]:
    # Headers the caller set explicitly win over relayed ones.
    if not new:
        return ()
    present = _present(headers) if headers else set()
    added = []
    for name, value in new.items():
        if name not in present:
            headers[name] = value
            added.append(name)
    return tuple(added)


def _http_safe(out: dict[str, str]) -> dict[str, str]:
    """``out`` without the header values an HTTP client cannot send as they are.

    requests (http.client) raises on a value that is not latin-1 when it
    sends, httpx refuses any non-ASCII value, aiohttp re-encodes it as UTF-8:
    only ASCII crosses all three unaltered.  Baggage is ASCII already
    (percent-encoded); a queue message (``destination=None``) takes any text.
    """
    for value in out.values():
        if not value.isascii():
            break
    else:
        return out  # the rule: every value is ASCII
    unsafe = [name for name, value in out.items() if not value.isascii()]
    _log.warning("ctxrelay: headers not sent (value not ASCII): %s", unsafe)
    for name in unsafe:
        del out[name]
    return out


def inject(headers: MutableMapping[str, str], *, destination: str | None = None) -> None:
    """Add the current context's headers for ``destination`` to ``headers``.

    ``destination`` is the URL the request goes to; the policy's routes
    decide what it receives (a host no route names gets the request id and
    trace headers only).  ``destination=None`` means an in-house carrier such
    as a task-queue message: ``Policy.in_house`` decides, by default every
    field that is not local, the request id, trace headers and captured
    headers that are not sensitive.  Headers already in ``headers`` are left
    as the caller set them.  Never raises: a failure is logged.
    """
    try:
        policy = STATE.policy
        route = policy.route(destination)[0]
        ctx = current()
        if _strict.STATE.on and not ctx:
            _strict.lost_call(_strict.handoff_site(sys._getframe(1)))
        out = outgoing(ctx, policy, route, formats=destination is not None)
        _set_missing(headers, out if destination is None else _http_safe(out))
    except Exception:
        _log.exception("ctxrelay: inject() failed; the request goes without context headers")


def inject_hop(headers: MutableMapping[str, Any], url: str, previous: Sent | None) -> Sent:
    """``inject`` for one hop of an HTTP request, redirects included.

    On the first hop (``previous`` is None) it injects for ``url``.  On a
    redirect it first takes back what it added on the previous hop -- a
    header only while it still holds the value ctxrelay set: one the client
    library rebuilt meanwhile (a ``Cookie`` from the redirect's
    ``Set-Cookie``) is the library's, and the cookies ctxrelay sent are added
    to it again.  If ``url`` left the first hop's origin (scheme, host,
    port), every sensitive header that is a credential for the destination,
    the caller's included, is stripped and none is re-added; a proxy's
    credentials (``Proxy-Authorization``) stay, they are the proxy's.  Then
    it injects again for ``url``.  Integrations call this; it never raises.
    """
    try:
        policy = STATE.policy
        route, origin = policy.route(url)
        credentials = True
        rebuilt: set[str] = set()
        if previous is not None:
            rebuilt = _take_back(headers, previous)
            if origin is None or origin != previous.origin:
                credentials = False
                for name in [n for n in headers if _destination_credential(n, policy)]:
                    _discard(headers, name)
            origin = previous.origin
        ctx = current()
        if _strict.STATE.on and not ctx and previous is None:
            _strict.lost_call(_strict.handoff_site(sys._getframe(1)))
        out = _http_safe(outgoing(ctx, policy, route, credentials=credentials))
        merged: dict[str, str] = {}
        if "cookie" in rebuilt and "cookie" in out:
            # The library rebuilt Cookie from its jar (requests and httpx do
            # on every redirect): the cookies ctxrelay sent on the previous
            # hop are added to the jar's, not traded for them.
            base = _value(headers, "cookie")
            if base is not None:
                cookie = _merge_cookies(base, out.pop("cookie"))
                if cookie != base:
                    _discard(headers, "cookie")
                    headers["cookie"] = cookie
                    merged["cookie"] = base
                    out["cookie"] = cookie
        added = _set_missing(headers, out)
        if merged:
            added += tuple(merged)
        values = tuple([(name, out[name]) for name in added])
        return Sent(origin, added, values, tuple(merged.items()) if merged else ())
    except Exception:
        _log.exception("ctxrelay: could not set context headers on an outgoing request")
        return Sent(previous.origin if previous else None, ())


def _destination_credential(name: str, policy: Policy) -> bool:
    # Proxy credentials are for the proxy, whatever host the request is for:
    # stripping them with the destination's made every hop after a redirect
    # to another origin a 407 behind an authenticating proxy.
    return policy.is_sensitive(name) and name.lower() not in PROXY_CREDENTIALS


def _take_back(headers: MutableMapping[str, Any], previous: Sent) -> set[str]:
    """Remove what ``previous`` added that still holds the value it set.

    Returns the names ctxrelay set whose value the library changed since.
    """
    if not previous.values:  # a Sent from before values were kept: by name
        for name in previous.added:
            _discard(headers, name)
        return set()
    merged = dict(previous.merged)
    rebuilt = set()
    for name, value in previous.values:
        now = _value(headers, name)
        if now is None:
            continue
        if now != value:
            rebuilt.add(name)  # the library's now: a redirect must not take it
            continue
        _discard(headers, name)
        if name in merged:  # ours were added to the library's: give those back
            headers[name] = merged[name]
    return rebuilt


def _value(headers: MutableMapping[str, Any], name: str) -> str | None:
    """The value of header ``name`` (lowercase), whatever its case; None if absent."""
    for key in headers:
        if key.lower() == name:
            value = headers[key]
            return value if isinstance(value, str) else None
    return None


def _merge_cookies(base: str, ours: str) -> str:
    """``base`` with the cookies of ``ours`` whose names it does not have."""
    names = {pair.partition("=")[0].strip() for pair in base.split(";")}
    extra = [p.strip() for p in ours.split(";") if p.partition("=")[0].strip() not in names]
    return "; ".join([base.strip(), *extra]) if extra else base


def _discard(headers: MutableMapping[str, Any], name: str) -> None:
    try:
        del headers[name]
    except KeyError:
        for key in [k for k in headers if k.lower() == name]:
            del headers[key]
