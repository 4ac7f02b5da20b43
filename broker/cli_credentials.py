"""`broker credentials aws|openstack`: launch credentials for the tools people already use.

Both sign in with the tokens `broker login` stored (refreshing them as needed), ask the
broker's `POST /v1/credentials`, and keep the answer in a 0600 file under the config
directory, reusing it until `RENEW_BEFORE` seconds before it expires, so the AWS CLI's
`credential_process` (which calls us whenever it needs credentials) and a re-run of the
OpenStack command renew ahead of expiry instead of at it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from broker.cli_client import (
    HTTP_TIMEOUT,
    CliError,
    TokenStore,
    _describe,
    _read_json,
    _run,
    config_dir,
    fresh_access_token,
    write_private,
)

RENEW_BEFORE = 300  # seconds


def _expires_at(body: Mapping[str, Any]) -> float:
    return datetime.fromisoformat(str(body["expires_at"]).replace("Z", "+00:00")).timestamp()


def _cache_path(issuer: str | None, request: Mapping[str, Any]) -> Path:
    key = json.dumps([issuer, dict(request)], sort_keys=True).encode()
    return config_dir() / "credentials" / f"{hashlib.sha256(key).hexdigest()[:32]}.json"


def _issuer_of(store: TokenStore, issuer: str | None) -> str:
    with store.locked():
        data = store.load()
    chosen = issuer.rstrip("/") if issuer else data.get("default")
    if not isinstance(chosen, str) or chosen not in data["issuers"]:
        raise CliError(f"not signed in: run broker login --issuer {chosen or 'URL'}")
    return chosen


async def credential(
    issuer: str | None, request: Mapping[str, Any], *, store: TokenStore | None = None
) -> dict[str, Any]:
    """The broker's answer to `request`, from the cache while it has more than
    `RENEW_BEFORE` seconds left, else fresh from `POST /v1/credentials`."""
    store = store or TokenStore(config_dir())
    chosen = _issuer_of(store, issuer)
    cache = _cache_path(chosen, request)
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached: dict[str, Any] = json.loads(cache.read_text("utf-8"))
        if _expires_at(cached) - time.time() > RENEW_BEFORE:
            return cached
    access = await fresh_access_token(chosen, store=store)
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
        http.post(
            f"{chosen}/v1/credentials",
            json=dict(request),
            headers={"Authorization": f"Bearer {access}", "Accept": "application/json"},
        ) as response,
    ):
        body = await _read_json(response)
        status = response.status
    if status != 201:
        hint = ""
        if body.get("error") == "insufficient_scope":
            hint = f" (sign in again: broker login --issuer {chosen})"
        raise CliError(f"the broker refused: {_describe(body)}{hint}")
    write_private(cache, json.dumps(body))
    return body


def aws_process_output(body: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON the AWS CLI and SDKs expect from a `credential_process`."""
    if body.get("kind") != "aws":
        raise CliError(f"backend {body.get('backend')!r} does not issue AWS credentials")
    secret = body["credential"]
    return {
        "Version": 1,
        "AccessKeyId": secret["AccessKeyId"],
        "SecretAccessKey": secret["SecretAccessKey"],
        "SessionToken": secret["SessionToken"],
        "Expiration": body["expires_at"],
    }


def merge_clouds_yaml(path: Path, cloud: str, body: Mapping[str, Any]) -> None:
    """Add or replace `cloud` in the clouds.yaml at `path`, keeping every other entry."""
    if body.get("kind") != "openstack":
        raise CliError(f"backend {body.get('backend')!r} does not issue OpenStack credentials")
    ours = yaml.safe_load(str(body["credential"]["clouds_yaml"]))
    entry = next(iter(ours["clouds"].values()))
    try:
        current = yaml.safe_load(path.read_text("utf-8")) or {}
    except FileNotFoundError:
        current = {}
    if not isinstance(current, dict) or not isinstance(current.get("clouds", {}), dict):
        raise CliError(f"{path} is not a clouds.yaml file; not touching it")
    current.setdefault("clouds", {})[cloud] = entry
    write_private(path, yaml.safe_dump(current, sort_keys=False))


def _request(backend: str, duration: int, **optional: str | None) -> dict[str, Any]:
    return {"backend": backend, "duration": duration} | {
        k: v for k, v in optional.items() if v is not None
    }


def run_aws(issuer: str | None, backend: str, role: str | None, duration: int) -> int:
    """`broker credentials aws`: print `credential_process` JSON on stdout."""

    async def work() -> None:
        body = await credential(issuer, _request(backend, duration, role=role))
        print(json.dumps(aws_process_output(body)), flush=True)

    return _run(work)


def run_openstack(
    issuer: str | None,
    backend: str,
    project: str | None,
    duration: int,
    cloud: str,
    clouds_file: Path,
) -> int:
    """`broker credentials openstack`: write or renew one clouds.yaml entry."""

    async def work() -> None:
        body = await credential(issuer, _request(backend, duration, project=project))
        merge_clouds_yaml(clouds_file, cloud, body)
        print(
            f"wrote cloud {cloud!r} to {clouds_file} (expires {body['expires_at']}); "
            f"use: openstack --os-cloud {cloud} …",
            file=sys.stderr,
            flush=True,
        )

    return _run(work)
