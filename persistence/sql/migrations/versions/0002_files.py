"""files: attachment metadata per bot (bytes live under data_dir/bots/<bot>/files/)

Revision ID: 0002_files
Revises: 0001_messages
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_files"
down_revision = "0001_messages"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("bot", sa.String(100), nullable=False),
        sa.Column("platform", sa.String(16), nullable=False),
        sa.Column("chat", sa.String(200), nullable=False),
        sa.Column("uploader", sa.String(200), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("mime_type", sa.String(127), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_files_bot_id", "files", ["bot", "id"])
    op.create_index("ix_files_bot_sha256", "files", ["bot", "sha256"])


def downgrade() -> None:
    op.drop_index("ix_files_bot_sha256", table_name="files")
    op.drop_index("ix_files_bot_id", table_name="files")
    op.drop_table("files")
