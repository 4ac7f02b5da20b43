"""The Cedar policy engine: (principal, action, resource, context) -> `Decision`.

Policies and schema are parsed and validated once, at `PolicyEngine.load`; `decide` only
builds the per-request entities and evaluates. Every policy must carry an `@id`, which becomes
its Cedar policy id, so diagnostics name policies by `@id` directly. Limits are annotations on
permits (`@max_ttl`, `@cpu`, `@memory`, `@disk`, `@gpu`). `decide` never raises: any error
denies, with the error in `Decision.errors` (fail closed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cedarpy

from policies.decision import Decision, Limits

__all__ = [
    "LIMIT_ANNOTATIONS",
    "EntityRef",
    "PolicyEngine",
    "PolicyError",
    "PrincipalLike",
    "Resource",
    "describe",
]

PACKAGE_DIR = Path(__file__).resolve().parent

# Annotation name -> Limits field type. cpu/memory/disk accept decimals ("0.5"); the others
# are whole numbers.
LIMIT_ANNOTATIONS: Mapping[str, type[int] | type[float]] = {
    "max_ttl": int,
    "cpu": float,
    "memory": float,
    "disk": float,
    "gpu": int,
}


class PolicyError(Exception):
    """Policies or schema that cannot be loaded. The message names the file and the problem."""


class PrincipalLike(Protocol):
    """What the engine reads from a signed-in principal (`adapters.base.Principal` fits)."""

    @property
    def id(self) -> str: ...
    @property
    def idp(self) -> str: ...
    @property
    def issuer(self) -> str: ...
    @property
    def groups(self) -> tuple[str, ...]: ...
    @property
    def affiliation(self) -> tuple[str, ...]: ...
    @property
    def email(self) -> str | None: ...
    @property
    def acr(self) -> str | None: ...
    @property
    def mfa(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class EntityRef:
    """A reference to another entity, for attribute values such as `Repo.owner`."""

    type: str
    id: str


@dataclass(frozen=True)
class Resource:
    """An entity: the resource of a request, or a static entity given to the engine.

    `attrs` values may be str, int, bool, `EntityRef`, sets/tuples/lists (Cedar sets) and
    mappings (Cedar records). `parents` are `(type, id)` pairs.
    """

    type: str
    id: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    parents: tuple[tuple[str, str], ...] = ()


def _cedar_value(value: Any) -> Any:
    """Convert a Python value to Cedar's JSON entity/context form."""
    if isinstance(value, EntityRef):
        return {"__entity": {"type": value.type, "id": value.id}}
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _cedar_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_cedar_value(v) for v in value]
    # Cedar has no floats or nulls; refusing here gives a clearer error than Cedar's.
    raise TypeError(f"cannot pass {type(value).__name__} value {value!r} to Cedar")


def _entity_json(entity: Resource) -> dict[str, Any]:
    return {
        "uid": {"type": entity.type, "id": entity.id},
        "attrs": {k: _cedar_value(v) for k, v in entity.attrs.items()},
        "parents": [{"type": t, "id": i} for t, i in entity.parents],
    }


def _principal_json(principal: PrincipalLike) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "idp": principal.idp,
        "issuer": principal.issuer,
        "affiliation": list(principal.affiliation),
        "mfa": bool(principal.mfa),
    }
    # Optional in the schema: absent rather than empty, so policies can test `has`.
    if principal.email is not None:
        attrs["email"] = principal.email
    if principal.acr is not None:
        attrs["acr"] = principal.acr
    return {
        "uid": {"type": "User", "id": principal.id},
        "attrs": attrs,
        "parents": [{"type": "Group", "id": g} for g in principal.groups],
    }


def _parse_limit(source: str, policy_id: str, name: str, raw: Any) -> int | float:
    kind = LIMIT_ANNOTATIONS[name]
    where = f"{source}: policy {policy_id!r}: @{name}({json.dumps(raw)})"
    if not isinstance(raw, str):
        raise PolicyError(f"{where}: a limit annotation needs a value")
    try:
        value: int | float = kind(raw.strip())
    except ValueError:
        raise PolicyError(f"{where}: not a {kind.__name__}") from None
    if not math.isfinite(value) or value < 0:
        raise PolicyError(f"{where}: must be a finite, non-negative number")
    return value


def _limits_of(source: str, policy_id: str, policy: Mapping[str, Any]) -> Limits:
    annotations: Mapping[str, Any] = policy.get("annotations") or {}
    present = {n: annotations[n] for n in LIMIT_ANNOTATIONS if n in annotations}
    if present and policy.get("effect") != "permit":
        raise PolicyError(
            f"{source}: policy {policy_id!r}: limit annotations "
            f"({', '.join('@' + n for n in present)}) only make sense on a permit"
        )
    values: dict[str, Any] = {
        n: _parse_limit(source, policy_id, n, raw) for n, raw in present.items()
    }
    return Limits(**values)


def _combine_limits(limits: Iterable[Limits]) -> Limits:
    """Largest value per field; None (unbounded) as soon as one permit leaves it unset."""
    items = list(limits)
    if not items:
        return Limits()
    combined: dict[str, Any] = {}
    for name in LIMIT_ANNOTATIONS:
        values = [getattr(lim, name) for lim in items]
        combined[name] = None if any(v is None for v in values) else max(values)
    return Limits(**combined)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read: {exc}") from exc


def _load_schema(directory: Path) -> cedarpy.Schema:
    candidates = sorted(directory.glob("*.cedarschema"))
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise PolicyError(f"{directory}: expected at most one *.cedarschema, found {names}")
    path = candidates[0] if candidates else PACKAGE_DIR / "broker.cedarschema"
    try:
        return cedarpy.Schema.from_str(_read(path))
    except ValueError as exc:
        raise PolicyError(f"{path}: invalid Cedar schema: {exc}") from exc


def _load_file(
    path: Path, schema: cedarpy.Schema
) -> tuple[dict[str, dict[str, Any]], dict[str, Limits]]:
    """Parse and validate one policy file; return its policies (JSON form) keyed by `@id`."""
    text = _read(path)
    try:
        parsed = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        raise PolicyError(f"{path}: Cedar parse error: {exc}") from exc
    if parsed.get("templates"):
        raise PolicyError(f"{path}: policy templates (?principal/?resource) are not supported")

    policies: dict[str, dict[str, Any]] = {}
    limits: dict[str, Limits] = {}
    at_ids: dict[str, str] = {}  # Cedar's positional id ("policy3") -> @id
    for position, policy in parsed.get("staticPolicies", {}).items():
        at_id = (policy.get("annotations") or {}).get("id")
        if not isinstance(at_id, str) or not at_id.strip():
            effect = policy.get("effect", "policy")
            number = position.removeprefix("policy")
            raise PolicyError(
                f"{path}: {effect} #{int(number) + 1 if number.isdigit() else position} "
                'has no @id("…") annotation; every policy needs a unique @id'
            )
        if at_id in policies:
            raise PolicyError(f"{path}: duplicate @id({json.dumps(at_id)})")
        at_ids[position] = at_id
        policies[at_id] = policy
        limits[at_id] = _limits_of(path.name, at_id, policy)

    result = cedarpy.validate_policies(text, schema)
    if not result.validation_passed:
        problems = []
        for error in result.errors:
            message = error.error
            at_id = at_ids.get(error.policy_id)
            if at_id is not None:
                message = message.replace(f"`{error.policy_id}`", f"`{at_id}`")
            problems.append(message)
        raise PolicyError(f"{path}: fails validation against the schema: " + "; ".join(problems))
    return policies, limits


_MEMO_SIZE = 4096


def _request_key(
    principal: PrincipalLike | None,
    action: str,
    resource: Resource,
    context: Mapping[str, Any] | None,
    client: str | None,
) -> str:
    """Everything a decision depends on, as one canonical string."""
    who = (
        None
        if principal is None
        else [principal.id, principal.idp, principal.issuer, sorted(principal.groups),
              sorted(principal.affiliation), principal.email, principal.acr, principal.mfa]
    )  # fmt: skip
    what = [resource.type, resource.id, resource.attrs, resource.parents]
    return json.dumps(
        [who, action, what, context or {}, client], sort_keys=True, default=_entity_ref_json
    )


def _entity_ref_json(value: object) -> object:
    if isinstance(value, EntityRef):
        return {"__entity": [value.type, value.id]}
    raise TypeError(f"{type(value).__name__} is not JSON")


class PolicyEngine:
    """Evaluates requests against a parsed, schema-validated Cedar policy set.

    Build it with `PolicyEngine.load`. Instances are immutable and safe to share between
    tasks and threads.
    """

    def __init__(
        self,
        policies: cedarpy.PolicySet,
        schema: cedarpy.Schema,
        limits: Mapping[str, Limits],
        entities: Sequence[Resource] = (),
    ) -> None:
        """Wrap already-parsed handles; `limits` maps every policy `@id` to its Limits.

        `entities` are static (configured backends, idps, groups, clients), parsed and
        validated once. Raises PolicyError if they do not fit the schema.
        """
        self._policies = policies
        self._schema = schema
        self._limits = dict(limits)
        self._static_uids = frozenset((e.type, e.id) for e in entities)
        self._memo: dict[str, Decision] = {}
        try:
            doc = json.dumps([_entity_json(e) for e in entities])
            self._entities = cedarpy.Entities.from_json_str(doc, schema)
        except (TypeError, ValueError) as exc:
            raise PolicyError(f"static entities do not fit the schema: {exc}") from exc

    @classmethod
    def load(
        cls, directory: Path | None = None, *, entities: Sequence[Resource] = ()
    ) -> PolicyEngine:
        """Load every `*.cedar` in `directory` (default: the packaged policies).

        The schema is the directory's `*.cedarschema`, else the packaged one. Raises
        PolicyError naming the file on a parse or validation error, a policy without `@id`,
        a duplicate `@id`, or a bad limit annotation.
        """
        directory = PACKAGE_DIR if directory is None else Path(directory)
        if not directory.is_dir():
            raise PolicyError(f"{directory}: not a directory")
        schema = _load_schema(directory)
        files = sorted(directory.glob("*.cedar"))
        if not files:
            raise PolicyError(f"{directory}: no *.cedar policy files")

        policies: dict[str, dict[str, Any]] = {}
        limits: dict[str, Limits] = {}
        origin: dict[str, str] = {}
        for path in files:
            file_policies, file_limits = _load_file(path, schema)
            for at_id in file_policies:
                if at_id in origin:
                    raise PolicyError(
                        f"{path}: duplicate @id({json.dumps(at_id)}), also in {origin[at_id]}"
                    )
                origin[at_id] = path.name
            policies.update(file_policies)
            limits.update(file_limits)

        # Keying the set by @id makes Cedar report @ids in its diagnostics.
        document = {"staticPolicies": policies, "templates": {}, "templateLinks": []}
        try:
            policy_set = cedarpy.PolicySet.from_json_str(json.dumps(document))
        except ValueError as exc:
            raise PolicyError(f"{directory}: cannot build the policy set: {exc}") from exc
        return cls(policy_set, schema, limits, entities)

    @property
    def policy_ids(self) -> tuple[str, ...]:
        """The `@id` of every loaded policy."""
        return tuple(self._limits)

    def decide(
        self,
        principal: PrincipalLike | None,
        action: str,
        resource: Resource,
        context: Mapping[str, Any] | None = None,
        *,
        client: str | None = None,
    ) -> Decision:
        """Decide whether `principal` may do `action` on `resource`. Never raises.

        With no principal, `client` names the acting OAuth client (client_credentials) and
        the request principal is `Client::"<client>"`; with neither, the request is denied.
        When a principal is given, `client` is not used. The resource (and a Client
        principal) is added as a per-request entity unless a static entity has its uid.
        Allowed: `reasons` are the matching permits and `limits` their combination. Denied:
        `reasons` are the matching forbids (empty if no permit matched). Errors deny.
        """
        try:
            key = _request_key(principal, action, resource, context, client)
        except (TypeError, ValueError):
            key = None  # not JSON-able: evaluate without the memo (and most likely deny)
        if key is not None and (memo := self._memo.get(key)) is not None:
            return memo
        try:
            decision = self._decide(principal, action, resource, context, client)
        except Exception as exc:  # fail closed on anything the engine or cedarpy raises
            return Decision(allowed=False, errors=(f"{type(exc).__name__}: {exc}",))
        if key is not None:
            # The policy set and static entities never change for this engine, so a decision
            # is a pure function of the request: remember recent ones (hot paths repeat).
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = decision
        return decision

    def _decide(
        self,
        principal: PrincipalLike | None,
        action: str,
        resource: Resource,
        context: Mapping[str, Any] | None,
        client: str | None,
    ) -> Decision:
        delta: dict[tuple[str, str], dict[str, Any]] = {}
        if principal is not None:
            uid = ("User", principal.id)
            delta[uid] = _principal_json(principal)
        elif client is not None:
            uid = ("Client", client)
            if uid not in self._static_uids:
                # An unconfigured client is treated as third-party.
                delta[uid] = _entity_json(Resource("Client", client, {"first_party": False}))
        else:
            return Decision(allowed=False, errors=("no principal and no client",))
        resource_uid = (resource.type, resource.id)
        if resource_uid not in self._static_uids:
            entity = _entity_json(resource)
            if resource_uid in delta:
                # A client exchanging to itself: the resource's attributes refine the stand-in.
                entity["attrs"] = {**delta[resource_uid]["attrs"], **entity["attrs"]}
            delta[resource_uid] = entity

        delta_json = json.dumps(list(delta.values()))
        try:
            entities = self._entities.with_added_json_str(delta_json, self._schema)
        except ValueError as exc:
            # cedarpy's message does not say which entity; name the ones we added.
            names = ", ".join(f'{t}::"{i}"' for t, i in delta)
            raise ValueError(f"entities {names} do not fit the schema: {exc}") from exc
        request = {
            "principal": {"type": uid[0], "id": uid[1]},
            "action": {"type": "Action", "id": action},
            "resource": {"type": resource.type, "id": resource.id},
            "context": _cedar_value(context or {}),
        }
        result = cedarpy.is_authorized(request, self._policies, entities, self._schema)
        diagnostics = result.diagnostics
        annotated = diagnostics.id_annotations_by_reason
        reasons = tuple(sorted(annotated.get(r, r) for r in diagnostics.reasons))
        errors = tuple(str(e) for e in diagnostics.errors)
        if errors or result.decision == cedarpy.Decision.NoDecision:
            return Decision(
                allowed=False,
                reasons=() if result.allowed else reasons,
                errors=errors or ("Cedar returned no decision",),
            )
        if not result.allowed:
            return Decision(allowed=False, reasons=reasons)
        limits = _combine_limits(self._limits.get(r, Limits()) for r in reasons)
        return Decision(allowed=True, reasons=reasons, limits=limits)


def _fmt(value: float | int) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def describe(decision: Decision) -> str:
    """A few human-readable lines for `broker policy check`: verdict, reasons, limits, errors."""
    lines = ["ALLOW" if decision.allowed else "DENY"]
    if decision.reasons:
        kind = "permitted by" if decision.allowed else "forbidden by"
        lines.append(f"  {kind}: {', '.join(decision.reasons)}")
    elif not decision.allowed and not decision.errors:
        lines.append("  no permit matched (default deny)")
    if decision.allowed:
        lim = decision.limits
        parts = [
            f"max_ttl={'unbounded' if lim.max_ttl is None else f'{lim.max_ttl}s'}",
            f"cpu={'unbounded' if lim.cpu is None else _fmt(lim.cpu)}",
            f"memory={'unbounded' if lim.memory is None else _fmt(lim.memory) + 'GiB'}",
            f"disk={'unbounded' if lim.disk is None else _fmt(lim.disk) + 'GiB'}",
            f"gpu={'unbounded' if lim.gpu is None else lim.gpu}",
        ]
        lines.append("  limits: " + " ".join(parts))
    lines.extend(f"  error: {e}" for e in decision.errors)
    return "\n".join(lines)
