"""PostgreSQL connection strings: checked before use, and shown without their password.

No import of the rest of the project, so the settings can check `DATABASE_URL` when it
loads without an import circle.
"""

from __future__ import annotations

import re
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

#: What a usable DATABASE_URL looks like, for error messages.
URL_FORMS = "postgresql://user:password@host:port/database or key=value pairs"


def _passwords(url: str) -> list[str]:
    """Every spelling of the password in a connection URL or keyword string (raw and
    percent-encoded), longest first. When the string does not parse, every word that may
    be part of the password, so that libpq quoting a piece of it reveals nothing."""
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = None
        uri = re.search(r"://[^/@]*?:(.*)@", url)
        keyword = re.search(r"password\s*=\s*(.*)", url)
        candidates = [uri.group(1)] if uri else []
        if keyword:
            words: list[str] = []
            for word in keyword.group(1).split():
                if words and "=" in word:
                    break
                words.append(word.strip("'"))
            candidates += words
        found = {c for c in candidates if c}
        return sorted(found | {quote(c, safe="") for c in found}, key=len, reverse=True)
    if not password:
        return []
    return sorted({str(password), quote(str(password), safe="")}, key=len, reverse=True)


def redact(text: str, url: str) -> str:
    """`text` with the password of `url` replaced by ***."""
    for password in _passwords(url):
        text = text.replace(password, "***")
    return text


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs, errors and metadata."""
    redacted = redact(url, url)
    redacted = re.sub(r"(password=)[^&\s]*", r"\1***", redacted)
    return re.sub(r"(://[^:/@]*):[^/]*@", r"\1:***@", redacted)


def connection_problem(url: str) -> str | None:
    """Why libpq would refuse `url` before connecting (redacted, one line), or None."""
    driver = re.match(r"postgres(?:ql)?\+(\w+)://", url)
    if driver:
        return f"the '+{driver.group(1)}' driver suffix is SQLAlchemy's; libpq wants postgresql://"
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        return " ".join(redact(str(exc), url).split())
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            return f"port {redact(port, url)!r} is not a number from 1 to 65535"
    return None
