"""Protocols and value types shared by every adapter.

Adapters return these values and raise `adapters.errors` types; they never write HTTP
responses and never read broker settings. Optional capabilities are small separate
protocols checked with `isinstance`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from policies.decision import Limits


def principal_id(issuer: str, subject: str) -> str:
    """Stable, opaque id for a (issuer, subject) pair; never an email address."""
    digest = hashlib.sha256(f"{issuer}\x00{subject}".encode()).hexdigest()
    return f"u-{digest[:32]}"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who signed in, normalised from any upstream protocol."""

    idp: str
    issuer: str
    subject: str
    display_name: str = ""
    email: str | None = None
    groups: tuple[str, ...] = ()
    affiliation: tuple[str, ...] = ()
    acr: str | None = None
    amr: tuple[str, ...] = ()
    mfa: bool = False
    auth_time: int = 0
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.subject:
            raise ValueError("a Principal needs a non-empty subject")

    @property
    def id(self) -> str:
        return principal_id(self.issuer, self.subject)

    def to_json(self) -> dict[str, Any]:
        """Serialisable form for the server-side session store (no upstream tokens)."""
        return {
            "idp": self.idp,
            "issuer": self.issuer,
            "subject": self.subject,
            "display_name": self.display_name,
            "email": self.email,
            "groups": list(self.groups),
            "affiliation": list(self.affiliation),
            "acr": self.acr,
            "amr": list(self.amr),
            "mfa": self.mfa,
            "auth_time": self.auth_time,
            "claims": dict(self.claims),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Principal:
        return cls(
            idp=str(data["idp"]),
            issuer=str(data["issuer"]),
            subject=str(data["subject"]),
            display_name=str(data.get("display_name", "")),
            email=data.get("email"),
            groups=tuple(data.get("groups", ())),
            affiliation=tuple(data.get("affiliation", ())),
            acr=data.get("acr"),
            amr=tuple(data.get("amr", ())),
            mfa=bool(data.get("mfa", False)),
            auth_time=int(data.get("auth_time", 0)),
            claims=dict(data.get("claims", {})),
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """What a policy allowed: the input to a downstream backend.

    `ttl` is the lifetime to issue, already clipped to the policy's `max_ttl` (a backend may
    shorten it to its own bounds, never lengthen it). `role` and `project` are the optional
    request fields of `POST /v1/credentials`; `resources` the requested cpu, memory_gb,
    disk_gb and gpu; `client` the OAuth client that asked (None for a browser session).
    """

    principal: Principal
    action: str
    resource: str
    audience: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    policy_ids: tuple[str, ...] = ()
    ttl: int = 0
    role: str | None = None
    project: str | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    client: str | None = None


@dataclass(frozen=True, slots=True)
class Credential:
    """A short-lived downstream credential. `secret` never shows in `repr`.

    `handle` is what a later revocation or clean-up needs (an id, never a secret); the broker
    stores it with the lease. `details` are non-secret facts worth showing the caller (the
    role assumed, the roles and access rules of an application credential, ...).
    """

    backend: str
    kind: str
    secret: Mapping[str, Any] = field(repr=False)
    expires_at: datetime
    lease_id: str
    handle: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoginFlow:
    """One browser sign-in in progress (state kept server-side by the broker)."""

    id: str
    upstream: str
    callback_url: str
    next_url: str
    login_hint: str | None = None
    idp_hint: str | None = None
    # The user must authenticate anew at the upstream, not ride an existing IdP session
    # (`prompt=login` or an exceeded `max_age` at /oauth/authorize): SAML ForceAuthn, OIDC
    # prompt=login.
    force_authn: bool = False


@dataclass(frozen=True, slots=True)
class Redirect:
    url: str


@dataclass(frozen=True, slots=True)
class FormPost:
    """An auto-submitting HTML form (SAML HTTP-POST binding, LTI)."""

    url: str
    fields: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class LocalForm:
    """Ask the broker to render its own sign-in form for this upstream (dev adapter)."""

    upstream: str
    fields: Sequence[str]
    choices: Mapping[str, Sequence[str]] = field(default_factory=dict)


class SignInAgain(Exception):
    """Raised by `Upstream.complete` when the upstream needs the user to authenticate again
    before it answers (a session requirement such as MFA or a particular linked identity):
    the broker sends the browser to `url`, and the same sign-in flow goes on. `reason` is
    for the audit record (never a secret)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(reason)
        self.url = url
        self.reason = reason


class Upstream(Protocol):
    """Federates sign-in to one external identity system."""

    id: str
    display_name: str

    async def begin(self, flow: LoginFlow) -> Redirect | FormPost | LocalForm: ...

    async def complete(self, flow: LoginFlow, params: Mapping[str, str]) -> Principal: ...


@runtime_checkable
class PlatformInitiated(Protocol):
    """An upstream whose sign-ins start elsewhere (an LTI platform's launch): the chooser
    never offers it, and `begin` refuses."""

    platform_initiated: bool


@runtime_checkable
class Refreshable(Protocol):
    async def refresh(self, principal: Principal) -> Principal: ...


@dataclass(frozen=True, slots=True)
class Document:
    """A document an upstream publishes (SAML SP metadata, LTI tool JWKS)."""

    content_type: str
    body: bytes


@runtime_checkable
class ServesMetadata(Protocol):
    """Served by the broker at `GET /login/{upstream id}/metadata`."""

    def metadata(self) -> Document: ...


@dataclass(frozen=True, slots=True)
class IdpChoice:
    """One identity provider behind a federated upstream, as the chooser lists it."""

    entity_id: str
    display_name: str


@runtime_checkable
class Federated(Protocol):
    """An upstream that fronts many IdPs (a SAML federation): the chooser searches it and
    passes the chosen entity id to `begin` as `LoginFlow.idp_hint`."""

    def find_idps(self, query: str, limit: int) -> Sequence[IdpChoice]:
        """IdPs whose display name (or entity id) contains every word of `query`, best first;
        an empty query lists the first `limit` in display-name order."""
        ...

    async def idp(self, entity_id: str) -> IdpChoice | None:
        """The IdP with this entity id, or None: a dictionary lookup, never a scan (an MDQ
        source may fetch the entity the first time it is asked for)."""
        ...


@runtime_checkable
class Lifecycle(Protocol):
    """An upstream with background work (metadata refresh): started after the broker's
    peers are up, closed at shutdown."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class ReplayCache(Protocol):
    """The part of the broker's shared cache an adapter may use (assertion-id, nonce and
    state replay checks). `add` is atomic across replicas: exactly one caller gets True."""

    async def add(self, key: str, value: str, ttl: float) -> bool: ...

    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str, ttl: float) -> None: ...

    async def pop(self, key: str) -> str | None: ...


class Backend(Protocol):
    """Turns an allowed Grant into a short-lived downstream credential."""

    id: str

    async def issue(self, grant: Grant) -> Credential: ...


@runtime_checkable
class Revocable(Protocol):
    """A backend that can end a credential before it expires (and clean up expired ones)."""

    async def revoke(self, lease_id: str, handle: Mapping[str, str]) -> None:
        """End the credential of this lease; succeed if it is already gone."""
        ...


class TokenSigner(Protocol):
    """Signs JWTs with the broker's key ring (keys published at its JWKS): for downstream
    systems that trust the broker as an identity provider, e.g. AWS STS web identity."""

    @property
    def issuer(self) -> str: ...

    async def sign(self, claims: Mapping[str, Any], *, audience: str, ttl: int) -> str:
        """A JWT with `iss`, `aud`, `iat`, `nbf`, `exp`, `jti` and a `kid` header added to
        `claims`; `sub` must be in `claims`."""
        ...


# --- repositories ------------------------------------------------------------------------

Permission = str  # "admin" | "write" | "read" | "none", a forge's own word mapped to these


@dataclass(frozen=True, slots=True)
class RepoFacts:
    """What a forge says about one repository: the attributes of the policy's `Repo` entity.

    `namespace` is the forge account that holds the repo (a user or organisation login, a
    GitLab group path, a Bitbucket project key); `organisation` is set when that account is
    an organisation (GitHub org, GitLab group, Bitbucket workspace/project), None for a
    personal account. `visibility` is "public", "internal" or "private".
    """

    namespace: str
    visibility: str
    organisation: str | None = None
    default_branch: str | None = None


@dataclass(frozen=True, slots=True)
class GitRemote:
    """How the broker itself reaches one repository over git smart HTTP.

    `url` is the repository's base URL (`https://host/owner/repo.git`); the gateway appends
    `/info/refs`, `/git-upload-pack`. The credential goes into an `Authorization: Basic`
    header (username, password), or `Authorization: Bearer password` when `username` is
    empty. It never leaves the broker. `token_id` is what `release` needs (never a secret);
    `expires_at` None means the secret does not expire by itself (a stored secret).
    """

    url: str
    username: str
    password: str = field(repr=False)
    expires_at: datetime | None = None
    token_id: str | None = None
    write: bool = False


@runtime_checkable
class RepoHost(Protocol):
    """A forge or git host whose repositories the broker can reach (GitHub App, GitLab,
    Bitbucket, a generic host with a stored secret). Repo names are `owner/name` as the
    forge spells them; every method raises `adapters.errors.NotFound` for an unknown repo.
    """

    id: str

    async def repo_facts(self, owner: str, name: str) -> RepoFacts: ...

    async def user_permission(self, owner: str, name: str, account: str | None) -> Permission:
        """The forge account `account`'s own permission on the repo; "none" when the
        account is None or has none."""
        ...

    async def remote(
        self, owner: str, name: str, *, write: bool, principal_id: str, ttl: int
    ) -> GitRemote:
        """A fresh credential for this one repository only, read-only unless `write`,
        living at most `ttl` seconds where the forge lets the broker choose."""
        ...

    async def release(self, remote: GitRemote) -> None:
        """Revoke `remote`'s credential early; succeed if it is already gone."""
        ...
