"""usage.kind: "reply" or "extraction" (background memory work is not a reply)

Revision ID: 0006_usage_kind
Revises: 0005_message_user_name
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_usage_kind"
down_revision = "0005_message_user_name"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows written before this revision cannot be told apart: they stay "reply".
    with op.batch_alter_table("usage") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(16), nullable=False, server_default="reply")
        )


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("kind")
