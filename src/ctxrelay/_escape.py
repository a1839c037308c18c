"""The one rule for request data that reaches a log line: :func:`log_text`.

Request data is hostile.  Servers percent-decode the path, so
``GET /orders/1%0aINFO [req-admin] audit: granted`` arrives holding a
newline, and written raw into a log line it forges a whole line under
another request id (log injection, CWE-117).  Header values may hold C1
controls (the latin-1 bytes 0x80-0x9f: NEL, which ``str.splitlines()`` and
many log viewers take for a line break; CSI, which drives a terminal),
baggage and paths U+2028/U+2029, ESC sequences that rewrite a terminal, and
bidi overrides that make a terminal show a line in another order.  Context
fields are validated (no C0 control) but may still hold all but the first.

So every log path of ctxrelay that writes a value taken from a request -- the
stdlib ``ContextFilter``, the structlog processor and the loguru patcher
(they share ``masked_fields``/``request_values``), and the middlewares' own
"unhandled exception in GET <path>" lines -- passes it through
:func:`log_text`.  What it escapes, as Python string-literal escapes:

* ``\\`` as ``\\\\`` -- so the escape is reversible: a value that held the
  two characters ``\\n`` shows ``\\\\n``, one that held a newline ``\\n``;
* tab, LF, CR as ``\\t``, ``\\n``, ``\\r``; every other C0 control, DEL and
  every C1 control (U+0080-U+009F, NEL U+0085 among them) as ``\\xNN``;
* U+2028, U+2029 (line and paragraph separators), the bidi embedding,
  override and isolate controls (U+202A-U+202E, U+2066-U+2069) and lone
  surrogates (which a UTF-8 handler cannot write: the line would be lost)
  as ``\\uNNNN``.

Anything else -- letters of any script, ``"``, spaces -- is kept.  The
original comes back with
``text.encode("latin-1", "backslashreplace").decode("unicode_escape")``.

Cost: most values are printable and hold no backslash; two C-level checks
(``str.isprintable()`` and ``in``) prove it and the value is returned as it
is.  The log integrations escape once per context, not per record.
"""

from __future__ import annotations

import re

__all__ = ["escaped_values", "log_text"]

_CONTROLS = (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0))
_WIDE = (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A), *range(0xD800, 0xE000))

#: Each character escaped, and its escape.
_ESCAPES: dict[str, str] = {
    **{chr(c): f"\\x{c:02x}" for c in _CONTROLS},
    **{chr(c): f"\\u{c:04x}" for c in _WIDE},
    "\t": "\\t",
    "\n": "\\n",
    "\r": "\\r",
    "\\": "\\\\",
}
_ESCAPED = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_escape_one = _ESCAPES.__getitem__


def _replace(match: re.Match[str]) -> str:
    return _escape_one(match.group())


def log_text(value: object) -> str:
    """``value`` as it may appear in a log line: nothing in it can start a line.

    A ``str`` is escaped by the rule above (returned as it is when nothing
    needs escaping); anything else -- a broken server's scope may hold any
    object -- is shown as ``<typename>``, never converted.  Never raises.
    """
    if type(value) is str:
        # The fast check: every C0/C1 control, separator, bidi control and
        # surrogate is non-printable, so a printable str without a backslash
        # has nothing to escape.
        if value.isprintable() and "\\" not in value:
            return value
        return _ESCAPED.sub(_replace, value)
    try:
        return "<" + log_text(str(type(value).__name__)) + ">"
    except Exception:  # a metaclass that makes even the type's name fail
        return "<?>"


def escaped_values(fields: dict[str, str]) -> dict[str, str]:
    """``fields`` with every value through :func:`log_text`: ``fields`` itself
    when no value needs it, else a new dict.

    One check over all values joined: the common context -- printable values
    -- pays one ``join`` and the two checks, not a call per field.
    """
    joined = "".join(fields.values())
    if joined.isprintable() and "\\" not in joined:
        return fields
    return {name: log_text(value) for name, value in fields.items()}
