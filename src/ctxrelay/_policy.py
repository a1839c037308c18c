"""What is sensitive, and the process-wide policy.

The policy is one immutable value read on each decision, so ``configure`` is a
single atomic swap and no lock is held on any hot path.  This module holds
what the core needs today (which names are sensitive, the size limits);
forwarding rules grow here too.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import urlsplit

__all__ = [
    "MASK",
    "PROXY_CREDENTIALS",
    "STATE",
    "Origin",
    "Policy",
    "Route",
    "active",
    "check_host_pattern",
    "configure",
    "host_matches",
    "peer_of_client",
]

#: Header and field names whose values are credentials.  They are masked in
#: every ``repr`` and never leave the process unless a destination names them.
DEFAULT_SENSITIVE: frozenset[str] = frozenset(
    {
        "authorization",
        "cookie",
        "proxy-authorization",
        "set-cookie",
        "x-api-key",
        "x-auth-token",
        "x-csrf-token",
    }
)

#: Credentials for a proxy, not for the destination: a forward proxy reads
#: ``Proxy-Authorization`` and the client library sets it for each hop from
#: its proxy settings.  A redirect to another origin does not make it the new
#: destination's credential, so redirects leave it to the library (the other
#: ``Proxy-*`` request header, ``Proxy-Connection``, carries no credential).
PROXY_CREDENTIALS: frozenset[str] = frozenset({"proxy-authorization"})

#: A name that *contains* one of these is treated as sensitive too: a
#: ``db_password`` or ``session_token`` field is a secret whatever it is called.
SENSITIVE_FRAGMENTS: tuple[str, ...] = ("password", "passwd", "secret", "token", "credential")

MASK = "***"

_MAX_VERDICTS = 4096
#: Longest name whose verdict is remembered (4096 x 64 characters at most).
_VERDICT_NAME_MAX = 64

#: Route verdicts a policy remembers, by destination origin (scheme://authority):
#: at most 256 of at most 256 characters each; a full memo starts over, so a
#: hostile stream of distinct hosts costs parsing, never memory.
_MAX_ROUTES = 256
_ROUTE_KEY_MAX = 256
# The scheme://authority prefix of a URL, as urlsplit reads it: a scheme
# (its alphabet), "://", then up to the first "/", "?" or "#".  A URL whose
# prefix holds a tab, CR or LF (urlsplit deletes those first) has no key.
_ORIGIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#\t\r\n]*")


def _lowered(names: Iterable[str]) -> frozenset[str]:
    if isinstance(names, str):  # a bare "cookie" would become {"c", "o", ...}
        names = (names,)
    return frozenset(name.lower() for name in names)


#: Captured header names double as context field names, so they must be
#: valid in both alphabets (see ``_context._NAME``).
_HEADER_FIELD = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,63}\Z")

# RFC 9110 field-name: a token.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True)
class Origin:
    """Scheme, host and port of a destination: the unit redirects are judged by."""

    scheme: str
    host: str
    port: int | None

    @classmethod
    def parse(cls, url: str) -> Origin | None:
        """The origin of ``url``, or ``None`` when it has no host (or is malformed)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return None
        host = (parts.hostname or "").rstrip(".")
        if not host:
            return None
        scheme = parts.scheme.lower()
        return cls(scheme, host, port if port is not None else _DEFAULT_PORTS.get(scheme))


def host_matches(pattern: str, host: str) -> bool:
    """``pattern`` is ``*`` (any host), ``*.suffix`` (any subdomain), a CIDR
    network (``10.0.0.0/8``) or an exact host; all case-insensitive."""
    host = host.lower().rstrip(".").strip("[]")  # "[::1]" as URLs and peers write it
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    if "/" in pattern:
        try:
            network = ipaddress.ip_network(pattern, strict=False)
            return ipaddress.ip_address(host.strip("[]")) in network
        except ValueError:
            return False
    return host == pattern.strip("[]")


_HOST_ACCEPTED = (
    "accepted: '*', an exact host ('api.example.com', '127.0.0.1', '::1'), "
    "'*.example.com' (its subdomains) or a CIDR network ('10.0.0.0/8')"
)
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")


def check_host_pattern(pattern: object, where: str) -> str:
    """``pattern`` lowercased, or a ``ValueError`` naming it and the accepted forms.

    A pattern that can never match (a URL, a port glued on, ``*.*.x``, a
    CIDR with a bad prefix) was silently useless before: now it is refused
    when the policy is built.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"{where}: host patterns are str, not {type(pattern).__name__}")
    text = pattern.strip().lower().rstrip(".")
    problem = None
    if not text:
        problem = "it is empty"
    elif text == "*":
        return text
    elif "://" in text or "/" in text.split("/", 1)[0]:
        problem = "it is a URL: give the host alone (routes have schemes= and ports=)"
    elif "/" in text:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            problem = f"it is not a CIDR network ({exc})"
    else:
        host = text.strip("[]")
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            pass
        labels = host[2:].split(".") if host.startswith("*.") else host.split(".")
        if ":" in host:
            problem = "a port does not belong in a host pattern (use ports=, or 'host:port' peers)"
        elif "*" in "".join(labels) or not all(_LABEL.match(label) for label in labels):
            problem = "it is not a host name ('*' only as a whole leading label: '*.example.com')"
    if problem is not None:
        raise ValueError(f"{where}: invalid host pattern {pattern!r}: {problem}; {_HOST_ACCEPTED}")
    return text


def check_peer_pattern(pattern: object) -> str:
    """A ``trusted_peers`` entry: a host pattern, optionally with ``:port``."""
    if not isinstance(pattern, str):
        raise TypeError(f"trusted_peers: entries are str, not {type(pattern).__name__}")
    host, port = _split_peer(pattern)
    if port is not None and not (port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError(
            f"trusted_peers: invalid port in {pattern!r}: a port is 1-65535; "
            f"{_HOST_ACCEPTED}, optionally followed by ':port' ('[::1]:8000' for IPv6)"
        )
    check_host_pattern(host, "trusted_peers")
    return pattern.strip().lower()


@dataclass(frozen=True)
class Route:
    """What one class of destinations receives from the outgoing context.

    ``hosts``
        Host patterns: exact (``orders.internal.example``, ``127.0.0.1``),
        a wildcard for subdomains (``*.internal.example``: not the apex), a
        CIDR network (``10.0.0.0/8``) or ``*`` for any host.
    ``schemes`` / ``ports``
        The schemes and ports it applies to; empty ``ports`` means any port.
    ``baggage``
        Whether relayed fields travel (as W3C ``baggage``).
    ``headers``
        Which captured inbound headers travel as themselves: ``"*"`` means
        every captured header that is not sensitive.
    ``sensitive``
        Sensitive headers and fields (``cookie``, ``authorization``, ...) this
        destination may receive.  They must be named one by one: ``"*"`` in
        ``headers`` never lets a credential through.
    ``request_id`` / ``trace``
        Whether the request id header and ``traceparent``/``tracestate`` travel.
    ``deadline``
        Whether the time the work has left travels (``Policy.deadline_header``,
        in milliseconds), as the request id does.  A destination no route
        names does not get it unless ``Policy.foreign`` says so.
    """

    hosts: tuple[str, ...] = ("*",)
    schemes: AbstractSet[str] = frozenset({"http", "https"})
    ports: AbstractSet[int] = frozenset()
    baggage: bool = True
    headers: AbstractSet[str] = frozenset({"*"})
    sensitive: AbstractSet[str] = frozenset()
    request_id: bool = True
    trace: bool = True
    deadline: bool = True

    def __post_init__(self) -> None:
        hosts = (self.hosts,) if isinstance(self.hosts, str) else tuple(self.hosts)
        if not hosts:
            raise ValueError(f"Route(hosts=...) is empty; {_HOST_ACCEPTED}")
        object.__setattr__(
            self, "hosts", tuple(check_host_pattern(h, "Route.hosts") for h in hosts)
        )
        for port in self.ports:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
                raise ValueError(f"Route.ports: {port!r} is not a port (1-65535)")
        object.__setattr__(self, "schemes", _lowered(self.schemes))
        object.__setattr__(self, "ports", frozenset(self.ports))
        object.__setattr__(self, "headers", _lowered(self.headers))
        object.__setattr__(self, "sensitive", _lowered(self.sensitive))

    def matches(self, origin: Origin) -> bool:
        """True when this route applies to ``origin``."""
        if origin.scheme not in self.schemes:
            return False
        if self.ports and origin.port not in self.ports:
            return False
        return any(host_matches(pattern, origin.host) for pattern in self.hosts)


#: Destinations no route names: the request id and trace headers only.
FOREIGN = Route(baggage=False, headers=frozenset(), deadline=False)

#: ``inject(destination=None)``: an in-house carrier such as a task-queue
#: message.  Fields, request id, trace and captured non-sensitive headers;
#: credentials only when configured (a broker stores messages on disk).
IN_HOUSE = Route()


# Policy.Route shadows the name inside the class body; annotate with this alias.
_Route = Route


@dataclass(frozen=True)
class Policy:
    """What ctxrelay treats as sensitive and how large values may grow.

    A ``Policy`` is a frozen value: build a new one (``dataclasses.replace``)
    and pass it to :func:`configure` to change the process-wide policy.

    ``sensitive``
        Extra names (case-insensitive) to mask, on top of
        :data:`DEFAULT_SENSITIVE` and any name containing one of
        :data:`SENSITIVE_FRAGMENTS`.
    ``request_id_header``
        The header that carries the request id, inbound and outbound.
    ``capture``
        Inbound headers kept for relay (``{"cookie", "x-gray"}``): each
        becomes a context field named by the lowercased header name, and
        travels out as that header again, where ``routes`` allow.
    ``routes``
        Outgoing destinations, first match wins (see :class:`Route`).
    ``foreign``
        What a destination that matches no route receives: by default the
        request id and trace headers only.
    ``in_house``
        What ``inject(destination=None)`` writes (a task-queue message).
    ``local``
        Field names that never leave the process.
    ``trusted_peers``
        Peers (host patterns or CIDR networks, optionally ``:port``) whose
        ``baggage`` fields are accepted inbound.  Empty: trust no one, as
        an edge service should.
    ``trust_in_house``
        Whether ``extract(..., in_house=True)`` accepts baggage fields.
    ``max_baggage_fields`` / ``max_baggage_bytes``
        Limits on outgoing and incoming ``baggage`` (W3C: 64 / 8192 at least).
    ``deadline_header``
        The header carrying the time a request has left, in whole
        milliseconds, inbound and outbound (default ``x-request-timeout-ms``;
        Envoy's is ``x-envoy-expected-rq-timeout-ms``).  Inbound it is
        honoured only from ``trusted_peers`` (and in-house carriers), and
        only ever narrows.
    ``max_inbound_timeout``
        The most an inbound remaining-time header may grant, in seconds.
    """

    #: ``ctxrelay.Policy.Route``: the route class, reachable from the public name.
    Route: ClassVar[type[_Route]] = _Route
    #: ``ctxrelay.Policy.MASK``: what a sensitive value is shown as (``***``).
    MASK: ClassVar[str] = MASK

    sensitive: frozenset[str] = field(default_factory=frozenset)
    request_id_header: str = "x-request-id"
    capture: AbstractSet[str] = frozenset()
    routes: tuple[_Route, ...] = ()
    foreign: _Route = FOREIGN
    in_house: _Route = IN_HOUSE
    local: AbstractSet[str] = frozenset()
    trusted_peers: tuple[str, ...] = ()
    trust_in_house: bool = True
    max_baggage_fields: int = 64
    max_baggage_bytes: int = 8192
    deadline_header: str = "x-request-timeout-ms"
    max_inbound_timeout: float = 300.0
    # is_sensitive() runs per field per outgoing request: remember the answers.
    _verdicts: dict[str, bool] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    # route() runs per outgoing request: remember the verdict per origin.
    _routes: dict[str, tuple[_Route, Origin | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "sensitive", _lowered(self.sensitive) | DEFAULT_SENSITIVE)
        object.__setattr__(self, "request_id_header", self.request_id_header.lower())
        if not isinstance(self.deadline_header, str) or not _HEADER_NAME.match(
            self.deadline_header
        ):
            raise ValueError(f"deadline_header {self.deadline_header!r} is not a header name")
        object.__setattr__(self, "deadline_header", self.deadline_header.lower())
        cap = self.max_inbound_timeout
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 <= cap <= 86400:
            raise ValueError(f"max_inbound_timeout is seconds in [0, 86400], not {cap!r}")
        capture = _lowered(self.capture)
        for name in capture:
            if not _HEADER_FIELD.match(name):
                raise ValueError(f"cannot capture header {name!r}: not a valid field name")
        object.__setattr__(self, "capture", capture)
        local = (self.local,) if isinstance(self.local, str) else self.local
        object.__setattr__(self, "local", frozenset(local))
        routes = (self.routes,) if isinstance(self.routes, _Route) else tuple(self.routes)
        object.__setattr__(self, "routes", routes)
        peers = (self.trusted_peers,) if isinstance(self.trusted_peers, str) else self.trusted_peers
        object.__setattr__(self, "trusted_peers", tuple(check_peer_pattern(p) for p in peers))

    def route(self, destination: str | None) -> tuple[_Route, Origin | None]:
        """The route for a destination URL (``None``: the in-house carrier).

        The verdict depends on the URL's origin alone, and a policy is a
        value: it is remembered per ``scheme://authority`` prefix, which
        decides the origin whatever follows it (path, query, fragment).
        """
        if destination is None:
            return self.in_house, None
        match = _ORIGIN_KEY.match(destination)
        key = None
        if match is not None:
            key = match.group()
            if len(key) == len(destination) or destination[len(key)] in "/?#":
                verdict = self._routes.get(key)
                if verdict is not None:
                    return verdict
            else:
                key = None  # a tab, CR or LF inside the authority: parse every time
        verdict = self._resolve(Origin.parse(destination))
        if key is not None and len(key) <= _ROUTE_KEY_MAX:
            routes = self._routes
            if len(routes) >= _MAX_ROUTES:
                routes.clear()
            routes[key] = verdict
        return verdict

    def _resolve(self, origin: Origin | None) -> tuple[_Route, Origin | None]:
        if origin is None:
            return self.foreign, None
        for route in self.routes:
            if route.matches(origin):
                return route, origin
        return self.foreign, origin

    def trusts(self, peer: str | None) -> bool:
        """True when baggage fields from ``peer`` (``host`` or ``host:port``) are accepted."""
        if not peer or not self.trusted_peers:
            return False
        host, port = _split_peer(peer)
        for pattern in self.trusted_peers:
            want_host, want_port = _split_peer(pattern)
            if want_port is not None and want_port != port:
                continue
            if host_matches(want_host, host):
                return True
        return False

    def is_sensitive(self, name: str) -> bool:
        """True when values under ``name`` must never be shown or sent freely."""
        verdict = self._verdicts.get(name)
        if verdict is None:
            lowered = name.lower()
            verdict = lowered in self.sensitive or any(
                fragment in lowered for fragment in SENSITIVE_FRAGMENTS
            )
            # Bounded in count and in bytes: names come from outside (a
            # snapshot's repr asks about every inbound header name), so only
            # names as short as real ones are remembered.
            if len(self._verdicts) < _MAX_VERDICTS and len(name) <= _VERDICT_NAME_MAX:
                self._verdicts[name] = verdict
        return verdict


def _split_peer(peer: str) -> tuple[str, str | None]:
    # "10.0.0.1", "10.0.0.1:5000", "[::1]:5000", "::1", "10.0.0.0/8"
    peer = peer.strip().lower()
    if peer.startswith("["):
        host, _, rest = peer[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if peer.count(":") == 1:
        host, _, port = peer.partition(":")
        return host, port
    return peer, None


def peer_of_client(client: str | None) -> str | None:
    """The peer, as :meth:`Policy.trusts` reads it, of ``RequestSnapshot.client``.

    The snapshot writes its client ``host:port`` without brackets, so an IPv6
    client is ``"::1:5000"``; the web middleware checks ``"[::1]:5000"``.  Read
    unbracketed, ``"::1:5000"`` is one address with no port, and a policy
    trusting ``::1`` would not trust it: the last group is the port when what
    precedes it is an IP address.  ``None`` or ``""`` (client unknown) is None.
    """
    if not client:
        return None
    client = client.strip()
    if client.startswith("[") or client.count(":") < 2:
        return client  # "10.0.0.1:5000", "host:80", "[::1]:5000", "host"
    host, _, port = client.rpartition(":")
    if port.isdigit():
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return f"[{host}]:{port}"
    return f"[{client}]"  # an IPv6 address without a port ("::1")


class _State:
    """Where the active policy lives: one immutable value, swapped atomically."""

    __slots__ = ("policy",)

    def __init__(self, policy: Policy) -> None:
        self.policy = policy


#: The package's one read of the active policy on hot paths (a log filter
#: per record, the door per request): ``STATE.policy`` costs an attribute
#: read, not a call.  Only :func:`configure` assigns it; everything else
#: calls :func:`active`.
STATE = _State(Policy())


def active() -> Policy:
    """The process-wide policy currently in force (``ctxrelay.active_policy()``)."""
    return STATE.policy


def configure(policy: Policy) -> Policy:
    """Make ``policy`` the process-wide policy; returns the previous one."""
    if not isinstance(policy, Policy):
        raise TypeError(f"configure() takes a ctxrelay.Policy, not {type(policy).__name__}")
    previous, STATE.policy = STATE.policy, policy
    return previous
