"""Audit index: one row per record of the hash-chained audit files.

Revision ID: 0001
Revises:
Create Date: 2025-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("chain", sa.String(), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(), nullable=False),
        sa.Column("actor", sa.String(), nullable=True),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("record_hash", sa.String(), nullable=False),
        sa.Column("prev_hash", sa.String(), nullable=False),
        sa.Column(
            "data",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("chain", "seq", name="pk_audit_records"),
    )
    op.create_index("ix_audit_records_event_ts", "audit_records", ["event", "ts"])
    op.create_index("ix_audit_records_actor", "audit_records", ["actor"])


def downgrade() -> None:
    op.drop_index("ix_audit_records_actor", table_name="audit_records")
    op.drop_index("ix_audit_records_event_ts", table_name="audit_records")
    op.drop_table("audit_records")
