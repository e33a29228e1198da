"""Reading a large JSON file a piece at a time, with the standard library only.

`StreamedObject` walks a file's top-level object and hands over its members one at a
time; the elements of one list member (a Telegram export's ``messages``) come one by one,
each decoded by `json`'s own decoder, so memory holds one element and a chunk of the
file, never the whole file or its tree. A malformed file fails as `json.loads` of the
whole file would, with the same message, line and column, and the same precedence: an
invalid UTF-8 byte anywhere first, then the first JSON syntax error. One difference: a
value nested too deep to read is reported at its own deepest bracket (``json.loads`` gives
up on the file as a whole).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

#: Characters read per step; an element longer than that grows the buffer to hold it.
CHUNK_CHARS = 1 << 20
#: JSON's whitespace (`json.loads` skips exactly these between tokens).
_WHITESPACE = re.compile(r"[ \t\n\r]*")
#: Whitespace as `bytes.strip` sees it: a file of nothing else is empty.
_BYTE_WHITESPACE = b" \t\n\r\x0b\x0c"
#: A JSON string token, for the scans that locate a problem json cannot place.
_JSON_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*"'
_BRACKETS = re.compile(rf"{_JSON_STRING}|[\[{{]|[\]}}]")
#: How far past an error the decoder may have needed to look (an escaped surrogate pair,
#: ``-Infinity``): an error closer than this to the end of what was read may only be the
#: end of the chunk, and is tried again with more of the file.
_LOOKAHEAD = 16


class JsonReadError(ValueError):
    """The file cannot be read as JSON: where (``line 3 column 7``, ``file``) and why."""

    def __init__(self, position: str, reason: str) -> None:
        self.position = position
        self.reason = reason
        super().__init__(f"{position}: {reason}")


@dataclass(frozen=True)
class Member:
    """A member of the top-level object; a top-level value that is not an object comes
    as one `Member` with the key None."""

    key: str | None
    value: Any


#: The value of a `Member` whose list comes next as `Element`s.
STREAMED = object()


@dataclass(frozen=True)
class Element:
    """One element of the streamed list member."""

    index: int
    value: Any


class _Text:
    """A file's decoded text in a sliding buffer, with line and column bookkeeping."""

    def __init__(self, file: BinaryIO, chunk_chars: int) -> None:
        self._file = file
        self.chunk = chunk_chars
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.sha256 = hashlib.sha256()
        self.buf = ""
        self.eof = False
        self._bytes = 0  # bytes read so far
        self._content = False  # a byte other than whitespace seen
        self._line = 1  # the line buf[0] is on
        self._column = 0  # characters between the last newline before buf and buf[0]

    def fill(self, more: int = 1) -> bool:
        """Read until the buffer holds `more` characters more, or the file ends; False
        when nothing was added."""
        wanted = len(self.buf) + more
        added = False
        while len(self.buf) < wanted and not self.eof:
            first = self._bytes == 0
            size = max(self.chunk, wanted - len(self.buf), len(codecs.BOM_UTF8) if first else 0)
            data = self._read(size)
            if not data:
                self.eof = True
                if not self._content:
                    raise JsonReadError("file", "is empty")
                added = self._decode(b"", final=True) or added
                break
            self._bytes += len(data)
            self.sha256.update(data)
            self._content = self._content or bool(data.strip(_BYTE_WHITESPACE))
            if first and data.startswith(codecs.BOM_UTF8):  # utf-8-sig: one BOM is allowed
                added = self._decode(data[len(codecs.BOM_UTF8) :]) or added
            else:
                added = self._decode(data) or added
        return added

    def _read(self, size: int) -> bytes:
        try:
            return self._file.read(size)
        except OSError as exc:
            raise JsonReadError("file", f"cannot be read ({exc.strerror or exc})") from None

    def _decode(self, data: bytes, *, final: bool = False) -> bool:
        pending = self._decoder.getstate()[0]
        try:
            text = self._decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            seen = pending + data
            self.buf += seen[: exc.start].decode("utf-8")
            at_byte = self._bytes - len(seen) + exc.start
            raise JsonReadError(
                f"{self.position(len(self.buf))} (byte {at_byte})",
                f"not valid UTF-8 (byte 0x{seen[exc.start]:02x})",
            ) from None
        self.buf += text
        return bool(text)

    def drop(self, upto: int) -> None:
        """Forget the text before `upto`: nothing before it is looked at again."""
        gone = self.buf[:upto]
        newline = gone.rfind("\n")
        if newline >= 0:
            self._line += gone.count("\n")
            self._column = upto - newline - 1
        else:
            self._column += upto
        self.buf = self.buf[upto:]

    def check_rest_decodes(self) -> None:
        """Read the rest of the file and forget it: an invalid UTF-8 byte anywhere is what
        `json.loads` of the whole file would have reported first."""
        while not self.eof:
            self.drop(len(self.buf))
            self.fill(self.chunk)

    def position(self, offset: int) -> str:
        """``line L column C`` of buffer offset `offset` in the whole file (the column
        counts characters from 1, as `json.JSONDecodeError` does)."""
        newline = self.buf.rfind("\n", 0, offset)
        line = self._line + self.buf.count("\n", 0, offset)
        column = offset - newline if newline >= 0 else self._column + offset + 1
        return f"line {line} column {column}"


class _Parser:
    """The top-level structure by hand, every value by `json`'s decoder."""

    def __init__(self, text: _Text, decoder: json.JSONDecoder) -> None:
        self.text = text
        self.decoder = decoder
        self.pos = 0

    def fail(self, offset: int, message: str) -> JsonReadError:
        error = JsonReadError(self.text.position(offset), f"invalid JSON: {message}")
        self.text.check_rest_decodes()
        return error

    def peek(self) -> str:
        """Skip JSON whitespace: the next character, or "" at the end of the file."""
        while True:
            match = _WHITESPACE.match(self.text.buf, self.pos)
            assert match is not None
            self.pos = match.end()
            if self.pos < len(self.text.buf):
                return self.text.buf[self.pos]
            if not self.text.fill():
                return ""

    def expect(self, wanted: str, message: str) -> None:
        if self.peek() != wanted:
            raise self.fail(self.pos, message)
        self.pos += 1

    def key(self) -> str:
        """The member name whose opening quote is at `pos`."""
        while True:
            try:
                key, self.pos = json.decoder.scanstring(self.text.buf, self.pos + 1, True)  # type: ignore[attr-defined]
                return str(key)
            except json.JSONDecodeError as exc:
                if not self._more(exc, self.pos):
                    raise self.fail(exc.pos, exc.msg) from None

    def value(self, depth: int) -> Any:
        """The value after `pos`, `depth` brackets deep in the file."""
        self.peek()
        if self.pos >= self.text.chunk:
            self.text.drop(self.pos)
            self.pos = 0
        start = self.pos
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text.buf, start)
            except json.JSONDecodeError as exc:
                if self._more(exc, start):
                    continue
                raise self.fail(exc.pos, exc.msg) from None
            except RecursionError:
                raise self._too_deep(start, depth) from None
            except ValueError:  # an integer longer than int() reads
                raise self._too_long(start) from None
            # a number or a literal near the end of the buffer may go on in the file
            if end < len(self.text.buf) - _LOOKAHEAD or not self.text.fill(end - start):
                self.pos = end
                return value

    def elements(self, depth: int) -> Iterator[Element]:
        """The elements of the list whose opening bracket is at `pos`."""
        self.pos += 1
        if self.peek() == "]":
            self.pos += 1
            return
        index = 0
        while True:
            yield Element(index, self.value(depth))
            index += 1
            if self.closed("]"):
                return

    def closed(self, closing: str) -> bool:
        """After a value: True past `closing`, False past a comma (anything else fails)."""
        after = self.peek()
        if after != closing and after != ",":
            raise self.fail(self.pos, "Expecting ',' delimiter")
        self.pos += 1
        return after == closing

    def end(self) -> None:
        if self.peek():
            raise self.fail(self.pos, "Extra data")

    def _more(self, exc: json.JSONDecodeError, start: int) -> bool:
        """Whether `exc` may only mean that the buffer ends too early; then as much of the
        file again as the value so far was read (a long value costs linear time)."""
        if self.text.eof:
            return False
        near_end = exc.pos >= len(self.text.buf) - _LOOKAHEAD
        if not (near_end or exc.msg.startswith("Unterminated string")):
            return False
        self.text.fill(max(len(self.text.buf) - start, 1))
        return True

    def _complete(self, start: int, done: Callable[[str], bool]) -> str:
        """The text from `start` on, read until `done` says it is enough or the file ends."""
        while not done(self.text.buf[start:]) and not self.text.eof:
            self.text.fill(max(len(self.text.buf) - start, 1))
        return self.text.buf[start:]

    def _too_deep(self, start: int, depth: int) -> JsonReadError:
        """The value at `start` nests deeper than `json` reads: its first bracket at its
        deepest nesting, the depth counted from the top of the file."""
        offset, deepest, _closed = _nesting(self._complete(start, lambda t: _nesting(t)[2]))
        error = JsonReadError(
            self.text.position(start + offset),
            f"JSON nested {depth + deepest} levels deep, too deep to read",
        )
        self.text.check_rest_decodes()
        return error

    def _too_long(self, start: int) -> JsonReadError:
        """The first integer in the value at `start` with more digits than int() reads."""
        found = self._complete(start, lambda t: _overlong_integer(t)[2])
        offset, digits, _ended = _overlong_integer(found)
        error = JsonReadError(
            self.text.position(start + offset), f"a {digits}-digit number, too long to read"
        )
        self.text.check_rest_decodes()
        return error


class StreamedObject:
    """A JSON file whose top-level object is read one member at a time, and the list
    member `list_key` one element at a time.

    Iterating yields a `Member` per member in file order; a member named `list_key` that
    holds a list comes as `Member(list_key, STREAMED)` followed by an `Element` per
    element. Errors raise `JsonReadError`. `sha256` holds the file's digest once the
    iteration finished.
    """

    def __init__(
        self,
        path: Path,
        list_key: str | None,
        decoder: json.JSONDecoder | None = None,
        *,
        chunk_chars: int = CHUNK_CHARS,
    ) -> None:
        self.path = path
        self.list_key = list_key
        self.decoder = decoder or json.JSONDecoder()
        self.chunk_chars = chunk_chars
        self.sha256: str | None = None

    def __iter__(self) -> Iterator[Member | Element]:
        try:
            file = self.path.open("rb")
        except OSError as exc:
            raise JsonReadError("file", f"cannot be read ({exc.strerror or exc})") from None
        with file:
            text = _Text(file, self.chunk_chars)
            yield from self._members(_Parser(text, self.decoder))
            self.sha256 = text.sha256.hexdigest()

    def _members(self, p: _Parser) -> Iterator[Member | Element]:
        first = p.peek()
        # as `json.loads`: a BOM is named only as the text's first character; after
        # whitespace it is a character where a value should be
        if first == "\ufeff" and p.pos == 0:
            raise p.fail(p.pos, "Unexpected UTF-8 BOM (decode using utf-8-sig)")
        if first != "{":
            value = p.value(0)
            p.end()
            yield Member(None, value)
            return
        p.pos += 1
        if p.peek() == "}":
            p.pos += 1
            p.end()
            return
        while True:
            if p.peek() != '"':
                raise p.fail(p.pos, "Expecting property name enclosed in double quotes")
            key = p.key()
            p.expect(":", "Expecting ':' delimiter")
            if key == self.list_key and p.peek() == "[":
                yield Member(key, STREAMED)
                yield from p.elements(2)
            else:
                yield Member(key, p.value(1))
            if p.closed("}"):
                break
        p.end()


def _nesting(text: str) -> tuple[int, int, bool]:
    """(offset, depth) of the first bracket that reaches the deepest nesting of the value
    `text` starts with, and whether that value closes within `text`."""
    depth, deepest, where = 0, 0, 0
    for token in _BRACKETS.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, token.start()
        elif bracket in "]}":
            depth -= 1
            if depth <= 0:
                return where, deepest, True
    return where, deepest, False


def _overlong_integer(text: str) -> tuple[int, int, bool]:
    """(offset, digits) of the first integer outside strings too long for int() to read,
    and whether it ends before `text` does."""
    limit = sys.get_int_max_str_digits()
    pattern = rf"{_JSON_STRING}|-?(\d{{{limit + 1},}})(?![.eE\d])"
    for token in re.finditer(pattern, text):
        if token.group(1):
            return token.start(), len(token.group(1)), token.end() < len(text)
    return 0, 0, False
