"""SAML 2.0 service provider: SP-initiated Web SSO with pysaml2 and xmlsec1.

`begin` sends a signed AuthnRequest over the HTTP-Redirect binding (RelayState = flow id);
`complete` takes the HTTP-POST `SAMLResponse` at the ACS. The response goes through three
layers, each of which alone must be enough to refuse it:

1. our own hardened parse of the raw bytes (size limit, no DOCTYPE/entities, no comments or
   processing instructions, unique IDs, exactly one (Encrypted)Assertion, directly inside the
   Response, and every ds:Signature enveloped in the Response or that Assertion, referencing
   its parent's ID: the structural shapes of every known XML signature-wrapping variant);
2. pysaml2 with only the one IdP the flow was sent to as metadata: signatures (assertion, or
   the Response containing it) against that IdP's metadata keys only, schema validation,
   decryption, InResponseTo against the one outstanding request;
3. our own checks on the document pysaml2 verified (decrypted if need be): the assertion we
   read is the one the signature covers, Issuer, Destination, audience, bearer
   SubjectConfirmation (Recipient, InResponseTo, NotOnOrAfter), Conditions time window with
   `clock_skew`, and the assertion id through the shared replay cache.

Attributes follow the research-and-education profile: the subject is the first of subject-id,
pairwise-id, eduPersonPrincipalName, eduPersonTargetedID (or a persistent NameID); scoped
values must lie within the IdP's `shibmd:Scope`, otherwise the whole sign-in is refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import shutil
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from lxml import etree

from adapters.base import Document, IdpChoice, LoginFlow, Principal, Redirect, ReplayCache
from adapters.errors import (
    AccessDenied,
    BrokerError,
    ConfigurationError,
    InvalidRequest,
    UpstreamFailed,
)
from adapters.upstream.saml_metadata import EntityInfo, MetadataStore

SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
DS = "http://www.w3.org/2000/09/xmldsig#"
BINDING_HTTP_POST = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
BINDING_HTTP_REDIRECT = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"
SIG_RSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
DIGEST_SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"
STATUS_SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"
CM_BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
NAMEID_PERSISTENT = "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"
METADATA_CONTENT_TYPE = "application/samlmetadata+xml"

MAX_RESPONSE_B64 = 256 * 1024  # base64 characters, checked before decoding
REQUEST_TTL = 600.0  # an AuthnRequest is answered within 10 minutes or not at all
_CLIENT_CACHE_SIZE = 128

# Attribute names (SAML2 URI name format) and the other spellings accepted for them.
SUBJECT_ID = "urn:oasis:names:tc:SAML:attribute:subject-id"
PAIRWISE_ID = "urn:oasis:names:tc:SAML:attribute:pairwise-id"
EPPN = "urn:oid:1.3.6.1.4.1.5923.1.1.1.6"
EPTID = "urn:oid:1.3.6.1.4.1.5923.1.1.1.10"
MAIL = "urn:oid:0.9.2342.19200300.100.1.3"
DISPLAY_NAME = "urn:oid:2.16.840.1.113730.3.1.241"
SCOPED_AFFILIATION = "urn:oid:1.3.6.1.4.1.5923.1.1.1.9"
ENTITLEMENT = "urn:oid:1.3.6.1.4.1.5923.1.1.1.7"
IS_MEMBER_OF = "urn:oid:1.3.6.1.4.1.5923.1.5.1.1"
ASSURANCE = "urn:oid:1.3.6.1.4.1.5923.1.1.1.11"

FRIENDLY_NAMES: Mapping[str, str] = {
    "subject-id": SUBJECT_ID,
    "pairwise-id": PAIRWISE_ID,
    "eduPersonPrincipalName": EPPN,
    "eduPersonTargetedID": EPTID,
    "mail": MAIL,
    "displayName": DISPLAY_NAME,
    "eduPersonScopedAffiliation": SCOPED_AFFILIATION,
    "eduPersonEntitlement": ENTITLEMENT,
    "isMemberOf": IS_MEMBER_OF,
    "eduPersonAssurance": ASSURANCE,
}
_ALIASES: Mapping[str, str] = {
    **{name: urn for name, urn in FRIENDLY_NAMES.items()},
    **{f"urn:mace:dir:attribute-def:{name}": urn for name, urn in FRIENDLY_NAMES.items()},
}
_SCOPED = {
    SUBJECT_ID: "subject-id",
    PAIRWISE_ID: "pairwise-id",
    EPPN: "eduPersonPrincipalName",
    SCOPED_AFFILIATION: "eduPersonScopedAffiliation",
}
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")


def canonical_attribute_name(name: str) -> str:
    """The SAML2 URI name of an attribute given by URI, legacy urn:mace or friendly name."""
    return _ALIASES.get(name, name)


# --- reading an assertion --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssertionData:
    """What the mapping needs from one verified assertion."""

    issuer: str
    attributes: Mapping[str, tuple[str, ...]]  # canonical name -> values
    name_id: str | None = None
    name_id_format: str | None = None
    authn_context: str | None = None
    authn_instant: int = 0
    assertion_id: str = ""
    claims_extra: Mapping[str, Any] = field(default_factory=dict)


def _text(element: etree._Element) -> str:
    """Simple content of an element; comments and PIs were refused at parse time."""
    return "".join(element.itertext()).strip()


def _attribute_value(value: etree._Element) -> str | None:
    name_id = value.find(f"{{{SAML}}}NameID")
    if name_id is not None:  # eduPersonTargetedID as a NameID element
        return _text(name_id) or None
    if len(value):
        return None  # other structured values are not ours to interpret
    return _text(value) or None


def read_assertion(assertion: etree._Element) -> AssertionData:
    """The attributes, NameID and authentication context of a saml:Assertion element."""
    attributes: dict[str, list[str]] = {}
    for statement in assertion.iterfind(f"{{{SAML}}}AttributeStatement"):
        for attribute in statement.iterfind(f"{{{SAML}}}Attribute"):
            name = canonical_attribute_name(attribute.get("Name", ""))
            values = attributes.setdefault(name, [])
            for value in attribute.iterfind(f"{{{SAML}}}AttributeValue"):
                text = _attribute_value(value)
                if text is not None:
                    values.append(text)
    name_id = assertion.find(f"{{{SAML}}}Subject/{{{SAML}}}NameID")
    authn = assertion.find(f"{{{SAML}}}AuthnStatement")
    context = None
    instant = 0
    if authn is not None:
        ref = authn.find(f"{{{SAML}}}AuthnContext/{{{SAML}}}AuthnContextClassRef")
        context = _text(ref) if ref is not None else None
        when = parse_instant(authn.get("AuthnInstant"))
        instant = int(when) if when is not None else 0
    issuer = assertion.find(f"{{{SAML}}}Issuer")
    return AssertionData(
        issuer=_text(issuer) if issuer is not None else "",
        attributes={k: tuple(v) for k, v in attributes.items()},
        name_id=_text(name_id) if name_id is not None else None,
        name_id_format=name_id.get("Format") if name_id is not None else None,
        authn_context=context or None,
        authn_instant=instant,
        assertion_id=assertion.get("ID", ""),
    )


def principal_from_assertion(
    data: AssertionData,
    *,
    upstream_id: str,
    allows_scope: Callable[[str], bool],
    mfa_contexts: Sequence[str],
) -> Principal:
    """Map an assertion to a Principal (R&E profile). Scoped values outside the IdP's
    scopes, or no usable subject, refuse the whole sign-in with AccessDenied."""
    attrs = data.attributes
    for urn, friendly in _SCOPED.items():
        for value in attrs.get(urn, ()):
            _, at, domain = value.rpartition("@")
            if not at or not domain or not _:
                raise AccessDenied(
                    "The identity provider sent an identifier this service cannot use.",
                    log_detail=f"{friendly} value has no scope",
                )
            if not allows_scope(domain):
                raise AccessDenied(
                    "The identity provider may not vouch for that account.",
                    log_detail=f"{friendly} scope {domain!r} is not in the IdP's shibmd:Scope",
                )
    subject = ""
    source = ""
    for urn, label in (
        (SUBJECT_ID, "subject-id"),
        (PAIRWISE_ID, "pairwise-id"),
        (EPPN, "eduPersonPrincipalName"),
        (EPTID, "eduPersonTargetedID"),
    ):
        values = attrs.get(urn, ())
        if len(values) > 1:
            raise AccessDenied(
                "The identity provider sent an identifier this service cannot use.",
                log_detail=f"{label} has {len(values)} values",
            )
        if values:
            subject, source = values[0], label
            break
    if not subject and data.name_id and data.name_id_format == NAMEID_PERSISTENT:
        subject, source = data.name_id, "persistent NameID"
    if not subject:
        raise AccessDenied(
            "The identity provider did not release an identifier for your account.",
            log_detail="no subject-id, pairwise-id, eduPersonPrincipalName, "
            "eduPersonTargetedID or persistent NameID",
        )
    mail = next((m for m in attrs.get(MAIL, ()) if _EMAIL.match(m)), None)
    display = next(iter(attrs.get(DISPLAY_NAME, ())), "")
    groups = tuple(dict.fromkeys((*attrs.get(ENTITLEMENT, ()), *attrs.get(IS_MEMBER_OF, ()))))
    affiliation = tuple(dict.fromkeys(attrs.get(SCOPED_AFFILIATION, ())))
    mfa = data.authn_context is not None and data.authn_context in mfa_contexts
    claims: dict[str, Any] = {"subject_source": source}
    assurance = attrs.get(ASSURANCE, ())
    if assurance:
        claims["eduperson_assurance"] = list(assurance)
    eppn = attrs.get(EPPN, ())
    if eppn:
        claims["eppn"] = eppn[0]
    return Principal(
        idp=upstream_id,
        issuer=data.issuer,
        subject=subject,
        display_name=display or (eppn[0] if eppn else ""),
        email=mail,
        groups=groups,
        affiliation=affiliation,
        acr=data.authn_context,
        amr=("mfa",) if mfa else (),
        mfa=mfa,
        auth_time=data.authn_instant,
        claims=claims,
    )


# --- hardened parsing and structure --------------------------------------------------------

_FRACTION = re.compile(r"(\.\d{1,6})\d*")


def parse_instant(value: str | None) -> float | None:
    """xs:dateTime (UTC as SAML requires) to epoch seconds; None if absent or unreadable."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(_FRACTION.sub(r"\1", value.strip()).replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=False,
        remove_pis=False,
    )


def parse_response_xml(data: bytes) -> etree._Element:
    """Parse an untrusted SAML message: refuse DTDs (so every entity), comments and PIs."""
    # A DOCTYPE is refused before libxml2 sees it, whatever the parser would have done.
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise InvalidRequest(
            "The sign-in response is not valid.", log_detail="SAMLResponse has a DOCTYPE"
        )
    try:
        tree = etree.fromstring(data, _parser()).getroottree()
    except (etree.XMLSyntaxError, ValueError) as error:
        raise InvalidRequest(
            "The sign-in response is not valid.",
            log_detail=f"SAMLResponse is not well-formed XML: {str(error)[:120]}",
        ) from None
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise InvalidRequest(
            "The sign-in response is not valid.", log_detail="SAMLResponse has a DOCTYPE"
        )
    root = tree.getroot()
    for node in root.iter(etree.Comment, etree.ProcessingInstruction, etree.Entity):
        raise InvalidRequest(
            "The sign-in response is not valid.",
            log_detail=f"SAMLResponse holds a {type(node).__name__.lstrip('_')}",
        )
    return root


def _refuse(detail: str) -> AccessDenied:
    return AccessDenied("The sign-in response could not be verified.", log_detail=detail)


@dataclass(frozen=True, slots=True)
class Structure:
    """Where the one assertion of a structurally sound Response sits."""

    response_id: str
    assertion: etree._Element | None  # None when it is still encrypted
    assertion_signed: bool
    response_signed: bool


def check_structure(root: etree._Element) -> Structure:
    """The shape rules that defeat signature wrapping (raises AccessDenied):

    - the root is a samlp:Response with an ID; IDs are unique in the whole document;
    - exactly one saml:Assertion or saml:EncryptedAssertion in the whole document (none inside
      Extensions, Advice, ds:Object or another assertion), and it is a child of the root (a
      decrypted assertion may sit inside its EncryptedAssertion);
    - every ds:Signature is a child of the Response or of that assertion, one per parent,
      with exactly one Reference whose URI is `#` + its parent's ID, and no ds:Object.
    """
    if root.tag != f"{{{SAMLP}}}Response":
        raise InvalidRequest(
            "The sign-in response is not valid.",
            log_detail=f"root element is {etree.QName(root).text}",
        )
    response_id = root.get("ID") or ""
    if not response_id:
        raise _refuse("Response has no ID")
    seen: set[str] = set()
    for element in root.iter(etree.Element):
        for name in ("ID", "Id", "AssertionID"):
            value = element.get(name)
            if value is not None:
                if value in seen:
                    raise _refuse(f"duplicate ID {value!r}")
                seen.add(value)
    assertions = list(root.iter(f"{{{SAML}}}Assertion"))
    encrypted = list(root.iter(f"{{{SAML}}}EncryptedAssertion"))
    assertion: etree._Element | None = None
    if len(assertions) == 1 and not encrypted:
        assertion = assertions[0]
        if assertion.getparent() is not root:
            raise _refuse("the Assertion is not a child of the Response")
    elif len(assertions) == 1 and len(encrypted) == 1:  # decrypted in place
        assertion = assertions[0]
        if assertion.getparent() is not encrypted[0] or encrypted[0].getparent() is not root:
            raise _refuse("the decrypted Assertion is not where it was encrypted")
    elif len(encrypted) == 1 and not assertions:
        if encrypted[0].getparent() is not root:
            raise _refuse("the EncryptedAssertion is not a child of the Response")
    else:
        raise _refuse(
            f"{len(assertions)} Assertion and {len(encrypted)} EncryptedAssertion elements"
        )
    signed = {"response": False, "assertion": False}
    for signature in root.iter(f"{{{DS}}}Signature"):
        parent = signature.getparent()
        if parent is root:
            kind = "response"
        elif assertion is not None and parent is assertion:
            kind = "assertion"
        else:
            where = etree.QName(parent).text if parent is not None else "?"
            raise _refuse(f"a Signature inside {where}")
        if signed[kind]:
            raise _refuse(f"two Signatures on the {kind}")
        references = signature.findall(f"{{{DS}}}SignedInfo/{{{DS}}}Reference")
        parent_id = parent.get("ID") if parent is not None else None
        if len(references) != 1 or not parent_id or references[0].get("URI") != f"#{parent_id}":
            raise _refuse(f"the {kind} Signature does not reference its enclosing element")
        if signature.find(f"{{{DS}}}Object") is not None:
            raise _refuse(f"the {kind} Signature carries a ds:Object")
        signed[kind] = True
    return Structure(response_id, assertion, signed["assertion"], signed["response"])


# --- the adapter ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pending:
    request_id: str
    idp: str


class _NoIdentityCache:
    """Stands in for pysaml2's in-memory Population: the broker keeps no SAML identities."""

    def add_information_about_person(self, session_info: object) -> None:
        return None


def _pysaml2_reason(error: BaseException) -> str:
    """A short, document-free description of a pysaml2 failure for log_detail."""
    name = type(error).__name__
    known = {
        "UnsolicitedResponse": "InResponseTo names no request of this flow",
        "SignatureError": "signature missing or not valid",
        "SigverError": "signature missing or not valid",
        "MissingKey": "no signing key in the IdP's metadata",
        "CertificateError": "signing certificate not acceptable",
        "IncorrectlySigned": "response not correctly signed",
        "DecryptError": "assertion could not be decrypted",
        "ResponseLifetimeExceed": "response expired",
        "ToEarly": "response not yet valid",
        "VerificationError": "subject confirmation or conditions not met",
        "InvalidAssertion": "wrong number of assertions",
        "XMLSchemaError": "not valid against the SAML schema",
    }
    if name in known:
        return f"{name}: {known[name]}"
    message = str(error).splitlines()[0][:160] if str(error) else ""
    if "<" in message:  # never copy document content into the log
        message = ""
    return f"{name}: {message}" if message else name


class SamlUpstream:
    """A SAML 2.0 SP for one campus IdP (`idp`) or a whole federation (`metadata`)."""

    def __init__(
        self,
        *,
        id: str,
        display_name: str,
        entity_id: str,
        acs_url: str,
        sp_key_pem: str,
        sp_cert_pem: str,
        metadata: MetadataStore,
        idp: str | None,
        clock_skew: int,
        mfa_contexts: Sequence[str],
        requested_authn_context: Sequence[str],
        cache: ReplayCache,
    ) -> None:
        self.id = id
        self.display_name = display_name
        self.entity_id = entity_id
        self.acs_url = acs_url
        self._store = metadata
        self._idp = idp
        self._skew = max(0, int(clock_skew))
        self._mfa = tuple(mfa_contexts)
        self._requested = tuple(requested_authn_context)
        self._cache = cache
        self._configured: EntityInfo | None = None
        self._clients: OrderedDict[str, tuple[bytes, Any]] = OrderedDict()
        self._client_lock = asyncio.Lock()
        _check_keypair(sp_key_pem, sp_cert_pem)
        xmlsec = shutil.which("xmlsec1")
        if xmlsec is None:
            raise ConfigurationError("SAML needs the xmlsec1 program (Debian package xmlsec1)")
        self._xmlsec = xmlsec
        # pysaml2 and xmlsec1 read keys from files: a private directory, removed on close()
        # or, failing that, when this object is collected or the interpreter exits.
        self._dir = Path(tempfile.mkdtemp(prefix=f"saml-{id}-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        self._key_file = self._dir / "sp.key"
        self._key_file.touch(mode=0o600)
        self._key_file.write_text(sp_key_pem)
        self._cert_file = self._dir / "sp.crt"
        self._cert_file.write_text(sp_cert_pem)
        self._metadata_doc = self._build_metadata()

    # --- configuration -----------------------------------------------------------------

    def _config_dict(self, idp_xml: bytes | None, *, for_metadata: bool = False) -> dict[str, Any]:
        return {
            "entityid": self.entity_id,
            "name": self.display_name,
            "key_file": str(self._key_file),
            "cert_file": str(self._cert_file),
            "encryption_keypairs": [
                {"key_file": str(self._key_file), "cert_file": str(self._cert_file)}
            ],
            "xmlsec_binary": self._xmlsec,
            "delete_tmpfiles": True,
            "only_use_keys_in_metadata": True,
            "metadata": {"inline": [idp_xml.decode()]} if idp_xml else {},
            "accepted_time_diff": self._skew,
            "allow_unknown_attributes": True,
            "service": {
                "sp": {
                    "name": self.display_name,
                    "endpoints": {
                        "assertion_consumer_service": [(self.acs_url, BINDING_HTTP_POST)],
                    },
                    "allow_unsolicited": False,
                    "authn_requests_signed": True,
                    # Published as WantAssertionsSigned; accepted: a signed assertion or a
                    # signed Response that contains it (checked again in check_structure).
                    "want_assertions_signed": for_metadata,
                    "want_response_signed": False,
                    "want_assertions_or_response_signed": True,
                    "signing_algorithm": SIG_RSA_SHA256,
                    "digest_algorithm": DIGEST_SHA256,
                }
            },
        }

    def _build_metadata(self) -> bytes:
        from saml2.config import SPConfig
        from saml2.metadata import entity_descriptor, sign_entity_descriptor
        from saml2.sigver import security_context

        try:
            config = SPConfig().load(self._config_dict(None, for_metadata=True))
            descriptor = entity_descriptor(config)
            _, signed = sign_entity_descriptor(
                descriptor, None, security_context(config), SIG_RSA_SHA256, DIGEST_SHA256
            )
        except Exception as error:
            raise ConfigurationError(
                f"SAML upstream {self.id}: cannot build the SP metadata ({type(error).__name__})"
            ) from None
        return signed.encode() if isinstance(signed, str) else bytes(signed)

    async def _client(self, entity: EntityInfo) -> Any:
        """A Saml2Client that knows only this IdP (built once per metadata version)."""
        async with self._client_lock:
            cached = self._clients.get(entity.entity_id)
            if cached is not None and cached[0] == entity.xml:
                self._clients.move_to_end(entity.entity_id)
                return cached[1]

        def build() -> Any:
            from saml2.client import Saml2Client
            from saml2.config import SPConfig

            client = Saml2Client(SPConfig().load(self._config_dict(entity.xml)))
            # pysaml2 would keep every signed-in person's attributes in memory for ever.
            client.users = _NoIdentityCache()
            return client

        try:
            client = await asyncio.to_thread(build)
        except Exception as error:
            raise UpstreamFailed(
                "The identity provider's metadata cannot be used.",
                log_detail=f"pysaml2 rejected the metadata of {entity.entity_id}: "
                f"{_pysaml2_reason(error)}",
            ) from None
        async with self._client_lock:
            self._clients[entity.entity_id] = (entity.xml, client)
            self._clients.move_to_end(entity.entity_id)
            while len(self._clients) > _CLIENT_CACHE_SIZE:
                self._clients.popitem(last=False)
        return client

    async def _entity(self, entity_id: str | None) -> EntityInfo:
        if self._idp is not None and entity_id not in (None, self._idp):
            raise InvalidRequest(
                "That identity provider is not offered here.",
                log_detail=f"idp hint {entity_id!r} is not the configured IdP",
            )
        chosen = entity_id or self._idp
        if not chosen:
            raise InvalidRequest(
                "Choose your institution to sign in.", log_detail="no IdP entity id given"
            )
        entity = await self._store.lookup(chosen)
        if entity is None or not entity.is_idp:
            raise InvalidRequest(
                "That identity provider is not known here.",
                log_detail=f"entity {chosen!r} is not an IdP in the metadata",
            )
        return entity

    # --- Upstream ----------------------------------------------------------------------

    async def begin(self, flow: LoginFlow) -> Redirect:
        """A signed AuthnRequest (HTTP-Redirect, RSA-SHA256), RelayState = flow id."""
        entity = await self._entity(flow.idp_hint)
        client = await self._client(entity)

        def prepare() -> tuple[str, str]:
            from saml2 import saml, samlp

            extra: dict[str, Any] = {"name_id_policy": samlp.NameIDPolicy(allow_create="true")}
            if flow.force_authn:
                extra["force_authn"] = "true"
            if self._requested:
                extra["requested_authn_context"] = samlp.RequestedAuthnContext(
                    authn_context_class_ref=[
                        saml.AuthnContextClassRef(text=ref) for ref in self._requested
                    ],
                    comparison="exact",
                )
            request_id, info = client.prepare_for_authenticate(
                entityid=entity.entity_id,
                relay_state=flow.id,
                binding=BINDING_HTTP_REDIRECT,
                sign=True,
                sigalg=SIG_RSA_SHA256,
                digest_alg=DIGEST_SHA256,
                **extra,
            )
            return str(request_id), str(dict(info["headers"])["Location"])

        try:
            request_id, location = await asyncio.to_thread(prepare)
        except Exception as error:
            raise InvalidRequest(
                "Sign-in with that identity provider is not possible.",
                log_detail=f"AuthnRequest for {entity.entity_id}: {_pysaml2_reason(error)}",
            ) from None
        pending = json.dumps({"request_id": request_id, "idp": entity.entity_id})
        await self._cache.set(self._request_key(flow), pending, REQUEST_TTL)
        return Redirect(location)

    def _request_key(self, flow: LoginFlow) -> str:
        return f"{self.id}:req:{flow.id}"

    async def _pending(self, flow: LoginFlow) -> _Pending:
        raw = await self._cache.get(self._request_key(flow))
        if raw is None:
            raise AccessDenied(
                "This sign-in has expired. Please start again.",
                log_detail="no outstanding AuthnRequest for this flow (unsolicited or expired)",
            )
        data = json.loads(raw)
        return _Pending(str(data["request_id"]), str(data["idp"]))

    async def complete(self, flow: LoginFlow, params: Mapping[str, str]) -> Principal:
        """Verify the ACS POST of `flow` and map it; only adapters.errors types escape."""
        try:
            return await self._complete(flow, params)
        except BrokerError:
            raise
        except Exception as error:  # fail closed on anything unforeseen
            raise _refuse(
                f"unexpected {type(error).__name__} while checking the response"
            ) from None

    async def _complete(self, flow: LoginFlow, params: Mapping[str, str]) -> Principal:
        encoded = params.get("SAMLResponse", "")
        if not encoded:
            raise InvalidRequest(
                "The identity provider sent no sign-in response.",
                log_detail="no SAMLResponse parameter",
            )
        if len(encoded) > MAX_RESPONSE_B64:
            raise InvalidRequest(
                "The sign-in response is too large.",
                log_detail=f"SAMLResponse of {len(encoded)} base64 characters",
            )
        try:
            document = base64.b64decode("".join(encoded.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(
                "The sign-in response is not valid.", log_detail="SAMLResponse is not base64"
            ) from None
        root = parse_response_xml(document)
        structure = check_structure(root)
        pending = await self._pending(flow)
        self._check_envelope(root, pending)
        entity = await self._store.lookup(pending.idp)
        if entity is None:
            raise AccessDenied(
                "The identity provider is no longer trusted here.",
                log_detail=f"{pending.idp} left the metadata during the sign-in",
            )
        client = await self._client(entity)
        verified_xml = await self._pysaml2_verify(client, document, pending)
        verified = parse_response_xml(verified_xml)
        final = check_structure(verified)
        assertion = final.assertion
        if assertion is None or final.response_id != structure.response_id:
            raise _refuse("pysaml2 returned no assertion or another Response")
        if not (final.assertion_signed or structure.response_signed):
            raise _refuse("neither the assertion nor the Response containing it is signed")
        not_after = self._check_assertion(assertion, pending)
        data = read_assertion(assertion)
        if not data.assertion_id:
            raise _refuse("the assertion has no ID")
        principal = principal_from_assertion(
            data, upstream_id=self.id, allows_scope=entity.allows_scope, mfa_contexts=self._mfa
        )
        ttl = max(1.0, not_after + self._skew - time.time())
        if not await self._cache.add(f"{self.id}:assertion:{data.assertion_id}", "1", ttl):
            raise _refuse(f"assertion {data.assertion_id!r} was already used (replay)")
        await self._cache.pop(self._request_key(flow))
        return principal

    def _check_envelope(self, root: etree._Element, pending: _Pending) -> None:
        """Response-level checks that need no signature: a forged value fails here early and
        a signed one is checked again by pysaml2."""
        issuer = root.find(f"{{{SAML}}}Issuer")
        if issuer is not None and _text(issuer) != pending.idp:
            raise _refuse(f"Response Issuer {_text(issuer)!r} is not {pending.idp!r}")
        if root.get("InResponseTo") != pending.request_id:
            raise _refuse("Response InResponseTo is not this flow's AuthnRequest")
        if root.get("Destination") != self.acs_url:
            raise _refuse(f"Response Destination {root.get('Destination')!r} is not our ACS")
        status = root.find(f"{{{SAMLP}}}Status/{{{SAMLP}}}StatusCode")
        if status is None or status.get("Value") != STATUS_SUCCESS:
            codes = [] if status is None else [c.get("Value") or "" for c in status.iter()]
            raise AccessDenied(
                "The identity provider did not sign you in.",
                log_detail=f"IdP status {' / '.join(codes) or 'missing'}",
            )

    async def _pysaml2_verify(self, client: Any, document: bytes, pending: _Pending) -> bytes:
        """pysaml2's checks; returns the verified document (decrypted if it was encrypted)."""
        encoded = base64.b64encode(document).decode()

        def parse() -> bytes:
            response = client.parse_authn_request_response(
                encoded, BINDING_HTTP_POST, outstanding={pending.request_id: pending.idp}
            )
            if response is None or response.assertion is None:
                raise _refuse("pysaml2 found no valid assertion")
            if response.issuer() != pending.idp:
                raise _refuse(f"pysaml2 issuer {response.issuer()!r} is not {pending.idp!r}")
            xml = response.xmlstr
            return xml.encode() if isinstance(xml, str) else bytes(xml)

        try:
            return await asyncio.to_thread(parse)
        except BrokerError:
            raise
        except Exception as error:
            raise _refuse(f"pysaml2: {_pysaml2_reason(error)}") from None

    def _check_assertion(self, assertion: etree._Element, pending: _Pending) -> float:
        """Issuer, audience, bearer confirmation and time window of the verified assertion;
        returns the latest moment it may be used (epoch)."""
        now = time.time()
        issuer = assertion.find(f"{{{SAML}}}Issuer")
        if issuer is None or _text(issuer) != pending.idp:
            raise _refuse("Assertion Issuer is not the IdP this sign-in was sent to")
        conditions = assertion.find(f"{{{SAML}}}Conditions")
        if conditions is None:
            raise _refuse("Assertion has no Conditions (no audience restriction)")
        restrictions = conditions.findall(f"{{{SAML}}}AudienceRestriction")
        if not restrictions or not all(
            self.entity_id in (_text(a) for a in r.iterfind(f"{{{SAML}}}Audience"))
            for r in restrictions
        ):
            raise _refuse("Assertion audience is not this SP")
        limits: list[float] = []
        not_before = conditions.get("NotBefore")
        if not_before is not None:
            moment = parse_instant(not_before)
            if moment is None or moment - self._skew > now:
                raise _refuse("Assertion is not yet valid (Conditions NotBefore)")
        not_on_or_after = conditions.get("NotOnOrAfter")
        if not_on_or_after is not None:
            moment = parse_instant(not_on_or_after)
            if moment is None or moment + self._skew <= now:
                raise _refuse("Assertion has expired (Conditions NotOnOrAfter)")
            limits.append(moment)
        confirmed = False
        for confirmation in assertion.iterfind(f"{{{SAML}}}Subject/{{{SAML}}}SubjectConfirmation"):
            data = confirmation.find(f"{{{SAML}}}SubjectConfirmationData")
            if confirmation.get("Method") != CM_BEARER or data is None:
                continue
            if data.get("Recipient") != self.acs_url:
                raise _refuse(f"SubjectConfirmationData Recipient {data.get('Recipient')!r}")
            if data.get("InResponseTo") != pending.request_id:
                raise _refuse("SubjectConfirmationData InResponseTo is not this flow's request")
            expiry = parse_instant(data.get("NotOnOrAfter"))
            if expiry is None or expiry + self._skew <= now:
                raise _refuse("bearer SubjectConfirmationData has expired or has no NotOnOrAfter")
            start = data.get("NotBefore")
            if start is not None:
                moment = parse_instant(start)
                if moment is None or moment - self._skew > now:
                    raise _refuse("bearer SubjectConfirmationData is not yet valid")
            limits.append(expiry)
            confirmed = True
        if not confirmed:
            raise _refuse("Assertion has no bearer SubjectConfirmation")
        if assertion.find(f"{{{SAML}}}AuthnStatement") is None:
            raise _refuse("Assertion has no AuthnStatement")
        return min(limits)

    # --- ServesMetadata, Federated, Lifecycle ------------------------------------------

    def metadata(self) -> Document:
        return Document(content_type=METADATA_CONTENT_TYPE, body=self._metadata_doc)

    def find_idps(self, query: str, limit: int) -> Sequence[IdpChoice]:
        if self._idp is None:
            return [
                IdpChoice(e.entity_id, e.display_name) for e in self._store.search(query, limit)
            ]
        only = self._configured
        if only is None or limit < 1:
            return []
        haystack = f"{only.display_name}\x00{only.entity_id}".lower()
        if all(word in haystack for word in query.lower().split()):
            return [IdpChoice(only.entity_id, only.display_name)]
        return []

    async def idp(self, entity_id: str) -> IdpChoice | None:
        if self._idp is not None and entity_id != self._idp:
            return None
        entity = await self._store.lookup(entity_id)
        if entity is None or not entity.is_idp:
            return None
        return IdpChoice(entity.entity_id, entity.display_name)

    async def start(self) -> None:
        await self._store.start()
        if self._idp is not None:
            self._configured = await self._store.lookup(self._idp)
            if self._configured is None or not self._configured.is_idp:
                raise ConfigurationError(
                    f"SAML upstream {self.id}: IdP {self._idp!r} is not in its metadata"
                )

    async def close(self) -> None:
        await self._store.close()
        self._clients.clear()
        self._cleanup()


def _check_keypair(key_pem: str, cert_pem: str) -> None:
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except (ValueError, TypeError):
        raise ConfigurationError(
            "SAML sp_key / sp_cert must be an unencrypted PEM private key and a PEM certificate"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigurationError("SAML sp_key must be an RSA key (xmlsec1 signs with RSA-SHA256)")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != cert.public_key().public_bytes(
        encoding, public
    ):
        raise ConfigurationError("SAML sp_cert does not belong to sp_key")
