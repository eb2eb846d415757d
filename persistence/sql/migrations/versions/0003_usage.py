"""usage: tokens and cost per served reply

Revision ID: 0003_usage
Revises: 0002_files
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_usage"
down_revision = "0002_files"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("bot", sa.String(100), nullable=False),
        sa.Column("user", sa.String(200), nullable=False, server_default=""),
        sa.Column("chat", sa.String(200), nullable=False, server_default=""),
        sa.Column("platform", sa.String(16), nullable=False, server_default=""),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=False, server_default=""),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("estimated", sa.Boolean(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
    )
    op.create_index("ix_usage_day_bot", "usage", ["day", "bot"])
    op.create_index("ix_usage_bot_day_user", "usage", ["bot", "day", "user"])


def downgrade() -> None:
    op.drop_index("ix_usage_bot_day_user", table_name="usage")
    op.drop_index("ix_usage_day_bot", table_name="usage")
    op.drop_table("usage")
