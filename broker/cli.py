"""The `broker` command: run the broker and operate it.

Exit codes: 0 success, 1 a check failed (invalid settings, denied decision, broken audit
chain), 2 usage errors (argparse), 3 a peer could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from broker.errors import BrokerError
from broker.settings import Settings, SettingsError, load_settings


def _load(path: Path, mode: str = "admin") -> Settings:
    try:
        return load_settings(path, mode=mode)
    except SettingsError as error:
        print(f"{error.source}: the settings are not valid:", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    mode = "dev" if args.dev else "production"
    try:
        settings = load_settings(Path(args.file), mode=mode)
    except SettingsError as error:
        print(f"{error.source}: {len(error.problems)} problem(s):")
        for problem in error.problems:
            print(f"  - {problem}")
        return 1
    from broker.services import load_policies

    try:
        engine = load_policies(settings)
    except BrokerError as error:
        print(f"{args.file}: policy.directory: {error.description}")
        return 1
    print(
        f"{args.file}: OK ({len(settings.upstreams)} upstream(s), {len(settings.backends)} "
        f"backend(s), {len(engine.policy_ids)} policies)"
    )
    return 0


def _new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """The server's event loop: uvloop (libuv, less CPU per request) when `choice` is
    "uvloop" and it is installed, else asyncio's own."""
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:  # not built for this platform: asyncio's loop works the same
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from broker.app import create_app
    from broker.logs import configure_logging

    settings = _load(Path(args.config), mode="production")
    configure_logging(settings.logging.level)
    app = create_app(settings)
    host = args.host or settings.server.bind_host
    port = args.port if args.port is not None else settings.server.bind_port
    web.run_app(
        app, host=host, port=port, access_log=None, print=None, reuse_port=args.reuse_port,
        loop=_new_event_loop(args.loop),
    )  # fmt: skip
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from broker.dev import run_dev

    extra = Path(args.upstreams) if args.upstreams else None
    try:
        with asyncio.Runner(loop_factory=lambda: _new_event_loop(args.loop)) as runner:
            return runner.run(
                run_dev(Path(args.state_dir), args.port, host=args.host, upstreams=extra)
            )
    except SettingsError as error:
        print(f"{error.source}: the settings are not valid:", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1


def cmd_credentials_aws(args: argparse.Namespace) -> int:
    from broker.cli_credentials import run_aws

    return run_aws(args.issuer, args.backend, args.role, args.duration)


def cmd_credentials_openstack(args: argparse.Namespace) -> int:
    from broker.cli_credentials import run_openstack

    return run_openstack(
        args.issuer, args.backend, args.project, args.duration, args.cloud, Path(args.clouds_file)
    )


def cmd_doctor_aws(args: argparse.Namespace) -> int:
    from broker.doctor import doctor_aws
    from broker.services import start_services

    settings = _load(Path(args.config))

    async def run() -> int:
        if args.offline:
            return await doctor_aws(settings, args.backend)
        svc = await start_services(settings, dev_mode=False, with_upstreams=False)
        try:
            return await doctor_aws(settings, args.backend, signer=svc.signer, http=svc.http)
        finally:
            await svc.close()

    return asyncio.run(run())


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from broker.storage import Database

    settings = _load(Path(args.config))

    async def run() -> None:
        db = Database(settings.database.url)
        try:
            await db.upgrade()
        finally:
            await db.close()

    asyncio.run(run())
    print("database schema is up to date")
    return 0


async def _with_services(settings: Settings, action: str) -> int:
    from broker.services import start_services

    svc = await start_services(settings, dev_mode=False)
    try:
        if action == "rotate":
            key = await svc.keyring.rotate(reason="manual")
            print(f"new key {key.kid} ({key.alg}) published; it signs from {key.activate_at}")
        ks = svc.keyring.keyset
        now = svc.keyring.now()
        signer = ks.signer(now)
        for key in ks.published(now):
            state = (
                "signing" if key is signer else ("pending" if key.activate_at > now else "retired")
            )
            remove = f", removed after {key.remove_after}" if key.remove_after else ""
            print(f"{key.kid}  {key.alg}  {state}  created {key.created_at}{remove}")
    finally:
        await svc.close()
    return 0


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def cmd_keys(args: argparse.Namespace) -> int:
    settings = _load(Path(args.config))
    return asyncio.run(_with_services(settings, args.keys_command))


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from broker.audit import AuditLog
    from broker.storage import Database

    settings = _load(Path(args.config))

    async def run() -> int:
        db = Database(settings.database.url)
        try:
            report = await AuditLog(settings.audit.path, db, chain=settings.audit.chain).verify()
        finally:
            await db.close()
        if report.ok:
            print(f"audit log intact: {report.records} records")
            return 0
        print(f"audit log BROKEN at record {report.first_bad_seq}: {report.problem}")
        return 1

    return asyncio.run(run())


@dataclass(frozen=True)
class _CliPrincipal:
    id: str
    idp: str
    issuer: str
    groups: tuple[str, ...]
    affiliation: tuple[str, ...] = ()
    email: str | None = None
    acr: str | None = None
    mfa: bool = False


def cmd_policy_check(args: argparse.Namespace) -> int:
    from broker.services import load_policies
    from policies.engine import PolicyEngine, PolicyError, Resource, describe

    try:
        if args.config:
            engine = load_policies(_load(Path(args.config)))
        else:
            engine = PolicyEngine.load(Path(args.policies) if args.policies else None)
    except (PolicyError, BrokerError) as error:
        print(f"policies cannot be loaded: {error}", file=sys.stderr)
        return 1
    type_, sep, ident = args.resource.partition("::")
    if not sep or not type_ or not ident:
        print('--resource must look like Backend::"aws" or Backend::aws', file=sys.stderr)
        return 2
    try:
        context = json.loads(args.context) if args.context else {}
        attrs = json.loads(args.resource_attrs) if args.resource_attrs else {}
    except json.JSONDecodeError as error:
        print(f"--context or --resource-attrs is not JSON: {error}", file=sys.stderr)
        return 2
    principal = (
        _CliPrincipal(
            id=args.user,
            idp=args.idp,
            issuer=args.issuer,
            groups=tuple(args.group),
            affiliation=tuple(args.affiliation),
            mfa=args.mfa,
            email=args.email,
        )
        if args.user
        else None
    )
    decision = engine.decide(
        principal,
        args.action,
        Resource(type_, ident.strip('"'), attrs=attrs),
        context,
        client=args.client,
    )
    print(describe(decision))
    return 0 if decision.allowed else 1


def _read_secret() -> str | None:
    """The secret from stdin, or typed twice at a terminal (never from argv: shell history)."""
    import getpass

    if sys.stdin.isatty():
        first = getpass.getpass("client secret: ")
        if getpass.getpass("again: ") != first:
            print("the two secrets differ", file=sys.stderr)
            return None
        return first
    # Only the line ending is dropped: other whitespace may be part of the secret.
    return sys.stdin.read().removesuffix("\n").removesuffix("\r")


def cmd_clients_hash_secret(args: argparse.Namespace) -> int:
    from broker.oauth.clients import hash_secret

    secret = _read_secret()
    if not secret:
        if secret is not None:
            print("no secret given on stdin", file=sys.stderr)
        return 2
    print(hash_secret(secret))
    return 0


def cmd_clients_new_secret(args: argparse.Namespace) -> int:
    import secrets

    from broker.oauth.clients import hash_secret

    secret = secrets.token_urlsafe(32)
    print(f'client_secret = "{secret}"  # give this to the client; it is not shown again')
    print(f'secret_hash = "{hash_secret(secret)}"  # for the client\'s entry in the settings')
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from broker.cli_client import run_login

    return run_login(args.issuer, args.client_id, args.scope)


def cmd_token(args: argparse.Namespace) -> int:
    from broker.cli_client import run_token

    return run_token(args.issuer)


def cmd_git_credential(args: argparse.Namespace) -> int:
    from broker.cli_git import run_git_credential

    return run_git_credential(args.operation)


def _loop_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop",
        help="event loop (default uvloop when installed, else asyncio)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker",
        description="binder-broker: federated credential broker for notebook launchers",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the broker with a settings file (production)")
    p.add_argument("--config", required=True, help="settings TOML file")
    p.add_argument("--host", help="bind address (overrides server.bind_host)")
    p.add_argument("--port", type=int, help="bind port (overrides server.bind_port)")
    p.add_argument(
        "--reuse-port",
        action="store_true",
        help="let several worker processes share the port (SO_REUSEPORT)",
    )
    _loop_option(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "dev", help="run a local broker with its own OpenBao, SQLite and dev sign-in"
    )
    p.add_argument("--state-dir", default=".broker-dev", help="where dev state lives")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument(
        "--upstreams",
        metavar="FILE",
        help="a TOML file of [[upstreams]] (OIDC providers, SAML IdPs or federations) to offer "
        "beside the dev sign-in (a SAML entry may leave out sp_key/sp_cert to use a generated "
        "pair), [[backends]] (repository hosts, clouds) to try, [policy] and [grants]",
    )
    _loop_option(p)
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("check-config", help="validate a settings file and print every problem")
    p.add_argument("file")
    p.add_argument("--dev", action="store_true", help="validate as `broker dev` would")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("db", help="database schema")
    dsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    q = dsub.add_parser("upgrade", help="apply migrations")
    q.add_argument("--config", required=True)
    q.set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser("keys", help="signing keys")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    for name, text in (("list", "show the published keys"), ("rotate", "publish a new key now")):
        q = ksub.add_parser(name, help=text)
        q.add_argument("--config", required=True)
        q.set_defaults(func=cmd_keys)

    p = sub.add_parser("audit", help="audit log")
    asub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    q = asub.add_parser("verify", help="check the hash chain; report the first bad record")
    q.add_argument("--config", required=True)
    q.set_defaults(func=cmd_audit_verify)

    p = sub.add_parser("policy", help="Cedar policies")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    q = psub.add_parser("check", help="evaluate one request and print the decision")
    src = q.add_mutually_exclusive_group()
    src.add_argument("--config", help="use the policies named in this settings file")
    src.add_argument("--policies", help="a folder of *.cedar files (default: the packaged ones)")
    q.add_argument("--user", help="principal id (omit for a client-only request)")
    q.add_argument("--idp", default="dev")
    q.add_argument("--issuer", default="urn:binder-broker:dev", help="upstream issuer / entity id")
    q.add_argument("--group", action="append", default=[], help="repeatable")
    q.add_argument("--affiliation", action="append", default=[], help="repeatable")
    q.add_argument("--email")
    q.add_argument("--mfa", action="store_true")
    q.add_argument("--client", help="client id, for client-only requests")
    q.add_argument("--action", required=True)
    q.add_argument("--resource", required=True, help='e.g. Backend::"aws"')
    q.add_argument("--resource-attrs", help="JSON object, e.g. '{\"first_party\": true}'")
    q.add_argument("--context", help="JSON object, e.g. '{\"cpu\": 1, ...}'")
    q.set_defaults(func=cmd_policy_check)

    p = sub.add_parser("clients", help="OAuth client secrets")
    csub = p.add_subparsers(dest="clients_command", required=True, metavar="ACTION")
    q = csub.add_parser(
        "hash-secret", help="read a client secret from stdin (or a prompt), print its hash"
    )
    q.set_defaults(func=cmd_clients_hash_secret)
    q = csub.add_parser("new-secret", help="generate a client secret; print it once and its hash")
    q.set_defaults(func=cmd_clients_new_secret)

    p = sub.add_parser("login", help="sign in to a broker from this terminal (device flow)")
    p.add_argument(
        "--issuer", required=True, help="the broker's URL, e.g. https://broker.example.edu"
    )
    p.add_argument("--client-id", default="broker-cli")
    p.add_argument(
        "--scope",
        help="space-separated scopes (default: everything the client may ask for, including "
        "launch:<backend> for `broker credentials`)",
    )
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("token", help="print a fresh access token (refreshing it if needed)")
    p.add_argument("--issuer", help="default: the broker last logged in to")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser(
        "git-credential",
        help="git credential helper: broker tokens for the broker's git gateway "
        "(git config credential.helper '!broker git-credential')",
    )
    p.add_argument("operation", help="get, store or erase (git calls it; others are ignored)")
    p.set_defaults(func=cmd_git_credential)

    p = sub.add_parser("doctor", help="check a deployment against a cloud's requirements")
    checks = p.add_subparsers(dest="doctor_command", required=True, metavar="TARGET")
    q = checks.add_parser("aws", help="can AWS STS trust this broker? one OK/FIX line per check")
    q.add_argument("--config", required=True)
    q.add_argument("--backend", help="one aws backend id (default: all)")
    q.add_argument("--offline", action="store_true", help="no Vault: sign no probe token")
    q.set_defaults(func=cmd_doctor_aws)

    p = sub.add_parser("credentials", help="launch credentials for the AWS CLI or OpenStack")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{aws,openstack}")
    q = kinds.add_parser(
        "aws",
        help="print credential_process JSON; in ~/.aws/config: "
        "credential_process = broker credentials aws --backend aws",
    )
    q.add_argument("--backend", default="aws")
    q.add_argument("--role", help="the role name (default: the backend's)")
    q.add_argument("--duration", type=int, default=3600, help="seconds (policy may clip)")
    q.add_argument("--issuer", help="default: the broker last logged in to")
    q.set_defaults(func=cmd_credentials_aws)
    q = kinds.add_parser("openstack", help="write an entry to clouds.yaml")
    q.add_argument("--backend", default="openstack")
    q.add_argument("--project", help="the project (default: the backend's)")
    q.add_argument("--duration", type=int, default=86400, help="seconds (policy may clip)")
    q.add_argument("--cloud", default="binder-broker", help="the entry's name in clouds.yaml")
    q.add_argument(
        "--clouds-file",
        default=str(Path.home() / ".config" / "openstack" / "clouds.yaml"),
        help="default: ~/.config/openstack/clouds.yaml",
    )
    q.add_argument("--issuer", help="default: the broker last logged in to")
    q.set_defaults(func=cmd_credentials_openstack)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except BrokerError as error:
        print(f"error: {error.description}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
