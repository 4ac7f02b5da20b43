"""Launch credentials: decide, clip, issue, record the lease, audit.

One path for every way a credential is asked for (`POST /v1/credentials`, token exchange with
a backend as `resource`): Cedar decides `launch` on the backend with the requested resources
and duration as context; a request for more resources than the deciding permits' limits is
refused naming them; the duration is clipped to the policy's `max_ttl`, never extended; the
backend issues; the lease (never the secret) is stored and the issue audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Table, select, update

from adapters.base import Backend, Credential, Grant, Principal, Revocable
from broker.errors import (
    AccessDenied,
    BrokerError,
    InvalidRequest,
    InvalidTarget,
    NotFound,
    ServerError,
)
from broker.repo_credentials import RepoCredentialBackend
from broker.repos import RepoRef
from broker.repos import decide as decide_repo
from broker.services import Services
from broker.storage import LeaseRecord
from policies.decision import Decision
from policies.engine import Resource

log = structlog.get_logger(__name__)

MAX_DURATION = 7 * 86400
LEASES: Table = LeaseRecord.__table__  # type: ignore[assignment]
# Request field → (Cedar context key, Limits field)
_RESOURCES = {"cpu": "cpu", "memory": "memory_gb", "disk": "disk_gb", "gpu": "gpu"}
_LIMIT_OF = {"cpu": "cpu", "memory": "memory", "disk": "disk", "gpu": "gpu"}


class Resources(BaseModel):
    """What the launch will use: CPUs, memory and disk in GiB, GPUs."""

    model_config = ConfigDict(extra="forbid", strict=True)

    cpu: int = Field(default=1, ge=0, le=1024)
    memory: int = Field(default=1, ge=0, le=65536)
    disk: int = Field(default=1, ge=0, le=1_000_000)
    gpu: int = Field(default=0, ge=0, le=64)


class CredentialRequest(BaseModel):
    """The body of `POST /v1/credentials`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    backend: str = Field(min_length=1, max_length=64)
    duration: int = Field(default=3600, gt=0, le=MAX_DURATION)
    role: str | None = Field(default=None, min_length=1, max_length=128)
    project: str | None = Field(default=None, min_length=1, max_length=128)
    repo: str | None = Field(default=None, min_length=3, max_length=300)  # repository hosts
    resources: Resources = Resources()


@dataclass(frozen=True, slots=True)
class IssuedCredential:
    credential: Credential
    requested_duration: int
    clipped: bool
    policies: tuple[str, ...]

    def body(self) -> dict[str, Any]:
        """The response of `POST /v1/credentials`."""
        c = self.credential
        return {
            "backend": c.backend,
            "kind": c.kind,
            "credential": dict(c.secret),
            "expires_at": _iso(c.expires_at),
            "lease_id": c.lease_id,
            "details": dict(c.details),
            "requested_duration": self.requested_duration,
            "clipped": self.clipped,
            "policies": list(self.policies),
        }


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _oversized(request: CredentialRequest, decision: Decision) -> list[str]:
    """Requested resources above the limits of the permits that allowed the launch."""
    over = []
    for name in _RESOURCES:
        limit = getattr(decision.limits, _LIMIT_OF[name])
        asked = getattr(request.resources, name)
        if limit is not None and asked > limit:
            over.append(f"{name} {asked} > {limit:g}")
    return over


async def issue_credential(
    svc: Services, principal: Principal, client_id: str | None, request: CredentialRequest
) -> IssuedCredential:
    """Decide, clip, issue, store the lease and audit. Raises BrokerError subclasses."""
    backend = svc.backends.get(request.backend)
    if backend is None:
        raise InvalidTarget(f"there is no backend {request.backend!r}")
    if isinstance(backend, RepoCredentialBackend):
        return await _issue_repo_credential(svc, backend, principal, client_id, request)
    if request.repo is not None:
        raise InvalidRequest(f"backend {request.backend!r} is not a repository host")
    kind = next(b.type for b in svc.settings.backends if b.id == request.backend)
    context = {"ttl_seconds": request.duration} | {
        key: getattr(request.resources, name) for name, key in _RESOURCES.items()
    }
    decision = svc.policy.decide(
        principal, "launch", Resource("Backend", request.backend, attrs={"kind": kind}),
        context, client=client_id,
    )  # fmt: skip
    audit = {
        "backend": request.backend,
        "client": client_id,
        "policies": list(decision.reasons),
        "requested_duration": request.duration,
        "resources": request.resources.model_dump(),
    }
    if not decision.allowed:
        svc.metrics.denials.labels(action="launch").inc()
        await svc.audit.append("credential.denied", outcome="denied", actor=principal.id, **audit)
        raise AccessDenied(
            "No policy allows you to launch with this backend.", reasons=decision.reasons
        )
    over = _oversized(request, decision)
    if over:
        svc.metrics.denials.labels(action="launch").inc()
        await svc.audit.append(
            "credential.denied", outcome="denied", actor=principal.id, over=over, **audit
        )
        raise AccessDenied(
            f"The request is larger than policy {', '.join(decision.reasons)} allows: "
            f"{'; '.join(over)}.",
            reasons=decision.reasons,
        )
    max_ttl = decision.limits.max_ttl
    ttl = min(request.duration, max_ttl) if max_ttl is not None else request.duration
    grant = Grant(
        principal=principal, action="launch", resource=request.backend,
        limits=decision.limits, policy_ids=decision.reasons, ttl=ttl, role=request.role,
        project=request.project, resources=request.resources.model_dump(), client=client_id,
    )  # fmt: skip
    return await _issue(svc, backend, grant, request, max_ttl=max_ttl, audit=audit)


async def _issue_repo_credential(
    svc: Services, backend: RepoCredentialBackend, principal: Principal, client_id: str | None,
    request: CredentialRequest,
) -> IssuedCredential:  # fmt: skip
    """A forge token for one repository, allowed by Cedar `read_repo` (not `launch`)."""
    if request.repo is None:
        raise InvalidRequest('name the repository: {"repo": "owner/name"}')
    ref = RepoRef.parse(f"{request.backend}/{request.repo}")
    decision = await decide_repo(svc, principal, ref, "read_repo")
    audit = {
        "backend": request.backend, "client": client_id, "repo": str(ref),
        "policies": list(decision.reasons), "requested_duration": request.duration,
    }  # fmt: skip
    if not decision.allowed:
        svc.metrics.denials.labels(action="read_repo").inc()
        await svc.audit.append("credential.denied", outcome="denied", actor=principal.id, **audit)
        raise AccessDenied(f"No policy lets you read {ref}.", reasons=decision.reasons)
    max_ttl = min(decision.limits.max_ttl or backend.max_ttl, backend.max_ttl)
    ttl = min(request.duration, max_ttl)
    grant = Grant(
        principal=principal, action="read_repo", resource=f"{ref.forge_owner}/{ref.name}",
        limits=decision.limits, policy_ids=decision.reasons, ttl=ttl, client=client_id,
    )  # fmt: skip
    return await _issue(svc, backend, grant, request, max_ttl=max_ttl, audit=audit)


async def _issue(
    svc: Services, backend: Backend, grant: Grant, request: CredentialRequest, *,
    max_ttl: int | None, audit: dict[str, Any],
) -> IssuedCredential:  # fmt: skip
    """Have the backend issue; refuse a credential that outlives the policy, else store its
    lease and audit. A backend's failure is audited too."""
    principal, client_id, ttl = grant.principal, grant.client, grant.ttl
    issued_at = datetime.now(UTC)
    try:
        credential = await backend.issue(grant)
    except BrokerError as error:
        await svc.audit.append(
            "credential.failed", outcome="failure", actor=principal.id, error=error.error,
            reason=error.log_detail[:300] or error.description[:300], **audit,
        )  # fmt: skip
        raise
    ceiling = issued_at + timedelta(seconds=(max_ttl or MAX_DURATION) + 5)
    if credential.expires_at > ceiling:
        # A backend must never outlive the policy; take the credential back if it can.
        if isinstance(backend, Revocable):
            with contextlib.suppress(BrokerError):
                await backend.revoke(credential.lease_id, credential.handle)
        raise ServerError(
            "The backend issued a credential longer than the policy allows; it was refused.",
            log_detail=f"backend {request.backend} expires_at beyond max_ttl {max_ttl}",
        )
    lease = {
        "lease_id": credential.lease_id, "principal_id": principal.id, "client_id": client_id,
        "backend": request.backend, "kind": credential.kind, "created_at": issued_at,
        "expires_at": credential.expires_at, "revoked_at": None, "cleaned_up": False,
        "handle": dict(credential.handle), "details": dict(credential.details),
    }  # fmt: skip
    # The lease row goes into the audit record's own group commit: one SQL transaction for
    # both, shared with whatever else is being audited at the time.
    await svc.audit.append_with_rows(
        [(LEASES, lease)], "credential.issued", outcome="success", actor=principal.id,
        lease=credential.lease_id, kind=credential.kind, expires_at=_iso(credential.expires_at),
        ttl=ttl, **audit,
    )  # fmt: skip
    return IssuedCredential(
        credential=credential,
        requested_duration=request.duration,
        clipped=ttl < request.duration,
        policies=grant.policy_ids,
    )


def lease_view(record: LeaseRecord) -> dict[str, Any]:
    """A lease as `GET /v1/credentials` shows it: no secret was ever stored."""
    return {
        "lease_id": record.lease_id,
        "backend": record.backend,
        "kind": record.kind,
        "client": record.client_id,
        "created_at": _iso(record.created_at),
        "expires_at": _iso(record.expires_at),
        "details": record.details,
    }


async def live_leases(svc: Services, principal_id: str) -> list[LeaseRecord]:
    now = datetime.now(UTC)
    async with svc.db.reads() as session:
        rows = await session.scalars(
            select(LeaseRecord)
            .where(LeaseRecord.principal_id == principal_id)
            .where(LeaseRecord.revoked_at.is_(None))
            .where(LeaseRecord.expires_at > now)
            .order_by(LeaseRecord.created_at)
        )
        return list(rows)


async def revoke_lease(svc: Services, principal_id: str, lease_id: str) -> bool:
    """End one of the caller's leases. Returns whether the backend itself revoked the
    credential (False: it cannot, and the credential lives until it expires)."""
    async with svc.db.reads() as session:
        record = await session.get(LeaseRecord, lease_id)
    if record is None or record.principal_id != principal_id or record.revoked_at is not None:
        raise NotFound("You have no live credential with that lease id.")
    backend = svc.backends.get(record.backend)
    upstream = isinstance(backend, Revocable)
    if isinstance(backend, Revocable):
        await backend.revoke(record.lease_id, record.handle)
    async with svc.db.sessions() as session, session.begin():
        await session.execute(
            update(LeaseRecord)
            .where(LeaseRecord.lease_id == lease_id)
            .values(revoked_at=datetime.now(UTC), cleaned_up=upstream)
        )
    await svc.audit.append(
        "credential.revoked", outcome="success", actor=principal_id, lease=lease_id,
        backend=record.backend, upstream_revoked=upstream,
    )  # fmt: skip
    return upstream


async def clean_up_expired(svc: Services, *, limit: int = 100) -> int:
    """Ask revocable backends to delete credentials that expired (an expired Keystone
    application credential stays listed until deleted). Returns how many were cleaned."""
    now = datetime.now(UTC)
    revocable = [bid for bid, b in svc.backends.items() if isinstance(b, Revocable)]
    if not revocable:
        return 0
    async with svc.db.sessions() as session:
        rows = list(
            await session.scalars(
                select(LeaseRecord)
                .where(LeaseRecord.backend.in_(revocable))
                .where(LeaseRecord.cleaned_up.is_(False))
                .where(LeaseRecord.expires_at <= now)
                .limit(limit)
            )
        )
    cleaned = 0
    for record in rows:
        backend = svc.backends[record.backend]
        assert isinstance(backend, Revocable)
        try:
            await backend.revoke(record.lease_id, record.handle)
        except BrokerError as error:
            log.warning("lease.cleanup_failed", lease=record.lease_id, error=error.error)
            continue
        async with svc.db.sessions() as session, session.begin():
            await session.execute(
                update(LeaseRecord)
                .where(LeaseRecord.lease_id == record.lease_id)
                .values(cleaned_up=True)
            )
        cleaned += 1
    if cleaned:
        await svc.audit.append("credential.cleaned_up", outcome="success", count=cleaned)
    return cleaned


async def run_cleanup(svc: Services, interval: float = 3600) -> None:
    """Background task: `clean_up_expired` every `interval` seconds until cancelled."""
    while True:
        try:
            await clean_up_expired(svc)
        except Exception:  # the next round tries again; the broker keeps serving
            log.exception("lease.cleanup_round_failed")
        await asyncio.sleep(interval)


def expires_in(credential: Credential) -> int:
    return max(0, int(credential.expires_at.timestamp() - time.time()))
