"""The sign-in chooser over real SAML upstreams (metadata files, signed AuthnRequests): a
federation is searched on the server (no JavaScript needed) and through /login/idps, a
one-IdP upstream is a plain link, hints skip the chooser, the last choice is offered again,
and nothing outside the metadata's IdPs can be chosen."""

from __future__ import annotations

import base64
import html
import re
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from lxml import etree

from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.oauth.clients import hash_secret
from broker.routes.login import LAST_IDP_COOKIE, MAX_RESULTS
from broker.services import Services
from tests.peers.broker import ContractClient, make_settings, start_broker
from tests.peers.pysaml2_idp import KeyPair, make_keypair, saml_upstream_settings

HTML = {"Accept": "text/html"}
HUB = "https://hub.example.org/oauth_callback"
SECRET = "hub-secret-0123456789"
TOWNS = ["Ocean", "River", "Mountain", "Valley", "Forest", "Desert", "Prairie", "Harbor"]
KINDS = ["University", "College", "Institute", "Polytechnic"]


def idp_xml(entity_id: str, name: str, cert: KeyPair) -> str:
    return f"""
  <md:EntityDescriptor entityID="{entity_id}">
    <md:IDPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">
      <md:Extensions>
        <mdui:UIInfo><mdui:DisplayName xml:lang="en">{name}</mdui:DisplayName></mdui:UIInfo>
      </md:Extensions>
      <md:KeyDescriptor use="signing"><ds:KeyInfo><ds:X509Data>
        <ds:X509Certificate>{cert.cert_b64}</ds:X509Certificate>
      </ds:X509Data></ds:KeyInfo></md:KeyDescriptor>
      <md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"
        Location="{entity_id}/sso"/>
    </md:IDPSSODescriptor>
  </md:EntityDescriptor>"""


def federation_metadata(path: Path, cert: KeyPair) -> list[tuple[str, str]]:
    """An aggregate of 32 IdPs and one SP; returns the IdPs' (entity id, display name)."""
    idps = [
        (f"https://idp{i}.example.edu", f"{TOWNS[i % 8]} {KINDS[i // 8]} {i}") for i in range(32)
    ]
    sp = """
  <md:EntityDescriptor entityID="https://sp.example.org/shibboleth">
    <md:SPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">
      <md:AssertionConsumerService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
        Location="https://sp.example.org/acs" index="0"/>
    </md:SPSSODescriptor>
  </md:EntityDescriptor>"""
    path.write_text(
        '<md:EntitiesDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" '
        'xmlns:mdui="urn:oasis:names:tc:SAML:metadata:ui" '
        'xmlns:ds="http://www.w3.org/2000/09/xmldsig#">'
        + "".join(idp_xml(e, n, cert) for e, n in idps)
        + sp
        + "</md:EntitiesDescriptor>"
    )
    return idps


@pytest_asyncio.fixture
async def scene(
    tmp_path: Path, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[tuple[ContractClient, list[tuple[str, str]]]]:
    sp = make_keypair(tmp_path / "sp", "sp")
    idp_cert = make_keypair(tmp_path / "idp", "idp")
    idps = federation_metadata(tmp_path / "federation.xml", idp_cert)
    federation = saml_upstream_settings("fed", sp, tmp_path / "federation.xml", None)
    federation["display_name"] = "Example Federation"
    campus = saml_upstream_settings("campus", sp, tmp_path / "federation.xml", idps[3][0])
    campus["display_name"] = "Campus (one IdP)"
    hub = {
        "client_id": "hub", "name": "Example BinderHub", "secret_hash": hash_secret(SECRET),
        "redirect_uris": [HUB], "first_party": True, "grant_types": ["authorization_code"],
        "scopes": ["openid", "groups"],
    }  # fmt: skip
    settings = make_settings(
        tmp_path, openbao.address, vault_approle, mode="production",
        upstreams=[federation, campus], clients=[hub],
    )  # fmt: skip
    svc: Services = await start_broker(settings, dev_mode=False)
    try:
        async with TestClient(TestServer(app_with_services(svc))) as raw:
            yield ContractClient(raw), idps
    finally:
        await svc.close()


def links(page: str) -> list[str]:
    tree = etree.HTML(page)
    return [str(a.text) for a in tree.iterfind(".//ul[@class='choices']//a")]


def authn_request_of(location: str) -> bytes:
    """The (deflated, base64) SAMLRequest of an HTTP-Redirect binding URL."""
    [value] = parse_qs(urlsplit(location).query)["SAMLRequest"]
    return zlib.decompress(base64.b64decode(value), -15)


async def test_chooser_lists_plain_links_and_a_searchable_federation(
    scene: tuple[ContractClient, list[tuple[str, str]]],
) -> None:
    client, idps = scene
    page = await client.get("/login", params={"next": "/"}, headers=HTML)
    assert page.status == 200
    shown = links(page.text)
    assert "Campus (one IdP)" in shown  # a one-IdP upstream is a plain link
    assert {name for _, name in idps} <= set(shown)  # 32 IdPs: all fit on the page
    assert not any("sp.example.org" in name for name in shown)  # SPs are never offered
    tree = etree.HTML(page.text)
    [box] = tree.iterfind(".//input[@type='search']")
    assert tree.find(f".//label[@for='{box.get('id')}']") is not None  # labelled
    assert box.get("name") == "q" and tree.find(".//form[@role='search']") is not None
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'nonce-" in csp and "connect-src 'self'" in csp


async def test_server_side_search_needs_no_javascript(
    scene: tuple[ContractClient, list[tuple[str, str]]],
) -> None:
    client, idps = scene
    page = await client.get("/login", params={"idp": "fed", "q": "ocean univ"}, headers=HTML)
    expected = sorted(n for _, n in idps if n.startswith("Ocean University"))
    assert links(page.text) == expected and expected
    none = await client.get("/login", params={"idp": "fed", "q": "atlantis"}, headers=HTML)
    assert links(none.text) == []
    assert "No institution matches" in none.text


async def test_type_ahead_json_matches_the_page(
    scene: tuple[ContractClient, list[tuple[str, str]]],
) -> None:
    client, idps = scene
    found = await client.get("/login/idps", params={"idp": "fed", "q": "harbor", "next": "/x"})
    assert found.status == 200
    body = found.json()
    assert [i["display_name"] for i in body["idps"]] == sorted(
        n for _, n in idps if n.startswith("Harbor")
    )
    assert body["more"] is False
    first = body["idps"][0]
    assert parse_qs(urlsplit(first["href"]).query) == {
        "idp": ["fed"], "next": ["/x"], "entity": [first["entity_id"]],
    }  # fmt: skip
    everything = (await client.get("/login/idps", params={"idp": "fed"})).json()
    assert len(everything["idps"]) == min(MAX_RESULTS, len(idps))
    unknown = await client.raw.get("/login/idps", params={"idp": "nope"})
    assert unknown.status == 404


async def test_choosing_an_idp_sends_a_signed_request_there_and_is_remembered(
    scene: tuple[ContractClient, list[tuple[str, str]]],
) -> None:
    client, idps = scene
    entity, name = idps[17]
    start = await client.get(
        "/login", params={"idp": "fed", "entity": entity, "next": "/"}, headers=HTML
    )
    assert start.status == 302
    location = start.headers["Location"]
    assert location.startswith(f"{entity}/sso?")
    assert "Signature=" in location  # signed AuthnRequest, Redirect binding
    assert b"AuthnRequest" in authn_request_of(location)
    remembered = start.cookies[LAST_IDP_COOKIE]
    page = await client.get("/login", headers=HTML, cookies={LAST_IDP_COOKIE: remembered})
    last = re.search(r'Last time you used <a href="([^"]+)">([^<]+)</a>', page.text)
    assert last is not None
    assert last.group(2) == name
    assert parse_qs(urlsplit(html.unescape(last.group(1))).query)["entity"] == [entity]
    fresh = await client.get("/login", headers=HTML, cookies={LAST_IDP_COOKIE: ""})
    assert "Last time you used" not in fresh.text


async def test_unknown_entities_and_sps_cannot_be_chosen(
    scene: tuple[ContractClient, list[tuple[str, str]]],
) -> None:
    client, _ = scene
    for entity in ("https://evil.example.net/idp", "https://sp.example.org/shibboleth"):
        refused = await client.get("/login", params={"idp": "fed", "entity": entity}, headers=HTML)
        assert refused.status == 404, entity
        assert "Location" not in refused.headers


async def test_an_entity_id_hint_on_authorize_skips_the_chooser(
    scene: tuple[ContractClient, list[tuple[str, str]]],
) -> None:
    client, idps = scene
    entity, _ = idps[5]
    query = {
        "response_type": "code", "client_id": "hub", "redirect_uri": HUB, "scope": "openid",
        "state": "s1", "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256", "idp": entity,
    }  # fmt: skip
    authorize = await client.get(f"/oauth/authorize?{urlencode(query)}", headers=HTML)
    assert authorize.status == 302
    login = await client.get(authorize.headers["Location"], headers=HTML)
    assert login.status == 302
    assert login.headers["Location"].startswith(f"{entity}/sso?")


async def test_prompt_login_and_max_age_force_authentication_at_the_idp(
    scene: tuple[ContractClient, list[tuple[str, str]]],
) -> None:
    """A fresh sign-in demanded at the broker is demanded of the IdP too (ForceAuthn), so the
    IdP's own single sign-on session cannot answer for it; otherwise it is not."""
    client, idps = scene
    entity, _ = idps[7]
    base = {
        "response_type": "code", "client_id": "hub", "redirect_uri": HUB, "scope": "openid",
        "state": "s2", "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256", "idp": entity,
    }  # fmt: skip
    requests: dict[str, bytes] = {}
    for name, extra in [
        ("plain", {}),
        ("login", {"prompt": "login"}),
        ("max_age", {"max_age": "60"}),
    ]:
        authorize = await client.get(f"/oauth/authorize?{urlencode(base | extra)}", headers=HTML)
        assert authorize.status == 302, authorize.text
        login = await client.get(authorize.headers["Location"], headers=HTML)
        assert login.status == 302 and login.headers["Location"].startswith(f"{entity}/sso?")
        requests[name] = authn_request_of(login.headers["Location"])
    assert b'ForceAuthn="true"' in requests["login"]
    assert b'ForceAuthn="true"' in requests["max_age"]
    assert b"ForceAuthn" not in requests["plain"]
