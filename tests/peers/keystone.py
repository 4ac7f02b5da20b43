"""A real OpenStack Keystone (PyPI `keystone`) as a test peer, fronted like Jetstream2's.

- `keystone` (session): Keystone 30 in its own virtual environment (created once, cached
  under `<repo>/.test-peers/keystone-venv`), SQLite, fernet tokens, served by gunicorn on a
  free loopback port, stopped by PID at teardown. Provisioned with the broker's service user
  (role `credential_broker` on project `service`), the test users and projects, and the
  federation objects the broker signs users in with.

Keystone refuses to create an application credential for anyone but the token's own user
(a hard-coded check in `keystone/api/users.py`, whatever the policy says, and delegated trust
or EC2 tokens are refused too), so the broker obtains a token *as the user* through Keystone
federation, exactly as Jetstream2's Globus sign-in does: the broker is an OpenID provider,
Keystone's web front validates the broker-signed JWT (mod_auth_openidc in OAuth 2.0
resource-server mode in production) and hands its claims to Keystone's `openid` method as
`HTTP_OIDC_*` variables; a mapping turns `sub` into an existing local user. The front here,
`_FRONT` below, is a few lines of WSGI doing what mod_auth_openidc does for that one path:
strip client-supplied `OIDC-*` headers, verify the Bearer JWT's signature (keys from a JWKS
file the tests write: `Keystone.trust_jwks`), `iss`, `aud`, `exp`, and pass the claims on.
Everything behind it is unmodified Keystone. The policy overrides in `_POLICY` are what an
operator grants the broker's service role (read, list and delete application credentials).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("BROKER_TEST_KEYSTONE_VENV", REPO / ".test-peers" / "keystone-venv"))
# Versions that install and run together on Python 3.11 (2026-11); keystoneauth1 is only for the
# tests' independent check that a credential authenticates.
PACKAGES = ("keystone==30.0.0", "gunicorn==27.0.1", "keystoneauth1==5.18.1")

ISSUER = "http://127.0.0.1:8080"  # the broker's public_url in tests/peers/broker.make_settings
IDP = "binder-broker"
PROTOCOL = "openid"
SERVICE_ROLE = "credential_broker"
STUDENT = "student@campus.example.edu"
READER = "reader@campus.example.edu"  # only `reader` on course-ds100
STRANGER = "stranger@campus.example.edu"  # no role on course-ds100
COURSE = "course-ds100"
OTHER_COURSE = "course-cs61"  # the student has no role here

_READY_TIMEOUT = 60.0

_FRONT = r'''
"""Stand-in for mod_auth_openidc (OAuth 2.0 resource server) in front of Keystone."""
import json, os, re, sys, time
sys.argv = sys.argv[:1]  # oslo.config would parse gunicorn's arguments
import jwt
from keystone.wsgi.api import application as keystone

_AUTH = re.compile(r"^/v3/OS-FEDERATION/identity_providers/[^/]+/protocols/openid/auth$")
_CLAIMS = ("iss", "sub", "email", "name")

def _claims(header):
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        with open(os.environ["KS_FRONT_JWKS"]) as f:
            keys = jwt.PyJWKSet.from_dict(json.load(f))
        kid = jwt.get_unverified_header(token).get("kid")
        key = next(k for k in keys.keys if k.key_id == kid)
        claims = jwt.decode(token, key.key, algorithms=["ES256", "RS256", "EdDSA"],
                            audience=os.environ["KS_FRONT_AUDIENCE"],
                            options={"require": ["exp", "iss", "sub", "aud"]})
    except Exception as exc:  # any failure is a 401, as mod_auth_openidc answers
        print("front: rejected bearer token:", type(exc).__name__, file=sys.stderr)
        return None
    if claims["iss"] not in os.environ["KS_FRONT_ISSUERS"].split():
        return None
    return claims

def application(environ, start_response):
    for name in [k for k in environ if k.startswith("HTTP_OIDC_")]:
        del environ[name]
    environ.pop("REMOTE_USER", None)
    if _AUTH.match(environ.get("PATH_INFO", "")):
        claims = _claims(environ.pop("HTTP_AUTHORIZATION", ""))
        if claims is None:
            start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                                ("WWW-Authenticate", "Bearer")])
            return [b'{"error": {"code": 401, "message": "invalid bearer token"}}']
        for name in _CLAIMS:
            if name in claims:
                environ["HTTP_OIDC_" + name.upper()] = str(claims[name])
        environ["REMOTE_USER"] = str(claims["sub"])
    return keystone(environ, start_response)
'''

# What an operator grants the broker's service role, on top of Keystone's defaults.
_DEFAULT_READ = "rule:admin_required or (role:reader and system_scope:all) or rule:owner"
_POLICY = {
    "identity:get_application_credential": f"{_DEFAULT_READ} or role:{SERVICE_ROLE}",
    "identity:list_application_credentials": f"{_DEFAULT_READ} or role:{SERVICE_ROLE}",
    "identity:delete_application_credential": f"rule:admin_or_owner or role:{SERVICE_ROLE}",
}


def ensure_venv(venv: Path = VENV) -> float:
    """Create the Keystone venv once; return the seconds it took (0.0 when cached)."""
    marker = venv / ".binder-broker-packages"
    wanted = "\n".join(PACKAGES)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / ".keystone-venv.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one creator when several pytest runs start at once
        if marker.exists() and marker.read_text() == wanted:
            return 0.0
        started = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *PACKAGES],
            check=True,
            stderr=subprocess.DEVNULL,  # pip's warnings about this machine's local indexes
        )
        marker.write_text(wanted)
        return time.monotonic() - started


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Keystone:
    """A running Keystone; ids of what was provisioned; admin helpers for checking."""

    auth_url: str  # .../v3
    state_dir: Path
    process: subprocess.Popen[bytes]
    admin_password: str
    service_user: str = "binder-broker"
    service_password: str = ""
    service_project: str = "service"
    audience: str = ""
    jwks_path: Path = field(default_factory=Path)
    ids: dict[str, str] = field(default_factory=dict)
    venv_seconds: float = 0.0
    _jwks: dict[str, dict[str, Any]] = field(default_factory=dict)
    _admin_token: str | None = None

    @property
    def python(self) -> str:
        return str(VENV / "bin" / "python")

    @property
    def log_path(self) -> Path:
        return self.state_dir / "keystone.log"

    def trust_jwks(self, jwks: Mapping[str, Any]) -> None:
        """Let the front accept JWTs signed by these keys (added to any trusted before)."""
        for key in jwks["keys"]:
            self._jwks[str(key["kid"])] = dict(key)
        tmp = self.jwks_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"keys": list(self._jwks.values())}))
        tmp.replace(self.jwks_path)

    # -- admin side, for provisioning and for checking what the broker did --------------
    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        url = self.auth_url.removesuffix("/v3") + path
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("X-Auth-Token", token)
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else {}), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw) if raw else {}
            except ValueError:
                payload = {"raw": raw.decode(errors="replace")}
            return exc.code, payload, dict(exc.headers)

    def password_token(self, user: str, password: str, project: str) -> str:
        status, body, headers = self.request(
            "POST",
            "/v3/auth/tokens",
            {
                "auth": {
                    "identity": {
                        "methods": ["password"],
                        "password": {
                            "user": {
                                "name": user,
                                "domain": {"id": "default"},
                                "password": password,
                            }
                        },
                    },
                    "scope": {"project": {"name": project, "domain": {"id": "default"}}},
                }
            },
        )
        assert status == 201, body
        return headers["X-Subject-Token"]

    def admin_token(self) -> str:
        """A project-scoped admin token, reused (each password check costs Keystone bcrypt)."""
        if self._admin_token is None:
            self._admin_token = self.password_token("admin", self.admin_password, "admin")
        return self._admin_token

    def admin(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """An admin call that must succeed; returns the JSON body."""
        status, payload, _ = self.request(method, path, body, token=self.admin_token())
        assert status < 300, (method, path, status, payload)
        return payload

    def app_credential(self, user_id: str, cred_id: str) -> tuple[int, dict[str, Any]]:
        """GET an application credential as admin: (status, body)."""
        status, payload, _ = self.request(
            "GET",
            f"/v3/users/{user_id}/application_credentials/{cred_id}",
            token=self.admin_token(),
        )
        return status, payload

    def authenticate(self, cred_id: str, secret: str) -> tuple[bool, str]:
        """Authenticate with an application credential through keystoneauth1 (run in the
        Keystone venv): (succeeded, the token's project id or the error class name)."""
        script = textwrap.dedent(
            """
            import json, sys
            from keystoneauth1 import exceptions, session
            from keystoneauth1.identity.v3 import ApplicationCredential
            args = json.load(sys.stdin)
            auth = ApplicationCredential(auth_url=args["auth_url"],
                application_credential_id=args["id"],
                application_credential_secret=args["secret"])
            try:
                session.Session(auth=auth).get_token()
                print("ok", auth.get_project_id(session.Session(auth=auth)))
            except exceptions.ClientException as exc:
                print("fail", type(exc).__name__)
            """
        )
        done = subprocess.run(
            [self.python, "-c", script],
            input=json.dumps({"auth_url": self.auth_url, "id": cred_id, "secret": secret}),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        verdict, _, detail = done.stdout.strip().partition(" ")
        return verdict == "ok", detail

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # gunicorn master and its workers
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _manage(venv: Path, conf: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(venv / "bin" / "keystone-manage"), "--config-file", str(conf), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_all(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"keystone-manage failed:\n{out.decode(errors='replace')[-3000:]}")


def start_keystone(state_dir: Path) -> Keystone:
    """Configure, bootstrap and serve a Keystone under `state_dir`; return once /v3 answers."""
    venv_seconds = ensure_venv()
    conf = state_dir / "keystone.conf"
    for name in ("fernet-keys", "fernet-receipts", "credential-keys"):
        (state_dir / name).mkdir(mode=0o700)
    port = _free_port()
    auth_url = f"http://127.0.0.1:{port}/v3"
    (state_dir / "policy.yaml").write_text(json.dumps(_POLICY))  # JSON is YAML
    conf.write_text(
        textwrap.dedent(
            f"""
            [DEFAULT]
            debug = false
            log_file = {state_dir / "keystone.log"}
            [database]
            connection = sqlite:///{state_dir / "keystone.db"}
            [token]
            provider = fernet
            expiration = 3600
            [fernet_tokens]
            key_repository = {state_dir / "fernet-keys"}
            [fernet_receipts]
            key_repository = {state_dir / "fernet-receipts"}
            [credential]
            key_repository = {state_dir / "credential-keys"}
            [auth]
            methods = password,token,application_credential,openid
            [federation]
            remote_id_attribute = HTTP_OIDC_ISS
            assertion_prefix = HTTP_OIDC_
            [oslo_policy]
            policy_file = {state_dir / "policy.yaml"}
            """
        )
    )
    owner = ("--keystone-user", str(os.getuid()), "--keystone-group", str(os.getgid()))
    _wait_all(
        _manage(VENV, conf, "db_sync"),
        _manage(VENV, conf, "fernet_setup", *owner),
        _manage(VENV, conf, "credential_setup", *owner),
    )
    admin_password = os.urandom(12).hex()
    bootstrap = _manage(
        VENV,
        conf,
        "bootstrap",
        "--bootstrap-password",
        admin_password,
        "--bootstrap-public-url",
        auth_url,
        "--bootstrap-region-id",
        "RegionOne",
    )
    _wait_all(bootstrap)
    (state_dir / "front.py").write_text(_FRONT)
    jwks_path = state_dir / "trusted-jwks.json"
    jwks_path.write_text('{"keys": []}')
    env = {
        **os.environ,
        "OS_KEYSTONE_CONFIG_FILES": str(conf),
        "KS_FRONT_JWKS": str(jwks_path),
        "KS_FRONT_AUDIENCE": auth_url,
        "KS_FRONT_ISSUERS": ISSUER,
    }
    with (state_dir / "gunicorn.log").open("ab") as out:
        process = subprocess.Popen(
            [
                str(VENV / "bin" / "gunicorn"),
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "1",
                "--threads",
                "4",
                "--chdir",
                str(state_dir),
                "front:application",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stop() ends master and workers
        )
    ks = Keystone(
        auth_url=auth_url,
        state_dir=state_dir,
        process=process,
        admin_password=admin_password,
        audience=auth_url,
        jwks_path=jwks_path,
        venv_seconds=venv_seconds,
    )
    try:
        _wait_ready(ks)
        _provision(ks)
    except BaseException:
        ks.stop()
        raise
    return ks


def _wait_ready(ks: Keystone) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        if ks.process.poll() is not None:
            break
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(ks.auth_url, timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.2)
    log = (ks.state_dir / "gunicorn.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"Keystone did not start at {ks.auth_url}:\n{log}")


def _provision(ks: Keystone) -> None:
    def create(kind: str, body: Mapping[str, Any]) -> str:
        return str(ks.admin("POST", f"/v3/{kind}s", {kind: body})[kind]["id"])

    def grant(project: str, user: str, role: str) -> None:
        ks.admin("PUT", f"/v3/projects/{project}/users/{user}/roles/{role}")

    roles = {r["name"]: r["id"] for r in ks.admin("GET", "/v3/roles")["roles"]}
    ids = ks.ids
    ids["member"], ids["reader"] = roles["member"], roles["reader"]
    ids[SERVICE_ROLE] = create("role", {"name": SERVICE_ROLE})
    ids["service"] = create("project", {"name": "service", "domain_id": "default"})
    ids[COURSE] = create("project", {"name": COURSE, "domain_id": "default"})
    ids[OTHER_COURSE] = create("project", {"name": OTHER_COURSE, "domain_id": "default"})
    ks.service_password = os.urandom(12).hex()
    ids["binder-broker"] = create(
        "user", {"name": ks.service_user, "domain_id": "default", "password": ks.service_password}
    )
    grant(ids["service"], ids["binder-broker"], ids[SERVICE_ROLE])
    for name in (STUDENT, READER, STRANGER):
        # Federated sign-in only: these users have no password at all.
        ids[name] = create("user", {"name": name, "domain_id": "default"})
    grant(ids[COURSE], ids[STUDENT], ids["member"])
    grant(ids[COURSE], ids[STUDENT], ids["reader"])
    grant(ids[COURSE], ids[READER], ids["reader"])
    grant(ids[OTHER_COURSE], ids[READER], ids["reader"])
    ks.admin(
        "PUT",
        f"/v3/OS-FEDERATION/identity_providers/{IDP}",
        {"identity_provider": {"enabled": True, "remote_ids": [ISSUER], "domain_id": "default"}},
    )
    ks.admin(
        "PUT",
        f"/v3/OS-FEDERATION/mappings/{IDP}-users",
        {
            "mapping": {
                "rules": [
                    {
                        "local": [
                            {
                                "user": {
                                    "name": "{0}",
                                    "domain": {"id": "default"},
                                    "type": "local",
                                }
                            }
                        ],
                        "remote": [{"type": "HTTP_OIDC_SUB"}],
                    }
                ]
            }
        },
    )
    ks.admin(
        "PUT",
        f"/v3/OS-FEDERATION/identity_providers/{IDP}/protocols/{PROTOCOL}",
        {"protocol": {"mapping_id": f"{IDP}-users"}},
    )


@pytest.fixture(scope="session")
def keystone() -> Iterator[Keystone]:
    """The session's Keystone, provisioned; stopped by PID at teardown."""
    state_dir = Path(tempfile.mkdtemp(prefix="binder-broker-keystone-"))
    ks = start_keystone(state_dir)
    try:
        yield ks
    finally:
        ks.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
