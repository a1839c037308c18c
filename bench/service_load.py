"""A small HTTP/1.1 load generator, for ``bench/bench_service.py`` where
``wrk`` cannot be had: ``connections`` keep-alive connections, each sending
``GET path`` again as soon as the answer is in, for ``duration`` seconds.
Prints one JSON object: requests, seconds, errors, p50_ms, p99_ms.

    python bench/service_load.py 127.0.0.1 8102 /work --connections 32 \\
        --duration 10 --header "x-request-id: ..."

Slower than wrk (it is Python), so run it on a core of its own; it tells
the servers' figures as long as it is not the bottleneck (a few thousand
requests a second on one core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence


async def _connection(
    host: str, port: int, request: bytes, until: float, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < until:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            status = int(head.split(b" ", 2)[1])
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if not 200 <= status < 400:
                errors[0] += 1
    finally:
        writer.close()


async def load(
    host: str, port: int, path: str, connections: int, duration: float, headers: Sequence[str]
) -> dict[str, float]:
    """Run the load; the figures wrk would print."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", *headers, "", ""]
    request = "\r\n".join(lines).encode("latin-1")
    latencies: list[float] = []
    errors = [0]
    start = time.perf_counter()
    until = start + duration
    await asyncio.gather(
        *(_connection(host, port, request, until, latencies, errors) for _ in range(connections))
    )
    seconds = time.perf_counter() - start
    latencies.sort()

    def at(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "requests": len(latencies),
        "seconds": seconds,
        "errors": errors[0],
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--header", action="append", default=[])
    args = parser.parse_args(argv)
    result = asyncio.run(
        load(args.host, args.port, args.path, args.connections, args.duration, args.header)
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
