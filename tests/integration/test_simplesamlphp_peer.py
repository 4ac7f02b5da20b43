"""The SimpleSAMLphp IdP peer on its own, driven by a test-side pysaml2 SP (not the broker).

Each sign-in is the real browser path over HTTP: a (signed) AuthnRequest on the Redirect
binding, SimpleSAMLphp's login form, and the auto-POST form that carries the SAMLResponse to
the SP's ACS URL. pysaml2 then checks the response against the IdP's own metadata, and xmlsec1
checks the assertion signature against the IdP certificate independently.
"""

from __future__ import annotations

import base64
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx2
import pytest
from lxml import etree
from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
from saml2.client import Saml2Client
from saml2.config import SPConfig
from saml2.response import AuthnResponse
from saml2.saml import NAMEID_FORMAT_TRANSIENT
from saml2.xmldsig import SIG_RSA_SHA256

from tests.peers.simplesamlphp import (
    ATTR_EPPN,
    ATTR_SCOPED_AFFILIATION,
    DEFAULT_USERS,
    IDP_SCOPE,
    NAMEFORMAT_URI,
    SamlUser,
    SimpleSamlIdp,
    make_self_signed_cert,
    start_simplesamlphp,
)

SP_ENTITY_ID = "https://broker.test.example/saml/metadata"
# Never connected to: the test reads the auto-POST form the IdP addresses to it.
SP_ACS_URL = "https://broker.test.example/login/campus/callback"
RELAY_STATE = "relay-7f3a"
NS = {
    "md": "urn:oasis:names:tc:SAML:2.0:metadata",
    "shibmd": "urn:mace:shibboleth:metadata:1.0",
    "samlp": "urn:oasis:names:tc:SAML:2.0:protocol",
    "saml": "urn:oasis:names:tc:SAML:2.0:assertion",
    "ds": "http://www.w3.org/2000/09/xmldsig#",
}
MAX_HOPS = 10


@dataclass(frozen=True)
class SpKeys:
    cert_pem: str
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class Form:
    action: str
    fields: dict[str, str]


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(Form(a.get("action", ""), {}))
        elif tag == "input" and self.forms and "name" in a:
            self.forms[-1].fields[a["name"]] = a.get("value", "")


def parse_forms(html: str) -> list[Form]:
    parser = _FormParser()
    parser.feed(html)
    return parser.forms


@pytest.fixture(scope="module")
def sp_keys(tmp_path_factory: pytest.TempPathFactory) -> SpKeys:
    cert_pem, key_pem = make_self_signed_cert("test-sp")
    d = tmp_path_factory.mktemp("saml-sp")
    (d / "sp.crt").write_text(cert_pem)
    (d / "sp.key").write_text(key_pem)
    return SpKeys(cert_pem, d / "sp.crt", d / "sp.key")


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory, sp_keys: SpKeys) -> Iterator[SimpleSamlIdp]:
    """The default peer: signed assertions, unsigned response, signed AuthnRequests required."""
    with start_simplesamlphp(
        tmp_path_factory.mktemp("simplesamlphp"),
        sp_entity_id=SP_ENTITY_ID,
        sp_acs_url=SP_ACS_URL,
        sp_cert_pem=sp_keys.cert_pem,
    ) as server:
        yield server


def make_sp(idp: SimpleSamlIdp, keys: SpKeys) -> Saml2Client:
    """A pysaml2 SP that trusts exactly the metadata SimpleSAMLphp serves."""
    config: dict[str, Any] = {
        "entityid": SP_ENTITY_ID,
        "key_file": str(keys.key_file),
        "cert_file": str(keys.cert_file),
        "encryption_keypairs": [{"key_file": str(keys.key_file), "cert_file": str(keys.cert_file)}],
        "xmlsec_binary": "/usr/bin/xmlsec1",
        "metadata": {"inline": [idp.metadata_xml().decode()]},
        "allow_unknown_attributes": True,
        "service": {
            "sp": {
                "endpoints": {"assertion_consumer_service": [(SP_ACS_URL, BINDING_HTTP_POST)]},
                "authn_requests_signed": True,
                "want_assertions_signed": True,
                "want_response_signed": False,
                "allow_unsolicited": False,
                "name_id_format": NAMEID_FORMAT_TRANSIENT,
            }
        },
    }
    sp_config = SPConfig()
    sp_config.load(config)
    return Saml2Client(config=sp_config)


def authn_request_url(sp: Saml2Client, idp: SimpleSamlIdp, *, sign: bool) -> tuple[str, str]:
    """(request id, IdP URL) for an AuthnRequest on the Redirect binding."""
    request_id, info = sp.prepare_for_authenticate(
        entityid=idp.entity_id,
        relay_state=RELAY_STATE,
        binding=BINDING_HTTP_REDIRECT,
        sign=sign,
        sigalg=SIG_RSA_SHA256 if sign else None,
    )
    location = dict(info["headers"])["Location"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
    assert ("Signature" in query) is sign
    return str(request_id), str(location)


def follow(http: httpx2.Client, response: httpx2.Response) -> httpx2.Response:
    for _ in range(MAX_HOPS):
        if not response.is_redirect:
            return response
        response = http.get(response.headers["location"])
    raise AssertionError("too many redirects")


def sign_in(http: httpx2.Client, url: str, user: str, password: str) -> httpx2.Response:
    """Follow `url` to SimpleSAMLphp's login form, submit it, and return the page after it."""
    page = follow(http, http.get(url))
    assert page.status_code == 200, page.text[:500]
    assert "/module.php/core/loginuserpass.php" in str(page.url)
    (form,) = [f for f in parse_forms(page.text) if "AuthState" in f.fields]
    assert {"username", "password"} <= form.fields.keys()
    fields = {**form.fields, "username": user, "password": password}
    return follow(http, http.post(page.url.join(form.action), data=fields))


def saml_post_form(page: httpx2.Response) -> Form:
    """The auto-POST form carrying the SAMLResponse, as SimpleSAMLphp renders it."""
    assert page.status_code == 200, page.text[:500]
    forms = [f for f in parse_forms(page.text) if "SAMLResponse" in f.fields]
    assert len(forms) == 1, page.text[:500]
    return forms[0]


def verify_with_xmlsec1(
    xml: bytes, cert_pem: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """xmlsec1's own verdict on the assertion's enveloped signature with `cert_pem` only."""
    doc, cert = tmp_path / "assertion.xml", tmp_path / "idp.crt"
    doc.write_bytes(xml)
    cert.write_text(cert_pem)
    return subprocess.run(
        [
            "xmlsec1",
            "--verify",
            "--pubkey-cert-pem",
            str(cert),
            "--id-attr:ID",
            "urn:oasis:names:tc:SAML:2.0:assertion:Assertion",
            "--node-xpath",
            "/*[local-name()='Response']/*[local-name()='Assertion']/*[local-name()='Signature']",
            str(doc),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def raw_attributes(response: AuthnResponse) -> dict[str, tuple[str | None, list[str]]]:
    """Attribute name -> (NameFormat, values) exactly as asserted."""
    out: dict[str, tuple[str | None, list[str]]] = {}
    for statement in response.assertion.attribute_statement:
        for attribute in statement.attribute:
            values = [v.text for v in attribute.attribute_value]
            out[attribute.name] = (attribute.name_format, values)
    return out


def expected_attributes(user: SamlUser) -> dict[str, tuple[str | None, list[str]]]:
    return {name: (NAMEFORMAT_URI, values) for name, values in user.attributes.items()}


def test_metadata_is_simplesamlphps_own_with_scope(idp: SimpleSamlIdp) -> None:
    root = etree.fromstring(idp.metadata_xml())
    assert root.get("entityID") == idp.entity_id
    (descriptor,) = root.findall("md:IDPSSODescriptor", NS)
    assert descriptor.get("WantAuthnRequestsSigned") == "true"
    scopes = descriptor.findall("md:Extensions/shibmd:Scope", NS)
    assert [(s.text, s.get("regexp")) for s in scopes] == [(IDP_SCOPE, "false")]
    published = descriptor.findall(
        "md:KeyDescriptor[@use='signing']/ds:KeyInfo/ds:X509Data/ds:X509Certificate", NS
    )
    pem_body = "".join(idp.signing_cert_pem.strip().splitlines()[1:-1])
    assert [c.text for c in published] == [pem_body]
    sso = descriptor.findall("md:SingleSignOnService", NS)
    assert {(s.get("Binding"), s.get("Location")) for s in sso} >= {
        (BINDING_HTTP_REDIRECT, idp.sso_url)
    }


@pytest.mark.parametrize("user", DEFAULT_USERS, ids=lambda u: u.username)
def test_signed_authn_request_signs_in_with_attributes(
    idp: SimpleSamlIdp, sp_keys: SpKeys, user: SamlUser, tmp_path: Path
) -> None:
    sp = make_sp(idp, sp_keys)
    request_id, url = authn_request_url(sp, idp, sign=True)
    with httpx2.Client(timeout=20) as http:
        form = saml_post_form(sign_in(http, url, user.username, user.password))
    assert form.action == SP_ACS_URL
    assert form.fields["RelayState"] == RELAY_STATE

    response = sp.parse_authn_request_response(
        form.fields["SAMLResponse"], BINDING_HTTP_POST, outstanding={request_id: "/"}
    )
    assert response is not None
    assert response.in_response_to == request_id
    assert response.issuer() == idp.entity_id
    assert response.response.signature is None  # sign_response=False
    assert response.assertion.signature is not None
    assert response.assertion.subject.name_id.format == NAMEID_FORMAT_TRANSIENT
    assert raw_attributes(response) == expected_attributes(user)
    # pysaml2's own attribute map knows the urn:oid names.
    assert response.ava["eduPersonPrincipalName"] == user.attributes[ATTR_EPPN]
    assert response.ava["eduPersonScopedAffiliation"] == user.attributes[ATTR_SCOPED_AFFILIATION]

    xml = base64.b64decode(form.fields["SAMLResponse"])
    assert verify_with_xmlsec1(xml, idp.signing_cert_pem, tmp_path).returncode == 0
    other_cert, _ = make_self_signed_cert("not-the-idp")
    assert verify_with_xmlsec1(xml, other_cert, tmp_path).returncode != 0


def test_wrong_password_gets_no_response(idp: SimpleSamlIdp, sp_keys: SpKeys) -> None:
    sp = make_sp(idp, sp_keys)
    _, url = authn_request_url(sp, idp, sign=True)
    with httpx2.Client(timeout=20) as http:
        page = sign_in(http, url, "student", "not-the-password")
    assert page.status_code == 200
    assert "SAMLResponse" not in page.text
    # The login form again, with SimpleSAMLphp's wrong-credentials error.
    assert any("AuthState" in f.fields for f in parse_forms(page.text))
    assert re.search(r"(?i)incorrect username or password", page.text)


@pytest.mark.parametrize(
    ("signer", "error"),
    [
        pytest.param(None, "no signature found on message", id="unsigned"),
        pytest.param(
            "other-key", "Unable to validate signature on query string", id="signed-by-another-key"
        ),
    ],
)
def test_authn_request_without_the_sp_signature_is_refused(
    idp: SimpleSamlIdp, sp_keys: SpKeys, tmp_path: Path, signer: str | None, error: str
) -> None:
    keys = sp_keys
    if signer is not None:
        cert_pem, key_pem = make_self_signed_cert(signer)
        (tmp_path / "sp.crt").write_text(cert_pem)
        (tmp_path / "sp.key").write_text(key_pem)
        keys = SpKeys(cert_pem, tmp_path / "sp.crt", tmp_path / "sp.key")
    sp = make_sp(idp, keys)
    _, url = authn_request_url(sp, idp, sign=signer is not None)
    with httpx2.Client(timeout=20) as http:
        page = follow(http, http.get(url))
    # SimpleSAMLphp 1.19 renders its error page with status 200.
    assert "Unhandled exception" in page.text
    assert error in page.text
    assert "SAMLResponse" not in page.text
    assert not any("AuthState" in f.fields for f in parse_forms(page.text))
    assert "loginuserpass" not in str(page.url)


def test_encrypted_assertion_decrypts_with_the_sp_key(
    tmp_path_factory: pytest.TempPathFactory, sp_keys: SpKeys
) -> None:
    student = DEFAULT_USERS[0]
    with start_simplesamlphp(
        tmp_path_factory.mktemp("simplesamlphp-enc"),
        sp_entity_id=SP_ENTITY_ID,
        sp_acs_url=SP_ACS_URL,
        sp_cert_pem=sp_keys.cert_pem,
        encrypt_assertion=True,
    ) as idp:
        sp = make_sp(idp, sp_keys)
        request_id, url = authn_request_url(sp, idp, sign=True)
        with httpx2.Client(timeout=20) as http:
            form = saml_post_form(sign_in(http, url, student.username, student.password))

    root = etree.fromstring(base64.b64decode(form.fields["SAMLResponse"]))
    assert len(root.findall("saml:EncryptedAssertion", NS)) == 1
    assert root.findall("saml:Assertion", NS) == []
    assert student.attributes[ATTR_EPPN][0].encode() not in etree.tostring(root)

    response = sp.parse_authn_request_response(
        form.fields["SAMLResponse"], BINDING_HTTP_POST, outstanding={request_id: "/"}
    )
    assert response is not None
    assert response.assertion.signature is not None
    assert raw_attributes(response) == expected_attributes(student)
