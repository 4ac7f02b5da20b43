"""A second, independent SAML 2.0 IdP for tests: pysaml2's `saml2.server.Server` behind a small
aiohttp app on a free loopback port (in the test's event loop).

- `make_keypair(directory, name)`: a fresh RSA-2048 key and self-signed certificate (PEM files).
- `Pysaml2Idp(workdir, ...)`: `await start()`, `metadata()` (an EntityDescriptor with
  `<shibmd:Scope>` in the IDPSSODescriptor Extensions, which pysaml2 cannot write itself),
  `trust_sp(sp_metadata)`, and `GET /sso/redirect`: verifies the signed AuthnRequest of the
  HTTP-Redirect binding and, with no UI, "logs in" `user`, answering an HTML auto-POST form
  (SAMLResponse + RelayState) to the SP's ACS. `sign_assertion` / `sign_response` /
  `encrypt_assertion` choose what the answer looks like.
- Crafting helpers for attack tests: `response_xml(...)` builds an unsigned Response with
  pysaml2 (then edit it with lxml), `sign(xml, element_id, key)` signs any element with
  xmlsec1 (with the IdP's key or any other `KeyPair`), and `signed_response(...)` does both.
- `auto_post_form(html)`: the (action, fields) of such a form, as a browser would read it.
"""

from __future__ import annotations

import base64
import datetime
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape, unescape
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT, saml
from saml2.config import IdPConfig
from saml2.metadata import entity_descriptor
from saml2.saml import NAME_FORMAT_URI, NAMEID_FORMAT_PERSISTENT, NAMEID_FORMAT_TRANSIENT
from saml2.server import Server
from saml2.xmldsig import DIGEST_SHA256, SIG_RSA_SHA256

SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
MD = "urn:oasis:names:tc:SAML:2.0:metadata"
DS = "http://www.w3.org/2000/09/xmldsig#"
SHIBMD = "urn:mace:shibboleth:metadata:1.0"
NS = {"samlp": SAMLP, "saml": SAML, "ds": DS, "md": MD}

SCOPE = "campus.example.edu"
REFEDS_MFA = "https://refeds.org/profile/mfa"
PASSWORD_PROTECTED = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"

# Friendly names as in pysaml2's saml_uri attribute map; sent with NameFormat uri (urn:oid:…).
DEFAULT_USER: dict[str, list[str]] = {
    "subject-id": [f"ada.l@{SCOPE}"],
    "eduPersonPrincipalName": [f"ada@{SCOPE}"],
    "mail": ["ada@campus.example.edu"],
    "displayName": ["Ada Lovelace"],
    "eduPersonScopedAffiliation": [f"student@{SCOPE}", f"member@{SCOPE}"],
    "eduPersonEntitlement": ["urn:mace:campus.example.edu:entitlement:hpc"],
    "isMemberOf": ["campus.example.edu/students"],
    "eduPersonAssurance": ["https://refeds.org/assurance/IAP/medium"],
}


def xmlsec_binary() -> str:
    found = shutil.which("xmlsec1")
    if found is None:
        raise RuntimeError("xmlsec1 is not installed (apt-get install -y xmlsec1)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class KeyPair:
    key_pem: str
    cert_pem: str
    key_path: Path
    cert_path: Path

    @property
    def cert_b64(self) -> str:
        """The certificate as base64 DER, as written in ds:X509Certificate."""
        return "".join(
            line for line in self.cert_pem.splitlines() if line and not line.startswith("-----")
        )


def make_keypair(directory: Path, name: str) -> KeyPair:
    """A fresh RSA-2048 key and a self-signed certificate for `name`, written under
    `directory` as `{name}.key` / `{name}.crt`."""
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    key_path.write_text(key_pem)
    key_path.chmod(0o600)
    cert_path.write_text(cert_pem)
    return KeyPair(key_pem, cert_pem, key_path, cert_path)


def _signature_template(element_id: str) -> etree._Element:
    def sub(parent: etree._Element, tag: str, **attrs: str) -> etree._Element:
        return etree.SubElement(parent, f"{{{DS}}}{tag}", attrs)

    signature = etree.Element(f"{{{DS}}}Signature", nsmap={"ds": DS})
    info = sub(signature, "SignedInfo")
    sub(info, "CanonicalizationMethod", Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#")
    sub(info, "SignatureMethod", Algorithm=SIG_RSA_SHA256)
    ref = sub(info, "Reference", URI=f"#{element_id}")
    transforms = sub(ref, "Transforms")
    sub(transforms, "Transform", Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature")
    sub(transforms, "Transform", Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#")
    sub(ref, "DigestMethod", Algorithm=DIGEST_SHA256)
    sub(ref, "DigestValue")
    sub(signature, "SignatureValue")
    sub(sub(sub(signature, "KeyInfo"), "X509Data"), "X509Certificate")
    return signature


def sign(xml: bytes, element_id: str, key: KeyPair) -> bytes:
    """`xml` with the element whose ID is `element_id` (an Assertion or a Response) signed
    with `key`: an enveloped RSA-SHA256 signature placed after its Issuer, made by xmlsec1."""
    root = etree.fromstring(xml)
    target = next(el for el in root.iter() if el.get("ID") == element_id)
    for old in target.findall(f"{{{DS}}}Signature"):
        target.remove(old)
    issuer = target.find(f"{{{SAML}}}Issuer")
    position = 0 if issuer is None else list(target).index(issuer) + 1
    target.insert(position, _signature_template(element_id))
    with tempfile.TemporaryDirectory() as tmp:
        source, output = Path(tmp) / "in.xml", Path(tmp) / "out.xml"
        source.write_bytes(etree.tostring(root))
        subprocess.run(
            [
                xmlsec_binary(), "--sign",
                "--privkey-pem", f"{key.key_path},{key.cert_path}",
                "--id-attr:ID", f"{SAML}:Assertion",
                "--id-attr:ID", f"{SAMLP}:Response",
                "--node-id", element_id,
                "--output", str(output), str(source),
            ],
            check=True, capture_output=True,
        )  # fmt: skip
        return output.read_bytes()


def auto_post_form(html: str) -> tuple[str, dict[str, str]]:
    """The action and hidden fields of an auto-submitting HTML form."""
    action = re.search(r'<form[^>]*action="([^"]*)"', html)
    assert action is not None, html
    fields = {
        unescape(name): unescape(value)
        for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html)
    }
    return unescape(action.group(1)), fields


@dataclass
class Pysaml2Idp:
    """A pysaml2 IdP on loopback. `entity_id` defaults to `{base_url}/idp`."""

    workdir: Path
    name: str = "campus"
    display_name: str = "Campus Example University"
    scopes: Sequence[str] = (SCOPE,)
    user: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(DEFAULT_USER))
    authn_context: str = REFEDS_MFA
    sign_assertion: bool = True
    sign_response: bool = False
    encrypt_assertion: bool = False
    port: int = field(default_factory=free_port)
    key: KeyPair = field(init=False)
    server: Server = field(init=False)
    requests_seen: list[str] = field(default_factory=list, init=False)
    _runner: web.AppRunner | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.key = make_keypair(self.workdir / self.name, f"{self.name}-idp")
        self.server = Server(config=self._config())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def entity_id(self) -> str:
        return f"{self.base_url}/idp"

    @property
    def sso_url(self) -> str:
        return f"{self.base_url}/sso/redirect"

    def _config(self) -> IdPConfig:
        config = IdPConfig()
        config.load(
            {
                "entityid": self.entity_id,
                "name": self.display_name,
                "key_file": str(self.key.key_path),
                "cert_file": str(self.key.cert_path),
                "xmlsec_binary": xmlsec_binary(),
                "delete_tmpfiles": True,
                "metadata": {},
                "service": {
                    "idp": {
                        "name": self.display_name,
                        "endpoints": {
                            "single_sign_on_service": [(self.sso_url, BINDING_HTTP_REDIRECT)],
                        },
                        "policy": {
                            "default": {
                                "lifetime": {"minutes": 5},
                                "attribute_restrictions": None,
                                "name_form": NAME_FORMAT_URI,
                            }
                        },
                        "want_authn_requests_signed": True,
                        "name_id_format": [NAMEID_FORMAT_TRANSIENT, NAMEID_FORMAT_PERSISTENT],
                        "signing_algorithm": SIG_RSA_SHA256,
                        "digest_algorithm": DIGEST_SHA256,
                    }
                },
            }
        )
        return config

    def metadata(self) -> bytes:
        """This IdP's EntityDescriptor, with a shibmd:Scope per configured scope."""
        descriptor = entity_descriptor(self.server.config)
        root = etree.fromstring(str(descriptor).encode())
        idp = root.find(f"{{{MD}}}IDPSSODescriptor")
        assert idp is not None
        extensions = idp.find(f"{{{MD}}}Extensions")
        if extensions is None:
            extensions = etree.Element(f"{{{MD}}}Extensions")
            idp.insert(0, extensions)
        for scope in self.scopes:
            element = etree.SubElement(
                extensions, f"{{{SHIBMD}}}Scope", {"regexp": "false"}, nsmap={"shibmd": SHIBMD}
            )
            element.text = scope
        return etree.tostring(root)

    def trust_sp(self, sp_metadata: bytes) -> None:
        """Load the SP's metadata (its signing/encryption certificate and ACS)."""
        self.server.metadata.load("inline", sp_metadata.decode())

    # --- HTTP --------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/sso/redirect", self._sso)
        app.router.add_get("/idp/metadata", self._metadata)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metadata(), content_type="application/samlmetadata+xml")

    async def _sso(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            parsed = self.server.parse_authn_request(
                query["SAMLRequest"],
                BINDING_HTTP_REDIRECT,
                relay_state=query.get("RelayState"),
                sigalg=query.get("SigAlg"),
                signature=query.get("Signature"),
            )
        except Exception as error:  # the test reads the reason from the body
            return web.Response(status=400, text=f"bad AuthnRequest: {error!r}")
        if parsed is None:
            return web.Response(status=400, text="bad AuthnRequest")
        message = parsed.message
        self.requests_seen.append(message.id)
        args = self.server.response_args(message, [BINDING_HTTP_POST])
        response = self.server.create_authn_response(
            {k: list(v) for k, v in self.user.items()},
            in_response_to=args["in_response_to"],
            destination=args["destination"],
            sp_entity_id=args["sp_entity_id"],
            name_id=saml.NameID(format=NAMEID_FORMAT_TRANSIENT, text=secrets.token_hex(16)),
            authn={"class_ref": self.authn_context},
            sign_assertion=self.sign_assertion,
            sign_response=self.sign_response,
            encrypt_assertion=self.encrypt_assertion,
            encrypt_cert_assertion=None,
            sign_alg=SIG_RSA_SHA256,
            digest_alg=DIGEST_SHA256,
        )
        encoded = base64.b64encode(str(response).encode()).decode()
        html = (
            f'<html><body onload="document.forms[0].submit()">'
            f'<form method="post" action="{escape(args["destination"])}">'
            f'<input type="hidden" name="SAMLResponse" value="{escape(encoded)}">'
            f'<input type="hidden" name="RelayState" value="{escape(query.get("RelayState", ""))}">'
            "</form></body></html>"
        )
        return web.Response(text=html, content_type="text/html")

    # --- crafting ----------------------------------------------------------------------

    def response_xml(
        self,
        *,
        in_response_to: str | None,
        destination: str,
        audience: str,
        attributes: Mapping[str, Sequence[str]] | None = None,
        recipient: str | None = None,
        authn_context: str | None = None,
        issuer: str | None = None,
    ) -> etree._Element:
        """An unsigned Response built by pysaml2, as an lxml tree to edit before `sign`.
        `recipient` defaults to `destination`; `issuer` overrides Response/Assertion Issuer."""
        identity = {k: list(v) for k, v in (attributes or self.user).items()}
        response = self.server._authn_response(
            in_response_to or "",
            destination,
            audience,
            identity,
            name_id=saml.NameID(format=NAMEID_FORMAT_TRANSIENT, text=secrets.token_hex(16)),
            authn={"class_ref": authn_context or self.authn_context},
            sign_assertion=False,
            sign_response=False,
            best_effort=True,
        )
        root = etree.fromstring(str(response).encode())
        if in_response_to is None:
            root.attrib.pop("InResponseTo", None)
            for data in root.iter(f"{{{SAML}}}SubjectConfirmationData"):
                data.attrib.pop("InResponseTo", None)
        if recipient is not None:
            for data in root.iter(f"{{{SAML}}}SubjectConfirmationData"):
                data.set("Recipient", recipient)
        if issuer is not None:
            for element in root.iter(f"{{{SAML}}}Issuer"):
                element.text = issuer
        return root

    def encrypted_response(
        self,
        *,
        in_response_to: str,
        destination: str,
        audience: str,
        sign_assertion: bool = False,
        sign_response: bool = False,
    ) -> bytes:
        """A Response whose assertion pysaml2 encrypted to the SP's certificate (from the SP
        metadata given to `trust_sp`); unsigned unless asked."""
        response = self.server.create_authn_response(
            {k: list(v) for k, v in self.user.items()},
            in_response_to=in_response_to,
            destination=destination,
            sp_entity_id=audience,
            name_id=saml.NameID(format=NAMEID_FORMAT_TRANSIENT, text=secrets.token_hex(16)),
            authn={"class_ref": self.authn_context},
            sign_assertion=sign_assertion,
            sign_response=sign_response,
            encrypt_assertion=True,
            sign_alg=SIG_RSA_SHA256,
            digest_alg=DIGEST_SHA256,
        )
        return str(response).encode()

    def signed_response(
        self,
        *,
        in_response_to: str | None,
        destination: str,
        audience: str,
        attributes: Mapping[str, Sequence[str]] | None = None,
        sign_assertion: bool = True,
        sign_response: bool = False,
        key: KeyPair | None = None,
        **edits: Any,
    ) -> bytes:
        """A Response built with pysaml2 and signed (assertion and/or response) with `key`,
        by default the IdP's own key."""
        root = self.response_xml(
            in_response_to=in_response_to,
            destination=destination,
            audience=audience,
            attributes=attributes,
            **edits,
        )
        return sign_tree(root, key or self.key, assertion=sign_assertion, response=sign_response)


def sign_tree(
    root: etree._Element, key: KeyPair, *, assertion: bool = True, response: bool = False
) -> bytes:
    """Sign the (first) Assertion and/or the Response of `root` with `key`."""
    xml = etree.tostring(root)
    if assertion:
        element = root.find(f"{{{SAML}}}Assertion")
        assert element is not None
        xml = sign(xml, str(element.get("ID")), key)
    if response:
        xml = sign(xml, str(root.get("ID")), key)
    return xml


def assertion_of(root: etree._Element) -> etree._Element:
    element = root.find(f"{{{SAML}}}Assertion")
    assert element is not None
    return element


def utc(delta: datetime.timedelta = datetime.timedelta()) -> str:
    """An xs:dateTime `delta` from now, as SAML writes it."""
    moment = datetime.datetime.now(datetime.UTC) + delta
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- driving the broker as a browser would ---------------------------------------------------


def metadata_file(path: Path, idps: Sequence[Pysaml2Idp]) -> Path:
    """An EntitiesDescriptor holding every IdP's metadata, as an operator would deploy it."""
    root = etree.Element(f"{{{MD}}}EntitiesDescriptor", nsmap={"md": MD})
    for idp in idps:
        root.append(etree.fromstring(idp.metadata()))
    path.write_bytes(etree.tostring(root, xml_declaration=True, encoding="utf-8"))
    return path


def saml_upstream_settings(
    upstream_id: str, sp: KeyPair, metadata: Path, idp: str | None, **extra: Any
) -> dict[str, Any]:
    """A `type = "saml"` [[upstreams]] entry."""
    entry: dict[str, Any] = {
        "type": "saml",
        "id": upstream_id,
        "display_name": "Campus sign-in",
        "sp_key": {"file": str(sp.key_path)},
        "sp_cert": str(sp.cert_path),
        "metadata": [{"file": str(metadata)}],
    }
    if idp is not None:
        entry["idp"] = idp
    entry.update(extra)
    return entry


@dataclass(frozen=True)
class StartedLogin:
    """A sign-in the broker began: where it sends the browser and what it asked."""

    location: str
    relay_state: str
    request_id: str
    saml_request: str  # the decoded AuthnRequest XML


def decode_redirect_request(location: str) -> StartedLogin:
    """Read the HTTP-Redirect binding URL (DEFLATE + base64 SAMLRequest)."""
    import zlib
    from urllib.parse import parse_qs, urlsplit

    query = parse_qs(urlsplit(location).query)
    xml = zlib.decompress(base64.b64decode(query["SAMLRequest"][0]), -15).decode()
    request_id = etree.fromstring(xml.encode()).get("ID")
    assert request_id, xml
    return StartedLogin(location, query["RelayState"][0], request_id, xml)


async def start_saml_broker(
    workdir: Path,
    vault_address: str,
    approle: Any,
    idps: Sequence[Pysaml2Idp],
    *,
    upstream_id: str = "campus",
    idp: str | None = None,
    **sections: Any,
) -> tuple[Any, KeyPair]:
    """A production-mode broker with one SAML upstream trusting `idps` (metadata from a
    file), each IdP trusting the SP metadata the broker serves. Returns (Services, SP key)."""
    from tests.peers.broker import make_settings, start_broker

    sp = make_keypair(workdir / "sp", "sp")
    md = metadata_file(workdir / "idps.xml", idps)
    entry = saml_upstream_settings(upstream_id, sp, md, idp)
    settings = make_settings(
        workdir, vault_address, approle, mode="production", upstreams=[entry], **sections
    )
    svc = await start_broker(settings, dev_mode=False)
    sp_metadata = svc.upstreams[upstream_id].metadata().body
    for each in idps:
        each.trust_sp(sp_metadata)
    return svc, sp
