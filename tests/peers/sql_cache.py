"""SQL and cache fixtures against the real PostgreSQL and Redis of this machine kind.

Nothing is started: PostgreSQL and Redis already run here, found through
`BROKER_TEST_POSTGRES_URL` (default `postgresql://postgres@127.0.0.1:5432/test`) and
`BROKER_TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`).

- `postgres_url`, `redis_url` (session): those URLs.
- `database_url` (function; ids `sqlite`, `postgres`): an empty database for this test alone:
  a fresh SQLite file, or a fresh PostgreSQL database `broker_test_<random>` created on the
  server and dropped (forcibly) at teardown. Not migrated.
- `database` (function; same ids): a `Database` on `database_url`, upgraded to head.
- `cache` (function; ids `memory`, `redis`): an empty cache; on Redis under a namespace unique
  to the test, whose keys are deleted at teardown.
- `cache_factory` (function; same ids): `make(namespace_suffix)` returns another cache on the
  same backend; Redis namespaces stay unique to the test and are cleaned up.

The `postgres` and `redis` parameters carry the markers of the same names, so
`-m "not postgres and not redis"` runs the SQLite and in-memory halves alone.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as redis_asyncio
from sqlalchemy.engine import make_url

from broker.cache import Cache, MemoryCache, RedisCache
from broker.storage import Database

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

SQL_BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]
CACHE_BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL server's admin URL (a database we may CREATE DATABASE from)."""
    return os.environ.get("BROKER_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis server's URL."""
    return os.environ.get("BROKER_TEST_REDIS_URL") or DEFAULT_REDIS_URL


async def _admin(postgres_url: str) -> asyncpg.Connection:
    # asyncpg wants a plain libpq-style URL, without SQLAlchemy's "+driver".
    url = make_url(postgres_url).set(drivername="postgresql")
    try:
        return await asyncpg.connect(url.render_as_string(hide_password=False))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL at {url!r} is not reachable ({exc}); set BROKER_TEST_POSTGRES_URL")


@pytest_asyncio.fixture(params=SQL_BACKENDS)
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_url: str
) -> AsyncIterator[str]:
    """An empty database of its own for this test (not migrated)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.db'}"
        return
    name = f"broker_test_{uuid.uuid4().hex[:16]}"
    admin = await _admin(postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        url = make_url(postgres_url).set(drivername="postgresql", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        admin = await _admin(postgres_url)
        try:
            # FORCE: a test that failed half-way may have left connections open.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest_asyncio.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """A `Database` on this test's own database, migrated to head."""
    db = Database(database_url)
    try:
        await db.upgrade()
        yield db
    finally:
        await db.close()


async def _drop_namespace(redis_url: str, namespace: str) -> None:
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest_asyncio.fixture(params=CACHE_BACKENDS)
async def cache_factory(
    request: pytest.FixtureRequest, redis_url: str
) -> AsyncIterator[Callable[[str], Cache]]:
    """`make(suffix)`: a new cache on this test's backend, namespace unique to test + suffix."""
    backend: str = request.param
    base = f"broker-test:{uuid.uuid4().hex}:"
    made: list[Cache] = []

    def make(suffix: str) -> Cache:
        namespace = f"{base}{suffix}:"
        cache: Cache = (
            MemoryCache(namespace=namespace)
            if backend == "memory"
            else RedisCache(redis_url, namespace=namespace)
        )
        made.append(cache)
        return cache

    try:
        yield make
    finally:
        for cache in made:
            await cache.close()
        if backend == "redis":
            await _drop_namespace(redis_url, base)


@pytest_asyncio.fixture
async def cache(cache_factory: Callable[[str], Cache]) -> Cache:
    """An empty cache on this test's backend."""
    return cache_factory("main")
