"""The git gateway: git smart HTTP to `/git/{backend}/{owner}/{repo}.git/…`.

A git client authenticates with a broker token (the password of HTTP Basic, as
`broker git-credential` hands it to git, or a Bearer token); `broker.repos.authorize`
decides; the broker forwards the request to the repository's upstream URL with the upstream
credential injected and streams both directions in `CHUNK`-sized pieces, so neither a pack
nor the upstream credential ever reaches the client. `git-receive-pack` needs write access.

A reviewer whose grant pins one commit sees an advertisement with only `HEAD` and
`refs/heads/review`, both at that commit (protocol v0 is forced so the broker can rewrite
it), and an upload-pack request that wants anything else is refused.

Every use is audited once per request (`repo.read` / `repo.write`, with the token's jti,
never the token); refusals are audited by `authorize` (`repo.denied`) or here (a want other
than the pinned commit).
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from adapters.base import GitRemote
from broker.errors import (
    AccessDenied,
    BrokerError,
    InvalidRequest,
    InvalidToken,
    NotFound,
    UpstreamFailed,
)
from broker.repos import RepoAccess, RepoRef, authorize, remote_for
from broker.services import Services
from broker.state import services

log = structlog.get_logger(__name__)

CHUNK = 64 * 1024
SERVICES = ("git-upload-pack", "git-receive-pack")
REVIEW_REF = "refs/heads/review"
# The wants-and-shallows section of an upload-pack request: a few lines per ref wanted.
MAX_WANTS_SECTION = 1 << 20
# Packs take as long as they take; only a stalled peer is given up on.
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
_NO_CACHE = {"Cache-Control": "no-cache", "Pragma": "no-cache"}
_REQUEST_HEADERS = ("Content-Type", "Accept", "Git-Protocol", "User-Agent")
_RESPONSE_HEADERS = ("Content-Type", "Content-Encoding", "Content-Length")
_WANT = re.compile(rb"^want ([0-9a-f]{40}|[0-9a-f]{64})(?: |\n|$)")
# Lines a v0 upload-pack request may carry beside wants before its first flush.
_ALLOWED_BEFORE_FLUSH = (b"shallow ", b"deepen ", b"deepen-since ", b"deepen-not ", b"filter ")


class UpstreamRefused(BrokerError):
    """The git host refused the broker's own credential: an operator must look."""

    error, status, title = "upstream_refused", 502, "The git host refused the broker"


# --- pkt-lines -----------------------------------------------------------------------------


def pkt(payload: bytes) -> bytes:
    """One pkt-line (gitprotocol-common(5)): four hex digits of length, then the payload."""
    return b"%04x" % (len(payload) + 4) + payload


FLUSH = b"0000"


class PktReader:
    """Reads pkt-lines from a byte stream, keeping only what it has not handed out."""

    def __init__(self, stream: aiohttp.StreamReader) -> None:
        self._stream = stream

    async def read(self) -> bytes | None:
        """The next payload; None for a flush/delim/end packet; EOFError at the end."""
        try:
            head = await self._stream.readexactly(4)
        except aiohttp.ClientPayloadError as error:
            raise EOFError(str(error)) from None
        try:
            length = int(head, 16)
        except ValueError:
            raise EOFError("not a pkt-line") from None
        if length < 4:
            return None
        try:
            return await self._stream.readexactly(length - 4)
        except aiohttp.ClientPayloadError as error:
            raise EOFError(str(error)) from None


def review_advertisement(service_line: bytes, first_ref: bytes, commit: str) -> bytes:
    """The upload-pack advertisement a pinned reviewer sees: the upstream's capabilities,
    `HEAD` and `REVIEW_REF` at `commit`, nothing else."""
    _, _, caps_raw = first_ref.rstrip(b"\n").partition(b"\0")
    caps = [c for c in caps_raw.split() if not c.startswith(b"symref=")]
    caps.append(b"symref=HEAD:" + REVIEW_REF.encode())
    sha = commit.encode()
    return b"".join((
        pkt(service_line), FLUSH,
        pkt(sha + b" HEAD\0" + b" ".join(caps) + b"\n"),
        pkt(sha + b" " + REVIEW_REF.encode() + b"\n"),
        FLUSH,
    ))  # fmt: skip


def check_wants(section: bytes, commit: str) -> None:
    """Refuse (AccessDenied) an upload-pack request whose wants-section (the pkt-lines
    before the first flush) wants anything but `commit` or carries unknown lines."""
    pos, wanted = 0, 0
    while pos < len(section):
        length = int(section[pos : pos + 4], 16)
        if length < 4:
            break
        line = section[pos + 4 : pos + length]
        pos += length
        want = _WANT.match(line)
        if want is not None:
            if want.group(1).decode() != commit:
                raise AccessDenied("this grant reads only its pinned commit")
            wanted += 1
        elif not line.startswith(_ALLOWED_BEFORE_FLUSH):
            raise AccessDenied("this grant reads only its pinned commit (protocol v0 fetch)")
    if not wanted:
        raise AccessDenied("this grant reads only its pinned commit")


async def read_wants_section(content: aiohttp.StreamReader) -> bytes:
    """The raw pkt-lines of an upload-pack request up to and including its first flush.
    (aiohttp's server has already inflated a gzip request body.)"""
    buffer = bytearray()
    while True:
        head = await content.readexactly(4)
        buffer += head
        try:
            length = int(head, 16)
        except ValueError:
            raise InvalidRequest("the request is not a git upload-pack request") from None
        if length < 4:
            return bytes(buffer)
        if len(buffer) + length > MAX_WANTS_SECTION:
            raise InvalidRequest("the upload-pack request wants too much")
        buffer += await content.readexactly(length - 4)


# --- the proxy ------------------------------------------------------------------------------


def _ref(request: web.Request) -> RepoRef:
    info = request.match_info
    return RepoRef.parse(f"{info['backend']}/{info['owner']}/{info['repo']}")


def _authorization(remote: GitRemote) -> str:
    if not remote.username:
        return f"Bearer {remote.password}"
    pair = f"{remote.username}:{remote.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


async def _audit_use(svc: Services, request: web.Request, access: RepoAccess, op: str) -> None:
    await svc.audit.append(
        "repo.write" if access.write else "repo.read", outcome="allowed",
        actor=access.principal_id, repo=str(access.ref), grant=access.grant_id,
        commit=access.commit, jti=access.jti, client=access.client, service=op,
        policies=list(access.policies),
    )  # fmt: skip


def _upstream_headers(request: web.Request, remote: GitRemote, pinned: bool) -> dict[str, str]:
    headers = {k: request.headers[k] for k in _REQUEST_HEADERS if k in request.headers}
    if pinned:
        # Protocol v0: its advertisement lists refs the broker can rewrite; v2 would let the
        # client ask ls-refs for every ref.
        headers.pop("Git-Protocol", None)
        headers["Accept-Encoding"] = "identity"
    else:
        headers["Accept-Encoding"] = request.headers.get("Accept-Encoding", "identity")
    headers["Authorization"] = _authorization(remote)
    return headers


async def _check_status(
    svc: Services, access: RepoAccess, upstream: aiohttp.ClientResponse
) -> None:
    """Map the git host's refusal to the broker's error; its body is never echoed (a
    forge's error page can quote the credential it was sent)."""
    if upstream.status == 200:
        return
    ref = access.ref
    log.warning("git.upstream_status", repo=str(ref), status=upstream.status)
    if upstream.status in (401, 403):
        svc.remotes.forget(ref.backend)
        raise UpstreamRefused(
            f"the git host refused the broker's credential for {ref} (HTTP {upstream.status});"
            " an operator must check the repository backend"
        )
    if upstream.status == 404:
        raise NotFound(f"the git host has no repository {ref.forge_owner}/{ref.name}")
    raise UpstreamRefused(f"the git host answered HTTP {upstream.status} for {ref}")


async def _relay(
    request: web.Request, upstream: aiohttp.ClientResponse, first: bytes = b""
) -> web.StreamResponse:
    """Stream the upstream response to the client; `first`, when given, replaces it (a
    rewritten advertisement: nothing more of the upstream's is relayed)."""
    headers = {k: upstream.headers[k] for k in _RESPONSE_HEADERS if k in upstream.headers}
    if first:
        headers.pop("Content-Length", None)
    response = web.StreamResponse(status=200, headers={**headers, **_NO_CACHE})
    await response.prepare(request)
    try:
        if first:
            await response.write(first)
        else:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
        await response.write_eof()
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as error:
        # Too late for an error status: drop the connection so git sees a broken transfer
        # rather than a short one.
        log.warning("git.relay_broken", path=request.path, error=type(error).__name__)
        if request.transport is not None:
            request.transport.close()
    return response


async def _request_body(content: aiohttp.StreamReader, first: bytes) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in content.iter_chunked(CHUNK):
        yield chunk


async def _proxy(
    request: web.Request, *, service: str, write: bool, method: str, suffix: str,
    params: Mapping[str, str] | None = None,
) -> web.StreamResponse:  # fmt: skip
    svc = services(request)
    ref = _ref(request)
    try:
        access = await authorize(svc, request, ref, write=write)
    except InvalidToken as error:
        # Every 401 here asks for Basic: that is what makes git call its credential helper.
        error.headers.setdefault("WWW-Authenticate", 'Basic realm="binder-broker"')
        raise
    pinned = access.commit is not None
    body_start = b""
    if method == "POST" and pinned:
        try:
            body_start = await read_wants_section(request.content)
            check_wants(body_start, str(access.commit))
        except AccessDenied as error:
            await svc.audit.append(
                "repo.denied", outcome="denied", actor=access.principal_id, repo=str(ref),
                grant=access.grant_id, jti=access.jti, reason=error.description,
                client=access.client,
            )  # fmt: skip
            raise
        except (ValueError, EOFError, aiohttp.ClientPayloadError) as error:
            raise InvalidRequest("the upload-pack request is not valid") from error
    remote = await remote_for(svc, access)
    kwargs: dict[str, Any] = {
        "headers": _upstream_headers(request, remote, pinned),
        "params": params,
        "timeout": UPSTREAM_TIMEOUT,
        "allow_redirects": False,
        "auto_decompress": pinned,
    }
    if method == "POST":
        kwargs["data"] = _request_body(request.content, body_start)
    try:
        async with svc.http.request(method, f"{remote.url}{suffix}", **kwargs) as upstream:
            await _check_status(svc, access, upstream)
            first = b""
            if pinned and suffix == "/info/refs":
                first = await _pinned_advertisement(upstream, str(access.commit))
            await _audit_use(svc, request, access, service)
            return await _relay(request, upstream, first)
    except (aiohttp.ClientError, TimeoutError) as error:
        raise UpstreamFailed(
            f"the git host for {ref} could not be reached", log_detail=type(error).__name__
        ) from None


async def _pinned_advertisement(upstream: aiohttp.ClientResponse, commit: str) -> bytes:
    """Read the upstream's v0 advertisement (its refs are read and dropped, never kept) and
    return the reviewer's. Nothing of it is relayed afterwards."""
    reader = PktReader(upstream.content)
    try:
        service_line = await reader.read()
        if service_line is None or not service_line.startswith(b"# service="):
            raise UpstreamRefused("the git host's advertisement is not smart HTTP")
        await reader.read()  # the flush after the service line
        first_ref = await reader.read()
        if first_ref is None or b"\0" not in first_ref:
            raise UpstreamRefused("the git host's advertisement has no capabilities")
        while await reader.read() is not None:
            pass
    except EOFError:
        raise UpstreamRefused("the git host's advertisement was cut short") from None
    return review_advertisement(service_line, first_ref, commit)


async def info_refs(request: web.Request) -> web.StreamResponse:
    """GET …/info/refs?service=git-upload-pack|git-receive-pack: the ref advertisement."""
    service = request.query.get("service", "")
    if service not in SERVICES:
        raise InvalidRequest("only git smart HTTP is served: ask for ?service=git-upload-pack")
    return await _proxy(
        request, service=service, write=service == "git-receive-pack", method="GET",
        suffix="/info/refs", params={"service": service},
    )  # fmt: skip


async def upload_pack(request: web.Request) -> web.StreamResponse:
    """POST …/git-upload-pack: fetch and clone."""
    return await _proxy(
        request, service="git-upload-pack", write=False, method="POST", suffix="/git-upload-pack"
    )


async def receive_pack(request: web.Request) -> web.StreamResponse:
    """POST …/git-receive-pack: push, only where policy grants write."""
    return await _proxy(
        request, service="git-receive-pack", write=True, method="POST", suffix="/git-receive-pack"
    )


def add_routes(app: web.Application) -> None:
    base = "/git/{backend}/{owner}/{repo}.git"
    app.router.add_get(f"{base}/info/refs", info_refs, name="git_info_refs", allow_head=False)
    app.router.add_post(f"{base}/git-upload-pack", upload_pack, name="git_upload_pack")
    app.router.add_post(f"{base}/git-receive-pack", receive_pack, name="git_receive_pack")
