"""The AWS backend's pure rules: session names, session tags, session-policy templates,
duration clamping, role choice and the translation of STS errors (no network)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from adapters.base import Grant, Principal
from adapters.downstream.aws import (
    AwsBackend,
    AwsRole,
    _translate,
    build_session_tags,
    render_policy,
    session_name,
    tag_text,
)
from adapters.errors import AccessDenied, ConfigurationError, InvalidRequest, UpstreamFailed
from broker.doctor import check_issuer
from broker.settings import AwsBackendConfig
from policies.decision import Limits

ARN = "arn:aws:iam::111111111111:role/launch"
ADA = Principal(idp="dev", issuer="urn:test", subject="ada")


class NoSigner:
    issuer = "https://broker.example.org"

    async def sign(self, claims: Any, *, audience: str, ttl: int) -> str:
        raise AssertionError("not called in unit tests")


def backend(**overrides: Any) -> AwsBackend:
    args: dict[str, Any] = {
        "id": "aws",
        "signer": NoSigner(),
        "audience": "sts.amazonaws.com",
        "region": "us-east-1",
        "sts_endpoint": None,
        "roles": [AwsRole("launch", ARN, 7200), AwsRole("big", ARN, 43200)],
        "default_role": None,
        "session_tags": {},
    }
    args.update(overrides)
    return AwsBackend(**args)


@pytest.mark.parametrize(
    "principal_id",
    ["u-0123456789abcdef0123456789abcdef", "x", "a b/c*d", "é" * 80, ""],
)
def test_session_name_is_always_valid(principal_id: str) -> None:
    name = session_name(principal_id)
    assert re.fullmatch(r"[\w+=,.@-]{2,64}", name, re.ASCII)
    assert name == session_name(principal_id)  # deterministic


def test_tag_text_keeps_aws_alphabet_only() -> None:
    assert tag_text("Ada Lovelace (staff)@uni.edu/x=1+2:ü", 256) == (
        "Ada Lovelace _staff_@uni.edu/x=1+2:ü"
    )
    assert tag_text("a" * 300, 256) == "a" * 256
    assert tag_text('quote"and\nnewline', 256) == "quote_and_newline"


def test_session_tags_clash_case_insensitively_and_skip_aws_prefix() -> None:
    tags = build_session_tags(
        {"Project": "binder", "aws:source": "x", "IDP": "static"}, {"idp": "campus"}
    )
    assert tags == {"Project": ["binder"], "idp": ["campus"]}
    with pytest.raises(ConfigurationError):
        build_session_tags({f"k{i}": "v" for i in range(51)}, {})


def test_session_policy_template_escapes_values_into_valid_json() -> None:
    template = '{"Statement": [{"Resource": "arn:aws:s3:::b/users/{subject}/*"}]}'
    policy = render_policy(template, principal="u-1", subject='x"}, "Effect": "Allow')
    document = json.loads(policy)
    assert document["Statement"][0]["Resource"] == 'arn:aws:s3:::b/users/x"}, "Effect": "Allow/*'
    with pytest.raises(ConfigurationError):
        render_policy('{"broken": {principal}}', principal="u-1", subject="s")
    with pytest.raises(ConfigurationError):
        render_policy(json.dumps({"pad": "x" * 2100}), principal="u-1", subject="s")


@pytest.mark.parametrize("subject", ["*", "a?", "${aws:username}", "ada/../bob", "bob/x", "sp ace"])
def test_subject_that_would_widen_a_session_policy_is_refused(subject: str) -> None:
    role = AwsRole("launch", ARN, 3600, '{"Resource": "arn:aws:s3:::b/users/{subject}/*"}')
    aws = backend(roles=[role])
    principal = Principal(idp="dev", issuer="urn:test", subject=subject)
    with pytest.raises(AccessDenied):
        aws.policy_for(Grant(principal, "launch", "aws"), role)


@pytest.mark.parametrize(
    ("ttl", "max_ttl", "role", "expected"),
    [
        pytest.param(600, 3600, "launch", 900, id="raised-to-900"),
        pytest.param(5000, 3600, "launch", 3600, id="policy-wins"),
        pytest.param(50000, None, "launch", 7200, id="role-max"),
        pytest.param(50000, None, "big", 43200, id="big-role-max"),
        pytest.param(0, None, "launch", 3600, id="sts-default"),
        pytest.param(0, 1000, "launch", 1000, id="no-ttl-policy-max"),
        pytest.param(900, 900, "launch", 900, id="exactly-900"),
    ],
)
def test_duration_is_clamped(ttl: int, max_ttl: int | None, role: str, expected: int) -> None:
    aws = backend()
    grant = Grant(ADA, "launch", "aws", limits=Limits(max_ttl=max_ttl), ttl=ttl)
    assert aws.duration_for(grant, aws.roles[role]) == expected


def test_policy_below_900_seconds_is_refused() -> None:
    aws = backend()
    grant = Grant(ADA, "launch", "aws", limits=Limits(max_ttl=899), ttl=600, policy_ids=("tiny",))
    with pytest.raises(AccessDenied) as caught:
        aws.duration_for(grant, aws.roles["launch"])
    assert "900" in caught.value.description and caught.value.reasons == ("tiny",)


def test_role_choice() -> None:
    aws = backend(default_role="big")
    assert aws.role_for(Grant(ADA, "launch", "aws")).name == "big"
    assert aws.role_for(Grant(ADA, "launch", "aws", role="launch")).name == "launch"
    with pytest.raises(InvalidRequest, match="big, launch"):
        aws.role_for(Grant(ADA, "launch", "aws", role="root"))


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"roles": []}, id="no-roles"),
        pytest.param({"default_role": "nope"}, id="unknown-default"),
        pytest.param({"roles": [AwsRole("r", ARN, 600)]}, id="max-below-900"),
        pytest.param({"roles": [AwsRole("r", ARN, 3600, "{not json")]}, id="bad-template"),
    ],
)
def test_bad_configuration_is_refused_at_start(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        backend(**overrides)


def client_error(code: str, status: int) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": "token eyJhbGciOi.secret.sig"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "AssumeRoleWithWebIdentity")


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("AccessDenied", 403, AccessDenied),
        ("InvalidIdentityToken", 400, UpstreamFailed),
        ("ExpiredTokenException", 400, UpstreamFailed),
        ("IDPCommunicationError", 400, UpstreamFailed),
        ("InternalFailure", 500, UpstreamFailed),
        ("Throttling", 400, UpstreamFailed),
    ],
)
def test_sts_errors_become_broker_errors_with_the_code_only(
    code: str, status: int, kind: type[Exception]
) -> None:
    error = _translate(client_error(code, status), AwsRole("launch", ARN, 3600))
    assert isinstance(error, kind)
    assert code in error.log_detail
    assert "eyJ" not in error.description + error.log_detail  # AWS's message is never copied


@pytest.mark.parametrize(
    ("issuer", "ok", "words"),
    [
        pytest.param("https://broker.example.edu", True, "is HTTPS", id="https"),
        pytest.param("http://127.0.0.1:8080", True, "only with a test STS", id="loopback"),
        pytest.param("http://broker.example.edu", False, "not HTTPS", id="plain-http"),
        pytest.param("https://broker.example.edu:8443", False, "port 8443", id="port"),
    ],
)
def test_doctor_issuer_rules(issuer: str, ok: bool, words: str) -> None:
    checks = check_issuer(issuer)
    assert all(c.ok for c in checks) is ok
    assert any(words in c.message for c in checks)
    assert all(c.fix for c in checks if not c.ok)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "aws"


def test_examples_are_consistent() -> None:
    """The example backend validates, its templates render, and the example trust policy
    admits a broker user (and only with the right audience) under the proxy's rules."""
    from tests.peers.moto import trust_allows

    data = tomllib.loads((EXAMPLES / "backend.toml").read_text())
    [config] = [AwsBackendConfig.model_validate(b) for b in data["backends"]]
    assert config.default_role == "user-data" and len(config.roles) == 2
    for template in (
        config.roles[0].session_policy,
        (EXAMPLES / "session-policy.json").read_text(),
    ):
        assert template is not None
        rendered = json.loads(render_policy(template, principal=ADA.id, subject="ada"))
        assert rendered["Statement"][0]["Resource"].endswith(f"/users/{ADA.id}/*")
    trust = (EXAMPLES / "trust-policy.json").read_text()
    provider = "arn:aws:iam::111122223333:oidc-provider/broker.example.edu"
    good = {"broker.example.edu:aud": "sts.amazonaws.com", "broker.example.edu:sub": ADA.id}
    for action in ("sts:AssumeRoleWithWebIdentity", "sts:TagSession"):
        assert trust_allows(trust, provider, good, action)
    assert not trust_allows(
        trust, provider, {**good, "broker.example.edu:aud": "x"}, "sts:TagSession"
    )
    json.loads((EXAMPLES / "permissions-policy.json").read_text())
