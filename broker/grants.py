"""Reviewer grants: time-boxed, read-only access to one repository (optionally one commit)
for a journal's reviewers.

Whoever Cedar lets `grant_repo` on a repo (its owner, a forge admin, an editor by site
policy) creates a grant and receives a capability link `{public_url}/review?k={secret}` once;
the secret (32 random bytes) is stored only as its SHA-256. The link sits in the query, not
the path, because the broker's request log records paths and never query strings.

Redeeming checks the grant is live and the reviewer is the one it names, then counts the use
atomically in SQL (`UPDATE … WHERE uses < max_uses`), records a `RedemptionRecord` under a
pseudonym ("Reviewer N") and mints a broker access token for client `broker-review` with scope
`repo:read` and the claims `grant`, `repo` and (when pinned) `commit`, which
`broker.repos.authorize` checks against the live grant on every use. Anyone allowed
`grant_repo` sees pseudonyms; only `see_reviewers` (an editor) sees who redeemed, and only
they can export a signed access receipt. Every step, refusals included, is audited with the
grant id.

Reviewer kinds: `email` (the signed-in principal's email, case-insensitive), `orcid` (an
`orcid` claim holding the iD, bare or as `https://orcid.org/iD`, or a sign-in through the
ORCID OpenID provider, issuer `https://orcid.org`, whose subject is the iD), `any-signed-in`,
and `anonymous` (signed in or not; without sign-in the reviewer gets a fresh `anon-…` id).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
)
from sqlalchemy import select, update

from adapters.base import Principal
from broker.errors import AccessDenied, InvalidRequest, NotFound
from broker.oauth.bearer import revoke_access_token
from broker.repos import READ_SCOPE, RepoRef, decide, host_for
from broker.services import Services
from broker.storage import AuditIndex, GrantRecord, RedemptionRecord

GRANTS_SCOPE = "grants"  # what a broker access token needs to call /v1/grants
REVIEW_CLIENT = "broker-review"  # the client_id of tokens minted by a redemption
RECEIPT_TYP = "grant-receipt+jwt"
ORCID_ISSUER = "https://orcid.org"
ANONYMOUS_PREFIX = "anon-"
_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
_ORCID = re.compile(r"^\d{4}-\d{4}-\d{4}-\d{3}[\dX]$")
# A branch or tag name git accepts (a conservative subset of git-check-ref-format).
_REF = re.compile(
    r"^(?![/.])(?!.*(?:\.\.|//|@\{|/\.))[A-Za-z0-9._/@+-]{1,200}(?<![/.])(?<!\.lock)$"
)
_EMAIL = r"^[^@\s]{1,64}@[^@\s]{1,255}$"
MAX_NOTE = 2000


class GrantUnavailable(AccessDenied):
    """A review link that exists but cannot be used (expired, revoked, used up, or for
    another reviewer)."""

    title = "This review link cannot be used"


def orcid_checksum_ok(orcid: str) -> bool:
    """ISO 7064 MOD 11-2, as ORCID computes the last character of an iD."""
    digits = orcid.replace("-", "")
    total = 0
    for char in digits[:-1]:
        total = (total + int(char)) * 2
    check = (12 - total % 11) % 11
    return digits[-1] == ("X" if check == 10 else str(check))


def normalise_orcid(value: str) -> str | None:
    """The bare iD (`0000-0002-1825-0097`) of an iD or ORCID URL, or None if it is not one."""
    text = value.strip()
    for prefix in ("https://orcid.org/", "http://orcid.org/"):
        if text.lower().startswith(prefix):
            text = text[len(prefix) :]
    text = text.upper()
    return text if _ORCID.match(text) and orcid_checksum_ok(text) else None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmailReviewer(_Strict):
    email: str = Field(pattern=_EMAIL, max_length=320)


class OrcidReviewer(_Strict):
    orcid: str = Field(max_length=64)

    @field_validator("orcid")
    @classmethod
    def _orcid(cls, value: str) -> str:
        bare = normalise_orcid(value)
        if bare is None:
            raise ValueError("not an ORCID iD (e.g. 0000-0002-1825-0097)")
        return bare


def _must_be_true(value: bool) -> bool:
    if value is not True:
        raise ValueError("must be true")
    return value


# JSON `true` only (not 1, not "true").
TrueFlag = Annotated[StrictBool, AfterValidator(_must_be_true)]


class AnySignedInReviewer(_Strict):
    any_signed_in: TrueFlag


class AnonymousReviewer(_Strict):
    anonymous: TrueFlag


Reviewer = EmailReviewer | OrcidReviewer | AnySignedInReviewer | AnonymousReviewer


class GrantRequest(_Strict):
    """The body of `POST /v1/grants`."""

    repo: str = Field(max_length=400, description="backend/owner/name")
    ref: str | None = None
    commit: str | None = Field(default=None, pattern=r"^[0-9a-f]{40}$")
    expires_at: AwareDatetime
    max_uses: Annotated[StrictInt, Field(ge=1)] = 1
    reviewer: Reviewer
    note: str = Field(default="", max_length=MAX_NOTE)

    @field_validator("ref")
    @classmethod
    def _ref(cls, value: str | None) -> str | None:
        if value is not None and not _REF.match(value):
            raise ValueError("not a branch or tag name")
        return value

    def reviewer_fields(self) -> tuple[str, str | None]:
        """(reviewer_kind, reviewer) as stored."""
        match self.reviewer:
            case EmailReviewer(email=email):
                return "email", email
            case OrcidReviewer(orcid=orcid):
                return "orcid", orcid
            case AnySignedInReviewer():
                return "any-signed-in", None
            case _:
                return "anonymous", None


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def capability_url(svc: Services, secret: str) -> str:
    return f"{svc.settings.server.public_url}/review?k={secret}"


def clone_url(svc: Services, repo: str) -> str:
    """The gateway URL git clones through (the broker injects the upstream credential)."""
    ref = RepoRef.parse(repo)
    return f"{svc.settings.server.public_url}/git/{ref.backend}/{ref.owner}/{ref.name}.git"


def launch_url(svc: Services, record: GrantRecord) -> str | None:
    """The launcher link from `[grants] launcher_url`, or None when none is configured."""
    template = svc.settings.grants.launcher_url
    if template is None:
        return None
    ref = record.commit or record.ref or "HEAD"
    return template.replace("{repo_url}", quote(clone_url(svc, record.repo), safe="")).replace(
        "{ref}", quote(ref, safe="")
    )


async def _audit_denied(
    svc: Services, event: str, principal_id: str | None, reason: str, **fields: Any
) -> None:
    svc.metrics.denials.labels(action=event).inc()
    await svc.audit.append(event, outcome="denied", actor=principal_id, reason=reason, **fields)


async def _require(
    svc: Services, principal: Principal, ref: RepoRef, action: str, *, what: str, **fields: Any
) -> tuple[str, ...]:
    """Cedar's `action` on the repo, or AccessDenied with a `grant.denied` audit record."""
    decision = await decide(svc, principal, ref, action)
    if not decision.allowed:
        await _audit_denied(
            svc, "grant.denied", principal.id, f"no policy allows {action}", repo=str(ref),
            action=what, policies=list(decision.reasons), **fields,
        )  # fmt: skip
        raise AccessDenied(f"no policy lets you {what} on {ref}", reasons=decision.reasons)
    return decision.reasons


async def may(svc: Services, principal: Principal, repo: str, action: str) -> bool:
    """Whether Cedar allows `action` (grant_repo, see_reviewers) on `repo` for `principal`."""
    return (await decide(svc, principal, RepoRef.parse(repo), action)).allowed


# --- creating, listing, revoking -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Created:
    record: GrantRecord
    secret: str  # shown once, in the capability URL; never stored or logged


async def create_grant(svc: Services, principal: Principal, body: GrantRequest) -> Created:
    """Check the policy and the bounds, store the grant (secret hashed) and audit it."""
    ref = RepoRef.parse(body.repo)
    host_for(svc, ref)
    policies = await _require(svc, principal, ref, "grant_repo", what="create a grant")
    now = datetime.now(UTC)
    limits = svc.settings.grants
    if body.expires_at <= now + timedelta(seconds=60):
        raise InvalidRequest("expires_at must be at least a minute in the future")
    if body.expires_at > now + timedelta(seconds=limits.max_lifetime):
        days = limits.max_lifetime // 86400
        raise InvalidRequest(f"a grant lasts at most {days} days; choose an earlier expires_at")
    if body.max_uses > limits.max_uses:
        raise InvalidRequest(f"max_uses may be at most {limits.max_uses}")
    kind, reviewer = body.reviewer_fields()
    secret = secrets.token_urlsafe(32)
    record = GrantRecord(
        id="grt_" + secrets.token_urlsafe(12), secret_hash=secret_hash(secret), repo=str(ref),
        commit=body.commit, ref=body.ref, created_by=principal.id, created_at=now,
        expires_at=body.expires_at.astimezone(UTC).replace(microsecond=0),
        max_uses=body.max_uses, uses=0, reviewer_kind=kind, reviewer=reviewer, note=body.note,
    )  # fmt: skip
    async with svc.db.sessions() as db, db.begin():
        db.add(record)
    await svc.audit.append(
        "grant.created", outcome="success", actor=principal.id, grant=record.id,
        repo=record.repo, commit=record.commit, ref=record.ref, max_uses=record.max_uses,
        expires_at=iso(record.expires_at), reviewer_kind=kind, policies=list(policies),
    )  # fmt: skip
    return Created(record, secret)


def redemption_view(row: RedemptionRecord, *, identities: bool) -> dict[str, Any]:
    """A redemption as listed: the pseudonym for everyone, who it was only for editors."""
    view: dict[str, Any] = {
        "pseudonym": row.pseudonym,
        "signed_in": row.signed_in,
        "redeemed_at": iso(row.redeemed_at),
        "expires_at": iso(row.expires_at),
    }
    if identities:
        view |= {"principal_id": row.principal_id, "display": row.display, "jti": row.token_jti}
    return view


def grant_view(
    record: GrantRecord,
    redemptions: Sequence[RedemptionRecord],
    *,
    identities: bool,
    reveal_reviewer: bool,
) -> dict[str, Any]:
    """A grant as `GET /v1/grants` shows it. The email or ORCID iD the grant names is shown
    to its creator and to editors; an author who did not create it sees only the kind."""
    reviewer: dict[str, Any] = {"kind": record.reviewer_kind}
    if record.reviewer is not None and reveal_reviewer:
        reviewer[record.reviewer_kind] = record.reviewer
    now = datetime.now(UTC)
    status = (
        "revoked" if record.revoked_at is not None
        else "expired" if record.expires_at <= now
        else "used" if record.uses >= record.max_uses
        else "live"
    )  # fmt: skip
    return {
        "id": record.id,
        "repo": record.repo,
        "ref": record.ref,
        "commit": record.commit,
        "created_by": record.created_by,
        "created_at": iso(record.created_at),
        "expires_at": iso(record.expires_at),
        "max_uses": record.max_uses,
        "uses": record.uses,
        "reviewer": reviewer,
        "note": record.note,
        "status": status,
        "revoked_at": iso(record.revoked_at) if record.revoked_at else None,
        "identities_visible": identities,
        "redemptions": [redemption_view(r, identities=identities) for r in redemptions],
    }


async def _redemptions(svc: Services, grant_ids: Iterable[str]) -> dict[str, list[Any]]:
    ids = list(grant_ids)
    found: dict[str, list[Any]] = {i: [] for i in ids}
    if not ids:
        return found
    async with svc.db.reads() as db:
        rows = await db.execute(
            select(RedemptionRecord)
            .where(RedemptionRecord.grant_id.in_(ids))
            .order_by(RedemptionRecord.redeemed_at, RedemptionRecord.id)
        )
        for row in rows.scalars():
            found[row.grant_id].append(row)
    return found


async def list_grants(
    svc: Services, principal: Principal, repo: str | None
) -> list[dict[str, Any]]:
    """With `repo`: every grant on it (needs `grant_repo`). Without: the grants the caller
    created, on repos where they may still grant. Identities need `see_reviewers`."""
    async with svc.db.reads() as db:
        query = select(GrantRecord).order_by(GrantRecord.created_at.desc()).limit(500)
        if repo is not None:
            ref = RepoRef.parse(repo)
            host_for(svc, ref)
            await _require(svc, principal, ref, "grant_repo", what="list grants")
            query = query.where(GrantRecord.repo == str(ref))
        else:
            query = query.where(GrantRecord.created_by == principal.id)
        records = list((await db.execute(query)).scalars())
    allowed: dict[str, tuple[bool, bool]] = {}
    for name in {r.repo for r in records}:
        if RepoRef.parse(name).backend not in svc.repo_hosts:
            allowed[name] = (False, False)  # a backend since removed from the settings
            continue
        allowed[name] = (
            await may(svc, principal, name, "grant_repo"),
            await may(svc, principal, name, "see_reviewers"),
        )
    visible = [r for r in records if allowed[r.repo][0]]
    redemptions = await _redemptions(svc, (r.id for r in visible))
    return [
        grant_view(
            r,
            redemptions[r.id],
            identities=allowed[r.repo][1],
            reveal_reviewer=allowed[r.repo][1] or r.created_by == principal.id,
        )
        for r in visible
    ]


async def _load(svc: Services, grant_id: str) -> GrantRecord:
    async with svc.db.reads() as db:
        record = await db.get(GrantRecord, grant_id)
    if record is None:
        raise NotFound("there is no grant with that id")
    return record


async def revoke_grant(svc: Services, principal: Principal, grant_id: str) -> dict[str, Any]:
    """Revoke the grant and every token its redemptions yielded (their jti go on the
    revoked list until they would have expired)."""
    record = await _load(svc, grant_id)
    await _require(
        svc, principal, RepoRef.parse(record.repo), "grant_repo", what="revoke a grant",
        grant=record.id,
    )  # fmt: skip
    now = datetime.now(UTC)
    async with svc.db.sessions() as db, db.begin():
        await db.execute(
            update(GrantRecord)
            .where(GrantRecord.id == record.id, GrantRecord.revoked_at.is_(None))
            .values(revoked_at=now, revoked_by=principal.id)
            .execution_options(synchronize_session=False)
        )
        record = await db.get(GrantRecord, grant_id, populate_existing=True) or record
        rows = list(
            (
                await db.execute(
                    select(RedemptionRecord).where(RedemptionRecord.grant_id == record.id)
                )
            ).scalars()
        )
    live = [r for r in rows if r.expires_at > now]
    for row in live:
        await revoke_access_token(svc, row.token_jti, row.expires_at.timestamp())
    await svc.audit.append(
        "grant.revoked", outcome="success", actor=principal.id, grant=record.id,
        repo=record.repo, revoked_jti=[r.token_jti for r in live],
    )  # fmt: skip
    identities = await may(svc, principal, record.repo, "see_reviewers")
    return grant_view(
        record, rows, identities=identities,
        reveal_reviewer=identities or record.created_by == principal.id,
    )  # fmt: skip


async def receipt(svc: Services, principal: Principal, grant_id: str) -> dict[str, Any]:
    """The editor's access receipt: a JWS (typ `grant-receipt+jwt`) signed by the broker's
    current key, verifiable against its JWKS, listing the grant, every redemption (with who)
    and every audit record that names the grant (redemptions, refusals, gateway uses,
    revocation), each with its chain position and hash."""
    record = await _load(svc, grant_id)
    await _require(
        svc, principal, RepoRef.parse(record.repo), "see_reviewers", what="export a receipt",
        grant=record.id,
    )  # fmt: skip
    rows = (await _redemptions(svc, [record.id]))[record.id]
    async with svc.db.reads() as db:
        audit_rows = list(
            (
                await db.execute(
                    select(AuditIndex)
                    .where(AuditIndex.data["grant"].as_string() == record.id)
                    .order_by(AuditIndex.chain, AuditIndex.seq)
                    .limit(10_000)
                )
            ).scalars()
        )
    now = int(time.time())
    claims = {
        "iss": svc.tokens.issuer,
        "iat": now,
        "jti": secrets.token_urlsafe(18),
        "sub": record.id,
        "requested_by": principal.id,
        "grant": grant_view(record, rows, identities=True, reveal_reviewer=True),
        "events": [
            {
                "chain": a.chain,
                "seq": a.seq,
                "ts": iso(a.ts),
                "event": a.event,
                "outcome": a.outcome,
                "actor": a.actor,
                "hash": a.record_hash,
                "data": a.data,
            }
            for a in audit_rows
        ],
    }
    key = svc.keyring.signer()
    signed = await svc.tokens.sign_jws(key, RECEIPT_TYP, claims)
    await svc.audit.append(
        "grant.receipt", outcome="success", actor=principal.id, grant=record.id,
        receipt_jti=claims["jti"], kid=key.kid, events=len(audit_rows),
    )  # fmt: skip
    return {"grant_id": record.id, "receipt": signed, "kid": key.kid, "issued_at": now}


# --- redeeming -------------------------------------------------------------------------------


async def find_by_secret(svc: Services, secret: str, *, actor: str | None) -> GrantRecord:
    """The grant a link's secret opens; NotFound (audited) for a malformed or unknown one."""
    if not _SECRET.match(secret):
        await _audit_denied(svc, "grant.redeem_denied", actor, "malformed review link")
        raise NotFound("This review link is not valid. Check that you copied all of it.")
    digest = secret_hash(secret)
    async with svc.db.reads() as db:
        record = (
            await db.execute(select(GrantRecord).where(GrantRecord.secret_hash == digest))
        ).scalar_one_or_none()
    if record is None:
        await _audit_denied(
            svc, "grant.redeem_denied", actor, "unknown review link", link_hash=digest[:16]
        )
        raise NotFound("This review link is not valid. Check that you copied all of it.")
    return record


def unavailable_reason(record: GrantRecord, now: datetime | None = None) -> str | None:
    """Why this grant cannot be redeemed now, or None."""
    now = now or datetime.now(UTC)
    if record.revoked_at is not None:
        return "the grant was revoked"
    if record.expires_at <= now:
        return "the grant has expired"
    if record.uses >= record.max_uses:
        return "the grant has been used as often as it allows"
    return None


async def check_available(svc: Services, record: GrantRecord, *, actor: str | None) -> None:
    """GrantUnavailable (audited) for an expired, revoked or used-up grant."""
    reason = unavailable_reason(record)
    if reason is not None:
        await _audit_denied(
            svc, "grant.redeem_denied", actor, reason, grant=record.id, repo=record.repo
        )
        raise GrantUnavailable(f"This review link cannot be used: {reason}.")


def principal_orcid(principal: Principal) -> str | None:
    """The ORCID iD a principal carries: an `orcid` claim, or a sign-in through ORCID."""
    claim = principal.claims.get("orcid")
    if isinstance(claim, str) and (bare := normalise_orcid(claim)) is not None:
        return bare
    if principal.issuer.rstrip("/") == ORCID_ISSUER:
        return normalise_orcid(principal.subject)
    return None


def reviewer_matches(record: GrantRecord, principal: Principal | None) -> bool:
    """Whether `principal` (None: not signed in) is the reviewer the grant names."""
    kind = record.reviewer_kind
    if kind == "anonymous":
        return True
    if principal is None:
        return False
    if kind == "any-signed-in":
        return True
    if kind == "email":
        email = principal.email or ""
        return bool(email) and email.casefold() == (record.reviewer or "").casefold()
    if kind == "orcid":
        return principal_orcid(principal) == record.reviewer
    return False  # an unknown kind: fail closed


def reviewer_description(record: GrantRecord) -> str:
    """Who may redeem, in words for the review page (which never shows the email or iD: a
    forwarded link must not reveal whom it was meant for)."""
    return {
        "email": "one named reviewer: sign in with the account whose email address the editor gave",
        "orcid": "one named reviewer: sign in with an account that carries the ORCID iD the "
        "editor gave (for example through ORCID)",
        "any-signed-in": "anyone who signs in",
        "anonymous": "anyone with this link, signed in or not",
    }.get(record.reviewer_kind, "nobody")


@dataclass(frozen=True, slots=True)
class Redeemed:
    """What the reviewer is shown once. `token` is never logged or stored."""

    token: str
    jti: str
    expires_at: datetime
    pseudonym: str
    grant: GrantRecord


async def audit_refusal(svc: Services, record: GrantRecord, actor: str | None, reason: str) -> None:
    """Audit a refused redemption of `record` (`grant.redeem_denied`)."""
    await _audit_denied(
        svc, "grant.redeem_denied", actor, reason, grant=record.id, repo=record.repo
    )


async def refuse(
    svc: Services, record: GrantRecord, actor: str | None, reason: str, message: str
) -> GrantUnavailable:
    """Audit a refused redemption; returns the error (showing `message`) to raise."""
    await audit_refusal(svc, record, actor, reason)
    return GrantUnavailable(message)


async def redeem(svc: Services, record: GrantRecord, principal: Principal | None) -> Redeemed:
    """Count one use and mint the reviewer's token, or refuse (audited, nothing issued).

    `principal` None redeems pseudonymously (only an anonymous grant allows it). The caller
    has checked the CSRF token.
    """
    actor = principal.id if principal is not None else None
    if principal is None and record.reviewer_kind != "anonymous":
        raise await refuse(
            svc, record, actor, "sign-in required", "Sign in to use this review link."
        )
    if not reviewer_matches(record, principal):
        raise await refuse(
            svc, record, actor, "not the named reviewer",
            "This review link is for another reviewer. Sign in with the account it names.",
        )  # fmt: skip
    subject = principal.id if principal is not None else ANONYMOUS_PREFIX + secrets.token_hex(12)
    display = ""
    if principal is not None:
        name = principal.display_name or principal.subject
        display = f"{name} <{principal.email}>" if principal.email else name
    now = datetime.now(UTC)
    minted, pseudonym = None, ""
    async with svc.db.sessions() as db, db.begin():
        # The use is counted first: the row lock (PostgreSQL) or the write lock (SQLite,
        # BEGIN IMMEDIATE) serialises concurrent redemptions of this grant until commit.
        counted = await db.execute(
            update(GrantRecord)
            .where(
                GrantRecord.id == record.id,
                GrantRecord.uses < GrantRecord.max_uses,
                GrantRecord.revoked_at.is_(None),
                GrantRecord.expires_at > now,
            )
            .values(uses=GrantRecord.uses + 1)
            .returning(GrantRecord.uses)
            .execution_options(synchronize_session=False)
        )
        if counted.first() is not None:
            earlier = (
                await db.execute(
                    select(RedemptionRecord.principal_id, RedemptionRecord.pseudonym).where(
                        RedemptionRecord.grant_id == record.id
                    )
                )
            ).all()
            pseudonym = next(
                (p for who, p in earlier if who == subject),
                f"Reviewer {len({p for _, p in earlier}) + 1}",
            )
            ttl = max(int((record.expires_at - now).total_seconds()), 1)
            minted = await svc.tokens.mint(
                subject=subject,
                audience=svc.settings.server.public_url,
                client_id=REVIEW_CLIENT,
                scope=(READ_SCOPE,),
                ttl=min(ttl, svc.tokens.max_ttl),
                auth_time=principal.auth_time if principal is not None else None,
                extra={"grant": record.id, "repo": record.repo}
                | ({"commit": record.commit} if record.commit else {}),
            )
            expires_at = datetime.fromtimestamp(minted.expires_at, UTC)
            db.add(
                RedemptionRecord(
                    id="red_" + secrets.token_urlsafe(12),
                    grant_id=record.id,
                    principal_id=subject,
                    pseudonym=pseudonym,
                    signed_in=principal is not None,
                    display=display,
                    token_jti=minted.jti,
                    redeemed_at=now,
                    expires_at=expires_at,
                )
            )
    if minted is None:
        latest = await _load(svc, record.id)
        reason = unavailable_reason(latest, now) or "the grant changed"
        raise await refuse(
            svc, record, actor, reason, f"This review link cannot be used: {reason}."
        )
    await svc.audit.append(
        "grant.redeemed", outcome="success", actor=subject, grant=record.id, repo=record.repo,
        commit=record.commit, jti=minted.jti, pseudonym=pseudonym,
        signed_in=principal is not None, expires_at=minted.expires_at,
    )  # fmt: skip
    return Redeemed(minted.token, minted.jti, expires_at, pseudonym, record)
