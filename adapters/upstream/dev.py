"""Development sign-in: type a username and pick groups. No password, so never in production.

The adapter refuses to be built unless the broker runs in dev mode, and the broker marks
every page it renders while this adapter is loaded.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence

from adapters.base import LocalForm, LoginFlow, Principal
from adapters.errors import ConfigurationError, InvalidRequest

DEV_ISSUER = "urn:binder-broker:dev"
DEV_ACR = "urn:binder-broker:dev:no-authentication"
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class DevUpstream:
    """An upstream whose 'authentication' is whatever the developer types."""

    def __init__(
        self, id: str, display_name: str, groups: Sequence[str], *, dev_mode: bool
    ) -> None:
        if not dev_mode:
            raise ConfigurationError(
                "the dev sign-in adapter refuses to load outside `broker dev`",
            )
        self.id = id
        self.display_name = display_name
        self.groups = tuple(groups)

    async def begin(self, flow: LoginFlow) -> LocalForm:
        return LocalForm(upstream=self.id, fields=("username",), choices={"groups": self.groups})

    async def complete(self, flow: LoginFlow, params: Mapping[str, str]) -> Principal:
        """`params["groups"]` holds the ticked groups separated by spaces."""
        username = str(params.get("username", "")).strip().lower()
        if not _USERNAME.match(username):
            raise InvalidRequest(
                "Choose a username of 1 to 64 lower-case letters, digits, '.', '_' or '-'."
            )
        picked = params.get("groups", "").split()
        unknown = set(picked) - set(self.groups)
        if unknown:
            raise InvalidRequest("Pick groups from the list offered.")
        return Principal(
            idp=self.id,
            issuer=DEV_ISSUER,
            subject=username,
            display_name=username,
            email=f"{username}@dev.invalid",
            groups=tuple(g for g in self.groups if g in picked),
            acr=DEV_ACR,
            auth_time=int(time.time()),
        )
