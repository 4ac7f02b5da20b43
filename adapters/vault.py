"""The one Vault / OpenBao client of the broker.

Everything the broker keeps in Vault goes through `VaultClient`: KV v2 secrets and transit
signing keys. hvac is synchronous, so every call runs in a worker thread (`asyncio.to_thread`)
and never blocks the event loop. Contracts:

- Only broker errors leave this module (`UpstreamFailed`, `Conflict`, `ConfigurationError`,
  `InvalidRequest`); their messages never hold a token or secret data.
- The client authenticates once with `login()` and keeps its token alive in a background task
  (renew-self at ~2/3 of the TTL; AppRole logs in again when the token cannot be renewed for a
  full period any more). `close()` stops that task.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import hvac
import hvac.exceptions
import requests
import structlog

from adapters.errors import ConfigurationError, Conflict, InvalidRequest, UpstreamFailed

__all__ = ["AppRoleAuth", "KvEntry", "TokenAuth", "TokenInfo", "VaultClient"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

KEY_TYPES: Final = frozenset({"ecdsa-p256", "rsa-2048"})
SIGNING_ALGORITHMS: Final = frozenset({"ES256", "RS256"})

# Renew when this fraction of the TTL has passed, leaving a third of it for retries.
_RENEW_AT: Final = 2 / 3
# A renewal that grants less than this fraction of a fresh token's TTL has hit the max TTL.
_CAPPED_BELOW: Final = 0.9
_MIN_SLEEP: Final = 0.5
_MAX_BACKOFF: Final = 30.0


@dataclass(frozen=True)
class TokenAuth:
    """Authenticate with a fixed Vault token (dev and tests; production uses AppRole)."""

    token: str = field(repr=False)


@dataclass(frozen=True)
class AppRoleAuth:
    """Authenticate with AppRole; `secret_id` is a credential and stays out of `repr`."""

    role_id: str
    secret_id: str = field(repr=False)
    mount: str = "approle"


@dataclass(frozen=True)
class KvEntry:
    """The latest version of a KV v2 secret; `data` is secret and stays out of `repr`."""

    data: dict[str, Any] = field(repr=False)
    version: int


@dataclass(frozen=True)
class TokenInfo:
    """What Vault says about our token (lookup-self), minus the token itself."""

    policies: tuple[str, ...]
    ttl: int  # seconds left; 0 = never expires
    renewable: bool
    accessor: str = field(repr=False)  # identifies the token for audit; not usable to call Vault


class VaultClient:
    """Async facade over hvac for KV v2 on `kv_mount` and transit on `transit_mount`.

    Call `login()` before anything else and `close()` at shutdown. Methods are safe to call
    concurrently; each raises only broker errors.
    """

    def __init__(
        self,
        address: str,
        auth: TokenAuth | AppRoleAuth,
        *,
        kv_mount: str = "secret",
        transit_mount: str = "transit",
        ca_cert: str | None = None,
        namespace: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.address = address.rstrip("/")
        self.kv_mount = kv_mount.strip("/")
        self.transit_mount = transit_mount.strip("/")
        self._auth = auth
        # token="" and an explicit `verify` keep hvac from picking up VAULT_TOKEN, ~/.vault-token
        # or VAULT_CACERT: the broker's settings are the only source of truth.
        self._hvac = hvac.Client(
            url=self.address,
            token="",
            verify=ca_cert if ca_cert else True,
            timeout=timeout,
            namespace=namespace,
        )
        self._ttl = 0  # seconds left on the current token when last learned; 0 = never expires
        self._fresh_ttl = 0  # TTL a freshly issued token gets, to notice renewals capped by max TTL
        self._renewable = False
        self._renewer: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"VaultClient(address={self.address!r}, auth={self._auth!r})"

    # -- authentication -------------------------------------------------------------------

    async def login(self) -> None:
        """Authenticate and start keeping the token alive; raises `UpstreamFailed` on failure."""
        if self._closed:
            raise UpstreamFailed("Vault client is closed")
        await self._stop_renewer()
        await self._authenticate()
        if self._ttl > 0:
            self._renewer = asyncio.create_task(
                self._keep_token_alive(), name="vault-token-renewer"
            )

    async def close(self) -> None:
        """Stop renewing and release the HTTP session; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._stop_renewer()
        await asyncio.to_thread(self._hvac.adapter.close)

    async def _stop_renewer(self) -> None:
        task, self._renewer = self._renewer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _authenticate(self) -> None:
        """Obtain (AppRole) or check (token) our token and learn its TTL."""
        auth = self._auth
        if isinstance(auth, AppRoleAuth):
            # use_token=False: hvac would otherwise swap the token mid-call; we set it ourselves.
            resp = await self._call(
                f"auth/{auth.mount}/login",
                self._hvac.auth.approle.login,
                role_id=auth.role_id,
                secret_id=auth.secret_id,
                use_token=False,
                mount_point=auth.mount,
            )
            with _unexpected_response("AppRole login"):
                token = str(resp["auth"]["client_token"])
                ttl = int(resp["auth"]["lease_duration"])
                renewable = bool(resp["auth"]["renewable"])
            self._hvac.token = token
        else:
            self._hvac.token = auth.token
            resp = await self._call("auth/token/lookup-self", self._hvac.auth.token.lookup_self)
            with _unexpected_response("token lookup"):
                ttl = int(resp["data"]["ttl"])
                renewable = bool(resp["data"].get("renewable", False))
        self._ttl, self._fresh_ttl, self._renewable = ttl, ttl, renewable
        log.info("vault.login", method=type(auth).__name__, ttl=ttl, renewable=renewable)

    async def _keep_token_alive(self) -> None:
        failures = 0
        while self._ttl > 0:
            if failures:
                delay = min(_MAX_BACKOFF, 0.5 * 2**failures) * (0.8 + 0.4 * random.random())  # noqa: S311
            else:
                delay = self._ttl * _RENEW_AT
            await asyncio.sleep(max(delay, _MIN_SLEEP))
            try:
                await self._refresh_token()
            except Exception as exc:  # the renewer must outlive any one failure
                failures += 1
                log.warning(
                    "vault.token_refresh_failed",
                    error=str(exc),
                    detail=getattr(exc, "log_detail", ""),
                    attempt=failures,
                )
            else:
                failures = 0

    async def _refresh_token(self) -> None:
        """Renew the token, or for AppRole log in again when renewal cannot give a full TTL."""
        approle = isinstance(self._auth, AppRoleAuth)
        if approle and not self._renewable:
            await self._authenticate()
            return
        try:
            resp = await self._call("auth/token/renew-self", self._hvac.auth.token.renew_self)
        except UpstreamFailed:
            if not approle:
                raise
            # The token may have expired or been revoked while Vault was away; a new login
            # recovers where renewal cannot.
            await self._authenticate()
            return
        with _unexpected_response("token renewal"):
            ttl = int(resp["auth"]["lease_duration"])
            self._renewable = bool(resp["auth"]["renewable"])
        if approle and ttl < self._fresh_ttl * _CAPPED_BELOW:
            # Near the max TTL renewals shrink towards zero; a new login restarts the clock.
            await self._authenticate()
            return
        self._ttl = ttl
        log.debug("vault.token_renewed", ttl=ttl)

    # -- health ---------------------------------------------------------------------------

    async def health(self) -> None:
        """Return if Vault is initialised, unsealed and accepts our token; else raise."""
        resp = await self._call(
            "sys/health", self._hvac.sys.read_health_status, method="GET", standby_ok=True
        )
        if isinstance(resp, dict):
            status, body = 200, resp
        else:
            status = resp.status_code
            try:
                body = resp.json()
            except ValueError:
                body = {}
        if status == 501 or body.get("initialized") is False:
            raise UpstreamFailed("Vault is not initialised")
        if status == 503 or body.get("sealed") is True:
            raise UpstreamFailed("Vault is sealed")
        # 429/472/473: a standby of some kind, which forwards requests to the active node.
        if status not in (200, 429, 472, 473):
            raise UpstreamFailed("Vault request failed", log_detail=f"sys/health returned {status}")
        await self._call("auth/token/lookup-self", self._hvac.auth.token.lookup_self)

    async def token_info(self) -> TokenInfo:
        """Look up our own token: its policies, remaining TTL and accessor."""
        resp = await self._call("auth/token/lookup-self", self._hvac.auth.token.lookup_self)
        with _unexpected_response("token lookup"):
            data = resp["data"]
            return TokenInfo(
                policies=tuple(sorted(data.get("policies") or ())),
                ttl=int(data["ttl"]),
                renewable=bool(data.get("renewable", False)),
                accessor=str(data.get("accessor", "")),
            )

    # -- KV v2 ----------------------------------------------------------------------------

    async def kv_read(self, path: str, *, mount: str | None = None) -> KvEntry | None:
        """The latest version at `path` on the KV v2 mount (default `kv_mount`), or None if
        absent or deleted."""
        path = _check_path(path)
        mount = mount.strip("/") if mount else self.kv_mount
        kv = self._hvac.secrets.kv.v2

        def read() -> Any:
            try:
                return kv.read_secret_version(
                    path=path, mount_point=mount, raise_on_deleted_version=True
                )
            except hvac.exceptions.InvalidPath as exc:
                # A missing secret is a 404 with no error text; a 404 with text (e.g. "no
                # handler for route") is a misconfigured mount and must not read as "absent".
                if exc.errors:
                    raise
                return None

        resp = await self._call(f"{mount}/data/{path}", read)
        if resp is None:
            return None
        with _unexpected_response("KV read"):
            data = resp["data"]["data"]
            version = int(resp["data"]["metadata"]["version"])
        if data is None:  # the latest version was destroyed
            return None
        return KvEntry(data=dict(data), version=version)

    async def kv_write(self, path: str, data: Mapping[str, Any], *, cas: int | None = None) -> int:
        """Write a new version and return its number.

        With `cas`, write only if the current version is `cas` (0: only if absent); a
        mismatch raises `Conflict`.
        """
        path = _check_path(path)
        resp = await self._call(
            f"{self.kv_mount}/data/{path}",
            self._hvac.secrets.kv.v2.create_or_update_secret,
            path=path,
            secret=dict(data),
            cas=cas,
            mount_point=self.kv_mount,
        )
        with _unexpected_response("KV write"):
            return int(resp["data"]["version"])

    async def kv_delete(self, path: str) -> None:
        """Delete the metadata and every version at `path`; deleting nothing is not an error."""
        path = _check_path(path)
        await self._call(
            f"{self.kv_mount}/metadata/{path}",
            self._hvac.secrets.kv.v2.delete_metadata_and_all_versions,
            path=path,
            mount_point=self.kv_mount,
        )

    # -- transit --------------------------------------------------------------------------

    async def transit_ensure_key(self, name: str, key_type: str) -> None:
        """Create signing key `name` of `key_type` unless it exists.

        An existing key of another type raises `ConfigurationError`: transit silently
        ignores the type when asked to create a key that exists.
        """
        if key_type not in KEY_TYPES:
            raise ConfigurationError(f"unsupported transit key type {key_type!r}")
        existing = await self._read_key(name, missing_ok=True)
        if existing is not None:
            with _unexpected_response("transit key read"):
                actual = str(existing["type"])
            if actual != key_type:
                raise ConfigurationError(
                    f"transit key {name!r} has type {actual!r}, expected {key_type!r}"
                )
            return
        await self._call(
            f"{self.transit_mount}/keys/{name}",
            self._hvac.secrets.transit.create_key,
            name=name,
            key_type=key_type,
            mount_point=self.transit_mount,
        )

    async def transit_rotate(self, name: str) -> int:
        """Add a new version to key `name` and return the new latest version."""
        resp = await self._call(
            f"{self.transit_mount}/keys/{name}/rotate",
            self._hvac.secrets.transit.rotate_key,
            name=name,
            mount_point=self.transit_mount,
        )
        # Newer servers answer with the key; older ones with 204 and nothing to read.
        info = resp.get("data") if isinstance(resp, dict) else None
        if info is None:
            info = await self._read_key(name)
        with _unexpected_response("transit rotate"):
            return int(info["latest_version"])

    async def transit_public_keys(self, name: str) -> dict[int, str]:
        """Every available version of key `name` → its PEM public key."""
        info = await self._read_key(name)
        with _unexpected_response("transit key read"):
            return {int(v): str(k["public_key"]) for v, k in info["keys"].items()}

    async def transit_sign(
        self, name: str, version: int, message: bytes, *, algorithm: str
    ) -> bytes:
        """Sign `message` with version `version` of key `name`; return the raw JWS signature.

        `ES256` gives r||s (64 bytes, RFC 7518 §3.4), `RS256` the PKCS#1 v1.5 signature.
        """
        options: dict[str, str]
        if algorithm == "ES256":
            options = {"marshaling_algorithm": "jws"}
        elif algorithm == "RS256":
            options = {"signature_algorithm": "pkcs1v15"}
        else:
            raise ConfigurationError(f"unsupported signing algorithm {algorithm!r}")
        resp = await self._call(
            f"{self.transit_mount}/sign/{name}",
            self._hvac.secrets.transit.sign_data,
            name=name,
            hash_input=base64.b64encode(message).decode("ascii"),
            key_version=version,
            hash_algorithm="sha2-256",
            prehashed=False,
            mount_point=self.transit_mount,
            **options,
        )
        with _unexpected_response("transit sign"):
            prefix, signed_by, encoded = str(resp["data"]["signature"]).split(":", 2)
            if algorithm == "ES256":
                # JWS marshaling is unpadded base64url; the default marshaling is std base64.
                raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            else:
                raw = base64.b64decode(encoded, validate=True)
        if (
            prefix != "vault"
            or signed_by != f"v{version}"
            or (algorithm == "ES256" and len(raw) != 64)
        ):
            raise UpstreamFailed(
                "Vault request failed",
                log_detail=f"transit sign: {prefix}:{signed_by}, {len(raw)} B, wanted v{version}",
            )
        return raw

    async def _read_key(self, name: str, *, missing_ok: bool = False) -> Any:
        transit = self._hvac.secrets.transit

        def read() -> Any:
            try:
                return transit.read_key(name=name, mount_point=self.transit_mount)
            except hvac.exceptions.InvalidPath:
                if missing_ok:
                    return None
                raise

        resp = await self._call(f"{self.transit_mount}/keys/{name}", read)
        if resp is None:
            return None
        with _unexpected_response("transit key read"):
            return resp["data"]

    # -- plumbing -------------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run hvac call `fn` in a thread; translate every failure into a broker error.

        `what` names the Vault path for the log; it never holds a token or secret data.
        """
        if self._closed:
            raise UpstreamFailed("Vault client is closed", log_detail=what)
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except hvac.exceptions.VaultDown as exc:
            raise UpstreamFailed("Vault is sealed", log_detail=f"{what}: {exc}") from exc
        except hvac.exceptions.VaultNotInitialized as exc:
            raise UpstreamFailed("Vault is not initialised", log_detail=f"{what}: {exc}") from exc
        except hvac.exceptions.Forbidden as exc:
            raise UpstreamFailed("Vault denied access", log_detail=f"path {what}") from exc
        except hvac.exceptions.InvalidRequest as exc:
            if any("check-and-set" in str(e) for e in exc.errors or ()):
                raise Conflict(
                    "The secret changed; try again", log_detail=f"{what}: check-and-set mismatch"
                ) from exc
            raise UpstreamFailed("Vault request failed", log_detail=f"{what}: {exc}") from exc
        except hvac.exceptions.VaultError as exc:
            raise UpstreamFailed(
                "Vault request failed", log_detail=f"{what}: {type(exc).__name__}: {exc}"
            ) from exc
        except requests.exceptions.SSLError as exc:
            raise UpstreamFailed(
                "Vault is unreachable", log_detail=f"{what}: TLS failed: {exc}"
            ) from exc
        except requests.exceptions.RequestException as exc:
            # Connection refused, DNS failure, timeouts: the server cannot be talked to.
            raise UpstreamFailed(
                "Vault is unreachable", log_detail=f"{what}: {type(exc).__name__}"
            ) from exc


@contextlib.contextmanager
def _unexpected_response(what: str) -> Iterator[None]:
    """Turn a response of an unexpected shape into `UpstreamFailed` instead of a KeyError."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
        raise UpstreamFailed(
            "Vault request failed", log_detail=f"unexpected {what} response: {type(exc).__name__}"
        ) from exc


def _check_path(path: str) -> str:
    """Refuse KV paths that could step outside the intended prefix or hit a list endpoint."""
    segments = path.split("/")
    if not path or any(s in ("", ".", "..") for s in segments):
        raise InvalidRequest("invalid secret path")
    return path
