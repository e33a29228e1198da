"""The chunked JSON reader agrees with `json.loads` of the whole file: the same values, or
the same first error at the same line and column, whatever the chunk size."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from embedding_pipeline.lib.sources.json_stream import (
    STREAMED,
    JsonReadError,
    Member,
    StreamedObject,
)
from embedding_pipeline.lib.sources.telegram import load_export
from embedding_pipeline.lib.sources.values import InputFileError

BOM = b"\xef\xbb\xbf"


def whole_file(raw: bytes) -> tuple[str, ...]:
    """What reading the whole file at once says: the value (as JSON text) or the error."""
    if not raw.strip():
        return ("error", "file", "is empty")
    bom = len(BOM) if raw.startswith(BOM) else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        valid = raw[bom : bom + exc.start].decode("utf-8")
        where = f"line {valid.count(chr(10)) + 1} column {len(valid) - valid.rfind(chr(10))}"
        at = bom + exc.start
        return ("error", f"{where} (byte {at})", f"not valid UTF-8 (byte 0x{raw[at]:02x})")
    try:
        return ("value", json.dumps(json.loads(text)))
    except json.JSONDecodeError as exc:
        return ("error", f"line {exc.lineno} column {exc.colno}", f"invalid JSON: {exc.msg}")


def streamed(path: Path, chunk_chars: int) -> tuple[str, ...]:
    """The same, put back together from the streamed members and elements."""
    top: list[Any] = []
    members: dict[str, Any] = {}
    current: list[Any] = []
    try:
        for event in StreamedObject(path, "messages", chunk_chars=chunk_chars):
            if isinstance(event, Member) and event.key is None:
                top.append(event.value)
            elif isinstance(event, Member) and event.value is STREAMED:
                current = members[event.key] = []
            elif isinstance(event, Member):
                members[event.key] = event.value
            else:
                current.append(event.value)
    except JsonReadError as exc:
        return ("error", exc.position, exc.reason)
    return ("value", json.dumps(top[0] if top else members))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["messages", "id", "text", "é", ""]), children, max_size=4
        )
    ),
    max_leaves=12,
)
documents = st.one_of(
    st.fixed_dictionaries({"id": st.integers(), "messages": st.lists(json_values, max_size=5)}),
    json_values,
)
#: Edits that break a document the ways files break: brackets, quotes, separators, escapes,
#: control characters, a stray BOM or non-UTF-8 byte, a cut.
SNIPPETS = [
    *'{}[],:"\\ \n\t-.eE0',
    "\x01",
    "é",
    "\\u12",
    "\\ud800",
    "NaN",
    "tru",
    "\ufeff",
]
edits = st.lists(
    st.tuples(
        st.sampled_from(["insert", "delete", "cut", "byte"]),
        st.floats(0, 1),
        st.sampled_from(SNIPPETS),
    ),
    max_size=3,
)


def apply(text: str, changes: list[tuple[str, float, str]]) -> bytes:
    raw = text.encode()
    for kind, where, snippet in changes:
        i = int(where * len(raw))
        if kind == "insert":
            raw = raw[:i] + snippet.encode("utf-8", "surrogatepass") + raw[i:]
        elif kind == "delete":
            raw = raw[:i] + raw[i + 1 :]
        elif kind == "cut":
            raw = raw[:i]
        else:
            raw = raw[:i] + b"\xff" + raw[i:]
    return raw


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    document=documents,
    indent=st.sampled_from([None, 0, 1, 2]),
    ascii_only=st.booleans(),
    bom=st.booleans(),
    changes=edits,
    chunk_chars=st.sampled_from([1, 2, 3, 5, 16, 64, 1 << 20]),
)
# found by Hypothesis on a fresh clone: a BOM after whitespace is no BOM to `json.loads`
@example(
    document=None,
    indent=None,
    ascii_only=False,
    bom=False,
    changes=[("insert", 0.0, "\ufeff"), ("insert", 0.0, " ")],
    chunk_chars=1,
)
def test_the_streamed_file_reads_as_the_whole_file(
    tmp_path_factory, document, indent, ascii_only, bom, changes, chunk_chars
):
    text = json.dumps(document, indent=indent, ensure_ascii=ascii_only)
    raw = (BOM if bom else b"") + apply(text, changes)
    path = tmp_path_factory.mktemp("json") / "file.json"
    path.write_bytes(raw)
    assert streamed(path, chunk_chars) == whole_file(raw)


def test_a_syntax_error_anywhere_comes_before_a_bad_message(tmp_path: Path) -> None:
    """As `json.loads` of the whole file would: the JSON is checked to its end first."""
    path = tmp_path / "result.json"
    path.write_text('{"id": 1, "messages": [{"id": "x"}, {"id": 2}]]')
    with pytest.raises(
        InputFileError, match=r"line 1 column 47: invalid JSON: Expecting ',' delimiter"
    ):
        load_export(path)


def test_an_invalid_byte_anywhere_comes_before_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    path.write_bytes(b'{"id": 1,, "messages": []}\n"\xff"')
    with pytest.raises(InputFileError, match=r"line 2 column 2 \(byte 28\): not valid UTF-8"):
        load_export(path)


def message(message_id: object, **fields: object) -> dict[str, object]:
    return {"id": message_id, "type": "message", "date": "2025-09-01T09:00:00", "text": "hi"} | (
        fields
    )


@pytest.mark.parametrize(
    ("messages", "position", "reason"),
    [
        (
            [message(1), message(2, date="soon"), message(3), message(1)],
            "messages[1] (id 2).date",
            'not an ISO date: "soon"',
        ),
        (
            [message(1), message(2), message(1), message(4, date="soon")],
            "messages[2] (id 1)",
            "duplicate message id (first at messages[0])",
        ),
        (
            [message(7), message(7, date="soon"), message(7)],
            "messages[1] (id 7)",
            "duplicate message id (first at messages[0])",
        ),
    ],
)
def test_the_first_bad_message_in_file_order_is_named(tmp_path, messages, position, reason):
    """Duplicate ids are found after the read, and still reported in file order."""
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"id": 1, "messages": messages}))
    with pytest.raises(InputFileError) as caught:
        load_export(path)
    assert (caught.value.position, caught.value.reason) == (position, reason)


def test_reading_an_export_holds_a_chunk_not_the_file(tmp_path: Path) -> None:
    """Checking and then reading the messages of a 20 MB export allocates a few MB at
    most (reading it whole took several times its size)."""
    path = tmp_path / "result.json"
    text = "Деплой упал в пятницу: the disk filled up again. " * 8
    with path.open("w", encoding="utf-8") as out:
        out.write('{"id": 5, "name": "big", "messages": [\n')
        count = 0
        while out.tell() < 20_000_000:
            entities = [{"type": "plain", "text": text}]
            item = message(count + 1, text=[text, {"type": "bold", "text": "!"}])
            out.write(("," if count else "") + json.dumps(item | {"text_entities": entities}))
            count += 1
        out.write("]}")
    tracemalloc.start()
    try:
        export = load_export(path)
        read = sum(1 for _ in export.messages)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert read == export.message_count == count
    assert peak < 8_000_000, f"{peak / 1e6:.1f} MB"
