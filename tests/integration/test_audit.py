"""The hash-chained audit log on real files, indexed in real SQLite and PostgreSQL (the
`database` fixture runs every test on both). Each tamper case edits the file the way an
attacker with write access to it would, and checks that `verify` names the record."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select

from broker.audit import GENESIS_HASH, AuditLog, AuditRecord, canonical_json
from broker.errors import ServerError, UpstreamFailed
from broker.storage import AuditIndex, Database, LeaseRecord

REPO = Path(__file__).resolve().parents[2]
JWT = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0"
    ".eyJzdWIiOiJ1c2VyIiwiYXVkIjoiYXdzIn0"
    ".c2lnbmF0dXJlLWJ5dGVzLWhlcmU"
)


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "main.jsonl"  # the directory does not exist yet


@pytest.fixture
def log(audit_path: Path, database: Database) -> AuditLog:
    return AuditLog(audit_path, database)


async def _fill(log: AuditLog, n: int) -> list[AuditRecord]:
    return [
        await log.append(
            "credential.issued",
            outcome="success",
            actor=f"user-{i}",
            backend="aws",
            token_jti=f"jti-{i}",
            ttl=900,
        )
        for i in range(1, n + 1)
    ]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines), encoding="utf-8")


def _rehash(obj: dict[str, object]) -> dict[str, object]:
    """What an attacker who knows the format does after editing a record."""
    body = {k: v for k, v in obj.items() if k != "hash"}
    return {**body, "hash": hashlib.sha256(canonical_json(body).encode()).hexdigest()}


async def _index(db: Database, chain: str = "main") -> dict[int, str]:
    async with db.sessions() as session:
        rows = await session.execute(
            select(AuditIndex.seq, AuditIndex.record_hash).where(AuditIndex.chain == chain)
        )
        return {seq: h for seq, h in rows.all()}


async def test_appended_records_form_a_verifiable_chain(
    log: AuditLog, audit_path: Path, database: Database
) -> None:
    records = await _fill(log, 5)

    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev == GENESIS_HASH
    assert all(b.prev == a.hash for a, b in itertools.pairwise(records))
    lines = _lines(audit_path)
    assert [line.rstrip("\n") for line in lines] == [r.to_line() for r in records]
    first = json.loads(lines[0])
    assert set(first) == {"seq", "ts", "event", "outcome", "actor", "chain", "prev", "data", "hash"}
    assert first["data"] == {"backend": "aws", "token_jti": "jti-1", "ttl": 900}
    assert first["chain"] == "main"
    assert first["ts"].endswith("Z")
    assert datetime.fromisoformat(first["ts"]).utcoffset() is not None
    body = {k: v for k, v in first.items() if k != "hash"}
    expected_hash = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert first["hash"] == expected_hash
    assert lines[0] == json.dumps(first, sort_keys=True, separators=(",", ":")) + "\n"
    assert oct(audit_path.stat().st_mode & 0o777) == oct(0o600)

    assert await _index(database) == {r.seq: r.hash for r in records}
    assert await log.count_indexed() == 5
    report = await log.verify()
    assert (report.ok, report.records, report.first_bad_seq, report.problem) == (True, 5, None, "")


async def test_index_rows_hold_the_record_fields(log: AuditLog, database: Database) -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    record = await log.append(
        "grant.redeemed", outcome="success", actor=None, expires_at=when, grant_id="g-1"
    )
    async with database.sessions() as session:
        row = (await session.execute(select(AuditIndex))).scalar_one()
    assert (row.chain, row.seq, row.event, row.actor, row.outcome) == (
        "main", 1, "grant.redeemed", None, "success",
    )  # fmt: skip
    assert row.ts == record.ts
    assert row.record_hash == record.hash
    assert row.prev_hash == GENESIS_HASH
    assert row.data == {"expires_at": "2025-01-02T03:04:05.000000Z", "grant_id": "g-1"}
    assert record.data == row.data


async def test_rows_appended_with_a_record_share_its_group_commit(
    log: AuditLog, database: Database
) -> None:
    """Concurrent appends with rows: every row is in SQL once its append returns, next to the
    record's index row; a batch whose extra row cannot be inserted indexes none of it."""
    now = datetime.now(UTC)

    def lease(lease_id: str) -> dict[str, Any]:
        return {
            "lease_id": lease_id, "principal_id": "u-1", "client_id": "c", "backend": "aws",
            "kind": "aws", "created_at": now, "expires_at": now, "revoked_at": None,
            "cleaned_up": False, "handle": {}, "details": {},
        }  # fmt: skip

    leases = LeaseRecord.__table__
    records = await asyncio.gather(*(
        log.append_with_rows([(leases, lease(f"l-{i}"))], "credential.issued",
                             outcome="success", lease=f"l-{i}")
        for i in range(5)
    ))  # fmt: skip
    async with database.sessions() as session:
        ids = set((await session.execute(select(LeaseRecord.lease_id))).scalars())
    assert ids == {f"l-{i}" for i in range(5)}
    assert await _index(database) == {r.seq: r.hash for r in records}
    with pytest.raises(ServerError):  # a duplicate lease id: the whole transaction fails
        await log.append_with_rows(
            [(leases, lease("l-0"))], "credential.issued", outcome="success", lease="l-0"
        )
    assert await log.count_indexed() == 5  # its own index row was not committed either


async def test_an_empty_log_verifies(log: AuditLog) -> None:
    report = await log.verify()
    assert report.ok
    assert report.records == 0


async def test_an_edited_field_is_detected_at_that_record(log: AuditLog, audit_path: Path) -> None:
    await _fill(log, 6)
    lines = _lines(audit_path)
    lines[3] = lines[3].replace('"outcome":"success"', '"outcome":"denied"')
    _write(audit_path, lines)

    report = await log.verify()
    assert not report.ok
    assert report.first_bad_seq == 4
    assert report.problem == "record 4 was changed (hash mismatch)"
    assert report.records == 6


async def test_an_edited_and_rehashed_record_is_caught_by_the_index(
    log: AuditLog, audit_path: Path
) -> None:
    await _fill(log, 6)
    lines = _lines(audit_path)
    obj = json.loads(lines[3])
    obj["actor"] = "someone-else"
    lines[3] = canonical_json(_rehash(obj)) + "\n"
    _write(audit_path, lines)

    report = await log.verify()
    assert not report.ok
    assert report.first_bad_seq == 4
    assert "record 4 differs from the SQL index" in report.problem


async def test_a_whole_rewritten_chain_is_caught_by_the_index(
    log: AuditLog, audit_path: Path
) -> None:
    await _fill(log, 5)
    lines = _lines(audit_path)
    prev = json.loads(lines[1])["hash"]
    for i in range(2, 5):  # rewrite records 3..5 and re-link the chain perfectly
        obj = json.loads(lines[i])
        obj["data"]["backend"] = "github"
        obj["prev"] = prev
        obj = _rehash(obj)
        prev = obj["hash"]
        lines[i] = canonical_json(obj) + "\n"
    _write(audit_path, lines)

    report = await log.verify()
    assert not report.ok
    assert report.first_bad_seq == 3
    assert "record 3 differs from the SQL index" in report.problem


async def test_a_non_canonical_line_is_detected(log: AuditLog, audit_path: Path) -> None:
    await _fill(log, 3)
    lines = _lines(audit_path)
    lines[1] = json.dumps(json.loads(lines[1]), indent=None) + "\n"  # same values, new spacing
    _write(audit_path, lines)

    report = await log.verify()
    assert (report.ok, report.first_bad_seq) == (False, 2)
    assert "record 2 was edited" in report.problem


async def test_a_deleted_middle_record_is_detected(log: AuditLog, audit_path: Path) -> None:
    await _fill(log, 6)
    lines = _lines(audit_path)
    del lines[2]
    _write(audit_path, lines)

    report = await log.verify()
    assert not report.ok
    assert report.first_bad_seq == 3
    assert report.problem == "record 3 is missing (seq jumps from 2 to 4)"


async def test_a_deleted_first_record_is_detected(log: AuditLog, audit_path: Path) -> None:
    await _fill(log, 3)
    _write(audit_path, _lines(audit_path)[1:])

    report = await log.verify()
    assert (report.ok, report.first_bad_seq) == (False, 1)
    assert report.problem == "record 1 is missing (the file starts at record 2)"


async def test_swapped_records_are_detected(log: AuditLog, audit_path: Path) -> None:
    await _fill(log, 6)
    lines = _lines(audit_path)
    lines[2], lines[3] = lines[3], lines[2]
    _write(audit_path, lines)

    report = await log.verify()
    assert not report.ok
    assert report.first_bad_seq == 3
    assert report.problem.startswith("records out of order at line 3")


async def test_a_broken_prev_link_is_detected(
    log: AuditLog, audit_path: Path, database: Database
) -> None:
    await _fill(log, 5)
    # Without its index row, record 4 can only be judged by its link to record 3.
    async with database.sessions() as session, session.begin():
        await session.execute(delete(AuditIndex).where(AuditIndex.seq == 4))
    lines = _lines(audit_path)
    obj = json.loads(lines[3])
    obj["prev"] = "f" * 64
    lines[3] = canonical_json(_rehash(obj)) + "\n"
    _write(audit_path, lines)

    report = await log.verify()
    assert not report.ok
    assert report.first_bad_seq == 4
    assert report.problem == "record 4 prev-hash does not match record 3"


async def test_a_truncated_tail_is_detected_through_the_index(
    log: AuditLog, audit_path: Path
) -> None:
    await _fill(log, 12)
    _write(audit_path, _lines(audit_path)[:9])

    report = await log.verify()
    assert not report.ok
    assert report.first_bad_seq == 10
    assert report.problem == (
        "the file ends at record 9 but the SQL index has 12 (records removed from the end)"
    )


async def test_a_deleted_file_is_detected_through_the_index(
    log: AuditLog, audit_path: Path
) -> None:
    await _fill(log, 2)
    audit_path.unlink()

    report = await log.verify()
    assert (report.ok, report.first_bad_seq, report.records) == (False, 1, 0)
    assert "the SQL index has 2" in report.problem


async def test_a_forged_record_appended_to_the_file_is_detected(
    log: AuditLog, audit_path: Path
) -> None:
    records = await _fill(log, 3)
    forged = {
        "seq": 4,
        "ts": "2030-01-01T00:00:00.000000Z",
        "event": "credential.issued",
        "outcome": "success",
        "actor": "framed-user",
        "chain": "main",
        "prev": records[-1].hash,
        "data": {},
    }
    with audit_path.open("a", encoding="utf-8") as f:
        f.write(canonical_json(_rehash(forged)) + "\n")

    report = await log.verify()
    assert not report.ok
    assert report.first_bad_seq == 4
    assert "record 4 is in the file but not in the SQL index" in report.problem


async def test_a_torn_last_line_is_reported_and_blocks_appends(
    log: AuditLog, audit_path: Path, database: Database
) -> None:
    await _fill(log, 3)
    with audit_path.open("a", encoding="utf-8") as f:
        f.write('{"seq":4,"ts":"2030-')
    before = audit_path.read_bytes()

    report = await log.verify()
    assert (report.ok, report.first_bad_seq) == (False, 4)
    assert report.problem == "line 4 is incomplete (torn write)"
    with pytest.raises(ServerError) as caught:
        await log.append("x", outcome="success")
    assert "incomplete line" in caught.value.log_detail
    assert audit_path.read_bytes() == before
    assert await log.count_indexed() == 3


async def test_a_file_of_another_chain_is_refused(audit_path: Path, database: Database) -> None:
    await AuditLog(audit_path, database, chain="alpha").append("x", outcome="success")
    other = AuditLog(audit_path, database, chain="beta")

    report = await other.verify()
    assert not report.ok
    assert "belongs to chain 'alpha'" in report.problem
    with pytest.raises(ServerError):
        await other.append("x", outcome="success")
    assert len(_lines(audit_path)) == 1


async def test_chains_are_independent(tmp_path: Path, database: Database) -> None:
    a = AuditLog(tmp_path / "a.jsonl", database, chain="a")
    b = AuditLog(tmp_path / "b.jsonl", database, chain="b")
    await _fill(a, 3)
    await _fill(b, 2)
    assert (await a.verify()).records == 3
    assert (await b.verify()).records == 2
    assert (await a.verify()).ok and (await b.verify()).ok
    assert set(await _index(database, "a")) == {1, 2, 3}
    assert set(await _index(database, "b")) == {1, 2}


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"note": JWT}, id="jwt-value"),
        pytest.param({"note": f"Bearer {JWT}"}, id="jwt-inside-text"),
        pytest.param({"headers": {"list": ["x", JWT]}}, id="jwt-nested-in-list"),
        pytest.param({"note": JWT.rsplit(".", 1)[0] + "."}, id="unsigned-jwt"),
        pytest.param({"access_token": "opaque"}, id="access_token"),
        pytest.param({"client_secret": "s"}, id="client_secret"),
        pytest.param({"password": "p"}, id="password"),
        pytest.param({"api_key": "k"}, id="api_key"),
        pytest.param({"private_key_pem": "k"}, id="private_key_pem"),
        pytest.param({"RefreshToken": "r"}, id="refresh-token-camel-case"),
        pytest.param({"upstream": {"id_token": "x"}}, id="nested-id_token"),
        pytest.param({"a": [{"secret": "x"}]}, id="secret-in-list-of-objects"),
    ],
)
async def test_secrets_are_refused_and_nothing_is_written(
    log: AuditLog, audit_path: Path, fields: dict[str, Any]
) -> None:
    await _fill(log, 1)
    before = audit_path.read_bytes()
    with pytest.raises(ValueError, match=r"JWT|secret") as caught:
        await log.append("token.issued", outcome="success", **fields)
    assert JWT not in str(caught.value)
    assert audit_path.read_bytes() == before
    assert await log.count_indexed() == 1
    assert (await log.verify()).ok


@pytest.mark.parametrize(
    ("actor", "event"),
    [pytest.param(JWT, "sign_in", id="jwt-actor"), pytest.param("u", JWT, id="jwt-event")],
)
async def test_secrets_in_actor_or_event_are_refused(
    log: AuditLog, audit_path: Path, actor: str, event: str
) -> None:
    with pytest.raises(ValueError, match="JWT"):
        await log.append(event, outcome="success", actor=actor)
    assert not audit_path.exists()


async def test_ids_and_hashes_of_secrets_are_allowed(log: AuditLog) -> None:
    record = await log.append(
        "token.issued",
        outcome="success",
        token_jti="abc",
        key_id="k1",
        kid="k1",
        jti="abc",
        secret_hash="0" * 16,
        refresh_token_family_id="f1",
        note="eyJ alone is not a token",
    )
    assert record.data["token_jti"] == "abc"
    assert (await log.verify()).ok


async def test_non_json_fields_are_refused_and_nothing_is_written(
    log: AuditLog, audit_path: Path
) -> None:
    with pytest.raises(TypeError):
        await log.append("x", outcome="success", when=datetime(2025, 1, 1))  # naive
    with pytest.raises(TypeError):
        await log.append("x", outcome="success", blob=b"bytes")
    with pytest.raises(ValueError):
        await log.append("x", outcome="success", ratio=float("nan"))
    assert not audit_path.exists()


async def test_a_failed_index_insert_leaves_the_record_for_reindex(
    log: AuditLog, audit_path: Path, database: Database
) -> None:
    await _fill(log, 2)
    down = Database("postgresql://broker:pw@127.0.0.1:1/broker")
    try:
        with pytest.raises(UpstreamFailed) as caught:
            await AuditLog(audit_path, down).append("x", outcome="success", grant_id="g")
    finally:
        await down.close()
    assert "run reindex" in caught.value.log_detail
    assert len(_lines(audit_path)) == 3, "the file record stands"

    report = await log.verify()
    assert (report.ok, report.first_bad_seq) == (False, 3)
    assert "not in the SQL index" in report.problem

    assert await log.reindex() == 1
    assert await log.reindex() == 0
    assert (await log.verify()).ok
    assert (await log.append("y", outcome="success")).seq == 4
    assert (await log.verify()).ok


async def test_a_failed_index_insert_on_sqlite_reports_the_same_way(tmp_path: Path) -> None:
    """SQLite indexes from the writer thread through its own synchronous engine; a failure
    there is reported like the async path's: the record stands in the file, run reindex."""
    unmigrated = Database(f"sqlite:///{tmp_path / 'empty.db'}")  # no audit_records table
    path = tmp_path / "audit.log"
    try:
        assert unmigrated.blocking_engine() is not None
        with pytest.raises(UpstreamFailed) as caught:
            await AuditLog(path, unmigrated).append("x", outcome="success", grant_id="g")
    finally:
        await unmigrated.close()
    assert "run reindex" in caught.value.log_detail
    assert "OperationalError" in caught.value.log_detail
    assert len(_lines(path)) == 1, "the file record stands"


async def test_reindex_never_overwrites_index_rows_with_a_tampered_file(
    log: AuditLog, audit_path: Path, database: Database
) -> None:
    await _fill(log, 4)
    original = await _index(database)
    lines = _lines(audit_path)
    obj = json.loads(lines[1])
    obj["outcome"] = "denied"
    lines[1] = canonical_json(_rehash(obj)) + "\n"
    _write(audit_path, lines)
    async with database.sessions() as session, session.begin():
        await session.execute(delete(AuditIndex).where(AuditIndex.seq == 4))

    # The chain breaks at record 3 (its prev no longer matches), so 4 is not re-added either.
    assert await log.reindex() == 0
    assert await _index(database) == {s: h for s, h in original.items() if s != 4}
    assert not (await log.verify()).ok


async def test_appends_after_truncation_are_refused_by_the_index(
    log: AuditLog, audit_path: Path
) -> None:
    await _fill(log, 4)
    _write(audit_path, _lines(audit_path)[:2])
    with pytest.raises(ServerError) as caught:
        await log.append("x", outcome="success")
    assert "already has this seq" in caught.value.log_detail
    assert not (await log.verify()).ok


async def test_two_instances_on_one_file_keep_one_chain(
    audit_path: Path, database: Database
) -> None:
    one, two = AuditLog(audit_path, database), AuditLog(audit_path, database)
    appended = await asyncio.gather(
        *(
            (one if i % 2 else two).append("e", outcome="success", actor=f"a{i}", n=i)
            for i in range(50)
        )
    )
    assert sorted(r.seq for r in appended) == list(range(1, 51))
    seqs = [json.loads(line)["seq"] for line in _lines(audit_path)]
    assert seqs == list(range(1, 51))
    report = await one.verify()
    assert (report.ok, report.records) == (True, 50), report.problem
    assert len(await _index(database)) == 50


_CHILD = """
import asyncio, sys
from pathlib import Path
from broker.audit import AuditLog
from broker.storage import Database

async def main(path, url, who, n):
    db = Database(url)
    log = AuditLog(Path(path), db)
    await db.ping()
    Path(path).with_name(f"ready-{who}").touch()
    go = Path(path).with_name("go")
    while not go.exists():  # start together with the others, for real contention
        await asyncio.sleep(0.005)
    for i in range(n):
        await log.append("child.event", outcome="success", actor=who, n=i)
    await db.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


async def test_processes_sharing_one_file_keep_one_chain(
    audit_path: Path, database: Database
) -> None:
    audit_path.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    url = database.engine.url.render_as_string(hide_password=False)
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            str(audit_path),
            url,
            f"proc-{k}",
            "20",
            cwd=REPO,
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        for k in range(2)
    ]
    log = AuditLog(audit_path, database)
    await log.append("parent.event", outcome="success", actor="parent", n=0)
    ready = [audit_path.parent / f"ready-proc-{k}" for k in range(2)]
    while not all(p.exists() for p in ready):
        await asyncio.sleep(0.01)
    (audit_path.parent / "go").touch()
    for i in range(1, 10):
        await log.append("parent.event", outcome="success", actor="parent", n=i)
    for child in children:
        _, err = await child.communicate()
        assert child.returncode == 0, err.decode()

    records = [json.loads(line) for line in _lines(audit_path)]
    assert [r["seq"] for r in records] == list(range(1, 51))
    assert {r["actor"] for r in records} == {"proc-0", "proc-1", "parent"}
    report = await log.verify()
    assert (report.ok, report.records) == (True, 50), report.problem
    assert len(await _index(database)) == 50


async def test_a_cancelled_append_still_completes(
    log: AuditLog, audit_path: Path, database: Database
) -> None:
    await _fill(log, 1)
    task = asyncio.create_task(log.append("cancelled", outcome="success"))
    await asyncio.sleep(0)  # let it start
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await log.flush()
    assert [json.loads(line)["event"] for line in _lines(audit_path)][-1] == "cancelled"
    assert len(await _index(database)) == 2
    assert (await log.verify()).ok


async def test_a_burst_larger_than_one_batch_keeps_one_ordered_chain(
    log: AuditLog, audit_path: Path, database: Database
) -> None:
    records = await asyncio.gather(
        *(log.append("token.issued", outcome="success", n=n) for n in range(600))
    )
    # Each caller gets its own record back, in one gap-free chain.
    assert sorted(r.seq for r in records) == list(range(1, 601))
    assert [r.data["n"] for r in sorted(records, key=lambda r: r.seq)] == list(range(600))
    lines = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, 601))
    report = await log.verify()
    assert report.ok and report.records == 600, report.problem
    async with database.sessions() as session:
        rows = (await session.execute(select(AuditIndex.seq))).scalars().all()
    assert sorted(rows) == list(range(1, 601))


async def test_lines_are_canonical_for_awkward_values(
    log: AuditLog, audit_path: Path, database: Database
) -> None:
    """`append` builds each line from pre-serialised parts; it must be exactly the canonical
    JSON of the record, whatever the values (non-ASCII, escapes, null actor, numeric keys)."""
    awkward: list[dict[str, Any]] = [
        # (no NUL: PostgreSQL JSONB refuses \u0000)
        {"name": "Zoë \u2603 \U0001f600", "quote": 'a"b\\c', "ctl": "\x01\x1f\n\t"},
        {"nested": {"b": [1, 2.5, None, True], "a": {"z": [], "y": {}}}, "big": 2**70},
        {"by_number": {10: "ten", 9: "nine", 100: "hundred"}, "tuple": (1, "two")},
        {"when": datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "neg": -0.0, "tiny": 1e-300},
        {},
    ]
    records = [
        await log.append("e\u00e9", outcome="success", actor=None if i % 2 else "ä", **fields)
        for i, fields in enumerate(awkward)
    ]
    for record, line in zip(records, _lines(audit_path), strict=True):
        obj = json.loads(line)
        assert line == canonical_json(obj) + "\n"
        body = {k: v for k, v in obj.items() if k != "hash"}
        assert obj["hash"] == hashlib.sha256(canonical_json(body).encode()).hexdigest()
        assert obj["hash"] == record.hash and obj["data"] == record.data
        assert obj["ts"] == record.body()["ts"] and obj["actor"] == record.actor
    assert records[2].data["by_number"] == {"10": "ten", "100": "hundred", "9": "nine"}
    assert await _index(database) == {r.seq: r.hash for r in records}
    report = await log.verify()
    assert (report.ok, report.records) == (True, len(awkward)), report.problem


async def test_an_edit_of_the_last_line_is_seen_by_the_next_append(
    log: AuditLog, audit_path: Path
) -> None:
    """The writer skips re-reading the file's last line only when the file still ends with
    the exact bytes it wrote; after an edit it chains onto what the file holds, as before."""
    await _fill(log, 2)
    lines = _lines(audit_path)
    edited = _rehash({**json.loads(lines[1]), "outcome": "failure"})
    lines[1] = canonical_json(edited) + "\n"
    _write(audit_path, lines)
    record = await log.append("after", outcome="success")
    assert (record.seq, record.prev) == (3, edited["hash"])
    report = await log.verify()
    assert (report.ok, report.first_bad_seq) == (False, 2)


async def test_a_record_of_the_wrong_shape_fails_alone(log: AuditLog, audit_path: Path) -> None:
    """A non-string actor is refused before it is queued, so the records batched with it
    are still written."""
    bad = log.append("x", outcome="success", actor=42)  # type: ignore[arg-type]
    good = log.append("y", outcome="success", actor="a")
    results = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(results[0], ValueError)
    assert isinstance(results[1], AuditRecord) and results[1].seq == 1
    assert [json.loads(line)["event"] for line in _lines(audit_path)] == ["y"]
    assert (await log.verify()).ok
