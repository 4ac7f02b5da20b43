"""Value types a policy decision returns (kept apart from the engine so adapters can use them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds a permit grants. `None` means the policy set no bound of its own."""

    max_ttl: int | None = None
    cpu: float | None = None
    memory: float | None = None  # GiB
    disk: float | None = None  # GiB
    gpu: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one authorization request.

    `reasons` holds the `@id`s of the policies that decided it (the permits that allowed it,
    or the forbids that denied it); `errors` holds evaluation errors, which always deny.
    """

    allowed: bool
    reasons: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    errors: tuple[str, ...] = ()
