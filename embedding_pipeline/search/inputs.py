"""What a search accepts as input, checked before anything reaches PostgreSQL or a model.

Ids are PostgreSQL `bigint`s (1 to 2**63 - 1); text must be storable in PostgreSQL (no NUL
character) and encodable as UTF-8 (no lone surrogate such as `\\ud800`, which JSON can
carry); ids written as text use ASCII digits only (`int("²")` fails, and Python reads
other scripts' digits as numbers).
Each function returns the problem as a short reason, or None: callers turn it into their
own error (`InvalidQuery` naming the field, or a pydantic validation error).
"""

from __future__ import annotations

#: The largest PostgreSQL bigint: every id column of the pipeline's tables is one.
MAX_ID = 2**63 - 1
#: Longest key, author id or atom kind a filter or a path may name.
MAX_KEY_CHARS = 200


def id_problem(value: object) -> str | None:
    """Why `value` is not a row id (a whole number from 1 to `MAX_ID`), or None."""
    if not isinstance(value, int) or isinstance(value, bool):
        return "must be a whole number"
    if not 1 <= value <= MAX_ID:
        return f"must be a whole number from 1 to {MAX_ID}"
    return None


def text_problem(value: str) -> str | None:
    """Why PostgreSQL or a model cannot take `value` as text, or None."""
    if "\x00" in value:
        return "must not contain a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it contains a lone surrogate)"
    return None


def id_or_key(value: object) -> int | str:
    """A reference to a row by id or by key: an int, or a string of ASCII digits, is an id
    (checked as one); a string of other digits ("²") is refused; any other string is a key
    (checked as text). Raises `ValueError` with the reason when it is neither."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value) if len(value) <= len(str(MAX_ID)) else MAX_ID + 1
    if isinstance(value, str):
        problem = text_problem(value)
        if not problem and value.isdigit():
            problem = "an id must be written with the digits 0-9"
        if not problem and not 1 <= len(value) <= MAX_KEY_CHARS:
            problem = f"must be an id or a key of 1 to {MAX_KEY_CHARS} characters"
        if not problem:
            return value
    elif isinstance(value, int) and not isinstance(value, bool):
        problem = id_problem(value)
        if not problem:
            return value
    else:
        problem = "must be an id (a whole number) or a key (a string)"
    raise ValueError(problem)
