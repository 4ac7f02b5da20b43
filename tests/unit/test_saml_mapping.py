"""SAML attribute mapping (research-and-education profile), scope checks, and the structural
rules that parse and shape-check a Response before any signature is trusted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from lxml import etree

from adapters.errors import AccessDenied, InvalidRequest
from adapters.upstream.saml import (
    ASSURANCE,
    DISPLAY_NAME,
    ENTITLEMENT,
    EPPN,
    EPTID,
    IS_MEMBER_OF,
    MAIL,
    NAMEID_PERSISTENT,
    PAIRWISE_ID,
    SCOPED_AFFILIATION,
    SUBJECT_ID,
    AssertionData,
    canonical_attribute_name,
    check_structure,
    parse_instant,
    parse_response_xml,
    principal_from_assertion,
    read_assertion,
)
from adapters.upstream.saml_metadata import Scope

IDP = "https://idp.campus.example.edu/idp/shibboleth"
SCOPES = (Scope("campus.example.edu"), Scope(r"^[a-z]+\.campus\.example\.edu$", regexp=True))
REFEDS_MFA = "https://refeds.org/profile/mfa"
NS = (
    'xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" '
    'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" '
    'xmlns:ds="http://www.w3.org/2000/09/xmldsig#"'
)


def allows(domain: str) -> bool:
    return any(scope.allows(domain) for scope in SCOPES)


def data(
    attributes: Mapping[str, Sequence[str]],
    *,
    name_id: str | None = None,
    name_id_format: str | None = None,
    context: str | None = None,
) -> AssertionData:
    return AssertionData(
        issuer=IDP,
        attributes={k: tuple(v) for k, v in attributes.items()},
        name_id=name_id,
        name_id_format=name_id_format,
        authn_context=context,
        authn_instant=1_700_000_000,
        assertion_id="id-1",
    )


def principal(d: AssertionData) -> object:
    return principal_from_assertion(
        d, upstream_id="campus", allows_scope=allows, mfa_contexts=(REFEDS_MFA,)
    )


# --- subject -------------------------------------------------------------------------------

PREFERENCE = [
    pytest.param(
        {SUBJECT_ID: ["u1@campus.example.edu"], PAIRWISE_ID: ["p@campus.example.edu"],
         EPPN: ["ada@campus.example.edu"], EPTID: ["t1"]},
        "u1@campus.example.edu", "subject-id", id="subject-id-first",
    ),
    pytest.param(
        {PAIRWISE_ID: ["p@campus.example.edu"], EPPN: ["ada@campus.example.edu"], EPTID: ["t1"]},
        "p@campus.example.edu", "pairwise-id", id="pairwise-id-second",
    ),
    pytest.param(
        {EPPN: ["ada@campus.example.edu"], EPTID: ["t1"]},
        "ada@campus.example.edu", "eduPersonPrincipalName", id="eppn-third",
    ),
    pytest.param({EPTID: ["t1"]}, "t1", "eduPersonTargetedID", id="eptid-fourth"),
]  # fmt: skip


@pytest.mark.parametrize(("attributes", "subject", "source"), PREFERENCE)
def test_subject_preference_order(
    attributes: Mapping[str, Sequence[str]], subject: str, source: str
) -> None:
    p = principal_from_assertion(
        data(attributes, name_id="pers-1", name_id_format=NAMEID_PERSISTENT),
        upstream_id="campus", allows_scope=allows, mfa_contexts=(),
    )  # fmt: skip
    assert p.subject == subject and p.claims["subject_source"] == source
    assert p.issuer == IDP and p.idp == "campus"


def test_persistent_name_id_is_the_last_resort() -> None:
    p = principal_from_assertion(
        data({MAIL: ["a@campus.example.edu"]}, name_id="opaque", name_id_format=NAMEID_PERSISTENT),
        upstream_id="campus", allows_scope=allows, mfa_contexts=(),
    )  # fmt: skip
    assert p.subject == "opaque" and p.claims["subject_source"] == "persistent NameID"


def test_transient_name_id_alone_is_no_subject() -> None:
    transient = "urn:oasis:names:tc:SAML:2.0:nameid-format:transient"
    with pytest.raises(AccessDenied) as refused:
        principal(data({MAIL: ["a@x.org"]}, name_id="t", name_id_format=transient))
    assert "no subject-id" in refused.value.log_detail


def test_multi_valued_subject_is_refused() -> None:
    with pytest.raises(AccessDenied) as refused:
        principal(data({SUBJECT_ID: ["a@campus.example.edu", "b@campus.example.edu"]}))
    assert "2 values" in refused.value.log_detail


# --- scopes --------------------------------------------------------------------------------

SCOPED = [
    pytest.param(SUBJECT_ID, "subject-id", id="subject-id"),
    pytest.param(PAIRWISE_ID, "pairwise-id", id="pairwise-id"),
    pytest.param(EPPN, "eduPersonPrincipalName", id="eppn"),
    pytest.param(SCOPED_AFFILIATION, "eduPersonScopedAffiliation", id="affiliation"),
]


@pytest.mark.parametrize(("urn", "label"), SCOPED)
def test_scope_outside_the_idps_scopes_refuses_the_sign_in(urn: str, label: str) -> None:
    attributes = {EPTID: ["t1"], urn: ["student@other.edu"]}
    with pytest.raises(AccessDenied) as refused:
        principal(data(attributes))
    assert label in refused.value.log_detail and "other.edu" in refused.value.log_detail


@pytest.mark.parametrize(
    "value",
    ["student@campus.example.edu.evil.org", "student@evilcampus.example.edu", "student@", "x"],
)
def test_near_miss_and_unscoped_values_are_refused(value: str) -> None:
    with pytest.raises(AccessDenied):
        principal(data({EPTID: ["t1"], SCOPED_AFFILIATION: [value]}))


def test_regexp_scope_and_case_insensitive_literal_scope_are_honoured() -> None:
    p = principal_from_assertion(
        data({EPPN: ["ada@CAMPUS.example.edu"],
              SCOPED_AFFILIATION: ["staff@med.campus.example.edu"]}),
        upstream_id="campus", allows_scope=allows, mfa_contexts=(),
    )  # fmt: skip
    assert p.affiliation == ("staff@med.campus.example.edu",)


# --- the other claims ----------------------------------------------------------------------


def test_full_mapping() -> None:
    p = principal_from_assertion(
        data(
            {
                SUBJECT_ID: ["ada.l@campus.example.edu"],
                EPPN: ["ada@campus.example.edu"],
                MAIL: ["not-an-email", "ada@campus.example.edu"],
                DISPLAY_NAME: ["Ada Lovelace"],
                SCOPED_AFFILIATION: ["student@campus.example.edu", "student@campus.example.edu"],
                ENTITLEMENT: ["urn:mace:x:hpc", "campus/students"],
                IS_MEMBER_OF: ["campus/students", "campus/chem"],
                ASSURANCE: ["https://refeds.org/assurance/IAP/medium"],
            },
            context=REFEDS_MFA,
        ),
        upstream_id="campus", allows_scope=allows, mfa_contexts=(REFEDS_MFA,),
    )  # fmt: skip
    assert p.email == "ada@campus.example.edu" and p.display_name == "Ada Lovelace"
    assert p.groups == ("urn:mace:x:hpc", "campus/students", "campus/chem")
    assert p.affiliation == ("student@campus.example.edu",)
    assert p.acr == REFEDS_MFA and p.mfa and p.amr == ("mfa",)
    assert p.auth_time == 1_700_000_000
    assert p.claims["eduperson_assurance"] == ["https://refeds.org/assurance/IAP/medium"]
    assert p.claims["eppn"] == "ada@campus.example.edu"


def test_password_context_is_not_mfa() -> None:
    ppt = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
    p = principal_from_assertion(
        data({EPTID: ["t1"]}, context=ppt), upstream_id="campus", allows_scope=allows,
        mfa_contexts=(REFEDS_MFA,),
    )  # fmt: skip
    assert p.acr == ppt and not p.mfa and p.amr == ()


@pytest.mark.parametrize(
    ("name", "urn"),
    [
        ("urn:oid:1.3.6.1.4.1.5923.1.1.1.6", EPPN),
        ("eduPersonPrincipalName", EPPN),
        ("urn:mace:dir:attribute-def:eduPersonPrincipalName", EPPN),
        ("isMemberOf", IS_MEMBER_OF),
        ("subject-id", SUBJECT_ID),
        ("urn:example:unknown", "urn:example:unknown"),
    ],
)
def test_attribute_names(name: str, urn: str) -> None:
    assert canonical_attribute_name(name) == urn


def test_read_assertion_names_values_and_context() -> None:
    xml = f"""<saml:Assertion {NS} ID="a1" Version="2.0" IssueInstant="2024-01-01T00:00:00Z">
      <saml:Issuer>{IDP}</saml:Issuer>
      <saml:Subject><saml:NameID Format="{NAMEID_PERSISTENT}">pid</saml:NameID></saml:Subject>
      <saml:AuthnStatement AuthnInstant="2024-01-01T00:00:00.1234567Z">
        <saml:AuthnContext><saml:AuthnContextClassRef>{REFEDS_MFA}</saml:AuthnContextClassRef>
        </saml:AuthnContext></saml:AuthnStatement>
      <saml:AttributeStatement>
        <saml:Attribute Name="eduPersonPrincipalName"><saml:AttributeValue>ada@campus.example.edu
          </saml:AttributeValue></saml:Attribute>
        <saml:Attribute Name="{EPTID}"><saml:AttributeValue>
          <saml:NameID Format="{NAMEID_PERSISTENT}">tid-1</saml:NameID></saml:AttributeValue>
        </saml:Attribute>
      </saml:AttributeStatement></saml:Assertion>"""
    read = read_assertion(etree.fromstring(xml))
    assert read.issuer == IDP and read.assertion_id == "a1"
    assert read.attributes[EPPN] == ("ada@campus.example.edu",)
    assert read.attributes[EPTID] == ("tid-1",)
    assert read.name_id == "pid" and read.name_id_format == NAMEID_PERSISTENT
    assert read.authn_context == REFEDS_MFA and read.authn_instant == 1704067200


def test_parse_instant() -> None:
    assert parse_instant("2024-01-01T00:00:00Z") == 1704067200
    assert parse_instant("2024-01-01T00:00:00.1234567Z") == pytest.approx(1704067200.123456)
    assert parse_instant("yesterday") is None and parse_instant(None) is None


# --- parsing and structure -----------------------------------------------------------------


def _response(inner: str, rid: str = "r1") -> bytes:
    return (
        f'<samlp:Response {NS} ID="{rid}" Version="2.0" IssueInstant="2024-01-01T00:00:00Z">'
        f"<saml:Issuer>{IDP}</saml:Issuer>{inner}</samlp:Response>"
    ).encode()


def _sig(ref: str, extra: str = "") -> str:
    return (
        f'<ds:Signature><ds:SignedInfo><ds:Reference URI="#{ref}"/></ds:SignedInfo>'
        f"<ds:SignatureValue>x</ds:SignatureValue>{extra}</ds:Signature>"
    )


def _assertion(aid: str = "a1", inner: str = "") -> str:
    return f'<saml:Assertion ID="{aid}"><saml:Issuer>{IDP}</saml:Issuer>{inner}</saml:Assertion>'


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(b'<!DOCTYPE r [<!ENTITY x "y">]><r>&x;</r>', id="doctype"),
        pytest.param(
            _response(_assertion(inner="<saml:Subject><saml:NameID>admin@campus.example.edu"
                                       "<!-- -->.evil.org</saml:NameID></saml:Subject>")),
            id="comment-in-name-id",
        ),
        pytest.param(_response("<?evil x?>" + _assertion()), id="processing-instruction"),
        pytest.param(b"<samlp:Response", id="not-well-formed"),
    ],
)  # fmt: skip
def test_parser_refuses(document: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_response_xml(document)


def test_sound_structure() -> None:
    root = parse_response_xml(_response(_sig("r1") + _assertion("a1", _sig("a1"))))
    shape = check_structure(root)
    assert shape.response_signed and shape.assertion_signed and shape.assertion is not None
    assert shape.assertion.get("ID") == "a1"


@pytest.mark.parametrize(
    ("inner", "reason"),
    [
        pytest.param(_assertion("a1", _sig("r1")), "does not reference", id="sig-refs-other"),
        pytest.param(_sig("a1") + _assertion("a1"), "does not reference", id="resp-sig-refs-a"),
        pytest.param(_assertion("a1", _sig("a1", "<ds:Object/>")), "ds:Object", id="object"),
        pytest.param(_assertion("a1", _sig("a1") + _sig("a1")), "two Signatures", id="two-sigs"),
        pytest.param(
            _assertion("a1", '<saml:Advice><saml:Assertion ID="a2"/></saml:Advice>'),
            "2 Assertion", id="assertion-in-advice",
        ),
        pytest.param(
            _assertion("a1", f"<saml:Subject>{_sig('a1')}</saml:Subject>"),
            "Signature inside", id="sig-in-subject",
        ),
        pytest.param(
            f'<samlp:Extensions>{_assertion("a1")}</samlp:Extensions>',
            "not a child", id="assertion-in-extensions",
        ),
        pytest.param(_assertion("a1") + '<saml:Issuer ID="a1"/>', "duplicate ID", id="dup-id"),
        pytest.param("", "0 Assertion", id="no-assertion"),
    ],
)  # fmt: skip
def test_wrapping_shapes_are_refused(inner: str, reason: str) -> None:
    with pytest.raises(AccessDenied) as refused:
        check_structure(parse_response_xml(_response(inner)))
    assert reason in refused.value.log_detail
