"""The broker's signing keys, kept in Vault and shared by every replica.

The whole key set is one KV v2 document (`{prefix}/signing-keys`) written with
check-and-set, so concurrent replicas never lose each other's rotations. Each replica reloads
it every `refresh_interval` seconds and converges without a restart.

Schedule: a new key is *published* at once but *signs* only from `activate_at = created +
jwks_max_age + refresh_interval`, so every replica and every downstream JWKS cache has it
before the first token it signs arrives. The signing key at time t is the newest key whose
`activate_at <= t`; a key stops signing when its successor activates and stays published
until `max_ttl + clock_skew` after that, when the last token it signed has expired.

With `signing = "local"` the private halves are PEM strings in the KV document, parsed once
into key objects. With `signing = "transit"` each key is a version of one Vault transit key
and the private half never leaves Vault.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import jwt
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from adapters.errors import Conflict, UpstreamFailed
from adapters.vault import VaultClient

log = structlog.get_logger(__name__)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
Algorithm = Literal["ES256", "RS256"]
SUPPORTED_ALGORITHMS: tuple[Algorithm, ...] = ("ES256", "RS256")
_TRANSIT_KEY_TYPE = {"ES256": "ecdsa-p256", "RS256": "rsa-2048"}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) of a public JWK; used as the `kid`."""
    required = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return jwt.utils.base64url_encode(digest).decode()


def public_jwk(public_key: PublicKey, alg: str) -> dict[str, Any]:
    """The public JWK of a key, with `use` and `alg` but no `kid` yet."""
    algorithm = jwt.get_algorithm_by_name(alg)
    jwk: dict[str, Any] = algorithm.to_jwk(public_key, as_dict=True)
    return {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y", "n", "e")}


def generate_private_key(alg: Algorithm) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key of the ring, parsed. `private_key` is None when it signs in Vault transit."""

    kid: str
    alg: Algorithm
    created_at: int
    activate_at: int
    public_key: PublicKey = field(repr=False)
    private_key: PrivateKey | None = field(repr=False)
    transit_version: int | None
    jwk: Mapping[str, Any] = field(repr=False)
    retire_at: int | None = None  # when its successor started signing
    remove_after: int | None = None  # when it leaves the JWKS


@dataclass(frozen=True, slots=True)
class KeySet:
    """An immutable snapshot of the ring; replaced whole on every reload."""

    keys: tuple[SigningKey, ...]  # ordered by activate_at, then created_at
    version: int

    def signer(self, now: float) -> SigningKey | None:
        current = None
        for key in self.keys:
            if key.activate_at <= now:
                current = key
        return current

    def published(self, now: float) -> tuple[SigningKey, ...]:
        return tuple(k for k in self.keys if k.remove_after is None or now < k.remove_after)

    def find(self, kid: str, now: float) -> SigningKey | None:
        for key in self.published(now):
            if key.kid == kid:
                return key
        return None


class KeyRing:
    """Loads, rotates and serves the signing keys. One instance per broker process."""

    def __init__(
        self,
        vault: VaultClient,
        *,
        prefix: str,
        algorithm: Algorithm,
        signing: Literal["local", "transit"],
        rotation_interval: int,
        publish_ahead: int,
        max_token_ttl: int,
        clock_skew: int,
        refresh_interval: int,
        max_staleness: int,
        clock: Callable[[], float] = time.time,
        on_rotate: Callable[[SigningKey, str], Any] | None = None,
    ) -> None:
        self._vault = vault
        self._path = f"{prefix}/signing-keys"
        self._transit_key = f"{prefix}-signing-{algorithm.lower()}"
        self.algorithm: Algorithm = algorithm
        self.signing = signing
        self.rotation_interval = rotation_interval
        self.publish_ahead = publish_ahead
        self._retention = max_token_ttl + clock_skew
        self._refresh_interval = refresh_interval
        self._max_staleness = max_staleness
        self._clock = clock
        self._on_rotate = on_rotate
        self._parsed: dict[str, SigningKey] = {}
        self._set = KeySet(keys=(), version=0)
        self._last_success = 0.0
        self._last_error: str | None = None
        self._jwks_cache: tuple[tuple[str, ...], bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # --- reading ---------------------------------------------------------------------------

    @property
    def keyset(self) -> KeySet:
        return self._set

    def now(self) -> float:
        return self._clock()

    def ensure_fresh(self) -> None:
        """Fail closed when Vault has been unreachable for longer than `max_staleness`."""
        if self._last_error is None:
            return
        if time.monotonic() - self._last_success > self._max_staleness:
            raise UpstreamFailed(
                "the signing keys cannot be confirmed with Vault; refusing to sign",
                log_detail=self._last_error,
            )

    def signer(self) -> SigningKey:
        """The key that signs now. Raises UpstreamFailed when the ring is stale or empty."""
        self.ensure_fresh()
        key = self._set.signer(self._clock())
        if key is None:
            raise UpstreamFailed("no signing key is available yet")
        return key

    def jwks(self) -> bytes:
        """The JWKS document (every published key, pending ones included) as JSON bytes."""
        published = self._set.published(self._clock())
        kids = tuple(k.kid for k in published)
        if self._jwks_cache is None or self._jwks_cache[0] != kids:
            body = json.dumps({"keys": [dict(k.jwk) for k in published]}, separators=(",", ":"))
            self._jwks_cache = (kids, body.encode())
        return self._jwks_cache[1]

    def key_ages(self) -> dict[str, float]:
        now = self._clock()
        return {k.kid: now - k.created_at for k in self._set.published(now)}

    # --- loading ---------------------------------------------------------------------------

    async def refresh(self) -> KeySet:
        """Reload the key set from Vault; on failure keep the last good set and record why."""
        try:
            entry = await self._vault.kv_read(self._path)
            records = list(entry.data.get("keys", [])) if entry else []
            keyset = await self._build(records, entry.version if entry else 0)
        except UpstreamFailed as error:
            self._last_error = error.log_detail or error.description
            raise
        self._set = keyset
        self._last_success = time.monotonic()
        self._last_error = None
        return keyset

    async def _build(self, records: Sequence[Mapping[str, Any]], version: int) -> KeySet:
        ordered = sorted(records, key=lambda r: (int(r["activate_at"]), int(r["created_at"])))
        transit_pems: dict[int, str] | None = None
        parsed: list[SigningKey] = []
        for record in ordered:
            kid = str(record["kid"])
            key = self._parsed.get(kid)
            if key is None:
                if record.get("transit_version") is not None and transit_pems is None:
                    transit_pems = await self._vault.transit_public_keys(self._transit_key)
                key = _parse_record(record, transit_pems or {})
                self._parsed[kid] = key
            parsed.append(key)
        scheduled = []
        for index, key in enumerate(parsed):
            successor = parsed[index + 1] if index + 1 < len(parsed) else None
            retire = successor.activate_at if successor else None
            remove = retire + self._retention if retire is not None else None
            scheduled.append(replace(key, retire_at=retire, remove_after=remove))
        return KeySet(keys=tuple(scheduled), version=version)

    # --- rotating --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the ring (creating the first key if none exists) and start the refresher."""
        await self.refresh()
        if not self._set.keys:
            await self.rotate(reason="initial", activate_now=True)
        self._task = asyncio.create_task(self._refresher(), name="keyring-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def rotation_due(self) -> bool:
        newest = max((k.created_at for k in self._set.keys), default=None)
        return newest is None or newest + self.rotation_interval <= self._clock()

    async def rotate(self, *, reason: str, activate_now: bool = False) -> SigningKey:
        """Add a new key (published now, signing after `publish_ahead`) and prune expired ones.

        `activate_now` is only for the very first key, when no token can be cached anywhere.
        Retries on a concurrent write; if another replica rotated meanwhile for the schedule,
        a scheduled rotation is not repeated.
        """
        async with self._lock:
            for _attempt in range(5):
                entry = await self._vault.kv_read(self._path)
                records = list(entry.data.get("keys", [])) if entry else []
                version = entry.version if entry else 0
                if reason == "initial" and records:
                    await self.refresh()
                    return self.signer()
                if reason == "scheduled" and entry is not None:
                    await self._adopt(records, version)
                    if not self.rotation_due():
                        return self.signer()
                now = int(self._clock())
                record = await self._new_record(
                    now, now if activate_now else now + self.publish_ahead
                )
                kept = self._prune(records, now)
                try:
                    new_version = await self._vault.kv_write(
                        self._path, {"keys": [*kept, record]}, cas=version
                    )
                except Conflict:
                    log.info("keyring.rotate_conflict", retrying=True)
                    continue
                await self._adopt([*kept, record], new_version)
                key = self._parsed[str(record["kid"])]
                log.info("keyring.rotated", kid=key.kid, reason=reason, activate_at=key.activate_at)
                if self._on_rotate is not None:
                    result = self._on_rotate(key, reason)
                    if asyncio.iscoroutine(result):
                        await result
                return key
            raise UpstreamFailed("could not rotate keys: the key set kept changing in Vault")

    async def _adopt(self, records: Sequence[Mapping[str, Any]], version: int) -> None:
        self._set = await self._build(records, version)
        self._last_success = time.monotonic()
        self._last_error = None

    def _prune(self, records: Sequence[Mapping[str, Any]], now: int) -> list[Mapping[str, Any]]:
        removable = {
            k.kid for k in self._set.keys if k.remove_after is not None and k.remove_after <= now
        }
        return [r for r in records if str(r["kid"]) not in removable]

    async def _new_record(self, now: int, activate_at: int) -> dict[str, Any]:
        record: dict[str, Any] = {
            "alg": self.algorithm,
            "created_at": now,
            "activate_at": activate_at,
        }
        if self.signing == "transit":
            await self._vault.transit_ensure_key(
                self._transit_key, _TRANSIT_KEY_TYPE[self.algorithm]
            )
            pems = await self._vault.transit_public_keys(self._transit_key)
            used = {k.transit_version for k in self._set.keys}
            latest = max(pems)
            if latest in used:
                latest = await self._vault.transit_rotate(self._transit_key)
                pems = await self._vault.transit_public_keys(self._transit_key)
            public_key = _load_public(pems[latest])
            record["transit_version"] = latest
        else:
            private_key = generate_private_key(self.algorithm)
            public_key = private_key.public_key()
            record["private_pem"] = private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
        record["kid"] = jwk_thumbprint(public_jwk(public_key, self.algorithm))
        return record

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval)
            try:
                await self.refresh()
                if self.rotation_due():
                    await self.rotate(reason="scheduled")
            except UpstreamFailed as error:
                log.warning("keyring.refresh_failed", error=error.description)
            except Exception:  # the refresher must outlive any single bad cycle
                log.exception("keyring.refresh_crashed")

    # --- signing ---------------------------------------------------------------------------

    async def sign(self, key: SigningKey, signing_input: bytes) -> bytes:
        """Raw JWS signature over `signing_input` (used for transit keys)."""
        if key.private_key is not None:
            algorithm = jwt.get_algorithm_by_name(key.alg)
            return algorithm.sign(signing_input, key.private_key)
        assert key.transit_version is not None
        return await self._vault.transit_sign(
            self._transit_key, key.transit_version, signing_input, algorithm=key.alg
        )


def _load_public(pem: str) -> PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise UpstreamFailed("Vault returned a key of an unsupported type")
    return key


def _parse_record(record: Mapping[str, Any], transit_pems: Mapping[int, str]) -> SigningKey:
    alg = record["alg"]
    if alg not in SUPPORTED_ALGORITHMS:
        raise UpstreamFailed("the key set in Vault holds an unsupported algorithm", log_detail=alg)
    private_key: PrivateKey | None = None
    transit_version = record.get("transit_version")
    if transit_version is not None:
        pem = transit_pems.get(int(transit_version))
        if pem is None:
            raise UpstreamFailed(
                "a transit key version named in the key set is missing in Vault",
                log_detail=f"version {transit_version}",
            )
        public_key = _load_public(pem)
    else:
        loaded = serialization.load_pem_private_key(str(record["private_pem"]).encode(), None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise UpstreamFailed("the key set in Vault holds a key of an unsupported type")
        private_key = loaded
        public_key = loaded.public_key()
    kid = str(record["kid"])
    jwk = {**public_jwk(public_key, alg), "kid": kid, "alg": alg, "use": "sig"}
    return SigningKey(
        kid=kid,
        alg=alg,
        created_at=int(record["created_at"]),
        activate_at=int(record["activate_at"]),
        public_key=public_key,
        private_key=private_key,
        transit_version=int(transit_version) if transit_version is not None else None,
        jwk=jwk,
    )
