"""``RequestSnapshot``: a frozen value copy of the inbound request.

Seed 002: work that outlives the response cannot use the live request (the
container recycles it, the ASGI receive channel closes, Flask pops its
context).  It gets this copy instead: taken once at the door from the raw
ASGI scope or WSGI environ, immutable, picklable, safe to keep.

Most requests never read their snapshot, so the door copies only the raw
data -- for ASGI the scope's header pairs as a tuple, a value copy because
the pairs and their ``bytes`` are immutable -- and ``headers``, ``cookies``
and ``host`` are built on first access and cached.  From the outside the
snapshot is the same frozen value either way.

Inbound data is hostile, so neither construction nor first access ever
raises on what a client sent: header values with control characters are
dropped, oversized ones are dropped whole (a truncated cookie is worse than
none), and the number and total size of headers are capped.
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from types import MappingProxyType
from typing import Any, TypeVar, overload

from ._escape import log_text
from ._policy import MASK, active

__all__ = [
    "CONTROL",
    "MAX_ASGI_ENTRIES",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_HEADERS_TOTAL_BYTES",
    "Headers",
    "RequestSnapshot",
    "asgi_snapshot_with",
    "format_peer",
    "latin1",
    "raw_asgi_snapshot",
    "refuse_not_bytes",
    "refuse_odd_headers",
    "snapshot_from_asgi",
]

_log = logging.getLogger("ctxrelay")
# The scope keys a snapshot copies, read in one C call.
_ASGI_FIELDS = operator.itemgetter(
    "headers", "method", "scheme", "path", "query_string", "client", "server"
)
# Snapshots are frozen: their own constructors write through object's methods.
_new = object.__new__
_set = object.__setattr__
_T = TypeVar("_T")

#: At most this many header lines are kept; the rest are dropped.
MAX_HEADERS = 128
#: A header value longer than this (bytes) is dropped whole.
MAX_HEADER_BYTES = 8192
#: Header lines are kept until their total size reaches this.
MAX_HEADERS_TOTAL_BYTES = 65536

# A kept name (stripped, lowercased) is printable ASCII without space or ":".
_VALID_NAME = re.compile(r"[!-9;-~]+\Z")
#: Control characters but horizontal tab: CR, LF and NUL would split a
#: header.  The one rule for inbound header values, the snapshot's and the
#: door's alike.
CONTROL = _CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# What _all_clean lets through as it is: name bytes (printable ASCII but
# space, ":" and uppercase, so strip() and lower() would change nothing) and
# the control characters no value may hold.
_NAME_BYTES = bytes(c for c in range(0x21, 0x7F) if c != 0x3A and not 0x41 <= c <= 0x5A)
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])


def _clean_headers(raw: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    lines = raw if type(raw) is list else list(raw)
    clean = _all_clean(lines)
    if clean is not None:
        return clean
    kept: list[tuple[str, str]] = []
    total = 0
    for name, value in lines:
        name = name.strip().lower()
        if not _VALID_NAME.match(name):
            _log.debug("ctxrelay: dropped a header with an invalid name %r", name[:64])
            continue
        if _CONTROL.search(value):
            _log.debug("ctxrelay: dropped header %r: control characters in its value", name)
            continue
        size = len(name) + len(value)
        if len(value) > MAX_HEADER_BYTES:
            _log.debug("ctxrelay: dropped header %r: value over %d bytes", name, MAX_HEADER_BYTES)
            continue
        if len(kept) >= MAX_HEADERS or total + size > MAX_HEADERS_TOTAL_BYTES:
            _log.debug("ctxrelay: dropped header %r: over the snapshot's header limits", name)
            continue
        total += size
        kept.append((name, value))
    return tuple(kept)


def _all_clean(lines: list[tuple[str, str]]) -> tuple[tuple[str, str], ...] | None:
    # The usual headers -- lowercase token names, printable latin-1 values,
    # within the caps -- checked in bulk: joined, encoded, bytes.translate()
    # deletes what is allowed.  None: go line by line.
    if not lines or len(lines) > MAX_HEADERS:
        return None
    try:
        names = [name for name, _ in lines]
        values = [value for _, value in lines]
        joined_names = "\0".join(names).encode("ascii")
        joined_values = "\t".join(values).encode("latin-1")  # a tab is allowed
    except (TypeError, ValueError):  # not str pairs, or not latin-1: line by line
        return None
    separators = len(lines) - 1
    if (
        not all(names)
        or joined_names.translate(None, _NAME_BYTES) != b"\0" * separators
        or len(joined_values.translate(None, _CONTROL_BYTES)) != len(joined_values)
        or len(joined_names) + len(joined_values) - 2 * separators > MAX_HEADERS_TOTAL_BYTES
    ):
        return None
    if len(joined_values) - separators > MAX_HEADER_BYTES and max(map(len, values)) > (
        MAX_HEADER_BYTES
    ):
        return None
    return tuple(zip(names, values, strict=True))


def _parse_cookies(values: Iterable[str]) -> dict[str, str]:
    # Browsers send "a=1; b=2".  Parse like Starlette's cookie_parser: lenient,
    # never raising, the first occurrence of a name wins (RFC 6265 5.4 order).
    cookies: dict[str, str] = {}
    for header in values:
        for chunk in header.split(";"):
            name, sep, value = chunk.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name:
                continue
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            cookies.setdefault(name, value)
    return cookies


class Headers(Mapping[str, str]):
    """Read-only, case-insensitive headers that keep every value.

    ``headers["accept"]`` is the first value; :meth:`get_all` returns all of
    them in arrival order; :meth:`multi_items` every ``(name, value)`` line.
    Names are lowercase.
    """

    __slots__ = ("_index", "_lines")

    def __init__(self, lines: Iterable[tuple[str, str]] = ()) -> None:
        self._lines = _clean_headers(lines)
        index: dict[str, list[str]] = {}
        for name, value in self._lines:
            index.setdefault(name, []).append(value)
        self._index = {name: tuple(values) for name, values in index.items()}

    def __getitem__(self, name: str) -> str:
        return self._index[name.lower()][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, /, default: str | _T) -> str | _T: ...
    def get(self, name: str, /, default: object = None) -> object:
        values = self._index.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in arrival order (empty if absent)."""
        return list(self._index.get(name.lower(), ()))

    def multi_items(self) -> list[tuple[str, str]]:
        """Every header line as ``(name, value)``, repeated names included."""
        return list(self._lines)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._lines == other._lines
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash(self._lines)

    def __repr__(self) -> str:
        policy = active()
        shown = [(n, MASK if policy.is_sensitive(n) else v) for n, v in self._lines]
        return f"Headers({shown!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Headers, (list(self._lines),))


# -- raw server data, copied at the door and decoded on first access -----------
_WSGI_CONTENT = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH"})


#: Entries read from a scope's ``headers`` when it is neither a list nor a
#: tuple (an iterable a broken server made, maybe endless): the rest is left.
MAX_ASGI_ENTRIES = 1024

# The kinds of non-bytes ASGI header data already reported, (where, type
# name): each is logged once, so a broken server cannot flood the log.
# Bounded: the set of kinds a process sees is small, but not ours to trust.
_refused: set[tuple[str, str]] = set()
_REFUSED_MAX = 64


def refuse_not_bytes(where: str, value: object) -> None:
    """Report, once per kind, that ``value`` was refused as ASGI header data.

    ASGI header names and values are byte strings.  Anything else is never
    converted -- ``bytes(10**10)`` allocates 10 GB, ``bytes(iterator)`` reads
    until the iterator ends, maybe never -- but dropped, and logged here
    (warning, logger ``ctxrelay``).  Never raises.
    """
    try:
        kind = (where, type(value).__qualname__)
        if kind in _refused or len(_refused) >= _REFUSED_MAX:
            return
        _refused.add(kind)
        _log.warning(
            "ctxrelay: refused an ASGI %s of type %s (ASGI header names and values "
            "are bytes; a broken server or adapter?); reported once per type",
            where,
            log_text(kind[1]),
        )
    except Exception:  # a type whose name cannot be read: nothing to report
        pass


def refuse_odd_headers(where: str, entries: object) -> None:
    """Report (see :func:`refuse_not_bytes`) the first of ``entries`` that is
    not a pair whose name is ``bytes``/``bytearray``.  For the rare path of a
    caller that met one: scans a list or tuple only (bounded), never raises."""
    try:
        if type(entries) is not list and type(entries) is not tuple:
            refuse_not_bytes(f"{where}s list", entries)
            return
        for entry in entries:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                refuse_not_bytes(f"{where} entry", entry)
                return
            if not isinstance(entry[0], (bytes, bytearray)):
                refuse_not_bytes(f"{where} name", entry[0])
                return
    except Exception:  # a broken entry's own methods: nothing more to report
        pass


def latin1(value: object) -> str | None:
    """``value`` decoded if it is ``bytes``/``bytearray``, else ``None``.

    Never ``bytes(value)``: for an int that allocates that many bytes, for an
    iterator it reads it to its end.  The base class's ``decode``: a
    subclass's own could do anything.  Costs the value's own size.
    """
    if isinstance(value, bytes):
        return bytes.decode(value, "latin-1")
    if isinstance(value, bytearray):
        return bytearray.decode(value, "latin-1")
    return None


def _asgi_lines(raw: Iterable[object]) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    for pair in raw:
        if type(pair) is tuple and len(pair) == 2:  # what servers send: one check
            name, value = pair
            if type(name) is bytes and type(value) is bytes:
                lines.append((name.decode("latin-1"), value.decode("latin-1")))
                continue
        # ASGI headers are pairs of byte strings: anything else is dropped,
        # never converted (see latin1).
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            _log.debug("ctxrelay: dropped a malformed ASGI header entry")
            continue
        name_text, value_text = latin1(pair[0]), latin1(pair[1])
        if name_text is None:
            refuse_not_bytes("header name", pair[0])
        elif value_text is None:
            refuse_not_bytes("header value", pair[1])
        else:
            lines.append((name_text, value_text))
    return lines


def _asgi_entries(headers: object) -> tuple[Any, ...]:
    """A copy of a scope's ``headers`` entries, read in bounded time and memory.

    A list or tuple is copied whole (its size is the server's); any other
    iterable is read up to :data:`MAX_ASGI_ENTRIES` entries -- ``tuple()`` of
    an endless iterator would never return.  Never raises.
    """
    if not headers:
        return ()
    if type(headers) is list or type(headers) is tuple:
        return tuple(headers)
    if isinstance(headers, (str, bytes, bytearray)):  # no iterable of pairs
        refuse_not_bytes("headers list", headers)
        return ()
    try:
        entries = tuple(islice(headers, MAX_ASGI_ENTRIES + 1))  # type: ignore[call-overload]
    except Exception:  # not iterable, or its iterator failed
        refuse_not_bytes("headers list", headers)
        return ()
    if len(entries) > MAX_ASGI_ENTRIES:
        _log.debug("ctxrelay: read the first %d ASGI header entries only", MAX_ASGI_ENTRIES)
        return entries[:MAX_ASGI_ENTRIES]
    return entries


def _wsgi_lines(raw: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    # Environ keys as the door copied them: HTTP_X_ID and CONTENT_TYPE.
    return [
        (key[5:].replace("_", "-") if key[0] == "H" else key.replace("_", "-"), value)
        for key, value in raw
    ]


def _str(value: object, default: str) -> str:
    if type(value) is str:
        return value
    return default if value is None else str(value)


def format_peer(host: object, port: object) -> str | None:
    """``"host:port"`` of a peer, an IPv6 host in brackets (``"[::1]:5000"``).

    The one format of a peer address: the snapshot's ``client`` and the
    door's trust check both use it, so ``Policy.trusts(request().client)``
    answers what the door answered.  ``None`` when the host is unknown.
    """
    if not isinstance(host, str) or not host:
        return None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6: so the port cannot be mistaken for a group
    return f"{host}:{port}" if isinstance(port, (int, str)) and port != "" else host


def _address(pair: tuple[Any, ...]) -> str:
    # "host:port" from an ASGI (host, port) pair; called on access, so
    # whatever a broken server put there must not raise.
    try:
        return format_peer(pair[0], pair[1]) or ""
    except Exception:
        return ""


def _port(pair: Any) -> object:
    # The port of an ASGI (host, port) pair; None for a unix socket -- or
    # for whatever a broken server sent that is no pair at all.
    try:
        return pair[1]
    except Exception:
        return None


def _text_lines(raw: Iterable[tuple[str, str]]) -> Iterable[tuple[str, str]]:
    return raw


class RequestSnapshot:
    """A frozen value copy of the inbound request, safe after the response.

    Attributes: ``method``, ``scheme``, ``host``, ``path``, ``query`` (the raw
    query string, without ``?``), ``client`` (``"host:port"`` or ``None``),
    ``headers`` (:class:`Headers`) and ``cookies`` (read-only mapping).  Build
    one with :meth:`from_asgi` or :meth:`from_wsgi`; the web middleware does.
    Its ``repr`` masks sensitive headers and every cookie value.

    The constructors from server data copy the raw data only: ``headers``,
    ``cookies`` and ``host`` are decoded on first access (most requests never
    read them) and cached; ``client`` and ``query`` are formatted on access.
    Equality, hashing, pickling and ``repr`` read them like any other
    attribute: it is the same frozen value.
    """

    # _raw: (method, scheme, path, query, client, server, decode, lines) as
    # copied at the door: one slot, so a snapshot costs a single assignment.
    # client/server are final strings, or (host, port) tuples formatted on
    # access; decode(lines) gives the header lines.  _headers, _host and
    # _cookies are caches, unset until first access.
    __slots__ = ("_cookies", "_headers", "_host", "_raw")

    _raw: tuple[
        str,
        str,
        str,
        str | bytes,
        str | tuple[Any, ...] | None,
        str | tuple[Any, ...],
        Callable[[Any], Iterable[tuple[str, str]]],
        Any,
    ]
    _headers: Headers
    _host: str
    _cookies: Mapping[str, str]

    def __init__(
        self,
        *,
        method: str = "GET",
        scheme: str = "http",
        host: str = "",
        path: str = "/",
        query: str = "",
        client: str | None = None,
        headers: Iterable[tuple[str, str]] | Headers = (),
    ) -> None:
        hdrs = headers if isinstance(headers, Headers) else Headers(headers)
        for attr, value in (
            ("method", method),
            ("scheme", scheme),
            ("host", host),
            ("path", path),
            ("query", query),
            ("client", client),
        ):
            if value is None and attr == "client":
                continue
            if not isinstance(value, str):
                raise TypeError(f"RequestSnapshot.{attr} must be a str, got {type(value).__name__}")
        set_ = _set
        # The headers are decoded already: _raw's last two items are never read.
        set_(self, "_raw", (method.upper(), scheme, path, query, client, "", _text_lines, ()))
        set_(self, "_headers", hdrs)
        set_(self, "_host", host or hdrs.get("host", ""))

    # -- attributes ----------------------------------------------------------
    @property
    def method(self) -> str:
        """The request method, uppercase."""
        return self._raw[0].upper()

    @property
    def scheme(self) -> str:
        """``http``, ``https``, ``ws`` or ``wss``."""
        return self._raw[1]

    @property
    def path(self) -> str:
        """The request path, percent-decoded as the server gave it."""
        return self._raw[2]

    @property
    def query(self) -> str:
        """The raw query string, without ``?``."""
        query = self._raw[3]
        return query if isinstance(query, str) else query.decode("latin-1")

    @property
    def client(self) -> str | None:
        """The client address, ``"host:port"``, or ``None`` when unknown."""
        client = self._raw[4]
        if isinstance(client, tuple):
            return _address(client) if client else None
        return client

    @property
    def headers(self) -> Headers:
        """The request headers (:class:`Headers`), cleaned and capped."""
        try:
            return self._headers
        except AttributeError:
            raw = self._raw
            # Two threads may both get here: they build equal values, and
            # the slot assignment is atomic.
            headers = Headers(raw[6](raw[7]))
            _set(self, "_headers", headers)
            return headers

    @property
    def cookies(self) -> Mapping[str, str]:
        """The request cookies, read-only; the first occurrence of a name wins."""
        try:
            return self._cookies
        except AttributeError:
            cookies = MappingProxyType(_parse_cookies(self.headers.get_all("cookie")))
            _set(self, "_cookies", cookies)
            return cookies

    @property
    def host(self) -> str:
        """The Host header, else the server's address, else ``""``."""
        try:
            return self._host
        except AttributeError:
            server = self._raw[5]
            if isinstance(server, tuple):
                server = _address(server) if server and server[1:2] != (None,) else ""
            host = self.headers.get("host") or server
            _set(self, "_host", host)
            return host

    # -- constructors from raw server data ----------------------------------
    @classmethod
    def from_asgi(cls, scope: Mapping[str, Any]) -> RequestSnapshot:
        """Snapshot an ASGI ``http`` or ``websocket`` scope."""
        return cls._from_asgi(scope)[0]

    @classmethod
    def _from_asgi(
        cls, scope: Mapping[str, Any]
    ) -> tuple[RequestSnapshot, tuple[Any, ...] | None, tuple[Any, ...]]:
        """The snapshot; the scope's header entries when they are a value copy
        kept raw (the door reads them too), else ``None``; and the entries as
        read (bounded: see :func:`_asgi_entries`), whatever they are."""
        taken = raw_asgi_snapshot(scope)
        if taken is None:
            return cls._from_odd_asgi(scope)
        return taken[0], taken[1], taken[1]

    @classmethod
    def _from_odd_asgi(
        cls, scope: Mapping[str, Any]
    ) -> tuple[RequestSnapshot, tuple[Any, ...] | None, tuple[Any, ...]]:
        # Whatever a broken server or a test put in the scope: normalized now.
        raw: tuple[Any, ...] = ()
        entries: tuple[Any, ...] = ()
        frozen = True
        try:
            raw = entries = _asgi_entries(scope.get("headers"))
            hash(raw)
        except Exception:
            frozen = False
        decode: Callable[[Any], Iterable[tuple[str, str]]] = _asgi_lines
        if not frozen:  # mutable entries: decode them now
            decode, raw = _text_lines, tuple(_asgi_lines(raw))
        method = _str(scope.get("method"), "GET")
        scheme = scope.get("scheme") or ("ws" if scope.get("type") == "websocket" else "http")
        path = _str(scope.get("path"), "/")
        query = scope.get("query_string")
        query = bytes(query).decode("latin-1") if isinstance(query, (bytes, bytearray)) else ""
        client = scope.get("client")
        if not client:
            client = None
        elif type(client) is not tuple:  # a list could change later: format it now
            client = _address(client) or None
        server = scope.get("server")
        if not server:
            server = ""
        elif type(server) is not tuple:  # a list could change later: format it now
            server = _address(server) if _port(server) is not None else ""
        snap = _new(cls)
        _set(snap, "_raw", (method, _str(scheme, ""), path, query, client, server, decode, raw))
        return snap, raw if frozen else None, entries

    @classmethod
    def from_wsgi(cls, environ: Mapping[str, Any]) -> RequestSnapshot:
        """Snapshot a WSGI environ (PEP 3333: strings are latin-1 decoded bytes)."""
        raw = tuple(
            (key, value)
            for key, value in environ.items()
            if isinstance(key, str)
            and isinstance(value, str)
            and (key.startswith("HTTP_") or (key in _WSGI_CONTENT and value))
        )
        path = _wsgi_text(environ.get("SCRIPT_NAME", "")) + _wsgi_text(environ.get("PATH_INFO", ""))
        server = str(environ.get("SERVER_NAME", ""))
        if environ.get("SERVER_PORT"):
            server = f"{server}:{environ['SERVER_PORT']}"
        addr = environ.get("REMOTE_ADDR")
        port = environ.get("REMOTE_PORT")
        client = format_peer(addr, port) if isinstance(addr, str) else None
        snap = _new(cls)
        _set(
            snap,
            "_raw",
            (
                str(environ.get("REQUEST_METHOD", "GET")).upper(),
                str(environ.get("wsgi.url_scheme", "http")),
                path or "/",
                str(environ.get("QUERY_STRING", "")),
                client,
                server,
                _wsgi_lines,
                raw,
            ),
        )
        return snap

    # -- value semantics -----------------------------------------------------
    def _state(self) -> tuple[Any, ...]:
        return (
            self.method,
            self.scheme,
            self.host,
            self.path,
            self.query,
            self.client,
            self.headers,
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("RequestSnapshot is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("RequestSnapshot is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestSnapshot):
            return NotImplemented
        return self._state() == other._state()

    def __hash__(self) -> int:
        return hash(self._state())

    def __repr__(self) -> str:
        query = f"?{self.query}" if self.query else ""
        # Quoted with repr(): servers percent-decode the path, so "%0d%0a"
        # arrives as CR LF, and a repr that lands in a log must not forge lines.
        target = f"{self.method} {self.scheme}://{self.host}{self.path}{query}"
        return (
            f"RequestSnapshot({target!r}, "
            f"client={self.client!r}, headers={self.headers!r}, "
            f"cookies={dict.fromkeys(self.cookies, MASK)!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through the constructor on arrival, so it is validated again.
        return (
            _rebuild,
            (
                self.method,
                self.scheme,
                self.host,
                self.path,
                self.query,
                self.client,
                self.headers.multi_items(),
            ),
        )


# The _raw slot's own setter: the door's path skips object.__setattr__'s lookup.
_set_raw: Callable[[RequestSnapshot, Any], None] = RequestSnapshot.__dict__["_raw"].__set__


def _rebuild(
    method: str,
    scheme: str,
    host: str,
    path: str,
    query: str,
    client: str | None,
    lines: list[tuple[str, str]],
) -> RequestSnapshot:
    return RequestSnapshot(
        method=method,
        scheme=scheme,
        host=host,
        path=path,
        query=query,
        client=client,
        headers=lines,
    )


def _wsgi_text(value: object) -> str:
    if not isinstance(value, str):
        return ""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def raw_asgi_snapshot(scope: Mapping[str, Any]) -> tuple[RequestSnapshot, tuple[Any, ...]] | None:
    """The snapshot of a scope as servers send it, and its header entries
    (a value copy, which the door reads too); ``None`` for anything else,
    which :func:`snapshot_from_asgi` normalizes.  The door's hot path: one
    frame, no call but C ones."""
    # What a server sends -- str, bytes, (host, port) tuples, tuples of
    # bytes pairs -- is immutable: keep it raw and decode it on access.
    # Anything else is normalized by the careful path, into copies.
    try:
        headers, method, scheme, path, query, client, server = _ASGI_FIELDS(scope)
        # The header entries as a tuple: a value copy when hashable all
        # through -- no list or bytearray the app could change later.
        # hash() checks that in C; ASGI's tuples of bytes pairs pass.
        # Only from a list or tuple: another iterable may be endless, and
        # tuple() would read it forever (the careful path reads a part).
        if type(headers) is not list and type(headers) is not tuple:
            return None
        raw = tuple(headers)
        hash(raw)
    except Exception:  # a key missing, or odd values: the careful path
        return None
    if (
        type(method) is str
        and type(scheme) is str
        and type(path) is str
        and type(query) is bytes
        and type(client) is tuple
        and type(server) is tuple
        and scheme
    ):
        snap = _new(RequestSnapshot)
        _set_raw(snap, (method, scheme, path, query, client, server, _asgi_lines, raw))
        return snap, raw
    return None


def asgi_snapshot_with(snapshot: RequestSnapshot, line: tuple[bytes, bytes]) -> RequestSnapshot:
    """A snapshot from :func:`raw_asgi_snapshot` taken again after ``line``
    was appended to its scope's headers (the door's
    ``update_request_header``): the same value, without reading the scope
    again."""
    raw = snapshot._raw
    snap = _new(RequestSnapshot)
    _set_raw(snap, (*raw[:7], (*raw[7], line)))
    return snap


def snapshot_from_asgi(
    scope: Mapping[str, Any],
) -> tuple[RequestSnapshot, tuple[Any, ...] | None, tuple[Any, ...]]:
    """:meth:`RequestSnapshot.from_asgi`, plus the header entries the door reads
    too: the raw entries when they are a value copy (else ``None``), and the
    entries as read (bounded)."""
    return RequestSnapshot._from_asgi(scope)
