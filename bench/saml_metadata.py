"""SAML federation metadata at eduGAIN scale: load + verify + index, lookup and search.

Generates (once, cached in a temp dir, never committed) a signed aggregate of N entities,
~70 % IdPs and ~30 % SPs, shaped like eduGAIN's: mdui DisplayName/Description in two
languages, Organization, ContactPerson, shibmd:Scope (some as regexp), entity categories,
RegistrationInfo, KeyDescriptors, SSO/ACS endpoints. Signing and encryption certificates come
from a pool of 200 self-signed 2048-bit RSA certificates (over 40 keys) reused round-robin:
generating 10,000 RSA keys would take minutes and a distinct key per entity changes nothing the
loader does (it copies the base64 text). The aggregate is signed with xmlsec1 (rsa-sha256,
exc-c14n, enveloped, Reference "#<root ID>"), as federations do.

A fresh Python subprocess then loads it the way the broker does: `MetadataStore` with one
`AggregateSource` fetching over HTTP from a loopback static server, verifying the signature
with xmlsec1 and indexing the IdPs. It reports wall and CPU time of `start()`, the peak RSS of
that process and of its xmlsec1 child (getrusage ru_maxrss), lookup latency over 100k random
lookups and search latency for a few type-ahead queries.

    python bench/saml_metadata.py [--entities 10000] [--smoke] [--runs 3] [--fresh]

The aggregate is cached in $TMPDIR/binder-broker-bench/saml-N/ (remove it by hand).

Goals (the issue): load + verify + index < 15 s, peak RSS < 300 MB, lookup < 1 ms,
search < 5 ms at 10,000 entities.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CERT_POOL = 200
KEY_POOL = 40
IDP_SHARE = 0.7
SEARCHES = ("uni", "technische", "institute of tech", "zzzz-no-match", "univ berg", "e")

NAMESPACES = (
    'xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" '
    'xmlns:ds="http://www.w3.org/2000/09/xmldsig#" '
    'xmlns:mdui="urn:oasis:names:tc:SAML:metadata:ui" '
    'xmlns:mdrpi="urn:oasis:names:tc:SAML:metadata:rpi" '
    'xmlns:mdattr="urn:oasis:names:tc:SAML:metadata:attribute" '
    'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" '
    'xmlns:shibmd="urn:mace:shibboleth:metadata:1.0" '
    'xmlns:remd="http://refeds.org/metadata"'
)
PROTOCOL = 'protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol"'
SIGNATURE_TEMPLATE = (
    "<ds:Signature><ds:SignedInfo>"
    '<ds:CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/>'
    '<ds:SignatureMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"/>'
    '<ds:Reference URI="#{id}"><ds:Transforms>'
    '<ds:Transform Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature"/>'
    '<ds:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/></ds:Transforms>'
    '<ds:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/>'
    "<ds:DigestValue/></ds:Reference></ds:SignedInfo><ds:SignatureValue/>"
    "<ds:KeyInfo><ds:X509Data/></ds:KeyInfo></ds:Signature>"
)
CITIES = (
    "Aachen Aarhus Amsterdam Athens Barcelona Bergen Berlin Bologna Bordeaux Bratislava Brno "
    "Brussels Bucharest Budapest Cambridge Cork Coimbra Dresden Dublin Edinburgh Espoo Florence "
    "Frankfurt Geneva Ghent Glasgow Gothenburg Graz Groningen Hamburg Heidelberg Helsinki "
    "Innsbruck Kaunas Krakow Leiden Leuven Lisbon Ljubljana Lund Lyon Madrid Malmo Milan Munich "
    "Nantes Naples Oslo Oxford Padua Paris Porto Prague Reykjavik Riga Rome Salamanca Seville "
    "Sofia Stockholm Tallinn Tartu Trieste Trondheim Turin Turku Uppsala Utrecht Valencia Vienna "
    "Vilnius Warsaw Zagreb Zurich Boston Chicago Denver Austin Seattle Toronto Montreal Sydney "
    "Melbourne Auckland Tokyo Osaka Seoul Taipei Singapore Nairobi Accra Lagos Santiago Lima"
).split()
KINDS = (
    ("University of {c}", "Universität {c}"),
    ("{c} Institute of Technology", "Technische Hochschule {c}"),
    ("Technical University of {c}", "Technische Universität {c}"),
    ("{c} School of Economics", "Wirtschaftsuniversität {c}"),
    ("{c} University Hospital", "Universitätsklinikum {c}"),
    ("National Library of {c}", "Nationalbibliothek {c}"),
    ("{c} Academy of Fine Arts", "Kunstakademie {c}"),
    ("Research Centre {c}", "Forschungszentrum {c}"),
)
FEDERATIONS = tuple(f"https://federation-{n}.example.org/" for n in range(40))
CATEGORIES = (
    "http://refeds.org/category/research-and-scholarship",
    "https://refeds.org/category/code-of-conduct/v2",
    "https://refeds.org/category/personalized",
    "http://www.geant.net/uri/dataprotection-code-of-conduct/v1",
)


def _cert_pool() -> tuple[list[str], bytes, bytes]:
    """(base64 DER certificates for entities, federation key PEM, federation cert PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(key: rsa.RSAPrivateKey, cn: str) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now + dt.timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )

    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(KEY_POOL)]
    pool = []
    for n in range(CERT_POOL):
        der = cert(keys[n % KEY_POOL], f"idp{n}.example.org").public_bytes(
            serialization.Encoding.DER
        )
        text = base64.b64encode(der).decode()
        pool.append("\n".join(text[i : i + 64] for i in range(0, len(text), 64)))
    fed_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fed_cert = cert(fed_key, "metadata-signer.federation.example.org")
    key_pem = fed_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pool, key_pem, fed_cert.public_bytes(serialization.Encoding.PEM)


def _key_descriptors(cert: str) -> str:
    return "".join(
        f'<md:KeyDescriptor use="{use}"><ds:KeyInfo><ds:X509Data><ds:X509Certificate>'
        f"{cert}</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor>"
        for use in ("signing", "encryption")
    )


def _entity(n: int, rng: random.Random, certs: list[str]) -> tuple[str, str, bool]:
    """(entity id, EntityDescriptor XML, is IdP)."""
    city = CITIES[n % len(CITIES)]
    en, de = KINDS[(n // len(CITIES)) % len(KINDS)]
    name_en, name_de = en.format(c=city), de.format(c=city)
    if n >= len(CITIES) * len(KINDS):
        name_en, name_de = f"{name_en} ({n})", f"{name_de} ({n})"
    domain = f"{city.lower()}-{n}.example.edu"
    is_idp = rng.random() < IDP_SHARE
    entity_id = (
        f"https://idp.{domain}/idp/shibboleth" if is_idp else f"https://sp.{domain}/shibboleth"
    )
    cert = certs[n % len(certs)]
    categories = rng.sample(CATEGORIES, rng.randint(0, 2))
    category_attr = (
        "http://macedir.org/entity-category-support"
        if is_idp
        else "http://macedir.org/entity-category"
    )
    attributes = (
        (
            f'<saml:Attribute Name="{category_attr}" '
            'NameFormat="urn:oasis:names:tc:SAML:2.0:attrname-format:uri">'
            + "".join(f"<saml:AttributeValue>{c}</saml:AttributeValue>" for c in categories)
            + "</saml:Attribute>"
            if categories
            else ""
        )
        + '<saml:Attribute Name="urn:oasis:names:tc:SAML:attribute:assurance-certification" '
        'NameFormat="urn:oasis:names:tc:SAML:2.0:attrname-format:uri">'
        "<saml:AttributeValue>https://refeds.org/sirtfi</saml:AttributeValue></saml:Attribute>"
    )
    federation = FEDERATIONS[n % len(FEDERATIONS)]
    ui = (
        "<mdui:UIInfo>"
        f'<mdui:DisplayName xml:lang="en">{escape(name_en)}</mdui:DisplayName>'
        f'<mdui:DisplayName xml:lang="de">{escape(name_de)}</mdui:DisplayName>'
        f'<mdui:Description xml:lang="en">Identity and access for staff and students of '
        f"{escape(name_en)}.</mdui:Description>"
        f'<mdui:Description xml:lang="de">Anmeldung für Beschäftigte und Studierende der '
        f"{escape(name_de)}.</mdui:Description>"
        f'<mdui:InformationURL xml:lang="en">https://www.{domain}/it/login</mdui:InformationURL>'
        f'<mdui:PrivacyStatementURL xml:lang="en">https://www.{domain}/privacy'
        "</mdui:PrivacyStatementURL>"
        f'<mdui:Logo height="16" width="16">https://www.{domain}/favicon.png</mdui:Logo>'
        f'<mdui:Logo height="60" width="200">https://www.{domain}/logo.png</mdui:Logo>'
        "</mdui:UIInfo>"
    )
    if is_idp:
        scope = (
            f'<shibmd:Scope regexp="true">^([a-z0-9-]+\\.)?{city.lower()}-{n}\\.example\\.edu$'
            "</shibmd:Scope>"
            if n % 10 == 0
            else f'<shibmd:Scope regexp="false">{domain}</shibmd:Scope>'
        )
        role = (
            f"<md:IDPSSODescriptor {PROTOCOL}>"
            f"<md:Extensions>{scope}{ui}<mdui:DiscoHints><mdui:DomainHint>{domain}"
            "</mdui:DomainHint></mdui:DiscoHints></md:Extensions>"
            + _key_descriptors(cert)
            + '<md:ArtifactResolutionService Binding="urn:oasis:names:tc:SAML:2.0:bindings:SOAP" '
            f'Location="https://idp.{domain}:8443/idp/profile/SAML2/SOAP/ArtifactResolution" '
            'index="1"/>'
            '<md:SingleLogoutService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect" '
            f'Location="https://idp.{domain}/idp/profile/SAML2/Redirect/SLO"/>'
            "<md:NameIDFormat>urn:oasis:names:tc:SAML:2.0:nameid-format:persistent</md:NameIDFormat>"
            "<md:NameIDFormat>urn:oasis:names:tc:SAML:2.0:nameid-format:transient</md:NameIDFormat>"
            '<md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST" '
            f'Location="https://idp.{domain}/idp/profile/SAML2/POST/SSO"/>'
            '<md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect" '
            f'Location="https://idp.{domain}/idp/profile/SAML2/Redirect/SSO"/>'
            "</md:IDPSSODescriptor>"
        )
    else:
        requested = "".join(
            f'<md:RequestedAttribute FriendlyName="{friendly}" Name="{oid}" '
            'NameFormat="urn:oasis:names:tc:SAML:2.0:attrname-format:uri" isRequired="true"/>'
            for friendly, oid in (
                ("eduPersonPrincipalName", "urn:oid:1.3.6.1.4.1.5923.1.1.1.6"),
                ("mail", "urn:oid:0.9.2342.19200300.100.1.3"),
                ("displayName", "urn:oid:2.16.840.1.113730.3.1.241"),
                ("eduPersonScopedAffiliation", "urn:oid:1.3.6.1.4.1.5923.1.1.1.9"),
            )
        )
        role = (
            '<md:SPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">'
            f"<md:Extensions>{ui}</md:Extensions>"
            + _key_descriptors(cert)
            + "".join(
                f'<md:AssertionConsumerService Binding="{binding}" '
                f'Location="https://sp.{domain}/Shibboleth.sso/SAML2/{short}" index="{i}"/>'
                for i, (binding, short) in enumerate(
                    (
                        ("urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST", "POST"),
                        ("urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Artifact", "Artifact"),
                    ),
                    start=1,
                )
            )
            + '<md:AttributeConsumingService index="1">'
            f'<md:ServiceName xml:lang="en">{escape(name_en)} portal</md:ServiceName>'
            + requested
            + "</md:AttributeConsumingService></md:SPSSODescriptor>"
        )
    xml = (
        f"<md:EntityDescriptor entityID={quoteattr(entity_id)}><md:Extensions>"
        f"<mdrpi:RegistrationInfo registrationAuthority={quoteattr(federation)} "
        'registrationInstant="2019-06-01T12:00:00Z">'
        f'<mdrpi:RegistrationPolicy xml:lang="en">{federation}policy</mdrpi:RegistrationPolicy>'
        "</mdrpi:RegistrationInfo>"
        f"<mdattr:EntityAttributes>{attributes}</mdattr:EntityAttributes></md:Extensions>"
        f"{role}<md:Organization>"
        f'<md:OrganizationName xml:lang="en">{escape(name_en)}</md:OrganizationName>'
        f'<md:OrganizationDisplayName xml:lang="en">{escape(name_en)}'
        "</md:OrganizationDisplayName>"
        f'<md:OrganizationURL xml:lang="en">https://www.{domain}/</md:OrganizationURL>'
        "</md:Organization>"
        '<md:ContactPerson contactType="technical"><md:GivenName>IT Service Desk</md:GivenName>'
        f"<md:EmailAddress>mailto:it-support@{domain}</md:EmailAddress></md:ContactPerson>"
        '<md:ContactPerson contactType="other" '
        'remd:contactType="http://refeds.org/metadata/contactType/security">'
        f"<md:GivenName>CERT</md:GivenName><md:EmailAddress>mailto:cert@{domain}"
        "</md:EmailAddress></md:ContactPerson></md:EntityDescriptor>\n"
    )
    return entity_id, xml, is_idp


def generate(directory: Path, entities: int) -> dict[str, object]:
    """Write `aggregate.xml` (signed), `signer.pem` and `entities.json` into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / "entities.json"
    if manifest.exists():
        info = json.loads(manifest.read_text())
        if dt.datetime.fromisoformat(info["valid_until"]) > dt.datetime.now(dt.UTC):
            return dict(info)
    started = time.perf_counter()
    certs, key_pem, cert_pem = _cert_pool()
    rng = random.Random(20240611)
    valid_until = (dt.datetime.now(dt.UTC) + dt.timedelta(days=14)).replace(microsecond=0)
    template = directory / "template.xml"
    ids: list[str] = []
    idps = 0
    with template.open("w", encoding="utf-8") as out:
        out.write(
            f'<?xml version="1.0" encoding="UTF-8"?>\n<md:EntitiesDescriptor {NAMESPACES} '
            f'ID="_bench{entities}" Name="urn:example:bench" cacheDuration="PT6H" '
            f'validUntil="{valid_until.strftime("%Y-%m-%dT%H:%M:%SZ")}">'
            + SIGNATURE_TEMPLATE.format(id=f"_bench{entities}")
            + "\n"
        )
        for n in range(entities):
            entity_id, xml, is_idp = _entity(n, rng, certs)
            out.write(xml)
            if is_idp:
                ids.append(entity_id)
                idps += 1
        out.write("</md:EntitiesDescriptor>\n")
    (directory / "signer.key").write_bytes(key_pem)
    (directory / "signer.pem").write_bytes(cert_pem)
    subprocess.run(
        [
            "xmlsec1",
            "--sign",
            "--id-attr:ID",
            "urn:oasis:names:tc:SAML:2.0:metadata:EntitiesDescriptor",
            "--privkey-pem",
            f"{directory / 'signer.key'},{directory / 'signer.pem'}",
            "--output",
            str(directory / "aggregate.xml"),
            str(template),
        ],
        check=True,
    )
    template.unlink()
    info = {
        "entities": entities,
        "idps": idps,
        "idp_ids": ids,
        "bytes": (directory / "aggregate.xml").stat().st_size,
        "valid_until": valid_until.isoformat(),
        "generated_in": round(time.perf_counter() - started, 1),
    }
    manifest.write_text(json.dumps(info))
    return info


# --- the measured child ------------------------------------------------------------------


async def _measure(url: str, cert_pem: str, ids: list[str], lookups: int) -> dict[str, object]:
    import aiohttp

    from adapters.upstream.saml_metadata import AggregateSource, MetadataStore

    async with aiohttp.ClientSession() as http:
        store = MetadataStore([AggregateSource(url, cert_pem)], http=http)
        cpu0, wall0 = os.times(), time.perf_counter()
        await store.start()
        wall = time.perf_counter() - wall0
        cpu1 = os.times()
        rng = random.Random(7)
        sample = [rng.choice(ids) for _ in range(lookups)]
        latencies = []
        for entity_id in sample:
            t0 = time.perf_counter_ns()
            found = await store.lookup(entity_id)
            latencies.append(time.perf_counter_ns() - t0)
            assert found is not None and found.entity_id == entity_id
        latencies.sort()
        searches = {}
        for query in SEARCHES:
            runs = []
            for _ in range(200):
                t0 = time.perf_counter_ns()
                hits = store.search(query, 20)
                runs.append(time.perf_counter_ns() - t0)
            runs.sort()
            searches[query] = {
                "hits": len(hits),
                "p50_ms": runs[len(runs) // 2] / 1e6,
                "p99_ms": runs[int(len(runs) * 0.99)] / 1e6,
            }
        indexed = len(store)
        await store.close()
    return {
        "indexed": indexed,
        "wall_s": wall,
        "cpu_self_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "cpu_children_s": (cpu1.children_user - cpu0.children_user)
        + (cpu1.children_system - cpu0.children_system),
        # Linux reports ru_maxrss in KiB.
        "rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_xmlsec1_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "lookup_p50_us": latencies[len(latencies) // 2] / 1e3,
        "lookup_p99_us": latencies[int(len(latencies) * 0.99)] / 1e3,
        "lookup_max_us": latencies[-1] / 1e3,
        "searches": searches,
    }


def _child(args: argparse.Namespace) -> None:
    directory = Path(args.child)
    info = json.loads((directory / "entities.json").read_text())
    result = asyncio.run(
        _measure(args.url, (directory / "signer.pem").read_text(), info["idp_ids"], args.lookups)
    )
    print(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    serve = (str(directory), str(port))
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", *serve],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/aggregate.xml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--smoke", action="store_true", help="1,000 entities, 10k lookups")
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="fresh child processes; medians")
    parser.add_argument("--fresh", action="store_true", help="regenerate the cached aggregate")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if args.smoke:
        args.entities, args.lookups = 1_000, 10_000
    directory = Path(tempfile.gettempdir()) / "binder-broker-bench" / f"saml-{args.entities}"
    if args.fresh and directory.exists():
        shutil.rmtree(directory)
    info = generate(directory, args.entities)
    print(
        f"aggregate: {info['entities']} entities ({info['idps']} IdPs), "
        f"{int(info['bytes']) / 1e6:.1f} MB, {directory / 'aggregate.xml'}",
        file=sys.stderr,
    )
    server, url = _serve(directory)
    results = []
    lookups = ("--lookups", str(args.lookups))
    try:
        for _ in range(args.runs):
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(directory), "--url", url, *lookups],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    finally:
        server.terminate()
        server.wait()
    _report(info, results, args)


def _report(info: dict[str, object], results: list[dict[str, object]], args: object) -> None:
    def med(key: str) -> float:
        return statistics.median(float(r[key]) for r in results)  # type: ignore[arg-type]

    entities = int(info["entities"])  # type: ignore[call-overload]
    scale = entities / 10_000
    rows = [
        (
            "load + verify + index, wall",
            f"{med('wall_s'):.2f} s",
            f"< {15 * scale:.1f} s",
            med("wall_s") < 15 * scale,
        ),
        ("  CPU, broker process", f"{med('cpu_self_s'):.2f} s", "", None),
        ("  CPU, xmlsec1 child", f"{med('cpu_children_s'):.2f} s", "", None),
        (
            "peak RSS, broker process",
            f"{med('rss_self_mb'):.0f} MB",
            "< 300 MB",
            med("rss_self_mb") < 300,
        ),
        ("peak RSS, xmlsec1 child", f"{med('rss_xmlsec1_mb'):.0f} MB", "(transient)", None),
        ("lookup p50", f"{med('lookup_p50_us'):.2f} µs", "< 1 ms", med("lookup_p50_us") < 1000),
        ("lookup p99", f"{med('lookup_p99_us'):.2f} µs", "< 1 ms", med("lookup_p99_us") < 1000),
    ]
    for query in SEARCHES:
        p50 = statistics.median(r["searches"][query]["p50_ms"] for r in results)  # type: ignore[index]
        worst = statistics.median(r["searches"][query]["p99_ms"] for r in results)  # type: ignore[index]
        hits = results[0]["searches"][query]["hits"]  # type: ignore[index]
        rows.append(
            (
                f"search {query!r} (limit 20, {hits} hits) p50 / p99",
                f"{p50:.3f} / {worst:.3f} ms",
                "< 5 ms",
                p50 < 5,
            )
        )
    print(
        f"\n{entities} entities ({info['idps']} IdPs, {int(info['bytes']) / 1e6:.1f} MB signed "  # type: ignore[call-overload]
        f"aggregate), indexed {results[0]['indexed']}; {len(results)} fresh processes, medians; "
        f"{os.cpu_count()} cores; {dt.date.today().isoformat()}\n"
    )
    print("| measure | value | goal | met |\n| --- | --- | --- | --- |")
    for name, value, goal, met in rows:
        mark = "" if met is None else ("yes" if met else "**NO**")
        print(f"| {name} | {value} | {goal} | {mark} |")


if __name__ == "__main__":
    main()
