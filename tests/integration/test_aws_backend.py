"""The AWS backend against moto (STS, IAM, S3), with every web-identity token verified the
way AWS does by the proxy in tests/peers/moto.py. The broker is served on a real port so the
proxy can fetch its discovery document and JWKS, as STS would."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog
from aiohttp.test_utils import TestClient, TestServer
from botocore.exceptions import ClientError
from moto.iam.access_control import IAMPolicy, PermissionResult

from adapters.base import Grant, Principal
from adapters.downstream.aws import AwsBackend, AwsRole, session_name
from adapters.errors import AccessDenied, InvalidRequest, UpstreamFailed
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.doctor import doctor_aws
from broker.keyring import generate_private_key
from broker.oauth.clients import hash_secret
from broker.oauth.issuance import remember_principal
from broker.services import Services
from broker.signer import KeyRingSigner
from policies.decision import Limits
from tests.peers.broker import ContractClient, audit_events, make_settings, start_broker
from tests.peers.moto import (
    ACCOUNT_A,
    ACCOUNT_B,
    TAGS_CLAIM,
    MotoServer,
    StsVerifier,
    ensure_provider,
    free_port,
    iter_secrets,
    make_role,
    serve,
    trust_policy,
)

AUDIENCE = "sts.amazonaws.com"
BUCKET = "binder-data"
OTHER_BUCKET = "binder-other"
ADA = Principal(
    idp="dev", issuer="urn:test", subject="ada", affiliation=("staff@campus.example.edu",)
)
BOB = Principal(idp="dev", issuer="urn:test", subject="bob")
USER_PREFIX_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                "Resource": f"arn:aws:s3:::{BUCKET}/users/{{principal}}/*",
            }
        ],
    }
)
BUCKET_PERMISSIONS = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": "s3:*",
            "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
        }
    ],
}


@dataclass
class AwsWorld:
    svc: Services
    issuer: str
    moto: MotoServer
    proxy: StsVerifier
    launch_arn: str
    analysis_arn: str
    orphan_arn: str  # a role in an account with no OIDC provider for the broker

    def backend(self, **overrides: Any) -> AwsBackend:
        args: dict[str, Any] = {
            "id": "aws",
            "signer": KeyRingSigner(self.svc.keyring, self.svc.tokens, issuer=self.issuer),
            "audience": AUDIENCE,
            "region": "us-east-1",
            "sts_endpoint": self.proxy.url,
            "roles": [
                AwsRole("launch", self.launch_arn, 7200, USER_PREFIX_POLICY),
                AwsRole("analysis", self.analysis_arn, 3600),
                AwsRole("orphan", self.orphan_arn, 3600),
            ],
            "default_role": None,
            "session_tags": {"project": "binder"},
        }
        args.update(overrides)
        return AwsBackend(**args)


@pytest_asyncio.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory,
    openbao: DevVault,
    vault_approle: AppRoleAuth,
    moto: MotoServer,
    sts_proxy: StsVerifier,
) -> AsyncIterator[AwsWorld]:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    tmp: Path = tmp_path_factory.mktemp("aws")
    settings = make_settings(tmp, openbao.address, vault_approle, server={"public_url": issuer})
    svc = await start_broker(settings)
    try:
        async with serve(app_with_services(svc), port):
            provider_a = ensure_provider(moto, ACCOUNT_A, issuer, AUDIENCE)
            provider_b = ensure_provider(moto, ACCOUNT_B, issuer, AUDIENCE)
            launch = make_role(
                moto, ACCOUNT_A, "binder-launch",
                trust=trust_policy(provider_a, issuer, AUDIENCE),
                permissions=BUCKET_PERMISSIONS, max_duration=7200,
            )  # fmt: skip
            analysis = make_role(
                moto, ACCOUNT_B, "binder-analysis",
                trust=trust_policy(provider_b, issuer, AUDIENCE),
                permissions=BUCKET_PERMISSIONS,
            )  # fmt: skip
            s3 = moto.client("s3", ACCOUNT_A)
            for bucket in (BUCKET, OTHER_BUCKET):
                try:
                    s3.create_bucket(Bucket=bucket)
                except ClientError:
                    pass  # left by an earlier module on the same moto
            orphan = "arn:aws:iam::333333333333:role/binder-launch"
            yield AwsWorld(svc, issuer, moto, sts_proxy, launch, analysis, orphan)
    finally:
        await svc.close()


@pytest_asyncio.fixture
async def aws(world: AwsWorld) -> AsyncIterator[AwsBackend]:
    world.proxy.clear()
    backend = world.backend()
    try:
        yield backend
    finally:
        await backend.close()


def grant(
    principal: Principal = ADA, ttl: int = 1800, max_ttl: int | None = 3600, role: str | None = None
) -> Grant:
    return Grant(
        principal, "launch", "aws", limits=Limits(max_ttl=max_ttl), ttl=ttl, role=role,
        policy_ids=("launch-small",),
    )  # fmt: skip


async def test_issues_keys_for_a_token_aws_would_accept(world: AwsWorld, aws: AwsBackend) -> None:
    before = datetime.now(UTC)
    credential = await aws.issue(grant(ttl=1800))

    assert credential.kind == "aws" and credential.backend == "aws"
    assert set(credential.secret) == {
        "AccessKeyId",
        "SecretAccessKey",
        "SessionToken",
        "Expiration",
    }
    assert 1790 <= (credential.expires_at - before).total_seconds() <= 1810
    assert credential.details["duration_seconds"] == 1800
    assert credential.details["role"] == "launch"
    assert credential.details["assumed_role_arn"] == (
        f"arn:aws:sts::{ACCOUNT_A}:assumed-role/binder-launch/{session_name(ADA.id)}"
    )
    assert credential.handle == {"role_arn": world.launch_arn, "session_name": session_name(ADA.id)}
    assert not any(s in repr(credential) for s in iter_secrets(credential.secret))

    [seen] = world.proxy.seen
    assert seen.verdict == "ok", seen.message
    assert seen.header["kid"] == world.svc.keyring.signer().kid
    assert seen.header["alg"] in ("ES256", "RS256")
    assert seen.claims["iss"] == world.issuer and seen.claims["aud"] == AUDIENCE
    assert seen.claims["sub"] == ADA.id
    assert seen.claims["exp"] - seen.claims["iat"] == 300
    assert seen.claims[TAGS_CLAIM] == {
        "principal_tags": {
            "project": ["binder"],
            "principal": [ADA.id],
            "idp": ["dev"],
            "affiliation": ["staff@campus.example.edu"],
        },
        "transitive_tag_keys": ["principal", "idp"],
    }
    assert seen.params["RoleSessionName"] == session_name(ADA.id)
    assert seen.params["DurationSeconds"] == "1800"

    sts = world.moto.client("sts", **credential.secret)
    identity = sts.get_caller_identity()
    assert identity["Arn"] == credential.details["assumed_role_arn"]


@pytest.mark.parametrize(
    ("ttl", "max_ttl", "role", "expected"),
    [
        pytest.param(600, 3600, None, 900, id="below-aws-minimum-raised-to-900"),
        pytest.param(50000, None, None, 7200, id="above-role-max-clipped-to-role"),
        pytest.param(50000, 43200, "analysis", 3600, id="other-role-own-max"),
        pytest.param(0, 1200, None, 1200, id="no-ttl-policy-max"),
    ],
)
async def test_duration_is_clamped_to_aws_and_the_role(
    world: AwsWorld, aws: AwsBackend, ttl: int, max_ttl: int | None, role: str | None,
    expected: int,
) -> None:  # fmt: skip
    credential = await aws.issue(grant(ttl=ttl, max_ttl=max_ttl, role=role))
    assert credential.details["duration_seconds"] == expected
    [seen] = world.proxy.accepted
    assert seen.params["DurationSeconds"] == str(expected)


async def test_policy_below_aws_minimum_is_refused_before_sts(
    world: AwsWorld, aws: AwsBackend
) -> None:
    with pytest.raises(AccessDenied) as caught:
        await aws.issue(grant(ttl=300, max_ttl=600))
    assert "900" in caught.value.description and caught.value.reasons == ("launch-small",)
    assert world.proxy.seen == []  # nothing reached STS


async def test_unknown_role_names_the_choices(world: AwsWorld, aws: AwsBackend) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await aws.issue(grant(role="admin"))
    assert "analysis, launch, orphan" in caught.value.description
    assert world.proxy.seen == []


async def test_roles_in_two_accounts(world: AwsWorld, aws: AwsBackend) -> None:
    first = await aws.issue(grant(role="launch"))
    second = await aws.issue(grant(role="analysis"))
    assert first.details["assumed_role_arn"].startswith(f"arn:aws:sts::{ACCOUNT_A}:")
    assert second.details["assumed_role_arn"].startswith(f"arn:aws:sts::{ACCOUNT_B}:")
    assert [s.verdict for s in world.proxy.seen] == ["ok", "ok"]
    identity = world.moto.client("sts", **second.secret).get_caller_identity()
    assert identity["Account"] == ACCOUNT_B


async def test_session_policy_is_templated_per_user(world: AwsWorld, aws: AwsBackend) -> None:
    ada = await aws.issue(grant(ADA))
    bob = await aws.issue(grant(BOB))
    ada_policy, bob_policy = (json.loads(s.params["Policy"]) for s in world.proxy.accepted)
    assert ada_policy["Statement"][0]["Resource"] == f"arn:aws:s3:::{BUCKET}/users/{ADA.id}/*"
    assert bob_policy["Statement"][0]["Resource"] == f"arn:aws:s3:::{BUCKET}/users/{BOB.id}/*"
    # moto ignores session policies, so evaluate Ada's with moto's own policy engine.
    engine = IAMPolicy(json.dumps(ada_policy))
    own = f"arn:aws:s3:::{BUCKET}/users/{ADA.id}/notebook.ipynb"
    others = f"arn:aws:s3:::{BUCKET}/users/{BOB.id}/notebook.ipynb"
    assert engine.is_action_permitted("s3:PutObject", own) == PermissionResult.PERMITTED
    assert engine.is_action_permitted("s3:PutObject", others) == PermissionResult.NEUTRAL
    assert ada.secret["AccessKeyId"] != bob.secret["AccessKeyId"]


async def test_issued_keys_work_on_s3_within_the_role_only(
    world: AwsWorld, aws: AwsBackend
) -> None:
    credential = await aws.issue(grant(ADA))
    s3 = world.moto.client("s3", **credential.secret)
    async with world.moto.enforcing_auth():
        s3.put_object(Bucket=BUCKET, Key=f"users/{ADA.id}/hello.txt", Body=b"hi")
        body = s3.get_object(Bucket=BUCKET, Key=f"users/{ADA.id}/hello.txt")["Body"].read()
        with pytest.raises(ClientError) as outside:
            s3.put_object(Bucket=OTHER_BUCKET, Key=f"users/{ADA.id}/hello.txt", Body=b"hi")
        forged = world.moto.client(
            "s3", **{**credential.secret, "SessionToken": credential.secret["SessionToken"] + "x"}
        )
        with pytest.raises(ClientError) as bad_token:
            forged.get_object(Bucket=BUCKET, Key=f"users/{ADA.id}/hello.txt")
    assert body == b"hi"
    assert outside.value.response["Error"]["Code"] == "AccessDenied"
    assert bad_token.value.response["Error"]["Code"] in ("InvalidToken", "AccessDenied")


async def test_verifier_rejects_a_token_from_another_key(world: AwsWorld) -> None:
    """The proxy really checks signatures: a token signed by a key outside the JWKS but
    with the broker's `kid` is refused, and the backend reports it as an upstream failure."""

    class ForeignSigner(KeyRingSigner):
        async def sign(self, claims: Any, *, audience: str, ttl: int) -> str:
            import jwt

            key = world.svc.keyring.signer()
            now = int(datetime.now(UTC).timestamp())
            body = {**claims, "iss": self.issuer, "aud": audience, "iat": now, "exp": now + ttl}
            foreign = generate_private_key(key.alg)
            return jwt.encode(body, foreign, algorithm=key.alg, headers={"kid": key.kid})

    world.proxy.clear()
    backend = world.backend(
        signer=ForeignSigner(world.svc.keyring, world.svc.tokens, issuer=world.issuer)
    )
    try:
        with pytest.raises(UpstreamFailed) as caught:
            await backend.issue(grant())
    finally:
        await backend.close()
    [seen] = world.proxy.seen
    assert seen.verdict == "InvalidIdentityToken" and "Signature" in seen.message
    assert "InvalidIdentityToken" in caught.value.log_detail
    assert seen.token not in caught.value.description + caught.value.log_detail


@pytest.mark.parametrize(
    ("overrides", "role", "verdict"),
    [
        pytest.param({"audience": "not-registered"}, None, "InvalidIdentityToken", id="wrong-aud"),
        pytest.param({}, "orphan", "InvalidIdentityToken", id="no-provider-in-account"),
    ],
)
async def test_verifier_rejects_what_aws_would(
    world: AwsWorld, overrides: dict[str, Any], role: str | None, verdict: str
) -> None:
    world.proxy.clear()
    backend = world.backend(**overrides)
    try:
        with pytest.raises(UpstreamFailed):
            await backend.issue(grant(role=role))
    finally:
        await backend.close()
    assert [s.verdict for s in world.proxy.seen] == [verdict]


async def test_trust_policy_subject_condition_denies_other_users(world: AwsWorld) -> None:
    provider = f"arn:aws:iam::{ACCOUNT_A}:oidc-provider/{world.issuer.split('://')[1]}"
    only_bob = make_role(
        world.moto, ACCOUNT_A, "binder-only-bob",
        trust=trust_policy(provider, world.issuer, AUDIENCE, sub=BOB.id),
        permissions=BUCKET_PERMISSIONS,
    )  # fmt: skip
    world.proxy.clear()
    backend = world.backend(roles=[AwsRole("bob", only_bob, 3600)])
    try:
        with pytest.raises(AccessDenied) as caught:
            await backend.issue(grant(ADA))
        assert (await backend.issue(grant(BOB))).details["role"] == "bob"
    finally:
        await backend.close()
    assert [s.verdict for s in world.proxy.seen] == ["AccessDenied", "ok"]
    assert "AccessDenied" in caught.value.log_detail


async def test_sts_unreachable_is_an_upstream_failure_without_secrets(world: AwsWorld) -> None:
    backend = world.backend(sts_endpoint=f"http://127.0.0.1:{free_port()}", timeout=2.0)
    try:
        with pytest.raises(UpstreamFailed) as caught:
            await backend.issue(grant())
    finally:
        await backend.close()
    text = f"{caught.value.description} {caught.value.log_detail} {caught.value!r}"
    assert "unreachable" in caught.value.description
    assert "eyJ" not in text  # no JWT (header or body) in what gets shown or logged


def aws_backend_settings(world: AwsWorld, tmp_path: Path, public_url: str, **extra: Any) -> Any:
    config = {
        "type": "aws",
        "id": "aws",
        "sts_endpoint": world.proxy.url,
        "roles": [
            {"name": "launch", "arn": world.launch_arn, "max_duration": 7200,
             "session_policy": USER_PREFIX_POLICY},
        ],
        **extra,
    }  # fmt: skip
    settings = world.svc.settings
    return make_settings(
        tmp_path, settings.vault.address, AppRoleAuth("unused", "unused"),
        server={"public_url": public_url}, backends=[config],
    )  # fmt: skip


async def test_doctor_passes_for_a_reachable_broker(world: AwsWorld, tmp_path: Path) -> None:
    settings = aws_backend_settings(world, tmp_path, world.issuer)
    lines: list[str] = []
    signer = KeyRingSigner(world.svc.keyring, world.svc.tokens, issuer=world.issuer)
    code = await doctor_aws(settings, "aws", signer=signer, out=lines.append)
    report = "\n".join(lines)
    assert code == 0, report
    assert "only with a test STS" in report  # loopback HTTP is called out
    assert f"key {world.svc.keyring.signer().kid}" in report
    assert not any(line.startswith("FIX") for line in lines)


async def test_doctor_lists_what_to_fix(world: AwsWorld, tmp_path: Path) -> None:
    # Reached as localhost, the broker still names 127.0.0.1 as its issuer: STS would refuse.
    wrong_name = world.issuer.replace("127.0.0.1", "localhost")
    settings = aws_backend_settings(world, tmp_path, wrong_name, session_tags={"cost*center": "x"})
    lines: list[str] = []
    code = await doctor_aws(settings, out=lines.append)
    report = "\n".join(lines)
    assert code == 1
    assert "FIX  discovery: its issuer is" in report
    assert "FIX  backend aws: session tags cost*center are not sent as given" in report
    assert "-> " in report  # each FIX says what to do

    closed = f"http://127.0.0.1:{free_port()}"
    lines.clear()
    settings = aws_backend_settings(world, tmp_path, closed)
    assert await doctor_aws(settings, out=lines.append) == 1
    assert any(line.startswith("FIX  discovery:") and "unreachable" in line for line in lines)


# --- through the API: POST /v1/credentials ------------------------------------------------

CLIENT_SECRET = "launcher-secret-aws-0123456789"


@pytest_asyncio.fixture
async def api(
    world: AwsWorld, tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[tuple[Services, ContractClient]]:
    """A second broker with two aws backends (one whose STS is down), served on a real port
    so the verifying proxy can fetch its discovery document and JWKS."""
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    provider = ensure_provider(world.moto, ACCOUNT_A, issuer, AUDIENCE)
    arn = make_role(
        world.moto, ACCOUNT_A, "binder-api-launch",
        trust=trust_policy(provider, issuer, AUDIENCE), permissions=BUCKET_PERMISSIONS,
    )  # fmt: skip
    roles = [{"name": "launch", "arn": arn, "max_duration": 7200}]
    settings = make_settings(
        tmp_path, openbao.address, vault_approle, mode="production", upstreams=[],
        server={"public_url": issuer},
        backends=[
            {"type": "aws", "id": "aws", "sts_endpoint": world.proxy.url, "roles": roles,
             "session_tags": {"project": "binder"}},
            {"type": "aws", "id": "aws-down", "sts_endpoint": f"http://127.0.0.1:{free_port()}",
             "roles": roles},
        ],
        clients=[{
            "client_id": "launcher", "name": "Launcher", "secret_hash": hash_secret(CLIENT_SECRET),
            "grant_types": ["urn:ietf:params:oauth:grant-type:token-exchange"],
            "scopes": ["launch:aws", "launch:aws-down"], "first_party": True,
        }],
    )  # fmt: skip
    svc = await start_broker(settings, dev_mode=False)
    try:
        await remember_principal(svc, ADA)
        server = TestServer(app_with_services(svc), host="127.0.0.1", port=port)
        async with TestClient(server) as raw:
            yield svc, ContractClient(raw)
    finally:
        await svc.close()


async def launch_token(svc: Services) -> str:
    minted = await svc.tokens.mint(
        subject=ADA.id, audience=svc.settings.server.public_url, client_id="launcher",
        scope=("launch:aws", "launch:aws-down"),
    )  # fmt: skip
    return minted.token


def rendered_logs(events: list[dict[str, Any]], records: list[logging.LogRecord]) -> str:
    lines = [json.dumps(e, default=repr, sort_keys=True) for e in events]
    return "\n".join(lines + [r.getMessage() for r in records])


async def test_api_issues_aws_keys_and_never_logs_or_audits_them(
    world: AwsWorld, api: tuple[Services, ContractClient], caplog: pytest.LogCaptureFixture
) -> None:
    svc, client = api
    world.proxy.clear()
    access = await launch_token(svc)
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        issued = await client.post(
            "/v1/credentials",
            json={"backend": "aws", "duration": 1200},
            headers={"Authorization": f"Bearer {access}"},
        )
        failed = await client.post(
            "/v1/credentials",
            json={"backend": "aws-down", "duration": 1200},
            headers={"Authorization": f"Bearer {access}"},
        )
    assert issued.status == 201, issued.text
    body = issued.json()
    assert body["kind"] == "aws" and body["details"]["duration_seconds"] == 1200
    assert body["details"]["assumed_role_arn"].endswith(
        f"/binder-api-launch/{session_name(ADA.id)}"
    )
    [seen] = world.proxy.accepted
    assert seen.claims["iss"] == svc.settings.server.public_url and seen.claims["sub"] == ADA.id
    keys = world.moto.client("sts", **body["credential"]).get_caller_identity()
    assert keys["Arn"] == body["details"]["assumed_role_arn"]

    assert failed.status == 503 and failed.json()["error"] == "temporarily_unavailable"
    assert "eyJ" not in failed.text

    audit = audit_events(svc)
    [record] = [r for r in audit if r["event"] == "credential.issued"]
    assert record["data"]["lease"] == body["lease_id"] and record["data"]["backend"] == "aws"
    failures = [r["data"] for r in audit if r["event"] == "credential.failed"]
    assert [f["backend"] for f in failures] == ["aws-down"] and "unreachable" in failures[0][
        "reason"
    ]
    planted = [*iter_secrets(body["credential"]), seen.token, access]
    logs = rendered_logs(events, caplog.records)
    audit_text = Path(svc.settings.audit.path).read_text()
    assert events and audit_text  # something was logged and audited
    for secret in planted:
        assert secret not in logs
        assert secret not in audit_text
    listed = await client.get("/v1/credentials", headers={"Authorization": f"Bearer {access}"})
    [lease] = listed.json()["leases"]
    assert lease["lease_id"] == body["lease_id"]
    assert not any(secret in listed.text for secret in planted[:3])
