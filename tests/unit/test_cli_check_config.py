"""`broker check-config FILE [--dev]`: exit codes and the problem lines it prints.

Most cases call `broker.cli.main` in-process; one runs the installed console script to prove
the entry point works end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BROKER_BIN = Path(sys.executable).parent / "broker"

BASE = """\
[server]
public_url = "https://broker.example.edu"

[vault]
address = "https://vault.example.edu:8200"
[vault.auth]
method = "approle"
role_id = "role-1"
secret_id = {{ file = "{secret}" }}
"""
DEV_UPSTREAM = '\n[[upstreams]]\ntype = "dev"\nid = "dev"\n'
VALID_POLICY = """\
@id("sign-in-anyone")
permit (principal, action == Action::"sign_in", resource);
"""


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "vault-secret-id"
    path.write_text("s3cret\n")
    return path


def write_config(tmp_path: Path, secret_file: Path, extra: str = "") -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(BASE.format(secret=secret_file) + extra, encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(["check-config", *argv])
    out = capsys.readouterr().out
    return code, out.splitlines()


def test_valid_file_prints_ok(
    tmp_path: Path, secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, secret_file)
    code, lines = run(capsys, str(path))
    assert code == 0
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}: OK (0 upstream(s), 0 backend(s), ")
    assert lines[0].endswith(" policies)")


# (text appended to a valid file, the problem lines check-config must print)
INVALID = [
    pytest.param(
        '\n[tokens]\naccess_token_ttl = "ten minutes"\n',
        ["tokens.access_token_ttl: not a duration: 'ten minutes'"],
        id="bad-duration",
    ),
    pytest.param(
        "\n[keys]\nrotation_interval = 600\n",
        ["keys: rotation_interval must be longer than jwks_max_age + refresh_interval"],
        id="rotation-too-short",
    ),
    pytest.param(
        '\n[server2]\nx = 1\n\n[database]\nurll = "sqlite:///b.db"\n',
        ["database.urll: unknown key", "server2: unknown key"],
        id="two-unknown-keys",
    ),
    pytest.param(
        '\n[[upstreams]]\ntype = "oidcc"\n\n[[upstreams]]\nid = "x"\n',
        ["upstreams[0]: unknown type 'oidcc'; expected one of 'dev'",
         "upstreams[1]: missing key 'type'"],
        id="bad-upstreams",
    ),
    pytest.param(
        DEV_UPSTREAM,
        ["upstreams[0]: the dev sign-in adapter only loads under `broker dev`"],
        id="dev-upstream-without-dev-flag",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "expected"), INVALID)
def test_invalid_file_prints_every_problem_and_exits_1(
    tmp_path: Path,
    secret_file: Path,
    capsys: pytest.CaptureFixture[str],
    extra: str,
    expected: list[str],
) -> None:
    path = write_config(tmp_path, secret_file, extra)
    code, lines = run(capsys, str(path))
    assert code == 1
    assert lines[0] == f"{path}: {len(expected)} problem(s):"
    problems = lines[1:]
    assert len(problems) == len(expected), lines
    for line, start in zip(problems, expected, strict=True):
        assert line.startswith(f"  - {start}"), (line, start)


def test_dev_flag_accepts_the_dev_upstream(
    tmp_path: Path, secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, secret_file, DEV_UPSTREAM)
    code, lines = run(capsys, str(path), "--dev")
    assert code == 0
    assert lines == [lines[0]] and lines[0].startswith(f"{path}: OK (1 upstream(s), 0 backend(s)")


def test_dev_example_with_dev_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # its secret_id file is relative to where `broker dev` runs
    (tmp_path / ".broker-dev").mkdir()
    (tmp_path / ".broker-dev" / "vault-secret-id").write_text("s3cret\n")
    example = str(EXAMPLES / "broker-dev.toml")
    code, lines = run(capsys, example, "--dev")
    assert (code, len(lines)) == (0, 1) and "OK (1 upstream(s)" in lines[0]
    code, lines = run(capsys, example)
    assert code == 1
    assert any("`broker dev`" in line for line in lines), lines


def test_unreadable_secret_reference_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent-secret"
    path = write_config(tmp_path, missing)
    code, lines = run(capsys, str(path))
    assert code == 1
    assert lines[1:] == [f"  - vault.auth.secret_id: file {missing} cannot be read"]


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.toml"
    code, lines = run(capsys, str(path))
    assert code == 1
    assert lines == [f"{path}: 1 problem(s):", f"  - {path}: no such file"]


def test_toml_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[server]\npublic_url = "https://b.example\n')
    code, lines = run(capsys, str(path))
    assert code == 1
    assert len(lines) == 2 and lines[1].startswith("  - TOML syntax: ") and "line 2" in lines[1]


def test_directory_instead_of_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run(capsys, str(tmp_path))
    assert code == 1
    assert lines == [
        f"{tmp_path}: 1 problem(s):",
        f"  - {tmp_path}: is a directory, not a settings file",
    ]


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["check-config"])
    assert caught.value.code == 2
    assert "file" in capsys.readouterr().err


# --- [policy] directory ------------------------------------------------------------------

BAD_POLICIES = [
    pytest.param(
        {"broken.cedar": '@id("x")\npermit (principal, action ==, resource);\n'},
        "broken.cedar", "Cedar parse error", id="syntax-error",
    ),
    pytest.param(
        {"ok.cedar": VALID_POLICY, "anon.cedar": 'permit (principal, action, resource);\n'},
        "anon.cedar", "has no @id", id="policy-without-id",
    ),
    pytest.param(
        {"types.cedar": '@id("t")\npermit (principal is Spaceship, action, resource);\n'},
        "types.cedar", "fails validation against the schema", id="unknown-entity-type",
    ),
    pytest.param(
        {"a.cedar": VALID_POLICY, "b.cedar": VALID_POLICY},
        "b.cedar", "duplicate @id", id="duplicate-id-across-files",
    ),
    pytest.param({}, None, "no *.cedar policy files", id="empty-directory"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "named", "words"), BAD_POLICIES)
def test_invalid_policy_directory_fails_naming_the_file(
    tmp_path: Path,
    secret_file: Path,
    capsys: pytest.CaptureFixture[str],
    files: dict[str, str],
    named: str | None,
    words: str,
) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    path = write_config(tmp_path, secret_file, f'\n[policy]\ndirectory = "{folder}"\n')
    code, lines = run(capsys, str(path))
    assert code == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}: policy.directory: ")
    assert str(folder / named if named else folder) in lines[0], lines[0]
    assert words in lines[0], lines[0]


def test_valid_policy_directory_is_counted(
    tmp_path: Path, secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "site.cedar").write_text(
        VALID_POLICY + '\n@id("exchange")\npermit (principal is User, action == '
        'Action::"exchange", resource);\n'
    )
    path = write_config(tmp_path, secret_file, f'\n[policy]\ndirectory = "{folder}"\n')
    code, lines = run(capsys, str(path))
    assert code == 0
    assert lines == [f"{path}: OK (0 upstream(s), 0 backend(s), 2 policies)"]


# --- as a separate process --------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
# `broker` is what `pip install -e .` generates from [project.scripts]; `-m broker.cli` runs
# the same `main` through the module's `__main__` guard when the project is not installed.
COMMANDS = [
    pytest.param([str(BROKER_BIN)], id="console-script"),
    pytest.param([sys.executable, "-m", "broker.cli"], id="python-m"),
]


@pytest.mark.parametrize("command", COMMANDS)
def test_as_a_process(tmp_path: Path, secret_file: Path, command: list[str]) -> None:
    if command[0] == str(BROKER_BIN) and not BROKER_BIN.exists():
        pytest.skip(f"{BROKER_BIN} is not installed (run `pip install -e .[dev,test]`)")

    def check_config(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, "check-config", *args],
            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip

    good = write_config(tmp_path, secret_file)
    done = check_config(str(good))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{good}: OK (")
    assert "Traceback" not in done.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text(
        DEV_UPSTREAM.lstrip() + "\n" + BASE.format(secret=secret_file) + '[cache]\nurl = "x"\n'
    )
    done = check_config(str(bad))
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"{bad}: 2 problem(s):",
        "  - cache.url: use memory:// or redis://HOST:PORT/DB",
        "  - upstreams[0]: the dev sign-in adapter only loads under `broker dev`; remove it "
        "from a production configuration",
    ]
    done = check_config(str(bad), "--dev")
    assert done.returncode == 1
    assert done.stdout.splitlines()[1:] == ["  - cache.url: use memory:// or redis://HOST:PORT/DB"]


def test_console_script_is_declared() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["broker"] == "broker.cli:main"
