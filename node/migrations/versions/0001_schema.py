"""casemask's schema: claims with owners, retention marks, node_meta, the writer and the
identity of each received row, the SOP Instance UID conflicts, operators' accounts,
tokens and sessions, the append-only audit trail, the index of similar cases; from an
empty database, or from the previous release's.

The previous release (before migrations: commit a9551c1) made its tables with
``create_all`` and has no ``alembic_version``. This revision makes every table in an
empty database, and in one of that release brings each table to this schema: the
columns and indexes it lacks are added (and only those, so a database made by a
development build in between upgrades too), ``instances.size`` becomes 64-bit and
``pseudonyms.old`` 512 characters. Its rows keep their values; their ``path`` stays
absolute (``node.db.data_path`` honours it) and ``received_by`` is NULL (a row of an
unknown writer, which the start-up clean-up never drops) and ``identity`` empty (a
re-send under its SOP Instance UID counts as the same object, node.scp). The operators'
tables, the audit trail (with the triggers that refuse UPDATE and DELETE on it), the
conflicts and the index of similar cases are made where they are missing.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if inspector.has_table("studies"):
        _from_previous_release(inspector)
    else:
        _create_all()
    _operator_tables(inspector)
    _edge_and_index_tables(inspector)


def downgrade() -> None:
    raise NotImplementedError("casemask's first revision cannot be undone: restore the database's backup instead")


def _create_all() -> None:
    """Every table, in an empty database."""
    op.create_table(
        "node_meta",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "pseudonyms",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("old", sa.String(length=512), nullable=False),
        sa.Column("new", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "old"),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.Enum("RECEIVING", "ROUTED", "DONE", name="studystate", native_enum=False, length=16), nullable=False),
        sa.Column("first_received_at", sa.DateTime(), nullable=False),
        sa.Column("last_received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_uid"),
    )
    op.create_index(op.f("ix_studies_last_received_at"), "studies", ["last_received_at"], unique=False)
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("transfer_syntax", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("called_ae", sa.String(length=16), nullable=False),
        sa.Column("peer_host", sa.String(length=64), nullable=False),
        sa.Column("identity", sa.String(length=32), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("received_by", sa.String(length=80), nullable=True),
        sa.Column("state", sa.Enum("RECEIVED", "ROUTED", "PROCESSED", "QUARANTINED", "HELD", "IGNORED", name="instancestate", native_enum=False, length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("state_changed_at", sa.DateTime(), nullable=True),
        sa.Column("purged_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    op.create_index("ix_instances_state_purged", "instances", ["state", "purged_at"], unique=False)
    op.create_index(op.f("ix_instances_study_id"), "instances", ["study_id"], unique=False)
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("route", sa.String(length=64), nullable=False),
        sa.Column("state", sa.Enum("PENDING", "PROCESSING", "DONE", "QUARANTINED", name="jobstate", native_enum=False, length=16), nullable=False),
        sa.Column("owner", sa.String(length=80), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("deferrals", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"], ),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("instance_id", "route"),
    )
    op.create_index("ix_jobs_state_lease", "jobs", ["state", "lease_until"], unique=False)
    op.create_index(op.f("ix_jobs_study_id"), "jobs", ["study_id"], unique=False)
    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("purged_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "kind"),
    )
    op.create_index(op.f("ix_outputs_job_id"), "outputs", ["job_id"], unique=False)
    op.create_index(op.f("ix_outputs_purged_at"), "outputs", ["purged_at"], unique=False)
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("output_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.Enum("PENDING", "SENDING", "RETRY_WAIT", "SENT", "FAILED", name="deliverystate", native_enum=False, length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("owner", sa.String(length=80), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["output_id"], ["outputs.id"], ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("output_id", "destination"),
    )
    op.create_index(op.f("ix_deliveries_destination"), "deliveries", ["destination"], unique=False)
    op.create_index("ix_deliveries_due", "deliveries", ["state", "next_attempt_at"], unique=False)


def _from_previous_release(inspector: sa.Inspector) -> None:
    """Bring each table of a database made by ``create_all`` to this revision."""

    def columns(table: str) -> set[str]:
        return {c["name"] for c in inspector.get_columns(table)}

    def indexes(table: str) -> set[str]:
        return {i["name"] for i in inspector.get_indexes(table)}

    have = columns("instances")
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("size", existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False)
        for name in ("received_by",):
            if name not in have:
                batch.add_column(sa.Column(name, sa.String(length=80), nullable=True))
        if "identity" not in have:
            batch.add_column(sa.Column("identity", sa.String(length=32), nullable=False, server_default=""))
        for name in ("state_changed_at", "purged_at"):
            if name not in have:
                batch.add_column(sa.Column(name, sa.DateTime(), nullable=True))
    found = indexes("instances")
    if "ix_instances_state" in found:
        op.drop_index("ix_instances_state", table_name="instances")
    if "ix_instances_state_purged" not in found:
        op.create_index("ix_instances_state_purged", "instances", ["state", "purged_at"], unique=False)

    have = columns("jobs")
    with op.batch_alter_table("jobs") as batch:
        if "owner" not in have:
            batch.add_column(sa.Column("owner", sa.String(length=80), nullable=True))
        if "deferrals" not in have:
            batch.add_column(sa.Column("deferrals", sa.Integer(), nullable=False, server_default="0"))
        if "next_attempt_at" not in have:
            batch.add_column(sa.Column("next_attempt_at", sa.DateTime(), nullable=True))

    if "purged_at" not in columns("outputs"):
        with op.batch_alter_table("outputs") as batch:
            batch.add_column(sa.Column("purged_at", sa.DateTime(), nullable=True))
    if "ix_outputs_purged_at" not in indexes("outputs"):
        op.create_index(op.f("ix_outputs_purged_at"), "outputs", ["purged_at"], unique=False)

    if "owner" not in columns("deliveries"):
        with op.batch_alter_table("deliveries") as batch:
            batch.add_column(sa.Column("owner", sa.String(length=80), nullable=True))

    with op.batch_alter_table("pseudonyms") as batch:
        batch.alter_column("old", existing_type=sa.String(length=128), type_=sa.String(length=512), existing_nullable=False)

    if not inspector.has_table("node_meta"):
        op.create_table(
            "node_meta",
            sa.Column("key", sa.String(length=64), nullable=False),
            sa.Column("value", sa.Text(), nullable=False),
            sa.PrimaryKeyConstraint("key"),
        )


def _operator_tables(inspector: sa.Inspector) -> None:
    """Accounts, API tokens, dashboard sessions and the audit trail (node.accounts,
    node.audit), each where it is missing; the audit trail is append-only (triggers)."""
    role = sa.Enum("VIEWER", "OPERATOR", "ADMIN", name="role", native_enum=False, length=16)
    if not inspector.has_table("api_tokens"):
        op.create_table(
            "api_tokens",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("name", sa.String(length=64), nullable=False),
            sa.Column("role", role, nullable=False),
            sa.Column("token_hash", sa.String(length=64), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("revoked_at", sa.DateTime(), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("name"),
            sa.UniqueConstraint("token_hash"),
        )
    if not inspector.has_table("audit_cursors"):
        op.create_table(
            "audit_cursors",
            sa.Column("sink", sa.String(length=64), nullable=False),
            sa.Column("last_id", sa.Integer(), nullable=False),
            sa.PrimaryKeyConstraint("sink"),
        )
    if not inspector.has_table("audit_events"):
        op.create_table(
            "audit_events",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("at", sa.DateTime(), nullable=False),
            sa.Column("event", sa.String(length=32), nullable=False),
            sa.Column("outcome", sa.Integer(), nullable=False),
            sa.Column("actor", sa.String(length=128), nullable=False),
            sa.Column("actor_kind", sa.String(length=16), nullable=False),
            sa.Column("host", sa.String(length=64), nullable=False),
            sa.Column("study_id", sa.Integer(), nullable=True),
            sa.Column("object_kind", sa.String(length=32), nullable=False),
            sa.Column("object_ref", sa.String(length=128), nullable=False),
            sa.Column("detail", sa.Text(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
        op.create_index(op.f("ix_audit_events_at"), "audit_events", ["at"], unique=False)
        op.create_index(op.f("ix_audit_events_event"), "audit_events", ["event"], unique=False)
        op.create_index(op.f("ix_audit_events_study_id"), "audit_events", ["study_id"], unique=False)
        _audit_append_only()
    if not inspector.has_table("users"):
        op.create_table(
            "users",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("name", sa.String(length=64), nullable=False),
            sa.Column("role", role, nullable=False),
            sa.Column("password_hash", sa.Text(), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("disabled", sa.Boolean(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("name"),
        )
    if not inspector.has_table("ui_sessions"):
        op.create_table(
            "ui_sessions",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("token_hash", sa.String(length=64), nullable=False),
            sa.Column("user_id", sa.Integer(), nullable=False),
            sa.Column("csrf", sa.String(length=64), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("expires_at", sa.DateTime(), nullable=False),
            sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("token_hash"),
        )
        op.create_index(op.f("ix_ui_sessions_user_id"), "ui_sessions", ["user_id"], unique=False)


def _edge_and_index_tables(inspector: sa.Inspector) -> None:
    """The SOP Instance UID conflicts (node.scp) and the index of similar cases
    (node.index), each where it is missing."""
    if not inspector.has_table("conflicts"):
        op.create_table(
            "conflicts",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
            sa.Column("calling_ae", sa.String(length=16), nullable=False),
            sa.Column("peer_host", sa.String(length=64), nullable=False),
            sa.Column("received_at", sa.DateTime(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
        op.create_index(op.f("ix_conflicts_sop_instance_uid"), "conflicts", ["sop_instance_uid"], unique=False)
    if not inspector.has_table("index_entries"):
        op.create_table(
            "index_entries",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("output_id", sa.Integer(), nullable=True),
            sa.Column("route", sa.String(length=64), nullable=False),
            sa.Column("frame", sa.Integer(), nullable=False),
            sa.Column("study_uid", sa.String(length=64), nullable=False),
            sa.Column("series_uid", sa.String(length=64), nullable=False),
            sa.Column("sop_uid", sa.String(length=64), nullable=False),
            sa.Column("label", sa.Integer(), nullable=False),
            sa.Column("probabilities", sa.LargeBinary(), nullable=False),
            sa.Column("medical", sa.LargeBinary(), nullable=False),
            sa.Column("model", sa.String(length=64), nullable=False),
            sa.Column("weights", sa.String(length=16), nullable=False),
            sa.Column("destinations", sa.Text(), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.ForeignKeyConstraint(["output_id"], ["outputs.id"]),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("output_id", "frame"),
        )
        op.create_index("ix_index_entries_model", "index_entries", ["model", "weights"], unique=False)
        op.create_index(op.f("ix_index_entries_sop_uid"), "index_entries", ["sop_uid"], unique=False)


def _audit_append_only() -> None:
    """Triggers that make every UPDATE and DELETE of ``audit_events`` fail."""
    if op.get_bind().dialect.name == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END")
    else:
        op.execute("CREATE FUNCTION audit_events_append_only() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$ LANGUAGE plpgsql")
        op.execute("CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()")
