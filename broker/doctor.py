"""`broker doctor aws`: does AWS's documented checklist for a web-identity provider hold?

AWS STS accepts the broker's tokens only if (IAM user guide, "Create an OpenID Connect (OIDC)
identity provider in IAM"; STS AssumeRoleWithWebIdentity): the issuer is an HTTPS URL without
query (and, by AWS's advice, without a port) that equals the token's `iss`; its discovery
document at `{issuer}/.well-known/openid-configuration` is publicly reachable and names that
issuer and a reachable `jwks_uri`; the token's `kid` resolves in that JWKS and its alg is one
AWS supports (the broker signs RS256 or ES256); `aud` is in the IAM provider's client-id list.
Role ARNs, role maximum durations (AWS: 3600-43200 s on the role; 900 s is the floor of a
session), session tags and session-policy templates are checked here too.

Each check prints as `OK` or `FIX` with what to do; the exit code is 1 when anything needs
fixing. With a `TokenSigner` (the running key ring) a probe token is signed and verified
through discovery and JWKS exactly as STS would.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt

from adapters.base import TokenSigner
from adapters.downstream.aws import (
    MAX_ROLE_DURATION,
    MIN_DURATION,
    TAGS_CLAIM,
    build_session_tags,
    render_policy,
)
from adapters.errors import BrokerError
from broker.settings import AwsBackendConfig, Settings

AWS_ALGORITHMS = ("RS256", "ES256")  # what the broker's key ring can sign that AWS accepts
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):role/[\w+=,.@/-]{1,512}$")


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report. `fix` says what to do when `ok` is False."""

    subject: str
    ok: bool
    message: str
    fix: str = ""

    def line(self) -> str:
        text = f"{'OK ' if self.ok else 'FIX'}  {self.subject}: {self.message}"
        return text if self.ok or not self.fix else f"{text}\n       -> {self.fix}"


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_issuer(issuer: str) -> list[Check]:
    parts = urlsplit(issuer)
    checks: list[Check] = []
    if parts.scheme == "https":
        checks.append(Check("issuer", True, f"{issuer} is HTTPS"))
    elif parts.scheme == "http" and is_loopback(issuer):
        checks.append(
            Check(
                "issuer", True,
                f"{issuer} is plain HTTP on loopback: this works only with a test STS (moto); "
                "AWS requires an HTTPS issuer it can reach",
            )
        )  # fmt: skip
    else:
        checks.append(
            Check(
                "issuer", False, f"{issuer} is not HTTPS",
                "set server.public_url to the broker's public https:// URL; AWS fetches the "
                "discovery document and JWKS from it",
            )
        )  # fmt: skip
    if parts.query or parts.fragment:
        checks.append(
            Check("issuer", False, "the URL has a query or fragment", "remove it from public_url")
        )
    if parts.port is not None and parts.scheme == "https" and parts.port != 443:
        checks.append(
            Check(
                "issuer", False, f"the URL names port {parts.port}",
                "serve the broker on the default HTTPS port: AWS advises against a port in an "
                "IAM OIDC provider URL",
            )
        )  # fmt: skip
    return checks


async def check_discovery(
    issuer: str, http: aiohttp.ClientSession
) -> tuple[list[Check], dict[str, Any] | None]:
    """Discovery and JWKS as STS fetches them; returns the checks and the JWKS (or None)."""
    url = f"{issuer.rstrip('/')}/.well-known/openid-configuration"
    try:
        async with http.get(url) as resp:
            if resp.status != 200:
                return [
                    Check(
                        "discovery", False, f"{url} answered HTTP {resp.status}",
                        "make the broker's discovery document publicly reachable",
                    )
                ], None  # fmt: skip
            discovery = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        return [
            Check(
                "discovery", False, f"{url} is unreachable ({type(error).__name__})",
                "start the broker and make public_url reachable from the internet",
            )
        ], None  # fmt: skip
    checks = [Check("discovery", True, f"{url} is reachable")]
    if not isinstance(discovery, dict) or discovery.get("issuer") != issuer:
        found = discovery.get("issuer") if isinstance(discovery, dict) else None
        checks.append(
            Check(
                "discovery", False, f"its issuer is {found!r}, not {issuer!r}",
                "set server.public_url to exactly the URL the broker is reached at",
            )
        )  # fmt: skip
        return checks, None
    checks.append(Check("discovery", True, "its issuer matches public_url"))
    jwks_uri = str(discovery.get("jwks_uri") or "")
    if not jwks_uri:
        checks.append(Check("jwks", False, "discovery names no jwks_uri", "upgrade the broker"))
        return checks, None
    if urlsplit(jwks_uri).scheme != "https" and not is_loopback(jwks_uri):
        checks.append(
            Check("jwks", False, f"{jwks_uri} is not HTTPS", "serve the broker over HTTPS")
        )
    try:
        async with http.get(jwks_uri) as resp:
            if resp.status != 200:
                checks.append(
                    Check(
                        "jwks", False, f"{jwks_uri} answered HTTP {resp.status}",
                        "make the JWKS publicly reachable",
                    )
                )  # fmt: skip
                return checks, None
            jwks = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        checks.append(
            Check(
                "jwks", False, f"{jwks_uri} is unreachable ({type(error).__name__})",
                "make the JWKS publicly reachable",
            )
        )  # fmt: skip
        return checks, None
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not keys:
        checks.append(Check("jwks", False, f"{jwks_uri} holds no keys", "run `broker keys list`"))
        return checks, None
    checks.append(Check("jwks", True, f"{jwks_uri} is reachable and holds {len(keys)} key(s)"))
    unnamed = [k for k in keys if not k.get("kid")]
    if unnamed:
        checks.append(
            Check("jwks", False, f"{len(unnamed)} key(s) without a kid", "upgrade the broker")
        )
    return checks, jwks


async def check_signing(
    signer: TokenSigner, jwks: dict[str, Any], audience: str, issuer: str
) -> list[Check]:
    """Signs a probe token and verifies it the way STS does: kid in the JWKS, alg allowed,
    signature, iss and aud."""
    try:
        token = await signer.sign({"sub": "broker-doctor"}, audience=audience, ttl=60)
    except BrokerError as error:
        return [Check("signing", False, f"cannot sign: {error.description}", "check Vault")]
    header = jwt.get_unverified_header(token)
    kid, alg = header.get("kid"), header.get("alg")
    if alg not in AWS_ALGORITHMS:
        return [
            Check(
                "signing", False, f"the key ring signs {alg}",
                "set keys.algorithm to ES256 or RS256 (AWS accepts both)",
            )
        ]  # fmt: skip
    if not kid:
        return [Check("signing", False, "tokens carry no kid", "upgrade the broker")]
    entry = next((k for k in jwks.get("keys", []) if k.get("kid") == kid), None)
    if entry is None:
        return [
            Check(
                "signing", False, f"the current key {kid} is not in the published JWKS",
                "wait for the key ring to publish it (keys.publish_ahead) or restart the broker",
            )
        ]  # fmt: skip
    try:
        jwt.decode(
            token, key=jwt.PyJWK(entry).key, algorithms=[alg], audience=audience, issuer=issuer
        )
    except jwt.PyJWTError as error:
        return [Check("signing", False, f"the probe token fails: {error}", "check the key ring")]
    return [Check("signing", True, f"key {kid} ({alg}) is published and verifies")]


def check_backend(config: AwsBackendConfig, issuer: str, algorithm: str) -> list[Check]:
    """The static parts of one aws backend."""
    name = f"backend {config.id}"
    host = issuer.split("://", 1)[-1].rstrip("/")
    checks: list[Check] = []
    if algorithm not in AWS_ALGORITHMS:
        checks.append(Check(name, False, f"keys.algorithm is {algorithm}", "use ES256 or RS256"))
    if config.audience.strip():
        checks.append(
            Check(
                name, True,
                f"audience {config.audience!r}: put it in the IAM OIDC provider's client-id "
                f"list and in the trust condition {host}:aud",
            )
        )  # fmt: skip
    else:
        checks.append(Check(name, False, "audience is empty", "set audience (sts.amazonaws.com)"))
    if config.sts_endpoint is not None:
        endpoint = str(config.sts_endpoint)
        if urlsplit(endpoint).scheme != "https" and not is_loopback(endpoint):
            checks.append(
                Check(name, False, f"sts_endpoint {endpoint} is not HTTPS", "use https://")
            )
    for role in config.roles:
        subject = f"{name} role {role.name}"
        if not _ROLE_ARN.match(role.arn):
            checks.append(
                Check(
                    subject, False, f"{role.arn!r} is not an IAM role ARN",
                    "use arn:aws:iam::<12-digit account>:role/<name>",
                )
            )  # fmt: skip
        else:
            checks.append(Check(subject, True, f"{role.arn} is well-formed"))
        if not MIN_DURATION <= role.max_duration <= MAX_ROLE_DURATION:
            checks.append(
                Check(
                    subject, False, f"max_duration {role.max_duration} s",
                    f"use {MIN_DURATION}..{MAX_ROLE_DURATION} s, at most the role's "
                    "MaxSessionDuration in IAM",
                )
            )  # fmt: skip
        else:
            note = "" if role.max_duration >= 3600 else " (below IAM's smallest role maximum)"
            checks.append(
                Check(
                    subject, True,
                    f"max_duration {role.max_duration} s{note}: the role's MaxSessionDuration "
                    "in IAM must be at least this",
                )
            )  # fmt: skip
        if role.session_policy is not None:
            try:
                render_policy(role.session_policy, principal="u-" + "0" * 32, subject="subject")
            except BrokerError as error:
                checks.append(
                    Check(subject, False, error.description, "fix the session_policy template")
                )
            else:
                checks.append(Check(subject, True, "session_policy renders to valid JSON"))
    try:
        tags = build_session_tags(config.session_tags, {})
    except BrokerError as error:
        checks.append(Check(name, False, error.description, "configure fewer session_tags"))
    else:
        changed = [
            k for k, v in config.session_tags.items() if tags.get(k) != [v] and k in tags
        ] + [k for k in config.session_tags if k not in tags]
        if changed:
            checks.append(
                Check(
                    name, False, f"session tags {', '.join(sorted(changed))} are not sent as given",
                    "use keys and values of letters, digits, spaces and _.:/=+-@ (keys not "
                    "starting with aws:), keys <= 128 and values <= 256 characters",
                )
            )  # fmt: skip
        elif tags:
            checks.append(
                Check(
                    name, True,
                    f"{len(tags)} static session tag(s) in {TAGS_CLAIM}; the trust policy must "
                    "allow sts:TagSession",
                )
            )  # fmt: skip
    return checks


async def check_aws(
    settings: Settings,
    backend_id: str | None = None,
    *,
    signer: TokenSigner | None = None,
    http: aiohttp.ClientSession | None = None,
) -> list[Check]:
    """Every check for the aws backends of `settings` (or only `backend_id`)."""
    backends = [
        b
        for b in settings.backends
        if isinstance(b, AwsBackendConfig) and (backend_id is None or b.id == backend_id)
    ]
    if not backends:
        wanted = f"an aws backend {backend_id!r}" if backend_id else "an aws backend"
        return [Check("settings", False, f"there is no {wanted}", "add a [[backends]] of type aws")]
    issuer = settings.server.public_url
    checks = check_issuer(issuer)
    own = http is None
    session = http or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        found, jwks = await check_discovery(issuer, session)
    finally:
        if own:
            await session.close()
    checks += found
    for config in backends:
        checks += check_backend(config, issuer, settings.keys.algorithm)
    if signer is not None and jwks is not None:
        checks += await check_signing(signer, jwks, backends[0].audience, issuer)
    return checks


async def doctor_aws(
    settings: Settings,
    backend_id: str | None = None,
    *,
    signer: TokenSigner | None = None,
    http: aiohttp.ClientSession | None = None,
    out: Callable[[str], Any] = print,
) -> int:
    """Prints the report; 0 when everything is OK, 1 when something needs fixing."""
    checks = await check_aws(settings, backend_id, signer=signer, http=http)
    for check in checks:
        out(check.line())
    failed = [c for c in checks if not c.ok]
    out(f"{len(failed)} thing(s) to fix" if failed else "AWS can trust this broker")
    return 1 if failed else 0


def failures(checks: Sequence[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]
