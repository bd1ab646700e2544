"""Alembic's environment for casemask: migrations run on the connection that
:mod:`node.schema` hands over (in its transaction, under its lock); there is no
``alembic.ini`` and no offline mode."""

from alembic import context

from node.db import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached by a bare `alembic` call
    raise RuntimeError("casemask's migrations run through `casemask db upgrade` (node.schema), which passes the connection")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
