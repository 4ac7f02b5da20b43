"""AWS as a test peer: `moto_server` (STS, IAM, S3 in one process) and, in front of its STS,
a proxy that verifies every web-identity token the way AWS does, because moto accepts any.

What the proxy checks for AssumeRoleWithWebIdentity, following AWS's documentation (STS API
reference AssumeRoleWithWebIdentity; IAM user guide "Create an OpenID Connect (OIDC) identity
provider in IAM", "Pass session tags in AWS STS"):
- RoleSessionName is 2-64 characters of `[\\w+=,.@-]`; DurationSeconds lies in
  [900, the role's MaxSessionDuration]; the inline session policy is JSON of <= 2048 chars.
- The JWT header names a supported alg (RS256/384/512, ES256/384/512) and a `kid`.
- An IAM OIDC provider in the role's account is registered for the token's `iss` (scheme
  stripped, as IAM stores it); `aud` is in that provider's client-id list.
- `{iss}/.well-known/openid-configuration` is reachable, its `issuer` equals `iss`, its
  `jwks_uri` is reachable and holds the `kid`; the signature verifies with that key;
  `exp`, `iat` and `sub` are present, `exp` is not past (AWS allows 5 minutes of skew).
- The role exists and its trust policy allows `sts:AssumeRoleWithWebIdentity` for the
  provider's ARN with `StringEquals`/`StringLike` conditions on `<provider>:aud` and
  `<provider>:sub` met; a token with session tags also needs `sts:TagSession`.
- Session tags: `principal_tags` maps keys to one-element lists; at most 50; keys 1-128 and
  values 0-256 characters of letters, numbers, spaces and `_.:/=+-@`; `transitive_tag_keys`
  name tags that are present.
A failing token gets STS's error XML (InvalidIdentityToken, AccessDenied, ValidationError,
...); a valid one is forwarded to moto. Every call is recorded with its verdict.

moto's own IAM enforcement (`/moto-api/reset-auth`, INITIAL_NO_AUTH_ACTION_COUNT) checks the
signature, the session token and the role's identity policies on S3 calls made with the
issued keys, but NOT the inline session policy (moto 5.2: `AssumedRoleAccessKey.
collect_policies` reads only the role's policies); and with enforcement on, moto answers an
unsigned AssumeRoleWithWebIdentity with a 500. `enforcing_auth()` therefore turns it on only
around the S3 calls of a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

import aiohttp
import boto3
import jwt
import pytest_asyncio
from aiohttp import web
from botocore.config import Config
from botocore.exceptions import ClientError

REGION = "us-east-1"
ACCOUNT_A = "111111111111"
ACCOUNT_B = "222222222222"
SUPPORTED_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
CLOCK_SKEW = 300
_SESSION_NAME = re.compile(r"^[\w+=,.@-]{2,64}$", re.ASCII)
_TAG_PUNCTUATION = frozenset("_.:/=+-@")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serve(app: web.Application, port: int) -> AsyncIterator[str]:
    """`app` on 127.0.0.1:`port` until the block ends; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class MotoServer:
    """A `moto_server` child process on a free loopback port; `stop()` ends it by PID."""

    def __init__(self, process: subprocess.Popen[bytes], endpoint: str, log_path: Path) -> None:
        self._process = process
        self.endpoint = endpoint
        self.log_path = log_path
        self._clients: dict[tuple[str, str], Any] = {}

    @property
    def pid(self) -> int:
        return self._process.pid

    @classmethod
    async def start(cls) -> MotoServer:
        port = free_port()
        log_path = Path(tempfile.mkdtemp(prefix="binder-broker-moto-")) / "moto.log"
        binary = Path(sys.executable).with_name("moto_server")
        env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "false"}
        env.pop("MOTO_ACCOUNT_ID", None)  # the account comes from each request
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                [str(binary), "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        server = cls(process, f"http://127.0.0.1:{port}", log_path)
        try:
            await server._wait_ready()
        except BaseException:
            server.stop()
            raise
        return server

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(f"moto_server exited; see {self.log_path}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.endpoint}/moto-api/data.json") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"moto_server did not start; see {self.log_path}")

    def stop(self) -> None:
        """Terminate (SIGKILL after 5 s) and reap the child; idempotent."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def client(self, service: str, account: str = ACCOUNT_A, **keys: str) -> Any:
        """A synchronous boto3 client on moto acting in `account` (test set-up and checks).
        With `keys` (AccessKeyId, SecretAccessKey, SessionToken) it signs with those."""
        if not keys and (service, account) in self._clients:
            return self._clients[(service, account)]
        client = boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=keys.get("AccessKeyId", "testing"),
            aws_secret_access_key=keys.get("SecretAccessKey", "testing"),
            aws_session_token=keys.get("SessionToken"),
            config=Config(retries={"max_attempts": 1}),
        )
        if not keys:

            def add_account(request: Any, **_: Any) -> None:
                request.headers["x-moto-account-id"] = account

            client.meta.events.register("before-sign.*.*", add_account)
            self._clients[(service, account)] = client
        return client

    @contextlib.asynccontextmanager
    async def enforcing_auth(self) -> AsyncIterator[None]:
        """moto checks signatures and the role's identity policies inside the block."""
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.endpoint}/moto-api/reset-auth", data=b"0") as resp:
                assert resp.status == 200, await resp.text()
            try:
                yield
            finally:
                async with http.post(f"{self.endpoint}/moto-api/reset-auth", data=b"inf"):
                    pass


# --- IAM set-up --------------------------------------------------------------------------


def provider_host(issuer: str) -> str:
    """How IAM names an OIDC provider: the issuer URL without its scheme."""
    return issuer.split("://", 1)[-1].rstrip("/")


def trust_policy(provider_arn: str, issuer: str, audience: str, sub: str = "u-*") -> str:
    host = provider_host(issuer)
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Federated": provider_arn},
                    "Action": ["sts:AssumeRoleWithWebIdentity", "sts:TagSession"],
                    "Condition": {
                        "StringEquals": {f"{host}:aud": audience},
                        "StringLike": {f"{host}:sub": sub},
                    },
                }
            ],
        }
    )


def ensure_provider(moto: MotoServer, account: str, issuer: str, audience: str) -> str:
    """The IAM OIDC provider for `issuer` in `account` (created if missing); its ARN."""
    iam = moto.client("iam", account)
    arn = f"arn:aws:iam::{account}:oidc-provider/{provider_host(issuer)}"
    try:
        iam.get_open_id_connect_provider(OpenIDConnectProviderArn=arn)
        iam.delete_open_id_connect_provider(OpenIDConnectProviderArn=arn)
    except ClientError:
        pass
    created = iam.create_open_id_connect_provider(Url=issuer, ClientIDList=[audience])
    return str(created["OpenIDConnectProviderArn"])


def make_role(
    moto: MotoServer,
    account: str,
    name: str,
    *,
    trust: str,
    permissions: Mapping[str, Any],
    max_duration: int = 3600,
) -> str:
    """A role with an inline permissions policy (replaced if it exists); its ARN."""
    iam = moto.client("iam", account)
    try:
        for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
            iam.delete_role_policy(RoleName=name, PolicyName=policy)
        iam.delete_role(RoleName=name)
    except ClientError:
        pass
    role = iam.create_role(
        RoleName=name, AssumeRolePolicyDocument=trust, MaxSessionDuration=max_duration
    )
    iam.put_role_policy(
        RoleName=name, PolicyName="permissions", PolicyDocument=json.dumps(permissions)
    )
    return str(role["Role"]["Arn"])


# --- the verifying proxy -----------------------------------------------------------------


class StsRefusal(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass
class Seen:
    """One AssumeRoleWithWebIdentity call as the proxy saw it."""

    params: dict[str, str]
    verdict: str  # "ok" or the STS error code sent back
    message: str = ""
    header: dict[str, Any] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict)

    @property
    def token(self) -> str:
        return self.params.get("WebIdentityToken", "")


def _json_doc(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _tag_text_ok(text: str) -> bool:
    return all(ch in _TAG_PUNCTUATION or unicodedata.category(ch)[0] in "LNZ" for ch in text)


def check_tags(tags: Any) -> bool:
    """Validates the session-tag claim; True when it holds at least one tag."""
    if not isinstance(tags, dict):
        raise StsRefusal("InvalidIdentityToken", "session tags claim is not an object")
    principal_tags = tags.get("principal_tags", {})
    if not isinstance(principal_tags, dict) or len(principal_tags) > 50:
        raise StsRefusal("InvalidIdentityToken", "principal_tags must map at most 50 tags")
    lowered = [key.lower() for key in principal_tags]
    if len(set(lowered)) != len(lowered):
        raise StsRefusal("InvalidIdentityToken", "duplicate tag keys (case-insensitive)")
    for key, values in principal_tags.items():
        if not (1 <= len(key) <= 128 and _tag_text_ok(key)) or key.lower().startswith("aws:"):
            raise StsRefusal("InvalidIdentityToken", f"invalid session tag key {key!r}")
        if not (isinstance(values, list) and len(values) == 1 and isinstance(values[0], str)):
            raise StsRefusal("InvalidIdentityToken", f"tag {key!r} needs one string value")
        if not (len(values[0]) <= 256 and _tag_text_ok(values[0])):
            raise StsRefusal("InvalidIdentityToken", f"invalid value of session tag {key!r}")
    for key in tags.get("transitive_tag_keys", []):
        if key not in principal_tags:
            raise StsRefusal("InvalidIdentityToken", f"transitive tag {key!r} is not set")
    return bool(principal_tags)


def _condition_met(operator: str, block: Mapping[str, Any], context: Mapping[str, str]) -> bool:
    for key, expected in block.items():
        actual = context.get(key)
        if actual is None:
            return False
        allowed = [str(v) for v in _as_list(expected)]
        if operator == "StringEquals" and actual not in allowed:
            return False
        if operator == "StringLike" and not any(fnmatch.fnmatchcase(actual, p) for p in allowed):
            return False
    return True


def trust_allows(document: Any, provider_arn: str, context: Mapping[str, str], action: str) -> bool:
    """Whether an Allow statement of the trust policy admits this federated call (only the
    condition operators StringEquals/StringLike are understood; any other fails closed)."""
    for statement in _as_list(_json_doc(document).get("Statement", [])):
        if statement.get("Effect") != "Allow":
            continue
        federated = _as_list(statement.get("Principal", {}).get("Federated", []))
        if provider_arn not in federated or action not in _as_list(statement.get("Action", [])):
            continue
        conditions = statement.get("Condition", {})
        if all(
            op in ("StringEquals", "StringLike") and _condition_met(op, block, context)
            for op, block in conditions.items()
        ):
            return True
    return False


class StsVerifier:
    """The proxy in front of moto's STS. `seen` records every AssumeRoleWithWebIdentity."""

    def __init__(self, moto: MotoServer) -> None:
        self.moto = moto
        self.seen: list[Seen] = []
        self.url = ""

    def clear(self) -> None:
        self.seen.clear()

    @property
    def accepted(self) -> list[Seen]:
        return [s for s in self.seen if s.verdict == "ok"]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        params = dict(parse_qsl(body.decode(), keep_blank_values=True))
        if params.get("Action") != "AssumeRoleWithWebIdentity":
            return await self._forward(request, body)
        seen = Seen(params=params, verdict="ok")
        self.seen.append(seen)
        try:
            await self.verify(params, seen)
        except StsRefusal as refusal:
            seen.verdict, seen.message = refusal.code, refusal.message
            return _error_xml(refusal)
        return await self._forward(request, body)

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                request.method, f"{self.moto.endpoint}{request.path_qs}", data=body, headers=headers
            ) as resp,
        ):
            content = await resp.read()
            return web.Response(
                status=resp.status, body=content, content_type=resp.content_type or "text/xml"
            )

    async def verify(self, params: Mapping[str, str], seen: Seen) -> None:
        if not _SESSION_NAME.match(params.get("RoleSessionName", "")):
            raise StsRefusal("ValidationError", "RoleSessionName fails [\\w+=,.@-]{2,64}")
        policy = params.get("Policy")
        if policy is not None:
            if len(policy) > 2048:
                raise StsRefusal("PackedPolicyTooLarge", "session policy over 2048 characters")
            try:
                json.loads(policy)
            except ValueError:
                raise StsRefusal("MalformedPolicyDocument", "session policy is not JSON") from None
        token = params.get("WebIdentityToken", "")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise StsRefusal("InvalidIdentityToken", "the token is not a JWT") from None
        seen.header, seen.claims = header, unverified
        if header.get("alg") not in SUPPORTED_ALGS:
            raise StsRefusal("InvalidIdentityToken", f"unsupported alg {header.get('alg')}")
        if not header.get("kid"):
            raise StsRefusal("InvalidIdentityToken", "the token header has no kid")
        issuer = str(unverified.get("iss", ""))
        role_arn = params.get("RoleArn", "")
        match = re.match(r"^arn:aws:iam::(\d{12}):role/(?:.*/)?([\w+=,.@-]+)$", role_arn)
        if not match:
            raise StsRefusal("ValidationError", "RoleArn is not a role ARN")
        account, role_name = match.groups()
        provider_arn = f"arn:aws:iam::{account}:oidc-provider/{provider_host(issuer)}"
        provider, role = await asyncio.to_thread(self._iam_lookup, account, provider_arn, role_name)
        if provider is None:
            raise StsRefusal(
                "InvalidIdentityToken",
                f"No OpenIDConnect provider found in your account for {issuer}",
            )
        key = await self._signing_key(issuer, str(header["kid"]))
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[str(header["alg"])],
                audience=list(provider["ClientIDList"]),
                issuer=issuer,
                leeway=CLOCK_SKEW,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise StsRefusal("ExpiredTokenException", "Token expired") from None
        except jwt.InvalidAudienceError:
            raise StsRefusal("InvalidIdentityToken", "Incorrect token audience") from None
        except jwt.PyJWTError as error:
            raise StsRefusal("InvalidIdentityToken", f"token rejected: {error}") from None
        if claims["iat"] > time.time() + CLOCK_SKEW:
            raise StsRefusal("InvalidIdentityToken", "token issued in the future")
        tagged = TAGS_CLAIM in claims and check_tags(claims[TAGS_CLAIM])
        if role is None:
            raise StsRefusal(
                "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", 403
            )
        host = provider_host(issuer)
        audiences = _as_list(claims["aud"])
        context = {f"{host}:aud": str(audiences[0]), f"{host}:sub": str(claims["sub"])}
        actions = ["sts:AssumeRoleWithWebIdentity"] + (["sts:TagSession"] if tagged else [])
        for action in actions:
            if not trust_allows(role["AssumeRolePolicyDocument"], provider_arn, context, action):
                raise StsRefusal("AccessDenied", f"Not authorized to perform {action}", 403)
        duration = int(params.get("DurationSeconds", "3600"))
        if not 900 <= duration <= int(role["MaxSessionDuration"]):
            raise StsRefusal(
                "ValidationError",
                "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.",
            )

    def _iam_lookup(
        self, account: str, provider_arn: str, role_name: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        iam = self.moto.client("iam", account)
        try:
            provider = iam.get_open_id_connect_provider(OpenIDConnectProviderArn=provider_arn)
        except ClientError:
            provider = None
        try:
            role = iam.get_role(RoleName=role_name)["Role"]
        except ClientError:
            role = None
        return provider, role

    async def _signing_key(self, issuer: str, kid: str) -> Any:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                async with http.get(f"{issuer}/.well-known/openid-configuration") as resp:
                    if resp.status != 200:
                        raise StsRefusal("InvalidIdentityToken", "discovery document unreachable")
                    discovery = await resp.json(content_type=None)
                if discovery.get("issuer") != issuer:
                    raise StsRefusal("InvalidIdentityToken", "discovery issuer does not match iss")
                async with http.get(str(discovery["jwks_uri"])) as resp:
                    if resp.status != 200:
                        raise StsRefusal("InvalidIdentityToken", "JWKS unreachable")
                    jwks = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, KeyError, ValueError):
            raise StsRefusal(
                "IDPCommunicationError", "could not reach the identity provider"
            ) from None
        for entry in jwks.get("keys", []):
            if entry.get("kid") == kid:
                return jwt.PyJWK(entry).key
        raise StsRefusal("InvalidIdentityToken", f"no key {kid} in the provider's JWKS")


TAGS_CLAIM = "https://aws.amazon.com/tags"


def _error_xml(refusal: StsRefusal) -> web.Response:
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<Error><Type>Sender</Type><Code>{escape(refusal.code)}</Code>"
        f"<Message>{escape(refusal.message)}</Message></Error>"
        f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
    )
    return web.Response(status=refusal.status, text=body, content_type="text/xml")


# --- fixtures ----------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session")
async def moto() -> AsyncIterator[MotoServer]:
    """The session's moto_server (STS, IAM, S3); stopped by PID at teardown."""
    server = await MotoServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture(scope="session")
async def sts_proxy(moto: MotoServer) -> AsyncIterator[StsVerifier]:
    """The verifying proxy in front of moto's STS, on its own port."""
    verifier = StsVerifier(moto)
    async with serve(verifier.app(), free_port()) as url:
        verifier.url = url
        yield verifier


def iter_secrets(values: Mapping[str, Any]) -> Iterator[str]:
    """The secret strings of an AWS credential (for leak checks)."""
    for key in ("AccessKeyId", "SecretAccessKey", "SessionToken"):
        if values.get(key):
            yield str(values[key])
