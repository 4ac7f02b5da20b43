"""A real `git http-backend` (CGI, from the Debian `git` package) as the upstream git host.

It runs in its own process (`python -m tests.peers.git_http --root DIR --port N --log FILE`,
the password in `$GIT_PEER_PASSWORD`): a small aiohttp server on loopback that

- REQUIRES HTTP Basic with the configured username and password (401 with a Basic challenge
  otherwise, before git is even started), as a forge does for a private repository;
- serves every bare repository under `--root` (`GIT_PROJECT_ROOT`, `GIT_HTTP_EXPORT_ALL`),
  with `http.receivepack` enabled, so a push that fails proves the *gateway* refused it, and
  `uploadpack.allowReachableSHA1InWant` (what GitHub and GitLab allow), so a reviewer pinned
  to a commit that is no branch tip can still fetch it;
- streams the request body into the CGI's stdin and its stdout into the response in 64 KiB
  chunks: no pack is ever held whole;
- appends one JSON line per request to `--log`: method, path, query, the auth scheme, the
  username, whether the password matched and a short hash of it (never the secret itself).

Fixtures:
- `git_peer` (session): one such server with its repository root; stopped by PID.

Helpers: `make_repo(root, owner, name, commits=…, blob_bytes=…)` writes a bare repository
with `git fast-import` (random, incompressible blobs when `blob_bytes` is set) and returns its
commit ids, oldest first.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHUNK = 64 * 1024
USERNAME = "x-access-token"
_GIT_CONFIG = {
    "http.receivepack": "true",
    "uploadpack.allowReachableSHA1InWant": "true",
    # Blobs above 1 MiB are sent as stored instead of searched for deltas on every fetch:
    # the benchmark's random blobs never delta, and the search would dominate its timings.
    "core.bigFileThreshold": "1m",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def password_hash(password: str) -> str:
    """What the peer logs in place of a password: enough to tell which one arrived."""
    return hashlib.sha256(password.encode()).hexdigest()[:12]


# --- repositories ------------------------------------------------------------------------


def _git(*args: str, cwd: Path | None = None, input: bytes | None = None) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, input=input, capture_output=True, check=True,
        env={**_quiet_git_env(), "GIT_DIR": str(cwd)} if cwd else _quiet_git_env(),
    )  # fmt: skip
    return done.stdout.decode().strip()


def _quiet_git_env() -> dict[str, str]:
    """An environment that reads no user or system git configuration."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_TERMINAL_PROMPT": "0",
    }


def make_repo(
    root: Path,
    owner: str,
    name: str,
    *,
    commits: int = 3,
    blob_bytes: int = 0,
    branch: str = "main",
    seed: str = "",
) -> list[str]:
    """A bare repository at `root/owner/name.git` with `commits` commits on `branch`, each
    adding `README.md` content and, when `blob_bytes` > 0, one random blob of that size.
    Returns the commit ids, oldest first."""
    path = root / owner / f"{name}.git"
    path.mkdir(parents=True)
    _git("init", "--quiet", "--bare", f"--initial-branch={branch}", str(path))
    proc = subprocess.Popen(
        ["git", "fast-import", "--quiet", "--done"], stdin=subprocess.PIPE,
        env={**_quiet_git_env(), "GIT_DIR": str(path)},
    )  # fmt: skip
    assert proc.stdin is not None
    out = proc.stdin
    for i in range(commits):
        readme = f"# {owner}/{name}{seed}\n\ncommit {i}\n".encode()
        out.write(b"blob\nmark :%d\ndata %d\n%s\n" % (2 * i + 1, len(readme), readme))
        if blob_bytes:
            out.write(b"blob\nmark :%d\ndata %d\n" % (2 * i + 2, blob_bytes))
            remaining = blob_bytes
            while remaining:
                piece = os.urandom(min(remaining, 1 << 20))
                out.write(piece)
                remaining -= len(piece)
            out.write(b"\n")
        message = f"commit {i}\n".encode()
        stamp = 1_700_000_000 + i
        out.write(f"commit refs/heads/{branch}\n".encode())
        out.write(f"committer Peer <peer@example.org> {stamp} +0000\n".encode())
        out.write(b"data %d\n%s\n" % (len(message), message))
        out.write(f"M 100644 :{2 * i + 1} README.md\n".encode())
        if blob_bytes:
            out.write(f"M 100644 :{2 * i + 2} data/blob-{i}.bin\n".encode())
    out.write(b"done\n")
    out.close()
    if proc.wait() != 0:
        raise RuntimeError(f"git fast-import failed for {owner}/{name}")
    return _git("rev-list", "--reverse", branch, cwd=path).split()


def add_commit(root: Path, owner: str, name: str, *, branch: str = "main", text: str = "") -> str:
    """One more commit on `branch` of a bare repository (changing README.md); its id."""
    path = root / owner / f"{name}.git"
    parent = _git("rev-parse", f"refs/heads/{branch}", cwd=path)
    readme = f"# {owner}/{name}\n\n{text or parent}\n".encode()
    message = b"another commit\n"
    stream = b"".join((
        b"blob\nmark :1\ndata %d\n%s\n" % (len(readme), readme),
        f"commit refs/heads/{branch}\n".encode(),
        b"committer Peer <peer@example.org> 1800000000 +0000\n",
        b"data %d\n%s\n" % (len(message), message),
        f"from {parent}\nM 100644 :1 README.md\n".encode(),
        b"done\n",
    ))  # fmt: skip
    subprocess.run(
        ["git", "fast-import", "--quiet", "--done"], input=stream, check=True,
        capture_output=True, env={**_quiet_git_env(), "GIT_DIR": str(path)},
    )  # fmt: skip
    return _git("rev-parse", f"refs/heads/{branch}", cwd=path)


def repo_heads(root: Path, owner: str, name: str) -> str:
    """`git show-ref` of a bare repository (to show it did not change)."""
    return _git("show-ref", cwd=root / owner / f"{name}.git")


# --- the server --------------------------------------------------------------------------


def _authorized(header: str, username: str, password: str) -> tuple[dict[str, Any], bool]:
    scheme, _, value = header.partition(" ")
    seen: dict[str, Any] = {"auth": scheme.lower() or "none"}
    if scheme.lower() != "basic":
        return seen, False
    try:
        user, _, given = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return seen, False
    seen["username"] = user
    seen["password_sha"] = password_hash(given)
    ok = hmac.compare_digest(user.encode(), username.encode()) and hmac.compare_digest(
        given.encode(), password.encode()
    )
    return seen, ok


def build_server(root: Path, username: str, password: str, log_path: Path) -> Any:
    """The aiohttp application in front of `git http-backend`."""
    from aiohttp import web

    log = log_path.open("a", buffering=1, encoding="utf-8")
    cgi_env = {
        **_quiet_git_env(),
        "GIT_PROJECT_ROOT": str(root),
        "GIT_HTTP_EXPORT_ALL": "1",
        "GIT_CONFIG_COUNT": str(len(_GIT_CONFIG)),
    }
    for i, (key, value) in enumerate(_GIT_CONFIG.items()):
        cgi_env[f"GIT_CONFIG_KEY_{i}"] = key
        cgi_env[f"GIT_CONFIG_VALUE_{i}"] = value

    async def handle(request: web.Request) -> web.StreamResponse:
        seen, ok = _authorized(request.headers.get("Authorization", ""), username, password)
        record = {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "authorized": ok,
            "git_protocol": request.headers.get("Git-Protocol"),
            "content_encoding": request.headers.get("Content-Encoding"),
            **seen,
        }
        log.write(json.dumps(record) + "\n")
        if not ok:
            return web.Response(
                status=401, text="authentication required\n",
                headers={"WWW-Authenticate": 'Basic realm="git-peer"'},
            )  # fmt: skip
        env = {
            **cgi_env,
            "REQUEST_METHOD": request.method,
            "PATH_INFO": request.path,
            "QUERY_STRING": request.query_string,
            "REMOTE_USER": username,
            "REMOTE_ADDR": "127.0.0.1",
            "GATEWAY_INTERFACE": "CGI/1.1",
        }
        if "Content-Type" in request.headers:
            env["CONTENT_TYPE"] = request.headers["Content-Type"]
        if "Git-Protocol" in request.headers:
            env["GIT_PROTOCOL"] = request.headers["Git-Protocol"]
        # aiohttp has already inflated a gzip request body, so http-backend is not told about
        # the Content-Encoding; without CONTENT_LENGTH it reads the body to its end.
        proc = await asyncio.create_subprocess_exec(
            "git", "http-backend", env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout

        async def feed() -> None:
            try:
                async for chunk in request.content.iter_chunked(CHUNK):
                    stdin.write(chunk)
                    await stdin.drain()
            except (ConnectionError, BrokenPipeError):
                pass
            finally:
                with contextlib.suppress(ConnectionError, BrokenPipeError):
                    stdin.close()

        feeding = asyncio.create_task(feed())
        status, headers = 200, {}
        while line := (await stdout.readline()).rstrip(b"\r\n"):
            key, _, value = line.decode("latin-1").partition(":")
            if key.lower() == "status":
                status = int(value.split()[0])
            else:
                headers[key.strip()] = value.strip()
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        try:
            while chunk := await stdout.read(CHUNK):
                await response.write(chunk)
            await response.write_eof()
        finally:
            await feeding
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()
        return response

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    password = os.environ["GIT_PEER_PASSWORD"]
    app = build_server(Path(args.root), args.username, password, Path(args.log))
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


# --- the fixture -------------------------------------------------------------------------


@dataclass
class GitPeer:
    """A running peer: repositories live under `root`, served at `url/owner/name.git`."""

    root: Path
    url: str
    username: str
    password: str = ""
    log_path: Path = Path()
    process: subprocess.Popen[bytes] | None = None

    def requests(self, path_prefix: str = "") -> list[dict[str, Any]]:
        """The requests the peer saw (optionally only those under `path_prefix`)."""
        if not self.log_path.exists():
            return []
        records = [json.loads(line) for line in self.log_path.read_text().splitlines() if line]
        return [r for r in records if r["path"].startswith(path_prefix)]

    def remote_url(self, owner: str, name: str, *, with_password: bool = False) -> str:
        """The direct clone URL (with the credential in it only for baselines)."""
        if not with_password:
            return f"{self.url}/{owner}/{name}.git"
        host = self.url.removeprefix("http://")
        return f"http://{self.username}:{self.password}@{host}/{owner}/{name}.git"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_peer(root: Path, *, password: str | None = None, username: str = USERNAME) -> GitPeer:
    """Start a peer process serving `root`; returns once it answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    password = password or f"upstream-{secrets.token_urlsafe(24)}"
    log_path = root.parent / f"git-peer-{port}.log"
    repo = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.peers.git_http", "--root", str(root), "--port", str(port),
         "--username", username, "--log", str(log_path)],
        cwd=repo, env={**os.environ, "GIT_PEER_PASSWORD": password},
    )  # fmt: skip
    peer = GitPeer(root, f"http://127.0.0.1:{port}", username, password, log_path, process)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{peer.url}/ready", timeout=1)
        except urllib.error.HTTPError:
            break  # 401: it answers
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                peer.stop()
                raise RuntimeError("the git peer did not start") from None
            time.sleep(0.05)
        else:
            break
    log_path.write_text("")  # forget the readiness probe
    return peer


@pytest.fixture(scope="session")
def git_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitPeer]:
    """The session's git host: `git http-backend` behind HTTP Basic on a loopback port."""
    peer = start_peer(tmp_path_factory.mktemp("git-peer") / "repos")
    try:
        yield peer
    finally:
        peer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--username", default=USERNAME)
    parser.add_argument("--log", required=True)
    serve(parser.parse_args())


if __name__ == "__main__":
    main()
