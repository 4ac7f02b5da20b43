"""`broker login` and `broker token`: the command-line side of the device flow (RFC 8628).

`login` discovers the issuer's endpoints, starts a device authorization, shows the user where
to approve it, polls the token endpoint (honouring `interval` and `slow_down`) and stores the
tokens. `token` prints a fresh access token, refreshing it (and storing the rotated refresh
token) when it expires within `REFRESH_MARGIN` seconds.

Tokens are kept in `$BROKER_CONFIG_DIR/tokens.json` (default `~/.config/binder-broker/`),
written atomically with mode 0600 in a directory created with mode 0700. A lock file
serialises refreshes, because two concurrent refreshes with one rotating refresh token would
look like reuse to the broker, which then revokes the whole family.

Exit codes follow `broker`: 0 success, 1 a refusal or no sign-in, 3 the issuer unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

DEFAULT_CLIENT_ID = "broker-cli"
DEFAULT_SCOPE = "openid profile groups offline_access"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REFRESH_MARGIN = 60  # seconds: a token expiring sooner than this is refreshed first
SLOW_DOWN_STEP = 5  # RFC 8628 §3.5
DEFAULT_INTERVAL = 5  # RFC 8628 §3.2, when the response has no `interval`
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
TOKENS_FILE = "tokens.json"
LOCK_FILE = "tokens.lock"


class CliError(Exception):
    """A failure to report in one line and exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def config_dir() -> Path:
    """`$BROKER_CONFIG_DIR`, else `$XDG_CONFIG_HOME/binder-broker` or `~/.config/binder-broker`."""
    explicit = os.environ.get("BROKER_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "binder-broker"


# --- the token file ---------------------------------------------------------------------


class TokenStore:
    """The tokens file: `{"default": issuer, "issuers": {issuer: entry}}`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / TOKENS_FILE

    def _ensure_directory(self) -> None:
        if not self.directory.exists():
            self.directory.mkdir(mode=0o700, parents=True)
            self.directory.chmod(0o700)  # mkdir's mode is reduced by the umask; make it exact

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (blocking) so only one process reads-refreshes-writes."""
        self._ensure_directory()
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"default": None, "issuers": {}}
        except (OSError, ValueError) as error:
            raise CliError(
                f"{self.path} cannot be read ({error}); remove it and log in again"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("issuers"), dict):
            raise CliError(f"{self.path} is not a tokens file; remove it and log in again")
        return data

    def save(self, data: Mapping[str, Any]) -> None:
        """Replace the file atomically; the new file is 0600 from its first byte."""
        self._ensure_directory()
        write_private(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with `text` in a file that is 0600 from its first byte
    (its directory is created 0700 if missing)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- HTTP --------------------------------------------------------------------------------


def _normalize_url(url: str, what: str) -> str:
    """`url` without a trailing slash; https, or http only to this machine (loopback)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise CliError(f"{what} must be an https:// URL, not {url!r}", exit_code=2)
    if parts.scheme == "http" and not _is_loopback(host):
        raise CliError(
            f"{what} must use https:// (plain http is only allowed to localhost)", exit_code=2
        )
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _read_json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await response.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        body = None
    if not isinstance(body, dict):
        raise CliError(f"{response.url} answered HTTP {response.status} without a JSON object")
    return body


async def _post_form(
    http: aiohttp.ClientSession, url: str, form: Mapping[str, str]
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, data=dict(form), headers={"Accept": "application/json"}) as resp:
        return resp.status, await _read_json(resp)


async def discover(http: aiohttp.ClientSession, issuer: str) -> tuple[str, str]:
    """(device_authorization_endpoint, token_endpoint) from the issuer's metadata."""
    async with http.get(f"{issuer}/.well-known/openid-configuration") as response:
        if response.status != 200:
            raise CliError(f"{issuer} has no OpenID configuration (HTTP {response.status})")
        meta = await _read_json(response)
    # OpenID Connect Discovery §4.3: the document must name the issuer it was fetched from.
    if meta.get("issuer") != issuer:
        raise CliError(f"{issuer} publishes metadata for another issuer ({meta.get('issuer')!r})")
    device = meta.get("device_authorization_endpoint") or f"{issuer}/oauth/device_authorization"
    token = meta.get("token_endpoint") or f"{issuer}/oauth/token"
    if not isinstance(device, str) or not isinstance(token, str):
        raise CliError(f"{issuer} publishes malformed endpoint URLs")
    return _normalize_url(device, "the device endpoint"), _normalize_url(
        token, "the token endpoint"
    )


def _describe(body: Mapping[str, Any]) -> str:
    error = str(body.get("error", "error"))
    description = body.get("error_description")
    return f"{error}: {description}" if description else error


def _entry_from(
    body: Mapping[str, Any], *, client_id: str, token_endpoint: str, previous_refresh: str | None
) -> dict[str, Any]:
    access = body.get("access_token")
    expires_in = body.get("expires_in")
    if not isinstance(access, str) or not access:
        raise CliError("the broker answered without an access token")
    if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
        raise CliError("the broker answered without a valid expires_in")
    refresh = body.get("refresh_token")
    return {
        "client_id": client_id,
        "token_endpoint": token_endpoint,
        "access_token": access,
        "token_type": str(body.get("token_type", "Bearer")),
        "expires_at": int(time.time()) + expires_in,
        # A response without a refresh token leaves the current one valid (RFC 6749 §6).
        "refresh_token": refresh if isinstance(refresh, str) and refresh else previous_refresh,
        "scope": str(body.get("scope", "")),
    }


# --- broker login --------------------------------------------------------------------------


async def login(
    issuer: str,
    *,
    client_id: str = DEFAULT_CLIENT_ID,
    scope: str | None = DEFAULT_SCOPE,
    store: TokenStore | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the device flow against `issuer`; store and return the new token entry."""
    issuer = _normalize_url(issuer, "--issuer")
    store = store or TokenStore(config_dir())
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        device_endpoint, token_endpoint = await discover(http, issuer)
        status, started = await _post_form(
            http, device_endpoint, {"client_id": client_id} | ({"scope": scope} if scope else {})
        )
        if status != 200:
            raise CliError(f"the broker refused to start a sign-in: {_describe(started)}")
        device_code = started.get("device_code")
        user_code = started.get("user_code")
        uri = started.get("verification_uri")
        expires_in = started.get("expires_in")
        interval = started.get("interval", DEFAULT_INTERVAL)
        if not (
            isinstance(device_code, str) and device_code
            and isinstance(user_code, str) and user_code
            and isinstance(uri, str) and uri
            and isinstance(expires_in, int) and isinstance(interval, int)
        ):  # fmt: skip
            raise CliError("the broker's device authorization response is malformed")
        interval = max(interval, 1)
        say(f"To sign in, open {uri} in a browser and enter the code:")
        say(f"    {user_code}")
        complete = started.get("verification_uri_complete")
        if isinstance(complete, str) and complete:
            say(f"(or open {complete} and check that it shows the same code)")
        say("Waiting for approval…")
        deadline = time.monotonic() + expires_in
        form = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code, "client_id": client_id}
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() >= deadline:
                raise CliError("the code expired before it was approved; run broker login again")
            status, body = await _post_form(http, token_endpoint, form)
            if status == 200:
                break
            error = body.get("error")
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += SLOW_DOWN_STEP
                continue
            if error == "access_denied":
                raise CliError("the sign-in was denied in the browser")
            if error == "expired_token":
                raise CliError("the code expired before it was approved; run broker login again")
            raise CliError(f"the broker refused the sign-in: {_describe(body)}")
    entry = _entry_from(body, client_id=client_id, token_endpoint=token_endpoint,
                        previous_refresh=None)  # fmt: skip
    with store.locked():
        data = store.load()
        data["issuers"][issuer] = entry
        data["default"] = issuer
        store.save(data)
    say(f"Signed in to {issuer}. Tokens are saved in {store.path}.")
    return entry


# --- broker token --------------------------------------------------------------------------


async def fresh_access_token(issuer: str | None = None, *, store: TokenStore | None = None) -> str:
    """An access token for `issuer` (default: the last one logged in to) valid for at least
    `REFRESH_MARGIN` more seconds, refreshing and storing the rotated tokens if needed."""
    store = store or TokenStore(config_dir())
    if issuer is not None:
        issuer = _normalize_url(issuer, "--issuer")
    with store.locked():
        data = store.load()
        chosen = issuer or data.get("default")
        entry = data["issuers"].get(chosen) if isinstance(chosen, str) else None
        if not isinstance(entry, dict):
            raise CliError(f"not signed in: run broker login --issuer {chosen or 'URL'}")
        if int(entry.get("expires_at", 0)) - time.time() > REFRESH_MARGIN:
            return str(entry["access_token"])
        refresh = entry.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            raise CliError(f"your sign-in has expired: run broker login --issuer {chosen}")
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "client_id": str(entry["client_id"]),
        }
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            status, body = await _post_form(http, str(entry["token_endpoint"]), form)
        if status != 200:
            if body.get("error") == "invalid_grant":
                raise CliError(f"your sign-in has expired: run broker login --issuer {chosen}")
            raise CliError(f"the broker refused to refresh the token: {_describe(body)}")
        new = _entry_from(body, client_id=str(entry["client_id"]),
                          token_endpoint=str(entry["token_endpoint"]),
                          previous_refresh=refresh)  # fmt: skip
        data["issuers"][chosen] = new
        store.save(data)
        return str(new["access_token"])


# --- entry points for broker/cli.py ----------------------------------------------------------


def _run(work: Callable[[], Coroutine[Any, Any, None]]) -> int:
    try:
        asyncio.run(work())
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except (aiohttp.ClientError, TimeoutError) as error:
        print(f"error: the broker could not be reached ({type(error).__name__})", file=sys.stderr)
        return 3
    except OSError as error:  # the tokens file or its directory
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def run_login(issuer: str, client_id: str, scope: str | None) -> int:
    """`broker login`: exit code 0 once tokens are stored."""

    async def work() -> None:
        await login(issuer, client_id=client_id, scope=scope, say=lambda s: print(s, flush=True))

    return _run(work)


def run_token(issuer: str | None) -> int:
    """`broker token`: print a fresh access token on stdout (and nothing else there)."""

    async def work() -> None:
        print(await fresh_access_token(issuer), flush=True)

    return _run(work)
