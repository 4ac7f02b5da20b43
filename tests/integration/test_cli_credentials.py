"""`broker credentials aws` as the AWS CLI's credential_process: after `broker login`, it
prints the JSON the AWS SDKs read, keeps the credential 0600 and reuses it until shortly
before it expires, then fetches a new one; errors are one clear line. Against a real broker
on a port, moto's STS behind the verifying proxy, and the CLI as a subprocess."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from tests.integration.test_cli_login import (  # noqa: F401  (live_broker is a fixture)
    LiveFactory,
    live_broker,
    login,
    mode,
    run_cli,
)
from tests.peers.broker import audit_events
from tests.peers.moto import MotoServer, StsVerifier, ensure_provider, make_role, trust_policy

ACCOUNT = "444455556666"
AUDIENCE = "sts.amazonaws.com"
PERMISSIONS = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "s3:ListAllMyBuckets", "Resource": "*"}]}  # fmt: skip


def issued(events: list[dict[str, object]]) -> int:
    return len([e for e in events if e["event"] == "credential.issued"])


async def test_credential_process_is_cached_and_renewed_before_expiry(
    live_broker: LiveFactory,  # noqa: F811
    moto: MotoServer,
    sts_proxy: StsVerifier,
    unused_tcp_port: int,
) -> None:
    issuer = f"http://127.0.0.1:{unused_tcp_port}"
    provider = ensure_provider(moto, ACCOUNT, issuer, AUDIENCE)
    arn = make_role(
        moto, ACCOUNT, "binder-cli", trust=trust_policy(provider, issuer, AUDIENCE),
        permissions=PERMISSIONS,
    )  # fmt: skip
    backend = {"type": "aws", "id": "aws", "sts_endpoint": sts_proxy.url,
               "roles": [{"name": "notebook", "arn": arn}]}  # fmt: skip
    live = await live_broker(port=unused_tcp_port, backends=[backend])
    code, _out, err = await login(live)
    assert code == 0, err

    code, out, err = await run_cli(live, "credentials", "aws", "--backend", "aws")
    assert code == 0, err
    first = json.loads(out)
    assert first["Version"] == 1
    assert set(first) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}
    expiration = datetime.fromisoformat(first["Expiration"].replace("Z", "+00:00"))
    assert timedelta(minutes=55) < expiration - datetime.now(UTC) <= timedelta(hours=1)
    assert first["SecretAccessKey"] not in err
    [cached] = list((live.config_dir / "credentials").glob("*.json"))
    assert mode(cached) == 0o600
    assert issued(audit_events(live.svc)) == 1

    code, out, err = await run_cli(live, "credentials", "aws", "--backend", "aws")
    assert code == 0, err
    assert json.loads(out) == first  # reused: the broker was not asked again
    assert issued(audit_events(live.svc)) == 1

    # Four minutes left: inside the renewal margin, so the next call fetches new keys.
    body = json.loads(cached.read_text())
    soon = datetime.now(UTC) + timedelta(minutes=4)
    body["expires_at"] = soon.strftime("%Y-%m-%dT%H:%M:%SZ")
    cached.write_text(json.dumps(body))
    code, out, err = await run_cli(live, "credentials", "aws", "--backend", "aws")
    assert code == 0, err
    assert json.loads(out)["AccessKeyId"] != first["AccessKeyId"]
    assert issued(audit_events(live.svc)) == 2


async def test_errors_are_one_clear_line(live_broker: LiveFactory) -> None:  # noqa: F811
    live = await live_broker(
        backends=[{"type": "vault_secret", "id": "home", "name": "home-token"}]
    )
    code, out, err = await run_cli(live, "credentials", "aws", "--backend", "home")
    assert code != 0 and out == ""
    assert "not signed in: run broker login" in err and "Traceback" not in err
    code, _out, err = await login(live)
    assert code == 0, err
    code, out, err = await run_cli(live, "credentials", "aws", "--backend", "nope")
    assert code != 0 and out == "" and "Traceback" not in err
    assert "no backend 'nope'" in err
