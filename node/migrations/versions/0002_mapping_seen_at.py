"""The pseudonym mapping gets an age: ``pseudonyms.seen_at`` (when a mapping was written
or last met again), indexed, so that retention deletes rows ``[retention] mapping_days``
after it (node.retention). Rows already there are given the time of the upgrade: they
are kept ``mapping_days`` from now, never deleted by the upgrade itself.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("pseudonyms", sa.Column("seen_at", sa.DateTime(), nullable=True))
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)  # the columns hold naive UTC (node.db.utcnow)
    op.execute(sa.text("UPDATE pseudonyms SET seen_at = :now WHERE seen_at IS NULL").bindparams(now=now))
    op.create_index(op.f("ix_pseudonyms_seen_at"), "pseudonyms", ["seen_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_pseudonyms_seen_at"), table_name="pseudonyms")
    op.drop_column("pseudonyms", "seen_at")
