"""Studies carry the keyed hash of their first object's patient (``studies.patient_key``):
an object of another patient sent under the same Study Instance UID is quarantined
instead of joining that study (node.queue.join_study). Studies already there keep NULL:
the first object routed into them from now on sets it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("studies", sa.Column("patient_key", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("patient_key")
