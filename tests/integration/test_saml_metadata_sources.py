"""Signed SAML metadata over real HTTP: a federation aggregate and an MDQ responder.

An aiohttp server on loopback plays the federation: it serves an aggregate (with ETag /
If-None-Match) and MDQ answers, all signed here with the xmlsec1 binary and a test key made
with `cryptography`. Each tampering is refused on first load (ConfigurationError, nothing
indexed) and on refresh (the last good copy stays, a warning is logged).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree

from adapters.errors import ConfigurationError, UpstreamFailed
from adapters.upstream.saml_metadata import (
    AggregateSource,
    MdqSource,
    MetadataStore,
)
from tests.unit.test_saml_metadata import NAMESPACES, REFEDS_RS, document, entity, iso

MD = "urn:oasis:names:tc:SAML:2.0:metadata"
DS = "http://www.w3.org/2000/09/xmldsig#"
ID_ATTRS = ("--id-attr:ID", f"{MD}:EntitiesDescriptor", "--id-attr:ID", f"{MD}:EntityDescriptor")
XPATH_TRANSFORM = "http://www.w3.org/TR/1999/REC-xpath-19991116"


def signature_template(
    reference: str, *, key_info: str = "<ds:X509Data/>", extra_transform: str = ""
) -> str:
    return (
        "<ds:Signature><ds:SignedInfo>"
        '<ds:CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/>'
        '<ds:SignatureMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"/>'
        f'<ds:Reference URI="{reference}"><ds:Transforms>'
        '<ds:Transform Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature"/>'
        f"{extra_transform}"
        '<ds:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/></ds:Transforms>'
        '<ds:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/>'
        "<ds:DigestValue/></ds:Reference></ds:SignedInfo><ds:SignatureValue/>"
        f"<ds:KeyInfo>{key_info}</ds:KeyInfo></ds:Signature>"
    )


@dataclass(frozen=True)
class Signer:
    key: Path
    cert: Path

    @property
    def cert_pem(self) -> str:
        return self.cert.read_text()

    def sign(self, template: bytes, *, with_cert: bool = True) -> bytes:
        """Sign the ds:Signature template in `template` with xmlsec1, as federations do."""
        source = self.key.parent / f"tmpl-{hashlib.sha256(template).hexdigest()[:16]}.xml"
        source.write_bytes(template)
        key = f"{self.key},{self.cert}" if with_cert else str(self.key)
        result = subprocess.run(
            ["xmlsec1", "--sign", "--privkey-pem", key, *ID_ATTRS, "--output", "-", str(source)],
            capture_output=True,
            check=True,
        )
        return result.stdout


def _key_and_cert(name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_signer(directory: Path, name: str) -> Signer:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = _key_and_cert(name)
    signer = Signer(directory / f"{name}.key", directory / f"{name}.pem")
    signer.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    signer.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return signer


def make_signer_pem() -> str:
    """A PEM certificate, for configuration checks that never verify anything."""
    return _key_and_cert("config-only")[1].public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Signer, Signer]:
    directory = tmp_path_factory.mktemp("saml-md-keys")
    return make_signer(directory, "federation"), make_signer(directory, "attacker")


@pytest.fixture
def federation_key(keys: tuple[Signer, Signer]) -> Signer:
    return keys[0]


@pytest.fixture
def attacker_key(keys: tuple[Signer, Signer]) -> Signer:
    return keys[1]


def in_hours(hours: float) -> datetime:
    return datetime.now(UTC) + timedelta(hours=hours)


IDP_A = "https://idp.alpha.example/idp"
IDP_B = "https://idp.beta.example/idp"
IDP_NEW = "https://idp.newcomer.example/idp"
IDP_EVIL = "https://idp.evil.example/idp"
SP = "https://sp.example/shibboleth"


def aggregate_template(
    *extra: str, valid_until: datetime | None = None, root_id: str = "_agg1", **kw: str
) -> bytes:
    entities = [
        entity(IDP_A, [("en", "Alpha University")], scopes=[("alpha.example", False)]),
        entity(IDP_B, [("en", "Beta Institute")], categories=[REFEDS_RS]),
        entity(SP, [("en", "A service")], idp=False, sp=True),
        *extra,
    ]
    return document(
        entities,
        valid_until=valid_until if valid_until is not None else in_hours(48),
        cache_duration="PT6H",
        root_id=root_id,
        signature=signature_template(f"#{root_id}", **kw),
    )


# --- tampering -------------------------------------------------------------------------------


def _wrap(signed: bytes, *, wrapper_id: str) -> bytes:
    """Signature wrapping: move the root's (valid) Signature to a new root that holds the
    original signed element, untouched, plus an attacker's entity."""
    original = etree.fromstring(signed)
    signature = original.find(f"{{{DS}}}Signature")
    assert signature is not None
    # Keep the whitespace the signature leaves behind: the digest covers it.
    original.text = (original.text or "") + (signature.tail or "")
    signature.tail = None
    original.remove(signature)
    wrapper = etree.fromstring(
        document(
            [entity(IDP_EVIL, [("en", "Evil IdP")])],
            valid_until=in_hours(48),
            root_id=wrapper_id,
        )
    )
    wrapper.insert(0, signature)
    wrapper.append(original)
    return etree.tostring(wrapper, xml_declaration=True, encoding="UTF-8")


def tamper_display_name(fed: Signer, evil: Signer) -> bytes:
    return fed.sign(aggregate_template()).replace(b"Alpha University", b"Alpha Universit\xc3\xa9")


def tamper_added_entity(fed: Signer, evil: Signer) -> bytes:
    added = entity(IDP_EVIL, [("en", "Evil IdP")]).encode()
    return fed.sign(aggregate_template()).replace(
        b"</md:EntitiesDescriptor>", added + b"</md:EntitiesDescriptor>"
    )


def tamper_wrapped(fed: Signer, evil: Signer) -> bytes:
    return _wrap(fed.sign(aggregate_template()), wrapper_id="_wrapper")


def tamper_wrapped_same_id(fed: Signer, evil: Signer) -> bytes:
    return _wrap(fed.sign(aggregate_template()), wrapper_id="_agg1")


def tamper_other_key(fed: Signer, evil: Signer) -> bytes:
    return evil.sign(aggregate_template())


def tamper_other_key_as_key_value(fed: Signer, evil: Signer) -> bytes:
    # xmlsec1's default would take the key from the signature's own KeyValue and accept this.
    return evil.sign(aggregate_template(key_info="<ds:KeyValue/>"), with_cert=False)


def tamper_expired(fed: Signer, evil: Signer) -> bytes:
    return fed.sign(aggregate_template(valid_until=datetime.now(UTC) - timedelta(minutes=5)))


def tamper_no_valid_until(fed: Signer, evil: Signer) -> bytes:
    # Validly signed, but without validUntil it could be replayed for ever.
    template = document(
        [entity(IDP_A, [("en", "Alpha University")])],
        root_id="_agg1",
        signature=signature_template("#_agg1"),
    )
    return fed.sign(template)


def tamper_xpath_transform(fed: Signer, evil: Signer) -> bytes:
    # A signature whose XPath transform leaves the evil entity out of the digest: it verifies,
    # whatever that entity says.
    xpath = (
        f'<ds:Transform Algorithm="{XPATH_TRANSFORM}"><ds:XPath {NAMESPACES}>'
        f"not(ancestor-or-self::md:EntityDescriptor[@entityID='{IDP_EVIL}'])"
        "</ds:XPath></ds:Transform>"
    )
    evil_entity = entity(IDP_EVIL, [("en", "Placeholder")])
    signed = fed.sign(aggregate_template(evil_entity, extra_transform=xpath))
    return signed.replace(b"Placeholder", b"Evil IdP, changed after signing")


def tamper_doctype(fed: Signer, evil: Signer) -> bytes:
    signed = fed.sign(aggregate_template())
    doctype = b'<!DOCTYPE md:EntitiesDescriptor [<!ENTITY x SYSTEM "file:///etc/hostname">]>\n'
    return signed.replace(b"?>\n", b"?>\n" + doctype, 1)


TAMPERED: list[object] = [
    pytest.param(tamper_display_name, "does not verify", id="display-name-changed"),
    pytest.param(tamper_added_entity, "does not verify", id="unsigned-entity-added"),
    pytest.param(tamper_wrapped, "references", id="signature-moved-to-wrapper"),
    pytest.param(tamper_wrapped_same_id, "does not verify|ID", id="wrapper-reuses-root-id"),
    pytest.param(tamper_other_key, "does not verify", id="signed-by-another-key"),
    pytest.param(tamper_other_key_as_key_value, "does not verify", id="another-key-in-keyvalue"),
    pytest.param(tamper_expired, "expired", id="expired-valid-until"),
    pytest.param(tamper_no_valid_until, "no validUntil", id="no-valid-until"),
    pytest.param(tamper_xpath_transform, "transforms", id="xpath-transform"),
    pytest.param(tamper_doctype, "DOCTYPE", id="doctype"),
]


# --- the federation's server -----------------------------------------------------------------


@dataclass
class Federation:
    """What the loopback server publishes; tests change it while the store runs."""

    aggregate: bytes = b""
    aggregate_status: int = 200
    mdq: dict[str, bytes] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    not_modified: int = 0
    base_url: str = ""

    @property
    def aggregate_url(self) -> str:
        return f"{self.base_url}/aggregate.xml"

    @property
    def mdq_url(self) -> str:
        return f"{self.base_url}/mdq"


@pytest_asyncio.fixture
async def federation() -> AsyncIterator[Federation]:
    fed = Federation()

    async def aggregate(request: web.Request) -> web.Response:
        fed.requests["aggregate"] += 1
        if fed.aggregate_status != 200:
            return web.Response(status=fed.aggregate_status)
        etag = '"' + hashlib.sha256(fed.aggregate).hexdigest()[:32] + '"'
        if request.headers.get("If-None-Match") == etag:
            fed.not_modified += 1
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(
            body=fed.aggregate, content_type="application/samlmetadata+xml", headers={"ETag": etag}
        )

    async def mdq(request: web.Request) -> web.Response:
        entity_id = urllib.parse.unquote(request.match_info["id"])
        fed.requests[entity_id] += 1
        assert request.headers["Accept"] == "application/samlmetadata+xml"
        if entity_id not in fed.mdq:
            return web.Response(status=404)
        return web.Response(body=fed.mdq[entity_id], content_type="application/samlmetadata+xml")

    app = web.Application()
    app.router.add_get("/aggregate.xml", aggregate)
    app.router.add_get("/mdq/entities/{id:.+}", mdq)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fed.base_url = f"http://127.0.0.1:{port}"
    yield fed
    await runner.cleanup()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def eventually(check: Callable[[], bool], what: str, *, within: float = 20.0) -> None:
    """Poll until `check()` holds (the refresh task runs in the background)."""
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


# --- aggregate -------------------------------------------------------------------------------


async def test_signed_aggregate_loads_and_indexes_only_idps(
    federation: Federation, http: aiohttp.ClientSession, federation_key: Signer
) -> None:
    federation.aggregate = federation_key.sign(aggregate_template())
    store = MetadataStore(
        [AggregateSource(federation.aggregate_url, federation_key.cert_pem)], http=http
    )
    await store.start()
    try:
        assert len(store) == 2
        alpha = await store.lookup(IDP_A)
        assert alpha is not None and alpha.display_name == "Alpha University"
        assert alpha.allows_scope("alpha.example")
        assert await store.lookup(SP) is None
        assert [e.entity_id for e in store.search("beta", 10)] == [IDP_B]
    finally:
        await store.close()


async def test_category_filter_applies_to_aggregates(
    federation: Federation, http: aiohttp.ClientSession, federation_key: Signer
) -> None:
    federation.aggregate = federation_key.sign(aggregate_template())
    store = MetadataStore(
        [AggregateSource(federation.aggregate_url, federation_key.cert_pem)],
        http=http,
        entity_categories=[REFEDS_RS],
    )
    await store.start()
    try:
        assert await store.lookup(IDP_A) is None
        assert await store.lookup(IDP_B) is not None
    finally:
        await store.close()


def test_the_wrapping_attack_passes_xmlsec1_alone(
    tmp_path: Path, federation_key: Signer, attacker_key: Signer
) -> None:
    """The signature-moved-to-wrapper document does verify cryptographically (its Reference
    points at the untouched original); only the adapter's structural check refuses it. Shown
    here so the test above cannot pass for the wrong reason."""
    path = tmp_path / "wrapped.xml"
    path.write_bytes(tamper_wrapped(federation_key, attacker_key))
    pubkey = ("--pubkey-cert-pem", str(federation_key.cert), str(path))
    result = subprocess.run(
        ["xmlsec1", "--verify", "--enabled-key-data", "key-name", *ID_ATTRS, *pubkey],
        capture_output=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("tamper", "reason"), TAMPERED)
async def test_tampered_aggregate_is_refused_on_first_load(
    federation: Federation,
    http: aiohttp.ClientSession,
    federation_key: Signer,
    attacker_key: Signer,
    tamper: Callable[[Signer, Signer], bytes],
    reason: str,
) -> None:
    federation.aggregate = tamper(federation_key, attacker_key)
    store = MetadataStore(
        [AggregateSource(federation.aggregate_url, federation_key.cert_pem)], http=http
    )
    with pytest.raises(ConfigurationError, match=reason):
        await store.start()
    assert federation.requests["aggregate"] == 1
    assert len(store) == 0
    for entity_id in (IDP_A, IDP_B, IDP_EVIL):
        assert await store.lookup(entity_id) is None
    assert store.search("", 10) == []


@pytest.mark.parametrize(("tamper", "reason"), TAMPERED)
async def test_tampered_aggregate_on_refresh_keeps_the_last_good_copy(
    federation: Federation,
    http: aiohttp.ClientSession,
    federation_key: Signer,
    attacker_key: Signer,
    tamper: Callable[[Signer, Signer], bytes],
    reason: str,
) -> None:
    federation.aggregate = federation_key.sign(aggregate_template())
    source = AggregateSource(
        federation.aggregate_url, federation_key.cert_pem, min_refresh=0.1, max_refresh=0.1
    )
    store = MetadataStore([source], http=http)
    await store.start()
    try:
        with structlog.testing.capture_logs() as logs:
            federation.aggregate = tamper(federation_key, attacker_key)
            fetched = federation.requests["aggregate"]
            await eventually(
                lambda: federation.requests["aggregate"] >= fetched + 2, "two refresh attempts"
            )
            await eventually(
                lambda: sum(e["event"] == "saml_metadata_refresh_failed" for e in logs) >= 2,
                "the failures are logged",
            )
        failures = [e for e in logs if e["event"] == "saml_metadata_refresh_failed"]
        assert failures[0]["log_level"] == "warning"
        assert any(re.search(reason, e["reason"]) for e in failures)
        assert failures[0]["retry_in"] == pytest.approx(0.1)
        assert len(store) == 2
        alpha = await store.lookup(IDP_A)
        assert alpha is not None and alpha.display_name == "Alpha University"
        assert await store.lookup(IDP_EVIL) is None
        assert [e.entity_id for e in store.search("evil", 10)] == []
    finally:
        await store.close()


async def test_refresh_picks_up_a_newly_published_aggregate(
    federation: Federation, http: aiohttp.ClientSession, federation_key: Signer
) -> None:
    federation.aggregate = federation_key.sign(aggregate_template())
    source = AggregateSource(
        federation.aggregate_url, federation_key.cert_pem, min_refresh=0.1, max_refresh=0.1
    )
    store = MetadataStore([source], http=http)
    await store.start()
    try:
        # Unchanged: the refresh is a conditional GET answered 304; the index stays.
        await eventually(lambda: federation.not_modified >= 2, "304 answers")
        assert await store.lookup(IDP_A) is not None

        newcomer = entity(IDP_NEW, [("en", "Newcomer College")])
        federation.aggregate = federation_key.sign(
            document(
                [newcomer, entity(IDP_B, [("en", "Beta Institute (renamed)")])],
                valid_until=in_hours(48),
                root_id="_agg2",
                signature=signature_template("#_agg2"),
            )
        )
        await eventually(lambda: len(store) == 2 and bool(store.search("newcomer", 1)), "v2")
        assert (await store.lookup(IDP_NEW)) is not None
        assert await store.lookup(IDP_A) is None  # removed from the federation
        beta = await store.lookup(IDP_B)
        assert beta is not None and beta.display_name == "Beta Institute (renamed)"
    finally:
        await store.close()


async def test_refresh_failure_past_valid_until_drops_the_copy(
    federation: Federation, http: aiohttp.ClientSession, federation_key: Signer
) -> None:
    federation.aggregate = federation_key.sign(
        aggregate_template(valid_until=datetime.now(UTC) + timedelta(seconds=3))
    )
    source = AggregateSource(
        federation.aggregate_url, federation_key.cert_pem, min_refresh=0.2, max_refresh=60
    )
    store = MetadataStore([source], http=http)
    await store.start()
    try:
        assert await store.lookup(IDP_A) is not None
        with structlog.testing.capture_logs() as logs:
            federation.aggregate_status = 503
            await eventually(
                lambda: any(e["event"] == "saml_metadata_expired" for e in logs), "expiry"
            )
        assert await store.lookup(IDP_A) is None
        assert len(store) == 0 and store.search("", 10) == []
        failure = next(e for e in logs if e["event"] == "saml_metadata_refresh_failed")
        assert "503" in failure["reason"]
    finally:
        await store.close()


async def test_unreachable_aggregate_on_first_load(
    federation: Federation, http: aiohttp.ClientSession, federation_key: Signer
) -> None:
    federation.aggregate_status = 500
    store = MetadataStore(
        [AggregateSource(federation.aggregate_url, federation_key.cert_pem)], http=http
    )
    with pytest.raises(ConfigurationError, match="500"):
        await store.start()
    assert len(store) == 0


# --- MDQ -------------------------------------------------------------------------------------


def mdq_answer(
    signer: Signer,
    entity_id: str,
    name: str,
    *,
    valid_until: datetime | None = None,
    idp: bool = True,
    with_cert: bool = True,
) -> bytes:
    """A signed EntityDescriptor, as an MDQ responder answers."""
    until = iso(valid_until or in_hours(24))
    body = entity(entity_id, [("en", name)], idp=idp, sp=not idp).replace(
        "<md:EntityDescriptor ",
        f'<md:EntityDescriptor {NAMESPACES} ID="_e1" validUntil="{until}" cacheDuration="PT1H" ',
        1,
    )
    # The signature is the first child, right after the start tag.
    body = body.replace(">", ">" + signature_template("#_e1"), 1)
    return signer.sign(f'<?xml version="1.0"?>\n{body}'.encode(), with_cert=with_cert)


@pytest_asyncio.fixture
async def mdq_store(
    federation: Federation, http: aiohttp.ClientSession, federation_key: Signer
) -> AsyncIterator[MetadataStore]:
    store = MetadataStore([MdqSource(federation.mdq_url, federation_key.cert_pem)], http=http)
    await store.start()
    yield store
    await store.close()


async def test_mdq_lookup_verifies_and_caches(
    federation: Federation, mdq_store: MetadataStore, federation_key: Signer
) -> None:
    federation.mdq[IDP_A] = mdq_answer(federation_key, IDP_A, "Alpha via MDQ")
    assert mdq_store.search("alpha", 10) == []  # not searchable before a lookup fetched it
    found = await mdq_store.lookup(IDP_A)
    assert found is not None and found.display_name == "Alpha via MDQ"
    again = await mdq_store.lookup(IDP_A)
    assert again is found
    assert federation.requests[IDP_A] == 1
    assert [e.entity_id for e in mdq_store.search("alpha", 10)] == [IDP_A]
    assert len(mdq_store) == 0  # MDQ answers are not counted as indexed


async def test_mdq_concurrent_lookups_share_one_query(
    federation: Federation, mdq_store: MetadataStore, federation_key: Signer
) -> None:
    federation.mdq[IDP_A] = mdq_answer(federation_key, IDP_A, "Alpha")
    found = await asyncio.gather(*(mdq_store.lookup(IDP_A) for _ in range(5)))
    assert {id(e) for e in found} == {id(found[0])} and found[0] is not None
    assert federation.requests[IDP_A] == 1


async def test_mdq_404_is_none_and_briefly_cached(
    federation: Federation, mdq_store: MetadataStore
) -> None:
    assert await mdq_store.lookup(IDP_NEW) is None
    assert await mdq_store.lookup(IDP_NEW) is None
    assert federation.requests[IDP_NEW] == 1


async def test_mdq_sp_answer_is_filtered_out(
    federation: Federation, mdq_store: MetadataStore, federation_key: Signer
) -> None:
    federation.mdq[SP] = mdq_answer(federation_key, SP, "A service", idp=False)
    assert await mdq_store.lookup(SP) is None
    assert federation.requests[SP] == 1


MDQ_REFUSED = [
    pytest.param(
        lambda fed, evil: mdq_answer(fed, IDP_A, "Alpha").replace(b"Alpha", b"Evil"),
        "does not verify",
        id="tampered",
    ),
    pytest.param(
        lambda fed, evil: mdq_answer(evil, IDP_A, "Alpha"), "does not verify", id="another-key"
    ),
    pytest.param(
        lambda fed, evil: mdq_answer(fed, IDP_B, "Beta"), "describes", id="answer-for-another-id"
    ),
    pytest.param(
        lambda fed, evil: mdq_answer(
            fed, IDP_A, "Alpha", valid_until=datetime.now(UTC) - timedelta(minutes=1)
        ),
        "expired",
        id="expired",
    ),
    pytest.param(lambda fed, evil: b"<md:EntityDescriptor", "not SAML", id="malformed"),
    pytest.param(lambda fed, evil: b"<html>oops</html>", "not SAML", id="not-metadata"),
]


@pytest.mark.parametrize(("answer", "reason"), MDQ_REFUSED)
async def test_mdq_refuses_an_unverifiable_answer_and_does_not_cache_it(
    federation: Federation,
    mdq_store: MetadataStore,
    federation_key: Signer,
    attacker_key: Signer,
    answer: Callable[[Signer, Signer], bytes],
    reason: str,
) -> None:
    federation.mdq[IDP_A] = answer(federation_key, attacker_key)
    with structlog.testing.capture_logs() as logs, pytest.raises(UpstreamFailed) as raised:
        await mdq_store.lookup(IDP_A)
    assert re.search(reason, raised.value.log_detail)
    assert any(e["event"] == "saml_mdq_refused" for e in logs)
    assert mdq_store.search("alpha", 10) == [] and mdq_store.search("evil", 10) == []
    # Not cached: once the responder answers correctly, the next lookup succeeds.
    federation.mdq[IDP_A] = mdq_answer(federation_key, IDP_A, "Alpha")
    found = await mdq_store.lookup(IDP_A)
    assert found is not None and found.display_name == "Alpha"
    assert federation.requests[IDP_A] == 2


async def test_mdq_sha1_form_and_aggregate_first(
    federation: Federation, http: aiohttp.ClientSession, federation_key: Signer
) -> None:
    federation.aggregate = federation_key.sign(aggregate_template())
    hashed = "{sha1}" + hashlib.sha1(IDP_NEW.encode()).hexdigest()  # noqa: S324
    federation.mdq[hashed] = mdq_answer(federation_key, IDP_NEW, "Newcomer")
    store = MetadataStore(
        [
            AggregateSource(federation.aggregate_url, federation_key.cert_pem),
            MdqSource(federation.mdq_url, federation_key.cert_pem, id_form="sha1"),
        ],
        http=http,
    )
    await store.start()
    try:
        assert await store.lookup(IDP_A) is not None  # from the aggregate: no MDQ query
        found = await store.lookup(IDP_NEW)
        assert found is not None and found.entity_id == IDP_NEW
        assert federation.requests == Counter({"aggregate": 1, hashed: 1})
        names = [e.display_name for e in store.search("", 10)]
        assert names == ["Alpha University", "Beta Institute", "Newcomer"]
    finally:
        await store.close()
