"""Bearer-key authentication of the search service (`EP_API_KEYS`).

`ApiKeys.accepts` compares the presented key with every configured key in constant time
(`hmac.compare_digest`, all keys compared whatever matches), and nothing here ever logs
or shows a key. The standalone app checks keys in an ASGI middleware (`RequireApiKey`),
before a request's body is read; the router's routes also depend on `bearer` so that the
OpenAPI document declares the scheme (`/docs` then has an "Authorize" button) and the
router stays protected when the application mounts it in an app of its own.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Collection, Sequence
from typing import Annotated, Any

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

#: What a 401 says; never which part of the key was wrong.
UNAUTHORIZED = "missing or unknown API key: send the header `Authorization: Bearer <key>`"


class Unauthorized(Exception):
    """The request carries no accepted API key."""


class ApiKeys:
    """The accepted keys. Falsy when there are none (authentication off)."""

    def __init__(self, keys: Sequence[str] = ()) -> None:
        self._keys = tuple(key.encode("utf-8") for key in keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} keys)"

    def accepts(self, authorization: bytes | str | None) -> bool:
        """Whether the `Authorization` header value is `Bearer <an accepted key>`."""
        if isinstance(authorization, str):
            authorization = authorization.encode("latin-1", "replace")
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        return matched


bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="One of the keys in EP_API_KEYS, sent as `Authorization: Bearer <key>`.",
)


def require_key(keys: ApiKeys) -> Any:
    """A route dependency: `Unauthorized` unless the request carries one of `keys`."""

    def check(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    ) -> None:
        if not keys.accepts(request.headers.get("authorization")):
            raise Unauthorized

    return check


class RequireApiKey:
    """ASGI middleware: every HTTP request outside `open_paths` without an accepted key is
    answered 401 with a JSON body, before its body is read or a route is looked up."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, open_paths: Collection[str]) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        authorization = dict(scope["headers"]).get(b"authorization")
        if self.keys.accepts(authorization):
            await self.app(scope, receive, send)
            return
        await send_json(send, 401, {"detail": UNAUTHORIZED}, [(b"www-authenticate", b"Bearer")])


async def send_json(
    send: Send,
    status: int,
    body: dict[str, Any],
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """A complete JSON response sent straight through ASGI (for middleware)."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
