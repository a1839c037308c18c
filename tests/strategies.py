"""Hypothesis strategies shared by the test suite.

One module, as attrs keeps it: a strategy describes a kind of input once, and
every test that needs that input draws from here.  Append new strategies at
the end, each with a line saying what it generates and why.
"""

from __future__ import annotations

import string

from hypothesis import strategies as st

from ctxrelay import Context, RequestSnapshot
from ctxrelay._context import MAX_NAME_LENGTH

# -- context field names and values ------------------------------------------

#: The documented name alphabet: ``A-Z a-z 0-9 _ . -``, first character a
#: letter or digit.
NAME_FIRST_CHARS = string.ascii_letters + string.digits
NAME_CHARS = NAME_FIRST_CHARS + "_.-"

#: Characters a field value may never hold: every C0 control but horizontal
#: tab, and DEL.  CR, LF and NUL among them would split a header.
BAD_VALUE_CHARS = tuple(chr(c) for c in (*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F))

#: Valid field names, every length from 1 to the maximum.
field_names = st.builds(
    str.__add__,
    st.sampled_from(NAME_FIRST_CHARS),
    st.text(alphabet=NAME_CHARS, max_size=MAX_NAME_LENGTH - 1),
)

#: Valid field values: any text without control characters (tab allowed),
#: multi-byte characters included, short enough to stay far below the cap.
field_values = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Cc"), include_characters="\t"),
    max_size=40,
)

#: Valid field mappings, as a context's fields.
field_dicts = st.dictionaries(field_names, field_values, max_size=8)

#: Characters outside the name alphabet (any code point but surrogates).
non_name_chars = st.characters(exclude_categories=["Cs"]).filter(lambda ch: ch not in NAME_CHARS)


@st.composite
def invalid_names(draw: st.DrawFn) -> str:
    """Strings that break the name rules in exactly one of the ways there are."""
    kind = draw(st.sampled_from(["outside-alphabet", "bad-first", "too-long", "empty"]))
    if kind == "empty":
        return ""
    if kind == "too-long":
        extra = draw(st.integers(min_value=1, max_value=64))
        return draw(st.sampled_from(NAME_FIRST_CHARS)) * (MAX_NAME_LENGTH + extra)
    if kind == "bad-first":
        return draw(st.sampled_from("_.-")) + draw(st.text(alphabet=NAME_CHARS, max_size=10))
    # one character outside the alphabet, anywhere in an otherwise valid name
    name = draw(field_names)[: MAX_NAME_LENGTH - 1]
    at = draw(st.integers(min_value=0, max_value=len(name)))
    return name[:at] + draw(non_name_chars) + name[at:]


#: Contexts with up to eight valid fields and no request snapshot.
contexts = st.builds(Context, field_dicts)

# -- request snapshots ---------------------------------------------------------

#: HTTP token characters for header names (what a real server lets through).
header_names = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1).filter(
    lambda name: name not in ("host", "cookie")
)

#: Header values as servers hand them over: latin-1 text without controls.
header_values = st.text(
    alphabet=st.characters(
        max_codepoint=0xFF, exclude_categories=("Cs", "Cc"), include_characters="\t"
    ),
    max_size=40,
)

#: Clean header lines, repeated names allowed.
header_lines = st.lists(st.tuples(header_names, header_values), max_size=12)

#: Request snapshots built from clean parts, some with cookies.
request_snapshots = st.builds(
    RequestSnapshot,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    scheme=st.sampled_from(["http", "https", "ws", "wss"]),
    host=st.sampled_from(["", "shop.example", "127.0.0.1:8000"]),
    path=st.text(max_size=20).map(lambda p: "/" + p),
    query=st.text(alphabet=string.ascii_letters + "=&%", max_size=20),
    client=st.one_of(st.none(), st.just("10.0.0.7:51234")),
    headers=st.builds(
        list.__add__,
        header_lines,
        st.lists(
            st.tuples(
                st.just("cookie"),
                st.dictionaries(
                    st.text(alphabet=string.ascii_letters, min_size=1, max_size=6),
                    st.text(alphabet=string.ascii_letters + string.digits, max_size=6),
                    max_size=3,
                ).map(lambda d: "; ".join(f"{k}={v}" for k, v in d.items())),
            ),
            max_size=2,
        ),
    ),
)

#: Contexts that also carry a request snapshot.
contexts_with_request = st.builds(
    lambda fields, snapshot: Context(fields).with_request(snapshot),
    field_dicts,
    st.one_of(st.none(), request_snapshots),
)

# -- hostile input ---------------------------------------------------------------

#: Arbitrary plain objects: what a tampered pickle, a message header or a
#: buggy server may hand over where strings are expected.
anything = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=20),
        st.binary(max_size=20),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.tuples(inner, inner), st.tuples(inner, inner, inner)
    ),
    max_leaves=6,
)

#: Strings that mostly look like names and values, with hostile characters
#: mixed in: control characters, separators, multi-byte text.
hostile_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(NAME_CHARS + " :;=\"'"),
        st.sampled_from(BAD_VALUE_CHARS),
        st.characters(exclude_categories=["Cs"]),
    ),
    max_size=30,
)

#: Raw header bytes: hostile text encoded as a server might, or random bytes.
hostile_header_bytes = st.one_of(
    hostile_text.map(lambda s: s.encode("utf-8")),
    st.binary(max_size=30),
    # sizes around the per-value cap
    st.integers(min_value=8180, max_value=8200).map(lambda n: b"v" * n),
)

#: ASGI header lists a buggy server or a test could build: well-formed pairs
#: of hostile bytes mixed with entries that are not pairs of bytes at all.
hostile_asgi_headers = st.lists(
    st.one_of(
        st.tuples(hostile_header_bytes, hostile_header_bytes),
        st.lists(hostile_header_bytes, min_size=2, max_size=2),
        anything,
    ),
    max_size=40,
)

#: WSGI environ entries with hostile names and values (``HTTP_*`` mostly).
_ENVIRON_KEYS = (
    "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE",
    "CONTENT_LENGTH", "SERVER_NAME", "SERVER_PORT", "REMOTE_ADDR", "REMOTE_PORT",
    "HTTP_HOST", "HTTP_COOKIE", "wsgi.url_scheme",
)  # fmt: skip
hostile_environ = st.dictionaries(
    st.one_of(
        st.sampled_from(_ENVIRON_KEYS), hostile_text.map(lambda s: "HTTP_" + s), hostile_text
    ),
    st.one_of(
        hostile_header_bytes.map(lambda b: b.decode("latin-1")),
        anything,
    ),
    max_size=40,
)
