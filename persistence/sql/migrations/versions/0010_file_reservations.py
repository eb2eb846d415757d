"""file_reservations: bytes an upload in progress holds against its bot's cap

Revision ID: 0010_file_reservations
Revises: 0009_chain_head
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_file_reservations"
down_revision = "0009_chain_head"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "file_reservations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("bot", sa.String(100), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_file_reservations_bot", "file_reservations", ["bot"])


def downgrade() -> None:
    op.drop_index("ix_file_reservations_bot", table_name="file_reservations")
    op.drop_table("file_reservations")
