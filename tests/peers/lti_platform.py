"""An LTI 1.3 platform (a course LMS) on loopback, built on the PyPI `lti1p3platform` library:
tool registration, the OIDC login initiation, the launch message and its RS256 signature, the
client-credentials token endpoint (it verifies the tool's JWT assertion against the tool's
JWKS), the NRPS membership service and the Deep Linking response check all come from it.

The platform is stricter than the library where the IMS specs ask a platform to be
(Security Framework 1.0 §4.1, §5.1.1; Deep Linking 2.0 §4.2): the authentication request must
carry `response_type=id_token`, `response_mode=form_post`, `scope=openid`, `prompt=none`
and the registered `redirect_uri`; a client assertion must have `sub` = client id,
`aud` = the token URL and a fresh `jti`; a Deep Linking response must have `iss` = client id,
`aud` = the platform issuer, the deployment id and a nonce.

Each platform runs an aiohttp server on its own thread and event loop: the library is
synchronous (it fetches the tool's JWKS with `requests`) and the tool under test is served by
the test's loop.

- `lti_platforms` (session fixture): `lti_platforms.start()` starts a platform (its own RSA
  key and issuer); all are stopped at the end of the session.
- `LtiPlatform.register_tool(...)` sets the tool's URLs; `launch(...)` returns the platform
  URL at which a user's launch begins (what clicking a link in the course does), with a
  `Scenario` saying who, where, which message, and optionally how to tamper with the token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from lti1p3platform.ltiplatform import LTI1P3PlatformConfAbstract
from lti1p3platform.membership import Context
from lti1p3platform.message_launch import LTIAdvantageMessageLaunchAbstract
from lti1p3platform.oidc_login import OIDCLoginAbstract
from lti1p3platform.registration import Registration
from lti1p3platform.request import Request, TRequest
from lti1p3platform.service_connector import NamesRoleProvisioningService, TPage

LEARNER = "http://purl.imsglobal.org/vocab/lis/v2/membership#Learner"
INSTRUCTOR = "http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor"
TEACHING_ASSISTANT = (
    "http://purl.imsglobal.org/vocab/lis/v2/membership/Instructor#TeachingAssistant"
)
STUDENT = "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Student"
CLAIM = "https://purl.imsglobal.org/spec/lti/claim/"
DL_DATA = "platform-data-7f3a"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rsa_pem_pair() -> tuple[str, str]:
    """(private PEM, public PEM) of a fresh RSA-2048 key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@dataclass
class Scenario:
    """One launch: who, in which course, which message, and what (if anything) to tamper."""

    user_id: str
    roles: list[str]
    name: str = ""
    email: str = ""
    context_id: str | None = "course-101"
    context_title: str = "Data Science 101"
    deep_linking: bool = False
    target: str | None = None  # resource links: the target link URI (default: the first)
    resource_link_id: str = "link-1"
    custom: dict[str, str] = field(default_factory=dict)
    nrps: bool = True
    # Applied to the claims of the signed launch message; the result is signed again with
    # `sign_with` (private PEM, kid) or the platform's own key. `alg_none` sends it unsigned.
    tamper: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    sign_with: tuple[str, str] | None = None
    alg_none: bool = False


@dataclass
class Member:
    user_id: str
    name: str
    roles: list[str]
    email: str = ""


class _Config(LTI1P3PlatformConfAbstract):
    """The platform's one tool registration."""

    def init_platform_config(self, **kwargs: Any) -> None:
        self.registration: Registration = kwargs["registration"]

    def get_registration_by_params(self, **kwargs: Any) -> Registration:
        return self.registration


class _AioRequest(Request):
    def build_metadata(self, request: Any) -> TRequest:
        method, query, form, headers, path = request
        return {
            "method": method,
            "form_data": form,
            "get_data": query,
            "headers": headers,
            "content_type": headers.get("Content-Type"),
            "path": path,
            "json": None,
        }


class _Login(OIDCLoginAbstract):
    def set_lti_message_hint(self, **kwargs: Any) -> None:
        self._lti_message_hint = kwargs["hint"]

    def get_redirect(self, url: str) -> str:
        return url


class _Launch(LTIAdvantageMessageLaunchAbstract):
    scenario: Scenario
    platform: LtiPlatform

    def prepare_launch(self, preflight_response: dict[str, Any]) -> None:
        s = self.scenario
        self.set_user_data(
            s.user_id, s.roles, full_name=s.name or None, email_address=s.email or None
        )
        if s.context_id is not None:
            self.set_launch_context_claim(s.context_id, context_title=s.context_title)
        if s.custom:
            self.set_custom_parameters_claim(dict(s.custom))
        if s.nrps and s.context_id is not None:
            self.set_nrps(f"{self.platform.url}/nrps/{s.context_id}")
        if s.deep_linking:
            self.set_dl(
                f"{self.platform.url}/deep_link_return",
                title="Add a notebook",
                accept_types={"ltiResourceLink"},
                extra_data=DL_DATA,  # type: ignore[arg-type]  (DL 2.0: an opaque string)
            )
        else:
            self.set_resource_link_claim(s.resource_link_id, title="Week 1 notebook")
            self.set_launch_url(s.target or self.platform.targets[0])

    def render_launch_form(self, launch_data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return launch_data


class _Nrps(NamesRoleProvisioningService):
    context_id: str
    platform: LtiPlatform

    def get_member_data_page(
        self,
        page: int = 1,
        limit: int | None = None,
        role: str | None = None,
        since: str | None = None,
    ) -> TPage:
        members = [
            {"user_id": m.user_id, "name": m.name, "email": m.email, "roles": m.roles}
            for m in self.platform.roster.get(self.context_id, [])
        ]
        return {"content": members, "has_next": False, "next": None}

    def get_context_by_id(self) -> Context:
        return Context(id=self.context_id, label=self.context_id, title="Data Science 101")


class LtiPlatform:
    """One platform with one tool registration (see the module docstring)."""

    def __init__(self, name: str, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        # `host="localhost"` puts the platform on another site than a broker on 127.0.0.1, so
        # a browser treats its form post to the broker as cross-site.
        self.url = f"http://{host}:{self.port}"
        self.name = name
        self.issuer = f"{self.url}/{name}"
        self.client_id = f"broker-at-{name}"
        self.deployment_id = f"deployment-{name}-1"
        self.private_pem, self.public_pem = rsa_pem_pair()
        self.registration = (
            Registration()
            .set_iss(self.issuer)
            .set_client_id(self.client_id)
            .set_deployment_id(self.deployment_id)
            .set_platform_private_key(self.private_pem)
            .set_platform_public_key(self.public_pem)
        )
        self.kid = self.registration.get_kid() or ""
        self.config = _Config(registration=self.registration)
        self.targets: list[str] = []
        self.scenarios: dict[str, Scenario] = {}
        self.roster: dict[str, list[Member]] = {}
        self.auth_requests: list[dict[str, str]] = []
        self.id_tokens: list[str] = []
        self.token_requests: list[dict[str, Any]] = []
        self.deep_link_items: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._jtis: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- configuration -------------------------------------------------------------------

    @property
    def auth_login_url(self) -> str:
        return f"{self.url}/auth"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks"

    def register_tool(
        self, *, login_url: str, launch_url: str, jwks_url: str, targets: list[str]
    ) -> None:
        """The tool's registration at this platform, as an LMS admin enters it."""
        self.registration.set_oidc_login_url(login_url)
        self.registration.set_deeplink_launch_url(launch_url)
        self.registration.set_launch_url(targets[0])
        self.registration.set_tool_key_set_url(jwks_url)
        self.registration._tool_keyset = None  # refetch for a new tool
        self.tool_launch_url = launch_url
        self.targets = list(targets)

    def upstream(self, id: str, **extra: Any) -> dict[str, Any]:
        """The broker's `[[upstreams]]` entry for this platform."""
        return {
            "type": "lti", "id": id, "display_name": f"Course platform {self.name}",
            "issuer": self.issuer, "client_id": self.client_id,
            "deployment_ids": [self.deployment_id], "jwks_url": self.jwks_url,
            "auth_login_url": self.auth_login_url, "token_url": self.token_url,
            "targets": [
                {"url": u, "title": f"Notebook {n}"} for n, u in enumerate(self.targets, 1)
            ],
        } | extra  # fmt: skip

    def launch(self, scenario: Scenario) -> str:
        """The platform URL at which this launch begins."""
        hint = secrets.token_urlsafe(12)
        self.scenarios[hint] = scenario
        return f"{self.url}/start/{hint}"

    def sign(
        self, claims: dict[str, Any], private_pem: str | None = None, kid: str | None = None
    ) -> str:
        return jwt.encode(
            claims, private_pem or self.private_pem, algorithm="RS256",
            headers={"kid": kid or self.kid},
        )  # fmt: skip

    # -- handlers ------------------------------------------------------------------------

    async def jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self.config.get_jwks())

    async def start(self, request: web.Request) -> web.Response:
        hint = request.match_info["hint"]
        scenario = self.scenarios[hint]
        login = _Login(None, self.config)
        login.set_lti_message_hint(hint=hint)
        if scenario.deep_linking:
            login.set_deeplinking_launch_url()
        else:
            login.set_launch_url(scenario.target or self.targets[0])
        raise web.HTTPFound(login.initiate_login(scenario.user_id))

    async def auth(self, request: web.Request) -> web.Response:
        """The OIDC authorization endpoint: answers with an auto-posting launch form."""
        query = dict(request.query)
        self.auth_requests.append(query)
        expected = {
            "response_type": "id_token",
            "response_mode": "form_post",
            "scope": "openid",
            "prompt": "none",
            "redirect_uri": self.tool_launch_url,
        }
        wrong = [k for k, v in expected.items() if query.get(k) != v]
        scenario = self.scenarios.get(query.get("lti_message_hint", ""))
        if wrong or scenario is None or query.get("login_hint") != scenario.user_id:
            self.errors.append(f"bad authentication request: {wrong}")
            return web.Response(status=400, text=f"invalid_request: {wrong}")
        launch = _Launch(
            _AioRequest(("GET", query, {}, request.headers, request.path)), self.config
        )
        launch.scenario = scenario
        launch.platform = self
        data: dict[str, Any] = launch.lti_launch()
        id_token = self._tampered(data["id_token"], scenario)
        self.id_tokens.append(id_token)
        page = (
            "<!doctype html><html lang=en><title>Launching</title>"
            f'<form method="post" action="{html.escape(data["launch_url"])}" id="launch">'
            f'<input type="hidden" name="id_token" value="{html.escape(id_token)}">'
            f'<input type="hidden" name="state" value="{html.escape(data["state"])}">'
            "<noscript><button>Continue</button></noscript></form>"
            "<script>document.getElementById('launch').submit()</script>"
        )
        return web.Response(text=page, content_type="text/html")

    def _tampered(self, id_token: str, scenario: Scenario) -> str:
        if scenario.tamper is None and scenario.sign_with is None and not scenario.alg_none:
            return id_token
        claims = jwt.decode(id_token, options={"verify_signature": False})
        if scenario.tamper is not None:
            claims = scenario.tamper(claims)
        if scenario.alg_none:
            header = {"alg": "none", "typ": "JWT", "kid": self.kid}
            part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
            return f"{part(header)}.{part(claims)}."
        pem, kid = scenario.sign_with or (self.private_pem, self.kid)
        return self.sign(claims, pem, kid)

    async def token(self, request: web.Request) -> web.Response:
        """Client credentials with a JWT assertion (Security Framework §4.1)."""
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.token_requests.append(form)
        try:
            if form.get("client_assertion_type") != ASSERTION_TYPE:
                raise ValueError("client_assertion_type")
            response = self.config.get_access_token(form)  # verifies the signature (tool JWKS)
            claims = jwt.decode(form["client_assertion"], options={"verify_signature": False})
            if claims.get("sub") != self.client_id or claims.get("aud") != self.token_url:
                raise ValueError(f"sub/aud {claims.get('sub')!r} {claims.get('aud')!r}")
            if (
                not claims.get("jti")
                or claims["jti"] in self._jtis
                or claims.get("exp", 0) < time.time()
            ):
                raise ValueError("jti/exp")
            self._jtis.add(claims["jti"])
        except Exception as error:  # the library raises bare exceptions of several kinds
            self.errors.append(f"token: {type(error).__name__}: {error}")
            return web.json_response({"error": "invalid_client"}, status=401)
        return web.json_response(dict(response))

    async def nrps(self, request: web.Request) -> web.Response:
        context = request.match_info["context"]
        req = _AioRequest(("GET", dict(request.query), {}, request.headers, request.path))
        service = _Nrps(req, self.config, f"{self.url}/nrps/{context}")
        service.context_id = context
        service.platform = self
        try:
            result = service.handle_resp(service.handle_get_members)
        except Exception as error:  # an unverifiable token makes the library raise
            self.errors.append(f"nrps: {type(error).__name__}: {error}")
            return web.json_response({"error": "invalid_token"}, status=401)
        if result.code != 200:
            return web.json_response({"error": result.message}, status=result.code)
        return web.Response(
            text=json.dumps(result.result), content_type=result.media_type.split(";")[0]
        )

    async def deep_link_return(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        try:
            items = self.config.validate_deeplinking_resp(form)  # verifies the signature
            claims = jwt.decode(form["JWT"], options={"verify_signature": False})
            if claims.get("iss") != self.client_id or claims.get("aud") != self.issuer:
                raise ValueError("iss/aud")
            if claims.get(CLAIM + "deployment_id") != self.deployment_id or not claims.get("nonce"):
                raise ValueError("deployment_id/nonce")
            data = claims.get("https://purl.imsglobal.org/spec/lti-dl/claim/data")
            if data != DL_DATA:
                raise ValueError("data not returned")
        except Exception as error:
            self.errors.append(f"deep link: {type(error).__name__}: {error}")
            return web.Response(status=400, text="invalid deep linking response")
        self.deep_link_items.extend(items)
        titles = ", ".join(html.escape(str(i.get("title", ""))) for i in items)
        return web.Response(
            text="<!doctype html><html lang=en><title>Course</title><h1>Link placed</h1>"
            f"<p id=items>{titles}</p>",
            content_type="text/html",
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks", self.jwks)
        app.router.add_get("/start/{hint}", self.start)
        app.router.add_get("/auth", self.auth)
        app.router.add_post("/token", self.token)
        app.router.add_get("/nrps/{context}", self.nrps)
        app.router.add_post("/deep_link_return", self.deep_link_return)
        return app

    # -- lifetime ------------------------------------------------------------------------

    def serve(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(self.app(), access_log=None)
            try:
                loop.run_until_complete(runner.setup())
                loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            except BaseException as error:
                failure.append(error)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"lti-platform-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None


class LtiPlatforms:
    """Starts platforms on demand; stops them all at the end."""

    def __init__(self) -> None:
        self.started: list[LtiPlatform] = []

    def start(self, name: str | None = None, host: str = "127.0.0.1") -> LtiPlatform:
        platform = LtiPlatform(name or f"lms{len(self.started) + 1}", host)
        platform.serve()
        self.started.append(platform)
        return platform

    def stop_all(self) -> None:
        for platform in self.started:
            platform.stop()


@pytest.fixture(scope="session")
def lti_platforms() -> Iterator[LtiPlatforms]:
    platforms = LtiPlatforms()
    try:
        yield platforms
    finally:
        platforms.stop_all()


def launch_form(page: str) -> tuple[str, dict[str, str]]:
    """(action, fields) of an auto-posting form page (platform's or broker's)."""
    import re

    action = re.search(r'<form method="post" action="([^"]+)"', page)
    assert action is not None, page[:500]
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))
    return html.unescape(action.group(1)), {k: html.unescape(v) for k, v in fields.items()}


# -- the broker as the platforms' tool, and a browser between them ---------------------------


@dataclass
class LtiTool:
    """A broker serving LTI on a real loopback port (platforms fetch its JWKS)."""

    services: Any  # broker.services.Services
    url: str
    client: Any  # tests.peers.broker.ContractClient; its cookie jar is the browser's


@pytest_asyncio.fixture(scope="module")
async def lti_vault() -> AsyncIterator[tuple[Any, Any]]:
    """A private OpenBao for a module of LTI tests: its key ring starts as RS256, the only
    algorithm LTI platforms verify tool messages with (the shared server's ring is ES256)."""
    from broker.devvault import DevVault, provision

    vault = await DevVault.start()
    try:
        yield vault, await provision(vault.address, vault.root_token)
    finally:
        vault.stop()


@contextlib.asynccontextmanager
async def run_lti_tool(
    workdir: Any, vault: tuple[Any, Any], platforms: dict[str, LtiPlatform], targets: list[str]
) -> AsyncIterator[LtiTool]:
    """A broker registered as the tool of each platform (`platforms` by upstream id)."""
    from aiohttp.test_utils import TestClient, TestServer

    from broker.app import app_with_services
    from tests.peers.broker import ContractClient, make_settings, start_broker

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for upstream, platform in platforms.items():
        platform.register_tool(
            login_url=f"{url}/lti/{upstream}/login",
            launch_url=f"{url}/lti/{upstream}/launch",
            jwks_url=f"{url}/lti/jwks",
            targets=targets,
        )
    dev_vault, approle = vault
    settings = make_settings(
        workdir, dev_vault.address, approle, mode="production",
        server={"public_url": url, "cookie_secure": False}, keys={"algorithm": "RS256"},
        upstreams=[p.upstream(upstream) for upstream, p in platforms.items()],
    )  # fmt: skip
    services = await start_broker(settings, dev_mode=False)
    try:
        server = TestServer(app_with_services(services), host="127.0.0.1", port=port)
        async with TestClient(server) as raw:
            yield LtiTool(services, url, ContractClient(raw))
    finally:
        await services.close()


async def launch_through(
    tool: LtiTool,
    platform: LtiPlatform,
    scenario: Scenario,
    *,
    cross_site: bool = True,
    id_token: str | None = None,
) -> Any:
    """Click the platform's link and follow the protocol as a browser would; the broker's
    answer to the launch (a `Checked`). The platform's form post reaches the broker without
    the broker's cookies when `cross_site` (a real browser's SameSite=Lax behaviour), so the
    broker's hand-off is followed. `id_token` replaces the one the platform posts."""
    from urllib.parse import urlsplit

    import aiohttp

    from tests.peers.broker import Checked

    async with aiohttp.ClientSession() as http:
        async with http.get(platform.launch(scenario), allow_redirects=False) as start:
            assert start.status == 302, await start.text()
            login = urlsplit(start.headers["Location"])
        step = await tool.client.get(f"{login.path}?{login.query}", headers={"Accept": "text/html"})
        if step.status != 302:
            return step
        async with http.get(step.headers["Location"], allow_redirects=False) as auth:
            assert auth.status == 200, await auth.text()
            action, fields = launch_form(await auth.text())
        if id_token is not None:
            fields["id_token"] = id_token
        path = urlsplit(action).path
        if not cross_site:
            return await tool.client.post(path, data=fields, headers={"Accept": "text/html"})
        async with http.post(action, data=fields, allow_redirects=False) as posted:
            if posted.status != 303:
                cookies = {k: v.value for k, v in posted.cookies.items()}
                body = await posted.read()
                return Checked(posted.status, dict(posted.headers), body, cookies)
            handoff = posted.headers["Location"]
        return await tool.client.get(handoff, headers={"Accept": "text/html"})
