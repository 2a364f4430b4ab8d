"""API keys (--api-key), checked as ASGI middleware: before the body is read, parsed or size-checked.

    request ─▶ ApiKeyAuth ─▶ BodySizeLimit ─▶ routes (body parsing, validation)
                 │ path open (/health, /openapi.json, the docs; /metrics unless --protect-metrics)?  pass
                 │ "Authorization: Bearer <one of the keys>"?                                       pass
                 └ otherwise 401 invalid_api_key, WWW-Authenticate: Bearer; the body is never read

Every other path needs a key, unknown ones included (a 401 before a 404 tells a stranger nothing).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from server.api.errors import AuthenticationError, error_json

Scope = dict[str, Any]


def key_matches(given: str, keys: tuple[str, ...]) -> bool:
    """True if `given` is one of `keys`; every key is compared, each in constant time, so timing tells nothing."""
    given_bytes = given.encode()
    matches = [hmac.compare_digest(given_bytes, key.encode()) for key in keys]
    return any(matches)


def bearer_key(scope: Scope) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (None without one)."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" else None
    return None


class ApiKeyAuth:
    """Wraps an ASGI app: HTTP requests to paths not in `open_paths` need one of `keys` (none: auth is off)."""

    def __init__(self, app: Any, keys: tuple[str, ...], open_paths: Iterable[str]) -> None:
        """
        Args:
            app: the ASGI application to protect.
            keys: the accepted API keys; empty turns auth off.
            open_paths: exact paths served without a key.
        """
        self.app = app
        self.keys = keys
        self.open_paths = frozenset(open_paths)

    def _authorized(self, scope: Scope) -> bool:
        if not self.keys or scope["path"] in self.open_paths:
            return True
        given = bearer_key(scope)
        return given is not None and key_matches(given, self.keys)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = AuthenticationError("missing or wrong API key: send 'Authorization: Bearer <key>'")
        await error_json(error)(scope, receive, send)
