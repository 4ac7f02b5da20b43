"""Claim mapping of the OIDC upstream (claims -> Principal) and its configuration checks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from adapters.errors import ConfigurationError, InvalidRequest
from adapters.upstream.oidc import ClaimMapping, OidcUpstream, map_claims, split_values
from adapters.vault import TokenAuth, VaultClient
from broker.cache import MemoryCache

ISSUER = "https://op.example.edu"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["a", "b", "a", "", 3], ("a", "b")),
        ("a b,c , a", ("a", "b", "c")),
        ("", ()),
        (None, ()),
        ({"a": 1}, ()),
    ],
    ids=["list-dedup-non-strings-dropped", "space-and-comma-string", "empty", "none", "object"],
)
def test_split_values(value: Any, expected: tuple[str, ...]) -> None:
    assert split_values(value) == expected


def test_standard_claims_fill_the_principal() -> None:
    claims = {
        "iss": ISSUER, "sub": "u123", "aud": "broker", "exp": 2, "iat": 1, "nonce": "n",
        "at_hash": "h", "sid": "s", "email": "ada@example.edu", "name": "Ada",
        "groups": ["physics", "hpc"], "eduperson_scoped_affiliation": "staff@example.edu",
        "acr": "urn:basic", "amr": ["pwd"], "auth_time": 1700000000,
    }  # fmt: skip
    p = map_claims(claims, ClaimMapping(), idp="cilogon", issuer=ISSUER)
    assert (p.idp, p.issuer, p.subject, p.display_name, p.email) == (
        "cilogon", ISSUER, "u123", "Ada", "ada@example.edu",
    )  # fmt: skip
    assert p.groups == ("physics", "hpc") and p.affiliation == ("staff@example.edu",)
    assert (p.acr, p.amr, p.mfa, p.auth_time) == ("urn:basic", ("pwd",), False, 1700000000)
    # Protocol claims stay out of the session copy; identity claims are kept.
    assert not {"aud", "exp", "iat", "nonce", "at_hash", "sid"} & set(p.claims)
    assert p.claims["email"] == "ada@example.edu" and p.claims["sub"] == "u123"
    json.dumps(p.to_json())  # JSON-able


@pytest.mark.parametrize(
    ("acr", "amr", "mfa"),
    [
        (None, ["pwd", "mfa"], True),
        ("https://refeds.org/profile/mfa", None, True),
        ("urn:example:MFA-strong", ["pwd"], True),
        ("https://refeds.org/profile/sfa", ["pwd", "otp"], False),
        (None, "mfa", True),
    ],
    ids=["amr-mfa", "refeds-mfa-acr", "acr-contains-mfa-any-case", "otp-alone-is-not", "amr-str"],
)
def test_mfa_rule(acr: str | None, amr: Any, mfa: bool) -> None:
    claims: dict[str, Any] = {"sub": "u"} | ({"acr": acr} if acr else {})
    if amr is not None:
        claims["amr"] = amr
    assert map_claims(claims, ClaimMapping(), idp="x", issuer=ISSUER).mfa is mfa


def test_custom_mapping_and_missing_optional_claims() -> None:
    mapping = ClaimMapping.from_mapping(
        {"subject": "eppn", "groups": "isMemberOf", "affiliation": "affiliation", "name": "nick"}
    )
    claims = {"sub": "opaque", "eppn": "ada@example.edu", "isMemberOf": "g1,g2"}
    p = map_claims(claims, mapping, idp="x", issuer=ISSUER, now=1234)
    assert p.subject == "ada@example.edu" and p.groups == ("g1", "g2")
    assert p.affiliation == () and p.display_name == "" and p.email is None
    assert p.auth_time == 1234  # no auth_time claim: the time of this sign-in


@pytest.mark.parametrize(
    "claims",
    [{}, {"sub": ""}, {"sub": ["a"]}, {"sub": "  "}],
    ids=["missing", "empty", "list", "blank"],
)
def test_subject_claim_is_required(claims: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        map_claims(claims, ClaimMapping(), idp="x", issuer=ISSUER)


def test_unknown_mapping_key_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        ClaimMapping.from_mapping({"subjekt": "sub"})


def test_oversized_claims_are_not_kept() -> None:
    claims = {"sub": "u", "blob": "x" * 5000, "nested": {"a": 1}, "ok": ["a", "b"]}
    kept = map_claims(claims, ClaimMapping(), idp="x", issuer=ISSUER).claims
    assert "blob" not in kept and "nested" not in kept and kept["ok"] == ["a", "b"]


@pytest_asyncio.fixture
async def parts() -> AsyncIterator[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        yield {
            "http": http,
            "cache": MemoryCache(),
            # Never contacted: the constructor only validates its configuration.
            "vault": VaultClient("http://127.0.0.1:9", TokenAuth("unused")),
        }


def config(**overrides: Any) -> dict[str, Any]:
    return {
        "id": "op", "display_name": "OP", "issuer": ISSUER, "client_id": "broker",
        "client_secret": None, "scopes": ["openid"], "id_token_algs": ["RS256"], "claims": {},
        "use_userinfo": True, "idp_hint_param": "selected_idp", "auth_params": {},
        "keep_refresh_token": False, "clock_skew": 60, "vault_prefix": "binder-broker",
    } | overrides  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        {"id_token_algs": ["HS256"]},
        {"id_token_algs": ["none"]},
        {"id_token_algs": ["RS256", "HS512"]},
        {"id_token_algs": []},
        {"scopes": ["profile"]},
        {"auth_params": {"redirect_uri": "https://evil.example/cb"}},
        {"auth_params": {"nonce": "fixed"}},
        {"idp_hint_param": "state"},
    ],
    ids=["hs256", "none", "hs-in-list", "empty-algs", "no-openid", "redirect-uri-override",
         "nonce-override", "hint-param-is-state"],
)  # fmt: skip
async def test_unsafe_configuration_is_refused(
    parts: dict[str, Any], overrides: dict[str, Any]
) -> None:
    with pytest.raises(ConfigurationError):
        OidcUpstream(**config(**overrides), **parts)


async def test_safe_configuration_is_accepted(parts: dict[str, Any]) -> None:
    upstream = OidcUpstream(
        **config(id_token_algs=["ES256", "EdDSA"], auth_params={"prompt": "login"}), **parts
    )
    assert upstream.id == "op" and "secret" not in repr(upstream)
