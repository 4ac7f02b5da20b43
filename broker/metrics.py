"""Prometheus metrics, one registry per application (so tests can build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


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

    def watch_key_ages(self, source: Callable[[], Mapping[str, float]]) -> None:
        self._key_ages = source

    def token_minted(self, kind: str) -> None:
        self.tokens_minted.labels(kind=kind).inc()

    def render(self) -> bytes:
        """The exposition text, with key ages read at scrape time."""
        if self._key_ages is not None:
            self.key_age.clear()
            for kid, age in self._key_ages().items():
                self.key_age.labels(kid=kid).set(age)
        return generate_latest(self.registry)
