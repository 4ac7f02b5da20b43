"""SAML 2.0 metadata: parse, index and look up the entities of a federation.

The index is built once per (re)load; a sign-in looks an IdP up by entity id in a dict and
never scans. The raw `EntityDescriptor` of each entity is kept so pysaml2 can be handed just
the one IdP a sign-in talks to.

XML is parsed with DTDs, entities and network access refused (no XXE, no entity expansion).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from lxml import etree

from adapters.errors import ConfigurationError

MD = "urn:oasis:names:tc:SAML:2.0:metadata"
MDUI = "urn:oasis:names:tc:SAML:metadata:ui"
MDRPI = "urn:oasis:names:tc:SAML:metadata:rpi"
MDATTR = "urn:oasis:names:tc:SAML:metadata:attribute"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
SHIBMD = "urn:mace:shibboleth:metadata:1.0"
DS = "http://www.w3.org/2000/09/xmldsig#"
ENTITY_CATEGORY = "http://macedir.org/entity-category"
ENTITY_CATEGORY_SUPPORT = "http://macedir.org/entity-category-support"
BINDING_REDIRECT = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"
BINDING_POST = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"


@dataclass(frozen=True, slots=True)
class Scope:
    """A `shibmd:Scope`: the domains an IdP may assert in scoped attributes."""

    value: str
    regexp: bool = False

    def allows(self, domain: str) -> bool:
        """True if `domain` (the part after '@' of a scoped value) is within this scope."""
        if self.regexp:
            try:
                return re.fullmatch(self.value, domain) is not None
            except re.error:
                return False
        return domain.lower() == self.value.lower()


@dataclass(frozen=True, slots=True)
class Endpoint:
    binding: str
    location: str


@dataclass(frozen=True, slots=True)
class EntityInfo:
    """What the broker needs to know about one entity of the metadata."""

    entity_id: str
    display_name: str
    is_idp: bool
    is_sp: bool
    scopes: tuple[Scope, ...]
    signing_certs: tuple[str, ...]  # base64 DER, as in ds:X509Certificate
    sso_endpoints: tuple[Endpoint, ...]
    entity_categories: tuple[str, ...]
    registration_authority: str | None
    xml: bytes  # this EntityDescriptor on its own, namespaces declared

    def allows_scope(self, domain: str) -> bool:
        return any(scope.allows(domain) for scope in self.scopes)


@dataclass(frozen=True, slots=True)
class ParsedMetadata:
    entities: tuple[EntityInfo, ...]
    valid_until: datetime | None
    cache_duration: str | None  # xs:duration as written, e.g. "PT6H"


class MetadataIndex:
    """Entities by id, plus a search over IdP display names for the chooser."""

    def __init__(self, entities: Iterable[EntityInfo], valid_until: datetime | None = None):
        self._by_id = {entity.entity_id: entity for entity in entities}
        self.valid_until = valid_until
        self._idps = sorted(
            (e for e in self._by_id.values() if e.is_idp), key=lambda e: e.display_name.lower()
        )
        self._haystacks = [f"{e.display_name}\x00{e.entity_id}".lower() for e in self._idps]

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, entity_id: str) -> EntityInfo | None:
        return self._by_id.get(entity_id)

    def search(self, query: str, limit: int) -> list[EntityInfo]:
        """IdPs whose display name or entity id contains every word of `query`."""
        words = query.lower().split()
        if not words:
            return self._idps[:limit]
        found: list[EntityInfo] = []
        for entity, haystack in zip(self._idps, self._haystacks, strict=True):
            if all(word in haystack for word in words):
                found.append(entity)
                if len(found) >= limit:
                    break
        return found


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


def _display_name(entity: etree._Element) -> str:
    names: dict[str, str] = {}
    for el in entity.iterfind(f".//{{{MDUI}}}DisplayName"):
        names.setdefault(el.get("{http://www.w3.org/XML/1998/namespace}lang", ""), el.text or "")
    if not names:
        for el in entity.iterfind(f"{{{MD}}}Organization/{{{MD}}}OrganizationDisplayName"):
            lang = el.get("{http://www.w3.org/XML/1998/namespace}lang", "")
            names.setdefault(lang, el.text or "")
    for lang in ("en", ""):
        if names.get(lang, "").strip():
            return names[lang].strip()
    first = next((n.strip() for n in names.values() if n.strip()), "")
    return first or str(entity.get("entityID"))


def _entity_info(entity: etree._Element) -> EntityInfo:
    entity_id = entity.get("entityID")
    if not entity_id:
        raise ConfigurationError("an EntityDescriptor has no entityID")
    idp = entity.find(f"{{{MD}}}IDPSSODescriptor")
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
    attributes = f"{{{MD}}}Extensions/{{{MDATTR}}}EntityAttributes/{{{SAML}}}Attribute"
    categories = [
        value.text.strip()
        for attr in entity.iterfind(attributes)
        if attr.get("Name") in (ENTITY_CATEGORY, ENTITY_CATEGORY_SUPPORT)
        for value in attr.iterfind(f"{{{SAML}}}AttributeValue")
        if value.text
    ]
    registration = entity.find(f"{{{MD}}}Extensions/{{{MDRPI}}}RegistrationInfo")
    return EntityInfo(
        entity_id=entity_id,
        display_name=_display_name(entity),
        is_idp=idp is not None,
        is_sp=entity.find(f"{{{MD}}}SPSSODescriptor") is not None,
        scopes=tuple(scopes),
        signing_certs=tuple(certs),
        sso_endpoints=tuple(endpoints),
        entity_categories=tuple(categories),
        registration_authority=(
            registration.get("registrationAuthority") if registration is not None else None
        ),
        xml=etree.tostring(entity),
    )


def _datetime(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigurationError(f"validUntil {value!r} is not a date-time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_metadata(data: bytes) -> ParsedMetadata:
    """Every EntityDescriptor of a metadata document (an aggregate or a single entity).
    No signature is checked here: callers verify first and parse the verified bytes."""
    root = parse_xml(data)
    if root.tag == f"{{{MD}}}EntityDescriptor":
        descriptors: Sequence[etree._Element] = [root]
    elif root.tag == f"{{{MD}}}EntitiesDescriptor":
        descriptors = list(root.iter(f"{{{MD}}}EntityDescriptor"))
    else:
        raise ConfigurationError("the document is not SAML 2.0 metadata")
    return ParsedMetadata(
        entities=tuple(_entity_info(d) for d in descriptors),
        valid_until=_datetime(root.get("validUntil")),
        cache_duration=root.get("cacheDuration"),
    )


# --- sources -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileSource:
    """Metadata from a local file, trusted as the operator placed it."""

    path: Path


class MetadataStore:
    """The IdPs of one SAML upstream, from all its sources, after its filters.

    `lookup` is what a sign-in calls: a dict lookup. `search` serves the chooser.
    """

    def __init__(
        self,
        sources: Sequence[FileSource],
        *,
        http: aiohttp.ClientSession,
        entity_categories: Sequence[str] = (),
        registration_authorities: Sequence[str] = (),
    ) -> None:
        self._sources = tuple(sources)
        self._http = http
        self._categories = frozenset(entity_categories)
        self._authorities = frozenset(registration_authorities)
        self._index = MetadataIndex(())

    def _wanted(self, entity: EntityInfo) -> bool:
        if not entity.is_idp:
            return False
        if self._categories and not self._categories.intersection(entity.entity_categories):
            return False
        return not self._authorities or entity.registration_authority in self._authorities

    async def start(self) -> None:
        """Load every source once; ConfigurationError if one cannot be loaded."""
        entities: list[EntityInfo] = []
        for source in self._sources:
            try:
                data = await asyncio.to_thread(source.path.read_bytes)
            except OSError as error:
                raise ConfigurationError(
                    f"cannot read SAML metadata {source.path}: {error.strerror}"
                ) from None
            parsed = await asyncio.to_thread(parse_metadata, data)
            entities.extend(e for e in parsed.entities if self._wanted(e))
        self._index = MetadataIndex(entities)

    async def close(self) -> None:
        return None

    async def lookup(self, entity_id: str) -> EntityInfo | None:
        return self._index.get(entity_id)

    def search(self, query: str, limit: int) -> list[EntityInfo]:
        return self._index.search(query, limit)

    def __len__(self) -> int:
        return len(self._index)
