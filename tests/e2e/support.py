"""Helpers of the browser end-to-end tests (fixtures are in conftest.py).

- `run_broker(settings)`: the broker app over started services on a REAL loopback port, so a
  browser and other peers (an IdP posting back) reach it at `settings.server.public_url`.
- `Launcher`: a launcher-like OAuth client on its own port. `/start` begins code + PKCE at the
  broker with authlib; `/callback` exchanges the code (client_secret_basic) and keeps the
  token response in `tokens` (by OAuth `state`); its page shows no token.
- `federation_metadata(...)`: an `EntitiesDescriptor` of ~30 made-up IdPs (plus real ones,
  e.g. SimpleSAMLphp), the kind of aggregate a campus federation publishes, for the chooser's
  search; `FakeIdps` serves the made-up IdPs' SSO endpoints and records what reaches them.
- `verify_broker_jwt(...)`: checks a broker token with PyJWT against the broker's published JWKS
  (found through discovery), as an independent relying party would.
"""

from __future__ import annotations

import contextlib
import html
import os
import secrets
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from authlib.integrations.httpx_client import AsyncOAuth2Client  # type: ignore[import-untyped]
from lxml import etree
from playwright.async_api import Page

from broker.app import app_with_services
from broker.services import Services
from broker.settings import Settings
from tests.peers.broker import start_broker
from tests.peers.simplesamlphp import make_self_signed_cert

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)",
)

LAUNCHER_ID = "launcher"
LAUNCHER_SECRET = "launcher-secret-" + "e2e0123456789"
LAUNCHER_SCOPES = ["openid", "profile", "email", "groups"]

MD = "urn:oasis:names:tc:SAML:2.0:metadata"
MDUI = "urn:oasis:names:tc:SAML:metadata:ui"
DS = "http://www.w3.org/2000/09/xmldsig#"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
BINDING_REDIRECT = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"

# Made-up institutions of the federation; two start with "Camp" so that typing narrows
# step by step ("camp" -> 2 + the real campus IdP's display name, "campus" -> 1).
FEDERATION_NAMES = (
    "Northfield University", "Southgate University", "Eastbrook College", "Westmoor Institute",
    "Lakeside University", "Hillcrest College", "Riverside Polytechnic", "Maplewood University",
    "Pinecrest Academy of Sciences", "Oakridge State University", "Brookhaven College",
    "Fairview University", "Glenwood Institute of Technology", "Harborview University",
    "Ironwood College", "Juniper Valley University", "Kingsbridge University", "Longmeadow College",
    "Midland Technical University", "Newport School of Design", "Oceanside University",
    "Prairie State College", "Queensbury University", "Redwood Coast University",
    "Silverlake College", "Thornbury Institute", "Upland University", "Valleyview College",
    "Campbell Ridge College",
)  # fmt: skip
CAMPUS_NAME = "Campus University"


def artifacts_dir() -> Path:
    """Where screenshots go: $BROKER_TEST_ARTIFACTS, else <repo>/.test-artifacts/e2e."""
    path = Path(os.environ.get("BROKER_TEST_ARTIFACTS") or REPO / ".test-artifacts" / "e2e")
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fake_entity_id(name: str) -> str:
    slug = "-".join(name.lower().split()[:2])
    return f"https://idp.{slug}.example.org/idp/shibboleth"


def fake_sso_url(name: str, base: str) -> str:
    """The made-up IdP's SSO endpoint, served by a `FakeIdps` at `base`."""
    slug = "-".join(name.lower().split()[:2])
    return f"{base}/idp/{slug}/sso"


@dataclass
class FakeIdps:
    """The made-up IdPs' SSO endpoints (one small server): records each AuthnRequest URL and
    answers with a page naming the IdP. Playwright cannot route a redirect's target, so the
    broker's redirect must reach a real server."""

    base: str
    requests: list[str] = field(default_factory=list)

    async def sso(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(str(request.url))
        slug = _esc(request.match_info["slug"])
        return web.Response(
            text=f"<!doctype html><html lang=en><title>Fake IdP</title><h1>IdP {slug}</h1>",
            content_type="text/html",
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/idp/{slug}/sso", self.sso)
        return app


def _der_b64(cert_pem: str) -> str:
    lines = [ln for ln in cert_pem.strip().splitlines() if not ln.startswith("-----")]
    return "".join(lines)


def _fake_idp(name: str, cert_b64: str, sso_base: str) -> etree._Element:
    entity = etree.Element(f"{{{MD}}}EntityDescriptor", nsmap={"md": MD, "mdui": MDUI, "ds": DS})
    entity.set("entityID", fake_entity_id(name))
    idp = etree.SubElement(entity, f"{{{MD}}}IDPSSODescriptor")
    idp.set("protocolSupportEnumeration", "urn:oasis:names:tc:SAML:2.0:protocol")
    ui = etree.SubElement(etree.SubElement(idp, f"{{{MD}}}Extensions"), f"{{{MDUI}}}UIInfo")
    display = etree.SubElement(ui, f"{{{MDUI}}}DisplayName")
    display.set(XML_LANG, "en")
    display.text = name
    key = etree.SubElement(idp, f"{{{MD}}}KeyDescriptor")
    key.set("use", "signing")
    data = etree.SubElement(etree.SubElement(key, f"{{{DS}}}KeyInfo"), f"{{{DS}}}X509Data")
    etree.SubElement(data, f"{{{DS}}}X509Certificate").text = cert_b64
    sso = etree.SubElement(idp, f"{{{MD}}}SingleSignOnService")
    sso.set("Binding", BINDING_REDIRECT)
    sso.set("Location", fake_sso_url(name, sso_base))
    return entity


def _with_display_name(entity_xml: bytes, name: str) -> etree._Element:
    """The real IdP's EntityDescriptor with an mdui:DisplayName added to its IdP role."""
    entity = etree.fromstring(entity_xml, etree.XMLParser(resolve_entities=False, no_network=True))
    if entity.tag != f"{{{MD}}}EntityDescriptor":
        found = entity.find(f".//{{{MD}}}EntityDescriptor")
        assert found is not None, "no EntityDescriptor in the IdP's metadata"
        entity = found
    idp = entity.find(f"{{{MD}}}IDPSSODescriptor")
    assert idp is not None, "the IdP's metadata has no IDPSSODescriptor"
    extensions = idp.find(f"{{{MD}}}Extensions")
    if extensions is None:
        extensions = etree.Element(f"{{{MD}}}Extensions")
        idp.insert(0, extensions)
    ui = etree.SubElement(extensions, f"{{{MDUI}}}UIInfo")
    display = etree.SubElement(ui, f"{{{MDUI}}}DisplayName")
    display.set(XML_LANG, "en")
    display.text = name
    return entity


def federation_metadata(
    sso_base: str, real: Sequence[tuple[bytes, str]] = (), fake_campus: bool = True
) -> bytes:
    """An aggregate of the made-up IdPs (SSO at `sso_base`, see FakeIdps), the real IdPs in
    `real` as (their metadata, display name), and with `fake_campus` one more made-up IdP
    called CAMPUS_NAME."""
    cert_pem, _key = make_self_signed_cert("federation-test-idps")
    cert_b64 = _der_b64(cert_pem)
    root = etree.Element(f"{{{MD}}}EntitiesDescriptor", nsmap={"md": MD, "mdui": MDUI, "ds": DS})
    root.set("Name", "urn:example:test-federation")
    names = FEDERATION_NAMES + ((CAMPUS_NAME,) if fake_campus else ())
    for name in names:
        root.append(_fake_idp(name, cert_b64, sso_base))
    for entity_xml, name in real:
        root.append(_with_display_name(entity_xml, name))
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


@dataclass
class SpKeys:
    cert_pem: str
    cert_file: Path
    key_file: Path


def sp_keys(directory: Path) -> SpKeys:
    cert_pem, key_pem = make_self_signed_cert("broker-e2e-sp")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sp.crt").write_text(cert_pem)
    (directory / "sp.key").write_text(key_pem)
    (directory / "sp.key").chmod(0o600)
    return SpKeys(cert_pem, directory / "sp.crt", directory / "sp.key")


def saml_upstream(
    upstream_id: str, display_name: str, keys: SpKeys, metadata_file: Path, **extra: Any
) -> dict[str, Any]:
    """Settings of a SAML upstream (SP entity id and ACS default to the broker's URLs)."""
    return {
        "type": "saml",
        "id": upstream_id,
        "display_name": display_name,
        "sp_key": {"file": str(keys.key_file)},
        "sp_cert": str(keys.cert_file),
        "metadata": [{"file": str(metadata_file)}],
        **extra,
    }


def launcher_client(hash_secret: Any, launcher_url: str) -> dict[str, Any]:
    """The launcher's registration at the broker: confidential, third party (consent shows)."""
    return {
        "client_id": LAUNCHER_ID,
        "name": "E2E test launcher",
        "secret_hash": hash_secret(LAUNCHER_SECRET),
        "redirect_uris": [f"{launcher_url}/callback"],
        "first_party": False,
        "grant_types": ["authorization_code", "refresh_token"],
        "scopes": LAUNCHER_SCOPES,
    }


@dataclass
class RunningBroker:
    services: Services
    url: str

    @property
    def settings(self) -> Settings:
        return self.services.settings


@contextlib.asynccontextmanager
async def serve(app: web.Application, port: int) -> AsyncIterator[None]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def run_broker(settings: Settings, *, dev_mode: bool) -> AsyncIterator[RunningBroker]:
    """Started services served on the port of `settings.server.public_url`."""
    url = settings.server.public_url
    port = int(url.rsplit(":", 1)[1])
    services = await start_broker(settings, dev_mode=dev_mode)
    try:
        async with serve(app_with_services(services), port):
            yield RunningBroker(services, url)
    finally:
        await services.close()


@dataclass
class Launcher:
    """A launcher-like OAuth client of the broker (code + PKCE S256 through authlib)."""

    url: str
    broker_url: str
    client_id: str = LAUNCHER_ID
    client_secret: str = LAUNCHER_SECRET
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    nonces: dict[str, str] = field(default_factory=dict)
    _pending: dict[str, tuple[str, str]] = field(default_factory=dict)
    _discovery: dict[str, Any] | None = None

    @property
    def redirect_uri(self) -> str:
        return f"{self.url}/callback"

    async def discovery(self) -> dict[str, Any]:
        if self._discovery is None:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{self.broker_url}/.well-known/openid-configuration") as resp,
            ):
                resp.raise_for_status()
                self._discovery = await resp.json()
        return self._discovery

    def _client(self, scope: str) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.client_id,
            client_secret=self.client_secret,
            scope=scope,
            redirect_uri=self.redirect_uri,
            code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_basic",
        )

    async def start(self, request: web.Request) -> web.StreamResponse:
        """GET /start[?idp=…&scope=…]: redirect the browser to the broker's authorize."""
        meta = await self.discovery()
        scope = request.query.get("scope", " ".join(LAUNCHER_SCOPES))
        state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        verifier = secrets.token_urlsafe(48)
        extra = {"idp": request.query["idp"]} if "idp" in request.query else {}
        async with self._client(scope) as client:
            url, _ = client.create_authorization_url(
                meta["authorization_endpoint"],
                state=state,
                code_verifier=verifier,
                nonce=nonce,
                **extra,
            )
        self._pending[state] = (verifier, scope)
        self.nonces[state] = nonce
        raise web.HTTPFound(url)

    async def callback(self, request: web.Request) -> web.StreamResponse:
        """GET /callback?code=…&state=…: exchange the code and keep the tokens."""
        state = request.query.get("state", "")
        pending = self._pending.pop(state, None)
        if pending is None:
            return web.Response(status=400, text="unknown state")
        if "error" in request.query:
            self.errors[state] = dict(request.query)
            return web.Response(status=400, text=f"sign-in failed: {request.query['error']}")
        verifier, scope = pending
        meta = await self.discovery()
        if request.query.get("iss") != meta["issuer"]:  # RFC 9207 mix-up defence
            return web.Response(status=400, text="wrong iss")
        async with self._client(scope) as client:
            token = await client.fetch_token(
                meta["token_endpoint"],
                authorization_response=str(request.url),
                state=state,
                code_verifier=verifier,
            )
        self.tokens[state] = dict(token)
        claims = jwt.decode(token["id_token"], options={"verify_signature": False})
        body = (
            '<!doctype html><html lang=en><title>Launcher</title><link rel=icon href="data:,">'
            "<h1>Signed in</h1>"
            f'<p id="who">{_esc(claims.get("name", claims.get("sub", "")))}</p>'
            f'<p id="state">{_esc(state)}</p>'
        )
        return web.Response(text=body, content_type="text/html")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/start", self.start)
        app.router.add_get("/callback", self.callback)
        return app


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


async def verify_broker_jwt(
    broker_url: str, token: str, *, audience: str | None, nonce: str | None = None
) -> dict[str, Any]:
    """The claims of a broker-signed JWT, checked against the broker's published JWKS."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{broker_url}/.well-known/openid-configuration") as resp:
            meta = await resp.json()
        async with http.get(meta["jwks_uri"]) as resp:
            jwks = await resp.json()
    header = jwt.get_unverified_header(token)
    keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(jwks).keys}
    key = keys[header["kid"]]
    options: jwt.types.Options = {
        "require": ["iss", "exp", "iat", "sub"],
        "verify_aud": audience is not None,
    }
    claims: dict[str, Any] = jwt.decode(
        token,
        key=key,
        algorithms=[header["alg"]],
        audience=audience,
        issuer=meta["issuer"],
        options=options,
    )
    if nonce is not None:
        assert claims.get("nonce") == nonce
    return claims


def as_list(value: Any) -> Sequence[str]:
    """A claim that may be a string or a list, as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


async def approve_consent(page: Page) -> None:
    """Press Allow on the broker's consent page."""
    await page.get_by_role("button", name="Allow").click()
