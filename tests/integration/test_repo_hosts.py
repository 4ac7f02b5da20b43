"""The forge repository backends against their provider stand-ins (tests/peers/*_api.py).

GitHubAppHost, GitLabHost and BitbucketHost are driven directly: facts, the user's own
permission, a credential minted for exactly one repository (the stand-in shows the request
body), read-only unless asked, revoked by `release` (the stand-in shows it revoked and the
token no longer authenticates at its git endpoint), refusals surfaced as broker errors that
never carry a token. The last test builds the GitHub backend through
`broker.services.build_repo_host` with the App key stored in the real OpenBao.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import hvac
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import adapters.downstream.github as github_module
from adapters.base import GitRemote, RepoFacts, RepoHost
from adapters.downstream.bitbucket import BitbucketHost
from adapters.downstream.github import GitHubAppHost
from adapters.downstream.gitlab import GitLabHost
from adapters.errors import AccessDenied, BrokerError, NotFound, UpstreamFailed
from adapters.vault import AppRoleAuth
from broker.devvault import DevVault
from tests.peers.bitbucket_api import BbProject, BbRepo, BitbucketApi
from tests.peers.broker import make_settings, start_broker
from tests.peers.github_api import GhRepo, GitHubApi
from tests.peers.gitlab_api import GitLabApi, GlProject


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def assert_no_secret(error: BaseException, values: Iterable[str]) -> None:
    """No token (nor the broker's own secret) in what a caller or the log could see."""
    seen = [str(error), repr(error)]
    if isinstance(error, BrokerError):
        seen += [error.description, error.log_detail]
    for value in values:
        assert value, "an empty secret proves nothing"
        for text in seen:
            assert value not in text


async def info_refs(
    http: aiohttp.ClientSession, remote: GitRemote, *, service: str = "git-upload-pack"
) -> int:
    """The status of a git ref advertisement with the remote's credential, as the gateway
    sends it (Basic username:password, or Bearer when the username is empty)."""
    if remote.username:
        raw = f"{remote.username}:{remote.password}".encode()
        authorization = f"Basic {base64.b64encode(raw).decode()}"
    else:
        authorization = f"Bearer {remote.password}"
    async with http.get(
        f"{remote.url}/info/refs", params={"service": service},
        headers={"Authorization": authorization},
    ) as response:  # fmt: skip
        return response.status


# -- GitHub ------------------------------------------------------------------------------


def github_world(api: GitHubApi) -> None:
    api.add_installation(7, "lab")
    api.add_installation(8, "alice", kind="User", permissions={"contents": "read"})
    api.add_repo(
        GhRepo("lab", "paper", 7, collaborators={
            "alice": "maintain", "bob": "write", "carol": "triage", "dave": "read",
            "owen": "admin",
        })
    )  # fmt: skip
    api.add_repo(GhRepo("lab", "other", 7))
    api.add_repo(GhRepo("alice", "notes", 8, owner_type="User", private=False))
    api.users.update({"alice", "bob", "carol", "dave", "erin", "owen"})


def github_host(api: GitHubApi, http: aiohttp.ClientSession, **overrides: str) -> GitHubAppHost:
    args = {
        "id": "gh", "app_id": str(api.app_id), "private_key_pem": api.private_key_pem,
        "api_url": api.api_url, "git_url": api.git_url,
    }  # fmt: skip
    args.update(overrides)
    return GitHubAppHost(**args, http=http)  # type: ignore[arg-type]


async def test_github_facts_and_permissions(
    github_api: GitHubApi, http: aiohttp.ClientSession
) -> None:
    github_world(github_api)
    host = github_host(github_api, http)
    assert isinstance(host, RepoHost)

    assert await host.repo_facts("lab", "paper") == RepoFacts("lab", "private", "lab", "main")
    assert await host.repo_facts("alice", "notes") == RepoFacts("alice", "public", None, "main")
    permissions = {
        user: await host.user_permission("lab", "paper", user)
        for user in ("owen", "alice", "bob", "carol", "dave", "erin", "nobody-at-all", None)
    }
    assert permissions == {
        "owen": "admin", "alice": "admin", "bob": "write", "carol": "read", "dave": "read",
        "erin": "none", "nobody-at-all": "none", None: "none",
    }  # fmt: skip
    # The API look-ups use a token for that one repository with metadata:read only, minted
    # once and reused.
    bodies = github_api.issued_bodies()
    assert {(tuple(b["repositories"]), tuple(b["permissions"].items())) for b in bodies} == {
        (("paper",), (("metadata", "read"),)),
        (("notes",), (("metadata", "read"),)),
    }
    assert len(bodies) == 2
    await host.close()
    assert all(t.revoked for t in github_api.tokens.values())


async def test_github_app_jwt_is_what_github_requires(
    github_api: GitHubApi, http: aiohttp.ClientSession
) -> None:
    github_world(github_api)
    host = github_host(github_api, http)
    await host.remote("lab", "paper", write=False, principal_id="p1", ttl=600)
    jwts = [
        r.authorization.removeprefix("Bearer ")
        for r in github_api.requests
        if r.path.startswith(("/api/v3/app/", "/api/v3/repos/lab/paper/installation"))
        and r.authorization
    ]
    assert len(jwts) == 2  # installation look-up and token minting
    now = int(time.time())
    for token in jwts:
        assert jwt.get_unverified_header(token)["alg"] == "RS256"
        claims = jwt.decode(
            token, github_api.key.public_key(), algorithms=["RS256"], issuer=str(github_api.app_id)
        )
        assert claims["iat"] <= now - 55
        assert claims["exp"] - claims["iat"] <= 600
        assert claims["exp"] > now


async def test_github_remote_is_one_repo_read_only_and_released(
    github_api: GitHubApi, http: aiohttp.ClientSession
) -> None:
    github_world(github_api)
    host = github_host(github_api, http)
    remote = await host.remote("lab", "paper", write=False, principal_id="p1", ttl=900)

    issued = github_api.tokens[remote.password]
    assert issued.request == {"repositories": ["paper"], "permissions": {"contents": "read"}}
    assert remote.url == f"{github_api.git_url}/lab/paper.git"
    assert remote.username == "x-access-token"
    assert remote.write is False
    assert remote.expires_at == issued.expires_at
    assert "password" not in repr(remote) and remote.password not in repr(remote)
    assert remote.token_id is not None and remote.password not in remote.token_id

    assert await info_refs(http, remote) == 200
    assert await info_refs(http, remote, service="git-receive-pack") == 403
    other = GitRemote(f"{github_api.git_url}/lab/other.git", remote.username, remote.password)
    assert await info_refs(http, other) == 401  # restricted to the one repository

    await host.release(remote)
    assert github_api.tokens[remote.password].revoked
    assert await info_refs(http, remote) == 401
    await host.release(remote)  # already gone: still succeeds


async def test_github_write_only_when_asked(
    github_api: GitHubApi, http: aiohttp.ClientSession
) -> None:
    github_world(github_api)
    host = github_host(github_api, http)
    remote = await host.remote("lab", "paper", write=True, principal_id="p1", ttl=900)
    assert github_api.tokens[remote.password].request == {
        "repositories": ["paper"],
        "permissions": {"contents": "write"},
    }
    assert remote.write is True
    assert await info_refs(http, remote, service="git-receive-pack") == 200

    # An installation granted only contents:read cannot mint a write token.
    with pytest.raises(UpstreamFailed) as refused:
        await host.remote("alice", "notes", write=True, principal_id="p1", ttl=900)
    assert "may not write" in refused.value.description
    assert all(t.permissions.get("contents") != "write" for t in github_api.tokens.values()
               if t.repositories == ["notes"])  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"JWT_LIFETIME": 900}, "too far in the future", id="exp-beyond-10-min"),
        pytest.param({"JWT_LIFETIME": -120}, "future time", id="exp-in-the-past"),
        pytest.param({"JWT_BACKDATE": -600}, "Issued at", id="iat-in-the-future"),
    ],
)
async def test_github_refused_app_jwt_is_upstream_failed(
    github_api: GitHubApi,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    change: dict[str, int],
    message: str,
) -> None:
    github_world(github_api)
    host = github_host(github_api, http)
    for name, value in change.items():
        monkeypatch.setattr(github_module, name, value)
    with pytest.raises(UpstreamFailed) as refused:
        await host.remote("lab", "paper", write=False, principal_id="p1", ttl=900)
    assert message in refused.value.log_detail  # GitHub's own reason, for the operator
    assert github_api.tokens == {}
    jwts = [r.authorization or "" for r in github_api.requests]
    assert_no_secret(refused.value, [j.removeprefix("Bearer ") for j in jwts])


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"app_id": "1"}, id="another-app-id"),
        pytest.param(
            {
                "private_key_pem": rsa.generate_private_key(public_exponent=65537, key_size=2048)
                .private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                .decode()
            },
            id="not-the-app-key",
        ),
    ],
)
async def test_github_wrong_app_credentials_are_upstream_failed(
    github_api: GitHubApi, http: aiohttp.ClientSession, overrides: dict[str, str]
) -> None:
    github_world(github_api)
    host = github_host(github_api, http, **overrides)
    with pytest.raises(UpstreamFailed) as refused:
        await host.repo_facts("lab", "paper")
    assert refused.value.status == 503
    assert github_api.tokens == {}
    assert_no_secret(refused.value, [r.authorization or "-" for r in github_api.requests])


# Claims as functions of the current time: parameters are collected long before a test runs.
@pytest.mark.parametrize(
    ("claims_at", "message"),
    [
        pytest.param(lambda now: {"exp": now + 1200}, "too far", id="exp-20-min"),
        pytest.param(lambda now: {"iat": now + 300}, "Issued at", id="iat-future"),
        pytest.param(lambda now: {"exp": now - 5}, "future time", id="expired"),
        pytest.param(lambda now: {"iss": "999"}, "Integration not found", id="wrong-iss"),
        pytest.param(lambda now: {"iat": "yesterday"}, "Issued at", id="iat-not-integer"),
    ],
)
async def test_github_stand_in_checks_the_app_jwt_like_github(
    github_api: GitHubApi, http: aiohttp.ClientSession,
    claims_at: Callable[[int], dict[str, object]], message: str,
) -> None:  # fmt: skip
    """The stand-in is itself the verifier the adapter is tested against: check it."""
    claims = claims_at(int(time.time()))
    github_world(github_api)
    url = f"{github_api.api_url}/repos/lab/paper/installation"
    headers = {"Authorization": f"Bearer {github_api.app_jwt()}"}
    async with http.get(url, headers=headers) as response:
        assert response.status == 200
    headers = {"Authorization": f"Bearer {github_api.app_jwt(**claims)}"}
    async with http.get(url, headers=headers) as response:
        assert response.status == 401
        body = await response.json()
    assert message in body["message"] and body["documentation_url"].startswith("https://")
    hs256 = jwt.encode({"iss": str(github_api.app_id), "iat": 1, "exp": 2}, "k" * 32, "HS256")
    async with http.get(url, headers={"Authorization": f"Bearer {hs256}"}) as response:
        assert response.status == 401


async def test_github_unknown_repo_is_not_found(
    github_api: GitHubApi, http: aiohttp.ClientSession
) -> None:
    github_world(github_api)
    host = github_host(github_api, http)
    for call in (
        host.repo_facts("lab", "missing"),
        host.user_permission("lab", "missing", "alice"),
        host.remote("nobody", "paper", write=False, principal_id="p1", ttl=900),
    ):
        with pytest.raises(NotFound):
            await call
    assert github_api.tokens == {}


async def test_github_api_token_revoked_upstream_is_upstream_failed(
    github_api: GitHubApi, http: aiohttp.ClientSession
) -> None:
    github_world(github_api)
    host = github_host(github_api, http)
    await host.repo_facts("lab", "paper")
    for token in github_api.tokens.values():
        token.revoked = True  # e.g. an operator revoked it at GitHub
    with pytest.raises(UpstreamFailed) as refused:
        await host.repo_facts("lab", "paper")
    assert_no_secret(refused.value, list(github_api.tokens))


# -- GitLab ------------------------------------------------------------------------------


def gitlab_world(api: GitLabApi) -> dict[str, int]:
    ids = {name: api.add_user(name) for name in ("alice", "bob", "carol", "dave", "erin", "fay")}
    api.add_project(
        GlProject("lab/sub/paper", members={
            ids["alice"]: 50, ids["bob"]: 40, ids["carol"]: 30, ids["dave"]: 20, ids["erin"]: 10,
        })
    )  # fmt: skip
    api.add_project(GlProject("lab/other"))
    api.add_project(GlProject("alice/notes", namespace_kind="user", visibility="internal"))
    return ids


def gitlab_host(api: GitLabApi, http: aiohttp.ClientSession, **kw: str) -> GitLabHost:
    return GitLabHost(
        id="gl", url=api.url, token=kw.get("token", api.admin_token),
        token_kind=kw.get("token_kind", "project_access_token"),  # type: ignore[arg-type]
        http=http,
    )  # fmt: skip


async def test_gitlab_facts_and_permissions(
    gitlab_api: GitLabApi, http: aiohttp.ClientSession
) -> None:
    gitlab_world(gitlab_api)
    host = gitlab_host(gitlab_api, http)
    assert await host.repo_facts("lab/sub", "paper") == RepoFacts(
        "lab/sub", "private", "lab/sub", "main"
    )
    assert await host.repo_facts("alice", "notes") == RepoFacts("alice", "internal", None, "main")
    permissions = {
        user: await host.user_permission("lab/sub", "paper", user)
        for user in ("alice", "bob", "carol", "dave", "erin", "fay", "ghost", None)
    }
    assert permissions == {
        "alice": "admin", "bob": "admin", "carol": "write", "dave": "read", "erin": "read",
        "fay": "none", "ghost": "none", None: "none",
    }  # fmt: skip
    # Every API call carried the broker's token (the stand-in refuses others with 401).
    assert ("GET", "/projects/lab%2Fsub%2Fpaper") in gitlab_api.requests


async def test_gitlab_project_access_token_read_only_and_released(
    gitlab_api: GitLabApi, http: aiohttp.ClientSession
) -> None:
    gitlab_world(gitlab_api)
    host = gitlab_host(gitlab_api, http)
    before = datetime.now(UTC)
    remote = await host.remote("lab/sub", "paper", write=False, principal_id="p1", ttl=3600)

    (issued,) = gitlab_api.access_tokens.values()
    lease_end = remote.expires_at
    assert lease_end is not None
    assert before + timedelta(seconds=3599) <= lease_end <= datetime.now(UTC) + timedelta(hours=1)
    assert issued.request == {
        "name": issued.name, "scopes": ["read_repository"], "access_level": 20,
        "expires_at": (lease_end + timedelta(days=1)).date().isoformat(),
    }  # fmt: skip
    assert issued.token == remote.password
    assert remote.url == f"{gitlab_api.url}/lab/sub/paper.git"
    assert remote.username and remote.username != remote.password
    assert remote.token_id == f"project_access_token:lab%2Fsub%2Fpaper:{issued.id}"

    assert await info_refs(http, remote) == 200
    assert await info_refs(http, remote, service="git-receive-pack") == 403
    other = GitRemote(f"{gitlab_api.url}/lab/other.git", remote.username, remote.password)
    assert await info_refs(http, other) == 401  # one project only

    await host.release(remote)
    assert issued.revoked
    assert await info_refs(http, remote) == 401
    async with http.get(
        f"{gitlab_api.url}/api/v4/projects/lab%2Fsub%2Fpaper",
        headers={"PRIVATE-TOKEN": remote.password},
    ) as response:
        assert response.status == 401
        assert await response.json() == {"message": "401 Unauthorized"}
    await host.release(remote)  # already gone: still succeeds


async def test_gitlab_write_only_when_asked(
    gitlab_api: GitLabApi, http: aiohttp.ClientSession
) -> None:
    gitlab_world(gitlab_api)
    host = gitlab_host(gitlab_api, http)
    remote = await host.remote("lab/sub", "paper", write=True, principal_id="p1", ttl=600)
    (issued,) = gitlab_api.access_tokens.values()
    assert issued.request["scopes"] == ["read_repository", "write_repository"]
    assert issued.request["access_level"] == 30
    assert remote.write
    assert await info_refs(http, remote, service="git-receive-pack") == 200


async def test_gitlab_deploy_token(gitlab_api: GitLabApi, http: aiohttp.ClientSession) -> None:
    gitlab_world(gitlab_api)
    host = gitlab_host(gitlab_api, http, token_kind="deploy_token")
    remote = await host.remote("lab/sub", "paper", write=False, principal_id="p1", ttl=1800)
    (issued,) = gitlab_api.deploy_tokens.values()
    assert issued.request["scopes"] == ["read_repository"]
    assert issued.expires_at is not None and remote.expires_at is not None
    assert abs((issued.expires_at - remote.expires_at).total_seconds()) < 1
    assert remote.username == issued.username and remote.password == issued.token
    assert await info_refs(http, remote) == 200
    await host.release(remote)
    assert issued.revoked
    assert await info_refs(http, remote) == 401

    with pytest.raises(AccessDenied):
        await host.remote("lab/sub", "paper", write=True, principal_id="p1", ttl=600)
    assert len(gitlab_api.deploy_tokens) == 1


async def test_gitlab_refusals(gitlab_api: GitLabApi, http: aiohttp.ClientSession) -> None:
    gitlab_world(gitlab_api)
    host = gitlab_host(gitlab_api, http)
    with pytest.raises(NotFound):
        await host.repo_facts("lab", "missing")
    with pytest.raises(NotFound):
        await host.remote("lab", "missing", write=False, principal_id="p1", ttl=600)

    wrong = f"glpat-{secrets.token_urlsafe(15)}"
    with pytest.raises(UpstreamFailed) as refused:
        await gitlab_host(gitlab_api, http, token=wrong).repo_facts("lab/sub", "paper")
    assert_no_secret(refused.value, [wrong, gitlab_api.admin_token])

    gitlab_api.add_project(GlProject("lab/dev-only"), broker_level=30)  # not Maintainer
    with pytest.raises(UpstreamFailed) as refused:
        await host.remote("lab", "dev-only", write=False, principal_id="p1", ttl=600)
    assert_no_secret(refused.value, [gitlab_api.admin_token])
    assert gitlab_api.access_tokens == {}


# -- Bitbucket ---------------------------------------------------------------------------


def bitbucket_world(api: BitbucketApi) -> None:
    api.add_project(BbProject("LAB", users={"bob": "PROJECT_WRITE", "carol": "PROJECT_READ"}))
    api.add_project(BbProject("~ALICE", personal_owner="alice"))
    repo_users = {"alice": "REPO_ADMIN", "carol": "REPO_WRITE"}
    # Enough near-namesakes that "zbob" is only on the second page of the filter.
    repo_users |= {f"xzbob{i:03}": "REPO_READ" for i in range(150)}
    repo_users["zbob"] = "REPO_ADMIN"
    api.add_repo(BbRepo("LAB", "paper", users=repo_users))
    api.add_repo(BbRepo("LAB", "other"))
    api.add_repo(BbRepo("~ALICE", "notes", public=True))


def bitbucket_host(
    api: BitbucketApi, http: aiohttp.ClientSession, token: str = "", *, bearer: bool = False
) -> BitbucketHost:
    """The broker's host as the service account (Basic), or with `token` as a Bearer token."""
    if bearer:
        return BitbucketHost(id="bb", url=api.url, token=token, http=http)
    return BitbucketHost(
        id="bb", url=api.url, username=api.service_user,
        token=token or api.service_password, http=http,
    )  # fmt: skip


async def test_bitbucket_facts_and_permissions(
    bitbucket_api: BitbucketApi, http: aiohttp.ClientSession
) -> None:
    bitbucket_world(bitbucket_api)
    host = bitbucket_host(bitbucket_api, http)
    assert await host.repo_facts("LAB", "paper") == RepoFacts("LAB", "private", "LAB", None)
    assert await host.repo_facts("~ALICE", "notes") == RepoFacts("alice", "public", None, None)
    permissions = {
        user: await host.user_permission("LAB", "paper", user)
        for user in ("alice", "bob", "carol", "zbob", "xzbob007", "dave", None)
    }
    assert permissions == {
        "alice": "admin", "bob": "write", "carol": "write", "zbob": "admin",
        "xzbob007": "read", "dave": "none", None: "none",
    }  # fmt: skip
    # "zbob" (admin) is only on the second page of the repository's grants (limit 100).


async def test_bitbucket_repository_token_read_only_and_released(
    bitbucket_api: BitbucketApi, http: aiohttp.ClientSession
) -> None:
    bitbucket_world(bitbucket_api)
    host = bitbucket_host(bitbucket_api, http)
    remote = await host.remote("LAB", "paper", write=False, principal_id="p1", ttl=3600)

    (issued,) = bitbucket_api.tokens.values()
    assert issued.request == {"name": issued.name, "permissions": ["REPO_READ"], "expiryDays": 1}
    assert (issued.project, issued.slug) == ("LAB", "paper")
    assert remote.username == "" and remote.password == issued.token  # Bearer only
    assert remote.url == f"{bitbucket_api.url}/scm/lab/paper.git"
    assert remote.token_id == f"LAB/paper/{issued.id}"

    assert await info_refs(http, remote) == 200
    assert await info_refs(http, remote, service="git-receive-pack") == 403
    as_basic = GitRemote(remote.url, "x-token-auth", remote.password)
    assert await info_refs(http, as_basic) == 401  # repository tokens are Bearer only
    other = GitRemote(f"{bitbucket_api.url}/scm/lab/other.git", "", remote.password)
    assert await info_refs(http, other) == 401

    await host.release(remote)
    assert issued.revoked
    assert await info_refs(http, remote) == 401
    await host.release(remote)  # already gone: still succeeds


async def test_bitbucket_write_only_when_asked(
    bitbucket_api: BitbucketApi, http: aiohttp.ClientSession
) -> None:
    bitbucket_world(bitbucket_api)
    host = bitbucket_host(bitbucket_api, http)
    remote = await host.remote("LAB", "paper", write=True, principal_id="p1", ttl=3 * 86400 + 1)
    (issued,) = bitbucket_api.tokens.values()
    assert issued.request["permissions"] == ["REPO_WRITE"]
    assert issued.request["expiryDays"] == 4
    assert await info_refs(http, remote, service="git-receive-pack") == 200


async def test_bitbucket_refusals(bitbucket_api: BitbucketApi, http: aiohttp.ClientSession) -> None:
    bitbucket_world(bitbucket_api)
    host = bitbucket_host(bitbucket_api, http)
    with pytest.raises(NotFound):
        await host.repo_facts("LAB", "missing")
    with pytest.raises(NotFound):
        await host.remote("NOPE", "paper", write=False, principal_id="p1", ttl=600)

    wrong = secrets.token_urlsafe(12)
    with pytest.raises(UpstreamFailed) as refused:
        await bitbucket_host(bitbucket_api, http, wrong).remote(
            "LAB", "paper", write=False, principal_id="p1", ttl=600
        )
    assert_no_secret(refused.value, [wrong, bitbucket_api.service_password])

    # A repository token cannot mint further tokens (Bitbucket's rule): refused, not issued.
    remote = await host.remote("LAB", "paper", write=False, principal_id="p1", ttl=600)
    with pytest.raises(UpstreamFailed) as refused:
        await bitbucket_host(bitbucket_api, http, remote.password, bearer=True).remote(
            "LAB", "paper", write=False, principal_id="p1", ttl=600
        )
    assert_no_secret(refused.value, [remote.password])
    assert len(bitbucket_api.tokens) == 1


# -- through the broker's services, with the App key in OpenBao --------------------------


async def test_github_app_key_comes_from_vault(
    github_api: GitHubApi,
    openbao: DevVault,
    openbao_root: hvac.Client,
    vault_approle: AppRoleAuth,
    tmp_path: Path,
) -> None:
    github_world(github_api)
    path = f"binder-broker/github-app-{secrets.token_hex(4)}"
    openbao_root.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"private_key": github_api.private_key_pem}, mount_point="secret"
    )
    backend = {
        "type": "github", "id": "gh", "app_id": str(github_api.app_id),
        "private_key": {"vault": f"secret/{path}#private_key"},
        "api_url": github_api.api_url, "git_url": github_api.git_url,
    }  # fmt: skip
    settings = make_settings(tmp_path, openbao.address, vault_approle, backends=[backend])
    svc = await start_broker(settings)
    try:
        host = svc.repo_hosts["gh"]
        assert isinstance(host, GitHubAppHost)
        assert "PRIVATE KEY" not in repr(host)
        remote = await svc.remotes.get(host, "lab", "paper", write=False, acting_for="p1", ttl=900)
        # The stand-in accepted a JWT signed with the key that only Vault held.
        assert github_api.tokens[remote.password].request["repositories"] == ["paper"]
        assert await host.repo_facts("lab", "paper") == RepoFacts("lab", "private", "lab", "main")
    finally:
        await svc.close()
    # Stopping the broker revoked every credential it held (git and API tokens).
    assert github_api.tokens and all(t.revoked for t in github_api.tokens.values())
