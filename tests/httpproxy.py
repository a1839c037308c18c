"""A minimal forward HTTP proxy on 127.0.0.1 that requires ``Proxy-Authorization``.

It serves plain-http requests in absolute form (``GET http://host:port/path``),
as a client configured with an ``http://`` proxy sends them.  Each request
must carry ``Proxy-Authorization: Basic`` with the credentials the proxy was
made with, else it answers ``407`` with ``Proxy-Authenticate``.  An
authorized request goes on to its target without the proxy's own and the
hop-by-hop headers, and the answer comes back as it is (a redirect too: the
client follows it, through the proxy again).  Every request is recorded as a
:class:`ProxyHop`, refused or not.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["PASSWORD", "USER", "AuthProxy", "ProxyHop", "auth_proxy"]

USER, PASSWORD = "proxy-user", "proxy-pass"

# Headers for this connection or for the proxy itself: never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


@dataclass(frozen=True)
class ProxyHop:
    """One request the proxy got: its target URL and whether it was authorized."""

    method: str
    target: str
    authorized: bool


class _Handler(http.server.BaseHTTPRequestHandler):
    server: AuthProxy
    protocol_version = "HTTP/1.1"

    def _relay(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        authorized = self.headers.get("proxy-authorization") == self.server.expected
        self.server.record(ProxyHop(self.command, self.path, authorized))
        target = urlsplit(self.path)
        if not authorized or target.scheme != "http" or not target.hostname:
            self.send_response(407 if not authorized else 400)
            if not authorized:
                self.send_header("proxy-authenticate", 'Basic realm="test proxy"')
            self.send_header("content-length", "0")
            self.end_headers()
            return
        path = (target.path or "/") + (f"?{target.query}" if target.query else "")
        upstream = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=10)
        try:
            upstream.putrequest(self.command, path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    upstream.putheader(name, value)
            upstream.endheaders(body or None)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response_only(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in _HOP_BY_HOP | {"content-length"}:
                self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _relay

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the test asserts on what was recorded


class AuthProxy(http.server.ThreadingHTTPServer):
    """A threaded forward proxy on 127.0.0.1 that keeps every request it got."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode("ascii")
        self.expected = f"Basic {token}"
        self._lock = threading.Lock()
        self._hops: list[ProxyHop] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, *, credentials: bool = True) -> str:
        """The proxy's URL, with its credentials in it unless told not to."""
        userinfo = f"{USER}:{PASSWORD}@" if credentials else ""
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def record(self, hop: ProxyHop) -> None:
        with self._lock:
            self._hops.append(hop)

    @property
    def hops(self) -> list[ProxyHop]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self._hops)


@contextmanager
def auth_proxy() -> Iterator[AuthProxy]:
    """Run an :class:`AuthProxy` in a thread for the ``with`` block."""
    proxy = AuthProxy()
    thread = threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=10)
