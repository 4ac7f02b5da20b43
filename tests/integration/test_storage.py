"""SQL storage against real SQLite files and the real PostgreSQL server (fixtures in
tests/peers/sql_cache.py): migrations, time zones, SQLite multi-process settings, ping."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text

from broker.errors import ConfigurationError, UpstreamFailed
from broker.storage import AuditIndex, Database, alembic_config, normalise_url

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param("sqlite:///broker.db", "sqlite+aiosqlite:///broker.db", id="sqlite-rel"),
        pytest.param("sqlite:////var/b.db", "sqlite+aiosqlite:////var/b.db", id="sqlite-abs"),
        pytest.param("postgresql://u:p@h:5/d", "postgresql+asyncpg://u:p@h:5/d", id="postgresql"),
        pytest.param("postgres://u@h/d", "postgresql+asyncpg://u@h/d", id="postgres-alias"),
        pytest.param("postgresql+asyncpg://h/d", "postgresql+asyncpg://h/d", id="driver-kept"),
        pytest.param("sqlite+aiosqlite:///x", "sqlite+aiosqlite:///x", id="sqlite-driver-kept"),
    ],
)
def test_normalise_url(given: str, expected: str) -> None:
    assert normalise_url(given) == expected


async def _schema(db: Database) -> dict[str, object]:
    async with db.engine.connect() as conn:

        def read(sync_conn: object) -> dict[str, object]:
            insp = inspect(sync_conn)
            return {
                "tables": set(insp.get_table_names()),
                "columns": {c["name"] for c in insp.get_columns("audit_records")},
                "pk": insp.get_pk_constraint("audit_records")["constrained_columns"],
                "indexes": {
                    i["name"]: i["column_names"] for i in insp.get_indexes("audit_records")
                },
            }

        schema = await conn.run_sync(read)
        versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
        schema["versions"] = [v for (v,) in versions]
        return schema


async def test_upgrade_creates_the_schema_and_is_idempotent(database: Database) -> None:
    first = await _schema(database)
    assert {"audit_records", "alembic_version"} <= first["tables"]  # type: ignore[operator]
    assert first["columns"] == {
        "chain", "seq", "ts", "event", "actor", "outcome", "record_hash", "prev_hash", "data",
    }  # fmt: skip
    assert first["pk"] == ["chain", "seq"]
    assert first["indexes"] == {
        "ix_audit_records_event_ts": ["event", "ts"],
        "ix_audit_records_actor": ["actor"],
    }
    assert first["versions"] == [HEAD]

    async with database.sessions() as session, session.begin():
        session.add(_row(seq=1))
    await database.upgrade()
    await database.upgrade()

    assert await _schema(database) == first
    async with database.sessions() as session:
        kept = (await session.execute(select(AuditIndex.seq))).scalars().all()
    assert kept == [1], "re-running migrations must not touch existing rows"


async def test_replicas_upgrading_at_once_take_turns(database_url: str) -> None:
    replicas = [Database(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(db.upgrade() for db in replicas))
        schema = await _schema(replicas[0])
    finally:
        for db in replicas:
            await db.close()
    assert "audit_records" in schema["tables"]  # type: ignore[operator]
    assert schema["versions"] == [HEAD]


def _row(seq: int, ts: datetime | None = None) -> AuditIndex:
    return AuditIndex(
        chain="storage-test",
        seq=seq,
        ts=ts or datetime.now(UTC),
        event="test.event",
        actor=None,
        outcome="success",
        record_hash="a" * 64,
        prev_hash="0" * 64,
        data={"nested": {"list": [1, 2.5, None, True]}, "text": "ünïcode"},
    )


async def test_rows_round_trip_with_timezone_aware_utc(database: Database) -> None:
    plus_two = timezone(timedelta(hours=2))
    written = datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=plus_two)
    async with database.sessions() as session, session.begin():
        session.add(_row(seq=7, ts=written))
    async with database.sessions() as session:
        row = (await session.execute(select(AuditIndex))).scalar_one()
    assert row.ts == written
    assert row.ts.utcoffset() == timedelta(0)
    assert row.data == {"nested": {"list": [1, 2.5, None, True]}, "text": "ünïcode"}
    assert row.actor is None


async def test_naive_datetimes_are_refused(database: Database) -> None:
    with pytest.raises(Exception, match="naive datetime"):
        async with database.sessions() as session, session.begin():
            session.add(_row(seq=1, ts=datetime(2025, 1, 1)))
    async with database.sessions() as session:
        assert (await session.execute(select(AuditIndex))).first() is None


async def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'wal.db'}")
    try:
        async with db.engine.connect() as conn:
            mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
            timeout = (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one()
    finally:
        await db.close()
    assert mode == "wal"
    assert timeout >= 5000


async def test_ping_succeeds_on_a_live_database(database: Database) -> None:
    await database.ping()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("postgresql://broker:hunter2-secret@127.0.0.1:1/broker", id="postgres"),
        pytest.param("sqlite:////nonexistent-dir/x.db", id="sqlite"),
    ],
)
async def test_ping_fails_with_upstream_failed_and_no_password(url: str) -> None:
    db = Database(url)
    try:
        with pytest.raises(UpstreamFailed) as caught:
            await db.ping()
    finally:
        await db.close()
    err = caught.value
    assert err.description == "the SQL database is unreachable"
    assert err.status == 503
    assert err.log_detail, "operators need the cause in the log"
    if "postgresql" in url:
        for text_ in (str(err), err.description, err.log_detail, repr(db)):
            assert "hunter2" not in text_


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("mysql://u:hunter2@h/db", id="mysql"),
        pytest.param("http://example.org/", id="http"),
    ],
)
def test_unsupported_database_urls_are_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="unsupported database URL") as caught:
        Database(url)
    assert "hunter2" not in str(caught.value)
