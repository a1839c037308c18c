"""OpenTelemetry: chosen ctxrelay fields on every span started under a context.

:class:`ContextSpanProcessor` is a span processor for OpenTelemetry's SDK::

    from opentelemetry.sdk.trace import TracerProvider
    from ctxrelay.integrations.opentelemetry import ContextSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(ContextSpanProcessor())            # request_id only
    provider.add_span_processor(BatchSpanProcessor(exporter))

When a span starts, the fields the processor was built with are copied from
the ctxrelay context current there onto the span, as attributes: with the
defaults, ``ctxrelay.request_id``.  Span attributes are exported -- to a
collector, a vendor, whoever reads the traces -- so **which fields is your
choice, made once**: the default is the request id alone; name more
(``ContextSpanProcessor(["request_id", "tenant"])``) or choose the attribute
names (``ContextSpanProcessor({"enduser.id": "user"})``).  A sensitive field
(``cookie``, ``authorization``, the names of :class:`ctxrelay.Policy`) cannot
be chosen; one the policy comes to call sensitive later is sent as ``***``,
and a field the policy keeps ``local`` never -- the logs' masking rule
(``ctxrelay._logfields.masked_fields``), applied per context.

Cheap: the field list is fixed at construction, the attributes are prepared
once per context (the logs' per-context memo), so a span costs one
``ContextVar`` read, two identity checks and -- inside a request -- one
``set_attribute`` call per chosen field.  Outside any request nothing is set.
The attributes are set when the span starts, over any of the same name it
was started with (the default ``ctxrelay.`` prefix keeps them apart from
other instrumentations'); code holding the span may set them again later.

It reads the context where the span *starts* (the thread, task or worker
that starts it: wherever ctxrelay relayed the context to).  A span started
before ctxrelay's door binds the request -- a server span of a tracing
middleware placed outside ``RelayMiddleware`` -- gets nothing: put the door
outermost.

The extra ``opentelemetry`` installs ``opentelemetry-api`` (what the core's
trace interop reads) and ``opentelemetry-sdk`` (the span processor's base).
That interop needs no import of this module: whenever the program has
imported OpenTelemetry, ``ctxrelay.inject`` (and so every outgoing-call
integration) writes the trace of the span that speaks for the context, in
the formats of OpenTelemetry's global propagator -- B3, X-Ray or Jaeger when
``set_global_textmap`` or ``OTEL_PROPAGATORS`` names them (their packages
installed), W3C ``traceparent`` by default.  Propagators never write baggage
for ctxrelay: baggage leaves in ctxrelay's W3C ``baggage`` header alone,
under the policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

try:
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.opentelemetry needs opentelemetry-sdk: "
        "pip install 'ctxrelay[opentelemetry]'"
    ) from _exc

from .._context import REQUEST_ID, Context, validate_field
from .._logfields import PerContext, masked_fields
from .._policy import Policy, active

__all__ = ["DEFAULT_FIELDS", "PREFIX", "ContextSpanProcessor"]

#: What a processor built without arguments copies: the request id alone.
DEFAULT_FIELDS: Final = (REQUEST_ID,)
#: The attribute name of a field named in a list: ``ctxrelay.<field>``.
PREFIX: Final = "ctxrelay."


class ContextSpanProcessor(SpanProcessor):
    """Copies chosen fields of the current ctxrelay context onto every span
    when it starts.

    ``fields``
        Field names -- each becomes the attribute ``<prefix><field>`` -- or a
        mapping ``{attribute name: field name}``.  Default:
        :data:`DEFAULT_FIELDS`, the request id alone.  A field the context
        lacks is left out of the span.
    ``prefix``
        For field names given as a list; default :data:`PREFIX`.

    Raises ``ValueError`` for an invalid field name, an empty attribute
    name, or a field that is sensitive under the active policy (a span
    attribute is exported: a credential has no place there).
    """

    def __init__(
        self, fields: Iterable[str] | Mapping[str, str] = DEFAULT_FIELDS, *, prefix: str = PREFIX
    ) -> None:
        if isinstance(fields, str):
            fields = (fields,)
        pairs = (
            tuple(fields.items())
            if isinstance(fields, Mapping)
            else tuple((f"{prefix}{name}", name) for name in fields)
        )
        policy = active()
        for attribute, field in pairs:
            validate_field(field, "")
            if not isinstance(attribute, str) or not attribute:
                raise ValueError(f"ContextSpanProcessor: {attribute!r} is not an attribute name")
            if policy.is_sensitive(field):
                raise ValueError(
                    f"ContextSpanProcessor: {field!r} is sensitive; span attributes are "
                    "exported, and a credential must not be"
                )
        self.fields: tuple[tuple[str, str], ...] = pairs
        self._prepared: PerContext[tuple[tuple[str, str], ...]] = PerContext(self._prepare)

    def _prepare(self, ctx: Context, policy: Policy) -> tuple[tuple[str, str], ...]:
        if not ctx:
            return ()
        masked = masked_fields(ctx, policy)
        return tuple(
            (attribute, masked[field])
            for attribute, field in self.fields
            if field in masked and field not in policy.local
        )

    def on_start(self, span: Span, parent_context: OtelContext | None = None) -> None:
        """Set the chosen fields of the current context on ``span``."""
        # One set_attribute per field, not one set_attributes call: the SDK
        # cleans a mapping as a whole, 0.6 us slower for one or two values.
        for attribute, value in self._prepared.current():
            span.set_attribute(attribute, value)

    def on_end(self, span: ReadableSpan) -> None:
        """Nothing: attributes can only be set while a span is open."""

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered: always done."""
        return True

    def __repr__(self) -> str:
        return f"ContextSpanProcessor({dict(self.fields)!r})"
