"""The shared short-lived cache: replay caches, rate-limit counters, revoked jtis, login state.

`MemoryCache` is the single-process default; `RedisCache` is what replicas share. Both give the
same guarantees: `add` and `pop` are atomic (exactly one caller wins), entries expire after
their ttl, and keys live under a namespace so several deployments can share one Redis.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, cast
from urllib.parse import urlsplit

from broker.errors import UpstreamFailed

if TYPE_CHECKING:
    import redis.asyncio as redis_asyncio


class Cache(Protocol):
    """Key/value store with expiry. Values are strings; ttls are seconds and must be > 0."""

    async def get(self, key: str) -> str | None:
        """The live value of `key`, or None if absent or expired."""
        ...

    async def set(self, key: str, value: str, ttl: float) -> None:
        """Store `value`, replacing any previous value and expiry."""
        ...

    async def add(self, key: str, value: str, ttl: float) -> bool:
        """Store `value` only if `key` is absent; True for the one caller that stored it."""
        ...

    async def pop(self, key: str) -> str | None:
        """Delete `key` and return its value; of concurrent callers only one gets the value."""
        ...

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        """Add `amount` to the counter at `key` and return the new value. A missing key starts
        at 0 and expires `ttl` after this call; an existing key keeps its expiry."""
        ...

    async def delete(self, key: str) -> None:
        """Remove `key` if present."""
        ...

    async def ping(self) -> None:
        """Raise `UpstreamFailed` if the cache cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections; the cache is unusable afterwards."""
        ...


def _check_ttl(ttl: float) -> None:
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")


class MemoryCache:
    """An in-process `Cache`. Atomic because no method awaits while it touches the store.

    Expired entries are never returned, and are removed as writes happen: every write drops the
    entries whose expiry has passed (cheaply, from a heap ordered by expiry), so memory is
    bounded by what is live rather than by everything ever written.
    """

    def __init__(self, *, namespace: str = "broker:") -> None:
        self.namespace = namespace
        self._clock = time.monotonic
        self._store: dict[str, tuple[str, float]] = {}
        # (expires_at, key); stale pairs (key since rewritten or deleted) are skipped on purge.
        self._expiries: list[tuple[float, str]] = []

    def __len__(self) -> int:
        """How many entries are held, expired ones not yet purged included."""
        return len(self._store)

    def _live(self, key: str, now: float) -> str | None:
        entry = self._store.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._store[key]
            return None
        return entry[0]

    def _put(self, key: str, value: str, expires_at: float) -> None:
        self._store[key] = (value, expires_at)
        heapq.heappush(self._expiries, (expires_at, key))

    def _purge(self, now: float) -> None:
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires_at, key = heapq.heappop(heap)
            entry = self._store.get(key)
            if entry is not None and entry[1] == expires_at:
                del self._store[key]
        # Rewriting a key leaves its old heap pair behind; rebuild before those dominate.
        if len(heap) > 2 * len(self._store) + 64:
            self._expiries = [(exp, k) for k, (_, exp) in self._store.items()]
            heapq.heapify(self._expiries)

    async def get(self, key: str) -> str | None:
        return self._live(self.namespace + key, self._clock())

    async def set(self, key: str, value: str, ttl: float) -> None:
        _check_ttl(ttl)
        now = self._clock()
        self._purge(now)
        self._put(self.namespace + key, value, now + ttl)

    async def add(self, key: str, value: str, ttl: float) -> bool:
        _check_ttl(ttl)
        now = self._clock()
        self._purge(now)
        full = self.namespace + key
        if self._live(full, now) is not None:
            return False
        self._put(full, value, now + ttl)
        return True

    async def pop(self, key: str) -> str | None:
        full = self.namespace + key
        value = self._live(full, self._clock())
        if value is not None:
            del self._store[full]
        return value

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        _check_ttl(ttl)
        now = self._clock()
        self._purge(now)
        full = self.namespace + key
        current = self._live(full, now)
        if current is None:
            self._put(full, str(amount), now + ttl)
            return amount
        value = int(current) + amount
        self._store[full] = (str(value), self._store[full][1])
        return value

    async def delete(self, key: str) -> None:
        self._store.pop(self.namespace + key, None)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._store.clear()
        self._expiries.clear()


class RedisCache:
    """A `Cache` in Redis (6.2 or later, for GETDEL), shared by every replica.

    Every Redis failure, including a refused connection or a timeout, leaves as
    `UpstreamFailed` so callers fail closed through the one error path.
    """

    def __init__(self, url: str, *, namespace: str = "broker:", timeout: float = 5.0) -> None:
        # Imported here: a broker on the memory cache never loads redis-py (~6 MB).
        import redis.asyncio as redis_asyncio
        from redis.exceptions import RedisError

        self._errors: tuple[type[Exception], ...] = (RedisError, OSError)
        self.namespace = namespace
        self._password = urlsplit(url).password
        # Options in the URL's query string take precedence over these defaults.
        self._client: redis_asyncio.Redis = redis_asyncio.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
        )

    @contextlib.contextmanager
    def _translated(self, operation: str) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            detail = f"redis {operation}: {type(exc).__name__}: {exc}"
            if self._password:
                detail = detail.replace(self._password, "***")
            raise UpstreamFailed("the cache (Redis) is unavailable", log_detail=detail) from None

    @staticmethod
    def _px(ttl: float) -> int:
        _check_ttl(ttl)
        # Round up: a ttl below a millisecond must still expire, not become "no expiry".
        return max(1, math.ceil(ttl * 1000))

    async def get(self, key: str) -> str | None:
        with self._translated("GET"):
            value = await self._client.get(self.namespace + key)
        # decode_responses=True: replies are str, which the client's annotations cannot express.
        return cast(str | None, value)

    async def set(self, key: str, value: str, ttl: float) -> None:
        px = self._px(ttl)
        with self._translated("SET"):
            await self._client.set(self.namespace + key, value, px=px)

    async def add(self, key: str, value: str, ttl: float) -> bool:
        px = self._px(ttl)
        with self._translated("SET NX"):
            stored = await self._client.set(self.namespace + key, value, nx=True, px=px)
        return bool(stored)

    async def pop(self, key: str) -> str | None:
        with self._translated("GETDEL"):
            value = await self._client.getdel(self.namespace + key)
        return cast(str | None, value)

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        px = self._px(ttl)
        full = self.namespace + key
        with self._translated("INCRBY"):
            # MULTI/EXEC: creating the key with its expiry and counting happen as one step, so
            # a counter can never be left without a ttl (which would rate-limit forever).
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(full, 0, nx=True, px=px)
                pipe.incrby(full, amount)
                _, value = await pipe.execute()
        return int(value)

    async def delete(self, key: str) -> None:
        with self._translated("DEL"):
            await self._client.delete(self.namespace + key)

    async def ping(self) -> None:
        with self._translated("PING"):
            await self._client.ping()

    async def close(self) -> None:
        with self._translated("close"):
            await self._client.aclose()


def cache_from_url(url: str, *, namespace: str = "broker:") -> Cache:
    """Build the cache a settings URL names: `memory://`, or `redis://…` / `rediss://…`.

    Raises `ValueError` for any other scheme (without echoing the URL, which may hold a
    password).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryCache(namespace=namespace)
    if scheme in ("redis", "rediss"):
        return RedisCache(url, namespace=namespace)
    raise ValueError(
        f"unsupported cache URL scheme {scheme or '(none)'!r}: use memory:// or "
        "redis://HOST:PORT/DB (rediss:// for TLS)"
    )
