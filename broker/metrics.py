"""Prometheus metrics, one registry per application (so tests can build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Children looked up per request are kept in a dict: `labels()` validates and stringifies its
# arguments and takes the metric's lock on every call, ~4 µs each on the token path. The cap
# bounds memory if a client sends many odd methods; past it, lookups go through `labels()`.
_MAX_CACHED_CHILDREN = 1024


class Metrics:
    """Request, token, denial and key-age metrics for one broker process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "broker_http_requests",
            "HTTP requests handled",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "broker_http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.tokens_minted = Counter(
            "broker_tokens_minted", "Tokens signed", ["kind"], registry=self.registry
        )
        self.denials = Counter(
            "broker_policy_denials", "Requests a policy denied", ["action"], registry=self.registry
        )
        self.key_age = Gauge(
            "broker_signing_key_age_seconds",
            "Age of each published signing key",
            ["kid"],
            registry=self.registry,
        )
        self._key_ages: Callable[[], Mapping[str, float]] | None = None
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._minted_children: dict[str, Any] = {}

    def request_handled(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request and observe its latency (same series as `labels()` gives)."""
        key = (route, method, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self.requests.labels(route=route, method=method, status=status)
            if len(self._request_children) < _MAX_CACHED_CHILDREN:
                self._request_children[key] = counter
        counter.inc()
        histogram = self._latency_children.get(route)
        if histogram is None:
            histogram = self.latency.labels(route=route)
            if len(self._latency_children) < _MAX_CACHED_CHILDREN:
                self._latency_children[route] = histogram
        histogram.observe(seconds)

    def watch_key_ages(self, source: Callable[[], Mapping[str, float]]) -> None:
        self._key_ages = source

    def token_minted(self, kind: str) -> None:
        counter = self._minted_children.get(kind)
        if counter is None:
            counter = self._minted_children[kind] = self.tokens_minted.labels(kind=kind)
        counter.inc()

    def render(self) -> bytes:
        """The exposition text, with key ages read at scrape time."""
        if self._key_ages is not None:
            self.key_age.clear()
            for kid, age in self._key_ages().items():
                self.key_age.labels(kid=kid).set(age)
        return generate_latest(self.registry)
