"""Received instances carry the SHA-256 of their spool file (``instances.digest``): the
C-STORE handler now links the file under its final name before its data is fsynced,
and every reader checks the file against it (docs/ingest.md, "Parallel durability").
Rows already there keep NULL: their files were fsynced before they were linked, and
are not checked.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("digest", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("digest")
