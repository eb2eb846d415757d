"""kill -9 under a burst loses nothing that was acknowledged or shown.

``boternity run`` serves the real python-telegram-bot against the Telegram
fake, with a provider that streams slowly enough for replies to be in flight;
a burst of DMs arrives; once some answers are complete on Telegram the
process is killed with SIGKILL. After a restart of the database:

- every message the model was asked about is stored (the user's message is
  committed before the model is called: the group writer must not delay
  that past the call);
- every answer the user saw complete is stored as the assistant's message.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from sqlalchemy import select

from persistence.sql.database import Database
from persistence.sql.tables import MessageRow
from tests.fakes.openai_server import Text, start_openai_fake
from tests.fakes.telegram_server import start_telegram_fake

ROOT = Path(__file__).resolve().parent.parent
CHATS = 24
ANSWER = ("Noted", " and", " stored", " for", " you.")


async def test_kill_9_under_a_burst_keeps_every_acknowledged_and_shown_message(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    async with start_openai_fake(Text(ANSWER, gap_s=0.05)) as llm, \
            start_telegram_fake() as tg:
        config = tmp_path / "boternity.toml"
        config.write_text(f"""
[storage]
data_dir = "{data}"

[providers.primary]
kind = "openai_compatible"
model = "m"
base_url = "{llm.base_url}"

[bots.demo]
chain = ["primary"]
memory = {{ enabled = false }}

[bots.demo.telegram]
token_env = "TEST_TG_TOKEN"
api_base_url = "{tg.url}"
""", encoding="utf-8")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "adapters.cli", "--config", str(config), "--env-file", "",
            "run", env={**os.environ, "TEST_TG_TOKEN": tg.token}, cwd=str(ROOT),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await tg.wait_for(lambda: tg.commands is not None, limit_s=60)
            for n in range(CHATS):
                tg.push_message(1000 + n, f"question {n}", user_id=1000 + n)

            def complete() -> list[int]:
                return [n for n in range(CHATS)
                        if any(m.text == "".join(ANSWER) for m in tg.in_chat(1000 + n))]

            # Kill while some replies are done and others are still streaming.
            await tg.wait_for(lambda: len(complete()) >= CHATS // 3, limit_s=120)
            proc.kill()
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        shown = complete()
        asked = {r.body["messages"][-1]["content"] for r in llm.requests}

    async with Database(f"sqlite+aiosqlite:///{data / 'boternity.db'}") as db, \
            db.engine.connect() as connection:
        rows = (await connection.execute(select(MessageRow.role, MessageRow.content))).all()
    users = {content for role, content in rows if role == "user"}
    answers = [content for role, content in rows if role == "assistant"]

    assert shown and asked, "the burst never reached the model"
    missing_users = sorted(text for text in asked if not any(text in u for u in users))
    assert missing_users == [], f"asked the model about unstored messages: {missing_users}"
    assert len(answers) >= len(shown), (
        f"{len(shown)} answers were shown complete, {len(answers)} stored")
    assert all(a == "".join(ANSWER) for a in answers)
