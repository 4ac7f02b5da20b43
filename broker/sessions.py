"""Server-side browser sessions and sign-in flows.

The cookie holds only an opaque random id with an HMAC over it (key kept in Vault), so a
forged or guessed cookie is refused before any cache lookup. Session data lives in the shared
cache, so any replica can serve any request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from adapters.base import LoginFlow, Principal
from broker.cache import Cache

SESSION_COOKIE = "broker_session"
FLOW_COOKIE = "broker_flow"
FLOW_TTL = 600


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    principal: Principal
    csrf: str


class SessionStore:
    """Creates, loads and ends sessions and login flows."""

    def __init__(self, cache: Cache, key: bytes, ttl: int) -> None:
        self._cache = cache
        self._key = key
        self.ttl = ttl

    def _sign(self, value: str) -> str:
        mac = hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{value}.{mac}"

    def _unsign(self, cookie: str | None) -> str | None:
        if not cookie or "." not in cookie:
            return None
        value, _, _mac = cookie.rpartition(".")
        expected = self._sign(value).encode()
        return value if hmac.compare_digest(expected, cookie.encode()) else None

    async def create(self, principal: Principal) -> tuple[Session, str]:
        """A new session; returns it and the cookie value to set."""
        session = Session(secrets.token_urlsafe(32), principal, secrets.token_urlsafe(24))
        record = {"principal": principal.to_json(), "csrf": session.csrf}
        await self._cache.set(f"session:{session.id}", json.dumps(record), self.ttl)
        return session, self._sign(session.id)

    async def load(self, cookie: str | None) -> Session | None:
        session_id = self._unsign(cookie)
        if session_id is None:
            return None
        raw = await self._cache.get(f"session:{session_id}")
        if raw is None:
            return None
        record: dict[str, Any] = json.loads(raw)
        return Session(session_id, Principal.from_json(record["principal"]), record["csrf"])

    async def end(self, session: Session) -> None:
        await self._cache.delete(f"session:{session.id}")

    async def start_flow(self, flow: LoginFlow) -> str:
        """Store a sign-in flow; returns the cookie value binding it to this browser."""
        record = {
            "id": flow.id,
            "upstream": flow.upstream,
            "callback_url": flow.callback_url,
            "next_url": flow.next_url,
            "login_hint": flow.login_hint,
            "idp_hint": flow.idp_hint,
            "force_authn": flow.force_authn,
        }
        await self._cache.set(f"flow:{flow.id}", json.dumps(record), FLOW_TTL)
        return self._sign(flow.id)

    async def flow_exists(self, flow_id: str) -> bool:
        """Whether a sign-in flow with this id is in progress (in any browser)."""
        return bool(flow_id) and await self._cache.get(f"flow:{flow_id}") is not None

    async def peek_flow(self, flow_id: str, cookie: str | None) -> LoginFlow | None:
        """The flow, if it exists and belongs to the browser holding `cookie`."""
        if self._unsign(cookie) != flow_id:
            return None
        raw = await self._cache.get(f"flow:{flow_id}")
        return LoginFlow(**json.loads(raw)) if raw else None

    async def finish_flow(self, flow_id: str, cookie: str | None) -> LoginFlow | None:
        """Take the flow out of the store: a flow completes at most once."""
        if self._unsign(cookie) != flow_id:
            return None
        raw = await self._cache.pop(f"flow:{flow_id}")
        return LoginFlow(**json.loads(raw)) if raw else None
