"""The README's `[[upstreams]]` examples are valid settings, and the upstream models refuse
what they should (so the README cannot drift from what the broker accepts)."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from broker.settings import (
    GlobusUpstreamConfig,
    LtiUpstreamConfig,
    OidcUpstreamConfig,
    SamlUpstreamConfig,
    SettingsError,
    parse_settings,
)

README = Path(__file__).resolve().parents[2] / "README.md"
MINIMAL: dict[str, Any] = {
    "server": {"public_url": "https://broker.example.edu"},
    "vault": {
        "address": "https://vault.example.edu:8200",
        "auth": {"method": "approle", "role_id": "role-1", "secret_id": "literal-secret"},
    },
}


def _readme_upstream_blocks() -> list[str]:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text("utf-8"), flags=re.S)
    return [b for b in blocks if "[[upstreams]]" in b]


@pytest.mark.parametrize("block", _readme_upstream_blocks())
def test_readme_upstream_examples_validate(block: str) -> None:
    data = copy.deepcopy(MINIMAL) | tomllib.loads(block)
    settings = parse_settings(data, mode="production")
    [upstream] = settings.upstreams
    assert isinstance(
        upstream,
        OidcUpstreamConfig | SamlUpstreamConfig | LtiUpstreamConfig | GlobusUpstreamConfig,
    )


def test_the_readme_shows_every_upstream_type_and_a_federation() -> None:
    kinds = [tomllib.loads(b)["upstreams"][0] for b in _readme_upstream_blocks()]
    assert {k["type"] for k in kinds} == {"oidc", "saml", "lti", "globus"}
    assert any(k["type"] == "saml" and "idp" not in k for k in kinds)  # a whole federation


def _problems(upstream: dict[str, Any]) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        parse_settings(MINIMAL | {"upstreams": [upstream]}, mode="production")
    return caught.value.problems


OIDC = {"type": "oidc", "id": "op", "display_name": "OP", "issuer": "https://op.example.org",
        "client_id": "broker"}  # fmt: skip
SAML = {"type": "saml", "id": "campus", "display_name": "Campus", "sp_key": {"env": "K"},
        "sp_cert": "/c.pem", "metadata": [{"file": "/m.xml"}]}  # fmt: skip


@pytest.mark.parametrize(
    ("upstream", "fragment"),
    [
        pytest.param(OIDC | {"issuer": "http://op.example.org"}, "https", id="oidc-plain-http"),
        pytest.param(OIDC | {"scopes": ["profile"]}, "openid", id="oidc-no-openid-scope"),
        pytest.param(OIDC | {"id_token_algs": ["none"]}, "id_token_algs", id="oidc-alg-none"),
        pytest.param(OIDC | {"id_token_algs": ["HS256"]}, "id_token_algs", id="oidc-alg-hs256"),
        pytest.param(SAML | {"metadata": []}, "metadata", id="saml-no-metadata"),
        pytest.param(
            SAML | {"metadata": [{"url": "https://md.example.org/agg.xml"}]},
            "signing_cert",
            id="saml-unsigned-aggregate",
        ),
        pytest.param(SAML | {"metadata": [{"ftp": "x"}]}, "metadata source", id="saml-bad-source"),
        pytest.param(SAML | {"id": "Campus!"}, "id", id="saml-bad-id"),
    ],
)
def test_bad_upstreams_are_refused_with_their_key(upstream: dict[str, Any], fragment: str) -> None:
    problems = _problems(upstream)
    assert any(p.startswith("upstreams[0]") and fragment in p for p in problems), problems


def test_the_commented_upstreams_in_the_example_settings_validate() -> None:
    text = (README.parent / "examples" / "broker.toml").read_text("utf-8")
    block = text[text.index("# [[upstreams]]") :]
    lines = [
        line[2:] if line.startswith("# ") else ""
        for line in block.splitlines()
        if not line.startswith("# # ")  # a comment inside the commented example
    ]
    settings = parse_settings(MINIMAL | tomllib.loads("\n".join(lines)), mode="production")
    assert [u.type for u in settings.upstreams] == ["oidc", "saml"]


def _readme_backend_blocks() -> list[str]:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text("utf-8"), flags=re.S)
    return [b for b in blocks if "[[backends]]" in b]


def test_readme_backend_examples_validate() -> None:
    blocks = _readme_backend_blocks()
    kinds = []
    for block in blocks:
        settings = parse_settings(copy.deepcopy(MINIMAL) | tomllib.loads(block), mode="production")
        kinds += [b.type for b in settings.backends]
    # Every block validated above; each documented backend type has its example.
    assert {"aws", "openstack", "github", "gitlab", "bitbucket", "git", "globus"} <= set(kinds)
