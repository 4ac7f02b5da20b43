"""`broker git-credential`: a git credential helper (gitcredentials(7), git-credential(1)).

Configure it once, then clone through the broker's git gateway with nothing in environment
variables or URLs:

    git config --global credential.helper "$(command -v broker) git-credential"
    git clone https://broker.example.edu/git/github/owner/repo.git

git runs `broker git-credential get|store|erase` with `key=value` lines on stdin. For `get`
naming the host (and protocol) of a broker signed in to with `broker login`, it prints
`username=broker` and `password=<a fresh broker access token>` (refreshed through the stored
device-flow login, as `broker token` does). For any other host it prints nothing, so git asks
its next helper. `store` and `erase` do nothing: the token is short-lived and the login is
kept by `broker login`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Mapping
from typing import TextIO
from urllib.parse import urlsplit

import aiohttp

from broker.cli_client import CliError, TokenStore, config_dir, fresh_access_token

USERNAME = "broker"


def parse_request(lines: Iterable[str]) -> dict[str, str]:
    """git's `key=value` lines up to a blank line (later keys win, as git's own do)."""
    attrs: dict[str, str] = {}
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            break
        key, sep, value = line.partition("=")
        if sep:
            attrs[key] = value
    return attrs


def _default_port(scheme: str) -> int | None:
    return {"https": 443, "http": 80}.get(scheme)


def issuer_for(attrs: Mapping[str, str], issuers: Iterable[str]) -> str | None:
    """The signed-in issuer whose scheme and host[:port] are git's `protocol` and `host`."""
    protocol = attrs.get("protocol", "").lower()
    host = attrs.get("host", "").lower()
    if not protocol or not host:
        return None
    for issuer in issuers:
        parts = urlsplit(issuer)
        if parts.scheme != protocol or parts.hostname is None:
            continue
        names = {parts.netloc.lower()}
        if parts.port is None or parts.port == _default_port(parts.scheme):
            # git sends `host` without the port when the URL has the default one
            names |= {parts.hostname.lower(), f"{parts.hostname.lower()}:{_default_port(protocol)}"}
        if host in names:
            return issuer
    return None


async def credential(attrs: Mapping[str, str], *, store: TokenStore | None = None) -> str:
    """What to print for `get`: the credential lines, or "" for a host that is not ours."""
    store = store or TokenStore(config_dir())
    with store.locked():
        issuers = list(store.load()["issuers"])
    issuer = issuer_for(attrs, issuers)
    if issuer is None:
        return ""
    token = await fresh_access_token(issuer, store=store)
    return f"username={USERNAME}\npassword={token}\n"


def run_git_credential(
    operation: str, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
    """`broker git-credential OPERATION`: exit 0 with nothing printed for hosts not ours
    and for store/erase; a refusal is one line on stderr and exit 1 (git then carries on
    without this helper's answer)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    attrs = parse_request(stdin)
    if operation != "get":
        return 0
    try:
        answer = asyncio.run(credential(attrs))
    except CliError as error:
        print(f"broker git-credential: {error}", file=sys.stderr)
        return error.exit_code
    except (aiohttp.ClientError, TimeoutError) as error:
        print(
            f"broker git-credential: the broker could not be reached ({type(error).__name__})",
            file=sys.stderr,
        )
        return 3
    except OSError as error:
        print(f"broker git-credential: {error}", file=sys.stderr)
        return 1
    stdout.write(answer)
    stdout.flush()
    return 0
