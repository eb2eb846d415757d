"""Where a memory stored before facts had a chat was learned (for ``persistence/vectors/rekey.py``).

Learning runs in the background seconds after a reply, so the conversation
a learned fact came from is the one the speaker wrote in just before it was
stored. ``learned_in`` answers from the history:

- no user message to the bot in the ``window`` before, while the history
  goes back that far: no conversation was going on, so it is an admin's fact
  (``memory add``, an import): bot-wide, "";
- one chat: that chat. A chat where only one person ever wrote is taken as
  their DM, and a general fact from it becomes theirs (what one says in
  private stays theirs);
- several chats (busy bot), or no history of the bot from before the fact
  (deleted, or never kept): it cannot be told, so ``UNKNOWN``, a chat that is no
  chat: a person's fact is then recalled in their DMs only, a general fact
  nowhere until an admin promotes it (the safe choice).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from persistence.sql.database import Database
from persistence.sql.tables import MessageRow

UNKNOWN = "?unknown"
# Extraction runs seconds after the reply; a busy queue may take a minute or two.
WINDOW = timedelta(minutes=3)


def _naive_utc(moment: datetime) -> datetime:
    # SQLite stores naive UTC; PostgreSQL compares aware values correctly either way.
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


async def learned_in(database: Database, bot: str, user: str, at: datetime, *,
                     window: timedelta = WINDOW) -> tuple[str, str]:
    """(user, chat) for a fact about ``user`` ("" = general) stored at ``at``."""
    moment = at if database.dialect == "postgresql" else _naive_utc(at)
    start = moment - window
    query = select(MessageRow.platform, MessageRow.chat).distinct().where(
        MessageRow.bot == bot, MessageRow.role == "user",
        MessageRow.created_at >= start, MessageRow.created_at <= moment)
    if user:
        query = query.where(MessageRow.user == user)
    async with database.sessions() as session:
        found = (await session.execute(query)).all()
        # A Slack thread (channel/thread) belongs to its channel, as the policy places it.
        chats = {chat.partition("/")[0] if platform == "slack" else chat
                 for platform, chat in found}
        if not chats:
            older = await session.scalar(select(MessageRow.id).where(
                MessageRow.bot == bot, MessageRow.created_at <= moment).limit(1))
            return user, "" if older is not None else UNKNOWN
        if len(chats) > 1:
            return user, UNKNOWN
        [chat] = chats
        speakers = list((await session.scalars(
            select(MessageRow.user).distinct().where(
                MessageRow.bot == bot, MessageRow.role == "user", MessageRow.user != "",
                (MessageRow.chat == chat) | MessageRow.chat.startswith(chat + "/", autoescape=True),
            ).limit(2))).all())
    if not user and len(speakers) == 1:
        return speakers[0], chat  # a DM: even its general facts are that person's
    return user, chat
