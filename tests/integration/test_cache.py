"""The cache contract, run against MemoryCache and the real Redis alike (fixtures in
tests/peers/sql_cache.py). Expiry is checked with short ttls and sleeps, never with timings."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis.asyncio as redis_asyncio

from broker.cache import Cache, MemoryCache, RedisCache, cache_from_url
from broker.errors import UpstreamFailed


async def test_set_get_overwrite_and_delete(cache: Cache) -> None:
    assert await cache.get("k") is None
    await cache.set("k", "one", ttl=30)
    assert await cache.get("k") == "one"
    await cache.set("k", "two", ttl=30)
    assert await cache.get("k") == "two"
    await cache.delete("k")
    assert await cache.get("k") is None
    await cache.delete("never-set")  # deleting nothing is not an error
    assert await cache.get("never-set") is None


async def test_entries_expire_after_their_ttl(cache: Cache) -> None:
    await cache.set("short", "v", ttl=0.2)
    await cache.set("long", "v", ttl=30)
    assert await cache.add("replayed", "first", ttl=0.2) is True
    assert await cache.get("short") == "v"
    await asyncio.sleep(0.5)
    assert await cache.get("short") is None
    assert await cache.pop("short") is None
    assert await cache.get("long") == "v"
    # An expired replay-cache entry no longer blocks: the key is free again.
    assert await cache.add("replayed", "second", ttl=30) is True
    assert await cache.get("replayed") == "second"


async def test_add_is_atomic_under_concurrency(cache: Cache) -> None:
    results = await asyncio.gather(*(cache.add("nonce", f"caller-{i}", ttl=30) for i in range(50)))
    winners = [i for i, stored in enumerate(results) if stored]
    assert len(winners) == 1
    assert await cache.get("nonce") == f"caller-{winners[0]}"
    assert await cache.add("nonce", "late", ttl=30) is False
    assert await cache.get("nonce") == f"caller-{winners[0]}", "a failed add must not overwrite"


async def test_pop_hands_a_single_use_value_to_exactly_one_caller(cache: Cache) -> None:
    await cache.set("code", "grant-42", ttl=30)
    results = await asyncio.gather(*(cache.pop("code") for _ in range(50)))
    assert [r for r in results if r is not None] == ["grant-42"]
    assert await cache.get("code") is None
    assert await cache.pop("code") is None


async def test_incr_counts_and_starts_missing_keys_at_zero(cache: Cache) -> None:
    assert await cache.incr("hits", ttl=30) == 1
    assert await cache.incr("hits", ttl=30) == 2
    assert await cache.incr("hits", ttl=30, amount=5) == 7
    assert await cache.incr("hits", ttl=30, amount=-3) == 4
    assert await cache.get("hits") == "4"
    assert await cache.incr("other", ttl=30, amount=10) == 10


async def test_incr_is_atomic_under_concurrency(cache: Cache) -> None:
    results = await asyncio.gather(*(cache.incr("rate", ttl=30) for _ in range(50)))
    assert sorted(results) == list(range(1, 51))
    assert await cache.get("rate") == "50"


async def test_incr_ttl_is_set_when_the_key_is_created_only(cache: Cache) -> None:
    assert await cache.incr("window", ttl=0.3) == 1
    # A later call's longer ttl must not extend the window, or a steady caller is never reset.
    assert await cache.incr("window", ttl=60) == 2
    await asyncio.sleep(0.6)
    assert await cache.get("window") is None
    assert await cache.incr("window", ttl=60) == 1


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")], ids=str)
async def test_non_positive_ttls_are_refused(cache: Cache, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        await cache.set("k", "v", ttl=ttl)
    with pytest.raises(ValueError, match="ttl"):
        await cache.add("k", "v", ttl=ttl)
    with pytest.raises(ValueError, match="ttl"):
        await cache.incr("k", ttl=ttl)
    assert await cache.get("k") is None


async def test_namespaces_are_isolated(cache_factory: Callable[[str], Cache]) -> None:
    a, b = cache_factory("a"), cache_factory("b")
    await a.set("shared-name", "from-a", ttl=30)
    assert await b.get("shared-name") is None
    assert await b.add("shared-name", "from-b", ttl=30) is True
    assert await a.incr("n", ttl=30) == 1
    assert await b.incr("n", ttl=30) == 1
    await b.delete("shared-name")
    assert await a.get("shared-name") == "from-a"
    assert await b.pop("shared-name") is None


@pytest.mark.redis
async def test_redis_keys_carry_the_namespace(redis_url: str) -> None:
    cache = RedisCache(redis_url, namespace="broker-test-ns-check:")
    raw = redis_asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        await cache.set("k", "v", ttl=30)
        await cache.incr("c", ttl=30)
        assert await raw.get("broker-test-ns-check:k") == "v"
        assert await raw.get("k") is None
        ttl_ms = await raw.pttl("broker-test-ns-check:c")
        assert 0 < ttl_ms <= 30_000, "a counter must never be left without an expiry"
    finally:
        await raw.delete("broker-test-ns-check:k", "broker-test-ns-check:c")
        await raw.aclose()
        await cache.close()


async def test_ping_succeeds_on_a_live_cache(cache: Cache) -> None:
    await cache.ping()


@pytest.mark.redis
async def test_unreachable_redis_raises_upstream_failed_without_the_password() -> None:
    cache = RedisCache("redis://:hunter2-secret@127.0.0.1:1/0", timeout=1.0)
    try:
        calls = [
            cache.ping(),
            cache.get("k"),
            cache.set("k", "v", ttl=1),
            cache.add("k", "v", ttl=1),
            cache.pop("k"),
            cache.incr("k", ttl=1),
            cache.delete("k"),
        ]
        for call in calls:
            with pytest.raises(UpstreamFailed) as caught:
                await call
            assert "cache" in caught.value.description
            assert caught.value.log_detail
            assert "hunter2" not in f"{caught.value} {caught.value.log_detail}"
    finally:
        await cache.close()


async def test_memory_cache_purges_expired_entries() -> None:
    cache = MemoryCache()
    for i in range(1000):
        await cache.set(f"k{i}", "v", ttl=0.1)
    assert len(cache) == 1000
    await asyncio.sleep(0.3)
    await cache.set("fresh", "v", ttl=30)  # any write sweeps what has expired
    assert len(cache) == 1
    for _ in range(5000):  # rewriting one key must not grow the expiry heap without bound
        await cache.set("fresh", "v", ttl=30)
    assert len(cache._expiries) < 100


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        pytest.param("memory://", MemoryCache, id="memory"),
        pytest.param("redis://127.0.0.1:6379/0", RedisCache, id="redis"),
        pytest.param("rediss://user:pw@cache.example:6380/1", RedisCache, id="rediss"),
        pytest.param("REDIS://127.0.0.1:6379", RedisCache, id="upper-case-scheme"),
    ],
)
async def test_cache_from_url_builds_the_named_backend(url: str, kind: type) -> None:
    cache = cache_from_url(url, namespace="ns:")
    try:
        assert isinstance(cache, kind)
        assert isinstance(cache, MemoryCache | RedisCache)
        assert cache.namespace == "ns:"
    finally:
        await cache.close()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("memcached://u:hunter2@h:11211", id="memcached"),
        pytest.param("http://127.0.0.1:6379", id="http"),
        pytest.param("127.0.0.1:6379", id="no-scheme"),
        pytest.param("", id="empty"),
    ],
)
def test_cache_from_url_refuses_other_schemes(url: str) -> None:
    with pytest.raises(ValueError, match=r"memory://.*redis://") as caught:
        cache_from_url(url)
    assert "hunter2" not in str(caught.value)
