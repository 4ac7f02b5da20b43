"""JSON calls to a forge's REST API, shared by the GitHub, GitLab and Bitbucket hosts.

Contracts: `call` returns the status and parsed body (None when empty or not JSON) and
raises `UpstreamFailed` when the forge cannot be reached, never chaining aiohttp's exception
(its request info holds the Authorization header); `check` turns a non-2xx answer into
`NotFound` (404) or `UpstreamFailed`, with the forge's own message in `log_detail` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from adapters.errors import NotFound, UpstreamFailed

TIMEOUT = aiohttp.ClientTimeout(total=20)


@dataclass(frozen=True, slots=True)
class Answer:
    """What is kept of a forge's answer: the status and the parsed body."""

    status: int
    body: Any

    @property
    def message(self) -> str:
        """The forge's own error text: `message` (GitHub, GitLab), `error` (GitLab OAuth),
        or each of `errors[].message` (Bitbucket)."""
        if not isinstance(self.body, dict):
            return ""
        for key in ("message", "error"):
            if key in self.body:
                return str(self.body[key])[:300]
        errors = self.body.get("errors")
        if isinstance(errors, list):
            return "; ".join(str(e.get("message", ""))[:200] for e in errors if isinstance(e, dict))
        return ""


async def call(
    http: aiohttp.ClientSession, method: str, url: str, *, headers: Mapping[str, str],
    forge: str, backend: str, params: Mapping[str, str] | None = None, json: Any = None,
) -> Answer:  # fmt: skip
    """One request to `url`; the answer, whatever its status."""
    try:
        async with http.request(
            method, url, headers=dict(headers), params=params, json=json, timeout=TIMEOUT
        ) as response:
            body: Any = None
            if response.status != 204:
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
            return Answer(response.status, body)
    except (aiohttp.ClientError, TimeoutError) as error:
        raise UpstreamFailed(
            f"{forge} is unreachable",
            log_detail=f"backend {backend}: {method} {urlsplit(url).path}: {type(error).__name__}",
        ) from None


def check(
    answer: Answer, what: str, *, forge: str, backend: str, refusals: Mapping[int, str],
    body_type: type | None = dict,
) -> None:  # fmt: skip
    """Return if the answer is a 2xx whose body is a `body_type` (any body when None); else
    raise NotFound for 404, UpstreamFailed with `refusals[status]` or a generic message."""
    if 200 <= answer.status < 300 and (body_type is None or isinstance(answer.body, body_type)):
        return
    detail = f"backend {backend}: {answer.status} {answer.message}"
    if answer.status == 404:
        raise NotFound(f"{what} is not known at {backend}", log_detail=detail)
    if answer.status in refusals:
        raise UpstreamFailed(refusals[answer.status], log_detail=detail)
    raise UpstreamFailed(f"{forge} failed ({answer.status})", log_detail=detail)
