"""A real SAML 2.0 IdP peer: Debian's SimpleSAMLphp 1.19 served by `php -S` on loopback.

`start_simplesamlphp(workdir, sp_entity_id=..., sp_acs_url=..., sp_cert_pem=...)` writes a
complete SimpleSAMLphp config directory under `workdir` and runs
`php -S 127.0.0.1:PORT -t /usr/share/simplesamlphp/www` with `SIMPLESAMLPHP_CONFIG_DIR` set to
it. Written there:

- `config/config.php`: `baseurlpath` the full `http://127.0.0.1:PORT/` URL, the SAML 2.0 IdP
  enabled, modules `core`, `saml`, `exampleauth` enabled, `store.type` `phpsession` with
  sessions in `sessions/`, plain-HTTP cookies (not `Secure`, SameSite `Lax`), logs in
  `log/simplesamlphp.log`;
- `config/authsources.php`: one `exampleauth:UserPass` source holding `users`, whose attribute
  names are already the SAML names (urn:oid / SAML subject-id), sent with NameFormat `uri`;
- `metadata/saml20-idp-hosted.php`: entity id `{base}saml2/idp/metadata.php`, a fresh
  self-signed RSA-2048 cert (`cert/idp.crt`, `cert/idp.key`), RSA-SHA256, transient NameIDs,
  `scope` campus.example.edu (published as `<shibmd:Scope>` in the IdP's Extensions);
- `metadata/saml20-sp-remote.php`: the one SP under test, with its HTTP-POST
  AssertionConsumerService and certificate, and the signing/encryption/validation switches.

The server runs with `PHP_CLI_SERVER_WORKERS=4`: a single `php -S` process serves one request at
a time, so a browser fetching assets in parallel would queue behind a slow page. `php -S` does
not take its workers down with it, so a small `sh` leads the server's own process group: it gets
SIGTERM when the process that started it dies (PR_SET_PDEATHSIG) and then SIGKILLs the group,
and `stop()` signals that group by the leader's id. Each PHP file holds one JSON document in a
nowdoc, so no Python value ever needs PHP escaping.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "ATTR_DISPLAY_NAME",
    "ATTR_ENTITLEMENT",
    "ATTR_EPPN",
    "ATTR_IS_MEMBER_OF",
    "ATTR_MAIL",
    "ATTR_SCOPED_AFFILIATION",
    "ATTR_SUBJECT_ID",
    "DEFAULT_USERS",
    "IDP_SCOPE",
    "NAMEFORMAT_URI",
    "SIMPLESAMLPHP_WWW",
    "SamlUser",
    "SimpleSamlIdp",
    "make_self_signed_cert",
    "start_simplesamlphp",
]

SIMPLESAMLPHP_WWW = Path("/usr/share/simplesamlphp/www")
IDP_SCOPE = "campus.example.edu"
NAMEFORMAT_URI = "urn:oasis:names:tc:SAML:2.0:attrname-format:uri"
NAMEID_TRANSIENT = "urn:oasis:names:tc:SAML:2.0:nameid-format:transient"
BINDING_HTTP_POST = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
RSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"

ATTR_SUBJECT_ID = "urn:oasis:names:tc:SAML:attribute:subject-id"
ATTR_EPPN = "urn:oid:1.3.6.1.4.1.5923.1.1.1.6"
ATTR_MAIL = "urn:oid:0.9.2342.19200300.100.1.3"
ATTR_DISPLAY_NAME = "urn:oid:2.16.840.1.113730.3.1.241"
ATTR_SCOPED_AFFILIATION = "urn:oid:1.3.6.1.4.1.5923.1.1.1.9"
ATTR_IS_MEMBER_OF = "urn:oid:1.3.6.1.4.1.5923.1.5.1.1"
ATTR_ENTITLEMENT = "urn:oid:1.3.6.1.4.1.5923.1.1.1.7"

_READY_TIMEOUT = 20.0
_STOP_GRACE = 5.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_WORKERS = 4
# `php -S` neither forwards a signal to its PHP_CLI_SERVER_WORKERS children nor makes them die
# with it, so a small shell leads the process group: the death signal of its parent (us) or
# stop()'s SIGTERM makes it SIGKILL the whole group, and if PHP exits first it ends the workers.
_SUPERVISOR = """
trap 'kill -KILL 0' TERM INT HUP
"$1" -S "$2" -t "$3" &
wait $!
rc=$?
trap '' TERM
kill -TERM 0
exit $rc
"""


@dataclass(frozen=True)
class SamlUser:
    """A user of the IdP's login form; `attributes` are keyed by their SAML (uri) names."""

    username: str
    password: str
    attributes: dict[str, list[str]] = field(default_factory=dict)


DEFAULT_USERS: tuple[SamlUser, ...] = (
    SamlUser(
        "student",
        "student-pass",
        {
            ATTR_SUBJECT_ID: ["student123@campus.example.edu"],
            ATTR_EPPN: ["student123@campus.example.edu"],
            ATTR_MAIL: ["sam.student@campus.example.edu"],
            ATTR_DISPLAY_NAME: ["Sam Student"],
            ATTR_SCOPED_AFFILIATION: ["student@campus.example.edu", "member@campus.example.edu"],
            ATTR_IS_MEMBER_OF: ["campus.example.edu:course:ds100"],
            ATTR_ENTITLEMENT: ["urn:mace:campus.example.edu:entitlement:notebooks"],
        },
    ),
    SamlUser(
        "instructor",
        "instructor-pass",
        {
            ATTR_SUBJECT_ID: ["instructor7@campus.example.edu"],
            ATTR_EPPN: ["instructor7@campus.example.edu"],
            ATTR_MAIL: ["ivy.instructor@campus.example.edu"],
            ATTR_DISPLAY_NAME: ["Ivy Instructor"],
            ATTR_SCOPED_AFFILIATION: ["faculty@campus.example.edu", "member@campus.example.edu"],
            ATTR_IS_MEMBER_OF: [
                "campus.example.edu:course:ds100",
                "campus.example.edu:course:ds100:instructors",
            ],
            ATTR_ENTITLEMENT: [
                "urn:mace:campus.example.edu:entitlement:notebooks",
                "urn:mace:campus.example.edu:entitlement:gpu",
            ],
        },
    ),
    # Signs in at campus.example.edu but asserts an affiliation in someone else's scope.
    SamlUser(
        "spoofer",
        "spoofer-pass",
        {
            ATTR_SUBJECT_ID: ["spoofer9@campus.example.edu"],
            ATTR_EPPN: ["spoofer9@campus.example.edu"],
            ATTR_MAIL: ["spoofer9@campus.example.edu"],
            ATTR_DISPLAY_NAME: ["Sly Spoofer"],
            ATTR_SCOPED_AFFILIATION: ["student@other.edu"],
        },
    ),
)


@dataclass
class SimpleSamlIdp:
    """A running SimpleSAMLphp IdP; `stop()` (or leaving the `with` block) ends it."""

    base_url: str  # ends with "/"
    entity_id: str
    metadata_url: str
    sso_url: str  # SingleSignOnService, Redirect and POST bindings
    signing_cert_pem: str
    config_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def metadata_xml(self) -> bytes:
        """The IdP's SAML 2.0 metadata as SimpleSAMLphp itself serves it (with shibmd:Scope)."""
        with urllib.request.urlopen(self.metadata_url, timeout=10) as resp:
            body: bytes = resp.read()
            return body

    def log_tail(self, lines: int = 30) -> str:
        """The end of SimpleSAMLphp's own log and of `php -S`'s output, for failure messages."""
        parts = []
        for path in (self.log_path, self.config_dir.parent / "php-server.log"):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            parts.append(f"--- {path.name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM the server's process group (SIGKILL after 5 s) and reap it; idempotent."""
        process = self.process
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(_STOP_GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
        # Whatever is left in the group (the shell leader is gone) must not outlive stop().
        _signal_group(process.pid, signal.SIGKILL)

    def __enter__(self) -> SimpleSamlIdp:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def make_self_signed_cert(common_name: str) -> tuple[str, str]:
    """A fresh RSA-2048 key and a self-signed certificate for it, as (cert PEM, key PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return cert_pem, key_pem


def start_simplesamlphp(
    workdir: Path,
    *,
    sp_entity_id: str,
    sp_acs_url: str,
    sp_cert_pem: str,
    users: Sequence[SamlUser] = DEFAULT_USERS,
    sign_assertion: bool = True,
    sign_response: bool = False,
    encrypt_assertion: bool = False,
    require_signed_authn_request: bool = True,
    php_binary: str = "php",
    public_host: str = "127.0.0.1",
) -> SimpleSamlIdp:
    """Write a config under `workdir`, start the IdP and return once its metadata is served.

    `sp_cert_pem` verifies the SP's signed AuthnRequests (when `require_signed_authn_request`)
    and encrypts assertions to it (when `encrypt_assertion`). Raises `RuntimeError` (with the
    end of the logs) if PHP or SimpleSAMLphp is missing or the server is not ready in 20 s.
    Call it on a long-lived thread (not via `asyncio.to_thread`): PR_SET_PDEATHSIG fires when
    the forking *thread* exits, so a retired pool thread would take the server down with it.
    """
    if not (SIMPLESAMLPHP_WWW / "saml2" / "idp" / "SSOService.php").is_file():
        raise RuntimeError(
            "SimpleSAMLphp is not installed; apt-get install -y simplesamlphp php-cli php-xml"
            " php-mbstring php-curl xmlsec1"
        )
    php = shutil.which(php_binary)
    if php is None:
        raise RuntimeError(f"{php_binary!r} not found; apt-get install -y php-cli")

    port = _free_loopback_port()
    # `public_host` "localhost" puts the IdP on another site than a broker at 127.0.0.1, so its
    # POST to the ACS is cross-site, as in a real deployment (the server still listens on
    # 127.0.0.1).
    base_url = f"http://{public_host}:{port}/"
    entity_id = f"{base_url}saml2/idp/metadata.php"
    workdir.mkdir(parents=True, exist_ok=True)
    config_dir = workdir / "config"
    metadata_dir = workdir / "metadata"
    cert_dir = workdir / "cert"
    log_dir = workdir / "log"
    session_dir = workdir / "sessions"
    temp_dir = workdir / "tmp"
    data_dir = workdir / "data"
    for d in (config_dir, metadata_dir, cert_dir, log_dir, session_dir, temp_dir, data_dir):
        d.mkdir(parents=True, exist_ok=True)

    idp_cert_pem, idp_key_pem = make_self_signed_cert("simplesamlphp-test-idp")
    (cert_dir / "idp.crt").write_text(idp_cert_pem)
    key_path = cert_dir / "idp.key"
    key_path.write_text(idp_key_pem)
    key_path.chmod(0o600)

    config: dict[str, Any] = {
        "baseurlpath": base_url,
        "certdir": f"{cert_dir}/",
        "loggingdir": f"{log_dir}/",
        "datadir": f"{data_dir}/",
        "tempdir": str(temp_dir),
        "metadatadir": f"{metadata_dir}/",
        "secretsalt": secrets.token_hex(16),
        "auth.adminpassword": secrets.token_urlsafe(16),
        "admin.protectindexpage": False,
        "admin.protectmetadata": False,
        "admin.checkforupdates": False,
        "technicalcontact_name": "Test IdP",
        "technicalcontact_email": "idp-admin@campus.example.edu",
        "timezone": "UTC",
        "trusted.url.domains": [f"127.0.0.1:{port}", f"{public_host}:{port}"],
        "enable.saml20-idp": True,
        "enable.shib13-idp": False,
        "enable.adfs-idp": False,
        "module.enable": {"core": True, "saml": True, "exampleauth": True},
        "showerrors": True,
        "errorreporting": False,
        "debug": {"saml": False, "backtraces": True, "validatexml": False},
        "logging.level": 7,  # SimpleSAML\Logger::DEBUG; the log only lives in workdir
        "logging.handler": "file",
        "logging.logfile": "simplesamlphp.log",
        "logging.processname": "simplesamlphp",
        "statistics.out": [],
        "store.type": "phpsession",
        "session.phpsession.savepath": str(session_dir),
        "session.phpsession.cookiename": "SimpleSAML",
        "session.phpsession.httponly": True,
        "session.cookie.name": "SimpleSAMLSessionID",
        "session.authtoken.cookiename": "SimpleSAMLAuthToken",
        "session.cookie.path": "/",
        "session.cookie.domain": None,
        "session.cookie.lifetime": 0,
        # Plain HTTP on loopback: a Secure cookie would never come back, and browsers reject
        # SameSite=None without Secure.
        "session.cookie.secure": False,
        "session.cookie.samesite": "Lax",
        "language.cookie.secure": False,
        "language.cookie.samesite": "Lax",
        "language.default": "en",
        "theme.use": "default",
        "production": True,
        "metadata.sources": [{"type": "flatfile"}],
        "metadata.sign.enable": False,
    }
    # An auth source is a PHP array whose element 0 names the class; exampleauth:UserPass
    # takes its users as the other keys, "username:password" => attributes.
    authsources: dict[str, Any] = {
        "admin": {"0": "core:AdminPassword"},
        "example-userpass": {"0": "exampleauth:UserPass"}
        | {f"{u.username}:{u.password}": u.attributes for u in users},
    }
    idp_hosted = {
        entity_id: {
            "host": "__DEFAULT__",
            "privatekey": "idp.key",
            "certificate": "idp.crt",
            "auth": "example-userpass",
            "scope": [IDP_SCOPE],
            "attributes.NameFormat": NAMEFORMAT_URI,
            "NameIDFormat": NAMEID_TRANSIENT,
            "signature.algorithm": RSA_SHA256,
            "saml20.sign.assertion": sign_assertion,
            "saml20.sign.response": sign_response,
            "validate.authnrequest": require_signed_authn_request,
            "userid.attribute": ATTR_SUBJECT_ID,
        }
    }
    sp_remote = {
        sp_entity_id: {
            "AssertionConsumerService": [
                {"Binding": BINDING_HTTP_POST, "Location": sp_acs_url, "index": 0}
            ],
            "certData": _cert_der_b64(sp_cert_pem),
            "NameIDFormat": NAMEID_TRANSIENT,
            "attributes.NameFormat": NAMEFORMAT_URI,
            "signature.algorithm": RSA_SHA256,
            "validate.authnrequest": require_signed_authn_request,
            "assertion.encryption": encrypt_assertion,
            "saml20.sign.assertion": sign_assertion,
            "saml20.sign.response": sign_response,
        }
    }
    _write_php(config_dir / "config.php", "config", config)
    _write_php(config_dir / "authsources.php", "config", authsources)
    _write_php(metadata_dir / "saml20-idp-hosted.php", "metadata", idp_hosted)
    _write_php(metadata_dir / "saml20-sp-remote.php", "metadata", sp_remote)

    env = {
        **os.environ,
        "SIMPLESAMLPHP_CONFIG_DIR": str(config_dir),
        "PHP_CLI_SERVER_WORKERS": str(_WORKERS),
    }
    server_log = workdir / "php-server.log"
    with server_log.open("ab") as out:
        process = subprocess.Popen(
            ["/bin/sh", "-c", _SUPERVISOR, "sh", php, f"127.0.0.1:{port}", str(SIMPLESAMLPHP_WWW)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            # Own process group, led by the shell above, so one id reaches master and workers.
            start_new_session=True,
            preexec_fn=_die_with_parent_hook(),
        )
    idp = SimpleSamlIdp(
        base_url=base_url,
        entity_id=entity_id,
        metadata_url=entity_id,
        sso_url=f"{base_url}saml2/idp/SSOService.php",
        signing_cert_pem=idp_cert_pem,
        config_dir=config_dir,
        log_path=log_dir / "simplesamlphp.log",
        process=process,
    )
    try:
        _wait_ready(idp)
    except BaseException:
        idp.stop()
        raise
    return idp


def _wait_ready(idp: SimpleSamlIdp) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT
    last_error = ""
    while True:
        if idp.process.poll() is not None:
            raise RuntimeError(
                f"php -S exited with code {idp.process.returncode} before it was ready:\n"
                f"{idp.log_tail()}"
            )
        try:
            body = idp.metadata_xml()
        except (OSError, urllib.error.URLError) as exc:
            last_error = str(exc)
        else:
            if b"IDPSSODescriptor" in body:
                return
            last_error = body[:300].decode(errors="replace")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"SimpleSAMLphp at {idp.base_url} was not ready after {_READY_TIMEOUT:.0f} s"
                f" ({last_error}):\n{idp.log_tail()}"
            )
        time.sleep(0.05)


def _write_php(path: Path, variable: str, value: Any) -> None:
    # A nowdoc takes the JSON verbatim; json.dumps never emits a line that is just "JSON".
    text = json.dumps(value, indent=2)
    path.write_text(
        f"<?php\n${variable} = json_decode(<<<'JSON'\n{text}\nJSON, true, 512,"
        " JSON_THROW_ON_ERROR);\n"
    )


def _cert_der_b64(cert_pem: str) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when we die, even by SIGKILL (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook
