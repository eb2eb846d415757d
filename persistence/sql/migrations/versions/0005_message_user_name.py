"""messages.user_name: the speaker's display name (group history says who spoke)

Revision ID: 0005_message_user_name
Revises: 0004_recall_log
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_message_user_name"
down_revision = "0004_recall_log"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER most things in place (a no-op wrapper elsewhere)
    with op.batch_alter_table("messages") as batch:
        batch.add_column(
            sa.Column("user_name", sa.String(200), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("user_name")
