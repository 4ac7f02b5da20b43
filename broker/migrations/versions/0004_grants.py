"""Reviewer grants and their redemptions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "grants",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("secret_hash", sa.String(), nullable=False),
        sa.Column("repo", sa.String(), nullable=False),
        sa.Column("commit", sa.String(), nullable=True),
        sa.Column("ref", sa.String(), nullable=True),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("reviewer_kind", sa.String(), nullable=False),
        sa.Column("reviewer", sa.String(), nullable=True),
        sa.Column("note", sa.String(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_grants"),
        sa.UniqueConstraint("secret_hash", name="uq_grants_secret_hash"),
    )
    op.create_index("ix_grants_repo", "grants", ["repo"])
    op.create_table(
        "grant_redemptions",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("grant_id", sa.String(), nullable=False),
        sa.Column("principal_id", sa.String(), nullable=False),
        sa.Column("pseudonym", sa.String(), nullable=False),
        sa.Column("signed_in", sa.Boolean(), nullable=False),
        sa.Column("display", sa.String(), nullable=False),
        sa.Column("token_jti", sa.String(), nullable=False),
        sa.Column("redeemed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_grant_redemptions"),
    )
    op.create_index("ix_grant_redemptions_grant_id", "grant_redemptions", ["grant_id"])


def downgrade() -> None:
    op.drop_index("ix_grant_redemptions_grant_id", table_name="grant_redemptions")
    op.drop_table("grant_redemptions")
    op.drop_index("ix_grants_repo", table_name="grants")
    op.drop_table("grants")
