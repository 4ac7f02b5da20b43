"""Attacks on the SAML ACS, each of which must be refused with nothing issued (no session
cookie, no successful sign_in) and a `sign_in` audit record with outcome "rejected".

The signature-wrapping variants follow Somorovsky et al., "On Breaking SAML: Be Whoever You
Want to Be" (USENIX Security 2012), in the numbering SAML Raider uses. The attacker holds a
genuine response the IdP signed for them and rewrites the document around the signature so
that a naive SP verifies one element but reads another ("evil": another subject, an admin
group). A pysaml2 IdP (tests/peers/pysaml2_idp.py) signs the genuine responses.
"""

from __future__ import annotations

import base64
import copy
import datetime
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from lxml import etree

from adapters.base import Lifecycle
from adapters.upstream.saml import IS_MEMBER_OF, MAX_RESPONSE_B64, SUBJECT_ID
from adapters.vault import AppRoleAuth
from broker.app import app_with_services
from broker.devvault import DevVault
from broker.services import Services
from broker.sessions import SESSION_COOKIE
from tests.peers.broker import audit_events
from tests.peers.pysaml2_idp import (
    DEFAULT_USER,
    DS,
    SAML,
    SAMLP,
    KeyPair,
    Pysaml2Idp,
    StartedLogin,
    auto_post_form,
    decode_redirect_request,
    make_keypair,
    sign_tree,
    start_saml_broker,
    utc,
)

UPSTREAM = "federation"
EVIL_SUBJECT = "dean@campus.example.edu"
EVIL_GROUP = "campus.example.edu/admins"


@dataclass
class World:
    svc: Services
    client: TestClient[Any, Any]
    campus: Pysaml2Idp
    other: Pysaml2Idp
    attacker_key: KeyPair
    genuine: dict[str, str]  # the ACS form of a completed, legitimate sign-in

    @property
    def acs(self) -> str:
        return f"{self.svc.settings.server.public_url}/login/{UPSTREAM}/callback"

    @property
    def sp_entity_id(self) -> str:
        return f"{self.svc.settings.server.public_url}/login/{UPSTREAM}/metadata"

    async def begin(self) -> StartedLogin:
        async with self.client.get(
            "/login", params={"idp": UPSTREAM, "entity": self.campus.entity_id},
            allow_redirects=False,
        ) as response:  # fmt: skip
            assert response.status == 302, await response.text()
            return decode_redirect_request(response.headers["Location"])

    def response(self, started: StartedLogin, **kwargs: Any) -> etree._Element:
        """The IdP's genuine, unsigned answer to `started` (edit, then sign)."""
        kwargs.setdefault("in_response_to", started.request_id)
        kwargs.setdefault("destination", self.acs)
        kwargs.setdefault("audience", self.sp_entity_id)
        return self.campus.response_xml(**kwargs)

    def signed(self, started: StartedLogin, *, assertion: bool = True, response: bool = False,
               **kwargs: Any) -> etree._Element:  # fmt: skip
        xml = sign_tree(
            self.response(started, **kwargs), self.campus.key, assertion=assertion,
            response=response,
        )  # fmt: skip
        return etree.fromstring(xml)


@pytest_asyncio.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, openbao: DevVault, vault_approle: AppRoleAuth
) -> AsyncIterator[World]:
    workdir = tmp_path_factory.mktemp("saml-attacks")
    campus = Pysaml2Idp(workdir / "campus")
    other = Pysaml2Idp(workdir / "other", name="other", scopes=("other.example.org",))
    await campus.start()
    svc, _sp = await start_saml_broker(
        workdir, openbao.address, vault_approle, [campus, other], upstream_id=UPSTREAM
    )
    try:
        async with TestClient(TestServer(app_with_services(svc))) as client:
            world = World(svc, client, campus, other, make_keypair(workdir, "attacker"), {})
            world.genuine = await _genuine_sign_in(world)
            yield world
    finally:
        upstream = svc.upstreams[UPSTREAM]
        if isinstance(upstream, Lifecycle):
            await upstream.close()
        await svc.close()
        await campus.close()


async def _genuine_sign_in(world: World) -> dict[str, str]:
    import aiohttp

    started = await world.begin()
    async with aiohttp.ClientSession() as browser, browser.get(started.location) as answer:
        _action, fields = auto_post_form(await answer.text())
    async with world.client.post(
        f"/login/{UPSTREAM}/callback", data=fields, allow_redirects=False
    ) as response:
        assert response.status == 303, await response.text()
    world.client.session.cookie_jar.clear()
    return fields


# --- building blocks ----------------------------------------------------------------------


def _b64(xml: bytes) -> str:
    return base64.b64encode(xml).decode()


def _assertion(root: etree._Element) -> etree._Element:
    found = root.find(f"{{{SAML}}}Assertion")
    assert found is not None
    return found


def _signature(element: etree._Element) -> etree._Element:
    found = element.find(f"{{{DS}}}Signature")
    assert found is not None
    return found


def _evil(assertion: etree._Element, *, keep_signature: bool = False, new_id: bool = True
          ) -> etree._Element:  # fmt: skip
    """A copy of `assertion` claiming another subject and an admin group."""
    evil = copy.deepcopy(assertion)
    if new_id:
        evil.set("ID", f"id-evil-{secrets.token_hex(8)}")
    if not keep_signature:
        for signature in evil.findall(f"{{{DS}}}Signature"):
            evil.remove(signature)
    for attribute in evil.iter(f"{{{SAML}}}Attribute"):
        values = attribute.findall(f"{{{SAML}}}AttributeValue")
        if attribute.get("Name") == SUBJECT_ID:
            values[0].text = EVIL_SUBJECT
        elif attribute.get("Name") == IS_MEMBER_OF:
            values[0].text = EVIL_GROUP
    return evil


def _unsigned_copy(element: etree._Element) -> etree._Element:
    clone = copy.deepcopy(element)
    for signature in clone.findall(f"{{{DS}}}Signature"):
        clone.remove(signature)
    return clone


def _replace(old: etree._Element, new: etree._Element) -> None:
    parent = old.getparent()
    assert parent is not None
    parent.replace(old, new)


# --- the eight classic wrapping variants --------------------------------------------------


def xsw1(w: World, s: StartedLogin) -> str:
    """Response signed; the signed original Response moved into the evil Response's
    ds:Signature, which still references the original's ID."""
    original = w.signed(s, assertion=False, response=True)
    evil = copy.deepcopy(original)
    evil.set("ID", f"id-evil-{secrets.token_hex(8)}")
    _replace(_assertion(evil), _evil(_assertion(original)))
    _signature(evil).append(original)
    return _b64(etree.tostring(evil))


def xsw2(w: World, s: StartedLogin) -> str:
    """Response signed; the signed original Response placed just before the evil Response's
    (now detached) ds:Signature."""
    original = w.signed(s, assertion=False, response=True)
    evil = copy.deepcopy(original)
    evil.set("ID", f"id-evil-{secrets.token_hex(8)}")
    _replace(_assertion(evil), _evil(_assertion(original)))
    _signature(evil).addprevious(original)
    return _b64(etree.tostring(evil))


def xsw3(w: World, s: StartedLogin) -> str:
    """Assertion signed; an unsigned evil Assertion inserted before the signed original."""
    root = w.signed(s)
    _assertion(root).addprevious(_evil(_assertion(root)))
    return _b64(etree.tostring(root))


def xsw4(w: World, s: StartedLogin) -> str:
    """Assertion signed; the signed original wrapped inside an unsigned evil Assertion."""
    root = w.signed(s)
    original = _assertion(root)
    evil = _evil(original)
    _replace(original, evil)
    evil.append(original)
    return _b64(etree.tostring(root))


def xsw5(w: World, s: StartedLogin) -> str:
    """Assertion signed; the evil Assertion keeps the original Signature and an unsigned copy
    of the original (which the signature still matches) is appended to the Response."""
    root = w.signed(s)
    original = _assertion(root)
    _replace(original, _evil(original, keep_signature=True))
    root.append(_unsigned_copy(original))
    return _b64(etree.tostring(root))


def xsw6(w: World, s: StartedLogin) -> str:
    """Assertion signed; the evil Assertion keeps the Signature, and an unsigned copy of the
    original sits inside that Signature."""
    root = w.signed(s)
    original = _assertion(root)
    evil = _evil(original, keep_signature=True)
    _replace(original, evil)
    _signature(evil).append(_unsigned_copy(original))
    return _b64(etree.tostring(root))


def xsw7(w: World, s: StartedLogin) -> str:
    """Assertion signed; the signed original hidden in a samlp:Extensions element and an
    unsigned evil Assertion in its place."""
    root = w.signed(s)
    original = _assertion(root)
    _replace(original, _evil(original))
    extensions = etree.Element(f"{{{SAMLP}}}Extensions")
    extensions.append(original)
    root.find(f"{{{SAML}}}Issuer").addnext(extensions)  # type: ignore[union-attr]
    return _b64(etree.tostring(root))


def xsw8(w: World, s: StartedLogin) -> str:
    """Assertion signed; the evil Assertion keeps the Signature, which gains a ds:Object
    holding an unsigned copy of the original."""
    root = w.signed(s)
    original = _assertion(root)
    evil = _evil(original, keep_signature=True)
    _replace(original, evil)
    holder = etree.SubElement(_signature(evil), f"{{{DS}}}Object")
    holder.append(_unsigned_copy(original))
    return _b64(etree.tostring(root))


def xsw_same_id(w: World, s: StartedLogin) -> str:
    """Assertion signed; an evil Assertion carrying the signed one's ID (so a lookup by ID may
    find either) placed before it."""
    root = w.signed(s)
    _assertion(root).addprevious(_evil(_assertion(root), new_id=False))
    return _b64(etree.tostring(root))


def xsw_evil_content_kept_signature(w: World, s: StartedLogin) -> str:
    """Assertion signed; attributes edited in place under the original signature."""
    root = w.signed(s)
    _replace(_assertion(root), _evil(_assertion(root), keep_signature=True, new_id=False))
    return _b64(etree.tostring(root))


# --- other attacks --------------------------------------------------------------------------


def unsigned(w: World, s: StartedLogin) -> str:
    return _b64(etree.tostring(w.response(s)))


def encrypted_unsigned(w: World, s: StartedLogin) -> str:
    """Encryption is not authentication: anyone can encrypt to the SP's public certificate."""
    return _b64(
        w.campus.encrypted_response(
            in_response_to=s.request_id, destination=w.acs, audience=w.sp_entity_id
        )
    )


def foreign_key(w: World, s: StartedLogin) -> str:
    """Correct in every way but signed by a key the IdP's metadata does not list."""
    root = w.response(s)
    return _b64(sign_tree(root, w.attacker_key, assertion=True, response=True))


def other_audience(w: World, s: StartedLogin) -> str:
    """Genuinely signed by the IdP, but for another SP of the federation."""
    root = w.response(s)
    for audience in root.iter(f"{{{SAML}}}Audience"):
        audience.text = "https://other-sp.example.org/shibboleth"
    return _b64(sign_tree(root, w.campus.key))


def wrong_destination(w: World, s: StartedLogin) -> str:
    root = w.signed(s, destination="https://evil.example.org/acs", recipient=w.acs,
                    response=True)  # fmt: skip
    return _b64(etree.tostring(root))


def wrong_recipient(w: World, s: StartedLogin) -> str:
    return _b64(etree.tostring(w.signed(s, recipient="https://evil.example.org/acs")))


def _retimed(w: World, s: StartedLogin, shift: datetime.timedelta) -> str:
    root = w.response(s)
    for element in root.iter():
        for name in ("IssueInstant", "AuthnInstant"):
            if element.get(name):
                element.set(name, utc(shift))
        if element.get("NotBefore"):
            element.set("NotBefore", utc(shift))
        if element.get("NotOnOrAfter"):
            element.set("NotOnOrAfter", utc(shift + datetime.timedelta(minutes=5)))
    return _b64(sign_tree(root, w.campus.key))


def expired(w: World, s: StartedLogin) -> str:
    """Issued 20 minutes ago, valid for 5: far beyond the 60 s clock skew."""
    return _retimed(w, s, -datetime.timedelta(minutes=20))


def not_yet_valid(w: World, s: StartedLogin) -> str:
    """NotBefore 10 minutes in the future."""
    return _retimed(w, s, datetime.timedelta(minutes=10))


def replayed(w: World, s: StartedLogin) -> str:
    """The SAMLResponse of an earlier, completed sign-in, posted into a new one."""
    return w.genuine["SAMLResponse"]


def no_in_response_to(w: World, s: StartedLogin) -> str:
    """IdP-initiated (unsolicited) style: no InResponseTo anywhere."""
    return _b64(etree.tostring(w.signed(s, in_response_to=None)))


def in_response_to_no_request(w: World, s: StartedLogin) -> str:
    return _b64(etree.tostring(w.signed(s, in_response_to=f"id-{secrets.token_hex(10)}")))


def other_idp(w: World, s: StartedLogin) -> str:
    """A response from another IdP of the same federation (its own key, its own scope),
    answering the request this flow sent to the campus IdP."""
    root = w.other.response_xml(
        in_response_to=s.request_id, destination=w.acs, audience=w.sp_entity_id,
        attributes={"subject-id": ["x@other.example.org"], "isMemberOf": [EVIL_GROUP]},
    )  # fmt: skip
    return _b64(sign_tree(root, w.other.key, assertion=True, response=True))


def scope_spoof_affiliation(w: World, s: StartedLogin) -> str:
    attributes = {**DEFAULT_USER, "eduPersonScopedAffiliation": ["student@other.edu"]}
    return _b64(etree.tostring(w.signed(s, attributes=attributes)))


def scope_spoof_eppn(w: World, s: StartedLogin) -> str:
    attributes = {k: v for k, v in DEFAULT_USER.items() if k != "subject-id"}
    attributes["eduPersonPrincipalName"] = ["student@other.edu"]
    return _b64(etree.tostring(w.signed(s, attributes=attributes)))


def scope_spoof_subject_id(w: World, s: StartedLogin) -> str:
    attributes = {**DEFAULT_USER, "subject-id": ["dean@campus.example.edu.other.edu"]}
    return _b64(etree.tostring(w.signed(s, attributes=attributes)))


def xxe(w: World, s: StartedLogin) -> str:
    xml = etree.tostring(w.signed(s)).decode()
    xml = xml.replace(EVIL_SUBJECT, "&xxe;").replace(DEFAULT_USER["subject-id"][0], "&xxe;")
    doctype = '<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    return _b64(f"{doctype}{xml}".encode())


def billion_laughs(w: World, s: StartedLogin) -> str:
    entities = '<!ENTITY l0 "lol">' + "".join(
        f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";") * 10}">' for i in range(1, 10)
    )
    xml = etree.tostring(w.signed(s)).decode().replace(DEFAULT_USER["displayName"][0], "&l9;")
    return _b64(f"<!DOCTYPE r [{entities}]>{xml}".encode())


def oversized(w: World, s: StartedLogin) -> str:
    root = w.signed(s)
    padding = etree.SubElement(_assertion(root), f"{{{SAML}}}Advice")
    padding.text = "A" * (MAX_RESPONSE_B64)
    return _b64(etree.tostring(root))


def not_base64(w: World, s: StartedLogin) -> str:
    return "<samlp:Response>%%%</samlp:Response>"


@dataclass(frozen=True)
class Attack:
    craft: Callable[[World, StartedLogin], str]
    reason: str  # a fragment of the audit record's reason (the adapter's log_detail)
    relay_state: bool = True
    error: str = "access_denied"


ATTACKS = [
    pytest.param(Attack(xsw1, "2 Assertion"), id="xsw-1-response-in-signature"),
    pytest.param(Attack(xsw2, "2 Assertion"), id="xsw-2-response-before-signature"),
    pytest.param(Attack(xsw3, "Assertion"), id="xsw-3-evil-assertion-before-signed"),
    pytest.param(Attack(xsw4, "Assertion"), id="xsw-4-signed-assertion-wrapped-in-evil"),
    pytest.param(Attack(xsw5, "Assertion"), id="xsw-5-signed-copy-appended"),
    pytest.param(Attack(xsw6, "Assertion"), id="xsw-6-original-inside-signature"),
    pytest.param(Attack(xsw7, "Assertion"), id="xsw-7-original-in-extensions"),
    pytest.param(Attack(xsw8, "Assertion"), id="xsw-8-original-in-signature-object"),
    pytest.param(Attack(xsw_same_id, "duplicate ID"), id="xsw-evil-assertion-same-id"),
    pytest.param(
        Attack(xsw_evil_content_kept_signature, "signature"), id="xsw-edited-under-signature"
    ),
    pytest.param(Attack(unsigned, "signature missing"), id="unsigned-assertion"),
    pytest.param(Attack(encrypted_unsigned, "signature"), id="encrypted-unsigned-assertion"),
    pytest.param(Attack(foreign_key, "signature"), id="foreign-key"),
    pytest.param(Attack(other_audience, "audience"), id="other-audience"),
    pytest.param(Attack(wrong_destination, "Destination"), id="wrong-destination"),
    pytest.param(Attack(wrong_recipient, "Recipient"), id="wrong-recipient"),
    pytest.param(Attack(expired, "expired"), id="expired"),
    pytest.param(Attack(not_yet_valid, "not yet valid"), id="not-yet-valid"),
    pytest.param(Attack(replayed, "InResponseTo"), id="replayed-response"),
    pytest.param(Attack(no_in_response_to, "InResponseTo"), id="unsolicited-no-in-response-to"),
    pytest.param(
        Attack(no_in_response_to, "flow", relay_state=False, error="invalid_request"),
        id="unsolicited-no-relay-state",
    ),
    pytest.param(Attack(in_response_to_no_request, "InResponseTo"), id="in-response-to-unknown"),
    pytest.param(Attack(other_idp, "Issuer"), id="response-from-another-idp"),
    pytest.param(Attack(scope_spoof_affiliation, "other.edu"), id="scope-spoof-affiliation"),
    pytest.param(Attack(scope_spoof_eppn, "other.edu"), id="scope-spoof-eppn"),
    pytest.param(Attack(scope_spoof_subject_id, "other.edu"), id="scope-spoof-subject-id"),
    pytest.param(Attack(xxe, "DOCTYPE", error="invalid_request"), id="xxe"),
    pytest.param(Attack(billion_laughs, "DOCTYPE", error="invalid_request"), id="billion-laughs"),
    pytest.param(Attack(oversized, "base64 characters", error="invalid_request"), id="oversized"),
    pytest.param(Attack(not_base64, "base64", error="invalid_request"), id="not-base64"),
]


async def _post(world: World, fields: dict[str, str]) -> tuple[int, str, dict[str, str]]:
    async with world.client.post(
        f"/login/{UPSTREAM}/callback", data=fields, allow_redirects=False,
        headers={"Accept": "text/html"},
    ) as response:  # fmt: skip
        return (
            response.status,
            await response.text(),
            {k: v.value for k, v in response.cookies.items()},
        )


@pytest.mark.parametrize("attack", ATTACKS)
async def test_attack_is_refused_and_audited(world: World, attack: Attack) -> None:
    before = len(audit_events(world.svc, "sign_in"))
    started = await world.begin()
    fields = {"SAMLResponse": attack.craft(world, started)}
    if attack.relay_state:
        fields["RelayState"] = started.relay_state
    status, body, cookies = await _post(world, fields)

    assert 400 <= status < 500, body
    assert "request id" in body and "Traceback" not in body and "saml2." not in body
    assert SESSION_COOKIE not in cookies
    records = audit_events(world.svc, "sign_in")[before:]
    assert [r for r in records if r["outcome"] == "success"] == []
    rejected = [r for r in records if r["outcome"] == "rejected"]
    assert len(rejected) == 1, records
    assert rejected[0]["data"]["idp"] == UPSTREAM
    assert rejected[0]["data"]["error"] == attack.error
    assert attack.reason.lower() in rejected[0]["data"]["reason"].lower(), rejected[0]
    world.client.session.cookie_jar.clear()


async def test_same_response_twice_in_one_flow_hits_the_replay_cache(world: World) -> None:
    """The broker's flow is single-use; below it, the adapter refuses an assertion id it has
    seen, whichever flow it comes in (checked on the adapter, as a second broker replica
    sharing the cache would see it)."""
    from adapters.base import LoginFlow
    from adapters.errors import AccessDenied

    started = await world.begin()
    xml = sign_tree(world.response(started), world.campus.key)
    upstream: Any = world.svc.upstreams[UPSTREAM]
    flow = LoginFlow(
        id=started.relay_state, upstream=UPSTREAM, callback_url=world.acs, next_url="/",
        idp_hint=world.campus.entity_id,
    )  # fmt: skip
    params = {"SAMLResponse": _b64(xml), "RelayState": started.relay_state}
    # A second replica: the request record is still there when the replay arrives.
    pending = await world.svc.cache.get(f"{UPSTREAM}:req:{flow.id}")
    assert pending is not None
    principal = await upstream.complete(flow, params)
    assert principal.subject == DEFAULT_USER["subject-id"][0]
    await world.svc.cache.set(f"{UPSTREAM}:req:{flow.id}", pending, 60)
    with pytest.raises(AccessDenied) as refused:
        await upstream.complete(flow, params)
    assert "replay" in refused.value.log_detail
    world.client.session.cookie_jar.clear()


def test_attack_table_names_every_variant() -> None:
    ids = {p.id for p in ATTACKS}
    assert {f"xsw-{n}" for n in range(1, 9)} <= {i[:5] for i in ids if i}


XSW = [p for p in ATTACKS if str(p.id).startswith("xsw-")]


@pytest.mark.parametrize("attack", XSW)
async def test_pysaml2_layer_alone_also_refuses_wrapping(world: World, attack: Attack) -> None:
    """Defence in depth: with the adapter's own structure rules skipped, pysaml2 (signature
    profile checks, schema validation, xmlsec1 with metadata keys only) still refuses."""
    from adapters.errors import AccessDenied
    from adapters.upstream.saml import _Pending

    started = await world.begin()
    document = base64.b64decode(attack.craft(world, started))
    upstream: Any = world.svc.upstreams[UPSTREAM]
    entity = await upstream._store.lookup(world.campus.entity_id)
    client = await upstream._client(entity)
    pending = _Pending(started.request_id, world.campus.entity_id)
    with pytest.raises(AccessDenied) as refused:
        await upstream._pysaml2_verify(client, document, pending)
    assert refused.value.log_detail.startswith("pysaml2")
    world.client.session.cookie_jar.clear()
