"""chain_heads: the shared memory's hash-chain head, kept outside LanceDB

Revision ID: 0009_chain_head
Revises: 0007_keys
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_chain_head"
down_revision = "0007_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # No row yet: the shared table's first writer under this revision
    # migrates the old chain (re-hashed with the vectors) and records its head.
    op.create_table(
        "chain_heads",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("pending_seq", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("pending_hash", sa.String(64), nullable=False, server_default=""),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("chain_heads")
