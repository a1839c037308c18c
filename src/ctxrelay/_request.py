"""``RequestSnapshot``: a frozen value copy of the inbound request.

Seed 002: work that outlives the response cannot use the live request (the
container recycles it, the ASGI receive channel closes, Flask pops its
context).  It gets this copy instead: built once at the door from the raw
ASGI scope or WSGI environ, immutable, picklable, safe to keep.

Inbound data is hostile, so construction never raises on what a client sent:
header values with control characters are dropped, oversized ones are
dropped whole (a truncated cookie is worse than none), and the number and
total size of headers are capped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TypeVar, overload

from ._policy import MASK, active

__all__ = [
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_HEADERS_TOTAL_BYTES",
    "Headers",
    "RequestSnapshot",
]

_log = logging.getLogger("ctxrelay")
_T = TypeVar("_T")

#: At most this many header lines are kept; the rest are dropped.
MAX_HEADERS = 128
#: A header value longer than this (bytes) is dropped whole.
MAX_HEADER_BYTES = 8192
#: Header lines are kept until their total size reaches this.
MAX_HEADERS_TOTAL_BYTES = 65536

_CONTROL = frozenset(chr(c) for c in (*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F))


def _clean_headers(raw: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    kept: list[tuple[str, str]] = []
    total = 0
    for name, value in raw:
        name = name.strip().lower()
        if not name or not name.isascii() or any(ch in _CONTROL or ch in " :" for ch in name):
            _log.debug("ctxrelay: dropped a header with an invalid name %r", name[:64])
            continue
        if _CONTROL.intersection(value):
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


class RequestSnapshot:
    """A frozen value copy of the inbound request, safe after the response.

    Attributes: ``method``, ``scheme``, ``host``, ``path``, ``query`` (the raw
    query string, without ``?``), ``client`` (``"host:port"`` or ``None``),
    ``headers`` (:class:`Headers`) and ``cookies`` (read-only mapping).  Build
    one with :meth:`from_asgi` or :meth:`from_wsgi`; the web middleware does.
    Its ``repr`` masks sensitive headers and every cookie value.
    """

    __slots__ = ("client", "cookies", "headers", "host", "method", "path", "query", "scheme")

    method: str
    scheme: str
    host: str
    path: str
    query: str
    client: str | None
    headers: Headers
    cookies: Mapping[str, str]

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
        set_ = object.__setattr__
        set_(self, "method", method.upper())
        set_(self, "scheme", scheme)
        set_(self, "host", host or hdrs.get("host", ""))
        set_(self, "path", path)
        set_(self, "query", query)
        set_(self, "client", client)
        set_(self, "headers", hdrs)
        set_(self, "cookies", MappingProxyType(_parse_cookies(hdrs.get_all("cookie"))))

    # -- constructors from raw server data ----------------------------------
    @classmethod
    def from_asgi(cls, scope: Mapping[str, Any]) -> RequestSnapshot:
        """Snapshot an ASGI ``http`` or ``websocket`` scope."""
        lines: list[tuple[str, str]] = []
        for pair in scope.get("headers") or ():
            # ASGI headers are pairs of byte strings.  Check the types rather
            # than call bytes() on whatever came: bytes(0) is b"" and
            # bytes(2**40) allocates a terabyte.
            if (
                isinstance(pair, (tuple, list))
                and len(pair) == 2
                and isinstance(pair[0], (bytes, bytearray))
                and isinstance(pair[1], (bytes, bytearray))
            ):
                lines.append((pair[0].decode("latin-1"), pair[1].decode("latin-1")))
            else:
                _log.debug("ctxrelay: dropped a malformed ASGI header entry")
        headers = Headers(lines)
        client = scope.get("client")
        server = scope.get("server")
        host = headers.get("host") or (
            f"{server[0]}:{server[1]}" if server and server[1] is not None else ""
        )
        query = scope.get("query_string", b"")
        scheme = scope.get("scheme") or ("ws" if scope.get("type") == "websocket" else "http")
        return cls(
            method=str(scope.get("method", "GET")),
            scheme=str(scheme),
            host=host,
            path=str(scope.get("path", "/")),
            query=bytes(query).decode("latin-1") if query else "",
            client=f"{client[0]}:{client[1]}" if client else None,
            headers=headers,
        )

    @classmethod
    def from_wsgi(cls, environ: Mapping[str, Any]) -> RequestSnapshot:
        """Snapshot a WSGI environ (PEP 3333: strings are latin-1 decoded bytes)."""
        lines: list[tuple[str, str]] = []
        for key, value in environ.items():
            if not isinstance(key, str) or not isinstance(value, str):
                continue
            if key.startswith("HTTP_"):
                lines.append((key[5:].replace("_", "-"), value))
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
                lines.append((key.replace("_", "-"), value))
        headers = Headers(lines)
        path = _wsgi_text(environ.get("SCRIPT_NAME", "")) + _wsgi_text(environ.get("PATH_INFO", ""))
        host = headers.get("host") or str(environ.get("SERVER_NAME", ""))
        if not headers.get("host") and environ.get("SERVER_PORT"):
            host = f"{host}:{environ['SERVER_PORT']}"
        addr = environ.get("REMOTE_ADDR")
        port = environ.get("REMOTE_PORT")
        client = (f"{addr}:{port}" if port else str(addr)) if addr else None
        return cls(
            method=str(environ.get("REQUEST_METHOD", "GET")),
            scheme=str(environ.get("wsgi.url_scheme", "http")),
            host=host,
            path=path or "/",
            query=str(environ.get("QUERY_STRING", "")),
            client=client,
            headers=headers,
        )

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
