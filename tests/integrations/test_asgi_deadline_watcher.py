"""The ASGI door's deadlines on the event loop's one watcher (see
``ctxrelay.integrations.asgi._Watcher``): every request still fires at its
own deadline, in order or not, a finished request is never touched again,
and finished entries do not pile up.  In process, through a raw ASGI app; no
test asserts on elapsed time."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import ctxrelay
from ctxrelay import Policy
from ctxrelay.integrations import asgi
from ctxrelay.integrations.asgi import RelayMiddleware

Message = MutableMapping[str, Any]


def _scope(rid: str, budget_ms: int | None = None) -> dict[str, Any]:
    headers = [(b"host", b"shop"), (b"x-request-id", rid.encode())]
    if budget_ms is not None:
        headers.append((b"x-request-timeout-ms", str(budget_ms).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("10.0.0.1", 5000),
        "server": ("10.0.0.2", 80),
    }


async def _never_disconnects() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def _call(app: Any, scope: dict[str, Any]) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, _never_disconnects, send)
    return sent


def _status(sent: list[Message]) -> int:
    return int(next(m["status"] for m in sent if m["type"] == "http.response.start"))


async def _slow(scope: Any, receive: Any, send: Any) -> None:
    await asyncio.sleep(30)


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_deadlines_out_of_order_each_fire_for_their_own_request() -> None:
    # A caller's header narrows some deadlines below the default: they are
    # earlier than ones already queued, and must still fire first and alone.
    ctxrelay.configure(Policy(trusted_peers=("10.0.0.1",)))
    app = RelayMiddleware(_slow, timeout=0.4)

    async def main() -> list[list[Message]]:
        budgets = [None, 150, None, 60, 250, None, 10]
        calls = [_call(app, _scope(f"r-{i}", ms)) for i, ms in enumerate(budgets)]
        return await asyncio.gather(*calls)

    results = asyncio.run(main())
    for i, sent in enumerate(results):
        assert _status(sent) == 504
        assert f"r-{i}".encode() in sent[-1]["body"]


def test_a_finished_request_is_never_cancelled_or_watched_later() -> None:
    app = RelayMiddleware(_ok, timeout=0.1)
    reads: list[str] = []

    async def receive() -> Message:
        reads.append("read")  # a pump started after the end would read
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        return None

    async def main() -> None:
        for i in range(50):
            await app(_scope(f"fast-{i}"), receive, send)
        # Past every deadline and watch time: a late deadline would cancel
        # this task (the requests ran in it), and asyncio.run would raise.
        await asyncio.sleep(0.3)

    asyncio.run(main())
    assert reads == []


def test_the_request_under_way_is_cancelled_after_many_finished_ones_behind_it() -> None:
    app = RelayMiddleware(_slow, timeout=0.3)
    fast = RelayMiddleware(_ok, timeout=0.3)

    async def main() -> tuple[list[Message], int]:
        slow = asyncio.ensure_future(_call(app, _scope("slow")))
        await asyncio.sleep(0)
        for i in range(3 * asgi._COMPACT_AT):  # compacted behind the slow one
            assert _status(await _call(fast, _scope(f"f-{i}"))) == 200
        watcher = asgi._watcher_of(asyncio.get_running_loop())
        held = len(watcher._deadlines)
        return await slow, held

    sent, held = asyncio.run(main())
    assert _status(sent) == 504
    assert held <= 2 * asgi._COMPACT_AT  # finished entries do not pile up


def test_each_event_loop_has_its_own_watcher() -> None:
    app = RelayMiddleware(_slow, timeout=0.05)
    for n in range(3):  # a new loop each time: its own timer
        assert _status(asyncio.run(_call(app, _scope(f"loop-{n}")))) == 504
