"""user keys are platform:id everywhere; history is keyed by (bot, platform, chat)

Revision ID: 0007_keys
Revises: 0006_usage_kind

- ``recall_log.facts``: users stored twice-prefixed (``telegram:telegram:7``,
  the memory policy prefixed the adapters' key again) become ``telegram:7``.
- ``messages`` and ``usage`` rows of the terminal stored the bare name
  (``local``): they become ``terminal:local``, like every other platform.
- ``messages.platform``: rows written without it get it from their user key,
  and the history index leads with (bot, platform, chat): a Telegram chat and
  a Discord channel with the same id are two conversations.
The code is frozen here (no import from the application): a migration must
keep meaning what it meant when it was written.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0007_keys"
down_revision = "0006_usage_kind"
branch_labels = None
depends_on = None

PLATFORMS = ("telegram", "slack", "discord", "terminal")

messages = sa.table("messages", sa.column("user", sa.String), sa.column("platform", sa.String))
usage = sa.table("usage", sa.column("user", sa.String), sa.column("platform", sa.String))
recall_log = sa.table("recall_log", sa.column("bot", sa.String), sa.column("chat", sa.String),
                      sa.column("facts", sa.Text))


def normalize(key: str) -> str:
    """``telegram:telegram:7`` -> ``telegram:7``; anything else unchanged."""
    platform, sep, rest = key.partition(":")
    if not sep or platform not in PLATFORMS:
        return key
    while rest.startswith(platform + ":"):
        rest = rest[len(platform) + 1:]
    return f"{platform}:{rest}"


def upgrade() -> None:
    bind = op.get_bind()
    for table in (messages, usage):
        bind.execute(
            table.update()
            .where(table.c.platform == "terminal", table.c.user != "",
                   ~table.c.user.like("terminal:%"))
            .values(user=sa.literal("terminal:") + table.c.user))
    for platform in PLATFORMS:
        bind.execute(messages.update()
                     .where(messages.c.platform == "", messages.c.user.like(f"{platform}:%"))
                     .values(platform=platform))
    for bot, chat, facts in bind.execute(sa.select(recall_log)).all():
        try:
            recalled = json.loads(facts or "[]")
        except ValueError:
            continue
        changed = False
        for fact in recalled if isinstance(recalled, list) else []:
            if isinstance(fact, dict) and isinstance(fact.get("user"), str):
                key = normalize(fact["user"])
                changed |= key != fact["user"]
                fact["user"] = key
        if changed:
            bind.execute(recall_log.update()
                         .where(recall_log.c.bot == bot, recall_log.c.chat == chat)
                         .values(facts=json.dumps(recalled, ensure_ascii=False)))
    op.drop_index("ix_messages_bot_chat_id", table_name="messages")
    op.create_index("ix_messages_bot_platform_chat_id", "messages",
                    ["bot", "platform", "chat", "id"])


def downgrade() -> None:
    # The keys stay rewritten (the old twice-prefixed form was a bug).
    op.drop_index("ix_messages_bot_platform_chat_id", table_name="messages")
    op.create_index("ix_messages_bot_chat_id", "messages", ["bot", "chat", "id"])
