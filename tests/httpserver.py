"""A real HTTP server on 127.0.0.1 that records the headers it receives.

Shared by the outgoing-HTTP tests (requests, httpx, aiohttp) and any other
test that needs to see what actually crossed the wire.  Each server listens on
its own ephemeral port, so two servers are two destinations (two origins):
one the policy treats as internal, one as foreign.

``GET /redirect?to=<url>&status=302`` answers with a redirect to ``url``
(with ``&cookie=<name=value>``, it sets that cookie on the way, as a login
redirect does); every other path answers ``200 ok``.  Every request is
recorded, redirects included, as a :class:`Received`.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

__all__ = ["Received", "RecordingServer", "recording_server"]


@dataclass(frozen=True)
class Received:
    """One request as the server saw it: path and header lines (names lowercased)."""

    method: str
    path: str
    lines: tuple[tuple[str, str], ...]

    @property
    def headers(self) -> dict[str, str]:
        """The header lines as a dict (the last of repeated names wins)."""
        return dict(self.lines)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: RecordingServer
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        lines = tuple((name.lower(), value) for name, value in self.headers.items())
        self.server.record(Received(self.command, self.path, lines))
        parts = urlsplit(self.path)
        if parts.path == "/redirect":
            query = parse_qs(parts.query)
            self.send_response(int(query.get("status", ["302"])[0]))
            self.send_header("location", query["to"][0])
            if "cookie" in query:
                self.send_header("set-cookie", query["cookie"][0] + "; Path=/")
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = b"ok"
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the test asserts on what was recorded


class RecordingServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server on 127.0.0.1 that keeps every request it got."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self._lock = threading.Lock()
        self._received: list[Received] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/") -> str:
        """An absolute URL on this server."""
        return self.origin + path

    def redirect_url(self, to: str, status: int = 302, cookie: str | None = None) -> str:
        """A URL on this server that redirects to ``to`` (setting ``cookie``, if given)."""
        from urllib.parse import quote

        url = self.url(f"/redirect?status={status}&to={quote(to, safe='')}")
        return url if cookie is None else f"{url}&cookie={quote(cookie, safe='')}"

    def record(self, received: Received) -> None:
        with self._lock:
            self._received.append(received)

    @property
    def received(self) -> list[Received]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self._received)

    def last(self, path: str | None = None) -> Received:
        """The last request received (on ``path``, when given)."""
        matching = [r for r in self.received if path is None or urlsplit(r.path).path == path]
        assert matching, f"no request received on {path or 'any path'}"
        return matching[-1]

    def clear(self) -> None:
        with self._lock:
            self._received.clear()


@contextmanager
def recording_server() -> Iterator[RecordingServer]:
    """Run a :class:`RecordingServer` in a thread for the ``with`` block."""
    server = RecordingServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
