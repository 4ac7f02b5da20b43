"""`broker credentials openstack` writes one clouds.yaml entry: other clouds are kept, the
file is 0600, a file that is not a clouds.yaml is left alone, and an AWS answer is refused.
(`broker credentials aws` runs end to end in tests/integration/test_cli_credentials.py.)"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.cli_client import CliError
from broker.cli_credentials import aws_process_output, merge_clouds_yaml

CLOUDS_YAML = """clouds:
  js2:
    auth_type: v3applicationcredential
    auth:
      auth_url: https://js2.example.org:5000/v3
      application_credential_id: abc123
      application_credential_secret: s3cret-value
    region_name: IU
    interface: public
    identity_api_version: 3
"""


def answer(kind: str = "openstack") -> dict[str, Any]:
    return {
        "backend": "js2", "kind": kind, "expires_at": "2026-11-28T12:00:00Z",
        "credential": {"clouds_yaml": CLOUDS_YAML},
    }  # fmt: skip


def test_merge_keeps_other_clouds_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "openstack" / "clouds.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"clouds": {"mine": {"auth": {"auth_url": "x"}}}}))
    merge_clouds_yaml(path, "course", answer())
    written = yaml.safe_load(path.read_text())
    assert set(written["clouds"]) == {"mine", "course"}
    course = written["clouds"]["course"]
    assert course["auth"]["application_credential_id"] == "abc123"
    assert course["auth_type"] == "v3applicationcredential"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    merge_clouds_yaml(path, "course", answer())  # renewing replaces the entry
    assert set(yaml.safe_load(path.read_text())["clouds"]) == {"mine", "course"}


def test_merge_creates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "clouds.yaml"
    merge_clouds_yaml(path, "js2", answer())
    assert list(yaml.safe_load(path.read_text())["clouds"]) == ["js2"]


def test_a_file_that_is_not_clouds_yaml_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "clouds.yaml"
    path.write_text("clouds: [1, 2]\n")
    with pytest.raises(CliError, match=r"not a clouds\.yaml"):
        merge_clouds_yaml(path, "js2", answer())
    assert path.read_text() == "clouds: [1, 2]\n"


def test_kinds_must_match(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="does not issue OpenStack"):
        merge_clouds_yaml(tmp_path / "c.yaml", "js2", answer(kind="aws"))
    with pytest.raises(CliError, match="does not issue AWS"):
        aws_process_output(answer())
