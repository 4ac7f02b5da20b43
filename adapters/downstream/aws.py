"""Temporary AWS credentials through STS AssumeRoleWithWebIdentity.

The broker is the OpenID provider AWS trusts (an IAM OIDC provider registered for the
broker's issuer, with `audience` in its client-id list). For each grant it mints a short
web-identity JWT for the principal (`sub` = the principal id, session tags in the
`https://aws.amazon.com/tags` claim) and calls AssumeRoleWithWebIdentity itself; the caller
gets only the resulting temporary keys. STS credentials cannot be revoked, so this backend
is not `Revocable`: the lifetime is the control, clipped to the policy.

AWS rules followed here (STS API reference, IAM user guide "Pass session tags in AWS STS"):
- DurationSeconds lies in [900, the role's maximum session duration].
- RoleSessionName is 2-64 characters of `[\\w+=,.@-]`.
- Session tags: at most 50; keys 1-128, values 0-256 characters of letters, numbers, spaces
  and `_.:/=+-@`; keys are case-insensitive and may not start with `aws:`; each value in
  `principal_tags` is a one-element list.
- The inline session policy is JSON of at most 2048 characters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import unicodedata
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aioboto3  # type: ignore[import-untyped]
import aiohttp
from botocore import UNSIGNED  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from adapters.base import Credential, Grant, TokenSigner
from adapters.errors import AccessDenied, ConfigurationError, InvalidRequest, UpstreamFailed

MIN_DURATION = 900  # AWS's floor for DurationSeconds
DEFAULT_DURATION = 3600  # STS's own default when a grant names no lifetime
MAX_ROLE_DURATION = 43200
TOKEN_TTL = 300  # the web-identity JWT is spent at once; STS allows 5 min of clock skew
TAGS_CLAIM = "https://aws.amazon.com/tags"
MAX_TAGS = 50
MAX_TAG_KEY = 128
MAX_TAG_VALUE = 256
MAX_SESSION_POLICY = 2048
# Tags that name the user; transitive, so a chained role session cannot relabel the user.
IDENTITY_TAGS = ("principal", "idp")

# botocore logs every request's parameters (the web-identity token) and every response body
# (the keys) at DEBUG; even a debugging operator must not get them in a log.
for _wire_logger in ("botocore", "aiobotocore"):
    logging.getLogger(_wire_logger).setLevel(logging.INFO)

_SESSION_NAME_BAD = re.compile(r"[^\w+=,.@-]", re.ASCII)
_TAG_PUNCTUATION = frozenset("_.:/=+-@")
# What `{subject}` may contain inside a session policy: no IAM wildcard (`*`, `?`), no policy
# variable (`$`) and no `/`, which would reach into another user's prefix.
_POLICY_SAFE = re.compile(r"^[A-Za-z0-9._@+=,-]{1,128}$")
# AWS's refusals of the user (trust policy); everything else is the broker's or AWS's problem.
_DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException"})


@dataclass(frozen=True, slots=True)
class AwsRole:
    """One IAM role (any account) the broker may assume for users. `session_policy` is an
    inline policy template: `{principal}` and `{subject}` are replaced per user."""

    name: str
    arn: str
    max_duration: int
    session_policy: str | None = None


def session_name(principal_id: str) -> str:
    """A valid RoleSessionName for a principal: deterministic, `[\\w+=,.@-]`, 2-64 chars."""
    name = _SESSION_NAME_BAD.sub("-", principal_id)[:64]
    return name if len(name) >= 2 else (name + "--")[:2]


def tag_text(value: str, limit: int) -> str:
    """`value` reduced to AWS's tag alphabet (other characters become `_`), at most `limit`."""
    chars = [
        ch if ch in _TAG_PUNCTUATION or unicodedata.category(ch)[0] in "LNZ" else "_"
        for ch in value
    ]
    return "".join(chars)[:limit]


def build_session_tags(
    static: Mapping[str, str], derived: Mapping[str, str]
) -> dict[str, list[str]]:
    """`principal_tags` for the token: static (configured) tags, then the principal's,
    which win on a key clash (keys compare case-insensitively, as AWS does)."""
    tags: dict[str, tuple[str, str]] = {}  # lower-case key -> (key, value)
    for key, value in [*static.items(), *derived.items()]:
        clean = tag_text(key, MAX_TAG_KEY)
        if not clean or clean.lower().startswith("aws:"):
            continue
        tags[clean.lower()] = (clean, tag_text(value, MAX_TAG_VALUE))
    if len(tags) > MAX_TAGS:
        raise ConfigurationError(f"AWS accepts at most {MAX_TAGS} session tags")
    return {key: [value] for key, value in tags.values()}


def render_policy(template: str, *, principal: str, subject: str) -> str:
    """The session policy for one user; the values are JSON-escaped and the result must
    be a JSON object of at most 2048 characters (ConfigurationError otherwise)."""
    policy = template.replace("{principal}", json.dumps(principal)[1:-1]).replace(
        "{subject}", json.dumps(subject)[1:-1]
    )
    try:
        document = json.loads(policy)
    except ValueError as error:
        raise ConfigurationError(f"the session policy is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ConfigurationError("the session policy must be a JSON object")
    compact = json.dumps(document, separators=(",", ":"))
    if len(compact) > MAX_SESSION_POLICY:
        raise ConfigurationError(
            f"the session policy is {len(compact)} characters; AWS accepts {MAX_SESSION_POLICY}"
        )
    return compact


class AwsBackend:
    """`adapters.base.Backend` (and `Lifecycle`) for AWS: holds one STS client, opened by
    `start` or on first use, closed by `close`."""

    def __init__(
        self,
        *,
        id: str,
        signer: TokenSigner,
        audience: str,
        region: str,
        sts_endpoint: str | None,
        roles: Sequence[AwsRole],
        default_role: str | None,
        session_tags: Mapping[str, str],
        timeout: float = 10.0,
    ) -> None:
        if not roles:
            raise ConfigurationError(f"backend {id!r}: configure at least one role")
        self.id = id
        self._signer = signer
        self._audience = audience
        self._region = region
        self._endpoint = sts_endpoint or f"https://sts.{region}.amazonaws.com"
        self._roles = {role.name: role for role in roles}
        self._default = default_role or roles[0].name
        if self._default not in self._roles:
            raise ConfigurationError(f"backend {id!r}: default role {self._default!r} is unknown")
        for role in roles:
            if not MIN_DURATION <= role.max_duration <= MAX_ROLE_DURATION:
                raise ConfigurationError(
                    f"backend {id!r}: role {role.name!r} max_duration must lie in "
                    f"[{MIN_DURATION}, {MAX_ROLE_DURATION}]"
                )
            if role.session_policy is not None:  # fail at start-up, not at the first launch
                render_policy(role.session_policy, principal="u-check", subject="check")
        self._static_tags = dict(session_tags)
        build_session_tags(self._static_tags, {})  # refuses more than 50 at start-up
        self._config = Config(
            signature_version=UNSIGNED,  # AssumeRoleWithWebIdentity is an unsigned call
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=timeout,
            read_timeout=timeout,
        )
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._lock = asyncio.Lock()

    @property
    def roles(self) -> Mapping[str, AwsRole]:
        return self._roles

    @property
    def audience(self) -> str:
        return self._audience

    async def _sts(self) -> Any:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    stack = AsyncExitStack()
                    client = await stack.enter_async_context(
                        aioboto3.Session().client(
                            "sts",
                            region_name=self._region,
                            endpoint_url=self._endpoint,
                            config=self._config,
                        )
                    )
                    self._stack, self._client = stack, client
        return self._client

    async def start(self) -> None:
        """Opens the STS client now rather than on the first launch (`Lifecycle`)."""
        await self._sts()

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def role_for(self, grant: Grant) -> AwsRole:
        name = grant.role or self._default
        role = self._roles.get(name)
        if role is None:
            choices = ", ".join(sorted(self._roles))
            raise InvalidRequest(f"unknown role {name!r} for {self.id}; choose one of: {choices}")
        return role

    def duration_for(self, grant: Grant, role: AwsRole) -> int:
        """The session length: the grant's lifetime within [900, the role's maximum], never
        above the policy's `max_ttl`. AccessDenied when the policy allows less than 900 s."""
        policy_max = grant.limits.max_ttl
        if policy_max is not None and policy_max < MIN_DURATION:
            raise AccessDenied(
                f"the policy allows credentials for {policy_max} s, but AWS issues them for "
                f"at least {MIN_DURATION} s",
                reasons=grant.policy_ids,
            )
        upper = min(role.max_duration, policy_max if policy_max is not None else MAX_ROLE_DURATION)
        wanted = grant.ttl if grant.ttl > 0 else min(DEFAULT_DURATION, upper)
        return max(MIN_DURATION, min(wanted, upper))

    def tags_for(self, grant: Grant) -> dict[str, Any]:
        """The `https://aws.amazon.com/tags` claim for this principal."""
        principal = grant.principal
        derived = {"principal": principal.id, "idp": principal.idp}
        if principal.affiliation:
            derived["affiliation"] = principal.affiliation[0]
        tags = build_session_tags(self._static_tags, derived)
        transitive = [key for key in tags if key.lower() in IDENTITY_TAGS]
        return {"principal_tags": tags, "transitive_tag_keys": transitive}

    def policy_for(self, grant: Grant, role: AwsRole) -> str | None:
        if role.session_policy is None:
            return None
        subject = grant.principal.subject
        if "{subject}" in role.session_policy and not _POLICY_SAFE.match(subject):
            raise AccessDenied(
                f"your account name cannot be used in the session policy of role {role.name!r}",
                reasons=grant.policy_ids,
            )
        return render_policy(role.session_policy, principal=grant.principal.id, subject=subject)

    async def issue(self, grant: Grant) -> Credential:
        """Temporary keys for the grant's role (or the default). Raises InvalidRequest
        (unknown role), AccessDenied (policy below AWS's minimum, or AWS refusing the
        user) and UpstreamFailed (STS unreachable, failing or rejecting the broker)."""
        role = self.role_for(grant)
        duration = self.duration_for(grant, role)
        policy = self.policy_for(grant, role)
        name = session_name(grant.principal.id)
        token = await self._signer.sign(
            {"sub": grant.principal.id, TAGS_CLAIM: self.tags_for(grant)},
            audience=self._audience,
            ttl=TOKEN_TTL,
        )
        params: dict[str, Any] = {
            "RoleArn": role.arn,
            "RoleSessionName": name,
            "WebIdentityToken": token,
            "DurationSeconds": duration,
        }
        if policy is not None:
            params["Policy"] = policy
        try:
            sts = await self._sts()
            response = await sts.assume_role_with_web_identity(**params)
        except ClientError as error:
            raise _translate(error, role) from None
        except (BotoCoreError, aiohttp.ClientError, OSError) as error:  # OSError: timeouts too
            raise UpstreamFailed(
                "AWS STS is unreachable; try again later",
                log_detail=f"sts unreachable: {type(error).__name__}",
            ) from None
        keys = response["Credentials"]
        expires = keys["Expiration"]
        if not isinstance(expires, datetime):
            expires = datetime.fromisoformat(str(expires))
        expires = expires.astimezone(UTC)
        assumed = str(response.get("AssumedRoleUser", {}).get("Arn", ""))
        return Credential(
            backend=self.id,
            kind="aws",
            secret={
                "AccessKeyId": keys["AccessKeyId"],
                "SecretAccessKey": keys["SecretAccessKey"],
                "SessionToken": keys["SessionToken"],
                "Expiration": expires.isoformat().replace("+00:00", "Z"),
            },
            expires_at=expires,
            lease_id=f"lease-{secrets.token_urlsafe(12)}",
            handle={"role_arn": role.arn, "session_name": name},
            details={
                "role": role.name,
                "role_arn": role.arn,
                "assumed_role_arn": assumed,
                "duration_seconds": duration,
                "region": self._region,
            },
        )


def _translate(error: ClientError, role: AwsRole) -> AccessDenied | UpstreamFailed:
    """A broker error for an STS refusal; only AWS's error code reaches the log."""
    info = error.response.get("Error", {})
    code = str(info.get("Code", "Unknown"))
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    detail = f"sts {code} (HTTP {status}) for {role.arn}"
    if code in _DENIED_CODES:
        return AccessDenied(f"AWS refused to let you assume role {role.name!r}", log_detail=detail)
    if status >= 500 or code in {"Throttling", "ServiceUnavailable", "InternalFailure"}:
        return UpstreamFailed("AWS STS is failing; try again later", log_detail=detail)
    return UpstreamFailed(
        f"AWS STS rejected the broker's request for role {role.name!r} ({code})",
        log_detail=detail,
    )
