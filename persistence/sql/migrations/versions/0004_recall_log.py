"""recall_log: which memories the last reply in each (bot, chat) recalled

Revision ID: 0004_recall_log
Revises: 0003_usage
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_recall_log"
down_revision = "0003_usage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recall_log",
        sa.Column("bot", sa.String(100), primary_key=True),
        sa.Column("chat", sa.String(200), primary_key=True),
        sa.Column("message_id", sa.String(200), nullable=False, server_default=""),
        sa.Column("query", sa.Text(), nullable=False, server_default=""),
        sa.Column("facts", sa.Text(), nullable=False, server_default="[]"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_recall_log_bot_created", "recall_log", ["bot", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_recall_log_bot_created", table_name="recall_log")
    op.drop_table("recall_log")
