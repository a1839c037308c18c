"""Inbound: headers and requests -> ``Context``; the door and ``extract``.

The door turns one inbound request into the ``Context`` bound for it.

Shared by the ASGI, WSGI and Django middleware, so the three apply one rule:

* the snapshot is a value copy of the request (work that outlives the
  response reads this copy, never the live request);
* the relayed fields come from :func:`extract` (below), which applies
  the policy (what is captured, which peers are trusted for baggage);
* the request id is the inbound one when it is valid, else a new one.

Inbound data is hostile: :meth:`Door.open` never raises.  If anything in the
request trips the snapshot or the extraction, the request still gets a
context with a fresh request id, and the failure is logged.

Cost: the door runs on every request, so :func:`open_asgi` makes one pass
over the scope's raw header pairs and compares their ``bytes`` names with
sets kept per policy (:class:`Plan`): a name seen before costs one set
lookup.  The snapshot keeps the raw pairs and decodes them on first use;
``extract()`` runs only when a header it reads (a captured one,
``traceparent``, ``tracestate``, ``baggage`` when some peer is trusted) is
present.  Anything unusual -- names not lowercase tokens, entries that are
not pairs of ``bytes`` -- takes the careful path, which reads the decoded
snapshot and gives the same result.  :func:`open_wsgi` does the same with
environ keys.

Hostile input costs no more than its own size: the names the door remembers
are bounded in bytes (``PLAIN_NAME_BYTES``), header data that is not
``bytes`` is refused, never converted (``bytes(10**10)`` would allocate
10 GB), and a ``headers`` iterable that is not a list is read up to a bound.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from time import monotonic
from typing import Any, NamedTuple

from ._codec import (
    BAGGAGE,
    OWS,
    TRACEPARENT,
    TRACESTATE,
    header_lines,
    not_baggage,
    parse_baggage,
    valid_traceparent,
)
from ._context import EMPTY, REQUEST_ID, Context, make_context, narrowed, validate_field
from ._deadline import parse_remaining_ms
from ._policy import Policy, active
from ._request import (
    CONTROL,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_HEADERS_TOTAL_BYTES,
    RequestSnapshot,
    format_peer,
    latin1,
    refuse_not_bytes,
    snapshot_from_asgi,
)

__all__ = [
    "PLAIN_NAME_BYTES",
    "PLAIN_RETAINED_BYTES",
    "Door",
    "Plan",
    "RequestIdValidator",
    "extract",
    "extract_exactly",
    "fields_from",
    "new_request_id",
    "open_asgi",
    "open_wsgi",
    "valid_request_id",
]

_log = logging.getLogger("ctxrelay")

# RFC 9110 field-name: a token.
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")

#: Decides whether an inbound request id is kept.
RequestIdValidator = Callable[[str], bool]

# Not only UUIDs: proxies and peers bring their own formats (AWS ALB's
# "Root=1-...", Heroku's, Envoy's).  The alphabet keeps ids safe in a log
# line, a header and a baggage value alike.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_accepted = _REQUEST_ID.fullmatch

# Environ keys as PEP 3333 servers write them ("\0" separates them); a key
# with anything else is left to the careful path.
_ODD_ENVIRON_KEYS = re.compile(r"[^A-Z0-9_\0]")
_ENVIRON_CONTENT = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH"})


# What the door reads as it is: lowercase HTTP token names.
_TOKEN_LOWER = b"abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"

# Plan.plain, the names the door skips with one set lookup, is bounded in
# bytes, not only in count: names come from clients, and h11 (uvicorn)
# accepts a 15 KB one.  Capped by count alone (it was 4096 names), 4096
# requests each with a new 15 KB name pinned 62 MB for the life of the
# process.  Now only names of at most PLAIN_NAME_BYTES are remembered (real
# header names are short; a longer one is still read, just not remembered),
# at most PLAIN_NAMES of them, and a full set starts over (a flood of junk
# names cannot keep new real ones out for good).  Retained at most, bytes
# objects and the set's table (sys.getsizeof): PLAIN_RETAINED_BYTES.
PLAIN_NAME_BYTES = 64
PLAIN_NAMES = 1024
PLAIN_RETAINED_BYTES = 160 * 1024


def valid_request_id(value: str) -> bool:
    """The default validator: 1-128 characters of ``A-Z a-z 0-9 . _ : -``."""
    return _accepted(value) is not None


def new_request_id() -> str:
    """A fresh request id: 32 lowercase hex digits, 128 random bits.

    ``os.urandom`` directly: the bits of a UUID4 without building a ``UUID``
    (four times cheaper); the format is the one ``uuid4().hex`` has, less
    its fixed version digits.
    """
    return os.urandom(16).hex()


def _environ_key(name: str) -> str:
    key = name.upper().replace("-", "_")
    return key if key in _ENVIRON_CONTENT else "HTTP_" + key


class Plan(NamedTuple):
    """What the door looks for under one policy, precomputed once per policy.

    ``extracted`` are the headers whose presence means ``extract()`` has work:
    the captured ones, ``traceparent``, ``tracestate``, and ``baggage`` when
    the policy trusts any peer.  The request-id header is the door's own.
    """

    policy: Policy
    name: str
    name_bytes: bytes | None  # None: no ASGI header can carry that name
    environ_key: str
    extracted: frozenset[bytes]
    extracted_environ: frozenset[str]
    #: Whether the request-id header is also one of ``extracted``.
    id_extracted: bool
    #: ASGI names seen before that are lowercase tokens, neither ``extracted``
    #: nor the request-id header: the door skips them with one set lookup.
    #: Short ones only, bounded in bytes (see ``PLAIN_NAME_BYTES``).
    plain: set[bytes]

    @classmethod
    def build(cls, policy: Policy, fixed: str | None) -> Plan:
        """The plan for ``policy``; ``fixed`` is the door's own header name, if any."""
        name = fixed or policy.request_id_header
        try:
            name_bytes: bytes | None = name.encode("latin-1")
        except UnicodeEncodeError:
            name_bytes = None
        wanted = set(policy.capture) | {TRACEPARENT, TRACESTATE}
        if policy.trusted_peers:
            wanted.add(BAGGAGE)
            wanted.add(policy.deadline_header)  # honoured from trusted peers only
        extracted = frozenset(n.encode("ascii") for n in wanted)  # capture names are ASCII
        return cls(
            policy,
            name,
            name_bytes,
            "HTTP_" + name.upper().replace("-", "_"),
            extracted,
            frozenset(map(_environ_key, wanted))
            | {"HTTP_" + n.upper().replace("-", "_") for n in wanted},
            name_bytes in extracted,
            set(),
        )

    def learn(self, name: object) -> bool:
        """Whether an ASGI header ``name`` that is neither plain yet, nor the
        request-id header, nor extracted, may be read as it is: a lowercase
        token in ``bytes``.  Such a name becomes plain if it is short (names
        come from outside: see ``PLAIN_NAME_BYTES``)."""
        if type(name) is not bytes or not name or name.translate(None, _TOKEN_LOWER):
            return False  # uppercase, padded, not bytes: only the careful path reads it right
        if len(name) <= PLAIN_NAME_BYTES:
            plain = self.plain
            if len(plain) >= PLAIN_NAMES:
                plain.clear()  # start over: the bound holds, new real names get in
            plain.add(name)
        return True


def _shown(value: str) -> str:
    # For debug logs: never echo a hostile value whole or raw (log injection).
    return repr(value[:64] + ("..." if len(value) > 64 else ""))


class Door:
    """The request-id rule and the snapshot-to-``Context`` step, configured once.

    ``header_name``
        The request-id header; ``None`` follows the active policy's
        ``request_id_header`` (``x-request-id``), read per request so that
        ``ctxrelay.configure()`` after start-up still takes effect.
    ``validator``
        Decides whether an inbound id is kept; the default accepts 1-128
        characters of ``A-Z a-z 0-9 . _ : -``.  Whatever it accepts must still
        be a valid context field (no control character, at most 4096 bytes).
    """

    __slots__ = ("_custom", "_fixed", "current_plan", "validator")

    def __init__(
        self, header_name: str | None = None, validator: RequestIdValidator | None = None
    ) -> None:
        if header_name is not None and (not isinstance(header_name, str) or not header_name):
            raise TypeError("header_name must be a non-empty str (or None for the policy's)")
        if header_name is not None and not _HEADER_TOKEN.match(header_name):
            # Checked here, once: a bad name would otherwise fail every request.
            raise ValueError(f"header_name {header_name!r} is not an HTTP header name")
        if validator is not None and not callable(validator):
            raise TypeError("validator must be a callable taking the inbound id")
        self._fixed = header_name.lower() if header_name else None
        #: The last plan built; callers on a hot path check its ``policy``
        #: against the active one themselves, else call :meth:`plan`.
        self.current_plan = Plan.build(active(), self._fixed)
        self.validator = validator or valid_request_id
        self._custom = validator is not None

    def plan(self) -> Plan:
        """The :class:`Plan` for the policy in force now (rebuilt when it changes)."""
        plan = self.current_plan
        policy = active()
        if plan.policy is not policy:
            # Two threads may both rebuild: equal plans, an atomic assignment.
            plan = self.current_plan = Plan.build(policy, self._fixed)
        return plan

    @property
    def header_name(self) -> str:
        """The lowercase request-id header name in force now."""
        return self.plan().name

    def open(self, snapshot: RequestSnapshot, raw_id: str | None, peer: str | None) -> Context:
        """The context for one request.

        ``raw_id`` is the inbound request-id header exactly as received
        (before the snapshot's cleaning), so a control-character id is seen,
        logged and replaced.  ``peer`` (``host:port``) decides whether baggage
        is trusted (an edge service trusts no one; see ``Policy``).
        """
        return self._bind(*_extracted(snapshot, peer), raw_id, snapshot)

    def _bind(
        self,
        fields: dict[str, str],
        deadline: float | None,
        raw_id: str | None,
        snapshot: RequestSnapshot,
    ) -> Context:
        if raw_id is not None and not self._custom and _accepted(raw_id) is not None:
            fields[REQUEST_ID] = raw_id  # request_id()'s common case, inlined
        else:
            fields[REQUEST_ID] = self.request_id(raw_id)
        ctx = make_context(fields, snapshot)
        if deadline is not None:
            ctx = narrowed(ctx, deadline)
        return ctx

    def fallback(self, raw_id: object) -> Context:
        """The context when no snapshot could be taken: a request id only."""
        return make_context(
            {REQUEST_ID: self.request_id(raw_id if isinstance(raw_id, str) else None)}, None
        )

    def request_id(self, raw: str | None) -> str:
        """The inbound id when it is valid, else a new one (debug-logged)."""
        if raw is not None and self._accepts(raw):
            return raw
        generated = new_request_id()
        if raw is not None:
            _log.debug(
                "ctxrelay: replaced an invalid inbound %s %s with %s",
                self.header_name,
                _shown(raw),
                generated,
            )
        return generated

    def _accepts(self, raw: str) -> bool:
        if not self._custom:
            return _accepted(raw) is not None
        try:
            if not self.validator(raw):
                return False
            validate_field(REQUEST_ID, raw)
        except Exception as exc:  # a validator's bug, or an id no header may carry
            _log.debug("ctxrelay: inbound request id refused: %s", exc)
            return False
        return True


def _extracted(snapshot: RequestSnapshot, peer: str | None) -> tuple[dict[str, str], float | None]:
    try:
        ctx = extract(snapshot.headers, peer=peer)
        return dict(ctx), ctx._deadline
    except Exception:  # a bug of ours must not fail the request
        _log.exception("ctxrelay: could not extract inbound fields; continuing without them")
        return {}, None


def header_from_asgi(entries: Iterable[object], name: bytes) -> str | None:
    """The first value of header ``name`` among ASGI header ``entries`` (the
    bounded copy the snapshot read), raw, or ``None``.

    ASGI servers send lowercase names (the spec requires it); a malformed
    entry is skipped.  Names and values that are not ``bytes``/``bytearray``
    are never converted -- ``bytes(value)`` of an int allocates that many
    bytes, of an endless iterator never returns -- but refused and reported.
    """
    for pair in entries:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            continue
        key, value = pair[0], pair[1]
        if not isinstance(key, (bytes, bytearray)) or key != name:
            continue
        text = latin1(value)
        if text is not None:
            return text
        refuse_not_bytes("header value", value)
    return None


def open_asgi(door: Door, scope: Mapping[str, Any], plan: Plan | None = None) -> Context:
    """The context for an ASGI ``http``/``websocket`` scope; never raises.

    ``plan`` is ``door.plan()`` when the caller already has it.
    """
    raw_id: str | None = None
    try:
        if plan is None:
            plan = door.plan()
        snapshot, raw, entries = snapshot_from_asgi(scope)
        name = plan.name_bytes
        if raw is None or name is None:
            return _open_asgi_carefully(door, plan, scope, snapshot, entries)
        # One pass over the raw pairs, names compared as bytes; a name seen
        # before costs one set lookup.  This loop is the door's hot path.
        plain, extracted = plan.plain, plan.extracted
        value: Any = None
        hits: list[tuple[Any, Any]] | None = None  # the lines extract() reads
        try:
            for key, item in raw:
                if key in plain:
                    continue
                if key == name:
                    if value is None:
                        value = item  # a repeated id header: the first counts
                    if plan.id_extracted:  # the id header is captured too
                        hits = hits or []
                        hits.append((key, item))
                elif key in extracted:
                    hits = hits or []
                    hits.append((key, item))
                elif not plan.learn(key):
                    return _open_asgi_carefully(door, plan, scope, snapshot, entries)
        except (TypeError, ValueError):  # an entry that is not a pair, an unhashable name
            return _open_asgi_carefully(door, plan, scope, snapshot, entries)
        if value is not None:
            if type(value) is not bytes:
                return _open_asgi_carefully(door, plan, scope, snapshot, entries)
            raw_id = value.decode("latin-1")
        if hits is None:
            return door._bind({}, None, raw_id, snapshot)
        return door._bind(*_extract_raw(plan, raw, hits, scope, snapshot), raw_id, snapshot)
    except Exception:
        _log.warning("ctxrelay: could not snapshot an ASGI request", exc_info=True)
        return door.fallback(raw_id)


def _extract_raw(
    plan: Plan,
    raw: tuple[Any, ...],
    hits: list[tuple[Any, Any]],
    scope: Mapping[str, Any],
    snapshot: RequestSnapshot,
) -> tuple[dict[str, str], float | None]:
    """``extract(snapshot.headers)`` read from the raw lines it needs, ``hits``:
    the fields, and the deadline a trusted peer sent (a monotonic instant).

    The snapshot drops a line with a control character or over
    ``MAX_HEADER_BYTES``, and stops keeping lines past ``MAX_HEADERS`` or
    ``MAX_HEADERS_TOTAL_BYTES``.  The first two are applied here line by
    line; when the caps could bite, or a line is not ``bytes``, the decoded
    snapshot is read instead (:func:`_extracted`).
    """
    try:
        total = sum([len(key) + len(item) for key, item in raw])
    except (TypeError, ValueError):  # no length, or an entry that is no pair (now)
        total = MAX_HEADERS_TOTAL_BYTES + 1
    if len(raw) > MAX_HEADERS or total > MAX_HEADERS_TOTAL_BYTES:
        return _extracted(snapshot, _asgi_peer(scope))
    found: dict[str, list[str]] = {}
    for key, item in hits:
        if type(key) is not bytes or type(item) is not bytes:
            return _extracted(snapshot, _asgi_peer(scope))
        text = item.decode("latin-1")
        if len(text) <= MAX_HEADER_BYTES and not CONTROL.search(text):
            found.setdefault(key.decode("latin-1"), []).append(text.strip(" \t"))
    policy = plan.policy
    if (BAGGAGE in found or policy.deadline_header in found) and not policy.trusts(
        _asgi_peer(scope)
    ):
        found.pop(BAGGAGE, None)
        found.pop(policy.deadline_header, None)
    try:
        return fields_from(found, policy), _inbound_deadline(found, policy)
    except Exception:  # a bug of ours must not fail the request
        _log.exception("ctxrelay: could not extract inbound fields; continuing without them")
        return {}, None


def _open_asgi_carefully(
    door: Door,
    plan: Plan,
    scope: Mapping[str, Any],
    snapshot: RequestSnapshot,
    entries: tuple[Any, ...],
) -> Context:
    # Headers that are not a clean ASGI list: read them as they come -- from
    # the snapshot's bounded copy, not the scope (an iterator there is spent,
    # or endless).
    raw_id = header_from_asgi(entries, plan.name.encode("latin-1"))
    return door.open(snapshot, raw_id, _asgi_peer(scope))


def _asgi_peer(scope: Mapping[str, Any]) -> str | None:
    client = scope.get("client") or (None, None)
    return format_peer(client[0], client[1])


def open_wsgi(door: Door, environ: Mapping[str, Any]) -> Context:
    """The context for a WSGI environ; never raises."""
    raw_id: str | None = None
    try:
        plan = door.plan()
        value = environ.get(plan.environ_key)
        raw_id = value if isinstance(value, str) else None
        snapshot = RequestSnapshot.from_wsgi(environ)
        keys = [key for key in environ if type(key) is str and key.startswith(_WSGI_HEADERS)]
        if plan.extracted_environ.isdisjoint(keys) and not _ODD_ENVIRON_KEYS.search(
            "\0".join(keys)
        ):
            return door._bind({}, None, raw_id, snapshot)
        peer = format_peer(environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT"))
        return door._bind(*_extracted(snapshot, peer), raw_id, snapshot)
    except Exception:
        _log.warning("ctxrelay: could not snapshot a WSGI request", exc_info=True)
        return door.fallback(raw_id)


_WSGI_HEADERS = ("HTTP_", "CONTENT_")


# -- extract -----------------------------------------------------------------
def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")  # HTTP/ASGI header bytes
    return None


def _collect(headers: object, wanted: AbstractSet[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for count, line in enumerate(header_lines(headers)):
        if count >= MAX_HEADERS * 4:
            _log.debug("ctxrelay: extract() read the first %d header lines only", count)
            break
        try:
            raw_name, raw_value = line
        except (TypeError, ValueError):
            continue
        # str is the common case: no call for it.
        name = raw_name if type(raw_name) is str else _text(raw_name)
        if name is None:
            continue
        name = name.strip().lower()
        if name in wanted:
            value = raw_value if type(raw_value) is str else _text(raw_value)
            if value is not None:
                found.setdefault(name, []).append(value.strip(OWS))
    return found


def _valid(name: str, value: str) -> bool:
    try:
        validate_field(name, value)
    except ValueError as exc:
        _log.debug("ctxrelay: dropped inbound header: %s", exc)
        return False
    return True


def extract(
    headers: Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]],
    *,
    peer: str | None = None,
    in_house: bool = False,
) -> Context:
    """The context carried by inbound ``headers``.  Never raises.

    It holds the request id (from the policy's request id header), the
    headers the policy captures (each a field named by the lowercased header
    name), a valid ``traceparent``/``tracestate`` verbatim, and the
    ``baggage`` fields -- those only when the policy trusts ``peer`` (the
    client address, ``host`` or ``host:port``; ``None`` or ``""`` when
    unknown: never trusted) or, with ``in_house=True`` (a task-queue
    message written by ``inject(destination=None)``), when
    ``Policy.trust_in_house``.  Invalid entries are dropped with a debug log.
    """
    try:
        return _extract(headers, peer, in_house)
    except Exception:
        _log.debug("ctxrelay: extract() dropped unreadable headers", exc_info=True)
        return EMPTY


def _extract(
    headers: object, peer: str | None, in_house: bool, dropped: list[str] | None = None
) -> Context:
    policy = active()
    rid_header = policy.request_id_header
    trusted = policy.trust_in_house if in_house else policy.trusts(peer)
    wanted = policy.capture | {rid_header, TRACEPARENT, TRACESTATE}
    if trusted:
        wanted |= {BAGGAGE, policy.deadline_header}
    found = _collect(headers, wanted)
    fields = fields_from(found, policy, dropped)
    at = _inbound_deadline(found, policy, dropped) if trusted else None
    if at is not None:
        return narrowed(make_context(fields, None), at)
    return make_context(fields, None) if fields else EMPTY


_bad_deadlines = itertools.count()


def _inbound_deadline(
    found: Mapping[str, list[str]], policy: Policy, dropped: list[str] | None = None
) -> float | None:
    """The deadline (a monotonic instant) a trusted sender's remaining-time
    header sets: only ever narrowing (the caller narrows), capped at
    ``policy.max_inbound_timeout``; a malformed or repeated one is refused
    with a warning (rate-limited: it comes from outside)."""
    values = found.get(policy.deadline_header)
    if not values:
        return None
    seconds = parse_remaining_ms(values[0], policy.max_inbound_timeout)
    if seconds is None or len(values) != 1:
        if dropped is not None:
            dropped.append(policy.deadline_header)
        count = next(_bad_deadlines)
        if count < 10 or count % 1000 == 0:
            _log.warning(
                "ctxrelay: ignored a malformed %s header (%d so far): want one value of "
                "1-12 digits (milliseconds)",
                policy.deadline_header,
                count + 1,
            )
        return None
    return monotonic() + seconds


def extract_exactly(
    headers: Mapping[str, str], *, in_house: bool = False
) -> tuple[Context, str | None]:
    """:func:`extract`, and the first header line it left out, or ``None``.

    For carriers that must be read all or nothing (a queue message's
    context): extract's own rules say what is left out, so no second copy of
    them can drift.  Never raises: unreadable input is ``(EMPTY, "?")``.
    """
    dropped: list[str] = []
    try:
        ctx = _extract(headers, None, in_house, dropped)
    except Exception:
        _log.debug("ctxrelay: extract() dropped unreadable headers", exc_info=True)
        return EMPTY, "?"
    return ctx, dropped[0] if dropped else None


def fields_from(
    found: Mapping[str, list[str]], policy: Policy, dropped: list[str] | None = None
) -> dict[str, str]:
    """The fields ``extract()`` makes of the header lines it ``found``.

    ``found`` maps a lowercase header name to its values in arrival order,
    stripped of surrounding blanks; ``baggage`` is read when present (leave
    it out when the peer is not trusted).  The web door calls this with the
    lines it collected from raw ASGI pairs, so both read headers alike.
    """
    fields: dict[str, str] = {}
    if BAGGAGE in found:
        skip = not_baggage(policy)
        fields.update(parse_baggage(",".join(found[BAGGAGE]), policy, skip, dropped))
    for name in policy.capture:
        if name in found:
            value = ("; " if name == "cookie" else ", ").join(found[name])
            if _valid(name, value):
                fields[name] = value
            elif dropped is not None:
                dropped.append(name)
    parents = found.get(TRACEPARENT, [])
    # A later version may carry more after the flags: still a field, so valid.
    if len(parents) == 1 and valid_traceparent(parents[0]) and _valid(TRACEPARENT, parents[0]):
        fields[TRACEPARENT] = parents[0]
        state = ",".join(found.get(TRACESTATE, []))
        if state and _valid(TRACESTATE, state):
            fields[TRACESTATE] = state
        elif TRACESTATE in found and dropped is not None:
            dropped.append(TRACESTATE)
    elif dropped is not None and (parents or TRACESTATE in found):
        dropped.append(TRACEPARENT if parents else TRACESTATE)
    ids = found.get(policy.request_id_header, [])
    if len(ids) == 1 and ids[0] and _valid(REQUEST_ID, ids[0]):
        fields[REQUEST_ID] = ids[0]
    elif ids and dropped is not None:
        dropped.append(policy.request_id_header)
    return fields
