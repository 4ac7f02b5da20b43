"""Broker settings: one TOML file validated by pydantic v2.

Every model forbids unknown keys. Secrets are literal strings (held as `SecretStr`) or
references: `{ env = "NAME" }`, `{ file = "/path" }`, `{ vault = "mount/path#field" }`.
Adapter families are discriminated unions on `type`: adding an adapter is one config model
plus one union member. Validation has no side effects; `load_settings` reports every problem
at once as `SettingsError.problems`, each prefixed with the dotted path of the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def _parse_duration(value: Any) -> Any:
    """Accept seconds as an integer or a string such as "90s", "15m", "12h", "30d"."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"not a duration: {value!r} (use seconds or e.g. '15m', '12h', '30d')")
        return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


Duration = Annotated[int, BeforeValidator(_parse_duration), Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- secret references -------------------------------------------------------------------


class EnvRef(_Model):
    """A secret read from an environment variable at start-up."""

    env: str = Field(min_length=1)


class FileRef(_Model):
    """A secret read from a file (e.g. a mounted Kubernetes secret) at start-up."""

    file: Path


class VaultRef(_Model):
    """A secret read from Vault KV v2 at start-up: `mount/path#field`."""

    vault: str = Field(pattern=r"^[^#\s]+/[^#\s]+#[^#\s]+$")

    @property
    def mount(self) -> str:
        return self.vault.split("/", 1)[0]

    @property
    def path(self) -> str:
        return self.vault.split("/", 1)[1].split("#", 1)[0]

    @property
    def field(self) -> str:
        return self.vault.split("#", 1)[1]


def _secret_kind(value: Any) -> str | None:
    if isinstance(value, str | SecretStr):
        return "secret=literal"
    if isinstance(value, EnvRef | FileRef | VaultRef):
        return f"secret={type(value).__name__}"
    if isinstance(value, Mapping) and len(value) == 1:
        kind = {"env": "EnvRef", "file": "FileRef", "vault": "VaultRef"}.get(next(iter(value)))
        return f"secret={kind}" if kind else None
    return None


SecretRef = Annotated[
    Annotated[SecretStr, Tag("secret=literal")]
    | Annotated[EnvRef, Tag("secret=EnvRef")]
    | Annotated[FileRef, Tag("secret=FileRef")]
    | Annotated[VaultRef, Tag("secret=VaultRef")],
    Discriminator(
        _secret_kind,
        custom_error_type="secret_reference",
        custom_error_message=(
            'a secret is a string or one of { env = "NAME" }, { file = "/path" }, '
            '{ vault = "mount/path#field" }'
        ),
    ),
]
SecretValue = SecretStr | EnvRef | FileRef | VaultRef


def _tag_by(key: str) -> Callable[[Any], str | None]:
    """Discriminator that names its tags `key=value`, so error paths can drop them."""

    def pick(value: Any) -> str | None:
        found = value.get(key) if isinstance(value, Mapping) else getattr(value, key, None)
        return f"{key}={found}" if isinstance(found, str) else None

    return pick


# --- sections ----------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _http_url(value: str) -> str:
    """An absolute URL, https unless the host is loopback (tests, `broker dev`)."""
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError("must use https unless the host is loopback")
    return value


def check_issuer_url(value: str) -> str:
    """An issuer identifier: absolute, https unless loopback, no query or fragment."""
    parts = urlsplit(_http_url(value))
    if parts.query or parts.fragment:
        raise ValueError("an issuer URL has no query or fragment (RFC 8414 §2)")
    return value.rstrip("/")


class ServerSettings(_Model):
    """Where the broker listens and the public URL it is reached at (its issuer)."""

    public_url: str = Field(description="issuer URL, e.g. https://broker.example.edu")
    bind_host: str = "127.0.0.1"
    bind_port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    session_ttl: Duration = 8 * 3600
    cookie_secure: bool = True

    @field_validator("public_url")
    @classmethod
    def _issuer_url(cls, value: str) -> str:
        return check_issuer_url(value)


def _not_from_vault(value: SecretValue) -> SecretValue:
    if isinstance(value, VaultRef):
        raise ValueError("the credential that opens Vault cannot itself be kept in Vault")
    return value


class TokenAuthSettings(_Model):
    method: Literal["token"]
    token: SecretRef

    _token_not_in_vault = field_validator("token")(_not_from_vault)


class AppRoleAuthSettings(_Model):
    method: Literal["approle"]
    role_id: str = Field(min_length=1)
    secret_id: SecretRef
    mount: str = "approle"

    _secret_not_in_vault = field_validator("secret_id")(_not_from_vault)


VaultAuthSettings = Annotated[
    Annotated[TokenAuthSettings, Tag("method=token")]
    | Annotated[AppRoleAuthSettings, Tag("method=approle")],
    Discriminator(_tag_by("method")),
]


class VaultSettings(_Model):
    """The Vault / OpenBao that holds every long-lived secret and the signing keys."""

    address: str
    auth: VaultAuthSettings
    kv_mount: str = "secret"
    transit_mount: str = "transit"
    prefix: str = Field(default="binder-broker", pattern=r"^[A-Za-z0-9._-]+$")
    ca_cert: Path | None = None
    namespace: str | None = None
    timeout: float = Field(default=5.0, gt=0)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL such as https://vault:8200")
        return value.rstrip("/")


class DatabaseSettings(_Model):
    url: str = "sqlite:///broker.db"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        scheme = value.split(":", 1)[0]
        if scheme not in ("sqlite", "sqlite+aiosqlite", "postgresql", "postgresql+asyncpg"):
            raise ValueError("use sqlite:///PATH or postgresql://USER@HOST/DB")
        return value


class CacheSettings(_Model):
    url: str = "memory://"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value != "memory://" and not value.startswith(("redis://", "rediss://")):
            raise ValueError("use memory:// or redis://HOST:PORT/DB")
        return value


class KeySettings(_Model):
    """Signing keys: algorithm, where they sign, and the rotation schedule.

    A new key is published `jwks_max_age + refresh_interval` before it signs, so every
    replica and every downstream JWKS cache has seen it first.
    """

    algorithm: Literal["ES256", "RS256"] = "ES256"
    signing: Literal["local", "transit"] = "local"
    rotation_interval: Duration = 30 * 86400
    jwks_max_age: Duration = 3600
    refresh_interval: Duration = Field(default=30, ge=1)
    max_staleness: Duration = 300

    @property
    def publish_ahead(self) -> int:
        return self.jwks_max_age + self.refresh_interval

    @model_validator(mode="after")
    def _schedule(self) -> KeySettings:
        if self.rotation_interval <= self.publish_ahead:
            raise ValueError(
                "rotation_interval must be longer than jwks_max_age + refresh_interval "
                f"({self.publish_ahead} s), or a key would be replaced before it signs"
            )
        return self


class TokenSettings(_Model):
    access_token_ttl: Duration = 600
    id_token_ttl: Duration = 600
    max_ttl: Duration = 86400
    clock_skew: Duration = 60

    @model_validator(mode="after")
    def _caps(self) -> TokenSettings:
        if max(self.access_token_ttl, self.id_token_ttl) > self.max_ttl:
            raise ValueError("access_token_ttl and id_token_ttl must not exceed max_ttl")
        return self


class PolicySettings(_Model):
    directory: Path | None = Field(
        default=None, description="folder of *.cedar files; the packaged defaults when unset"
    )


class AuditSettings(_Model):
    path: Path = Path("audit.log")
    chain: str = Field(default="main", pattern=r"^[A-Za-z0-9._-]+$")


class LoggingSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"


class GrantSettings(_Model):
    """Reviewer grants. `launcher_url` is a BinderHub-style launch link template with
    `{repo_url}` (the gateway clone URL, URL-encoded) and `{ref}` (the pinned commit, else the
    grant's ref, else HEAD), e.g. "https://mybinder.example/v2/git/{repo_url}/{ref}"."""

    launcher_url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    max_lifetime: Duration = Field(default=90 * 86400, ge=60)
    max_uses: int = Field(default=100, ge=1)


# --- adapter families --------------------------------------------------------------------


class DevUpstreamConfig(_Model):
    """Type-a-username sign-in for local development. Refuses to load outside dev mode."""

    type: Literal["dev"]
    id: str = Field(default="dev", pattern=r"^[a-z0-9][a-z0-9_-]*$")
    display_name: str = "Development sign-in (no password)"
    groups: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9:._/@-]+$")]] = Field(
        default_factory=lambda: ["students", "instructors", "broker-admins"]
    )

    @model_validator(mode="after")
    def _dev_only(self, info: ValidationInfo) -> DevUpstreamConfig:
        # "admin" commands (keys, audit, db) read a dev config but never build upstreams.
        context = info.context if isinstance(info.context, Mapping) else {}
        if context.get("mode", "production") not in ("dev", "admin"):
            raise ValueError(
                "the dev sign-in adapter only loads under `broker dev`; remove it from a "
                "production configuration"
            )
        return self


_UPSTREAM_ID = r"^[a-z0-9][a-z0-9_-]*$"
JwsAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]


HttpUrl = Annotated[str, BeforeValidator(lambda v: _http_url(v) if isinstance(v, str) else v)]


def _default_id_token_algs() -> list[JwsAlgorithm]:
    return ["RS256", "ES256"]


class OidcClaimMapping(_Model):
    """Which ID-token / userinfo claim fills each `Principal` field."""

    subject: str = "sub"
    email: str = "email"
    name: str = "name"
    groups: str = "groups"
    affiliation: str = "eduperson_scoped_affiliation"


class OidcUpstreamConfig(_Model):
    """Sign-in at an OpenID provider (CILogon, Google, Keycloak, ...): code flow with PKCE."""

    type: Literal["oidc"]
    id: str = Field(pattern=_UPSTREAM_ID)
    display_name: str
    issuer: Annotated[str, BeforeValidator(check_issuer_url)]
    client_id: str = Field(min_length=1)
    client_secret: SecretRef | None = None  # None: a public client (PKCE only)
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    id_token_algs: list[JwsAlgorithm] = Field(default_factory=_default_id_token_algs)
    claims: OidcClaimMapping = OidcClaimMapping()
    use_userinfo: bool = True
    # CILogon: "selected_idp" (or "idphint"); the chooser's entity hint is passed through.
    idp_hint_param: str | None = None
    auth_params: dict[str, str] = Field(default_factory=dict)
    keep_refresh_token: bool = False  # stored in Vault; enables upstream refresh
    clock_skew: Duration = 60

    @field_validator("scopes")
    @classmethod
    def _openid(cls, scopes: list[str]) -> list[str]:
        if "openid" not in scopes:
            raise ValueError("must include 'openid'")
        return scopes

    @field_validator("id_token_algs")
    @classmethod
    def _some_algs(cls, algs: list[JwsAlgorithm]) -> list[JwsAlgorithm]:
        if not algs:
            raise ValueError("list at least one algorithm")
        return algs


class MetadataFileConfig(_Model):
    """SAML metadata from a local file, trusted as it is (the operator put it there)."""

    file: Path


class MetadataUrlConfig(_Model):
    """A remote (aggregate) metadata document whose signature is checked against `signing_cert`
    (a PEM file). Refreshed per its validUntil/cacheDuration; the last good copy is kept."""

    url: HttpUrl
    signing_cert: Path
    min_refresh: Duration = 300
    max_refresh: Duration = 86400


class MetadataMdqConfig(_Model):
    """A Metadata Query (MDQ) service: `{mdq}/entities/{sha1 of entity id}` on demand, each
    answer's signature checked against `signing_cert`."""

    mdq: HttpUrl
    signing_cert: Path
    cache_ttl: Duration = 3600


def _metadata_kind(value: Any) -> str | None:
    keys = value.keys() if isinstance(value, Mapping) else type(value).model_fields.keys()
    for key in ("file", "url", "mdq"):
        if key in keys:
            return f"source={key}"
    return None


MetadataSourceConfig = Annotated[
    Annotated[MetadataFileConfig, Tag("source=file")]
    | Annotated[MetadataUrlConfig, Tag("source=url")]
    | Annotated[MetadataMdqConfig, Tag("source=mdq")],
    Discriminator(
        _metadata_kind,
        custom_error_type="metadata_source",
        custom_error_message=(
            'a metadata source is { file = "…" }, { url = "…", signing_cert = "…" } or '
            '{ mdq = "…", signing_cert = "…" }'
        ),
    ),
]


class SamlUpstreamConfig(_Model):
    """A SAML 2.0 service provider for one campus IdP or a whole federation."""

    type: Literal["saml"]
    id: str = Field(pattern=_UPSTREAM_ID)
    display_name: str
    entity_id: str | None = None  # default: {public_url}/login/{id}/metadata
    sp_key: SecretRef  # PEM private key: signs AuthnRequests, decrypts assertions
    sp_cert: Path  # PEM certificate published in the SP metadata
    metadata: list[MetadataSourceConfig] = Field(min_length=1)
    idp: str | None = None  # one IdP entity id; without it the chooser searches the metadata
    entity_categories: list[str] = Field(default_factory=list)  # IdP filter (any of)
    registration_authorities: list[str] = Field(default_factory=list)  # IdP filter (any of)
    clock_skew: Duration = 60
    mfa_contexts: list[str] = Field(default_factory=lambda: ["https://refeds.org/profile/mfa"])
    requested_authn_context: list[str] = Field(default_factory=list)


def _rs256() -> list[JwsAlgorithm]:
    return ["RS256"]


class LtiTargetConfig(_Model):
    """A launch URL at the launcher that LTI launches may land on (compared exactly)."""

    url: HttpUrl
    title: str = ""  # shown to instructors picking a link (Deep Linking); default: the URL


class LtiUpstreamConfig(_Model):
    """One LTI 1.3 platform registration (Canvas, Moodle, Blackboard ...): the broker is the
    tool. Launches start at the platform; see the README section on registering the tool.
    Needs `[keys] algorithm = "RS256"`: platforms verify tool messages with RS256 only."""

    type: Literal["lti"]
    id: str = Field(pattern=_UPSTREAM_ID)  # the {platform} in /lti/{platform}/login
    display_name: str = ""  # default: the id
    issuer: Annotated[str, BeforeValidator(check_issuer_url)]
    client_id: str = Field(min_length=1)
    deployment_ids: list[str] = Field(min_length=1)
    jwks_url: HttpUrl
    auth_login_url: HttpUrl
    token_url: HttpUrl
    targets: list[LtiTargetConfig] = Field(min_length=1)  # the launcher allow-list
    id_token_algs: list[JwsAlgorithm] = Field(default_factory=_rs256, min_length=1)
    clock_skew: Duration = 60
    ticket_ttl: Duration = Field(default=60, ge=1, le=300)
    launch_record_ttl: Duration = 14 * 86400  # how long "who launched" is remembered


class GlobusUpstreamConfig(_Model):
    """Sign-in with Globus Auth (ACCESS, campus and other linked identities), its groups, and
    dependent tokens for Globus services kept in Vault (a confidential app registered at
    app.globus.org; `resource_scope` is that app's own scope, on which the `dependent_scopes`
    depend)."""

    type: Literal["globus"]
    id: str = Field(default="globus", pattern=_UPSTREAM_ID)
    display_name: str = "Globus (ACCESS and campus identities)"
    client_id: str = Field(min_length=1)
    client_secret: SecretRef
    scopes: list[str] = Field(
        default_factory=lambda: [
            "openid", "profile", "email",
            "urn:globus:auth:scope:auth.globus.org:view_identity_set",
            "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships",
        ]
    )  # fmt: skip
    resource_scope: str | None = None
    dependent_scopes: dict[str, str] = Field(default_factory=dict)  # resource server → scope
    require_mfa: bool = False
    required_domains: list[str] = Field(default_factory=list)  # e.g. ["access-ci.org"]
    clock_skew: Duration = 60

    @model_validator(mode="after")
    def _consistent(self) -> GlobusUpstreamConfig:
        if "openid" not in self.scopes:
            raise ValueError("scopes must include 'openid'")
        if (self.dependent_scopes or self.require_mfa or self.required_domains) and not (
            self.resource_scope
        ):
            raise ValueError(
                "dependent_scopes, require_mfa and required_domains need resource_scope"
            )
        return self


UpstreamConfig = Annotated[
    Annotated[DevUpstreamConfig, Tag("type=dev")]
    | Annotated[OidcUpstreamConfig, Tag("type=oidc")]
    | Annotated[SamlUpstreamConfig, Tag("type=saml")]
    | Annotated[LtiUpstreamConfig, Tag("type=lti")]
    | Annotated[GlobusUpstreamConfig, Tag("type=globus")],
    Discriminator(_tag_by("type")),
]


class VaultSecretBackendConfig(_Model):
    """A user's own secret kept in Vault KV under the broker prefix, handed to a launch."""

    type: Literal["vault_secret"]
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="secret name under each user")
    max_ttl: Duration = 3600


class AwsRoleConfig(_Model):
    """One IAM role the broker may assume for users (any account)."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="what a request names as `role`")
    arn: str = Field(pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
    max_duration: Duration = Field(default=3600, ge=900, le=43200)  # the role's own maximum
    # An inline session policy (JSON) narrowing the role; `{principal}` (the principal id) and
    # `{subject}` are replaced, e.g. one S3 prefix per user.
    session_policy: str | None = None


class AwsBackendConfig(_Model):
    """Temporary AWS credentials: the broker mints a web-identity JWT and calls STS
    AssumeRoleWithWebIdentity itself (an IAM OIDC provider must trust the broker's issuer)."""

    type: Literal["aws"]
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    audience: str = "sts.amazonaws.com"
    region: str = "us-east-1"
    sts_endpoint: HttpUrl | None = None  # default: AWS's regional endpoint
    roles: list[AwsRoleConfig] = Field(min_length=1)
    default_role: str | None = None  # default: the first role
    session_tags: dict[str, str] = Field(default_factory=dict)  # static tags, added to the user's

    @model_validator(mode="after")
    def _known_default(self) -> AwsBackendConfig:
        names = [role.name for role in self.roles]
        if (twin := _first_duplicate(names)) is not None:
            raise ValueError(f"two roles share the name {twin!r}")
        if self.default_role is not None and self.default_role not in names:
            raise ValueError(f"default_role {self.default_role!r} is not one of the roles")
        return self


class OpenStackBackendConfig(_Model):
    """Keystone application credentials (Jetstream2 and other OpenStack clouds).

    Keystone lets only a user create their own application credential, so the broker signs
    the user in through Keystone federation (a short-lived JWT of its own, as an OpenID
    identity provider Keystone trusts) and creates, in the mapped project, a credential with
    an expiry, a subset of roles and access rules, `unrestricted = false`. Its own service
    user (password from Vault) only revokes and cleans up."""

    type: Literal["openstack"]
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    auth_url: HttpUrl  # Keystone v3, e.g. https://js2.jetstream-cloud.org:5000/v3
    region: str | None = None
    interface: Literal["public", "internal", "admin"] = "public"
    service_user: str
    service_password: SecretRef
    service_user_domain: str = "Default"
    service_project: str
    service_project_domain: str = "Default"
    user_domain: str = "Default"  # where mapped users live
    user_name: Literal["email", "subject", "preferred_username"] = "email"
    projects: dict[str, str] = Field(default_factory=dict)  # request `project` → Keystone id
    default_project: str | None = None  # Keystone project id
    roles: list[str] = Field(default_factory=lambda: ["member"])  # the subset handed out
    access_rules: list[dict[str, str]] = Field(default_factory=list)
    max_ttl: Duration = 86400
    identity_provider: str = "binder-broker"  # Keystone's name for the broker as an IdP
    federation_protocol: str = "openid"
    audience: str | None = None  # of the broker's JWT for Keystone; default: auth_url


class _RepoHostConfig(_Model):
    """What every repository backend shares."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    # The Principal claim that holds the user's own account name at this forge (e.g. an OIDC
    # upstream's `preferred_username` when that upstream is the forge). None: the broker
    # does not know users' forge accounts; `Repo.permission` is then "none".
    account_claim: str | None = None
    max_ttl: Duration = 3600  # the longest a credential handed out by `/v1/credentials` lives


class GitHubBackendConfig(_RepoHostConfig):
    """A GitHub App: installation tokens restricted to one repository."""

    type: Literal["github"]
    app_id: str = Field(pattern=r"^[0-9]+$")
    private_key: SecretRef  # the App's PEM key, normally `{ vault = "kv/path#field" }`
    api_url: HttpUrl = "https://api.github.com"  # GitHub Enterprise: https://HOST/api/v3
    git_url: HttpUrl = "https://github.com"


class GitLabBackendConfig(_RepoHostConfig):
    """GitLab: project access tokens (or deploy tokens) with `read_repository`, created with
    the broker's own token and revoked by the broker when its lease ends."""

    type: Literal["gitlab"]
    url: HttpUrl = "https://gitlab.com"  # the API is at {url}/api/v4
    token: SecretRef  # may create project access tokens (Maintainer on the projects)
    token_kind: Literal["project_access_token", "deploy_token"] = "project_access_token"


class BitbucketBackendConfig(_RepoHostConfig):
    """Bitbucket: repository access tokens with read permission."""

    type: Literal["bitbucket"]
    url: HttpUrl  # Bitbucket Data Center
    # A service account that may create repository access tokens (an HTTP access token may
    # not create tokens): `username` with its password as `token`; without `username`,
    # `token` is sent as a Bearer token.
    username: str | None = None
    token: SecretRef


class GitHostBackendConfig(_RepoHostConfig):
    """Any git host over smart HTTP, reached with a secret stored through `/v1/secrets`:
    the user's own, else their organisation's (by `organisation_claim`)."""

    type: Literal["git"]
    url: HttpUrl  # repositories are at {url}/{owner}/{name}.git
    organisation_claim: str | None = None  # Principal claim naming the user's organisation
    visibility: Literal["public", "private"] = "private"


class GlobusBackendConfig(_Model):
    """Globus access tokens (the Globus upstream's dependent tokens) for launches; a request's
    `role` names the resource server, else `default_resource_server`."""

    type: Literal["globus"]
    id: str = Field(default="globus", pattern=r"^[a-z0-9][a-z0-9_-]*$")
    upstream: str = "globus"  # the id of the Globus upstream that holds the tokens
    default_resource_server: str | None = None


BackendConfig = Annotated[
    Annotated[VaultSecretBackendConfig, Tag("type=vault_secret")]
    | Annotated[AwsBackendConfig, Tag("type=aws")]
    | Annotated[OpenStackBackendConfig, Tag("type=openstack")]
    | Annotated[GitHubBackendConfig, Tag("type=github")]
    | Annotated[GitLabBackendConfig, Tag("type=gitlab")]
    | Annotated[BitbucketBackendConfig, Tag("type=bitbucket")]
    | Annotated[GitHostBackendConfig, Tag("type=git")]
    | Annotated[GlobusBackendConfig, Tag("type=globus")],
    Discriminator(_tag_by("type")),
]


GrantType = Literal[
    "authorization_code",
    "refresh_token",
    "client_credentials",
    "urn:ietf:params:oauth:grant-type:token-exchange",
    "urn:ietf:params:oauth:grant-type:device_code",
]
AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
SECRET_HASH_PREFIX = "scrypt$"
_DEFAULT_GRANTS: tuple[GrantType, ...] = ("authorization_code", "refresh_token")


def _check_redirect_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.fragment or "#" in uri:
        raise ValueError(f"{uri!r}: a redirect URI has no fragment (RFC 6749 §3.1.2)")
    if parts.scheme == "https" and parts.hostname:
        return uri
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return uri
    raise ValueError(f"{uri!r}: must be https, or http on a loopback address")


class ClientConfig(_Model):
    """An OAuth client (a launcher, a peer deployment, the CLI), registered in settings."""

    client_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    name: str = ""
    auth_method: AuthMethod = "client_secret_basic"
    secret_hash: SecretStr | None = Field(
        default=None, description="from `broker clients hash-secret`; never the secret itself"
    )
    jwks: dict[str, Any] | None = None
    jwks_uri: str | None = None
    redirect_uris: list[str] = Field(default_factory=list)
    grant_types: list[GrantType] = Field(default_factory=lambda: list(_DEFAULT_GRANTS))
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email", "groups"])
    audiences: list[str] = Field(default_factory=list)
    first_party: bool = False
    require_dpop: bool = False

    @field_validator("redirect_uris")
    @classmethod
    def _redirects(cls, uris: list[str]) -> list[str]:
        return [_check_redirect_uri(u) for u in uris]

    @model_validator(mode="after")
    def _consistent(self) -> ClientConfig:
        problems = []
        secret = self.auth_method in ("client_secret_basic", "client_secret_post")
        if secret and (
            self.secret_hash is None
            or not self.secret_hash.get_secret_value().startswith(SECRET_HASH_PREFIX)
        ):
            problems.append(
                "secret_hash is required for this auth_method: run `broker clients hash-secret`"
            )
        if not secret and self.secret_hash is not None:
            problems.append("secret_hash is only for client_secret_basic / client_secret_post")
        if self.auth_method == "private_key_jwt" and (self.jwks is None) == (self.jwks_uri is None):
            problems.append("private_key_jwt needs exactly one of jwks or jwks_uri")
        if self.auth_method == "none" and "client_credentials" in self.grant_types:
            problems.append("a public client (auth_method none) cannot use client_credentials")
        if "authorization_code" in self.grant_types and not self.redirect_uris:
            problems.append("authorization_code needs at least one redirect_uri")
        if problems:
            raise ValueError("; ".join(problems))
        return self


PeerAlgorithm = Literal["ES256", "RS256", "ES384", "PS256", "EdDSA"]
_PEER_DEFAULT_ALGS: tuple[PeerAlgorithm, ...] = ("ES256", "RS256")


class TrustedIssuerConfig(_Model):
    """A peer (e.g. another binder deployment) whose tokens may be exchanged here (RFC 8693)."""

    issuer: str
    audience: str = Field(description="the aud its tokens must carry to be accepted here")
    algorithms: list[PeerAlgorithm] = Field(default_factory=lambda: list(_PEER_DEFAULT_ALGS))
    jwks_uri: str | None = Field(default=None, description="skips discovery when set")

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        return check_issuer_url(value)


class OAuthSettings(_Model):
    code_ttl: Duration = Field(default=60, le=60)
    refresh_token_ttl: Duration = 30 * 86400
    device_code_ttl: Duration = 600
    device_poll_interval: Duration = Field(default=5, ge=1)
    dpop_iat_window: Duration = 300
    dpop_require_nonce: bool = False
    cli_client: bool = Field(default=True, description="register the public client broker-cli")


def _first_duplicate(values: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


class Settings(_Model):
    server: ServerSettings
    vault: VaultSettings
    database: DatabaseSettings = DatabaseSettings()
    cache: CacheSettings = CacheSettings()
    keys: KeySettings = KeySettings()
    tokens: TokenSettings = TokenSettings()
    policy: PolicySettings = PolicySettings()
    audit: AuditSettings = AuditSettings()
    logging: LoggingSettings = LoggingSettings()
    oauth: OAuthSettings = OAuthSettings()
    grants: GrantSettings = GrantSettings()
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    backends: list[BackendConfig] = Field(default_factory=list)
    clients: list[ClientConfig] = Field(default_factory=list)
    trusted_issuers: list[TrustedIssuerConfig] = Field(default_factory=list)

    @field_validator("clients")
    @classmethod
    def _unique_clients(cls, items: list[ClientConfig]) -> list[ClientConfig]:
        if (twin := _first_duplicate(item.client_id for item in items)) is not None:
            raise ValueError(f"two clients share the client_id {twin!r}")
        return items

    @model_validator(mode="after")
    def _lti_keys(self) -> Settings:
        # LTI platforms verify tool JWTs (Deep Linking, client assertions) with RS256 only.
        if self.keys.algorithm != "RS256" and any(u.type == "lti" for u in self.upstreams):
            raise ValueError('an LTI upstream needs [keys] algorithm = "RS256"')
        return self

    @field_validator("upstreams", "backends")
    @classmethod
    def _unique_ids(cls, items: list[Any], info: ValidationInfo) -> list[Any]:
        # A field validator (not a model one) so duplicates are reported alongside any
        # other problem in the file.
        if (twin := _first_duplicate(item.id for item in items)) is not None:
            raise ValueError(f"two entries share the id {twin!r}")
        return items


# --- loading -----------------------------------------------------------------------------


class SettingsError(Exception):
    """Settings that cannot be used; `problems` lists each one as `path: message`."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(problems))
        self.source = source
        self.problems = problems


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "=" in part or part.startswith(("function-", "lax-or-strict")):
            continue  # tags pydantic inserts for unions and validators, not keys
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def format_validation_error(error: ValidationError) -> list[str]:
    """One `path: message` line per problem pydantic found."""
    lines = []
    for item in error.errors(include_url=False, include_input=False):
        path = _loc_to_path(tuple(item["loc"]))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see examples/broker.toml)"
        elif item["type"] == "union_tag_invalid":
            ctx = item.get("ctx", {})
            tag = str(ctx.get("tag", "")).partition("=")
            expected = str(ctx.get("expected_tags", "")).replace(f"{tag[0]}=", "")
            message = f"unknown {tag[0]} {tag[2]!r}; expected one of {expected}"
        elif item["type"] == "union_tag_not_found":
            message = "missing key 'type' (or 'method') that says which kind this is"
        lines.append(f"{path}: {message}")
    # Secret references are unions; pydantic reports one line per alternative. Keep one.
    return list(dict.fromkeys(lines))


def secret_reference_problems(settings: Settings) -> list[str]:
    """Environment and file references that cannot be read now (Vault ones are checked at start)."""
    problems = []
    for path, ref in iter_secret_refs(settings):
        if isinstance(ref, EnvRef) and ref.env not in os.environ:
            problems.append(f"{path}: environment variable {ref.env} is not set")
        elif isinstance(ref, FileRef) and not (ref.file.is_file() and os.access(ref.file, os.R_OK)):
            problems.append(f"{path}: file {ref.file} cannot be read")
    return problems


def iter_secret_refs(model: BaseModel, prefix: str = "") -> list[tuple[str, SecretValue]]:
    """Every secret-valued field of a settings tree, with its dotted path."""
    found: list[tuple[str, SecretValue]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(value, SecretValue):
            found.append((path, value))
        elif isinstance(value, BaseModel):
            found.extend(iter_secret_refs(value, path))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found.extend(iter_secret_refs(item, f"{path}[{index}]"))
    return found


def parse_settings(data: Mapping[str, Any], *, mode: str = "production") -> Settings:
    """Validate a settings mapping; raises SettingsError listing every problem."""
    try:
        settings = Settings.model_validate(data, context={"mode": mode})
    except ValidationError as error:
        raise SettingsError("settings", format_validation_error(error)) from None
    return settings


def load_settings(path: Path, *, mode: str = "production", check_refs: bool = True) -> Settings:
    """Read and validate one TOML file. Raises SettingsError with every problem found."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(str(path), [f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise SettingsError(str(path), [f"{path}: is a directory, not a settings file"]) from None
    except UnicodeDecodeError:
        raise SettingsError(str(path), [f"{path}: not UTF-8 text"]) from None
    except OSError as error:
        raise SettingsError(str(path), [f"{path}: cannot be read ({error.strerror})"]) from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(str(path), [f"TOML syntax: {error}"]) from None
    try:
        settings = Settings.model_validate(raw, context={"mode": mode})
    except ValidationError as error:
        raise SettingsError(str(path), format_validation_error(error)) from None
    if check_refs:
        problems = secret_reference_problems(settings)
        if problems:
            raise SettingsError(str(path), problems)
    return settings
