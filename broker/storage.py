"""SQL storage: the async engine, the ORM models and the Alembic migrations that create them.

SQLite (the embedded default) and PostgreSQL (the scale-out target) are both supported. Tables
are created only by migrations in `broker/migrations/versions/` (never by `create_all`), so a
schema change is one new migration file plus the model change here; see `alembic_config`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Dialect, make_url
from sqlalchemy.exc import ArgumentError, InvalidRequestError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.types import TypeDecorator

from broker.errors import ConfigurationError, UpstreamFailed

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# SQLite waits this long for another process's write lock before failing with "database is
# locked"; replicas sharing one file take turns rather than erroring.
SQLITE_BUSY_TIMEOUT_MS = 15_000

# Any constant works; it only has to be the same in every replica so that two replicas starting
# at once run the migrations one after the other.
_PG_MIGRATION_LOCK_ID = 0x62726F6B6572  # "broker"


def normalise_url(url: str) -> str:
    """Return `url` with the async driver the broker uses.

    `sqlite://…` becomes `sqlite+aiosqlite://…` and `postgresql://…` (or `postgres://…`) becomes
    `postgresql+asyncpg://…`; a URL that already names a driver is returned unchanged.
    """
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def _redacted(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no timezone type and hands back naive values; this stores UTC and reattaches
    `UTC` on the way out, and refuses naive datetimes on the way in rather than guess their zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; pass a timezone-aware value")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSONB on PostgreSQL so later queries can index into `data`; plain JSON (text) elsewhere.
JsonDocument = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    """Declarative base of every broker table.

    The naming convention gives constraints stable names, which Alembic needs to alter them on
    SQLite (batch mode) and which migrations spell out explicitly.
    """

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class AuditIndex(Base):
    """One audit record as indexed in SQL; the JSON-lines file stays the record of truth."""

    __tablename__ = "audit_records"
    __table_args__ = (
        Index("ix_audit_records_event_ts", "event", "ts"),
        Index("ix_audit_records_actor", "actor"),
    )

    chain: Mapped[str] = mapped_column(String, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[datetime] = mapped_column(UtcDateTime)
    event: Mapped[str] = mapped_column(String)
    actor: Mapped[str | None] = mapped_column(String, nullable=True)
    outcome: Mapped[str] = mapped_column(String)
    record_hash: Mapped[str] = mapped_column(String)
    prev_hash: Mapped[str] = mapped_column(String)
    data: Mapped[dict[str, Any]] = mapped_column(JsonDocument)


class OAuthClientRecord(Base):
    """An OAuth client registered through the admin API (settings clients are not stored)."""

    __tablename__ = "oauth_clients"

    client_id: Mapped[str] = mapped_column(String, primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(JsonDocument)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    created_by: Mapped[str] = mapped_column(String)


class RefreshTokenRecord(Base):
    """One refresh token, by the SHA-256 of its value. Rotation links tokens in a family."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (Index("ix_refresh_tokens_family", "family_id"),)

    token_hash: Mapped[str] = mapped_column(String, primary_key=True)
    family_id: Mapped[str] = mapped_column(String)
    client_id: Mapped[str] = mapped_column(String)
    subject: Mapped[str] = mapped_column(String)
    grant: Mapped[dict[str, Any]] = mapped_column(JsonDocument)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class ConsentRecord(Base):
    """Scopes a user let a (third-party) client have; revocable from the consents page."""

    __tablename__ = "consents"

    principal_id: Mapped[str] = mapped_column(String, primary_key=True)
    client_id: Mapped[str] = mapped_column(String, primary_key=True)
    scopes: Mapped[list[str]] = mapped_column(JsonDocument)
    granted_at: Mapped[datetime] = mapped_column(UtcDateTime)


class PrincipalRecord(Base):
    """The last known profile of a principal (for userinfo); no upstream tokens."""

    __tablename__ = "principals"

    id: Mapped[str] = mapped_column(String, primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(JsonDocument)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class LeaseRecord(Base):
    """A downstream credential the broker issued: who, for whom, until when, and the backend's
    non-secret handle for revoking it. The credential itself is never stored."""

    __tablename__ = "leases"

    lease_id: Mapped[str] = mapped_column(String, primary_key=True)
    principal_id: Mapped[str] = mapped_column(String)
    client_id: Mapped[str | None] = mapped_column(String, nullable=True)
    backend: Mapped[str] = mapped_column(String)
    kind: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    cleaned_up: Mapped[bool] = mapped_column(Boolean, default=False)
    handle: Mapped[dict[str, Any]] = mapped_column(JsonDocument)
    details: Mapped[dict[str, Any]] = mapped_column(JsonDocument)


class GrantRecord(Base):
    """A reviewer grant on one repo. The capability secret in its link is stored only as a
    SHA-256 hash; `uses` counts redemptions against `max_uses`."""

    __tablename__ = "grants"

    id: Mapped[str] = mapped_column(String, primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String, unique=True)
    repo: Mapped[str] = mapped_column(String, index=True)  # "backend/owner/name"
    commit: Mapped[str | None] = mapped_column(String, nullable=True)  # the pinned commit
    ref: Mapped[str | None] = mapped_column(String, nullable=True)  # a branch or tag to show
    created_by: Mapped[str] = mapped_column(String)  # principal id of the author or editor
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    # "email" | "orcid" | "any-signed-in" | "anonymous"; `reviewer` the email or ORCID iD
    reviewer_kind: Mapped[str] = mapped_column(String)
    reviewer: Mapped[str | None] = mapped_column(String, nullable=True)
    note: Mapped[str] = mapped_column(String, default="")
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String, nullable=True)


class RedemptionRecord(Base):
    """One redemption of a grant: who (a real principal id, or a pseudonymous one), under
    which pseudonym the author sees them, and the token it yielded (by jti)."""

    __tablename__ = "grant_redemptions"

    id: Mapped[str] = mapped_column(String, primary_key=True)
    grant_id: Mapped[str] = mapped_column(String, index=True)
    principal_id: Mapped[str] = mapped_column(String)
    pseudonym: Mapped[str] = mapped_column(String)
    signed_in: Mapped[bool] = mapped_column(Boolean)
    display: Mapped[str] = mapped_column(String, default="")  # name/email, for editors only
    token_jti: Mapped[str] = mapped_column(String)
    redeemed_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


def alembic_config(url: str | None = None) -> Config:
    """An Alembic `Config` for `broker/migrations`, built in code (there is no alembic.ini).

    For writing a migration by hand, e.g.::

        from alembic import command
        command.revision(alembic_config(), "oauth clients", rev_id="0002")

    `url` is only needed for Alembic's offline (`--sql`) mode; `Database.upgrade` hands the
    migrations a live connection instead.
    """
    from alembic.config import Config  # only migrations need Alembic (~11 MB): import late

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser treats % as interpolation; a URL-encoded password may contain one.
        cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def _run_migrations(connection: Connection) -> None:
    from alembic import command

    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


class Database:
    """The broker's SQL database: one async engine and a session factory.

    On SQLite the database runs in WAL mode with a busy timeout, and every transaction starts
    with `BEGIN IMMEDIATE`, so several processes can share the file: writers queue for the lock
    instead of failing, and a transaction that reads and then writes cannot be invalidated
    half-way (SQLite cannot upgrade a stale read lock, and fails at once when asked to).
    """

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        self.ping_timeout = 5.0
        self._display_url = _redacted(self.url)
        try:
            backend = make_url(self.url).get_backend_name()
            self.engine: AsyncEngine = create_async_engine(
                self.url, pool_pre_ping=backend != "sqlite"
            )
        except (ArgumentError, InvalidRequestError, ImportError) as exc:
            raise ConfigurationError(
                f"unsupported database URL {self._display_url}: use sqlite:///PATH or "
                "postgresql://USER@HOST/DB",
                log_detail=type(exc).__name__,
            ) from None
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine.sync_engine)
        self._blocking: Engine | None = None
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )
        # For transactions that only read: on SQLite they begin DEFERRED and so never queue
        # for the write lock (a write in one fails instead of waiting: use `sessions` there).
        self.reads: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine.execution_options(broker_read_only=True), expire_on_commit=False
        )

    def __repr__(self) -> str:
        return f"Database({self._display_url!r})"

    async def upgrade(self) -> None:
        """Apply every pending migration, up to head. Safe to call again, and from replicas
        starting at the same time (they take turns)."""
        async with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                # Held until commit: a second replica waits here, then finds nothing to do.
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_MIGRATION_LOCK_ID}
                )
            # SQLite needs no lock here: BEGIN IMMEDIATE already serialises the migrations.
            await conn.run_sync(_run_migrations)

    async def ping(self) -> None:
        """Run `SELECT 1`; raise `UpstreamFailed` if the database does not answer within
        `ping_timeout` seconds.

        Messages carry the URL with its password masked, never the password.
        """
        try:
            async with asyncio.timeout(self.ping_timeout), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            detail = f"{self._display_url}: {type(exc).__name__}: {exc}"
            password = make_url(self.url).password
            if password:
                detail = detail.replace(str(password), "***")
            raise UpstreamFailed("the SQL database is unreachable", log_detail=detail) from None

    def blocking_engine(self) -> Engine | None:
        """On SQLite, a synchronous engine on the same file, configured like `engine` (WAL,
        busy timeout, `BEGIN IMMEDIATE`), for code that already runs in a worker thread and
        would otherwise hop back to the event loop and out to aiosqlite's thread for every
        statement (the audit writer). None on other databases. Never use it on the loop."""
        if self.dialect != "sqlite":
            return None
        if self._blocking is None:
            url = make_url(self.url).set(drivername="sqlite+pysqlite")
            self._blocking = create_engine(url)
            _configure_sqlite(self._blocking)
        return self._blocking

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()
        if self._blocking is not None:
            self._blocking.dispose()
            self._blocking = None


def _switch_to_wal(cursor: Any) -> None:
    """`PRAGMA journal_mode = WAL`, retried for up to the busy timeout: SQLite answers "database
    is locked" at once, without its busy handler, when another connection is switching the same
    new file to WAL (replicas starting together)."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # in the driver's own thread, never on the event loop


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Stop the sqlite3 driver from issuing its own (deferred, DML-only) BEGIN; `_on_begin`
        # below takes over, which also makes DDL transactional for migrations.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            _switch_to_wal(cursor)
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get("broker_read_only", False)
        conn.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")
