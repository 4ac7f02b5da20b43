"""The git gateway with real git on both sides: `git clone`, `git fetch` and `git push`
through the broker to a `git http-backend` that requires HTTP Basic with the upstream
secret (kept in the real OpenBao where `adapters/downstream/git_host.py` reads it).

The client holds only a broker token (from `broker git-credential`, or in
`http.extraHeader`); the upstream secret never reaches its environment, the URL, the clone's
`.git/config`, git's output, the audit file or the broker's log. A reviewer grant pinned to
one commit clones exactly that commit and cannot fetch another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog
from aiohttp.test_utils import TestClient, TestServer

from adapters.base import Principal
from adapters.downstream.git_host import org_secret_path, user_secret_path
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.cli_client import TokenStore
from broker.devvault import DevVault
from broker.logs import configure_logging
from broker.oauth.issuance import remember_principal
from broker.services import Services
from broker.storage import GrantRecord
from tests.peers.broker import ContractClient, audit_events, make_settings, start_broker
from tests.peers.git_http import GitPeer, add_commit, free_port, make_repo, repo_heads

ADA = Principal(idp="dev", issuer="urn:binder-broker:dev", subject="ada", groups=("lab",))
BACKEND = "campus"
OWNER = "lab"
BROKER_BIN = str(Path(sys.executable).with_name("broker"))
SITE_POLICY = """
@id("lab-reads-lab-repos")
permit (principal in Group::"lab", action == Action::"read_repo", resource)
when { resource.namespace == "lab" };
"""


@dataclass
class Gateway:
    svc: Services
    client: ContractClient
    url: str  # the broker's public URL
    peer: GitPeer


def write_policies(directory: Path, site: str = SITE_POLICY) -> Path:
    directory.mkdir()
    (directory / "site.cedar").write_text(site)
    schema = Path(__file__).resolve().parents[2] / "policies" / "broker.cedarschema"
    (directory / schema.name).write_text(schema.read_text())
    return directory


@contextlib.asynccontextmanager
async def open_gateway(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth, git_peer: GitPeer
) -> AsyncIterator[Gateway]:
    """A broker on a fixed loopback port (git's credential `host` must be its public URL's)
    with one generic git backend in front of the git peer, and the lab's secret stored."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = make_settings(
        tmp_path, openbao.address, vault_approle, mode="production", upstreams=[],
        server={"public_url": url},
        backends=[{"type": "git", "id": BACKEND, "url": git_peer.url}],
        policy={"directory": str(write_policies(tmp_path / "policies"))},
    )  # fmt: skip
    svc = await start_broker(settings, dev_mode=False)
    try:
        await remember_principal(svc, ADA)
        # The OpenBao server is the session's: no user secret of an earlier test may win over
        # the organisation's.
        await svc.vault.kv_delete(user_secret_path(svc.settings.vault.prefix, BACKEND, ADA.id))
        await svc.vault.kv_write(
            org_secret_path(svc.settings.vault.prefix, BACKEND, OWNER),
            {"username": git_peer.username, "password": git_peer.password},
        )
        server = TestServer(app_with_services(svc), host="127.0.0.1", port=port)
        async with TestClient(server) as raw:
            yield Gateway(svc, ContractClient(raw), url, git_peer)
    finally:
        await svc.close()


@pytest_asyncio.fixture
async def gateway(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth, git_peer: GitPeer
) -> AsyncIterator[Gateway]:
    async with open_gateway(tmp_path, openbao, vault_approle, git_peer) as gw:
        yield gw


def new_repo(peer: GitPeer, commits: int = 3) -> tuple[str, list[str]]:
    name = f"paper-{secrets.token_hex(4)}"
    return name, make_repo(peer.root, OWNER, name, commits=commits)


async def mint(
    gw: Gateway, scope: tuple[str, ...] = ("repo:read",), **extra: Any
) -> tuple[str, str]:
    minted = await gw.svc.tokens.mint(
        subject=str(extra.pop("subject", ADA.id)), audience=gw.url, client_id="launcher",
        scope=scope, extra=extra or None,
    )  # fmt: skip
    return minted.token, minted.jti


@dataclass
class Result:
    code: int
    out: str
    err: str


class GitClient:
    """git in a throw-away HOME with its own global config and nothing else in its env."""

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.gitconfig = home / ".gitconfig"
        self.gitconfig.write_text("[user]\n\tname = Test\n\temail = test@example.org\n")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": str(self.gitconfig),
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": "/bin/false",
            "BROKER_CONFIG_DIR": str(home / "broker"),
        }
        self.outputs: list[str] = []

    def use_credential_helper(self, issuer: str, token: str) -> None:
        """Configure `broker git-credential` and store a login as `broker login` would."""
        with self.gitconfig.open("a") as config:
            config.write(f"[credential]\n\thelper = {BROKER_BIN} git-credential\n")
        entry = {
            "client_id": "broker-cli", "token_endpoint": f"{issuer}/oauth/token",
            "access_token": token, "token_type": "Bearer",
            "expires_at": int(time.time()) + 3600, "refresh_token": None, "scope": "repo:read",
        }  # fmt: skip
        TokenStore(home_config(self.home)).save({"default": issuer, "issuers": {issuer: entry}})

    async def run(self, *args: str, cwd: Path | None = None) -> Result:
        proc = await asyncio.create_subprocess_exec(
            "git", *args, cwd=cwd, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        result = Result(proc.returncode or 0, out.decode(), err.decode())
        self.outputs += [result.out, result.err]
        return result


def home_config(home: Path) -> Path:
    return home / "broker"


def gateway_url(gw: Gateway, name: str, owner: str = OWNER) -> str:
    return f"{gw.url}/git/{BACKEND}/{owner}/{name}.git"


def assert_secret_absent(gw: Gateway, git: GitClient, clone: Path | None, *texts: str) -> None:
    secret = gw.peer.password
    assert secret not in json.dumps(git.env)
    for text in (*git.outputs, *texts, Path(gw.svc.settings.audit.path).read_text()):
        assert secret not in text
    if clone is not None:
        config = (clone / ".git" / "config").read_text()
        assert secret not in config and gw.peer.url not in config
        for path in (clone / ".git").rglob("*"):
            if path.is_file() and path.stat().st_size < 1 << 20:
                assert secret.encode() not in path.read_bytes(), path


@pytest.fixture
def logs() -> Any:
    """The broker's structlog JSON output during the test, as text (configured into a
    buffer, and the previous configuration put back afterwards)."""
    import io

    saved = structlog.get_config()
    buffer = io.StringIO()
    real = sys.stderr
    sys.stderr = buffer
    try:
        configure_logging("debug")
    finally:
        sys.stderr = real
    try:
        yield buffer
    finally:
        structlog.configure(**saved)


async def test_clone_and_fetch_with_the_credential_helper(
    gateway: Gateway, tmp_path: Path, logs: Any
) -> None:
    gw = gateway
    name, shas = new_repo(gw.peer)
    token, jti = await mint(gw)
    git = GitClient(tmp_path / "home")
    git.use_credential_helper(gw.url, token)
    clone = tmp_path / "clone"
    cloned = await git.run("clone", gateway_url(gw, name), str(clone))
    assert cloned.code == 0, cloned.err
    assert (await git.run("rev-parse", "HEAD", cwd=clone)).out.strip() == shas[-1]
    assert (clone / "README.md").read_text() == f"# {OWNER}/{name}\n\ncommit 2\n"
    log = (await git.run("log", "--format=%H", cwd=clone)).out.split()
    assert log == list(reversed(shas))

    newer = add_commit(gw.peer.root, OWNER, name, text="a fourth commit")
    fetched = await git.run("fetch", "origin", cwd=clone)
    assert fetched.code == 0, fetched.err
    assert (await git.run("rev-parse", "origin/main", cwd=clone)).out.strip() == newer

    # Every request that reached the git host carried the upstream secret, not the token.
    seen = gw.peer.requests(f"/{OWNER}/{name}.git/")
    assert seen and all(r["authorized"] and r["username"] == gw.peer.username for r in seen)
    reads = [r for r in audit_events(gw.svc, "repo.read") if r["data"]["repo"].endswith(name)]
    assert len(reads) == len(seen)  # one record per request, none for the 401 round trip
    assert all(r["actor"] == ADA.id and r["data"]["jti"] == jti for r in reads)
    assert {r["data"]["client"] for r in reads} == {"launcher"}
    assert {r["data"]["service"] for r in reads} == {"git-upload-pack"}
    assert token not in Path(gw.svc.settings.audit.path).read_text()
    output = logs.getvalue()
    assert f"/git/{BACKEND}/{OWNER}/{name}.git/info/refs" in output  # the log was captured
    assert token not in output
    assert_secret_absent(gw, git, clone, output)
    assert (await git.run("remote", "get-url", "origin", cwd=clone)).out.strip() == (
        gateway_url(gw, name)
    )


async def test_clone_with_a_bearer_token_in_http_extra_header(
    gateway: Gateway, tmp_path: Path, logs: Any
) -> None:
    gw = gateway
    name, shas = new_repo(gw.peer, commits=2)
    token, _ = await mint(gw)
    git = GitClient(tmp_path / "home")
    clone = tmp_path / "clone"
    header = f"http.extraHeader=Authorization: Bearer {token}"
    cloned = await git.run("-c", header, "clone", gateway_url(gw, name), str(clone))
    assert cloned.code == 0, cloned.err
    assert (await git.run("rev-parse", "HEAD", cwd=clone)).out.strip() == shas[-1]
    newer = add_commit(gw.peer.root, OWNER, name)
    fetched = await git.run("-c", header, "fetch", "origin", cwd=clone)
    assert fetched.code == 0, fetched.err
    assert (await git.run("rev-parse", "origin/main", cwd=clone)).out.strip() == newer
    # Without the header (and with no helper) git gets the Basic challenge and gives up.
    refused = await git.run("fetch", "origin", cwd=clone)
    assert refused.code != 0
    assert_secret_absent(gw, git, clone, logs.getvalue())


async def test_push_is_refused_and_the_upstream_is_unchanged(
    gateway: Gateway, tmp_path: Path
) -> None:
    gw = gateway
    name, _ = new_repo(gw.peer)
    before = repo_heads(gw.peer.root, OWNER, name)
    token, jti = await mint(gw)
    git = GitClient(tmp_path / "home")
    git.use_credential_helper(gw.url, token)
    clone = tmp_path / "clone"
    assert (await git.run("clone", gateway_url(gw, name), str(clone))).code == 0
    (clone / "NEW.md").write_text("pushed?\n")
    await git.run("add", "NEW.md", cwd=clone)
    assert (await git.run("commit", "-qm", "try a push", cwd=clone)).code == 0
    pushed = await git.run("push", "origin", "HEAD:main", cwd=clone)
    assert pushed.code != 0
    assert "403" in pushed.err
    assert repo_heads(gw.peer.root, OWNER, name) == before
    # The refusal happened at the broker: git-receive-pack never reached the git host.
    assert not [r for r in gw.peer.requests(f"/{OWNER}/{name}.git/") if "receive" in str(r)]
    [denied] = [r for r in audit_events(gw.svc, "repo.denied") if r["data"]["jti"] == jti]
    assert denied["data"]["write"] is True and denied["data"]["reason"] == "no scope repo:write"
    assert_secret_absent(gw, git, clone)


async def insert_grant(gw: Gateway, repo: str, commit: str | None, **changes: Any) -> str:
    grant_id = f"g-{secrets.token_hex(6)}"
    now = datetime.now(UTC)
    record = GrantRecord(
        id=grant_id, secret_hash=secrets.token_hex(32), repo=repo, commit=commit, ref=None,
        created_by=ADA.id, created_at=now, expires_at=now + timedelta(days=7), max_uses=1,
        uses=1, reviewer_kind="anonymous", reviewer=None, note="",
    )  # fmt: skip
    for key, value in changes.items():
        setattr(record, key, value)
    async with gw.svc.db.sessions() as session, session.begin():
        session.add(record)
    return grant_id


async def reviewer_token(gw: Gateway, repo: str, grant_id: str, commit: str | None) -> str:
    extra: dict[str, Any] = {"grant": grant_id, "repo": repo}
    if commit is not None:
        extra["commit"] = commit
    token, _ = await mint(gw, scope=("repo:read",), subject="reviewer-7f3a", **extra)
    return token


async def test_a_pinned_reviewer_clones_exactly_that_commit_and_nothing_else(
    gateway: Gateway, tmp_path: Path
) -> None:
    gw = gateway
    name, shas = new_repo(gw.peer, commits=3)
    repo = f"{BACKEND}/{OWNER}/{name}"
    grant_id = await insert_grant(gw, repo, shas[1])
    token = await reviewer_token(gw, repo, grant_id, shas[1])
    git = GitClient(tmp_path / "home")
    git.use_credential_helper(gw.url, token)
    listed = await git.run("ls-remote", gateway_url(gw, name))
    assert listed.code == 0, listed.err
    assert listed.out.split("\n")[:2] == [f"{shas[1]}\tHEAD", f"{shas[1]}\trefs/heads/review"]
    assert shas[2] not in listed.out and "main" not in listed.out

    clone = tmp_path / "clone"
    cloned = await git.run("clone", gateway_url(gw, name), str(clone))
    assert cloned.code == 0, cloned.err
    assert (await git.run("rev-parse", "HEAD", cwd=clone)).out.strip() == shas[1]
    assert (await git.run("log", "--format=%H", cwd=clone)).out.split() == [shas[1], shas[0]]
    assert (await git.run("symbolic-ref", "HEAD", cwd=clone)).out.strip() == "refs/heads/review"
    assert (await git.run("cat-file", "-e", shas[2], cwd=clone)).code != 0
    # The git host was asked in protocol v0 (the advertisement is rewritten).
    seen = gw.peer.requests(f"/{OWNER}/{name}.git/")
    assert seen and all(r["git_protocol"] is None for r in seen)

    other = await git.run("fetch", "origin", shas[2], cwd=clone)
    assert other.code != 0
    assert (await git.run("cat-file", "-e", shas[2], cwd=clone)).code != 0
    denied = [r for r in audit_events(gw.svc, "repo.denied") if r["data"].get("grant") == grant_id]
    assert denied and denied[-1]["data"]["reason"] == "this grant reads only its pinned commit"
    reads = [r for r in audit_events(gw.svc, "repo.read") if r["data"]["grant"] == grant_id]
    assert reads and all(r["data"]["commit"] == shas[1] for r in reads)
    assert_secret_absent(gw, git, clone)


async def test_an_unpinned_reviewer_grant_reads_the_whole_repo(
    gateway: Gateway, tmp_path: Path
) -> None:
    gw = gateway
    name, shas = new_repo(gw.peer, commits=2)
    repo = f"{BACKEND}/{OWNER}/{name}"
    grant_id = await insert_grant(gw, repo, None)
    token = await reviewer_token(gw, repo, grant_id, None)
    git = GitClient(tmp_path / "home")
    git.use_credential_helper(gw.url, token)
    clone = tmp_path / "clone"
    cloned = await git.run("clone", gateway_url(gw, name), str(clone))
    assert cloned.code == 0, cloned.err
    assert (await git.run("rev-parse", "HEAD", cwd=clone)).out.strip() == shas[-1]
    reads = [r for r in audit_events(gw.svc, "repo.read") if r["data"]["grant"] == grant_id]
    assert reads and all(r["actor"] == "reviewer-7f3a" for r in reads)


async def test_the_credential_helper_answers_only_for_the_broker(tmp_path: Path) -> None:
    issuer = "http://127.0.0.1:18080"
    git = GitClient(tmp_path / "home")
    git.use_credential_helper(issuer, "broker-token-value")

    async def helper(operation: str, request: str) -> Result:
        proc = await asyncio.create_subprocess_exec(
            BROKER_BIN, "git-credential", operation, env=git.env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate(request.encode())
        return Result(proc.returncode or 0, out.decode(), err.decode())

    ours = await helper("get", "protocol=http\nhost=127.0.0.1:18080\npath=git/x.git\n\n")
    assert ours.code == 0 and ours.out == "username=broker\npassword=broker-token-value\n"
    for other in (
        "protocol=http\nhost=127.0.0.1:18081\n\n",  # another port
        "protocol=https\nhost=127.0.0.1:18080\n\n",  # another scheme
        "protocol=https\nhost=github.com\n\n",
        "host=127.0.0.1:18080\n\n",
    ):
        theirs = await helper("get", other)
        assert theirs.code == 0 and theirs.out == "", other
    for operation in ("store", "erase", "capability"):
        done = await helper(operation, "protocol=http\nhost=127.0.0.1:18080\npassword=x\n\n")
        assert done.code == 0 and done.out == ""
