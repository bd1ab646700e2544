"""The audit trail gets a retention (``[retention] audit_days``, node.retention): its
DELETE trigger now refuses only entries younger than 365 days (AUDIT_MIN_DAYS in
node.config), measured with the database's own clock, so that neither a setting nor a
hand-written statement can delete the recent trail. UPDATE is still refused always.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_MIN_DAYS = 365  # node.config.AUDIT_MIN_DAYS, written out: a revision never changes


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
        op.execute(
            "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events "
            f"WHEN OLD.at > datetime('now', '-{_MIN_DAYS} days') "
            "BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END"
        )
    else:
        op.execute(
            "CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger AS $$ BEGIN "
            f"IF TG_OP = 'UPDATE' OR OLD.at > (now() AT TIME ZONE 'UTC') - interval '{_MIN_DAYS} days' THEN "
            "RAISE EXCEPTION 'the audit trail is append-only'; END IF; RETURN OLD; END $$ LANGUAGE plpgsql"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
        op.execute("CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END")
    else:
        op.execute("CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$ LANGUAGE plpgsql")
