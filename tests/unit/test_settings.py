"""Unit tests for broker.settings: every kind of bad setting is reported with the dotted path
of its key and a message a person can act on; durations parse; the example files validate."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.settings import (
    AppRoleAuthSettings,
    EnvRef,
    FileRef,
    SettingsError,
    load_settings,
    parse_settings,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MINIMAL: dict[str, Any] = {
    "server": {"public_url": "https://broker.example.edu"},
    "vault": {
        "address": "https://vault.example.edu:8200",
        "auth": {"method": "approle", "role_id": "role-1", "secret_id": "literal-secret"},
    },
}
SECRET_REF_MESSAGE = 'a secret is a string or one of { env = "NAME" }'


def minimal() -> dict[str, Any]:
    return copy.deepcopy(MINIMAL)


def problems_of(data: dict[str, Any], mode: str = "production") -> list[str]:
    with pytest.raises(SettingsError) as caught:
        parse_settings(data, mode=mode)
    assert caught.value.problems, "a SettingsError must list at least one problem"
    return caught.value.problems


def _set(section: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data.setdefault(section, {}).update(values)

    return change


def _auth(**values: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["vault"]["auth"].update(values)

    return change


def _drop_auth(key: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        del data["vault"]["auth"][key]

    return change


def _top(**values: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data.update(values)

    return change


# (change to a valid config, mode, exact path the problem is reported at, words in the message)
BAD_SETTINGS = [
    pytest.param(
        _top(servre={"public_url": "https://x.example"}),
        "production", "servre", ["unknown key"],
        id="unknown-top-level-key",
    ),
    pytest.param(
        _set("server", bind_prot=8080), "production", "server.bind_prot", ["unknown key"],
        id="unknown-nested-key",
    ),
    pytest.param(
        _auth(rolle_id="x"), "production", "vault.auth.rolle_id", ["unknown key"],
        id="unknown-key-inside-union-member",
    ),
    pytest.param(
        _set("server", bind_port="eighty"), "production", "server.bind_port",
        ["valid integer"], id="wrong-type-int",
    ),
    pytest.param(
        _set("server", cookie_secure="maybe"), "production", "server.cookie_secure",
        ["valid boolean"], id="wrong-type-bool",
    ),
    pytest.param(
        _set("server", bind_port=70000), "production", "server.bind_port", ["65535"],
        id="port-out-of-range",
    ),
    pytest.param(
        _set("tokens", access_token_ttl="10 minutes"), "production", "tokens.access_token_ttl",
        ["not a duration", "'10 minutes'", "15m"], id="bad-duration-words",
    ),
    pytest.param(
        _set("server", session_ttl="8x"), "production", "server.session_ttl",
        ["not a duration", "'8x'"], id="bad-duration-unit",
    ),
    pytest.param(
        _set("keys", max_staleness="1.5h"), "production", "keys.max_staleness",
        ["not a duration"], id="bad-duration-fraction",
    ),
    pytest.param(
        _set("tokens", clock_skew=-5), "production", "tokens.clock_skew",
        ["greater than or equal to 0"], id="negative-duration",
    ),
    pytest.param(
        _set("server", public_url="http://broker.example.edu"), "production",
        "server.public_url", ["https", "loopback"], id="http-public-url-non-loopback",
    ),
    pytest.param(
        _set("server", public_url="http://127.0.0.1.evil.example"), "production",
        "server.public_url", ["https", "loopback"], id="http-public-url-loopback-lookalike",
    ),
    pytest.param(
        _set("server", public_url="https://broker.example.edu/?x=1"), "production",
        "server.public_url", ["no query"], id="public-url-with-query",
    ),
    pytest.param(
        _set("vault", address="vault.example.edu:8200"), "production", "vault.address",
        ["absolute http(s) URL"], id="vault-address-not-url",
    ),
    pytest.param(
        _drop_auth("role_id"), "production", "vault.auth.role_id", ["Field required"],
        id="missing-vault-auth-role_id",
    ),
    pytest.param(
        _drop_auth("secret_id"), "production", "vault.auth.secret_id", ["Field required"],
        id="missing-vault-auth-secret_id",
    ),
    pytest.param(
        _auth(method="ldap"), "production", "vault.auth",
        ["unknown method 'ldap'", "'token'", "'approle'"], id="unknown-vault-auth-method",
    ),
    pytest.param(
        _top(upstreams=[{"type": "oidcc", "id": "campus"}]), "production", "upstreams[0]",
        ["unknown type 'oidcc'", "expected one of", "'dev'"], id="unknown-upstream-type",
    ),
    pytest.param(
        _top(upstreams=[{"id": "campus"}]), "production", "upstreams[0]",
        ["missing key 'type'"], id="upstream-without-type",
    ),
    pytest.param(
        _top(backends=[{"type": "s3", "id": "b"}]), "production", "backends[0]",
        ["unknown type 's3'", "'vault_secret'"], id="unknown-backend-type",
    ),
    pytest.param(
        _top(upstreams=[{"type": "dev", "id": "dev", "colour": "red"}]), "dev",
        "upstreams[0].colour", ["unknown key"], id="typo-reported-against-its-type",
    ),
    pytest.param(
        _top(upstreams=[{"type": "dev"}]), "production", "upstreams[0]",
        ["`broker dev`", "production"], id="dev-upstream-in-production",
    ),
    pytest.param(
        _top(upstreams=[{"type": "dev"}, {"type": "dev"}]), "dev", "upstreams",
        ["share the id 'dev'"], id="duplicate-upstream-ids",
    ),
    pytest.param(
        _top(backends=[
            {"type": "vault_secret", "id": "gh", "name": "github"},
            {"type": "vault_secret", "id": "gh", "name": "gitlab"},
        ]),
        "production", "backends", ["share the id 'gh'"], id="duplicate-backend-ids",
    ),
    pytest.param(
        _auth(secret_id={"env": "A", "file": "/run/a"}), "production", "vault.auth.secret_id",
        [SECRET_REF_MESSAGE], id="secret-reference-with-two-keys",
    ),
    pytest.param(
        _auth(secret_id={"envv": "A"}), "production", "vault.auth.secret_id",
        [SECRET_REF_MESSAGE], id="secret-reference-unknown-key",
    ),
    pytest.param(
        _auth(secret_id=12345), "production", "vault.auth.secret_id",
        [SECRET_REF_MESSAGE], id="secret-reference-number",
    ),
    pytest.param(
        _auth(secret_id={"vault": "secret/broker#secret_id"}), "production",
        "vault.auth.secret_id", ["cannot itself be kept in Vault"],
        id="vault-reference-for-vault-secret_id",
    ),
    pytest.param(
        _top(vault={
            "address": "https://vault.example.edu:8200",
            "auth": {"method": "token", "token": {"vault": "secret/broker#token"}},
        }),
        "production", "vault.auth.token", ["cannot itself be kept in Vault"],
        id="vault-reference-for-vault-token",
    ),
    pytest.param(
        _auth(secret_id={"vault": "no-field-here"}), "production",
        "vault.auth.secret_id.vault", ["should match pattern"], id="malformed-vault-reference",
    ),
    pytest.param(
        _set("keys", rotation_interval="1h", jwks_max_age="1h", refresh_interval="30s"),
        "production", "keys", ["rotation_interval", "jwks_max_age + refresh_interval", "3630"],
        id="rotation-shorter-than-publish-ahead",
    ),
    pytest.param(
        _set("tokens", access_token_ttl="2d", max_ttl="1d"), "production", "tokens",
        ["must not exceed max_ttl"], id="ttl-above-max_ttl",
    ),
    pytest.param(
        _set("database", url="mysql://db/broker"), "production", "database.url",
        ["sqlite", "postgresql"], id="unsupported-database",
    ),
    pytest.param(
        _set("cache", url="memcached://c:11211"), "production", "cache.url",
        ["memory://", "redis://"], id="unsupported-cache",
    ),
    pytest.param(
        _set("keys", algorithm="HS256"), "production", "keys.algorithm",
        ["'ES256'", "'RS256'"], id="symmetric-signing-algorithm",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("change", "mode", "path", "words"), BAD_SETTINGS)
def test_bad_setting_names_its_key(
    change: Callable[[dict[str, Any]], None], mode: str, path: str | None, words: list[str]
) -> None:
    data = minimal()
    change(data)
    problems = problems_of(data, mode)
    assert len(problems) == 1, problems
    line = problems[0]
    if path is not None:
        assert line.startswith(f"{path}: "), line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"


def test_dev_upstream_is_accepted_in_dev_and_admin_modes() -> None:
    data = minimal()
    data["upstreams"] = [{"type": "dev"}]
    for mode in ("dev", "admin"):
        settings = parse_settings(data, mode=mode)
        assert [u.id for u in settings.upstreams] == ["dev"]


def test_every_problem_is_reported_at_once() -> None:
    data = minimal()
    data["bogus"] = 1  # 1
    data["server"]["bind_port"] = "eighty"  # 2
    data["server"]["public_url"] = "http://broker.example.edu"  # 3
    del data["vault"]["auth"]["role_id"]  # 4
    data["tokens"] = {"access_token_ttl": "soon"}  # 5
    data["keys"] = {"rotation_interval": "10m"}  # 6
    data["upstreams"] = [{"type": "oidcc"}, {"type": "dev"}]  # 7, 8 (dev in production)
    data["audit"] = {"chain": "has spaces"}  # 9
    problems = problems_of(data)
    paths = sorted(line.split(": ", 1)[0] for line in problems)
    assert paths == sorted(
        [
            "bogus",
            "server.bind_port",
            "server.public_url",
            "vault.auth.role_id",
            "tokens.access_token_ttl",
            "keys",
            "upstreams[0]",
            "upstreams[1]",
            "audit.chain",
        ]
    ), problems
    assert len(problems) == 9


def test_duplicate_ids_are_reported_with_other_problems() -> None:
    data = minimal()
    data["server"]["bind_port"] = "eighty"
    data["backends"] = [
        {"type": "vault_secret", "id": "gh", "name": "github"},
        {"type": "vault_secret", "id": "gh", "name": "gitlab"},
    ]
    problems = problems_of(data)
    assert problems == [
        "server.bind_port: Input should be a valid integer, unable to parse string as an integer",
        "backends: two entries share the id 'gh'",
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("15m", 900, id="minutes"),
        pytest.param("90s", 90, id="seconds-suffix"),
        pytest.param("12h", 43_200, id="hours"),
        pytest.param("30d", 2_592_000, id="days"),
        pytest.param("2w", 1_209_600, id="weeks"),
        pytest.param("45", 45, id="bare-string"),
        pytest.param(" 2h ", 7200, id="surrounding-spaces"),
        pytest.param(600, 600, id="integer"),
    ],
)
def test_durations_parse(text: str | int, seconds: int) -> None:
    data = minimal()
    data["server"]["session_ttl"] = text
    assert parse_settings(data).server.session_ttl == seconds


def test_defaults_fill_every_optional_section() -> None:
    settings = parse_settings(minimal())
    assert settings.server.max_body_bytes == 1_048_576
    assert settings.keys.algorithm == "ES256"
    assert settings.keys.publish_ahead == 3600 + 30
    assert settings.cache.url == "memory://"
    assert settings.upstreams == [] and settings.backends == []
    # A literal secret is held as SecretStr: it never shows in a repr or a log line.
    assert "literal-secret" not in repr(settings)


def test_public_url_loses_its_trailing_slash_and_loopback_http_is_allowed() -> None:
    for url, expected in [
        ("https://broker.example.edu/", "https://broker.example.edu"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ]:
        data = minimal()
        data["server"]["public_url"] = url
        assert parse_settings(data).server.public_url == expected


# --- load_settings: files and secret references -----------------------------------------

VALID_TOML = """\
[server]
public_url = "https://broker.example.edu"

[vault]
address = "https://vault.example.edu:8200"
[vault.auth]
method = "approle"
role_id = "role-1"
secret_id = {secret}
"""


def write(tmp_path: Path, text: str, name: str = "broker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_problems(path: Path, **kwargs: Any) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        load_settings(path, **kwargs)
    return caught.value.problems


def test_env_reference_to_an_unset_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "BROKER_TEST_SECRET_ID_NOT_SET"
    monkeypatch.delenv(name, raising=False)
    path = write(tmp_path, VALID_TOML.format(secret=f'{{ env = "{name}" }}'))
    assert load_problems(path) == [f"vault.auth.secret_id: environment variable {name} is not set"]
    # Without the reference check the file itself is valid, and holds the reference only.
    settings = load_settings(path, check_refs=False)
    assert isinstance(settings.vault.auth, AppRoleAuthSettings)
    assert settings.vault.auth.secret_id == EnvRef(env=name)
    monkeypatch.setenv(name, "s3cret")
    settings = load_settings(path)
    assert isinstance(settings.vault.auth, AppRoleAuthSettings)
    assert settings.vault.auth.secret_id == EnvRef(env=name)


def test_file_reference_that_cannot_be_read(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-secret"
    path = write(tmp_path, VALID_TOML.format(secret=f'{{ file = "{missing}" }}'))
    assert load_problems(path) == [f"vault.auth.secret_id: file {missing} cannot be read"]
    missing.write_text("s3cret\n")
    settings = load_settings(path)
    assert isinstance(settings.vault.auth, AppRoleAuthSettings)
    assert settings.vault.auth.secret_id == FileRef(file=missing)


def test_file_reference_to_a_directory_is_a_problem(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    folder.mkdir()
    path = write(tmp_path, VALID_TOML.format(secret=f'{{ file = "{folder}" }}'))
    assert load_problems(path) == [f"vault.auth.secret_id: file {folder} cannot be read"]


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\npublic_url = "https://b.example"\nbind_port 8080\n')
    problems = load_problems(path)
    assert len(problems) == 1
    assert problems[0].startswith("TOML syntax: ")
    assert "line 3" in problems[0]


def test_missing_settings_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert load_problems(path) == [f"{path}: no such file"]


@pytest.mark.parametrize("kind", ["directory", "not-utf8"])
def test_unreadable_settings_file_is_a_settings_error(tmp_path: Path, kind: str) -> None:
    if kind == "directory":
        path = tmp_path / "conf.d"
        path.mkdir()
    else:
        path = tmp_path / "latin1.toml"
        path.write_bytes(b'[server]\npublic_url = "https://caf\xe9.example"\n')
    problems = load_problems(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: "), problems
    assert ("directory" if kind == "directory" else "UTF-8") in problems[0]


def test_problems_in_a_file_carry_the_path_of_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, VALID_TOML.format(secret='"x"') + '\n[tokens]\nclock_skew = "1y"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    assert caught.value.source == str(path)
    assert str(path) in str(caught.value)
    assert caught.value.problems == [
        "tokens.clock_skew: not a duration: '1y' (use seconds or e.g. '15m', '12h', '30d')"
    ]


# --- the example files -------------------------------------------------------------------


def test_production_example_validates() -> None:
    # check_refs=False: its Vault secret_id is a { file = "/run/secrets/…" } reference, a
    # secret mounted on the production host that this machine does not have (and that a
    # test must not create outside its tmp_path).
    settings = load_settings(EXAMPLES / "broker.toml", mode="production", check_refs=False)
    assert settings.server.public_url == "https://broker.example.edu"
    assert settings.server.session_ttl == 8 * 3600
    assert settings.keys.rotation_interval == 30 * 86400
    assert settings.keys.refresh_interval == 30
    assert settings.tokens.max_ttl == 86400
    assert isinstance(settings.vault.auth, AppRoleAuthSettings)
    assert settings.vault.auth.secret_id == FileRef(
        file=Path("/run/secrets/broker-vault-secret-id")
    )
    assert settings.upstreams == []
    if not os.path.exists("/run/secrets/broker-vault-secret-id"):
        # With the check, that unreadable reference is the only problem.
        assert load_problems(EXAMPLES / "broker.toml") == [
            "vault.auth.secret_id: file /run/secrets/broker-vault-secret-id cannot be read"
        ]


def test_dev_example_validates_in_dev_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its secret_id reference is relative to the directory `broker dev` runs in.
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".broker-dev").mkdir()
    (tmp_path / ".broker-dev" / "vault-secret-id").write_text("s3cret\n")
    settings = load_settings(EXAMPLES / "broker-dev.toml", mode="dev")
    assert settings.server.public_url == "http://127.0.0.1:8080"
    assert settings.server.cookie_secure is False
    assert [(u.type, u.id) for u in settings.upstreams] == [("dev", "dev")]


def test_dev_example_is_refused_in_production() -> None:
    problems = load_problems(EXAMPLES / "broker-dev.toml", mode="production", check_refs=False)
    assert len(problems) == 1
    assert problems[0].startswith("upstreams[0]: ") and "`broker dev`" in problems[0]
