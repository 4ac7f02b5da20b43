"""SAML metadata parsing, filters, search and the refresh rule (adapters/upstream/saml_metadata).

The builders here (`entity`, `document`) are also used by
tests/integration/test_saml_metadata_sources.py, which signs their output.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import aiohttp
import pytest
import pytest_asyncio

from adapters.errors import ConfigurationError
from adapters.upstream.saml_metadata import (
    ENTITY_CATEGORY,
    ENTITY_CATEGORY_SUPPORT,
    AggregateSource,
    EntityInfo,
    FileSource,
    MdqSource,
    MetadataIndex,
    MetadataStore,
    Scope,
    duration_seconds,
    parse_metadata,
    parse_xml,
)

NAMESPACES = (
    'xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" '
    'xmlns:ds="http://www.w3.org/2000/09/xmldsig#" '
    'xmlns:mdui="urn:oasis:names:tc:SAML:metadata:ui" '
    'xmlns:mdrpi="urn:oasis:names:tc:SAML:metadata:rpi" '
    'xmlns:mdattr="urn:oasis:names:tc:SAML:metadata:attribute" '
    'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" '
    'xmlns:shibmd="urn:mace:shibboleth:metadata:1.0"'
)
REFEDS_RS = "http://refeds.org/category/research-and-scholarship"
COCO = "https://refeds.org/category/code-of-conduct/v2"
FED_A = "https://federation-a.example.org/"
PROTOCOL = 'protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol"'
FED_B = "https://federation-b.example.org/"


def entity(
    entity_id: str,
    names: Sequence[tuple[str, str]] = (),
    *,
    idp: bool = True,
    sp: bool = False,
    scopes: Sequence[tuple[str, bool]] = (),
    categories: Sequence[str] = (),
    support: Sequence[str] = (),
    authority: str | None = None,
    organization: str | None = None,
    cert: str = "MIIBfakeCERT",
) -> str:
    """One md:EntityDescriptor (no namespace declarations: `document` declares them)."""
    ui = "".join(
        f"<mdui:DisplayName{f' xml:lang={quoteattr(lang)}' if lang else ''}>{escape(name)}"
        "</mdui:DisplayName>"
        for lang, name in names
    )
    extensions = ""
    if authority:
        extensions += f"<mdrpi:RegistrationInfo registrationAuthority={quoteattr(authority)}/>"
    attributes = "".join(
        f'<saml:Attribute Name="{attr}">'
        + "".join(f"<saml:AttributeValue>{v}</saml:AttributeValue>" for v in values)
        + "</saml:Attribute>"
        for attr, values in ((ENTITY_CATEGORY, categories), (ENTITY_CATEGORY_SUPPORT, support))
        if values
    )
    if attributes:
        extensions += f"<mdattr:EntityAttributes>{attributes}</mdattr:EntityAttributes>"
    xml = f"<md:EntityDescriptor entityID={quoteattr(entity_id)}>"
    if extensions:
        xml += f"<md:Extensions>{extensions}</md:Extensions>"
    if idp:
        scope_xml = "".join(
            f'<shibmd:Scope regexp="{str(regexp).lower()}">{escape(value)}</shibmd:Scope>'
            for value, regexp in scopes
        )
        xml += (
            f"<md:IDPSSODescriptor {PROTOCOL}>"
            f"<md:Extensions>{scope_xml}<mdui:UIInfo>{ui}</mdui:UIInfo></md:Extensions>"
            '<md:KeyDescriptor use="signing"><ds:KeyInfo><ds:X509Data><ds:X509Certificate>'
            f"{cert}</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor>"
            '<md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"'
            f' Location="{escape(entity_id)}/sso"/></md:IDPSSODescriptor>'
        )
    if sp:
        xml += (
            '<md:SPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">'
            f"<md:Extensions><mdui:UIInfo>{ui}</mdui:UIInfo></md:Extensions>"
            '<md:AssertionConsumerService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"'
            f' Location="{escape(entity_id)}/acs" index="1"/></md:SPSSODescriptor>'
        )
    if organization:
        xml += (
            f'<md:Organization><md:OrganizationName xml:lang="en">{escape(organization)}'
            f'</md:OrganizationName><md:OrganizationDisplayName xml:lang="en">'
            f"{escape(organization)}</md:OrganizationDisplayName>"
            '<md:OrganizationURL xml:lang="en">https://example.org/</md:OrganizationURL>'
            "</md:Organization>"
        )
    return xml + "</md:EntityDescriptor>"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def document(
    entities: Sequence[str],
    *,
    valid_until: datetime | None = None,
    cache_duration: str | None = None,
    root_id: str = "_aggregate",
    signature: str = "",
    prolog: str = "",
) -> bytes:
    """An md:EntitiesDescriptor around `entities`; `signature` (a template) goes first."""
    attrs = f' ID="{root_id}"'
    if valid_until is not None:
        attrs += f' validUntil="{iso(valid_until)}"'
    if cache_duration is not None:
        attrs += f' cacheDuration="{cache_duration}"'
    body = "\n".join(entities)
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n{prolog}'
        f"<md:EntitiesDescriptor {NAMESPACES}{attrs}>{signature}\n{body}\n"
        "</md:EntitiesDescriptor>\n"
    ).encode()


def by_id(entities: Sequence[EntityInfo]) -> dict[str, EntityInfo]:
    return {e.entity_id: e for e in entities}


# --- parsing ---------------------------------------------------------------------------------


def test_display_name_prefers_english_mdui_then_unlabelled_then_any_then_organization() -> None:
    parsed = parse_metadata(
        document(
            [
                entity("https://a.example/idp", [("de", "Universität A"), ("en", "University A")]),
                entity("https://b.example/idp", [("en-GB", "B College"), ("fr", "Collège B")]),
                entity("https://c.example/idp", [("fr", "École C"), ("", "C school")]),
                entity("https://d.example/idp", [("de", "Hochschule D")]),
                entity("https://e.example/idp", organization="E Organisation"),
                entity("https://f.example/idp"),
            ]
        )
    )
    names = {e.entity_id: e.display_name for e in parsed.entities}
    assert names == {
        "https://a.example/idp": "University A",
        "https://b.example/idp": "B College",
        "https://c.example/idp": "C school",
        "https://d.example/idp": "Hochschule D",
        "https://e.example/idp": "E Organisation",
        "https://f.example/idp": "https://f.example/idp",
    }
    a = by_id(parsed.entities)["https://a.example/idp"]
    assert a.display_names == (("de", "Universität A"), ("en", "University A"))


def test_entity_fields_scopes_categories_authority_endpoints_and_own_xml() -> None:
    parsed = parse_metadata(
        document(
            [
                entity(
                    "https://idp.uni.example/idp",
                    [("en", "Uni")],
                    scopes=[("uni.example", False), (r"^([a-z]+\.)?uni2\.example$", True)],
                    categories=[REFEDS_RS],
                    support=[COCO],
                    authority=FED_A,
                    cert="MIIC\n  abc==",
                ),
                entity("https://sp.example/sp", [("en", "An SP")], idp=False, sp=True),
            ],
            valid_until=datetime(2040, 1, 1, tzinfo=UTC),
            cache_duration="PT6H",
        )
    )
    assert parsed.valid_until == datetime(2040, 1, 1, tzinfo=UTC)
    assert parsed.cache_duration == "PT6H"
    idp, sp = parsed.entities
    assert (idp.is_idp, idp.is_sp, sp.is_idp, sp.is_sp) == (True, False, False, True)
    assert idp.scopes == (
        Scope("uni.example", False),
        Scope(r"^([a-z]+\.)?uni2\.example$", True),
    )
    assert idp.allows_scope("UNI.example")
    assert idp.allows_scope("uni2.example") and idp.allows_scope("dept.uni2.example")
    assert not idp.allows_scope("evil.example")
    assert not idp.allows_scope("sub.uni.example")  # a literal scope is not a suffix
    assert not idp.allows_scope("uni2.example.evil.org")  # regexps match the whole domain
    assert not Scope("([", regexp=True).allows("anything")  # a broken regexp allows nothing
    assert idp.entity_categories == (REFEDS_RS, COCO)
    assert idp.registration_authority == FED_A and sp.registration_authority is None
    assert idp.signing_certs == ("MIICabc==",)
    assert [e.location for e in idp.sso_endpoints] == ["https://idp.uni.example/idp/sso"]
    own = parse_metadata(idp.xml)  # the kept XML stands on its own, namespaces declared
    assert own.entities[0].entity_id == idp.entity_id
    assert own.entities[0].scopes == idp.scopes


def test_a_comment_inside_a_value_does_not_split_it() -> None:
    # Canonicalisation drops comments, so a signature covers "evil.comexample.edu" as one
    # string; the parser must see the same string, not only the text before the comment.
    xml = document([entity("https://a.example/idp", scopes=[("PLACEHOLDER", False)])])
    xml = xml.replace(b"PLACEHOLDER", b"evil.com<!-- -->.example.edu")
    (idp,) = parse_metadata(xml).entities
    assert idp.scopes == (Scope("evil.com.example.edu"),)


DOCTYPES = [
    pytest.param(
        '<!DOCTYPE md:EntitiesDescriptor [<!ENTITY name "Injected">]>\n',
        "&name;",
        id="internal-entity",
    ),
    pytest.param(
        '<!DOCTYPE md:EntitiesDescriptor [<!ENTITY xxe SYSTEM "file:///etc/hostname">]>\n',
        "&xxe;",
        id="external-entity",
    ),
    pytest.param(
        "<!DOCTYPE md:EntitiesDescriptor ["
        + '<!ENTITY l0 "lol">'
        + "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
        + "]>\n",
        "&l9;",
        id="billion-laughs",
    ),
    pytest.param("<!DOCTYPE md:EntitiesDescriptor>\n", "Plain", id="bare-doctype"),
]


@pytest.mark.parametrize(("prolog", "name"), DOCTYPES)
async def test_doctype_and_entities_are_refused(tmp_path: Path, prolog: str, name: str) -> None:
    xml = document([entity("https://a.example/idp", [("en", "NAME")])], prolog=prolog)
    xml = xml.replace(b"NAME", name.encode())
    with pytest.raises(ConfigurationError, match="DOCTYPE"):
        parse_metadata(xml)
    # libxml2's own amplification limit may stop the whole-document parser first.
    with pytest.raises(ConfigurationError, match=r"DOCTYPE|amplification"):
        parse_xml(xml)
    path = tmp_path / "md.xml"
    path.write_bytes(xml)
    async with aiohttp.ClientSession() as http:
        store = MetadataStore([FileSource(path)], http=http)
        with pytest.raises(ConfigurationError, match="DOCTYPE"):
            await store.start()
        assert len(store) == 0
        assert await store.lookup("https://a.example/idp") is None


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"<md:EntitiesDescriptor", id="truncated"),
        pytest.param(b"<html><body>maintenance</body></html>", id="not-metadata"),
        pytest.param(b"", id="empty"),
    ],
)
def test_malformed_or_foreign_documents_are_refused(data: bytes) -> None:
    with pytest.raises(ConfigurationError):
        parse_metadata(data)


# --- filters and the file source -------------------------------------------------------------


FEDERATION = [
    entity("https://rs-a.example/idp", [("en", "RS A")], categories=[REFEDS_RS], authority=FED_A),
    entity("https://rs-b.example/idp", [("en", "RS B")], support=[REFEDS_RS], authority=FED_B),
    entity("https://coco-a.example/idp", [("en", "CoCo A")], support=[COCO], authority=FED_A),
    entity("https://plain-b.example/idp", [("en", "Plain B")], authority=FED_B),
    entity("https://sp-a.example/sp", [("en", "SP A")], idp=False, sp=True, authority=FED_A),
    entity(
        "https://both-a.example/x",
        [("en", "IdP and SP")],
        sp=True,
        categories=[REFEDS_RS],
        authority=FED_A,
    ),
]


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.mark.parametrize(
    ("categories", "authorities", "expected"),
    [
        pytest.param(
            (),
            (),
            {"rs-a", "rs-b", "coco-a", "plain-b", "both-a"},
            id="only-idps",
        ),
        pytest.param((REFEDS_RS,), (), {"rs-a", "rs-b", "both-a"}, id="category"),
        pytest.param(
            (REFEDS_RS, COCO), (), {"rs-a", "rs-b", "coco-a", "both-a"}, id="any-category"
        ),
        pytest.param((), (FED_B,), {"rs-b", "plain-b"}, id="authority"),
        pytest.param((REFEDS_RS,), (FED_A,), {"rs-a", "both-a"}, id="category-and-authority"),
        pytest.param(
            (), (FED_A, FED_B), {"rs-a", "rs-b", "coco-a", "plain-b", "both-a"}, id="any-authority"
        ),
    ],
)
async def test_filters_decide_what_reaches_the_index(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    categories: tuple[str, ...],
    authorities: tuple[str, ...],
    expected: set[str],
) -> None:
    path = tmp_path / "federation.xml"
    path.write_bytes(document(FEDERATION))
    store = MetadataStore(
        [FileSource(path)],
        http=http,
        entity_categories=categories,
        registration_authorities=authorities,
    )
    await store.start()
    try:
        found = {e.entity_id.split("//")[1].split(".")[0] for e in store.search("", 100)}
        assert found == expected
        assert len(store) == len(expected)
        for short in {"rs-a", "rs-b", "coco-a", "plain-b"} - expected:
            assert await store.lookup(f"https://{short}.example/idp") is None
        assert await store.lookup("https://sp-a.example/sp") is None  # never an SP
        for e in store.search("", 100):
            assert await store.lookup(e.entity_id) is e
    finally:
        await store.close()


async def test_expired_file_is_refused_and_expired_entities_are_skipped(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    past = datetime.now(UTC) - timedelta(minutes=1)
    expired = tmp_path / "expired.xml"
    expired.write_bytes(document([entity("https://a.example/idp")], valid_until=past))
    store = MetadataStore([FileSource(expired)], http=http)
    with pytest.raises(ConfigurationError, match="expired"):
        await store.start()
    assert len(store) == 0

    mixed = tmp_path / "mixed.xml"
    stale = entity("https://stale.example/idp").replace(
        "<md:EntityDescriptor ", f'<md:EntityDescriptor validUntil="{iso(past)}" '
    )
    mixed.write_bytes(document([stale, entity("https://fresh.example/idp")]))
    store = MetadataStore([FileSource(mixed)], http=http)
    await store.start()
    assert await store.lookup("https://stale.example/idp") is None
    assert await store.lookup("https://fresh.example/idp") is not None
    await store.close()


async def test_missing_file_is_a_configuration_error(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    store = MetadataStore([FileSource(tmp_path / "absent.xml")], http=http)
    with pytest.raises(ConfigurationError, match="cannot read"):
        await store.start()


# --- search ----------------------------------------------------------------------------------


def _index() -> MetadataIndex:
    entities = [
        entity(
            "https://idp.tu-berlin.example/idp",
            [("en", "Technical University of Berlin"), ("de", "Technische Universität Berlin")],
            scopes=[("tu-berlin.example", False)],
        ),
        entity(
            "https://login.uib.example/idp",
            [("en", "University of Bergen"), ("nb", "Universitetet i Bergen")],
            scopes=[("uib.example", False)],
        ),
        entity("https://idp.ox.example/idp", [("en", "University of Oxford")]),
        entity("https://idp.eth.example/idp", [("en", "ETH Zürich")]),
        entity("https://sp.example/sp", [("en", "University portal SP")], idp=False, sp=True),
    ]
    return MetadataIndex(parse_metadata(document(entities)).entities)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("", ["ETH Zürich", "Technical", "Bergen", "Oxford"], id="empty-lists-all"),
        pytest.param("univ", ["Technical", "Bergen", "Oxford"], id="prefix-by-name"),
        pytest.param("berg univ", ["Bergen"], id="every-word-any-order"),
        pytest.param("universitat", ["Technical"], id="accent-folded-other-language"),
        pytest.param("ZURICH", ["ETH Zürich"], id="case-and-accent"),
        pytest.param("uib.example", ["Bergen"], id="scope"),
        pytest.param("login.uib", ["Bergen"], id="entity-id"),
        pytest.param("portal", [], id="sps-are-not-listed"),
        pytest.param("oxford cambridge", [], id="all-words-required"),
        pytest.param("berlin\nbergen", [], id="no-match-across-idps"),
    ],
)
def test_search(query: str, expected: list[str]) -> None:
    found = [e.display_name for e in _index().search(query, 10)]
    assert len(found) == len(expected)
    for name, part in zip(found, expected, strict=True):
        assert part in name


def test_search_limit_and_lookup() -> None:
    index = _index()
    assert len(index.search("univ", 2)) == 2
    assert len(index) == 5  # the index holds what it is given; the store filters
    hit = index.get("https://idp.ox.example/idp")
    assert hit is not None and hit.display_name == "University of Oxford"
    assert index.get("https://idp.ox.example/idp/") is None


# --- refresh rule and configuration ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("PT6H", 21600), ("P1D", 86400), ("PT1H30M", 5400), ("PT0.5S", 0.5), ("P1DT1S", 86401)],
)
def test_duration(value: str, seconds: float) -> None:
    assert duration_seconds(value) == seconds


@pytest.mark.parametrize("value", [None, "", "P", "6H", "-PT6H", "PT", "PTXH"])
def test_duration_malformed(value: str | None) -> None:
    assert duration_seconds(value) is None


def _cert_pem() -> str:
    from tests.integration.test_saml_metadata_sources import make_signer_pem

    return make_signer_pem()


@pytest.mark.parametrize(
    ("cache_duration", "valid_in", "expected"),
    [
        pytest.param("PT1H", timedelta(days=10), 3600, id="cache-duration"),
        pytest.param("PT1H", timedelta(minutes=20), 600, id="half-of-validity-if-sooner"),
        pytest.param(None, timedelta(days=10), 86400, id="max-refresh-without-hints"),
        pytest.param("PT10S", timedelta(days=10), 300, id="clamped-to-min-refresh"),
        pytest.param("P30D", None, 86400, id="clamped-to-max-refresh"),
    ],
)
def test_next_refresh_rule(
    cache_duration: str | None, valid_in: timedelta | None, expected: float
) -> None:
    source = AggregateSource("https://fed.example/md.xml", _cert_pem())
    valid_until = datetime.now(UTC) + valid_in if valid_in else None
    assert source.next_refresh(valid_until, cache_duration) == pytest.approx(expected, abs=2)


def test_source_configuration_is_checked() -> None:
    pem = _cert_pem()
    with pytest.raises(ConfigurationError, match="PEM"):
        AggregateSource("https://fed.example/md.xml", "not a certificate")
    with pytest.raises(ConfigurationError, match="http"):
        AggregateSource("file:///etc/md.xml", pem)
    with pytest.raises(ConfigurationError, match="min_refresh"):
        AggregateSource("https://fed.example/md.xml", pem, min_refresh=600, max_refresh=60)
    with pytest.raises(ConfigurationError, match="PEM"):
        MdqSource("https://mdq.example", "-----BEGIN CERTIFICATE-----\nAA==\n")


def test_mdq_urls() -> None:
    pem = _cert_pem()
    plain = MdqSource("https://mdq.example/fed/", pem)
    assert (
        plain.url_for("https://idp.example/a b?c")
        == "https://mdq.example/fed/entities/https%3A%2F%2Fidp.example%2Fa%20b%3Fc"
    )
    hashed = MdqSource("https://mdq.example/fed", pem, id_form="sha1")
    # sha1("https://idp.example/idp"), as `echo -n ... | sha1sum` prints it
    assert hashed.url_for("https://idp.example/idp") == (
        "https://mdq.example/fed/entities/%7Bsha1%7D" + _sha1_hex("https://idp.example/idp")
    )


def _sha1_hex(text: str) -> str:
    import subprocess

    out = subprocess.run(["sha1sum"], input=text.encode(), capture_output=True, check=True)
    return out.stdout.decode().split()[0]


def test_index_expiry_is_exposed() -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    index = MetadataIndex([], soon)
    assert index.expires == pytest.approx(soon.timestamp())
    assert MetadataIndex([]).expires > time.time() + 10**9
