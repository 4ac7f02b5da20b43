"""Unit tests for policies.engine: loading, decisions, limits, and fail-closed behaviour."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from policies.decision import Decision, Limits
from policies.engine import (
    EntityRef,
    PolicyEngine,
    PolicyError,
    PrincipalLike,
    Resource,
    describe,
)

PACKAGED = Path(__file__).resolve().parents[2] / "policies"
SCHEMA = PACKAGED / "broker.cedarschema"
SMALL_LAUNCH = {"ttl_seconds": 600, "cpu": 1, "memory_gb": 2, "disk_gb": 5, "gpu": 0}
AWS = Resource("Backend", "aws", {"kind": "aws"})


@dataclass(frozen=True)
class FakePrincipal:
    """Mirrors adapters.base.Principal: `id` is a read-only property there too."""

    subject: str = "alice"
    idp: str = "github"
    issuer: str = "https://github.com"
    groups: tuple[str, ...] = ()
    affiliation: tuple[str, ...] = ()
    email: str | None = None
    acr: str | None = None
    mfa: bool = False

    @property
    def id(self) -> str:
        return f"u-{self.subject}"


def principal(**kwargs: object) -> PrincipalLike:
    return FakePrincipal(**kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.load()


def write_policies(directory: Path, text: str, name: str = "site.cedar") -> Path:
    """A policy directory with the packaged schema and one policy file."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(SCHEMA, directory / SCHEMA.name)
    path = directory / name
    path.write_text(text)
    return path


# --- loading ---------------------------------------------------------------------------------


def test_default_policies_load_with_ids(engine: PolicyEngine) -> None:
    assert {
        "sign-in-anyone",
        "exchange-signed-in",
        "admin-broker-admins",
        "forbid-unverified-admin",
        "launch-small",
    } <= set(engine.policy_ids)


def test_policy_without_id_is_refused(tmp_path: Path) -> None:
    write_policies(
        tmp_path,
        '@id("ok")\npermit (principal, action == Action::"sign_in", resource);\n'
        'permit (principal, action == Action::"admin", resource);\n',
        name="noid.cedar",
    )
    with pytest.raises(PolicyError, match=r"noid\.cedar.*permit #2.*no @id"):
        PolicyEngine.load(tmp_path)


def test_syntax_error_names_file_and_problem(tmp_path: Path) -> None:
    write_policies(
        tmp_path,
        '@id("broken")\npermit (principal, action, resource) when { context.x +* 1 };\n',
        name="broken.cedar",
    )
    with pytest.raises(PolicyError, match=r"broken\.cedar: Cedar parse error: unexpected token"):
        PolicyEngine.load(tmp_path)


def test_schema_invalid_policy_names_file_policy_and_attribute(tmp_path: Path) -> None:
    write_policies(
        tmp_path,
        '@id("typo")\npermit (principal is User, action == Action::"read_repo", resource)\n'
        'when { resource.visibilty == "public" };\n',
        name="typo.cedar",
    )
    with pytest.raises(PolicyError) as info:
        PolicyEngine.load(tmp_path)
    message = str(info.value)
    assert "typo.cedar" in message
    assert "visibilty" in message
    assert "`typo`" in message  # the @id, not Cedar's positional "policy0"


def test_duplicate_id_across_files_is_refused(tmp_path: Path) -> None:
    text = '@id("same")\npermit (principal, action == Action::"sign_in", resource);\n'
    write_policies(tmp_path, text, name="a.cedar")
    write_policies(tmp_path, text, name="b.cedar")
    with pytest.raises(PolicyError, match=r"b\.cedar: duplicate @id\(\"same\"\), also in a\.cedar"):
        PolicyEngine.load(tmp_path)


@pytest.mark.parametrize("value", ["-1", "lots", "1.5", "nan"])
def test_bad_limit_annotation_is_refused(tmp_path: Path, value: str) -> None:
    write_policies(
        tmp_path,
        f'@id("bad-ttl")\n@max_ttl("{value}")\n'
        'permit (principal, action == Action::"exchange", resource);\n',
    )
    with pytest.raises(PolicyError, match=r"site\.cedar: policy 'bad-ttl': @max_ttl"):
        PolicyEngine.load(tmp_path)


def test_limit_annotation_on_forbid_is_refused(tmp_path: Path) -> None:
    write_policies(
        tmp_path, '@id("f")\n@cpu("2")\nforbid (principal, action == Action::"launch", resource);\n'
    )
    with pytest.raises(PolicyError, match="only make sense on a permit"):
        PolicyEngine.load(tmp_path)


def test_directory_without_policies_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"no \*\.cedar policy files"):
        PolicyEngine.load(tmp_path)


def test_static_entities_must_fit_schema() -> None:
    with pytest.raises(PolicyError, match="static entities"):
        PolicyEngine.load(entities=[Resource("Backend", "aws", {"kind": 3})])


# --- decisions -------------------------------------------------------------------------------


def test_allow_has_reasons_and_limits(engine: PolicyEngine) -> None:
    decision = engine.decide(principal(), "launch", AWS, SMALL_LAUNCH)
    assert decision == Decision(
        allowed=True,
        reasons=("launch-small",),
        limits=Limits(max_ttl=3600, cpu=2, memory=4, disk=10, gpu=0),
    )


def test_launch_bounds_are_limits_the_broker_enforces(engine: PolicyEngine) -> None:
    # The default launch permit has no conditions on size: its annotations are the bounds,
    # which the credentials API enforces (refusing, naming the policy) and clips to.
    decision = engine.decide(principal(), "launch", AWS, {**SMALL_LAUNCH, "cpu": 16})
    assert decision.allowed and decision.reasons == ("launch-small",)
    assert decision.limits == Limits(max_ttl=3600, cpu=2, memory=4, disk=10, gpu=0)
    assert not engine.decide(None, "launch", AWS, SMALL_LAUNCH).allowed  # a user launches


def test_request_beyond_a_conditional_policy_is_denied_without_reasons(tmp_path: Path) -> None:
    write_policies(
        tmp_path,
        '@id("launch-tiny")\n'
        'permit (principal is User, action == Action::"launch", resource)\n'
        "when { context.cpu <= 1 };\n",
    )
    engine = PolicyEngine.load(tmp_path, entities=[AWS])
    for _ in range(2):  # the second round is answered from the memo
        assert engine.decide(principal(), "launch", AWS, SMALL_LAUNCH).allowed
        decision = engine.decide(principal(), "launch", AWS, {**SMALL_LAUNCH, "cpu": 16})
        assert decision == Decision(allowed=False)


def test_forbid_beats_permit_and_is_the_reason(engine: PolicyEngine) -> None:
    admin = principal(groups=("broker-admins",), mfa=False)
    decision = engine.decide(admin, "admin", Resource("Broker", "broker"))
    assert not decision.allowed
    assert decision.reasons == ("forbid-unverified-admin",)
    assert decision.errors == ()


def test_group_membership_via_parents(engine: PolicyEngine) -> None:
    broker = Resource("Broker", "broker")
    member = principal(groups=("staff", "broker-admins"), mfa=True)
    outsider = principal(groups=("staff",), mfa=True)
    assert engine.decide(member, "admin", broker).reasons == ("admin-broker-admins",)
    assert engine.decide(member, "admin", broker).allowed
    assert not engine.decide(outsider, "admin", broker).allowed


def test_missing_context_denies_with_error(engine: PolicyEngine) -> None:
    decision = engine.decide(principal(), "launch", AWS, {"ttl_seconds": 60, "cpu": 1})
    assert not decision.allowed
    assert decision.reasons == ()
    assert any("disk_gb" in e for e in decision.errors)


def test_unknown_action_and_wrong_resource_type_deny(engine: PolicyEngine) -> None:
    unknown = engine.decide(principal(), "delete_everything", AWS)
    wrong = engine.decide(principal(), "launch", Resource("Broker", "broker"), SMALL_LAUNCH)
    assert not unknown.allowed and unknown.errors
    assert not wrong.allowed and wrong.errors


def test_resource_attributes_that_do_not_fit_schema_deny(engine: PolicyEngine) -> None:
    repo = Resource("Repo", "r1", {"owner": "u-alice", "visibility": "private"})
    decision = engine.decide(principal(), "read_repo", repo)
    assert not decision.allowed
    assert any('Repo::"r1"' in e for e in decision.errors)


def test_entity_reference_attribute(engine: PolicyEngine) -> None:
    alice = principal(subject="alice")
    repo = Resource(
        "Repo", "gh/alice/r1",
        {"owner": EntityRef("User", alice.id), "visibility": "private", "backend": "gh",
         "namespace": "alice", "permission": "none"},
    )  # fmt: skip
    assert engine.decide(alice, "read_repo", repo).reasons == ("owner-reads-own-repo",)
    assert not engine.decide(principal(subject="bob"), "read_repo", repo).allowed


def test_no_principal_and_no_client_denies(engine: PolicyEngine) -> None:
    decision = engine.decide(None, "sign_in", Resource("Idp", "github"))
    assert not decision.allowed
    assert decision.errors == ("no principal and no client",)


def test_unconvertible_context_fails_closed(engine: PolicyEngine) -> None:
    decision = engine.decide(principal(), "launch", AWS, {**SMALL_LAUNCH, "cpu": 1.5})
    assert not decision.allowed
    assert decision.errors and "TypeError" in decision.errors[0]


def test_static_entities_are_used_for_the_resource() -> None:
    engine = PolicyEngine.load(entities=[AWS, Resource("Idp", "github")])
    # The resource is given without attributes: the static Backend::"aws" supplies them.
    decision = engine.decide(principal(), "launch", Resource("Backend", "aws"), SMALL_LAUNCH)
    assert decision.allowed and decision.reasons == ("launch-small",)


# --- custom policies and limit combination --------------------------------------------------


LIMITS_POLICIES = """
@id("base") @max_ttl("3600") @cpu("2") @memory("4") @disk("10") @gpu("0")
permit (principal is User, action == Action::"launch", resource)
when { context.cpu <= 2 };

@id("gpu-lab") @max_ttl("7200") @cpu("1") @memory("16.5") @gpu("1")
permit (principal in Group::"gpu-lab", action == Action::"launch", resource is Backend)
when { resource.kind == "aws" };

@id("client-service") @max_ttl("300")
permit (principal is Client, action == Action::"exchange", resource)
when { principal.first_party };
"""


@pytest.fixture
def custom(tmp_path: Path) -> PolicyEngine:
    write_policies(tmp_path, LIMITS_POLICIES)
    return PolicyEngine.load(tmp_path, entities=[Resource("Client", "svc", {"first_party": True})])


def test_custom_directory_replaces_defaults(custom: PolicyEngine) -> None:
    assert set(custom.policy_ids) == {"base", "gpu-lab", "client-service"}
    assert not custom.decide(principal(), "sign_in", Resource("Idp", "github")).allowed


def test_limits_combine_to_the_largest_and_unset_means_unbounded(custom: PolicyEngine) -> None:
    decision = custom.decide(principal(groups=("gpu-lab",)), "launch", AWS, SMALL_LAUNCH)
    assert decision.allowed
    assert decision.reasons == ("base", "gpu-lab")
    # disk: "gpu-lab" sets no bound, so the combination has none either.
    assert decision.limits == Limits(max_ttl=7200, cpu=2, memory=16.5, disk=None, gpu=1)


def test_single_permit_limits_apply_as_written(custom: PolicyEngine) -> None:
    decision = custom.decide(principal(), "launch", AWS, SMALL_LAUNCH)
    assert decision.reasons == ("base",)
    assert decision.limits == Limits(max_ttl=3600, cpu=2, memory=4, disk=10, gpu=0)


def test_client_principal(custom: PolicyEngine) -> None:
    svc = Resource("Client", "svc")
    allowed = custom.decide(None, "exchange", svc, client="svc")
    assert allowed.reasons == ("client-service",) and allowed.limits.max_ttl == 300
    # An unconfigured client is third-party (first_party false) and gets nothing.
    other = custom.decide(None, "exchange", Resource("Client", "other"), client="other")
    assert other == Decision(allowed=False)


# --- describe and speed ---------------------------------------------------------------------


def test_describe_lines(engine: PolicyEngine) -> None:
    allow = describe(engine.decide(principal(), "launch", AWS, SMALL_LAUNCH))
    assert allow.splitlines()[0] == "ALLOW"
    assert "launch-small" in allow and "max_ttl=3600s" in allow and "memory=4GiB" in allow
    deny = describe(Decision(allowed=False, errors=("boom",)))
    assert deny.splitlines() == ["DENY", "  error: boom"]
    assert "default deny" in describe(Decision(allowed=False))


def test_decide_reuses_the_parsed_handle(engine: PolicyEngine) -> None:
    """No timing assertion: prints a rough per-call figure for the record."""
    n = 500
    start = time.perf_counter()
    decisions = {engine.decide(principal(), "launch", AWS, SMALL_LAUNCH) for _ in range(n)}
    per_call = (time.perf_counter() - start) / n
    print(f"decide(): {per_call * 1e6:.0f} µs per call")
    assert len(decisions) == 1 and next(iter(decisions)).allowed


def test_remembered_decisions_still_depend_on_every_input(engine: PolicyEngine) -> None:
    broker = Resource("Broker", "broker")
    admin = principal(groups=("broker-admins",), mfa=True)
    # Same principal id each time; only groups, mfa or context differ.
    for _ in range(2):  # the second round is answered from the memo
        assert engine.decide(admin, "admin", broker).allowed
        assert not engine.decide(principal(groups=(), mfa=True), "admin", broker).allowed
        assert not engine.decide(principal(groups=("broker-admins",)), "admin", broker).allowed
        assert engine.decide(principal(), "launch", AWS, SMALL_LAUNCH).allowed
        assert not engine.decide(principal(mfa=True), "admin", broker).allowed


def test_a_federation_can_be_narrowed_to_some_idps_and_affiliations(tmp_path: Path) -> None:
    write_policies(
        tmp_path,
        '@id("campus-students-only")\n'
        'permit (principal, action == Action::"sign_in", resource == Idp::"incommon")\n'
        'when { principal.issuer == "https://idp.campus.example.edu/idp/shibboleth" &&\n'
        '       principal.affiliation.contains("student@campus.example.edu") };\n',
    )
    engine = PolicyEngine.load(tmp_path, entities=[Resource("Idp", "incommon")])
    federation = Resource("Idp", "incommon")
    campus = "https://idp.campus.example.edu/idp/shibboleth"
    student = principal(idp="incommon", issuer=campus, affiliation=("student@campus.example.edu",))
    elsewhere = principal(
        idp="incommon", issuer="https://idp.other.edu", affiliation=("student@campus.example.edu",)
    )
    staff = principal(idp="incommon", issuer=campus, affiliation=("staff@campus.example.edu",))
    assert engine.decide(student, "sign_in", federation).reasons == ("campus-students-only",)
    assert not engine.decide(elsewhere, "sign_in", federation).allowed
    assert not engine.decide(staff, "sign_in", federation).allowed


def _repo(permission: str, owner: str = "forge:gh/lab", visibility: str = "private") -> Resource:
    return Resource(
        "Repo", "gh/lab/r1",
        {"owner": EntityRef("User", owner), "visibility": visibility, "backend": "gh",
         "namespace": "lab", "organisation": "lab", "permission": permission},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("permission", "read", "grant"),
    [("none", False, False), ("read", True, False), ("write", True, False),
     ("admin", True, True)],
)  # fmt: skip
def test_default_repo_policies_follow_the_forge_permission(
    engine: PolicyEngine, permission: str, read: bool, grant: bool
) -> None:
    repo = _repo(permission)
    assert engine.decide(principal(), "read_repo", repo).allowed is read
    assert engine.decide(principal(), "grant_repo", repo).allowed is grant
    # Pushing and unmasking reviewers need a site policy, whatever the forge says.
    assert not engine.decide(principal(), "write_repo", repo).allowed
    assert not engine.decide(principal(), "see_reviewers", repo).allowed


def test_public_repos_are_readable_by_anyone_signed_in(engine: PolicyEngine) -> None:
    decision = engine.decide(principal(), "read_repo", _repo("none", visibility="public"))
    assert decision.reasons == ("read-public-repos",)
