"""The immutable ``Context`` value, field validation, and the one ``ContextVar``.

Property tests pin the algebra users rely on (``set``/``remove`` are pure,
last write wins, equality and hashing agree); example tests pin the scopes
(``bind``/``use`` restore exactly what was there, whatever the block does).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import pickle
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxrelay
from ctxrelay import Context, RequestSnapshot, bind, current, use
from ctxrelay._context import MAX_VALUE_BYTES, sanitize, validate_field
from tests.strategies import (
    BAD_VALUE_CHARS,
    NAME_CHARS,
    anything,
    contexts,
    contexts_with_request,
    field_dicts,
    field_names,
    field_values,
    invalid_names,
    request_snapshots,
)

FEW = settings(max_examples=60, deadline=None)


# -- immutability ----------------------------------------------------------------


def test_context_rejects_item_assignment_and_deletion() -> None:
    ctx = Context(user="ada")
    with pytest.raises(TypeError):
        ctx["user"] = "eve"  # type: ignore[index]
    with pytest.raises(TypeError):
        del ctx["user"]  # type: ignore[attr-defined]
    assert dict(ctx) == {"user": "ada"}


def test_context_rejects_attribute_assignment_and_deletion() -> None:
    ctx = Context(user="ada")
    snapshot = RequestSnapshot(path="/x")
    with pytest.raises(AttributeError):
        ctx.request = snapshot  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ctx.user = "eve"  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        ctx.set = lambda *a, **k: ctx  # type: ignore[method-assign]
    with pytest.raises(AttributeError):
        del ctx.request
    assert ctx.request is None
    assert dict(ctx) == {"user": "ada"}


@FEW
@given(contexts_with_request, field_dicts, st.lists(field_names, max_size=4))
def test_set_and_remove_return_new_values_and_leave_the_original_unchanged(
    ctx: Context, fields: dict[str, str], names: list[str]
) -> None:
    before, before_request = dict(ctx), ctx.request
    added = ctx.set(fields)
    removed = ctx.remove(*names)
    assert added is not ctx
    assert removed is not ctx
    assert dict(ctx) == before
    assert ctx.request is before_request
    assert added.request is before_request
    assert removed.request is before_request


def test_a_context_built_from_a_dict_does_not_see_later_changes_to_it() -> None:
    # starlette-context's hole: a context sharing a mutable dict by reference.
    source = {"user": "ada"}
    ctx = Context(source)
    source["user"] = "eve"
    source["tenant"] = "t9"
    assert dict(ctx) == {"user": "ada"}


# -- set / remove algebra ----------------------------------------------------------


@FEW
@given(contexts_with_request, field_dicts)
def test_set_then_remove_of_the_same_new_names_gives_back_the_original(
    ctx: Context, fields: dict[str, str]
) -> None:
    new = {name: value for name, value in fields.items() if name not in ctx}
    back = ctx.set(new).remove(*new)
    assert back == ctx
    assert back.request == ctx.request
    assert hash(back) == hash(ctx)


@FEW
@given(contexts, field_dicts, field_dicts)
def test_set_is_last_write_wins(
    ctx: Context, first: dict[str, str], second: dict[str, str]
) -> None:
    result = ctx.set(first).set(second)
    assert result == {**ctx, **first, **second}
    assert result == ctx.set({**first, **second})
    for name, value in second.items():
        assert result[name] == value


@FEW
@given(field_names, field_values, field_values)
def test_set_keywords_win_over_the_positional_mapping(
    name: str, positional: str, keyword: str
) -> None:
    assert Context().set({"user": positional}, user=keyword)["user"] == keyword
    assert Context().set({name: positional})[name] == positional


@FEW
@given(contexts_with_request, st.lists(field_names, max_size=5))
def test_remove_of_absent_names_is_identity(ctx: Context, names: list[str]) -> None:
    absent = [name for name in names if name not in ctx]
    result = ctx.remove(*absent)
    assert result == ctx
    assert result.request == ctx.request
    assert list(result) == list(ctx)


@FEW
@given(contexts, st.data())
def test_remove_drops_exactly_the_named_fields(ctx: Context, data: st.DataObject) -> None:
    names = data.draw(st.lists(st.sampled_from(list(ctx) or ["absent"]), unique=True))
    result = ctx.remove(*names)
    assert result == {name: value for name, value in ctx.items() if name not in names}


@FEW
@given(field_dicts, st.randoms(use_true_random=False))
def test_equal_contexts_hash_equal_whatever_the_insertion_order(
    fields: dict[str, str], rng: random.Random
) -> None:
    items = list(fields.items())
    rng.shuffle(items)
    a, b = Context(fields), Context(items)
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1


@FEW
@given(field_dicts, request_snapshots)
def test_context_equals_a_dict_with_the_same_fields(
    fields: dict[str, str], snapshot: RequestSnapshot
) -> None:
    ctx = Context(fields)
    assert ctx == fields
    assert fields == ctx
    assert ctx.with_request(snapshot) == fields
    assert ctx != {**fields, "__other": "x"}
    assert (ctx != fields) is False


@FEW
@given(contexts, field_names, field_values)
def test_contexts_differing_in_one_field_are_unequal(ctx: Context, name: str, value: str) -> None:
    changed = ctx.set({name: value + "!"})
    assert changed != ctx
    assert changed != dict(ctx)


@FEW
@given(contexts, request_snapshots)
def test_the_request_snapshot_takes_part_in_equality_and_hashing(
    ctx: Context, snapshot: RequestSnapshot
) -> None:
    with_request = ctx.with_request(snapshot)
    assert with_request != ctx
    assert with_request == Context(dict(ctx)).with_request(snapshot)
    assert hash(with_request) == hash(Context(dict(ctx)).with_request(snapshot))
    assert with_request.with_request(None) == ctx


def test_context_is_not_equal_to_non_mappings() -> None:
    ctx = Context(a="1")
    assert ctx != [("a", "1")]
    assert ctx != "a"
    assert ctx != None  # noqa: E711


def test_with_request_rejects_what_is_not_a_snapshot() -> None:
    with pytest.raises(TypeError, match="RequestSnapshot"):
        Context().with_request({"path": "/"})  # type: ignore[arg-type]


def test_context_reads_like_a_mapping() -> None:
    ctx = Context({"x-gray": "on"}, user="ada")
    assert ctx["user"] == "ada"
    assert ctx.get("x-gray") == "on"
    assert ctx.get("missing") is None
    assert ctx.get("missing", "d") == "d"
    assert "user" in ctx
    not_a_name: object = 1
    assert not_a_name not in ctx
    assert len(ctx) == 2
    assert sorted(ctx) == ["user", "x-gray"]
    with pytest.raises(KeyError):
        ctx["missing"]


# -- pickling and copying ------------------------------------------------------


@FEW
@given(contexts_with_request)
def test_pickling_round_trips_fields_and_request(ctx: Context) -> None:
    back = pickle.loads(pickle.dumps(ctx))
    assert isinstance(back, Context)
    assert back == ctx
    assert back.request == ctx.request
    assert hash(back) == hash(ctx)


def test_unpickling_drops_tampered_fields_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # _make trusts its input, so it can build what a hostile process would send.
    tampered = Context._make(
        {
            "user": "ada",
            "bad name": "x",
            "split": "a\r\nInjected: 1",
            "big": "x" * (MAX_VALUE_BYTES + 1),
            "num": 7,  # type: ignore[dict-item]
        },
        None,
    )
    payload = pickle.dumps(tampered)
    with caplog.at_level(logging.WARNING, logger="ctxrelay"):
        back = pickle.loads(payload)
    assert back == {"user": "ada"}
    dropped = [r.getMessage() for r in caplog.records if r.name == "ctxrelay"]
    assert len(dropped) == 4
    for name in ("bad name", "split", "big", "num"):
        assert any(repr(name) in message for message in dropped), name


def test_unpickling_drops_a_request_that_is_not_a_snapshot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tampered = Context._make({"user": "ada"}, "GET /admin")  # type: ignore[arg-type]
    payload = pickle.dumps(tampered)
    with caplog.at_level(logging.WARNING, logger="ctxrelay"):
        back = pickle.loads(payload)
    assert back == {"user": "ada"}
    assert back.request is None
    assert any("str" in r.getMessage() for r in caplog.records if r.name == "ctxrelay")


@FEW
@given(contexts_with_request)
def test_copy_and_deepcopy_return_the_same_object(ctx: Context) -> None:
    assert copy.copy(ctx) is ctx
    assert copy.deepcopy(ctx) is ctx
    assert copy.deepcopy({"k": ctx})["k"] is ctx


# -- validation: names -----------------------------------------------------------


@FEW
@given(field_names, field_values)
def test_names_in_the_documented_alphabet_are_accepted(name: str, value: str) -> None:
    validate_field(name, value)
    assert Context({name: value})[name] == value
    assert Context().set({name: value})[name] == value


def test_the_name_alphabet_boundaries() -> None:
    for name in ("a", "Z", "0", "a_b.c-d", "9-x", "A" * 64):
        validate_field(name, "v")
    for name in ("", "_a", ".a", "-a", "A" * 65, "a b", "a:b", "a/b", "é", "a\n"):
        with pytest.raises(ValueError, match="invalid context field name"):
            validate_field(name, "v")


@FEW
@given(invalid_names())
def test_every_name_outside_the_alphabet_raises_value_error_naming_it(name: str) -> None:
    for attempt in (
        lambda: validate_field(name, "v"),
        lambda: Context({name: "v"}),
        lambda: Context().set({name: "v"}),
        lambda: bind({name: "v"}),
    ):
        with pytest.raises(ValueError, match="invalid context field name") as info:
            attempt()
        assert repr(name) in str(info.value)


@FEW
@given(st.text(max_size=70))
def test_a_name_is_valid_exactly_when_it_matches_the_documented_rule(name: str) -> None:
    documented = (
        1 <= len(name) <= 64 and name[0] not in "_.-" and all(ch in NAME_CHARS for ch in name)
    )
    try:
        validate_field(name, "v")
    except ValueError:
        assert not documented
    else:
        assert documented


@pytest.mark.parametrize("name", [1, b"user", None, ("a",), 1.5])
def test_non_str_names_raise_type_error(name: object) -> None:
    with pytest.raises(TypeError, match="names are str"):
        validate_field(name, "v")
    with pytest.raises(TypeError):
        Context({name: "v"})  # type: ignore[arg-type]


# -- validation: values --------------------------------------------------------


@pytest.mark.parametrize("value", [1, b"ada", None, ["a"], 1.5])
def test_non_str_values_raise_type_error_naming_the_field(value: object) -> None:
    with pytest.raises(TypeError, match="'user'"):
        validate_field("user", value)
    with pytest.raises(TypeError, match="'user'"):
        Context(user=value)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'user'"):
        Context().set(user=value)  # type: ignore[arg-type]


@FEW
@given(field_names, field_values, st.sampled_from(BAD_VALUE_CHARS), st.data())
def test_values_with_a_control_character_raise_value_error_naming_the_field(
    name: str, value: str, bad: str, data: st.DataObject
) -> None:
    at = data.draw(st.integers(min_value=0, max_value=len(value)))
    hostile = value[:at] + bad + value[at:]
    with pytest.raises(ValueError, match="control character") as info:
        validate_field(name, hostile)
    assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="control character"):
        Context({name: hostile})


@pytest.mark.parametrize("bad", ["\r", "\n", "\x00", "\r\n", "\x1b[31m", "\x7f"])
def test_cr_lf_nul_escape_and_del_are_rejected_in_values(bad: str) -> None:
    with pytest.raises(ValueError, match="'note'"):
        validate_field("note", f"a{bad}b")


def test_tab_is_allowed_in_values() -> None:
    assert Context(note="a\tb")["note"] == "a\tb"


@pytest.mark.parametrize("lone", [chr(0xD800), chr(0xDFFF), f"a{chr(0xDC80)}b"])
def test_a_lone_surrogate_is_not_utf8_so_the_value_is_rejected(
    lone: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A JSON message header may decode "\ud800" to a lone surrogate: no
    # UTF-8 encoding exists, so it could not be logged to a file or sent.
    with pytest.raises(ValueError, match="'note'"):
        validate_field("note", lone)
    with caplog.at_level(logging.WARNING, logger="ctxrelay"):
        assert sanitize([("note", lone), ("user", "ada")], source="a message") == {"user": "ada"}


@pytest.mark.parametrize(
    ("char", "width"), [("a", 1), ("é", 2), ("€", 3), ("😀", 4)], ids=["1B", "2B", "3B", "4B"]
)
def test_the_value_cap_counts_utf8_bytes_not_characters(char: str, width: int) -> None:
    fits = char * (MAX_VALUE_BYTES // width)
    validate_field("v", fits)
    over = fits + char
    assert len(over.encode()) > MAX_VALUE_BYTES
    if width > 1:  # len() alone would let these through
        assert len(over) <= MAX_VALUE_BYTES
    with pytest.raises(ValueError, match=f"longer than {MAX_VALUE_BYTES} bytes") as info:
        validate_field("v", over)
    assert "'v'" in str(info.value)


@FEW
@given(
    st.sampled_from(["a", "é", "€", "😀"]),
    st.integers(min_value=-3, max_value=3),
    st.text(alphabet="ab€", max_size=6),
)
def test_a_value_is_accepted_exactly_when_it_fits_in_the_byte_cap(
    char: str, offset: int, prefix: str
) -> None:
    value = prefix + char * (MAX_VALUE_BYTES // len(char.encode()) + offset)
    fits = len(value.encode()) <= MAX_VALUE_BYTES
    try:
        validate_field("v", value)
    except ValueError:
        assert not fits
    else:
        assert fits


# -- sanitize ----------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.tuples(field_names, field_values),
            st.tuples(st.one_of(field_names, anything), st.one_of(field_values, anything)),
            anything,
        ),
        max_size=12,
    )
)
def test_sanitize_never_raises_and_keeps_exactly_the_valid_fields(entries: list[object]) -> None:
    result = sanitize(entries, source="a test")  # type: ignore[arg-type]
    expected: dict[str, str] = {}
    for entry in entries:
        if isinstance(entry, (tuple, list)) and len(entry) == 2:
            try:
                validate_field(entry[0], entry[1])
            except (TypeError, ValueError):
                continue
            expected[entry[0]] = entry[1]
    assert result == expected
    for name, value in result.items():
        validate_field(name, value)


@pytest.mark.parametrize("fields", [None, 42, object()])
def test_sanitize_of_something_not_iterable_returns_no_fields(fields: object) -> None:
    assert sanitize(fields, source="a test") == {}  # type: ignore[arg-type]


def test_sanitize_logs_a_warning_per_dropped_field_naming_its_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="ctxrelay"):
        kept = sanitize(
            [("user", "ada"), ("bad name", "x"), ("tenant", "a\nb"), ("x", 1)],
            source="a message header",
        )
    assert kept == {"user": "ada"}
    messages = [r.getMessage() for r in caplog.records if r.name == "ctxrelay"]
    assert len(messages) == 3
    assert all("a message header" in m for m in messages)
    assert all(r.levelno == logging.WARNING for r in caplog.records)


# -- current / get / request_id / request ----------------------------------------


def test_outside_any_scope_current_is_empty() -> None:
    assert ctxrelay.current() == {}
    assert ctxrelay.get("user") is None
    assert ctxrelay.get("user", "anon") == "anon"
    assert ctxrelay.request_id() is None
    assert ctxrelay.request() is None


def test_inside_bind_the_accessors_read_the_bound_fields() -> None:
    with bind(request_id="r-1", user="ada") as ctx:
        assert current() is ctx
        assert ctxrelay.request_id() == "r-1"
        assert ctxrelay.get("user") == "ada"
        assert ctxrelay.get("tenant", "none") == "none"
    assert ctxrelay.request_id() is None


# -- bind ----------------------------------------------------------------------------


def test_bind_nests_and_restores_exactly() -> None:
    outer_before = current()
    with bind(request_id="r-1", user="ada") as outer:
        assert current() == {"request_id": "r-1", "user": "ada"}
        with bind({"x-gray": "on"}, user="bob") as inner:
            assert current() is inner
            assert inner == {"request_id": "r-1", "user": "bob", "x-gray": "on"}
        assert current() is outer
    assert current() is outer_before


def test_bind_keeps_the_request_snapshot_of_the_enclosing_context() -> None:
    snapshot = RequestSnapshot(method="POST", path="/orders")
    with use(Context(request_id="r-1").with_request(snapshot)):
        with bind(user="ada") as ctx:
            assert ctx.request is snapshot
            assert ctxrelay.request() is snapshot
        assert ctxrelay.request() is snapshot
    assert ctxrelay.request() is None


def _bind_each_level(levels: list[dict[str, str]], expected: dict[str, str]) -> None:
    if not levels:
        return
    before = current()
    with bind(levels[0]) as ctx:
        merged = {**expected, **levels[0]}
        assert ctx == merged
        assert current() is ctx
        _bind_each_level(levels[1:], merged)
        assert current() is ctx
    assert current() is before


@FEW
@given(st.lists(field_dicts, min_size=1, max_size=6))
def test_nested_binds_merge_and_each_exit_restores_the_level_below(
    levels: list[dict[str, str]],
) -> None:
    before = current()
    _bind_each_level(levels, {})
    assert current() is before


def test_bind_restores_even_when_the_block_raises() -> None:
    before = current()
    with pytest.raises(RuntimeError, match="boom"), bind(user="ada"):
        with bind(tenant="t1"):
            raise RuntimeError("boom")
    assert current() is before


def test_bind_validates_at_the_call_site_before_entering() -> None:
    before = current()
    with pytest.raises(ValueError, match="'x y'"):
        bind({"x y": "1"})
    with pytest.raises(ValueError, match="'note'"):
        bind(note="a\r\nb")
    with pytest.raises(TypeError, match="'user'"):
        bind(user=1)  # type: ignore[arg-type]
    assert current() is before


def test_a_scope_entered_twice_at_once_raises_and_the_first_entry_still_restores() -> None:
    before = current()
    scope = bind(user="ada")
    with scope as ctx:
        with pytest.raises(RuntimeError, match="already entered"):
            scope.__enter__()
        assert current() is ctx
    assert current() is before


def test_use_rejects_what_is_not_a_context() -> None:
    with pytest.raises(TypeError, match="Context"):
        use({"user": "ada"})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        use(None)  # type: ignore[arg-type]


@FEW
@given(contexts_with_request)
def test_use_makes_exactly_that_context_current_and_restores_after(ctx: Context) -> None:
    before = current()
    with bind(user="outer"), use(ctx) as entered:
        assert entered is ctx
        assert current() is ctx
        assert ctxrelay.request() is ctx.request
        assert ctxrelay.request_id() == ctx.get("request_id")
        # use() replaces, it does not merge with what was bound around it
        assert ctxrelay.get("user") == ctx.get("user")
    assert current() is before


def test_use_restores_when_the_block_raises() -> None:
    before = current()
    with pytest.raises(KeyError), use(Context(user="ada")):
        raise KeyError("x")
    assert current() is before


# -- isolation between concurrent work ---------------------------------------------


def test_concurrent_asyncio_tasks_each_see_only_their_own_request_id() -> None:
    tasks_count, awaits = 200, 5

    async def handle(i: int, all_bound: asyncio.Event, started: list[int]) -> list[str | None]:
        seen: list[str | None] = []
        with bind(request_id=f"req-{i}", user=f"user-{i}"):
            started.append(i)
            if len(started) == tasks_count:
                all_bound.set()
            await all_bound.wait()  # every task is inside its bind at once
            for _ in range(awaits):
                await asyncio.sleep(0)
                seen.append(ctxrelay.request_id())
                assert ctxrelay.get("user") == f"user-{i}"
        seen.append(ctxrelay.request_id())  # restored inside the task
        return seen

    async def main() -> list[list[str | None]]:
        all_bound = asyncio.Event()
        started: list[int] = []
        with bind(request_id="outer"):
            results = await asyncio.gather(
                *(handle(i, all_bound, started) for i in range(tasks_count))
            )
            assert ctxrelay.request_id() == "outer"
        return results

    results = asyncio.run(main())
    for i, seen in enumerate(results):
        assert seen == [f"req-{i}"] * awaits + ["outer"]
    assert ctxrelay.request_id() is None


def test_concurrent_threads_each_see_only_their_own_fields() -> None:
    threads_count = 32
    barrier = threading.Barrier(threads_count, timeout=30)
    seen: dict[int, list[str | None]] = {}

    def work(i: int) -> None:
        mine: list[str | None] = []
        with bind(request_id=f"req-{i}"):
            barrier.wait()
            for _ in range(50):
                mine.append(ctxrelay.request_id())
            barrier.wait()
        mine.append(ctxrelay.request_id())
        seen[i] = mine

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(seen) == list(range(threads_count))
    for i, mine in seen.items():
        assert mine == [f"req-{i}"] * 50 + [None]


def test_the_empty_context_is_the_documented_default() -> None:
    assert isinstance(current(), Context)
    assert len(current()) == 0
    assert current().request is None


@pytest.mark.ctxrelay_expect_reports
def test_a_scope_exited_in_another_context_leaves_that_context_as_it_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # FastAPI runs the two halves of a sync generator dependency in separate
    # copies of the context: the token cannot reset there, and writing the
    # saved value into the second copy would be writing into foreign work.
    import contextvars

    scope = bind(user="alice")
    first = contextvars.copy_context()
    first.run(scope.__enter__)
    assert first.run(current) == {"user": "alice"}
    second = first.copy()
    second.run(bind(tenant="t2").__enter__)
    before = second.run(current)
    second.run(scope.__exit__, None, None, None)
    assert second.run(current) is before
    assert "exited in another context" in caplog.text


def test_bind_decorates_functions_and_coroutines_binding_afresh_each_call() -> None:
    import asyncio

    @bind(job="nightly")
    def run(n: int) -> tuple[str | None, int]:
        return ctxrelay.get("job"), n

    @bind(job="async")
    async def arun() -> str | None:
        return ctxrelay.get("job")

    with bind(user="alice"):
        assert run(1) == ("nightly", 1)
        assert asyncio.run(arun()) == "async"
        assert ctxrelay.get("user") == "alice"
        assert ctxrelay.get("job") is None
    results: list[str | None] = []
    threads = [threading.Thread(target=lambda: results.append(run(0)[0])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["nightly"] * 8  # one decorated function, many threads at once
    assert run.__name__ == "run"
    with pytest.raises(TypeError, match="callable"):
        bind(x="1")("not callable")  # type: ignore[arg-type]


def test_get_with_a_str_default_is_typed_and_answers_a_str() -> None:
    value: str = ctxrelay.get("missing", "fallback")
    assert value == "fallback"
    assert ctxrelay.get("missing", default="d") == "d"
