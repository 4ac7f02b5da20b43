"""SAML 2.0 metadata: load, verify, index and look up the IdPs of a federation.

Sources:
- `FileSource`: a local file the operator placed, trusted as is (no signature check).
- `AggregateSource`: a federation aggregate fetched over HTTP(S), verified against one
  configured signing certificate before anything in it is indexed, refreshed in the background.
- `MdqSource`: per-entity Metadata Query (draft-young-md-query), verified the same way, cached.

`MetadataStore.lookup` (what a sign-in calls) is a dict lookup per loaded source, then an MDQ
query on a miss; it never scans. Only IdPs that pass the store's filters are ever indexed.

Every document is parsed with DTDs, entities and network access refused; a DOCTYPE is refused
outright (before xmlsec1 sees the document, since the xmlsec1 tool expands entities).
Large aggregates are parsed incrementally (iterparse, clearing each entity once indexed), so the
memory held is the index, not the tree: 10,000 eduGAIN-shaped entities (59 MB of XML) peak
near 130 MB RSS in the broker process (bench/saml_metadata.py).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import heapq
import io
import re
import shutil
import tempfile
import time
import unicodedata
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from hashlib import sha1
from pathlib import Path
from typing import IO, Any, Literal

import aiohttp
import structlog
from cryptography import x509
from lxml import etree

from adapters.errors import ConfigurationError, UpstreamFailed

log = structlog.get_logger(__name__)

MD = "urn:oasis:names:tc:SAML:2.0:metadata"
MDUI = "urn:oasis:names:tc:SAML:metadata:ui"
MDRPI = "urn:oasis:names:tc:SAML:metadata:rpi"
MDATTR = "urn:oasis:names:tc:SAML:metadata:attribute"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
SHIBMD = "urn:mace:shibboleth:metadata:1.0"
DS = "http://www.w3.org/2000/09/xmldsig#"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
ENTITY_CATEGORY = "http://macedir.org/entity-category"
ENTITY_CATEGORY_SUPPORT = "http://macedir.org/entity-category-support"
BINDING_REDIRECT = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"
BINDING_POST = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
MDQ_MEDIA_TYPE = "application/samlmetadata+xml"

_ENTITIES = f"{{{MD}}}EntitiesDescriptor"
_ENTITY = f"{{{MD}}}EntityDescriptor"
_IDP = f"{{{MD}}}IDPSSODescriptor"
_SIGNATURE = f"{{{DS}}}Signature"

# What a metadata signature may use. Anything else (XPath/XSLT transforms above all, which can
# exclude parts of the document from the digest) is refused even if xmlsec1 accepts it.
_C14N = frozenset(
    {
        "http://www.w3.org/2001/10/xml-exc-c14n#",
        "http://www.w3.org/2001/10/xml-exc-c14n#WithComments",
        "http://www.w3.org/TR/2001/REC-xml-c14n-20010315",
        "http://www.w3.org/TR/2001/REC-xml-c14n-20010315#WithComments",
        "http://www.w3.org/2006/12/xml-c14n11",
        "http://www.w3.org/2006/12/xml-c14n11#WithComments",
    }
)
_ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
_SIGNATURE_METHODS = frozenset(
    {
        "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
        "http://www.w3.org/2001/04/xmldsig-more#rsa-sha384",
        "http://www.w3.org/2001/04/xmldsig-more#rsa-sha512",
        "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256",
        "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384",
        "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512",
    }
)
_DIGEST_METHODS = frozenset(
    {
        "http://www.w3.org/2001/04/xmlenc#sha256",
        "http://www.w3.org/2001/04/xmldsig-more#sha384",
        "http://www.w3.org/2001/04/xmlenc#sha512",
    }
)
# The one Signature xmlsec1 may verify: a direct child of the document element.
_ROOT_SIGNATURE_XPATH = f"/*/*[local-name()='Signature' and namespace-uri()='{DS}']"

MAX_AGGREGATE_BYTES = 512 * 1024 * 1024  # eduGAIN is ~80 MB
MAX_MDQ_BYTES = 4 * 1024 * 1024
MAX_ENTITY_ID = 1024
MDQ_NEGATIVE_TTL = 60.0
MDQ_CACHE_ENTRIES = 10_000
XMLSEC_TIMEOUT = 120.0
_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class Scope:
    """A `shibmd:Scope`: the domains an IdP may assert in scoped attributes."""

    value: str
    regexp: bool = False

    def allows(self, domain: str) -> bool:
        """True if `domain` (the part after '@' of a scoped value) is within this scope."""
        if self.regexp:
            pattern = _compile(self.value)
            return pattern is not None and pattern.fullmatch(domain) is not None
        return domain.lower() == self.value.lower()


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


@dataclass(frozen=True, slots=True)
class Endpoint:
    binding: str
    location: str


@dataclass(frozen=True, slots=True)
class EntityInfo:
    """What the broker needs to know about one entity of the metadata."""

    entity_id: str
    display_name: str  # English mdui:DisplayName, else unlabelled, else any, else Organization
    is_idp: bool
    is_sp: bool
    scopes: tuple[Scope, ...]
    signing_certs: tuple[str, ...]  # base64 DER, as in ds:X509Certificate
    sso_endpoints: tuple[Endpoint, ...]
    entity_categories: tuple[str, ...]
    registration_authority: str | None
    xml: bytes  # this EntityDescriptor on its own, namespaces declared
    display_names: tuple[tuple[str, str], ...] = ()  # (xml:lang, name), document order

    def allows_scope(self, domain: str) -> bool:
        return any(scope.allows(domain) for scope in self.scopes)


@dataclass(frozen=True, slots=True)
class ParsedMetadata:
    entities: tuple[EntityInfo, ...]
    valid_until: datetime | None
    cache_duration: str | None  # xs:duration as written, e.g. "PT6H"


def _fold(text: str) -> str:
    """Case- and accent-insensitive form for search: 'Universität' -> 'universitat'."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


class MetadataIndex:
    """Entities by id, plus a search over IdP names, entity ids and scopes for the chooser."""

    def __init__(
        self,
        entities: Iterable[EntityInfo],
        valid_until: datetime | None = None,
        cache_duration: str | None = None,
    ) -> None:
        self._by_id = {entity.entity_id: entity for entity in entities}
        self.valid_until = valid_until
        self.cache_duration = cache_duration
        self.expires = valid_until.timestamp() if valid_until else float("inf")
        keyed = sorted(
            ((_fold(e.display_name), e) for e in self._by_id.values() if e.is_idp),
            key=lambda pair: pair[0],
        )
        self._idps = [e for _, e in keyed]
        self._haystacks = [_haystack(e) for e in self._idps]
        # One string for all IdPs: str.find runs in C over it, so a query costs one pass at
        # memchr speed plus a bisect per hit, instead of a Python loop over every IdP.
        self._starts: list[int] = []
        offset = 0
        for hay in self._haystacks:
            self._starts.append(offset)
            offset += len(hay) + 1
        self._text = "\n".join(self._haystacks)

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, entity_id: str) -> EntityInfo | None:
        return self._by_id.get(entity_id)

    def search(self, query: str, limit: int) -> list[EntityInfo]:
        """IdPs whose names, entity id or scopes contain every word of `query`, by name."""
        words = list(dict.fromkeys(_fold(query).replace("\x00", " ").split()))
        if not words:
            return self._idps[:limit]
        if len(words) > 1:
            # Walk the hits of the rarest word, estimated on a sample (a C pass over 64 KB).
            words.sort(key=lambda word: (self._text.count(word, 0, 65536), -len(word)))
        first, rest = words[0], words[1:]
        found: list[EntityInfo] = []
        at = self._text.find(first)
        while at >= 0 and len(found) < limit:
            i = bisect.bisect_right(self._starts, at) - 1
            if all(word in self._haystacks[i] for word in rest):
                found.append(self._idps[i])
            next_start = self._starts[i + 1] if i + 1 < len(self._starts) else len(self._text)
            at = self._text.find(first, next_start)
        return found


def _haystack(entity: EntityInfo) -> str:
    names = {name for _, name in entity.display_names} | {entity.display_name}
    parts = [*sorted(names), entity.entity_id, *(s.value for s in entity.scopes if not s.regexp)]
    # Words never hold whitespace or NUL, so a match never spans two fields or two IdPs.
    return _fold("\x00".join(parts)).replace("\n", " ")


# --- parsing -------------------------------------------------------------------------------


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, remove_comments=True
    )


def parse_xml(data: bytes) -> etree._Element:
    """Parse untrusted XML; a DOCTYPE (and so any entity declaration) is refused."""
    try:
        tree = etree.fromstring(data, _parser()).getroottree()
    except etree.XMLSyntaxError as error:
        raise ConfigurationError(f"the metadata is not well-formed XML: {error}") from None
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise ConfigurationError("metadata with a DOCTYPE is refused")
    return tree.getroot()


def _display_names(entity: etree._Element) -> list[tuple[str, str]]:
    found = [
        (el.get(XML_LANG, ""), (el.text or "").strip())
        for el in entity.iterfind(
            f"{{{MD}}}*/{{{MD}}}Extensions/{{{MDUI}}}UIInfo/{{{MDUI}}}DisplayName"
        )
    ]
    if not any(name for _, name in found):
        found = [
            (el.get(XML_LANG, ""), (el.text or "").strip())
            for el in entity.iterfind(f"{{{MD}}}Organization/{{{MD}}}OrganizationDisplayName")
        ]
    return [(lang, name) for lang, name in found if name]


def _pick_name(names: Sequence[tuple[str, str]], fallback: str) -> str:
    english = (name for lang, name in names if lang.lower().split("-")[0] == "en")
    unlabelled = (name for lang, name in names if not lang)
    return next(english, None) or next(unlabelled, None) or (names[0][1] if names else fallback)


def _entity_info(entity: etree._Element) -> EntityInfo:
    entity_id = entity.get("entityID")
    if not entity_id:
        raise ConfigurationError("an EntityDescriptor has no entityID")
    idp = entity.find(_IDP)
    scopes: list[Scope] = []
    certs: list[str] = []
    endpoints: list[Endpoint] = []
    if idp is not None:
        for el in idp.iterfind(f"{{{MD}}}Extensions/{{{SHIBMD}}}Scope"):
            if el.text and el.text.strip():
                regexp = (el.get("regexp") or "false").strip().lower() in ("true", "1")
                scopes.append(Scope(el.text.strip(), regexp))
        for kd in idp.iterfind(f"{{{MD}}}KeyDescriptor"):
            if kd.get("use") in (None, "signing"):
                for cert in kd.iterfind(f".//{{{DS}}}X509Certificate"):
                    if cert.text:
                        certs.append("".join(cert.text.split()))
        for sso in idp.iterfind(f"{{{MD}}}SingleSignOnService"):
            endpoints.append(Endpoint(sso.get("Binding", ""), sso.get("Location", "")))
    names = _display_names(entity)
    return EntityInfo(
        entity_id=entity_id,
        display_name=_pick_name(names, entity_id),
        is_idp=idp is not None,
        is_sp=entity.find(f"{{{MD}}}SPSSODescriptor") is not None,
        scopes=tuple(scopes),
        signing_certs=tuple(certs),
        sso_endpoints=tuple(endpoints),
        entity_categories=_categories(entity),
        registration_authority=_registration_authority(entity),
        xml=etree.tostring(entity, with_tail=False),
        display_names=tuple(names),
    )


def _categories(entity: etree._Element) -> tuple[str, ...]:
    attributes = f"{{{MD}}}Extensions/{{{MDATTR}}}EntityAttributes/{{{SAML}}}Attribute"
    return tuple(
        value.text.strip()
        for attr in entity.iterfind(attributes)
        if attr.get("Name") in (ENTITY_CATEGORY, ENTITY_CATEGORY_SUPPORT)
        for value in attr.iterfind(f"{{{SAML}}}AttributeValue")
        if value.text and value.text.strip()
    )


def _registration_authority(entity: etree._Element) -> str | None:
    registration = entity.find(f"{{{MD}}}Extensions/{{{MDRPI}}}RegistrationInfo")
    return registration.get("registrationAuthority") if registration is not None else None


def _datetime(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigurationError(f"validUntil {value!r} is not a date-time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


_DURATION = re.compile(
    r"P(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?"
)


def duration_seconds(value: str | None) -> float | None:
    """An xs:duration such as "PT6H" in seconds (a year as 365 days, a month as 30); None if
    absent, negative or malformed."""
    match = _DURATION.fullmatch(value.strip()) if value else None
    if match is None or not any(match.groups()):
        return None
    years, months, days, hours, minutes, seconds = (float(g or 0) for g in match.groups())
    return ((years * 365 + months * 30 + days) * 24 + hours) * 3600 + minutes * 60 + seconds


@dataclass(slots=True)
class _SignatureFacts:
    """What the root's ds:Signature claims, to be checked beyond what xmlsec1 checks."""

    c14n: str | None
    method: str | None
    references: list[tuple[str | None, list[str | None], str | None]]  # URI, transforms, digest
    has_object: bool


@dataclass(slots=True)
class _Document:
    root_tag: str = ""
    root_id: str | None = None
    valid_until: datetime | None = None
    cache_duration: str | None = None
    entities: list[EntityInfo] = field(default_factory=list)
    root_signatures: list[_SignatureFacts] = field(default_factory=list)
    root_id_reused: bool = False


def _signature_facts(signature: etree._Element) -> _SignatureFacts:
    signed_info = signature.find(f"{{{DS}}}SignedInfo")
    if signed_info is None:
        return _SignatureFacts(None, None, [], signature.find(f"{{{DS}}}Object") is not None)
    c14n = signed_info.find(f"{{{DS}}}CanonicalizationMethod")
    method = signed_info.find(f"{{{DS}}}SignatureMethod")
    references = []
    for ref in signed_info.iterfind(f"{{{DS}}}Reference"):
        transforms = [
            t.get("Algorithm") for t in ref.iterfind(f"{{{DS}}}Transforms/{{{DS}}}Transform")
        ]
        digest = ref.find(f"{{{DS}}}DigestMethod")
        references.append(
            (ref.get("URI"), transforms, digest.get("Algorithm") if digest is not None else None)
        )
    return _SignatureFacts(
        c14n.get("Algorithm") if c14n is not None else None,
        method.get("Algorithm") if method is not None else None,
        references,
        signature.find(f"{{{DS}}}Object") is not None,
    )


def _read(
    source: str | IO[bytes],
    *,
    keep: Callable[[EntityInfo], bool] | None = None,
    idp_only: bool = False,
    now: float | None = None,
) -> _Document:
    """One incremental pass over a metadata document.

    Each EntityDescriptor is turned into an EntityInfo (if `keep` says so) and then cleared with
    everything before it, so the tree never holds more than one entity. With `idp_only`, entities
    without an IDPSSODescriptor are skipped before any work; with `now`, entities whose own
    validUntil has passed are skipped. Also records the root's Signature(s) for `_check_signed`.
    """
    doc = _Document()
    root: etree._Element | None = None
    context = etree.iterparse(
        source,
        events=("start", "end"),
        tag=(_ENTITIES, _ENTITY, _SIGNATURE),
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        remove_comments=True,
        remove_pis=True,
    )
    try:
        for event, elem in context:
            if root is None:
                info = elem.getroottree().docinfo
                if info.doctype or info.internalDTD is not None:
                    raise ConfigurationError("metadata with a DOCTYPE is refused")
                if elem.getparent() is not None or elem.tag == _SIGNATURE:
                    raise ConfigurationError("the document is not SAML 2.0 metadata")
                root = elem
                doc.root_tag, doc.root_id = str(elem.tag), elem.get("ID")
                doc.valid_until = _datetime(elem.get("validUntil"))
                doc.cache_duration = elem.get("cacheDuration")
            if event == "start":
                if elem is not root and doc.root_id and elem.get("ID") == doc.root_id:
                    doc.root_id_reused = True
                continue
            if elem.tag == _SIGNATURE:
                if elem.getparent() is root:
                    doc.root_signatures.append(_signature_facts(elem))
                continue
            if elem.tag == _ENTITIES:
                continue
            if not (idp_only and elem.find(_IDP) is None) and _current(elem, now):
                entity = _entity_info(elem)
                if keep is None or keep(entity):
                    doc.entities.append(entity)
            if elem is not root:
                elem.clear(keep_tail=False)
                parent = elem.getparent()
                while parent is not None and elem.getprevious() is not None:
                    del parent[0]
    except etree.XMLSyntaxError as error:
        raise ConfigurationError(f"the metadata is not well-formed XML: {error}") from None
    if root is None:
        raise ConfigurationError("the document is not SAML 2.0 metadata")
    return doc


def _current(entity: etree._Element, now: float | None) -> bool:
    if now is None:
        return True
    valid_until = _datetime(entity.get("validUntil"))
    return valid_until is None or valid_until.timestamp() > now


def parse_metadata(data: bytes) -> ParsedMetadata:
    """Every EntityDescriptor of a metadata document (an aggregate or a single entity).
    No signature is checked here: callers verify first and parse the verified bytes."""
    doc = _read(io.BytesIO(data))
    return ParsedMetadata(tuple(doc.entities), doc.valid_until, doc.cache_duration)


def _check_signed(doc: _Document, now: float) -> None:
    """The structural half of verification, after xmlsec1 accepted the root's signature.

    xmlsec1 only says "the first ds:Signature under the document element verifies with this
    key". That alone would accept a signature whose Reference points at a nested copy of the
    originally signed element (wrapping), or that uses transforms selecting only part of the
    document. So: exactly one Signature on the root, one Reference, to the whole document ("")
    or the root's own unique ID, enveloped + canonicalisation transforms only.
    """
    if len(doc.root_signatures) != 1:
        raise ConfigurationError(
            f"the document element carries {len(doc.root_signatures)} signatures, not 1"
        )
    sig = doc.root_signatures[0]
    if sig.has_object or len(sig.references) != 1:
        raise ConfigurationError("the metadata signature must have one Reference and no Object")
    uri, transforms, digest = sig.references[0]
    if uri not in ("", f"#{doc.root_id}") or (uri != "" and not doc.root_id):
        raise ConfigurationError(f"the metadata signature references {uri!r}, not the document")
    if doc.root_id_reused:
        raise ConfigurationError("the document element's ID is used by another element too")
    if _ENVELOPED not in transforms or not set(transforms) <= _C14N | {_ENVELOPED}:
        raise ConfigurationError(f"the metadata signature uses transforms {transforms}")
    if (
        sig.c14n not in _C14N
        or sig.method not in _SIGNATURE_METHODS
        or digest not in (_DIGEST_METHODS)
    ):
        raise ConfigurationError(
            f"the metadata signature uses {sig.c14n} / {sig.method} / {digest}"
        )
    _check_current(doc, now)


def _check_current(doc: _Document, now: float) -> None:
    if doc.valid_until is None:
        # Without validUntil a signed document could be replayed for ever (e.g. one that still
        # lists a since-removed IdP); every federation and MDQ responder sets it.
        raise ConfigurationError("the signed metadata has no validUntil")
    if doc.valid_until.timestamp() <= now:
        raise ConfigurationError(f"the metadata expired at {doc.valid_until.isoformat()}")


def _refuse_doctype(path: Path) -> str:
    """The document element's tag; refuses a DOCTYPE before xmlsec1 (which would expand
    entities and load external ones) reads the file. Reads only up to the first element."""
    parser = etree.XMLPullParser(
        events=("start",), resolve_entities=False, no_network=True, load_dtd=False
    )
    with path.open("rb") as stream:
        while chunk := stream.read(64 * 1024):
            try:
                parser.feed(chunk)
            except etree.XMLSyntaxError as error:
                raise ConfigurationError(f"the metadata is not well-formed XML: {error}") from None
            for _, elem in parser.read_events():
                info = elem.getroottree().docinfo
                if info.doctype or info.internalDTD is not None:
                    raise ConfigurationError("metadata with a DOCTYPE is refused")
                if elem.tag not in (_ENTITIES, _ENTITY):
                    raise ConfigurationError("the document is not SAML 2.0 metadata")
                return str(elem.tag)
    raise ConfigurationError("the document is not SAML 2.0 metadata")


async def _xmlsec_verify(xmlsec1: str, path: Path, cert: Path, root_tag: str) -> None:
    """xmlsec1 verifies the Signature that is a direct child of the document element.

    Why the xmlsec1 binary: pysaml2 (the SP) already requires it, so it adds no dependency, and
    it verifies a 60 MB aggregate in ~2 s in its own process (off the event loop, its memory
    gone when it exits). `--enabled-key-data key-name` matters: by default xmlsec1 also takes a
    key from the signature's own KeyInfo (a KeyValue) and would accept a document signed by
    anyone who embeds their public key; with it, only the configured certificate's key is used.
    """
    namespace, _, local = root_tag[1:].partition("}")
    process = await asyncio.create_subprocess_exec(
        xmlsec1,
        "--verify",
        "--enabled-key-data",
        "key-name",
        "--enabled-reference-uris",
        "empty,same-doc",
        "--id-attr:ID",
        f"{namespace}:{local}",
        "--node-xpath",
        _ROOT_SIGNATURE_XPATH,
        "--pubkey-cert-pem",
        str(cert),
        str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), XMLSEC_TIMEOUT)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
        detail = "; ".join(lines[-3:])[:300]
        raise ConfigurationError(f"the metadata signature does not verify: {detail}")


# --- sources -------------------------------------------------------------------------------


def _load_certificate(pem: str, what: str) -> None:
    try:
        x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise ConfigurationError(f"{what}: signing_cert_pem is not a PEM certificate") from None


def _check_url(url: str, what: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigurationError(f"{what}: {_safe_url(url)!r} is not an http(s) URL")


def _safe_url(url: str) -> str:
    """For logs and errors: no userinfo, query or fragment."""
    parsed = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parsed.scheme, parsed.hostname or "", parsed.path, "", ""))


@dataclass(frozen=True, slots=True)
class FileSource:
    """Metadata from a local file, trusted as the operator placed it; loaded once by start()."""

    path: Path


@dataclass(frozen=True, slots=True)
class AggregateSource:
    """A federation aggregate at `url`, signed with the key of `signing_cert_pem` (one PEM
    certificate; its validity dates are not checked, as federations sign with long-lived
    self-signed certificates whose trust is this configuration).

    Refresh rule: the next fetch is due after `cacheDuration` (or `max_refresh` if absent), but
    never later than half the time left until `validUntil`, clamped to [min_refresh,
    max_refresh]. A failed refresh keeps the last good copy and retries after `min_refresh`; a
    copy whose validUntil passes is dropped (its IdPs no longer resolve) until a fetch succeeds.
    Fetches are conditional (ETag / Last-Modified), so an unchanged aggregate costs a 304.
    """

    url: str
    signing_cert_pem: str
    _: KW_ONLY
    min_refresh: float = 300
    max_refresh: float = 86400

    def __post_init__(self) -> None:
        _check_url(self.url, "AggregateSource")
        _load_certificate(self.signing_cert_pem, f"AggregateSource {_safe_url(self.url)}")
        if not 0 < self.min_refresh <= self.max_refresh:
            raise ConfigurationError("AggregateSource: need 0 < min_refresh <= max_refresh")

    def next_refresh(self, doc_valid_until: datetime | None, cache_duration: str | None) -> float:
        """Seconds until the next fetch after a successful one (see the class docstring)."""
        due = duration_seconds(cache_duration) or self.max_refresh
        if doc_valid_until is not None:
            due = min(due, (doc_valid_until.timestamp() - time.time()) / 2)
        return min(self.max_refresh, max(self.min_refresh, due))


@dataclass(frozen=True, slots=True)
class MdqSource:
    """A Metadata Query responder (draft-young-md-query): GET {base_url}/entities/{id}.

    `id_form="urlencoded"` (the default; every responder must support it) sends the entity id
    percent-encoded; `"sha1"` sends the draft's transformed form `{sha1}<hex of SHA-1(id)>`,
    which some responders (and static MDQ mirrors) serve instead. Answers are verified like an
    aggregate and must describe exactly the entity asked for. Positive answers are cached for
    min(cache_ttl, cacheDuration, time to validUntil), 404s for MDQ_NEGATIVE_TTL. Entities known
    only through MDQ appear in `search` only once a lookup has fetched them.
    """

    base_url: str
    signing_cert_pem: str
    _: KW_ONLY
    cache_ttl: float = 3600
    id_form: Literal["urlencoded", "sha1"] = "urlencoded"

    def __post_init__(self) -> None:
        _check_url(self.base_url, "MdqSource")
        _load_certificate(self.signing_cert_pem, f"MdqSource {_safe_url(self.base_url)}")
        if self.cache_ttl <= 0:
            raise ConfigurationError("MdqSource: cache_ttl must be positive")

    def url_for(self, entity_id: str) -> str:
        if self.id_form == "sha1":
            key = "{sha1}" + sha1(entity_id.encode()).hexdigest()  # noqa: S324 - named by MDQ
        else:
            key = entity_id
        return f"{self.base_url.rstrip('/')}/entities/{urllib.parse.quote(key, safe='')}"


MetadataSource = FileSource | AggregateSource | MdqSource


@dataclass(slots=True)
class _Loaded:
    index: MetadataIndex
    etag: str | None = None
    last_modified: str | None = None


@dataclass(slots=True)
class _Cached:
    expires: float  # time.monotonic()
    entity: EntityInfo | None
    haystack: str = ""


class MetadataStore:
    """The IdPs of one SAML upstream, from all its sources, after its filters.

    Filters apply to every source: entities without an IDPSSODescriptor never reach the index;
    with `entity_categories`, only IdPs with any of them (entity-category or -support); with
    `registration_authorities`, only IdPs registered by any of them. Where sources overlap, the
    earlier source in `sources` wins.
    """

    def __init__(
        self,
        sources: Sequence[MetadataSource],
        *,
        http: aiohttp.ClientSession,
        entity_categories: Sequence[str] = (),
        registration_authorities: Sequence[str] = (),
    ) -> None:
        self._sources = tuple(sources)
        self._http = http
        self._categories = frozenset(entity_categories)
        self._authorities = frozenset(registration_authorities)
        self._loaded: dict[int, _Loaded] = {}
        self._indexes: tuple[MetadataIndex, ...] = ()
        self._mdq = tuple((n, s) for n, s in enumerate(self._sources) if isinstance(s, MdqSource))
        self._mdq_cache: OrderedDict[tuple[int, str], _Cached] = OrderedDict()
        self._inflight: dict[tuple[int, str], asyncio.Future[EntityInfo | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._workdir: Path | None = None
        self._certs: dict[int, Path] = {}
        self._xmlsec1 = ""
        self._fetches = 0

    def _wanted(self, entity: EntityInfo) -> bool:
        if not entity.is_idp:
            return False
        if self._categories and not self._categories.intersection(entity.entity_categories):
            return False
        return not self._authorities or entity.registration_authority in self._authorities

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load every file and aggregate once (ConfigurationError if one cannot be loaded or
        verified), then start the aggregates' refresh tasks."""
        signed = [(n, s) for n, s in enumerate(self._sources) if not isinstance(s, FileSource)]
        if signed:
            found = shutil.which("xmlsec1")
            if found is None:
                raise ConfigurationError("xmlsec1 is needed to verify SAML metadata signatures")
            self._xmlsec1 = found
            self._workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="saml-md-"))
            for n, signed_source in signed:
                self._certs[n] = self._workdir / f"signer-{n}.pem"
                self._certs[n].write_text(signed_source.signing_cert_pem)
        try:
            for n, source in enumerate(self._sources):
                if isinstance(source, FileSource):
                    self._loaded[n] = await self._load_file(source)
                elif isinstance(source, AggregateSource):
                    try:
                        loaded = await self._load_aggregate(n, source, None)
                    except UpstreamFailed as error:
                        raise ConfigurationError(str(error.log_detail)) from None
                    assert loaded is not None  # no previous copy, so never "not modified"
                    self._loaded[n] = loaded
            self._publish()
        except BaseException:
            await self.close()
            raise
        for n, source in enumerate(self._sources):
            if isinstance(source, AggregateSource):
                index = self._loaded[n].index
                first = source.next_refresh(index.valid_until, index.cache_duration)
                self._tasks.append(asyncio.create_task(self._refresh_loop(n, source, first)))

    async def close(self) -> None:
        """Stop the refresh tasks and MDQ queries; remove the working files."""
        pending: list[asyncio.Future[Any]] = [*self._tasks, *self._inflight.values()]
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._workdir is not None:
            await asyncio.to_thread(shutil.rmtree, self._workdir, True)
            self._workdir = None

    # --- queries --------------------------------------------------------------------------

    async def lookup(self, entity_id: str) -> EntityInfo | None:
        """The IdP `entity_id`, or None if no source knows it (or it is filtered out).

        A dict lookup per loaded source; on a miss, MDQ sources are queried (and cached).
        Raises UpstreamFailed if an MDQ responder fails or its answer does not verify.
        """
        now = time.time()
        for index in self._indexes:
            found = index.get(entity_id)
            if found is not None and index.expires > now:
                return found
        for n, source in self._mdq:
            found = await self._mdq_lookup(n, source, entity_id)
            if found is not None:
                return found
        return None

    def search(self, query: str, limit: int) -> list[EntityInfo]:
        """IdPs for the chooser: every word of `query` in a name, the entity id or a scope."""
        now = time.time()
        lists = [index.search(query, limit) for index in self._indexes if index.expires > now]
        if self._mdq_cache:
            lists.append(self._search_mdq_cache(query, limit))
        if len(lists) == 1:
            return lists[0]
        found: list[EntityInfo] = []
        seen: set[str] = set()
        for entity in heapq.merge(*lists, key=lambda e: _fold(e.display_name)):
            if entity.entity_id not in seen:
                seen.add(entity.entity_id)
                found.append(entity)
                if len(found) >= limit:
                    break
        return found

    def __len__(self) -> int:
        """IdPs indexed from files and aggregates (MDQ answers not counted)."""
        now = time.time()
        return sum(len(index) for index in self._indexes if index.expires > now)

    # --- loading --------------------------------------------------------------------------

    def _publish(self) -> None:
        self._indexes = tuple(self._loaded[n].index for n in sorted(self._loaded))

    async def _load_file(self, source: FileSource) -> _Loaded:
        def load() -> MetadataIndex:
            try:
                with Path(source.path).open("rb") as stream:
                    doc = _read(stream, keep=self._wanted, idp_only=True, now=time.time())
            except OSError as error:
                raise ConfigurationError(
                    f"cannot read SAML metadata {source.path}: {error.strerror}"
                ) from None
            if doc.valid_until is not None and doc.valid_until.timestamp() <= time.time():
                raise ConfigurationError(
                    f"SAML metadata {source.path} expired at {doc.valid_until.isoformat()}"
                )
            return _index(doc)

        return _Loaded(await asyncio.to_thread(load))

    async def _load_aggregate(
        self, n: int, source: AggregateSource, previous: _Loaded | None
    ) -> _Loaded | None:
        """Fetch, verify, index; None if the server says the aggregate has not changed.
        ConfigurationError if it does not verify or has expired, UpstreamFailed if unreachable."""
        assert self._workdir is not None
        headers = {"Accept": f"{MDQ_MEDIA_TYPE}, application/xml;q=0.9, text/xml;q=0.8"}
        if previous is not None and previous.etag:
            headers["If-None-Match"] = previous.etag
        if previous is not None and previous.last_modified:
            headers["If-Modified-Since"] = previous.last_modified
        self._fetches += 1
        path = self._workdir / f"aggregate-{n}-{self._fetches}.xml"
        try:
            validators = await self._download(source.url, headers, path)
            if validators is None:
                return None
            doc = await self._verify_and_read(n, path, wanted_only=True)
        finally:
            await asyncio.to_thread(path.unlink, True)
        index = await asyncio.to_thread(_index, doc)
        return _Loaded(index, *validators)

    async def _download(
        self, url: str, headers: dict[str, str], path: Path
    ) -> tuple[str | None, str | None] | None:
        """Stream `url` into `path` (never the whole body in memory); its (ETag, Last-Modified)
        for the next conditional GET, or None on 304."""
        try:
            async with self._http.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=600, sock_read=60)
            ) as response:
                if response.status == 304:
                    return None
                if response.status != 200:
                    raise UpstreamFailed(
                        log_detail=f"GET {_safe_url(url)} answered {response.status}"
                    )
                size = 0
                with await asyncio.to_thread(path.open, "wb") as out:
                    async for chunk in response.content.iter_chunked(_CHUNK):
                        size += len(chunk)
                        if size > MAX_AGGREGATE_BYTES:
                            raise UpstreamFailed(
                                log_detail=f"{_safe_url(url)} is over {MAX_AGGREGATE_BYTES} bytes"
                            )
                        await asyncio.to_thread(out.write, chunk)
                return response.headers.get("ETag"), response.headers.get("Last-Modified")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise UpstreamFailed(
                log_detail=f"GET {_safe_url(url)} failed: {type(error).__name__} {error}"
            ) from None

    async def _verify_and_read(self, n: int, path: Path, *, wanted_only: bool) -> _Document:
        """Verify first (xmlsec1, after refusing a DOCTYPE), then read and check the structure
        of the signature; nothing of an unverified document reaches an index."""
        root_tag = await asyncio.to_thread(_refuse_doctype, path)
        await _xmlsec_verify(self._xmlsec1, path, self._certs[n], root_tag)
        keep = self._wanted if wanted_only else None

        def read() -> _Document:
            now = time.time()
            with path.open("rb") as stream:
                doc = _read(stream, keep=keep, idp_only=wanted_only, now=now)
            _check_signed(doc, now)
            return doc

        return await asyncio.to_thread(read)

    async def _refresh_loop(self, n: int, source: AggregateSource, delay: float) -> None:
        url = _safe_url(source.url)
        while True:
            await asyncio.sleep(delay)
            current = self._loaded.get(n)
            try:
                loaded = await self._load_aggregate(n, source, current)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                detail = getattr(error, "log_detail", "") or str(error)
                delay = source.min_refresh
                if current is not None:
                    left = current.index.expires - time.time()
                    if left <= 0:
                        del self._loaded[n]
                        self._publish()
                        log.error("saml_metadata_expired", url=url, reason=detail)
                    else:
                        delay = min(delay, left)
                log.warning("saml_metadata_refresh_failed", url=url, reason=detail, retry_in=delay)
                continue
            if loaded is None and current is None:
                # 304 to an unconditional GET (the copy expired meanwhile): a server bug.
                delay = source.min_refresh
                log.warning("saml_metadata_refresh_failed", url=url, reason="304", retry_in=delay)
                continue
            if loaded is None:
                assert current is not None
                index = current.index
                log.debug("saml_metadata_not_modified", url=url)
            else:
                self._loaded[n] = loaded
                self._publish()
                index = loaded.index
                log.info("saml_metadata_refreshed", url=url, idps=len(index))
            delay = source.next_refresh(index.valid_until, index.cache_duration)

    # --- MDQ ------------------------------------------------------------------------------

    async def _mdq_lookup(self, n: int, source: MdqSource, entity_id: str) -> EntityInfo | None:
        if not entity_id or len(entity_id) > MAX_ENTITY_ID:
            return None
        key = (n, entity_id)
        cached = self._mdq_cache.get(key)
        if cached is not None and cached.expires > time.monotonic():
            self._mdq_cache.move_to_end(key)
            return cached.entity
        # Concurrent sign-ins for one uncached IdP share one query; shield it so that one
        # cancelled request does not cancel the others' answer.
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._mdq_fetch(n, source, entity_id))
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    async def _mdq_fetch(self, n: int, source: MdqSource, entity_id: str) -> EntityInfo | None:
        assert self._workdir is not None
        url = source.url_for(entity_id)
        try:
            async with self._http.get(
                url,
                headers={"Accept": MDQ_MEDIA_TYPE},
                timeout=aiohttp.ClientTimeout(total=30),
            ) as response:
                if response.status == 404:
                    self._cache(n, entity_id, None, MDQ_NEGATIVE_TTL)
                    return None
                if response.status != 200:
                    raise UpstreamFailed(
                        log_detail=f"MDQ {_safe_url(url)} answered {response.status}"
                    )
                data = await response.content.read(MAX_MDQ_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise UpstreamFailed(
                log_detail=f"MDQ {_safe_url(url)} failed: {type(error).__name__} {error}"
            ) from None
        self._fetches += 1
        path = self._workdir / f"mdq-{n}-{self._fetches}.xml"
        try:
            if len(data) > MAX_MDQ_BYTES:
                raise ConfigurationError(f"the answer is over {MAX_MDQ_BYTES} bytes")
            await asyncio.to_thread(path.write_bytes, data)
            # Filters are applied after the identity check, not while reading.
            doc = await self._verify_and_read(n, path, wanted_only=False)
            if [e.entity_id for e in doc.entities] != [entity_id]:
                # A responder must not answer for one entity with another's (signed) metadata.
                raise ConfigurationError(
                    f"the answer describes {[e.entity_id for e in doc.entities][:3]}"
                )
        except ConfigurationError as error:
            log.warning("saml_mdq_refused", url=_safe_url(url), reason=str(error))
            raise UpstreamFailed(
                "The identity provider's metadata could not be verified",
                log_detail=f"MDQ {_safe_url(url)}: {error}",
            ) from None
        finally:
            await asyncio.to_thread(path.unlink, True)
        ttl = min(source.cache_ttl, duration_seconds(doc.cache_duration) or source.cache_ttl)
        if doc.valid_until is not None:
            ttl = min(ttl, doc.valid_until.timestamp() - time.time())
        entity = doc.entities[0]
        wanted = entity if self._wanted(entity) else None
        self._cache(n, entity_id, wanted, ttl)
        return wanted

    def _cache(self, n: int, entity_id: str, entity: EntityInfo | None, ttl: float) -> None:
        haystack = _haystack(entity) if entity is not None else ""
        self._mdq_cache[(n, entity_id)] = _Cached(time.monotonic() + ttl, entity, haystack)
        self._mdq_cache.move_to_end((n, entity_id))
        while len(self._mdq_cache) > MDQ_CACHE_ENTRIES:
            self._mdq_cache.popitem(last=False)

    def _search_mdq_cache(self, query: str, limit: int) -> list[EntityInfo]:
        words = _fold(query).split()
        now = time.monotonic()
        hits = [
            c.entity
            for c in self._mdq_cache.values()
            if c.entity is not None and c.expires > now and all(w in c.haystack for w in words)
        ]
        return sorted(hits, key=lambda e: _fold(e.display_name))[:limit]


def _index(doc: _Document) -> MetadataIndex:
    return MetadataIndex(doc.entities, doc.valid_until, doc.cache_duration)
