"""messages: conversation history per (bot, chat)

Revision ID: 0001_messages
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_messages"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("bot", sa.String(100), nullable=False),
        sa.Column("chat", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("user", sa.String(200), nullable=False, server_default=""),
        sa.Column("platform", sa.String(16), nullable=False, server_default=""),
        sa.Column("served_by", sa.String(100), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_messages_bot_chat_id", "messages", ["bot", "chat", "id"])


def downgrade() -> None:
    op.drop_index("ix_messages_bot_chat_id", table_name="messages")
    op.drop_table("messages")
