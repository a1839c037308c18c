"""gRPC (``grpcio``, sync and ``grpc.aio``): a relaying server and channel,
and interceptors that do the same.

The recommended form wraps each handler once when it is registered and each
channel callable once when it is made -- no interceptor pipeline per call,
which by itself costs grpcio about 10% of a loopback call::

    server = relay_server(grpc.server(pool))     # or grpc.aio.server()
    channel = relay_channel(grpc.insecure_channel(target), target)

The interceptors, for servers and channels built elsewhere.  Client side,
the current context travels as outgoing metadata, by policy::

    channel = grpc.intercept_channel(
        grpc.insecure_channel("orders.internal:50051"),
        ClientInterceptor("orders.internal:50051"),
    )
    channel = grpc.aio.insecure_channel(
        "orders.internal:50051",
        interceptors=aio_client_interceptors("orders.internal:50051"),
    )

The channel's target is the destination the policy routes: ``host:port``
becomes ``grpc://host:port`` (``grpcs://`` with ``secure=True``), see
:func:`destination_of`.  Metadata the caller set wins; a value that is not
valid gRPC ASCII metadata is left out with a warning (grpcio would fail the
whole call on it).

Server side, each call is a door, as a web request is::

    server = grpc.server(pool, interceptors=[ServerInterceptor()])
    server = grpc.aio.server(interceptors=[AioServerInterceptor()])

The interceptor does not bind anything itself: grpcio runs the handler later,
elsewhere -- on the server's thread pool, in the call's asyncio task, or for
a sync handler on an aio server in an executor thread that copies no context
-- so a value set in ``intercept_service`` is not what the handler sees
(grpc #37881, #41863).  It wraps the handler's behaviour functions instead,
and binds inside them, where the handler runs: the request id (validated or
generated, by the HTTP door's rule), the fields ``extract`` reads from the
metadata (baggage only from a trusted peer), a ``RequestSnapshot``.  The
context is reset by token on every outcome -- return, ``abort``, exception,
cancellation -- and for every arity.  The request id is echoed in the
initial metadata.

Deadlines map onto gRPC's own, both ways.  Server side, the handler runs
under the call's deadline (``context.time_remaining()``: ``ctxrelay.remaining()``,
``checkpoint()``, pool tasks and downstream calls see it), narrowed further
by a remaining-time header from a trusted peer, as at the web door.  Client
side, a call made under a deadline gets ``min(its own timeout, the time
remaining)`` as its ``timeout`` -- gRPC then sends it on as its own
``grpc-timeout`` -- and a call made once the deadline passed (or the
request was cancelled) fails at once, without touching the network, with
``ctxrelay.DeadlineExceeded`` (or ``RequestCancelled``) that is also a
``grpc.RpcError`` whose ``code()`` is ``DEADLINE_EXCEEDED`` (or
``CANCELLED``).  A call the clamped timeout cuts short fails as gRPC
reports any deadline: an ``RpcError`` with ``DEADLINE_EXCEEDED``.

A client that cancels a call (or disconnects) cancels the handler's
request, as an HTTP disconnect does at the web door: ``cancelled()`` turns
true, ``checkpoint()`` raises ``RequestCancelled``, pool tasks not started
yet are not run.  Sync grpcio reports the end of every call through
``context.add_callback``; grpc.aio cancels the call's task.  The mark is
made only while the handler runs, on that call's own cancellation.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import inspect
import logging
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from time import monotonic
from typing import Any, NoReturn, overload
from urllib.parse import unquote

try:
    import grpc
    import grpc.aio
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.grpc needs grpcio: pip install 'ctxrelay[grpc]'"
    ) from _exc

from .. import _policy
from .._context import REQUEST_ID, Cancellation, Context, current, enter, leave, narrowed
from .._deadline import DeadlineExceeded, RequestCancelled, call_deadline
from .._escape import log_text
from .._inbound import Door, RequestIdValidator, open_asgi
from .._outbound import outgoing
from .._policy import Policy, Route
from .._request import CONTROL, MAX_HEADER_BYTES

__all__ = [
    "AioServerInterceptor",
    "ClientInterceptor",
    "ServerInterceptor",
    "aio_client_interceptors",
    "destination_of",
    "relay_channel",
    "relay_server",
]

_log = logging.getLogger("ctxrelay.grpc")

Behavior = Callable[..., Any]

# What the snapshot says of every call: gRPC is an HTTP/2 POST to the
# method's path; the scheme names the protocol, not the transport security.
_METHOD = "POST"
_SCHEME = "grpc"
# gRPC's own default port when a target names none (the "https" port).
_DEFAULT_PORT = 443


# -- the destination of a channel ----------------------------------------------
def destination_of(target: str, *, secure: bool = False) -> str:
    """The URL-like destination the policy routes for a channel ``target``.

    ``host:port``, ``dns:///host:port``, ``dns://resolver/host:port``,
    ``ipv4:10.0.0.1:50051``, ``ipv6:[::1]:50051``, ``[::1]:50051`` and
    ``xds:///name`` (any ``scheme:///endpoint``) become
    ``grpc://host:port`` -- ``grpcs://`` when ``secure`` (a channel with TLS
    credentials).  A target without a port gets gRPC's default, 443.  Routes
    match it like a URL: ``Policy.Route(hosts=..., schemes={"grpcs"})``.

    A target with no single host -- a Unix socket (``unix:``,
    ``unix-abstract:``), a ``vsock:``, a list of addresses
    (``ipv4:10.0.0.1,10.0.0.2``) or anything unreadable -- gives a
    destination no route matches (``grpc:``): the policy's ``foreign``
    route, the request id and trace only.  Pass ``destination=`` to the
    interceptor to route those.
    """
    scheme = "grpcs" if secure else "grpc"
    nowhere = f"{scheme}:"
    text = target.strip()
    lowered = text.lower()
    if lowered.startswith(("unix:", "unix-abstract:", "vsock:")):
        return nowhere
    if lowered.startswith(("ipv4:", "ipv6:")):
        endpoint = unquote(text[5:])  # grpc writes ipv6:%5B::1%5D:5000 in peers
        if "," in endpoint:
            return nowhere  # several hosts: no one route speaks for all of them
    elif lowered.startswith("dns:") and not lowered.startswith("dns://"):
        endpoint = text[4:]  # dns:host:port
    elif "://" in text:
        # scheme://authority/endpoint: the authority is the resolver's (a DNS
        # server for dns://8.8.8.8/host), the endpoint is where calls go.
        endpoint = text.partition("://")[2].partition("/")[2]
    else:
        endpoint = text
    host, port = _host_port(endpoint)
    if not host or any(c in host for c in "/?#@ \t") or port is None:
        return nowhere
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _host_port(endpoint: str) -> tuple[str, int | None]:
    """``host`` and port of ``host[:port]`` or ``[v6][:port]``; port None if malformed."""
    if endpoint.startswith("["):
        host, _, rest = endpoint[1:].partition("]")
        if not rest:
            return host, _DEFAULT_PORT
        if not rest.startswith(":"):
            return host, None
        return host, _port(rest[1:])
    if endpoint.count(":") > 1:
        return endpoint, _DEFAULT_PORT  # a bare IPv6 address: no port to read
    host, sep, port = endpoint.partition(":")
    return host, _port(port) if sep else _DEFAULT_PORT


def _port(text: str) -> int | None:
    if not text.isdigit() or not 0 < int(text) < 65536:
        return None
    return int(text)


# -- client: the context as outgoing metadata ----------------------------------
class _Outbound:
    """What one channel's calls carry: its destination, the route per policy."""

    __slots__ = ("_memo", "destination")

    def __init__(self, destination: str) -> None:
        self.destination = destination
        self._memo: tuple[Policy | None, Route | None] = (None, None)

    def added(self, existing: Iterable[tuple[str, object]] | None) -> list[tuple[str, str]]:
        """The metadata the current context adds to ``existing``.

        Keys the caller set (compared lowercase) are left alone; a value that
        is not valid gRPC ASCII metadata (printable ASCII, no tab) is left
        out with a warning -- grpcio would fail the call on it.  Never raises.
        """
        try:
            policy = _policy.STATE.policy
            memo_policy, route = self._memo
            if memo_policy is not policy or route is None:
                route = policy.route(self.destination)[0]
                self._memo = (policy, route)
            out = outgoing(current(), policy, route)
            if not out:
                return []
            present = {str(key).lower() for key, _ in existing} if existing else ()
            added: list[tuple[str, str]] = []
            unsent: list[str] = []
            for name, value in out.items():
                if name in present:
                    continue  # explicit wins
                if (
                    value.isascii()
                    and value.isprintable()
                    and not name.endswith("-bin")  # binary by name: grpcio wants bytes
                    and not name.startswith("grpc-")  # reserved for gRPC itself
                ):
                    added.append((name, value))
                else:
                    unsent.append(name)
            if unsent:
                _log.warning(
                    "ctxrelay: metadata not sent to %s (not valid gRPC ASCII metadata): %s",
                    self.destination,
                    unsent,
                )
            return added
        except Exception:
            _log.exception("ctxrelay: the gRPC call goes without context metadata")
            return []


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """A sync call's details with the context's metadata added."""


class _DeadlineRpcError(DeadlineExceeded, grpc.RpcError):
    """A call refused before it started, its deadline passed: a
    ``ctxrelay.DeadlineExceeded`` that is also the ``grpc.RpcError`` gRPC
    code already handles, with gRPC's own status for it."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return str(self)

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()


class _CancelledRpcError(RequestCancelled, grpc.RpcError):
    """A call refused before it started, its request cancelled."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return str(self)

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()


def _timeout(own: float | None) -> float | None:
    """The call's timeout under the current deadline: ``min(own, remaining)``.

    Raises at once, before any network, when the deadline passed or the
    request was cancelled.
    """
    at = call_deadline(_DeadlineRpcError, _CancelledRpcError)
    if at is None:
        return own
    left = max(0.001, at - monotonic())  # gRPC reads 0 as "already expired"
    return own if own is not None and own <= left else left


def _sync_details(outbound: _Outbound, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
    existing = details.metadata
    timeout = _timeout(details.timeout)
    added = outbound.added(existing)
    if not added and timeout == details.timeout:
        return details
    return _CallDetails(
        details.method,
        timeout,
        (*(existing or ()), *added),
        details.credentials,
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


def _resolve(target: str | None, secure: bool, destination: str | None) -> str:
    if destination is not None:
        if not isinstance(destination, str):
            raise TypeError("destination must be a str (a URL such as grpcs://host:port)")
        return destination
    if not isinstance(target, str) or not target:
        raise TypeError("give the channel's target (host:port) or a destination URL")
    return destination_of(target, secure=secure)


class ClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the current context to every call of a sync channel, by policy.

    ``grpc.intercept_channel(channel, ClientInterceptor(target))``, with the
    ``target`` the channel was made for (``"orders.internal:50051"``):
    :func:`destination_of` maps it to the ``grpc://host:port`` the policy
    routes (``secure=True``: ``grpcs://``).  ``destination=`` gives the URL
    yourself.  The metadata is computed when the call starts, from the
    context current in the calling thread.
    """

    def __init__(
        self, target: str | None = None, *, secure: bool = False, destination: str | None = None
    ) -> None:
        self._outbound = _Outbound(_resolve(target, secure, destination))

    @property
    def destination(self) -> str:
        """The destination the policy routes for this channel."""
        return self._outbound.destination

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(_sync_details(self._outbound, client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(_sync_details(self._outbound, client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return continuation(_sync_details(self._outbound, client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return continuation(_sync_details(self._outbound, client_call_details), request_iterator)


def _aio_details(
    outbound: _Outbound, details: grpc.aio.ClientCallDetails
) -> grpc.aio.ClientCallDetails:
    existing = details.metadata
    timeout = _timeout(details.timeout)
    added = outbound.added(existing)
    if not added and timeout == details.timeout:
        return details
    # A new Metadata: the caller's own object may be reused for other calls.
    metadata = grpc.aio.Metadata(*(existing or ()), *added)
    return grpc.aio.ClientCallDetails(
        details.method, timeout, metadata, details.credentials, details.wait_for_ready
    )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    __slots__ = ("_outbound",)

    def __init__(self, outbound: _Outbound) -> None:
        self._outbound = outbound

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_aio_details(self._outbound, client_call_details), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    __slots__ = ("_outbound",)

    def __init__(self, outbound: _Outbound) -> None:
        self._outbound = outbound

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_aio_details(self._outbound, client_call_details), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    __slots__ = ("_outbound",)

    def __init__(self, outbound: _Outbound) -> None:
        self._outbound = outbound

    async def intercept_stream_unary(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(
            _aio_details(self._outbound, client_call_details), request_iterator
        )


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    __slots__ = ("_outbound",)

    def __init__(self, outbound: _Outbound) -> None:
        self._outbound = outbound

    async def intercept_stream_stream(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(
            _aio_details(self._outbound, client_call_details), request_iterator
        )


def aio_client_interceptors(
    target: str | None = None, *, secure: bool = False, destination: str | None = None
) -> list[grpc.aio.ClientInterceptor]:
    """The four interceptors of a ``grpc.aio`` channel, one per arity.

    ``grpc.aio.insecure_channel(target, interceptors=aio_client_interceptors(target))``.
    A ``grpc.aio`` channel files each interceptor under the first arity it
    implements, so one object cannot serve all four: this returns four that
    share one destination (see :class:`ClientInterceptor` for ``target``,
    ``secure`` and ``destination``).  The metadata is computed in the task
    grpc.aio starts for the call, which copies the caller's context when
    the call is made.
    """
    outbound = _Outbound(_resolve(target, secure, destination))
    return [
        _AioUnaryUnary(outbound),
        _AioUnaryStream(outbound),
        _AioStreamUnary(outbound),
        _AioStreamStream(outbound),
    ]


# -- client: relaying the channel's callables (no interceptor) ----------------------
def _prepared(outbound: _Outbound, timeout: float | None, metadata: Any) -> tuple[Any, Any]:
    """A call's ``timeout`` and ``metadata`` with the current context's.

    The caller's ``metadata`` object is never changed (it may be reused
    for other calls): a new one is made when something is added.
    """
    timeout = _timeout(timeout)
    added = outbound.added(metadata)
    if added:
        if isinstance(metadata, grpc.aio.Metadata):
            metadata = grpc.aio.Metadata(*metadata, *added)
        else:
            metadata = (*(metadata or ()), *added)
    return timeout, metadata


class _UnaryUnary(grpc.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    __slots__ = ("_call", "_outbound")

    def __init__(self, call: Any, outbound: _Outbound) -> None:
        self._call = call
        self._outbound = outbound

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        timeout, metadata = _prepared(self._outbound, timeout, metadata)
        return self._call(request, timeout, metadata, credentials, wait_for_ready, compression)

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        timeout, metadata = _prepared(self._outbound, timeout, metadata)
        return self._call.with_call(
            request, timeout, metadata, credentials, wait_for_ready, compression
        )

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        timeout, metadata = _prepared(self._outbound, timeout, metadata)
        return self._call.future(
            request, timeout, metadata, credentials, wait_for_ready, compression
        )


class _StreamUnary(grpc.StreamUnaryMultiCallable):  # type: ignore[type-arg]
    __slots__ = ("_call", "_outbound")

    def __init__(self, call: Any, outbound: _Outbound) -> None:
        self._call = call
        self._outbound = outbound

    def __call__(
        self,
        request_iterator: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        timeout, metadata = _prepared(self._outbound, timeout, metadata)
        return self._call(
            request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )

    def with_call(
        self,
        request_iterator: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        timeout, metadata = _prepared(self._outbound, timeout, metadata)
        return self._call.with_call(
            request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )

    def future(
        self,
        request_iterator: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        timeout, metadata = _prepared(self._outbound, timeout, metadata)
        return self._call.future(
            request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )


class _UnaryStream(grpc.UnaryStreamMultiCallable):  # type: ignore[type-arg]
    __slots__ = ("_call", "_outbound")

    def __init__(self, call: Any, outbound: _Outbound) -> None:
        self._call = call
        self._outbound = outbound

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        timeout, metadata = _prepared(self._outbound, timeout, metadata)
        return self._call(request, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamStream(grpc.StreamStreamMultiCallable):  # type: ignore[type-arg]
    __slots__ = ("_call", "_outbound")

    def __init__(self, call: Any, outbound: _Outbound) -> None:
        self._call = call
        self._outbound = outbound

    def __call__(
        self,
        request_iterator: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        timeout, metadata = _prepared(self._outbound, timeout, metadata)
        return self._call(
            request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )


class _RelayChannel(grpc.Channel):
    """A sync channel whose callables add the current context to each call."""

    def __init__(self, channel: grpc.Channel, outbound: _Outbound) -> None:
        self._channel = channel
        self._outbound = outbound

    @property
    def destination(self) -> str:
        """The destination the policy routes for this channel."""
        return self._outbound.destination

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _UnaryUnary(self._channel.unary_unary(method, *args, **kwargs), self._outbound)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _UnaryStream(self._channel.unary_stream(method, *args, **kwargs), self._outbound)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _StreamUnary(self._channel.stream_unary(method, *args, **kwargs), self._outbound)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _StreamStream(self._channel.stream_stream(method, *args, **kwargs), self._outbound)

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Any) -> None:
        self._channel.unsubscribe(callback)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> _RelayChannel:
        self._channel.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        return self._channel.__exit__(*exc_info)

    def __getattr__(self, name: str) -> Any:
        if name == "_channel":
            raise AttributeError(name)
        return getattr(self._channel, name)


class _AioCallable:
    """One of a ``grpc.aio`` channel's callables, any arity: the metadata is
    computed when the call is made, in the caller's own context."""

    __slots__ = ("_call", "_outbound")

    def __init__(self, call: Any, outbound: _Outbound) -> None:
        self._call = call
        self._outbound = outbound

    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        **kwargs: Any,
    ) -> Any:
        timeout, metadata = _prepared(self._outbound, timeout, metadata)
        return self._call(request, timeout=timeout, metadata=metadata, **kwargs)


class _AioRelayChannel(grpc.aio.Channel):
    """:class:`_RelayChannel` for a ``grpc.aio.Channel``."""

    def __init__(self, channel: grpc.aio.Channel, outbound: _Outbound) -> None:
        self._channel = channel
        self._outbound = outbound

    @property
    def destination(self) -> str:
        """The destination the policy routes for this channel."""
        return self._outbound.destination

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _AioCallable(self._channel.unary_unary(method, *args, **kwargs), self._outbound)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _AioCallable(self._channel.unary_stream(method, *args, **kwargs), self._outbound)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _AioCallable(self._channel.stream_unary(method, *args, **kwargs), self._outbound)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _AioCallable(self._channel.stream_stream(method, *args, **kwargs), self._outbound)

    async def __aenter__(self) -> _AioRelayChannel:
        await self._channel.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._channel.__aexit__(*exc_info)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    def __getattr__(self, name: str) -> Any:
        if name == "_channel":
            raise AttributeError(name)
        return getattr(self._channel, name)


@overload
def relay_channel(
    channel: grpc.aio.Channel,
    target: str | None = ...,
    *,
    secure: bool = ...,
    destination: str | None = ...,
) -> grpc.aio.Channel: ...
@overload
def relay_channel(
    channel: grpc.Channel,
    target: str | None = ...,
    *,
    secure: bool = ...,
    destination: str | None = ...,
) -> grpc.Channel: ...
def relay_channel(
    channel: grpc.Channel | grpc.aio.Channel,
    target: str | None = None,
    *,
    secure: bool = False,
    destination: str | None = None,
) -> grpc.Channel | grpc.aio.Channel:
    """The channel, relaying: every call made through the returned channel
    carries the current context, by policy.  The recommended form.

    ``channel = relay_channel(grpc.insecure_channel(target), target)`` (or a
    ``grpc.aio`` channel), with the ``target`` the channel was made for:
    :func:`destination_of` maps it to the ``grpc://host:port`` the policy
    routes (``secure=True``: ``grpcs://``; ``destination=`` gives the URL
    yourself).  Stubs made on it -- ``OrdersStub(channel)`` --,
    ``channel.unary_unary(...)`` and the other callables add the
    context's metadata and clamp the timeout to the deadline when the call
    is made, in the calling thread or task, as :class:`ClientInterceptor`
    does: one wrapper per call instead of grpcio's interceptor pipeline.

    A call refused before it starts (the deadline passed, the request was
    cancelled) raises ``DeadlineExceeded`` (``RequestCancelled``), also a
    ``grpc.RpcError``, where the call is made -- on ``grpc.aio`` when the
    callable is called, not when its result is awaited.
    """
    outbound = _Outbound(_resolve(target, secure, destination))
    if isinstance(channel, grpc.aio.Channel):
        return _AioRelayChannel(channel, outbound)
    if isinstance(channel, grpc.Channel):
        return _RelayChannel(channel, outbound)
    raise TypeError(f"relay_channel() takes a grpc.Channel or grpc.aio.Channel, not {channel!r}")


# -- server: the door ----------------------------------------------------------
# Peers as grpc writes them ("ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000"),
# read once: a connection's calls all bring the same string.  Bounded.
_peers: dict[str, tuple[str, int] | None] = {}
_PEERS_MAX = 1024
# The server address is not known to a handler: the snapshot's host is "".
_NO_SERVER = ("", None)


def _peer(text: object) -> tuple[str, int] | None:
    """``context.peer()`` as an ASGI ``client`` pair, or None (no host).

    The door formats it with ``format_peer`` (``[::1]:5000``), the one
    peer format ``Policy.trusted_peers`` reads.
    """
    if not isinstance(text, str):
        return None
    try:
        return _peers[text]
    except KeyError:
        pass
    kind, _, address = text.partition(":")
    peer: tuple[str, int] | None = None
    if kind == "ipv4":
        host, _, port = address.rpartition(":")
        peer = (host, int(port)) if host and port.isdigit() else None
    elif kind == "ipv6":
        address = unquote(address)  # grpc writes the brackets as %5B and %5D
        if address.startswith("["):
            host, _, rest = address[1:].partition("]")
            port = rest[1:]
            peer = (host, int(port)) if host and rest[:1] == ":" and port.isdigit() else None
    # A Unix socket or anything else has no host a policy could name: None.
    if len(_peers) >= _PEERS_MAX:
        _peers.clear()
    _peers[text] = peer
    return peer


# The metadata names the door reads, per policy: the request id's,
# captured ones, trace context, baggage.
_watched_memo: tuple[Policy | None, str, frozenset[str]] = (None, "", frozenset())


def _watched(policy: Policy, name: str) -> frozenset[str]:
    global _watched_memo
    memo_policy, memo_name, names = _watched_memo
    if memo_policy is not policy or memo_name != name:  # identity: a Policy compares by value
        names = frozenset({name, "traceparent", "tracestate", "baggage", *policy.capture})
        _watched_memo = (policy, name, names)
    return names


# Hostile metadata is reported once per (kind, name), as a warning; every
# occurrence is a debug line.  Bounded: the names are the door's own.
_reported: set[tuple[str, str]] = set()
_REPORTED_MAX = 256


def _refuse(kind: str, name: str) -> None:
    _log.debug("ctxrelay: gRPC metadata %r dropped: %s", name, kind)
    if (kind, name) in _reported or len(_reported) >= _REPORTED_MAX:
        return
    _reported.add((kind, name))
    _log.warning(
        "ctxrelay: dropped inbound gRPC metadata %r: %s (reported once per name and kind)",
        name,
        kind,
    )


def _open(door: Door, context: Any, method: str) -> Context:
    """The context for one call; never raises.

    gRPC is HTTP/2: a call is a ``POST`` to the method's path, its metadata
    the request's headers.  So the call goes through the web door itself
    (``open_asgi``, as an ``http`` scope): one rule for the request id
    (the first inbound one when valid, else a new one), for what
    ``extract`` reads (baggage only from a trusted peer) and for the
    snapshot, and the door's one-pass hot path.  A ``-bin`` value is binary
    (grpc hands it over decoded, as ``bytes``): never a field nor a
    snapshot header.  Hostile values under the names the door reads are
    dropped by the door's rules, and reported here once per name and kind.
    """
    raw_id: object = None
    try:
        plan = door.current_plan
        if plan.policy is not _policy.STATE.policy:  # Door.plan(), inlined: runs per call
            plan = door.plan()
        name = plan.name
        watched = _watched(plan.policy, name)
        pairs: list[tuple[bytes, bytes]] = []
        for key, value in context.invocation_metadata() or ():
            if type(value) is not str or type(key) is not str:
                if isinstance(key, str) and key.endswith("-bin") and key[:-4] in watched:
                    _refuse("a binary (-bin) value under a name ctxrelay reads as text", key)
                continue
            if key in watched:
                if key == name:
                    if raw_id is None:
                        raw_id = value
                    else:
                        _refuse("repeated; the first one counts", key)
                if len(value) > MAX_HEADER_BYTES:
                    _refuse(f"a value over {MAX_HEADER_BYTES} bytes", key)
                elif CONTROL.search(value):
                    # grpc-core passes CR, LF and NUL through from a raw HTTP/2 client.
                    _refuse("control characters", key)
            try:
                pairs.append((key.encode("latin-1"), value.encode("latin-1")))
            except UnicodeEncodeError:
                # grpc decoded UTF-8: back to the bytes that came in, which the
                # door reads as it reads an HTTP header's (latin-1).
                pairs.append((key.encode("utf-8", "replace"), value.encode("utf-8", "replace")))
        scope = {
            "type": "http",
            "method": _METHOD,
            "scheme": _SCHEME,
            "path": method,
            "query_string": b"",
            "headers": pairs,
            "client": _peer(context.peer()),
            "server": _NO_SERVER,
        }
        return open_asgi(door, scope, plan)
    except Exception:
        _log.warning("ctxrelay: could not read a gRPC call's metadata", exc_info=True)
        return door.fallback(raw_id)


# Sync grpcio answers time_remaining() with ~9.2e18 s for a call without a
# deadline (its infinite future), grpc.aio with None: anything past a year
# is "none".
_NO_DEADLINE = 365 * 86400.0


def _with_deadline(ctx: Context, context: Any, cancel: Cancellation) -> Context:
    """``ctx`` with the call's cancellation, narrowed to the call's own gRPC
    deadline if it has one.

    Any peer's deadline: a gRPC deadline only shortens the caller's own call,
    and gRPC enforces it whatever ctxrelay does (grpc #26236: the handler
    could not pass ``time_remaining()`` on by itself).  Never raises.
    """
    at = None
    try:
        left = context.time_remaining()
        if isinstance(left, (int, float)) and 0 <= left < _NO_DEADLINE:
            at = monotonic() + left
    except Exception:
        _log.debug("ctxrelay: no deadline read from the gRPC call", exc_info=True)
    return narrowed(ctx, at, cancel)


# -- server: the call's cancellation ---------------------------------------------
#: The reason a call's request is marked cancelled.
_ENDED = "the gRPC call ended before its handler did (cancelled by the client, disconnected)"


class _CallCancellation(Cancellation):
    """One call's cancellation, and whether its handler still runs.

    grpc calls its termination callback for every call -- also after a
    handler that returned normally, once the status went out -- so
    :meth:`ended` marks the request cancelled only while the handler runs
    (``live``).  It holds nothing but this call's own flags: a callback
    that fires late, on whatever thread, can touch no other call.
    """

    __slots__ = ("live",)

    def __init__(self) -> None:
        self.cancelled = False
        self.reason = ""
        self.live = True

    def ended(self, *_: object) -> None:
        """grpc's callback: the call terminated.  Never raises (it runs on
        grpc's own threads and event loop)."""
        try:
            if self.live:
                self.cancel(_ENDED)
        except Exception:  # pragma: no cover - cancel() sets two attributes
            _log.debug("ctxrelay: a gRPC call's cancellation was not marked", exc_info=True)


def _watch(context: Any, cancel: _CallCancellation) -> None:
    """Mark ``cancel`` when a sync server's call ends before its handler.

    ``add_callback`` answers False when the call is already over (the
    client went away before the handler started): cancelled at once.  A
    sync handler on a ``grpc.aio`` server gets a context whose callbacks run
    only after a normal return: harmless here, the task's own callback
    (:func:`_aio_watched`) does the work there.  Never raises.
    """
    try:
        if context.add_callback(cancel.ended) is False:
            cancel.cancel(_ENDED)
    except Exception:
        _log.debug("ctxrelay: the gRPC call's end is not watched", exc_info=True)


def _is_abort(exc: BaseException) -> bool:
    # Sync grpcio's abort() raises a bare Exception(); grpc.aio's (and a sync
    # handler's on an aio server) raises AbortError.
    return isinstance(exc, grpc.aio.AbortError) or (type(exc) is Exception and not exc.args)


def _log_failure(exc: BaseException, method: str, log_errors: bool) -> None:
    # Logged while the call's context is still bound, so the line carries
    # its request id (grpcio's own line is written after the reset).
    if log_errors and not _is_abort(exc):
        _log.error("unhandled exception in gRPC method %s", log_text(method), exc_info=exc)


# -- server: the echo ------------------------------------------------------------
def _merged(initial_metadata: Any, echo: tuple[tuple[str, str], ...]) -> tuple[Any, ...]:
    lines = tuple(initial_metadata or ())
    name = echo[0][0]
    for key, _ in lines:
        if isinstance(key, str) and key.lower() == name:
            return lines  # an id the handler sent itself wins
    return (*lines, *echo)


class _Echo(grpc.ServicerContext):
    """The servicer context a sync handler sees: the call's own, with the
    request id added to its initial metadata.

    ``send_initial_metadata`` is one-shot, so ctxrelay never sends first: a
    handler that sends its own gets the id merged into it (its own id
    wins); otherwise ctxrelay sends it at the last moment -- before the
    first streamed message, the unary response, an abort or an error
    status.  Everything else is the call's own context.
    """

    def __init__(self, context: Any, echo: tuple[tuple[str, str], ...]) -> None:
        self._context = context
        self._echo = echo
        self.pending = True

    def flush(self) -> None:
        """Send the id now if nothing was sent yet; never raises."""
        if self.pending:
            self.pending = False
            try:
                self._context.send_initial_metadata(self._echo)
            except Exception as exc:  # the call ended, or metadata went out already
                _log.debug("ctxrelay: request id not echoed: %r", exc)

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        if self.pending:
            self.pending = False
            initial_metadata = _merged(initial_metadata, self._echo)
        self._context.send_initial_metadata(initial_metadata)

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        self.flush()
        self._context.abort(code, details)
        raise AssertionError("abort() returned")  # grpc raises

    def abort_with_status(self, status: Any) -> NoReturn:
        self.flush()
        self._context.abort_with_status(status)
        raise AssertionError("abort_with_status() returned")

    # The rest is the call's own context.
    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return self._context.peer()  # type: ignore[no-any-return]

    def peer_identities(self) -> Any:
        return self._context.peer_identities()

    def peer_identity_key(self) -> Any:
        return self._context.peer_identity_key()

    def auth_context(self) -> Any:
        return self._context.auth_context()

    def set_compression(self, compression: Any) -> None:
        self._context.set_compression(compression)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._context.set_trailing_metadata(trailing_metadata)

    def trailing_metadata(self) -> Any:
        return self._context.trailing_metadata()

    def set_code(self, code: Any) -> None:
        self._context.set_code(code)

    def code(self) -> Any:
        return self._context.code()

    def set_details(self, details: Any) -> None:
        self._context.set_details(details)

    def details(self) -> Any:
        return self._context.details()

    def disable_next_message_compression(self) -> None:
        self._context.disable_next_message_compression()

    def is_active(self) -> bool:
        return self._context.is_active()  # type: ignore[no-any-return]

    def time_remaining(self) -> Any:
        return self._context.time_remaining()

    def cancel(self) -> Any:
        return self._context.cancel()

    def add_callback(self, callback: Any) -> Any:
        return self._context.add_callback(callback)

    def __getattr__(self, name: str) -> Any:
        if name == "_context":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self._context, name)


class _AioEcho(grpc.aio.ServicerContext):  # type: ignore[type-arg]
    """:class:`_Echo` for a ``grpc.aio`` handler (its I/O methods are coroutines)."""

    def __init__(self, context: Any, echo: tuple[tuple[str, str], ...]) -> None:
        self._context = context
        self._echo = echo
        self.pending = True

    async def flush(self) -> None:
        """Send the id now if nothing was sent yet; never raises."""
        if self.pending:
            self.pending = False
            try:
                await self._context.send_initial_metadata(self._echo)
            except Exception as exc:  # the call ended, or metadata went out already
                _log.debug("ctxrelay: request id not echoed: %r", exc)

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        if self.pending:
            self.pending = False
            initial_metadata = _merged(initial_metadata, self._echo)
        await self._context.send_initial_metadata(initial_metadata)

    async def write(self, message: Any) -> None:
        if self.pending:
            await self.flush()
        await self._context.write(message)

    async def read(self) -> Any:
        return await self._context.read()

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        # grpc.aio sends the status inside abort(): the id goes first.
        await self.flush()
        await self._context.abort(code, details, trailing_metadata)
        raise AssertionError("abort() returned")  # grpc raises

    async def abort_with_status(self, status: Any) -> NoReturn:
        await self.flush()
        await self._context.abort_with_status(status)
        raise AssertionError("abort_with_status() returned")

    # The rest is the call's own context.
    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return self._context.peer()  # type: ignore[no-any-return]

    def peer_identities(self) -> Any:
        return self._context.peer_identities()

    def peer_identity_key(self) -> Any:
        return self._context.peer_identity_key()

    def auth_context(self) -> Any:
        return self._context.auth_context()

    def set_compression(self, compression: Any) -> None:
        self._context.set_compression(compression)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._context.set_trailing_metadata(trailing_metadata)

    def trailing_metadata(self) -> Any:
        return self._context.trailing_metadata()

    def set_code(self, code: Any) -> None:
        self._context.set_code(code)

    def code(self) -> Any:
        return self._context.code()

    def set_details(self, details: Any) -> None:
        self._context.set_details(details)

    def details(self) -> Any:
        return self._context.details()

    def disable_next_message_compression(self) -> None:
        self._context.disable_next_message_compression()

    def time_remaining(self) -> Any:
        return self._context.time_remaining()

    def add_done_callback(self, callback: Any) -> None:
        self._context.add_done_callback(callback)

    def cancelled(self) -> bool:
        return self._context.cancelled()  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._context.done()  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        if name == "_context":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self._context, name)


# -- server: the wrapped behaviours ------------------------------------------------
class _Settings:
    """One server's door and options, shared by its behaviours."""

    __slots__ = ("door", "echo", "log_errors")

    def __init__(self, door: Door, echo: bool, log_errors: bool) -> None:
        self.door = door
        self.echo = echo
        self.log_errors = log_errors

    def open(
        self, context: Any, method: str, cancel: Cancellation
    ) -> tuple[Context, tuple[tuple[str, str], ...]]:
        ctx = _with_deadline(_open(self.door, context, method), context, cancel)
        rid = ctx.get(REQUEST_ID) or ""
        return ctx, ((self.door.current_plan.name, rid),)


def _sync_unary(settings: _Settings, behavior: Behavior, method: str) -> Behavior:
    def relay_unary(
        request: Any, context: Any, *more: Any, cancel: _CallCancellation | None = None
    ) -> Any:
        # ``cancel`` is given for a sync handler on a grpc.aio server, watched
        # by the call's task (_aio_watched); on grpc.server, grpc's callback.
        call = _CallCancellation() if cancel is None else cancel
        ctx, echo = settings.open(context, method, call)
        if cancel is None:
            _watch(context, call)
        relay = _Echo(context, echo) if settings.echo else None
        # grpc #37881: bound here, in the thread that runs the handler (the
        # server's pool, or an aio server's executor).
        token = enter(ctx)
        try:
            response = behavior(request, relay or context, *more)
            if relay is not None:
                relay.flush()
            return response
        except Exception as exc:
            _log_failure(exc, method, settings.log_errors)
            if relay is not None:
                relay.flush()  # sync grpcio sends the error status after we return
            raise
        finally:
            call.live = False
            leave(token)

    return relay_unary


def _sync_stream(settings: _Settings, behavior: Behavior, method: str) -> Behavior:
    def relay_stream(
        request: Any, context: Any, *more: Any, cancel: _CallCancellation | None = None
    ) -> Any:
        call = _CallCancellation() if cancel is None else cancel
        ctx, echo = settings.open(context, method, call)
        if cancel is None:
            _watch(context, call)
        relay = _Echo(context, echo) if settings.echo else None
        # The stream runs in a context of its own, entered for each step: the
        # handler's generator keeps one context across its yields (its own
        # bind() scopes hold), and nothing is bound on the thread between
        # steps -- a stream the server abandons (client cancelled) leaves
        # nothing behind, whichever thread or contextvars.Context grpc runs
        # it in (per call since grpcio 1.60, the pool thread's own before).
        run = contextvars.copy_context()
        token = run.run(enter, ctx)
        try:
            iterator = run.run(behavior, request, relay or context, *more)
        except Exception as exc:
            # No echo here: on an aio server this runs on the event loop,
            # where a sync context's blocking send would deadlock.
            call.live = False
            run.run(_log_failure, exc, method, settings.log_errors)
            run.run(leave, token)
            raise
        if more:  # experimental_non_blocking: it sends through a callback, later
            call.live = False
            run.run(leave, token)
            return iterator
        return _steps(run, token, iterator, relay, method, settings.log_errors, call)

    return relay_stream


def _steps(
    run: contextvars.Context,
    token: Any,
    iterator: Any,
    relay: _Echo | None,
    method: str,
    log_errors: bool,
    call: _CallCancellation,
) -> Iterator[Any]:
    """The handler's stream, each step run in the stream's own context."""
    try:
        while True:
            try:
                item = run.run(next, iterator)
            except StopIteration:
                break
            except Exception as exc:
                run.run(_log_failure, exc, method, log_errors)
                if relay is not None:
                    relay.flush()
                raise
            if relay is not None and relay.pending:
                relay.flush()
            yield item
        if relay is not None:
            relay.flush()  # an empty stream still echoes
    finally:
        # Also when grpc drops the stream (client cancelled) and this
        # generator is closed: the handler's generator is closed in its own
        # context, so its scopes exit where they were entered.
        try:
            close = getattr(iterator, "close", None)
            if close is not None:
                run.run(close)
        finally:
            call.live = False
            run.run(leave, token)


# On grpc.aio the client's cancel cancels the call's task: the CancelledError
# reaches the handler at its await, and marks the request cancelled on its
# way out, so work the handler handed off (pool tasks not started yet,
# threads that check) sees it.
def _aio_unary(settings: _Settings, behavior: Behavior, method: str) -> Behavior:
    async def relay_unary(request: Any, context: Any) -> Any:
        cancel = Cancellation()
        ctx, echo = settings.open(context, method, cancel)
        relay = _AioEcho(context, echo) if settings.echo else None
        token = enter(ctx)
        try:
            response = await behavior(request, relay or context)
            if relay is not None:
                await relay.flush()
            return response
        except asyncio.CancelledError:
            cancel.cancel(_ENDED)
            raise
        except Exception as exc:
            _log_failure(exc, method, settings.log_errors)
            if relay is not None:
                await relay.flush()
            raise
        finally:
            leave(token)

    return relay_unary


def _aio_writer(settings: _Settings, behavior: Behavior, method: str) -> Behavior:
    # A streaming handler that is a coroutine: it writes with context.write().
    async def relay_writer(request: Any, context: Any) -> None:
        cancel = Cancellation()
        ctx, echo = settings.open(context, method, cancel)
        relay = _AioEcho(context, echo) if settings.echo else None
        token = enter(ctx)
        try:
            await behavior(request, relay or context)
            if relay is not None:
                await relay.flush()  # nothing written: still echoed
        except asyncio.CancelledError:
            cancel.cancel(_ENDED)
            raise
        except Exception as exc:
            _log_failure(exc, method, settings.log_errors)
            if relay is not None:
                await relay.flush()
            raise
        finally:
            leave(token)

    return relay_writer


def _aio_stream(settings: _Settings, behavior: Behavior, method: str) -> Behavior:
    async def relay_stream(request: Any, context: Any) -> AsyncIterator[Any]:
        cancel = Cancellation()
        ctx, echo = settings.open(context, method, cancel)
        relay = _AioEcho(context, echo) if settings.echo else None
        task = asyncio.current_task()
        token = enter(ctx)
        inner = behavior(request, relay or context)
        try:
            async for item in inner:
                if relay is not None and relay.pending:
                    await relay.flush()
                yield item
            if relay is not None:
                await relay.flush()
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: grpc.aio dropped the stream at a yield (the
            # client cancelled while it was sending).
            cancel.cancel(_ENDED)
            raise
        except Exception as exc:
            _log_failure(exc, method, settings.log_errors)
            if relay is not None:
                await relay.flush()
            raise
        finally:
            try:
                await inner.aclose()
            finally:
                if asyncio.current_task() is task:
                    leave(token)
                # Else grpc.aio dropped the stream at a yield (the client
                # cancelled while it was sending) and asyncio's async-
                # generator hook closes it now, in a task of its own.  The
                # binding lived in the call's task only, which is over:
                # nothing to reset here, and leave() would report a foreign
                # exit.

    return relay_stream


class _Relayed:
    """A handler with its behaviour wrapped, made once per handler.

    ``handler`` is what grpc runs.  For a sync behaviour on a ``grpc.aio``
    server, ``field`` names it and ``relayed`` is the wrapper: each call
    gets its own copy of the handler, whose behaviour is given a
    cancellation the call's task watches (:func:`_aio_watched`).
    """

    __slots__ = ("field", "handler", "relayed", "source")

    def __init__(self, source: Any, handler: Any, field: str = "", relayed: Any = None) -> None:
        self.source = source
        self.handler = handler
        self.field = field
        self.relayed = relayed


def _aio_watched(entry: _Relayed) -> Any:
    """``entry``'s handler for one call of a sync behaviour on a ``grpc.aio``
    server, from the call's task (a generic handler's ``service``, an
    interceptor).

    grpc.aio runs the behaviour in an executor thread and, when the client
    cancels, cancels the call's task, which stops waiting for the thread at
    once; the thread runs on.  The task's done callback marks the call's
    request cancelled if the handler still runs, so the handler's
    ``checkpoint()`` and its pool tasks see it.  Never raises: without a
    task, the handler runs without the watch.
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    if task is None:
        return entry.handler
    cancel = _CallCancellation()
    task.add_done_callback(cancel.ended)
    return entry.handler._replace(**{entry.field: functools.partial(entry.relayed, cancel=cancel)})


def _wrapped(settings: _Settings, handler: Any, method: str, aio: bool) -> _Relayed:
    """``handler`` with its behaviour wrapped to bind the call's context."""
    if handler.request_streaming and handler.response_streaming:
        behavior, factory, streaming, field = (
            handler.stream_stream,
            grpc.stream_stream_rpc_method_handler,
            True,
            "stream_stream",
        )
    elif handler.request_streaming:
        behavior, factory, streaming, field = (
            handler.stream_unary,
            grpc.stream_unary_rpc_method_handler,
            False,
            "stream_unary",
        )
    elif handler.response_streaming:
        behavior, factory, streaming, field = (
            handler.unary_stream,
            grpc.unary_stream_rpc_method_handler,
            True,
            "unary_stream",
        )
    else:
        behavior, factory, streaming, field = (
            handler.unary_unary,
            grpc.unary_unary_rpc_method_handler,
            False,
            "unary_unary",
        )
    if behavior is None:
        return _Relayed(handler, handler)
    # grpc.aio decides how to run a behaviour by its kind (coroutine function,
    # async generator function, else sync in a thread): each wrapper is of
    # the kind it wraps, so grpc runs it as it would have run the handler.
    sync = False
    if aio and inspect.iscoroutinefunction(behavior):
        wrap = _aio_writer if streaming else _aio_unary
    elif aio and inspect.isasyncgenfunction(behavior):
        if not streaming:
            return _Relayed(handler, handler)  # grpc cannot run it: left to fail as it would
        wrap = _aio_stream
    elif aio and inspect.isawaitable(behavior):
        return _Relayed(handler, handler)  # grpc.aio's odd "awaitable handler" case
    else:
        wrap, sync = (_sync_stream if streaming else _sync_unary), True
    relayed = wrap(settings, behavior, method)
    for attribute in ("experimental_thread_pool", "experimental_non_blocking"):
        if hasattr(behavior, attribute):  # sync grpcio reads these off the behaviour
            setattr(relayed, attribute, getattr(behavior, attribute))
    made = factory(
        relayed,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if aio and sync:
        return _Relayed(handler, made, field, relayed)
    return _Relayed(handler, made)


class _Wrapper:
    """The wrapped handlers, made once per (handler, method); bounded."""

    __slots__ = ("_cache", "settings")

    _MAX = 4096

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self._cache: dict[tuple[int, str], _Relayed] = {}

    def entry(self, handler: Any, method: str, aio: bool) -> _Relayed:
        key = (id(handler), method)
        entry = self._cache.get(key)
        if entry is not None and entry.source is handler:
            return entry
        entry = _wrapped(self.settings, handler, method, aio)
        cache = self._cache
        if len(cache) >= self._MAX:
            cache.clear()  # a generic handler that makes a new handler per call
        cache[key] = entry  # keeps handler alive: its id stays its own
        return entry

    def __call__(self, handler: Any, method: str, aio: bool) -> Any:
        """The handler to run for one call (from the call's task on grpc.aio)."""
        if handler is None:
            return None
        entry = self.entry(handler, method, aio)
        if entry.relayed is not None:
            return _aio_watched(entry)
        return entry.handler


def _settings(
    header_name: str | None, validator: RequestIdValidator | None, echo: bool, log_errors: bool
) -> _Settings:
    return _Settings(Door(header_name, validator), bool(echo), bool(log_errors))


class ServerInterceptor(grpc.ServerInterceptor):
    """Binds each call's ``Context`` where a sync ``grpc.server`` runs its handler.

    ``grpc.server(pool, interceptors=[ServerInterceptor()])``.
    :func:`relay_server` does the same without grpcio's interceptor
    pipeline, and is the recommended form.  For every
    arity the handler sees its call's request id (the inbound
    ``x-request-id`` metadata when valid, else a new one), the fields the
    policy extracts from the metadata and ``ctxrelay.request()``, a
    snapshot: method ``POST``, scheme ``grpc``, path the full method name
    (``/pkg.Service/Method``), client the peer, headers the text metadata.
    Reset by token on return, abort, exception and cancellation.  A call
    the client cancels while the handler runs marks its request cancelled.

    ``header_name`` / ``validator``
        As for the web middleware (default: the policy's ``x-request-id``,
        1-128 characters of ``A-Z a-z 0-9 . _ : -``).
    ``echo``
        Send the request id back in the initial metadata.  Costs one more
        send per call (grpcio sends initial metadata with the response
        otherwise); ``echo=False`` saves it.
    ``log_errors``
        Log an exception that escapes the handler (not an ``abort``) on
        logger ``ctxrelay.grpc`` while the context is still bound.
    """

    def __init__(
        self,
        *,
        header_name: str | None = None,
        validator: RequestIdValidator | None = None,
        echo: bool = True,
        log_errors: bool = True,
    ) -> None:
        self._wrap = _Wrapper(_settings(header_name, validator, echo, log_errors))

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        # grpc #37881, #41863: nothing is bound here -- grpcio runs the handler
        # later, on its pool -- the wrapped behaviour binds where it runs.
        return self._wrap(
            continuation(handler_call_details), handler_call_details.method, aio=False
        )


class AioServerInterceptor(grpc.aio.ServerInterceptor):
    """:class:`ServerInterceptor` for ``grpc.aio.server(interceptors=[...])``.

    Async handlers (coroutines, async generators, ``context.write()``
    streams) run bound in the call's task; sync handlers, which grpc.aio runs
    in an executor thread that copies no context (grpc #37881), are bound in
    that thread.  Same options as :class:`ServerInterceptor`.
    """

    def __init__(
        self,
        *,
        header_name: str | None = None,
        validator: RequestIdValidator | None = None,
        echo: bool = True,
        log_errors: bool = True,
    ) -> None:
        self._wrap = _Wrapper(_settings(header_name, validator, echo, log_errors))

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        # grpc #37881: a sync handler runs in an executor thread that copies no
        # context from this task, so nothing is bound here: the wrapped
        # behaviour binds where grpc.aio runs it.
        return self._wrap(handler, handler_call_details.method, aio=True)


# -- server: relaying at registration (no interceptor) ----------------------------
class _RelayGeneric(grpc.GenericRpcHandler):
    """A generic handler whose handlers come out wrapped (once each)."""

    __slots__ = ("_aio", "_inner", "_wrap")

    def __init__(self, inner: grpc.GenericRpcHandler, wrap: _Wrapper, aio: bool) -> None:
        self._inner = inner
        self._wrap = wrap
        self._aio = aio

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._wrap(handler, handler_call_details.method, self._aio)


def _registered(
    wrap: _Wrapper, service_name: str, method_handlers: Mapping[str, Any], aio: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``method_handlers`` wrapped once, and those that must stay generic.

    On ``grpc.aio`` a sync behaviour needs the call's task to watch for
    the client's cancel (:func:`_aio_watched`), which only a generic
    handler sees: those are served through one instead (the same handler
    object; grpc tries registered methods first, then generic ones).
    """
    registered: dict[str, Any] = {}
    generic: dict[str, Any] = {}
    for name, handler in method_handlers.items():
        entry = wrap.entry(handler, f"/{service_name}/{name}", aio)
        if entry.relayed is not None:
            generic[name] = handler
        else:
            registered[name] = entry.handler
    return registered, generic


class _RelayServer(grpc.Server):
    """A sync ``grpc.Server`` whose registered handlers bind their call's context."""

    def __init__(self, server: grpc.Server, wrap: _Wrapper) -> None:
        self._server = server
        self._wrap = wrap

    @property
    def wrapped(self) -> grpc.Server:
        """The server itself."""
        return self._server

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_RelayGeneric(h, self._wrap, False) for h in generic_rpc_handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        registered, _ = _registered(self._wrap, service_name, method_handlers, False)
        self._server.add_registered_method_handlers(service_name, registered)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None) -> Any:
        return self._server.stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def __getattr__(self, name: str) -> Any:
        if name == "_server":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self._server, name)


class _AioRelayServer(grpc.aio.Server):
    """:class:`_RelayServer` for a ``grpc.aio.Server``."""

    def __init__(self, server: grpc.aio.Server, wrap: _Wrapper) -> None:
        self._server = server
        self._wrap = wrap

    @property
    def wrapped(self) -> grpc.aio.Server:
        """The server itself."""
        return self._server

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_RelayGeneric(h, self._wrap, True) for h in generic_rpc_handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        registered, generic = _registered(self._wrap, service_name, method_handlers, True)
        if registered:
            self._server.add_registered_method_handlers(service_name, registered)
        if generic:
            self.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service_name, generic),)
            )

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)

    def __getattr__(self, name: str) -> Any:
        if name == "_server":
            raise AttributeError(name)
        return getattr(self._server, name)


@overload
def relay_server(
    server: grpc.aio.Server,
    *,
    header_name: str | None = ...,
    validator: RequestIdValidator | None = ...,
    echo: bool = ...,
    log_errors: bool = ...,
) -> grpc.aio.Server: ...
@overload
def relay_server(
    server: grpc.Server,
    *,
    header_name: str | None = ...,
    validator: RequestIdValidator | None = ...,
    echo: bool = ...,
    log_errors: bool = ...,
) -> grpc.Server: ...
def relay_server(
    server: grpc.Server | grpc.aio.Server,
    *,
    header_name: str | None = None,
    validator: RequestIdValidator | None = None,
    echo: bool = True,
    log_errors: bool = True,
) -> grpc.Server | grpc.aio.Server:
    """The server, relaying: every handler registered through the returned
    object binds its call's context.  The recommended form.

    ``server = relay_server(grpc.server(pool))`` (or ``grpc.aio.server()``),
    then register services on ``server`` as usual -- generated
    ``add_..._to_server(servicer, server)``, ``add_generic_rpc_handlers``,
    ``add_registered_method_handlers`` -- and start, stop and add ports
    through it.  Each handler's behaviour is wrapped once, when it is
    registered (a generic handler's, the first time it answers for a
    method), so a call costs one wrapper and no interceptor pipeline:
    what :class:`ServerInterceptor` does, without grpcio's interceptor
    machinery, which by itself costs more than the rest of ctxrelay's
    server side.  Handlers added to ``server`` itself, not through the
    returned object, are not relayed.

    The handler sees what :class:`ServerInterceptor` gives it; the options
    are its options.  A call the client cancels (or that ends otherwise
    before its handler) marks the handler's request cancelled:
    ``ctxrelay.cancelled()`` turns true, ``ctxrelay.checkpoint()`` raises
    ``RequestCancelled`` and pool tasks not started yet are not run.
    Interceptors given to the server still run, outside the relayed
    handlers.
    """
    wrap = _Wrapper(_settings(header_name, validator, echo, log_errors))
    if isinstance(server, grpc.aio.Server):
        return _AioRelayServer(server, wrap)
    if isinstance(server, grpc.Server):
        return _RelayServer(server, wrap)
    raise TypeError(f"relay_server() takes a grpc.Server or grpc.aio.Server, not {server!r}")
