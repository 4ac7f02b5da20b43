"""Builds and closes everything a broker process needs, from validated settings.

Start-up order matters: Vault first (it holds the other secrets), then SQL (migrated by
`broker db upgrade` or `broker dev`, checked here), the cache, the policy engine (an invalid
policy stops start-up), the audit log, and finally the key ring, which may write to Vault.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import aiohttp
import structlog

from adapters.base import Backend, Lifecycle, RepoHost, TokenSigner, Upstream
from adapters.downstream.secrets import VaultSecretBackend
from adapters.errors import ConfigurationError, Conflict
from adapters.upstream.dev import DevUpstream
from adapters.vault import AppRoleAuth, TokenAuth, VaultClient
from broker.audit import AuditLog
from broker.cache import Cache, cache_from_url
from broker.keyring import KeyRing, SigningKey
from broker.metrics import Metrics
from broker.oauth.clients import ClientRegistry
from broker.oauth.refresh import RefreshStore
from broker.remotes import RemoteCache
from broker.repo_credentials import RepoCredentialBackend
from broker.sessions import SessionStore
from broker.settings import (
    AppRoleAuthSettings,
    AwsBackendConfig,
    BackendConfig,
    BitbucketBackendConfig,
    DevUpstreamConfig,
    EnvRef,
    FileRef,
    GitHostBackendConfig,
    GitHubBackendConfig,
    GitLabBackendConfig,
    GlobusBackendConfig,
    GlobusUpstreamConfig,
    LtiUpstreamConfig,
    MetadataFileConfig,
    MetadataSourceConfig,
    MetadataUrlConfig,
    OidcUpstreamConfig,
    SecretValue,
    Settings,
    UpstreamConfig,
    VaultRef,
    VaultSecretBackendConfig,
)
from broker.signer import KeyRingSigner
from broker.storage import Database
from broker.tokens import TokenService
from policies.engine import PolicyEngine, PolicyError, Resource

ConfigT = TypeVar("ConfigT")
AdapterT = TypeVar("AdapterT", Upstream, Backend, RepoHost)
RepoHostConfig = (
    GitHubBackendConfig | GitLabBackendConfig | BitbucketBackendConfig | GitHostBackendConfig
)
REPO_HOST_TYPES = ("github", "gitlab", "bitbucket", "git")

if TYPE_CHECKING:
    from adapters.upstream.saml_metadata import AggregateSource, FileSource, MdqSource

log = structlog.get_logger(__name__)


@dataclass
class OAuthState:
    """The authorization server's own collaborators."""

    clients: ClientRegistry
    refresh: RefreshStore


@dataclass
class Services:
    """The broker's collaborators, shared by every request handler."""

    settings: Settings
    dev_mode: bool
    http: aiohttp.ClientSession
    vault: VaultClient
    db: Database
    cache: Cache
    policy: PolicyEngine
    audit: AuditLog
    keyring: KeyRing
    tokens: TokenService
    sessions: SessionStore
    metrics: Metrics
    oauth: OAuthState
    signer: KeyRingSigner
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    backends: dict[str, Backend] = field(default_factory=dict)
    repo_hosts: dict[str, RepoHost] = field(default_factory=dict)
    remotes: RemoteCache = field(default_factory=RemoteCache)

    async def close(self) -> None:
        await self.remotes.close(self.repo_hosts)
        await close_all(self.upstreams)
        await close_all(self.backends)
        await close_all(self.repo_hosts)
        await self.keyring.close()
        await self.audit.flush()  # appends in flight must reach SQL before it closes
        await self.vault.close()
        await self.cache.close()
        await self.db.close()
        await self.http.close()


def load_policies(settings: Settings) -> PolicyEngine:
    """The policy engine over the configured IdPs and backends (parsed once), or
    ConfigurationError with the Cedar parser's message."""
    entities = [Resource("Idp", u.id) for u in settings.upstreams] + [
        Resource("Backend", b.id, attrs={"kind": b.type}) for b in settings.backends
    ]
    try:
        return PolicyEngine.load(settings.policy.directory, entities=entities)
    except PolicyError as error:
        raise ConfigurationError(f"the Cedar policies cannot be loaded: {error}") from None


async def resolve_secret(value: SecretValue, vault: VaultClient | None = None) -> str:
    """The plain value of a secret reference (only ever kept in memory)."""
    if isinstance(value, EnvRef):
        try:
            return os.environ[value.env]
        except KeyError:
            raise ConfigurationError(f"environment variable {value.env} is not set") from None
    if isinstance(value, FileRef):
        return (await asyncio.to_thread(Path(value.file).read_text, "utf-8")).strip()
    if isinstance(value, VaultRef):
        if vault is None:
            raise ConfigurationError("a Vault reference cannot configure Vault itself")
        entry = await vault.kv_read(value.path, mount=value.mount)
        if entry is None or value.field not in entry.data:
            raise ConfigurationError(
                f"Vault has no field {value.field!r} at {value.mount}/{value.path}"
            )
        return str(entry.data[value.field])
    return value.get_secret_value()


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """What adapters get from the broker: never the settings themselves."""

    public_url: str
    dev_mode: bool
    http: aiohttp.ClientSession
    cache: Cache
    vault: VaultClient
    vault_prefix: str
    signer: TokenSigner


async def _read_pem(path: Path, what: str) -> str:
    try:
        return await asyncio.to_thread(path.read_text, "utf-8")
    except OSError as error:
        raise ConfigurationError(f"cannot read the {what} {path}: {error.strerror}") from None


async def _metadata_source(
    config: MetadataSourceConfig,
) -> FileSource | AggregateSource | MdqSource:
    from adapters.upstream.saml_metadata import AggregateSource, FileSource, MdqSource

    if isinstance(config, MetadataFileConfig):
        return FileSource(config.file)
    cert = await _read_pem(config.signing_cert, "metadata signing certificate")
    if isinstance(config, MetadataUrlConfig):
        return AggregateSource(
            config.url, cert, min_refresh=config.min_refresh, max_refresh=config.max_refresh
        )
    return MdqSource(config.mdq, cert, cache_ttl=config.cache_ttl)


async def build_upstream(config: UpstreamConfig, ctx: AdapterContext) -> Upstream:
    """One adapter from its settings; secrets and files are read here, once. Adapter
    modules are imported only when configured: pysaml2, lxml and authlib are heavy."""
    if isinstance(config, DevUpstreamConfig):
        return DevUpstream(config.id, config.display_name, config.groups, dev_mode=ctx.dev_mode)
    if isinstance(config, OidcUpstreamConfig):
        from adapters.upstream.oidc import OidcUpstream

        secret = config.client_secret
        return OidcUpstream(
            id=config.id, display_name=config.display_name, issuer=config.issuer,
            client_id=config.client_id,
            client_secret=await resolve_secret(secret, ctx.vault) if secret else None,
            scopes=config.scopes, id_token_algs=config.id_token_algs,
            claims=config.claims.model_dump(), use_userinfo=config.use_userinfo,
            idp_hint_param=config.idp_hint_param, auth_params=config.auth_params,
            keep_refresh_token=config.keep_refresh_token, clock_skew=config.clock_skew,
            http=ctx.http, cache=ctx.cache, vault=ctx.vault, vault_prefix=ctx.vault_prefix,
        )  # fmt: skip
    if isinstance(config, LtiUpstreamConfig):
        from adapters.upstream.lti import LtiUpstream

        return LtiUpstream(
            id=config.id, display_name=config.display_name or config.id, issuer=config.issuer,
            client_id=config.client_id, deployment_ids=config.deployment_ids,
            jwks_url=config.jwks_url, auth_login_url=config.auth_login_url,
            token_url=config.token_url, targets={t.url: t.title or t.url for t in config.targets},
            launch_url=f"{ctx.public_url}/lti/{config.id}/launch",
            id_token_algs=config.id_token_algs, clock_skew=config.clock_skew,
            ticket_ttl=config.ticket_ttl, launch_record_ttl=config.launch_record_ttl,
            http=ctx.http, cache=ctx.cache, signer=ctx.signer,
        )  # fmt: skip
    if isinstance(config, GlobusUpstreamConfig):
        from adapters.upstream.globus import GlobusUpstream

        return GlobusUpstream(
            id=config.id, display_name=config.display_name, client_id=config.client_id,
            client_secret=await resolve_secret(config.client_secret, ctx.vault),
            scopes=config.scopes, resource_scope=config.resource_scope,
            dependent_scopes=config.dependent_scopes, require_mfa=config.require_mfa,
            required_domains=config.required_domains, clock_skew=config.clock_skew,
            cache=ctx.cache, vault=ctx.vault, vault_prefix=ctx.vault_prefix,
        )  # fmt: skip
    from adapters.upstream.saml import SamlUpstream
    from adapters.upstream.saml_metadata import MetadataStore

    base = f"{ctx.public_url}/login/{config.id}"
    store = MetadataStore(
        [await _metadata_source(source) for source in config.metadata],
        http=ctx.http,
        entity_categories=config.entity_categories,
        registration_authorities=config.registration_authorities,
    )
    return SamlUpstream(
        id=config.id, display_name=config.display_name,
        entity_id=config.entity_id or f"{base}/metadata", acs_url=f"{base}/callback",
        sp_key_pem=await resolve_secret(config.sp_key, ctx.vault),
        sp_cert_pem=await _read_pem(config.sp_cert, "SAML SP certificate"),
        metadata=store, idp=config.idp, clock_skew=config.clock_skew,
        mfa_contexts=config.mfa_contexts, requested_authn_context=config.requested_authn_context,
        cache=ctx.cache,
    )  # fmt: skip


async def start_all(
    configs: Sequence[ConfigT],
    build: Callable[[ConfigT, AdapterContext], Awaitable[AdapterT]],
    ctx: AdapterContext,
) -> dict[str, AdapterT]:
    """Build every adapter of one family and start those with background work; on failure,
    close what was started and raise."""
    adapters: dict[str, AdapterT] = {}
    try:
        for config in configs:
            adapter = await build(config, ctx)
            adapters[adapter.id] = adapter
            if isinstance(adapter, Lifecycle):
                await adapter.start()
    except BaseException:
        await close_all(adapters)
        raise
    return adapters


async def close_all(
    adapters: Mapping[str, Upstream] | Mapping[str, Backend] | Mapping[str, RepoHost],
) -> None:
    """Close every adapter with background work; one failure does not keep others open."""
    for name, adapter in adapters.items():
        if isinstance(adapter, Lifecycle):
            try:
                await adapter.close()
            except Exception:
                log.exception("adapter.close_failed", adapter=name)


def split_backends(
    configs: Sequence[BackendConfig],
) -> tuple[list[BackendConfig], list[RepoHostConfig]]:
    """Credential backends (`/v1/credentials`) apart from repository hosts (the gateway)."""
    credentials: list[BackendConfig] = []
    hosts: list[RepoHostConfig] = []
    for config in configs:
        if isinstance(config, RepoHostConfig):
            hosts.append(config)
        else:
            credentials.append(config)
    return credentials, hosts


async def build_repo_host(config: RepoHostConfig, ctx: AdapterContext) -> RepoHost:
    """One repository backend from its settings; its secret is read here, once."""
    if isinstance(config, GitHubBackendConfig):
        from adapters.downstream.github import GitHubAppHost

        return GitHubAppHost(
            id=config.id, app_id=config.app_id,
            private_key_pem=await resolve_secret(config.private_key, ctx.vault),
            api_url=config.api_url.rstrip("/"), git_url=config.git_url.rstrip("/"), http=ctx.http,
        )  # fmt: skip
    if isinstance(config, GitLabBackendConfig):
        from adapters.downstream.gitlab import GitLabHost

        return GitLabHost(
            id=config.id, url=config.url.rstrip("/"),
            token=await resolve_secret(config.token, ctx.vault), token_kind=config.token_kind,
            http=ctx.http,
        )  # fmt: skip
    if isinstance(config, BitbucketBackendConfig):
        from adapters.downstream.bitbucket import BitbucketHost

        return BitbucketHost(
            id=config.id, url=config.url.rstrip("/"), username=config.username,
            token=await resolve_secret(config.token, ctx.vault), http=ctx.http,
        )  # fmt: skip
    from adapters.downstream.git_host import GitSecretHost

    return GitSecretHost(
        id=config.id, url=config.url.rstrip("/"), visibility=config.visibility,
        vault=ctx.vault, prefix=ctx.vault_prefix,
    )  # fmt: skip


async def build_backend(config: BackendConfig, ctx: AdapterContext) -> Backend:
    """One downstream adapter from its settings; secrets are read here, once. Adapter
    modules are imported only when configured (aioboto3 alone is ~45 MB)."""
    if isinstance(config, RepoHostConfig):
        raise ConfigurationError(f"backend {config.id!r} is a repository host")
    if isinstance(config, VaultSecretBackendConfig):
        return VaultSecretBackend(
            config.id, vault=ctx.vault, prefix=ctx.vault_prefix, name=config.name,
            max_ttl=config.max_ttl,
        )  # fmt: skip
    if isinstance(config, GlobusBackendConfig):
        from adapters.downstream.globus import GlobusBackend

        return GlobusBackend(
            config.id, upstream=config.upstream,
            default_resource_server=config.default_resource_server,
        )  # fmt: skip
    if isinstance(config, AwsBackendConfig):
        from adapters.downstream.aws import AwsBackend, AwsRole

        return AwsBackend(
            id=config.id, signer=ctx.signer, audience=config.audience, region=config.region,
            sts_endpoint=config.sts_endpoint.rstrip("/") if config.sts_endpoint else None,
            roles=[AwsRole(r.name, r.arn, r.max_duration, r.session_policy) for r in config.roles],
            default_role=config.default_role, session_tags=config.session_tags,
        )  # fmt: skip
    from adapters.downstream.openstack import OpenStackBackend

    return OpenStackBackend(
        id=config.id, auth_url=config.auth_url, region=config.region,
        interface=config.interface, service_user=config.service_user,
        service_password=await resolve_secret(config.service_password, ctx.vault),
        service_user_domain=config.service_user_domain, service_project=config.service_project,
        service_project_domain=config.service_project_domain, user_domain=config.user_domain,
        user_name=config.user_name, projects=config.projects,
        default_project=config.default_project, roles=config.roles,
        access_rules=config.access_rules, max_ttl=config.max_ttl, http=ctx.http,
        signer=ctx.signer, identity_provider=config.identity_provider,
        protocol=config.federation_protocol, audience=config.audience,
    )  # fmt: skip


async def _session_key(vault: VaultClient, prefix: str) -> bytes:
    """The cookie-signing key, created once in Vault and shared by every replica."""
    path = f"{prefix}/session-key"
    entry = await vault.kv_read(path)
    if entry is None:
        try:
            await vault.kv_write(path, {"key": secrets.token_hex(32)}, cas=0)
        except Conflict:
            pass  # another replica created it first; read theirs
        entry = await vault.kv_read(path)
    if entry is None:
        raise ConfigurationError("the session key could not be stored in Vault")
    return bytes.fromhex(str(entry.data["key"]))


async def start_services(
    settings: Settings,
    *,
    dev_mode: bool,
    vault_auth: TokenAuth | AppRoleAuth | None = None,
    with_upstreams: bool = True,
) -> Services:
    """Connect to every peer and load state. Raises a BrokerError naming what failed.

    Operator commands (`broker keys …`) pass `with_upstreams=False`: they sign nobody in.
    """
    policy = load_policies(settings)
    v = settings.vault
    if vault_auth is None:
        if isinstance(v.auth, AppRoleAuthSettings):
            vault_auth = AppRoleAuth(
                v.auth.role_id, await resolve_secret(v.auth.secret_id), v.auth.mount
            )
        else:
            vault_auth = TokenAuth(await resolve_secret(v.auth.token))
    vault = VaultClient(
        v.address,
        vault_auth,
        kv_mount=v.kv_mount,
        transit_mount=v.transit_mount,
        ca_cert=str(v.ca_cert) if v.ca_cert else None,
        namespace=v.namespace,
        timeout=v.timeout,
    )
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    db = Database(settings.database.url)
    cache = cache_from_url(settings.cache.url)
    metrics = Metrics()
    try:
        await vault.login()
        await db.ping()
        await cache.ping()
        audit = AuditLog(settings.audit.path, db, chain=settings.audit.chain)

        async def audit_rotation(key: SigningKey, reason: str) -> None:
            await audit.append(
                "key.rotated", outcome="success", kid=key.kid, alg=key.alg,
                reason=reason, activate_at=key.activate_at,
            )  # fmt: skip

        keys = settings.keys
        keyring = KeyRing(
            vault,
            prefix=v.prefix,
            algorithm=keys.algorithm,
            signing=keys.signing,
            rotation_interval=keys.rotation_interval,
            publish_ahead=keys.publish_ahead,
            max_token_ttl=settings.tokens.max_ttl,
            clock_skew=settings.tokens.clock_skew,
            refresh_interval=keys.refresh_interval,
            max_staleness=keys.max_staleness,
            on_rotate=audit_rotation,
        )
        await keyring.start()
        metrics.watch_key_ages(keyring.key_ages)
        tokens = TokenService(
            keyring,
            issuer=settings.server.public_url,
            access_token_ttl=settings.tokens.access_token_ttl,
            id_token_ttl=settings.tokens.id_token_ttl,
            max_ttl=settings.tokens.max_ttl,
            clock_skew=settings.tokens.clock_skew,
            on_mint=metrics.token_minted,
        )
        sessions = SessionStore(
            cache, await _session_key(vault, v.prefix), settings.server.session_ttl
        )
        oauth = OAuthState(
            clients=ClientRegistry(
                settings.clients, db=db, cache=cache, http=http,
                issuer=settings.server.public_url,
                token_endpoint=f"{settings.server.public_url}/oauth/token",
                clock_skew=settings.tokens.clock_skew, cli_client=settings.oauth.cli_client,
                backends=[b.id for b in settings.backends],
            ),
            refresh=RefreshStore(
                db, settings.oauth.refresh_token_ttl, cache=cache,
                clock_skew=settings.tokens.clock_skew,
            ),
        )  # fmt: skip
    except BaseException:
        await vault.close()
        await cache.close()
        await db.close()
        await http.close()
        raise
    services = Services(
        settings=settings,
        dev_mode=dev_mode,
        http=http,
        vault=vault,
        db=db,
        cache=cache,
        policy=policy,
        audit=audit,
        keyring=keyring,
        tokens=tokens,
        sessions=sessions,
        metrics=metrics,
        oauth=oauth,
        signer=KeyRingSigner(keyring, tokens, issuer=settings.server.public_url),
    )
    context = AdapterContext(
        public_url=settings.server.public_url, dev_mode=dev_mode, http=http, cache=cache,
        vault=vault, vault_prefix=v.prefix, signer=services.signer,
    )  # fmt: skip
    try:
        credential_configs, repo_configs = split_backends(settings.backends)
        services.backends = await start_all(credential_configs, build_backend, context)
        services.repo_hosts = await start_all(repo_configs, build_repo_host, context)
        # Each repository host also hands out per-lease credentials through /v1/credentials.
        services.backends |= {
            c.id: RepoCredentialBackend(
                services.repo_hosts[c.id], vault=vault, prefix=v.prefix, max_ttl=c.max_ttl
            )
            for c in repo_configs
        }
        if with_upstreams:
            services.upstreams = await start_all(settings.upstreams, build_upstream, context)
            if any(isinstance(b, GlobusBackendConfig) for b in settings.backends):
                from adapters.downstream.globus import link_upstreams

                link_upstreams(services.backends, services.upstreams)
    except BaseException:
        await services.close()
        raise
    return services
