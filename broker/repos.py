"""Who may read (or write) which repository, and the upstream credentials the broker uses.

One path for every way a repo is reached (the git gateway, `/v1/credentials` with a repo
backend, reviewer grants): the repo is named `backend/owner/name`; the forge's facts and the
user's own forge permission become the Cedar `Repo` entity; `read_repo` / `write_repo`
decide. A token from a reviewer grant (claims `grant`, `repo`, optional `commit`) is
authorised by its grant instead, which must still be live, and only ever reads.

The upstream credential for an authorised request comes from `Services.remotes`
(`broker.remotes.RemoteCache`) and never leaves the broker.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from adapters.base import GitRemote, Principal, RepoFacts, RepoHost
from broker.errors import AccessDenied, InvalidRequest, InvalidToken, NotFound
from broker.services import Services
from broker.storage import GrantRecord
from policies.decision import Decision
from policies.engine import EntityRef, Resource

READ_SCOPE = "repo:read"
WRITE_SCOPE = "repo:write"
_SEGMENT = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,99}$")
FACTS_TTL = 60.0  # seconds a forge's answer about a repo is reused


@dataclass(frozen=True, slots=True)
class RepoRef:
    """A repository as the broker names it: `backend/owner/name` (GitLab subgroups are
    written with `~` for `/` in the owner: `gitlab/group~sub/project`)."""

    backend: str
    owner: str
    name: str

    @classmethod
    def parse(cls, text: str) -> RepoRef:
        """`backend/owner/name` (an optional `.git` suffix is dropped); InvalidRequest else."""
        parts = text.removesuffix(".git").split("/")
        if len(parts) != 3 or not all(parts):
            raise InvalidRequest("name a repository as backend/owner/name")
        backend, owner, name = parts
        for segment in (backend, name, *owner.split("~")):
            if not _SEGMENT.match(segment) or segment in (".", "..") or ".." in segment:
                raise InvalidRequest(f"{segment[:40]!r} is not a valid repository name part")
        return cls(backend, owner, name)

    @property
    def forge_owner(self) -> str:
        """The owner as the forge spells it (`group/sub` for a GitLab subgroup)."""
        return self.owner.replace("~", "/")

    def __str__(self) -> str:
        return f"{self.backend}/{self.owner}/{self.name}"


@dataclass(frozen=True, slots=True)
class RepoAccess:
    """What an authorised request may do. `acting_for` is the principal whose stored secret
    a generic host uses (the grant's author for a reviewer); `commit` pins a reviewer to one
    commit; `policies` are the deciding policy ids (or `grant:<id>`)."""

    ref: RepoRef
    principal_id: str
    acting_for: str
    write: bool
    policies: tuple[str, ...]
    grant_id: str | None = None
    commit: str | None = None
    jti: str | None = None
    client: str | None = None


def host_for(svc: Services, ref: RepoRef) -> RepoHost:
    host = svc.repo_hosts.get(ref.backend)
    if host is None:
        raise NotFound(f"there is no repository backend {ref.backend!r}")
    return host


class _FactsCache:
    """Forge answers reused for `FACTS_TTL` seconds (forges rate-limit their APIs)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, ...], tuple[float, Any]] = {}

    async def get(self, key: tuple[str, ...], load: Any) -> Any:
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = await load()
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[key] = (now + FACTS_TTL, value)
        return value


_facts = _FactsCache()


def forge_account(svc: Services, backend: str, principal: Principal) -> str | None:
    """The user's own account at this forge, from the claim the backend settings name."""
    config = next((b for b in svc.settings.backends if b.id == backend), None)
    claim = getattr(config, "account_claim", None)
    value = principal.claims.get(claim) if claim else None
    return str(value) if isinstance(value, str) and value else None


async def repo_entity(svc: Services, ref: RepoRef, principal: Principal) -> Resource:
    """The Cedar `Repo` entity: the forge's facts and this user's own permission there."""
    host = host_for(svc, ref)
    facts: RepoFacts = await _facts.get(
        ("facts", str(ref)), lambda: host.repo_facts(ref.forge_owner, ref.name)
    )
    account = forge_account(svc, ref.backend, principal)
    permission: str = "none"
    if account is not None:
        permission = await _facts.get(
            ("permission", str(ref), account),
            lambda: host.user_permission(ref.forge_owner, ref.name, account),
        )
    owner_is_user = account is not None and account.lower() == facts.namespace.lower()
    owner = principal.id if owner_is_user else f"forge:{ref.backend}/{facts.namespace}"
    attrs: dict[str, Any] = {
        "owner": EntityRef("User", owner),
        "backend": ref.backend,
        "namespace": facts.namespace,
        "visibility": facts.visibility,
        "permission": permission,
    }
    if facts.organisation is not None:
        attrs["organisation"] = facts.organisation
    return Resource("Repo", str(ref), attrs=attrs)


async def decide(svc: Services, principal: Principal, ref: RepoRef, action: str) -> Decision:
    """Cedar's answer for `action` (read_repo, write_repo, grant_repo, see_reviewers)."""
    resource = await repo_entity(svc, ref, principal)
    return svc.policy.decide(principal, action, resource)


def token_from(request: web.Request) -> str:
    """The broker token a git client or launcher sent: the password of HTTP Basic (any
    username; git's credential helpers send it this way) or a Bearer token."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            _user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            password = ""
        if password:
            return password
    error = InvalidToken("sign in with a broker token as the password (or a Bearer token)")
    error.headers["WWW-Authenticate"] = 'Basic realm="binder-broker", charset="UTF-8"'
    raise error


async def authorize(
    svc: Services, request: web.Request, ref: RepoRef, *, write: bool
) -> RepoAccess:
    """Authorise this request's token for `ref`. Raises InvalidToken (401, with a Basic
    challenge so git asks its credential helper), AccessDenied or NotFound; every refusal
    of a valid token is audited as `repo.denied`."""
    from broker.oauth.bearer import is_revoked
    from broker.oauth.issuance import load_principal

    host_for(svc, ref)
    try:
        claims = svc.tokens.verify(token_from(request), audience=svc.settings.server.public_url)
    except InvalidToken as error:
        error.headers.setdefault("WWW-Authenticate", 'Basic realm="binder-broker"')
        raise
    jti = str(claims["jti"])
    if await is_revoked(svc, jti):
        revoked = InvalidToken("the token was revoked")
        revoked.headers["WWW-Authenticate"] = 'Basic realm="binder-broker"'
        raise revoked
    subject = str(claims["sub"])
    audit = {"repo": str(ref), "write": write, "client": claims.get("client_id"), "jti": jti}
    if isinstance(claims.get("cnf"), Mapping):
        reason = "a key-bound (DPoP) token cannot be used by git; ask for an unbound one"
        await svc.audit.append("repo.denied", outcome="denied", actor=subject, reason=reason,
                               **audit)  # fmt: skip
        raise InvalidToken(reason)
    if "grant" in claims:
        return await _authorize_grant(svc, claims, ref, write=write, audit=audit)
    scopes = str(claims.get("scope", "")).split()
    needed = WRITE_SCOPE if write else READ_SCOPE
    if needed not in scopes:
        await svc.audit.append(
            "repo.denied", outcome="denied", actor=subject, reason=f"no scope {needed}", **audit
        )
        raise AccessDenied(f"the token does not carry the scope {needed}")
    principal = await load_principal(svc, subject)
    if principal is None:
        raise AccessDenied("repositories are read for a signed-in user, not a client")
    action = "write_repo" if write else "read_repo"
    decision = await decide(svc, principal, ref, action)
    if not decision.allowed:
        svc.metrics.denials.labels(action=action).inc()
        await svc.audit.append(
            "repo.denied", outcome="denied", actor=subject, policies=list(decision.reasons),
            **audit,
        )  # fmt: skip
        raise AccessDenied(f"no policy lets you {'write to' if write else 'read'} {ref}")
    client = audit["client"]
    return RepoAccess(
        ref, subject, subject, write, decision.reasons, jti=jti,
        client=str(client) if client is not None else None,
    )  # fmt: skip


async def _authorize_grant(
    svc: Services, claims: Mapping[str, Any], ref: RepoRef, *, write: bool,
    audit: dict[str, Any],
) -> RepoAccess:  # fmt: skip
    subject = str(claims["sub"])
    grant_id = str(claims["grant"])
    audit["grant"] = grant_id
    async with svc.db.reads() as session:
        record = await session.get(GrantRecord, grant_id)
    reason = None
    if record is None or record.revoked_at is not None:
        reason = "the grant was revoked"
    elif record.expires_at <= datetime.now(UTC):
        reason = "the grant has expired"
    elif claims.get("repo") != str(ref) or record.repo != str(ref):
        reason = "the grant is for another repository"
    elif write:
        reason = "a reviewer grant only reads"
    if reason is not None:
        await svc.audit.append("repo.denied", outcome="denied", actor=subject, reason=reason,
                               **audit)  # fmt: skip
        raise AccessDenied(reason)
    assert record is not None
    return RepoAccess(
        ref, subject, record.created_by, False, (f"grant:{grant_id}",), grant_id=grant_id,
        commit=record.commit, jti=str(claims["jti"]),
        client=str(claims["client_id"]) if claims.get("client_id") is not None else None,
    )  # fmt: skip


async def remote_for(svc: Services, access: RepoAccess, *, ttl: int = 3600) -> GitRemote:
    """The upstream credential for an authorised request (cached; never sent to a client)."""
    return await svc.remotes.get(
        host_for(svc, access.ref), access.ref.forge_owner, access.ref.name,
        write=access.write, acting_for=access.acting_for, ttl=ttl,
    )  # fmt: skip
