"""Alembic environment for the broker's schema.

`broker.storage.Database.upgrade` runs this with a live connection in
`config.attributes["connection"]`, already inside a transaction it owns. Without one (offline
`--sql` mode, given `sqlalchemy.url`), the migrations are rendered as SQL instead.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from broker.storage import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead, so a
        # later migration written with `op.batch_alter_table` runs on both backends.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("offline migrations need sqlalchemy.url (see broker.storage)")
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "run migrations through broker.storage.Database.upgrade, which supplies a connection"
        )
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
