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
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from collections.abc import Set as AbstractSet
from itertools import chain
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
from ._context import (
    EMPTY,
    REQUEST_ID,
    Context,
    make_context,
    make_request_context,
    narrowed,
    validate_field,
)
from ._deadline import parse_remaining_ms
from ._policy import STATE as _POLICY
from ._policy import Policy, active
from ._request import (
    CONTROL,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_HEADERS_TOTAL_BYTES,
    RequestSnapshot,
    asgi_snapshot_with,
    format_peer,
    latin1,
    raw_asgi_snapshot,
    refuse_not_bytes,
    snapshot_from_asgi,
)

__all__ = [
    "PLAIN_NAME_BYTES",
    "PLAIN_RETAINED_BYTES",
    "Door",
    "DoorOptions",
    "Plan",
    "RequestIdGenerator",
    "RequestIdTransformer",
    "RequestIdValidator",
    "admit_asgi",
    "admit_wsgi",
    "aws_trace_id",
    "Admitted",
    "extract",
    "extract_exactly",
    "fields_from",
    "log_request",
    "new_request_id",
    "open_asgi",
    "open_asgi_echo",
    "open_wsgi",
    "valid_request_id",
]

_log = logging.getLogger("ctxrelay")

# RFC 9110 field-name: a token.
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")

#: Decides whether an inbound request id is kept.
RequestIdValidator = Callable[[str], bool]
#: Makes a new request id (``generator=``).
RequestIdGenerator = Callable[[], str]
#: Rewrites an inbound or generated id before it is bound (``transformer=``).
RequestIdTransformer = Callable[[str], str]

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


class Plan:
    """What the door looks for under one policy, precomputed once per policy.

    ``extracted`` are the headers whose presence means ``extract()`` has work:
    the captured ones, ``traceparent``, ``tracestate``, and ``baggage`` when
    the policy trusts any peer.  The request-id header is the door's own.

    A slotted class, not a ``NamedTuple``: the door reads its attributes on
    every request, and a slot is read in one specialized step where a named
    tuple's field goes through a descriptor call.
    """

    __slots__ = (
        "environ_key",
        "extracted",
        "extracted_environ",
        "id_extracted",
        "name",
        "name_bytes",
        "plain",
        "policy",
        "trusting",
    )

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
    #: Whether the policy trusts some peer: only then can a request bring a
    #: deadline (or baggage) the door honours.
    trusting: bool

    def __init__(
        self,
        policy: Policy,
        name: str,
        name_bytes: bytes | None,
        environ_key: str,
        extracted: frozenset[bytes],
        extracted_environ: frozenset[str],
        id_extracted: bool,
        plain: set[bytes],
    ) -> None:
        self.policy = policy
        self.name = name
        self.name_bytes = name_bytes
        self.environ_key = environ_key
        self.extracted = extracted
        self.extracted_environ = extracted_environ
        self.id_extracted = id_extracted
        self.plain = plain
        self.trusting = bool(policy.trusted_peers)

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


def aws_trace_id(value: str) -> str:
    """A ready ``transformer=``: the id an AWS ``X-Amzn-Trace-Id`` header carries.

    ``Self=`` when present (the load balancer's own segment), else ``Root=``
    (``Root=1-67891233-abcdef012345678912345678;Sampled=1`` gives
    ``1-67891233-abcdef012345678912345678``); a value holding neither is
    returned as it is, so a generated id passes through.  Use it with
    ``header_name="x-amzn-trace-id"`` (or a sequence holding it).
    """
    root = None
    for part in value.split(";"):
        key, sep, item = part.strip().partition("=")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "self":
            return item.strip()
        if key == "root" and root is None:
            root = item.strip()
    return value if root is None else root


class DoorOptions:
    """The door's options beyond the request-id rule, checked once.

    ``Door.options`` is ``None`` while every one of them is at its default,
    so the door's hot path pays nothing for them; the web integrations take
    their options path only when it is set.
    """

    __slots__ = (
        "exact_paths",
        "expose_header",
        "generator",
        "log_requests",
        "names",
        "path_patterns",
        "reject_invalid",
        "response_header",
        "transformer",
        "update_request_header",
    )

    def __init__(
        self,
        names: tuple[str, ...],
        generator: RequestIdGenerator | None,
        transformer: RequestIdTransformer | None,
        response_header: str | None,
        update_request_header: bool,
        expose_header: bool,
        exclude_paths: Iterable[str | re.Pattern[str]],
        reject_invalid: bool,
        log_requests: bool,
    ) -> None:
        if generator is not None and not callable(generator):
            raise TypeError("generator must be a callable returning a new request id")
        if transformer is not None and not callable(transformer):
            raise TypeError("transformer must be a callable taking and returning a str")
        if response_header is not None:
            response_header = _header_name(response_header, "response_header")
        for flag, value in (
            ("update_request_header", update_request_header),
            ("expose_header", expose_header),
            ("reject_invalid", reject_invalid),
            ("log_requests", log_requests),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False")
        if isinstance(exclude_paths, (str, re.Pattern)):
            exclude_paths = (exclude_paths,)  # one path, not its characters
        exact: set[str] = set()
        patterns: list[re.Pattern[str]] = []
        for path in exclude_paths:
            if isinstance(path, str):
                exact.add(path)
            elif isinstance(path, re.Pattern) and isinstance(path.pattern, str):
                patterns.append(path)
            else:
                raise TypeError(
                    "exclude_paths holds exact paths (str) or compiled regular expressions "
                    f"(re.compile), not {type(path).__name__}"
                )
        self.names = names
        self.generator = generator
        self.transformer = transformer
        self.response_header = response_header
        self.update_request_header = update_request_header
        self.expose_header = expose_header
        self.exact_paths = frozenset(exact)
        self.path_patterns = tuple(patterns)
        self.reject_invalid = reject_invalid
        self.log_requests = log_requests

    def excluded(self, path: object) -> bool:
        """Whether requests to ``path`` get no id, no echo and no log line."""
        if not isinstance(path, str):
            return False
        if path in self.exact_paths:
            return True
        return any(pattern.fullmatch(path) for pattern in self.path_patterns)


def _header_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{what} must be a non-empty str")
    if not _HEADER_TOKEN.match(name):
        # Checked here, once: a bad name would otherwise fail every request.
        raise ValueError(f"{what} {name!r} is not an HTTP header name")
    return name.lower()


class Door:
    """The request-id rule and the snapshot-to-``Context`` step, configured once.

    ``header_name``
        The request-id header; ``None`` follows the active policy's
        ``request_id_header`` (``x-request-id``), read per request so that
        ``ctxrelay.configure()`` after start-up still takes effect.  A
        sequence of names: the first one present with a valid value wins;
        the echo uses the first name.
    ``validator``
        Decides whether an inbound id is kept; the default accepts 1-128
        characters of ``A-Z a-z 0-9 . _ : -``.  Whatever it accepts must still
        be a valid context field (no control character, at most 4096 bytes).

    The other keywords are the web doors' options (:class:`DoorOptions`):
    ``generator``, ``transformer``, ``response_header``,
    ``update_request_header``, ``expose_header``, ``exclude_paths``,
    ``reject_invalid`` and ``log_requests``; docs/web.md describes them.
    """

    __slots__ = (
        "_custom",
        "_fixed",
        "current_plan",
        "options",
        "update_request_header",
        "validator",
    )

    def __init__(
        self,
        header_name: str | Sequence[str] | None = None,
        validator: RequestIdValidator | None = None,
        *,
        generator: RequestIdGenerator | None = None,
        transformer: RequestIdTransformer | None = None,
        response_header: str | None = None,
        update_request_header: bool = True,
        expose_header: bool = False,
        exclude_paths: Iterable[str | re.Pattern[str]] = (),
        reject_invalid: bool = False,
        log_requests: bool = False,
    ) -> None:
        names: tuple[str, ...] = ()
        if header_name is not None and not isinstance(header_name, str):
            if not isinstance(header_name, Sequence) or not header_name:
                raise TypeError(
                    "header_name must be a non-empty str, a non-empty sequence of them, "
                    "or None for the policy's"
                )
            names = tuple(_header_name(n, "header_name") for n in header_name)
            header_name = names[0]
        elif header_name is not None:
            header_name = _header_name(header_name, "header_name")
        if validator is not None and not callable(validator):
            raise TypeError("validator must be a callable taking the inbound id")
        self._fixed = header_name or None
        #: The last plan built; callers on a hot path check its ``policy``
        #: against the active one themselves, else call :meth:`plan`.
        self.current_plan = Plan.build(active(), self._fixed)
        self.validator = validator or valid_request_id
        self.update_request_header = update_request_header
        options = DoorOptions(
            names or ((header_name,) if header_name else ()),
            generator,
            transformer,
            response_header,
            update_request_header,
            expose_header,
            exclude_paths,
            reject_invalid,
            log_requests,
        )
        plain = (
            len(names) <= 1
            and generator is None
            and transformer is None
            and response_header is None
            and not expose_header
            and not options.exact_paths
            and not options.path_patterns
            and not reject_invalid
            and not log_requests
        )
        #: ``None`` while every option is at its default: the hot path.
        self.options: DoorOptions | None = None if plain else options
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
        """The lowercase request-id header name in force now (the first one)."""
        return self.plan().name

    @property
    def header_names(self) -> tuple[str, ...]:
        """Every request-id header read, in order of preference."""
        options = self.options
        if options is not None and options.names:
            return options.names
        return (self.plan().name,)

    @property
    def response_header(self) -> str:
        """The name the id is echoed under."""
        options = self.options
        if options is not None and options.response_header:
            return options.response_header
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
        source: MutableMapping[str, Any] | None = None,
    ) -> Context:
        if raw_id is not None and not self._custom and _accepted(raw_id) is not None:
            fields[REQUEST_ID] = raw_id  # request_id()'s common case, inlined
        else:
            fields[REQUEST_ID] = rid = self.request_id(raw_id, snapshot)
            if source is not None and self.update_request_header and rid != raw_id:
                snapshot = _carry(source, self.plan(), rid, snapshot, raw_id is not None)
        ctx = make_request_context(fields, snapshot)
        if deadline is not None:
            ctx = narrowed(ctx, deadline)
        return ctx

    def fallback(self, raw_id: object) -> Context:
        """The context when no snapshot could be taken: a request id only."""
        return make_request_context(
            {REQUEST_ID: self.request_id(raw_id if isinstance(raw_id, str) else None)}, None
        )

    def request_id(self, raw: str | None, peer: str | RequestSnapshot | None = None) -> str:
        """The inbound id when it is valid, else a new one (a replaced one is
        logged at warning, rate-limited, naming ``peer``, or the snapshot's
        client)."""
        if raw is not None and self._accepts(raw):
            return raw
        generated = self.new_id()
        if raw is not None:
            _replaced(self.header_name, raw, generated, peer)
        return generated

    def new_id(self) -> str:
        """A new request id: the ``generator``'s (validated, then transformed)
        when one is configured, else :func:`new_request_id`."""
        options = self.options
        if options is None or (options.generator is None and options.transformer is None):
            return new_request_id()
        made: object = None
        try:
            made = options.generator() if options.generator is not None else new_request_id()
            if not isinstance(made, str):
                raise TypeError(f"it returned {type(made).__name__}, not str")
            made = self._transformed(made)
            if made is not None and self._accepts(made):
                return made
            raise ValueError("its id is not valid")
        except Exception as exc:  # a generator's bug must not fail the request
            _log.warning(
                "ctxrelay: the request id generator failed (%s); using a random id instead", exc
            )
            return new_request_id()

    def _transformed(self, value: str) -> str | None:
        options = self.options
        if options is None or options.transformer is None:
            return value
        try:
            result = options.transformer(value)
        except Exception as exc:  # a transformer's bug: the id is refused
            _log.debug("ctxrelay: request id transformer failed: %s", exc)
            return None
        return result if isinstance(result, str) else None

    def choose(self, raws: Sequence[str | None], peer: str | None) -> tuple[str, bool]:
        """The id in force for the inbound values of :attr:`header_names`
        (``raws``, in the same order), and whether an inbound one was
        refused (``reject_invalid`` answers 400 then).  The first present
        valid one wins (after the transformer); else a new one."""
        refused: str | None = None
        for raw in raws:
            if raw is None:
                continue
            value = self._transformed(raw)
            if value is not None and self._accepts(value):
                return value, False
            if refused is None:
                refused = raw
        generated = self.new_id()
        if refused is not None:
            _replaced(self.header_names[0], refused, generated, peer)
        return generated, refused is not None

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


_replacements = itertools.count()


def _replaced(name: str, raw: str, generated: str, peer: str | RequestSnapshot | None) -> None:
    # A WARNING, so a broken upstream is found; rate-limited (the value comes
    # from outside: a flood must not flood the log).  Debug past the limit.
    if isinstance(peer, RequestSnapshot):
        peer = peer.client  # formatted here only: the replaced path
    count = next(_replacements)
    level = logging.WARNING if count < 10 or count % 1000 == 0 else logging.DEBUG
    _log.log(
        level,
        "ctxrelay: replaced an invalid inbound %s %s from peer %s with %s (%d so far)",
        name,
        _shown(raw),
        peer or "unknown",
        generated,
        count + 1,
    )


def _carry(
    source: MutableMapping[str, Any],
    plan: Plan,
    rid: str,
    snapshot: RequestSnapshot,
    drop: bool = True,
) -> RequestSnapshot:
    """``update_request_header``: the request's own headers (the ASGI scope or
    the WSGI environ ``source``) carry the id in force under the first
    request-id header name, and so does the snapshot, taken again."""
    try:
        if "headers" in source and "type" in source:  # an ASGI scope
            name = plan.name_bytes
            if name is None:
                return snapshot
            headers = source.get("headers") or ()
            if not isinstance(headers, (list, tuple)):
                return snapshot  # an iterator: rewriting it would lose what it holds
            line = (name, rid.encode("latin-1"))
            if not drop:  # no id header came: nothing to drop
                kept = [*headers, line]
            else:
                kept = [
                    pair
                    for pair in headers
                    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and pair[0] == name)
                ]
                kept.append(line)
            source["headers"] = kept
            return RequestSnapshot.from_asgi(source)
        source[plan.environ_key] = rid
        return RequestSnapshot.from_wsgi(source)
    except Exception:  # a scope we cannot write: the context still carries the id
        _log.debug("ctxrelay: could not write the request id into the request", exc_info=True)
        return snapshot


class Admitted(NamedTuple):
    """What the door's options path decided for one request."""

    #: The context to bind; ``None`` when the path is excluded or the
    #: request is rejected.
    ctx: Context | None
    #: ``reject_invalid`` and the inbound id was invalid: answer 400.
    rejected: bool


_EXCLUDED = Admitted(None, False)
_REJECTED = Admitted(None, True)


def admit_asgi(door: Door, scope: MutableMapping[str, Any]) -> Admitted:
    """The door with its options (``door.options`` set) for an ASGI scope;
    never raises."""
    options = door.options
    assert options is not None  # the caller checked
    if options.excluded(scope.get("path")):
        return _EXCLUDED
    try:
        plan = door.plan()
        snapshot, _, entries = snapshot_from_asgi(scope)
        raws = [header_from_asgi(entries, n.encode("latin-1")) for n in door.header_names]
        peer = _asgi_peer(scope)
        return _admit(door, plan, raws, scope, snapshot, peer, *_extracted(snapshot, peer))
    except Exception:
        _log.warning("ctxrelay: could not snapshot an ASGI request", exc_info=True)
        return Admitted(door.fallback(None), False)


def admit_wsgi(door: Door, environ: MutableMapping[str, Any]) -> Admitted:
    """The door with its options (``door.options`` set) for a WSGI environ;
    never raises."""
    options = door.options
    assert options is not None  # the caller checked
    if options.excluded(environ.get("PATH_INFO")):
        return _EXCLUDED
    try:
        plan = door.plan()
        raws = []
        for name in door.header_names:
            value = environ.get("HTTP_" + name.upper().replace("-", "_"))
            raws.append(value if isinstance(value, str) else None)
        snapshot = RequestSnapshot.from_wsgi(environ)
        peer = format_peer(environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT"))
        return _admit(door, plan, raws, environ, snapshot, peer, *_extracted(snapshot, peer))
    except Exception:
        _log.warning("ctxrelay: could not snapshot a WSGI request", exc_info=True)
        return Admitted(door.fallback(None), False)


def _admit(
    door: Door,
    plan: Plan,
    raws: list[str | None],
    source: MutableMapping[str, Any],
    snapshot: RequestSnapshot,
    peer: str | None,
    fields: dict[str, str],
    deadline: float | None,
) -> Admitted:
    options = door.options
    assert options is not None
    rid, refused = door.choose(raws, peer)
    if refused and options.reject_invalid:
        return _REJECTED
    if options.update_request_header and rid != raws[0]:
        snapshot = _carry(source, plan, rid, snapshot, raws[0] is not None)
    fields[REQUEST_ID] = rid
    ctx = make_request_context(fields, snapshot)
    if deadline is not None:
        ctx = narrowed(ctx, deadline)
    return Admitted(ctx, False)


#: The context fields ``log_requests`` writes as the user, first bound wins.
USER_FIELDS = ("user_id", "user")


def log_request(
    logger: logging.Logger, method: object, path: object, status: object, started: float
) -> None:
    """``log_requests``: one INFO line for a request that just ended, written
    while its context is still bound (the line carries its request id).
    Method, path and user are escaped (``_escape.log_text``): they come from
    the request."""
    if not logger.isEnabledFor(logging.INFO):
        return
    from ._context import current
    from ._escape import log_text

    elapsed_ms = (monotonic() - started) * 1000.0
    ctx = current()
    user = next((ctx[f] for f in USER_FIELDS if f in ctx), None)
    if user is None:
        logger.info(
            "%s %s %s %.1fms",
            log_text(str(method)),
            log_text(str(path)),
            status,
            elapsed_ms,
        )
    else:
        logger.info(
            "%s %s %s %.1fms user=%s",
            log_text(str(method)),
            log_text(str(path)),
            status,
            elapsed_ms,
            log_text(user),
        )


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


def open_asgi(
    door: Door, scope: Mapping[str, Any], plan: Plan | None = None, carry: bool = False
) -> Context:
    """The context for an ASGI ``http``/``websocket`` scope; never raises.

    ``plan`` is accepted for older callers and not needed: the door checks
    its plan against the active policy itself.  ``carry``: when the id was
    generated or replaced, write it into the scope's headers and the
    snapshot (``update_request_header``; the scope must be mutable).
    """
    return open_asgi_echo(door, scope, carry)[0]


def open_asgi_echo(
    door: Door, scope: Mapping[str, Any], carry: bool = False
) -> tuple[Context, tuple[bytes, bytes] | None]:
    """:func:`open_asgi`, and the header line that echoes the id in force
    (``None`` when the request-id header's name is not latin-1).  Never
    raises.

    The door's hot path: one frame of its own, one for the snapshot
    (:func:`raw_asgi_snapshot`), one for the context.  A valid inbound id is
    checked and echoed as the bytes that came; a generated one is carried
    into the scope and the snapshot without taking the snapshot again.
    """
    plan = door.current_plan
    if plan.policy is not _POLICY.policy:  # Door.plan(), inlined: runs per request
        plan = door.plan()
    name = plan.name_bytes
    line: tuple[bytes, bytes] | None = None
    raw_id: str | None = None
    try:
        taken = raw_asgi_snapshot(scope)
        if taken is None or name is None:
            return _echoed(_open_odd_asgi(door, plan, scope, carry), name)
        snapshot, raw = taken
        # One pass over the raw pairs, names compared as bytes; a name seen
        # before costs one set lookup.  This loop is the door's hot path.
        plain = plan.plain
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
                elif key in plan.extracted:
                    hits = hits or []
                    hits.append((key, item))
                elif not plan.learn(key):
                    return _echoed(_open_odd_asgi(door, plan, scope, carry), name)
        except (TypeError, ValueError):  # an entry that is not a pair, an unhashable name
            return _echoed(_open_odd_asgi(door, plan, scope, carry), name)
        if value is None:
            rid = new_request_id() if door.options is None else door.new_id()
            line = (name, rid.encode())
            if carry and door.update_request_header:
                snapshot = _carry_line(scope, raw, line, snapshot)
        elif type(value) is not bytes:
            return _echoed(_open_odd_asgi(door, plan, scope, carry), name)
        elif (
            0 < len(value) <= 128
            and (value.isalnum() or value.replace(b"-", b"").isalnum() or _plain_id(value))
            and not door._custom
        ):
            # The default validator's rule, on the bytes that came (see
            # _plain_id): they are ASCII, so they decode as they are and
            # echo as they came.
            rid = value.decode()
            line = (name, value)
        else:
            raw_id = value.decode("latin-1")
            rid = door.request_id(raw_id, snapshot)
            if carry and door.update_request_header and rid != raw_id:
                snapshot = _carry(scope, plan, rid, snapshot)  # type: ignore[arg-type]
            line = (name, rid.encode("latin-1"))
        if hits is None:
            return make_request_context({REQUEST_ID: rid}, snapshot), line
        fields, deadline = _extract_raw(plan, raw, hits, scope, snapshot)
        fields[REQUEST_ID] = rid
        ctx = make_request_context(fields, snapshot)
        if deadline is not None:
            ctx = narrowed(ctx, deadline)
        return ctx, line
    except Exception:
        _log.warning("ctxrelay: could not snapshot an ASGI request", exc_info=True)
        return _echoed(door.fallback(raw_id), name)


# What the default validator accepts, as bytes (_REQUEST_ID's alphabet).
_ID_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"


def _plain_id(value: bytes) -> bool:
    """Whether ``value`` (1-128 bytes) is an id the default validator accepts.

    The door asks ``bytes.isalnum()`` first, inline: it is ASCII-only and a
    single pass in C, so hex ids and UUIDs (once their dashes are gone) are
    accepted without the regular expression (which cost as much as the
    rest of the id's handling).  Anything else comes here, to the pattern
    itself, so the rule stays exactly :func:`valid_request_id`'s."""
    return _accepted(value.decode("latin-1")) is not None


def _echoed(ctx: Context, name: bytes | None) -> tuple[Context, tuple[bytes, bytes] | None]:
    if name is None:
        return ctx, None
    return ctx, (name, ctx._fields[REQUEST_ID].encode("latin-1"))


def _carry_line(
    scope: Any, raw: tuple[Any, ...], line: tuple[bytes, bytes], snapshot: RequestSnapshot
) -> RequestSnapshot:
    """``update_request_header`` when no id came: the scope's headers and the
    snapshot gain the generated id's line (what :func:`_carry` does, without
    taking the snapshot again)."""
    try:
        scope["headers"] = [*raw, line]
    except Exception:  # a scope we cannot write: the context still carries the id
        _log.debug("ctxrelay: could not write the request id into the request", exc_info=True)
        return snapshot
    return asgi_snapshot_with(snapshot, line)


def _open_odd_asgi(door: Door, plan: Plan, scope: Mapping[str, Any], carry: bool) -> Context:
    """The context for a scope the hot path does not read as it is: header
    entries that are not a clean ASGI list, odd scope values."""
    raw_id: str | None = None
    try:
        snapshot, _, entries = snapshot_from_asgi(scope)
        # Read as they come -- from the snapshot's bounded copy, not the
        # scope (an iterator there is spent, or endless).
        if plan.name_bytes is not None:
            raw_id = header_from_asgi(entries, plan.name_bytes)
        source: Any = scope if carry else None
        return door._bind(*_extracted(snapshot, _asgi_peer(scope)), raw_id, snapshot, source)
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
        # Summed in C (a list comprehension was a frame and two calls a
        # line).  The door's pass has unpacked every entry as a pair.
        total = sum(map(len, chain.from_iterable(raw)))
    except (TypeError, ValueError):  # no length (now)
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


def _asgi_peer(scope: Mapping[str, Any]) -> str | None:
    client = scope.get("client") or (None, None)
    return format_peer(client[0], client[1])


def open_wsgi(door: Door, environ: Mapping[str, Any], carry: bool = False) -> Context:
    """The context for a WSGI environ; never raises.  ``carry``: as for
    :func:`open_asgi`, into the environ (which must be mutable)."""
    raw_id: str | None = None
    source: Any = environ if carry else None
    try:
        plan = door.plan()
        value = environ.get(plan.environ_key)
        raw_id = value if isinstance(value, str) else None
        snapshot = RequestSnapshot.from_wsgi(environ)
        keys = [key for key in environ if type(key) is str and key.startswith(_WSGI_HEADERS)]
        if plan.extracted_environ.isdisjoint(keys) and not _ODD_ENVIRON_KEYS.search(
            "\0".join(keys)
        ):
            return door._bind({}, None, raw_id, snapshot, source)
        peer = format_peer(environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT"))
        return door._bind(*_extracted(snapshot, peer), raw_id, snapshot, source)
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
