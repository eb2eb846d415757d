"""Model text never pings anyone: on Slack ``&``, ``<``, ``>`` in what the model
wrote are escaped, so ``<!channel>``, ``<!subteam^...>`` and ``<@U...>`` arrive
as text; on Discord every post and edit carries an empty ``allowed_mentions``.
Each runs the real SDK (slack-bolt, discord.py) against its fake.
"""

from __future__ import annotations

import asyncio

from adapters.chat.render import to_slack
from engine.types import Reply
from tests.conftest import BotPipeline
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.openai_server import Text
from tests.fakes.slack_server import FakeSlack
from tests.test_discord import (
    C1,
    discord_fake,  # noqa: F401  (fixture)
)
from tests.test_discord import adapter as discord_adapter
from tests.test_slack import adapter as slack_adapter
from tests.test_slack import message_event, slack_fake  # noqa: F401  (fixture)

PINGS = ("Hey <!channel> and <!here>, <!everyone>! Ask <!subteam^S0123|@oncall> "
         "or <@U0BOSS01>; see <#C0SECRET> & **mind** a < b > c. "
         "Also `<!here>` in code and [a link](https://example.com/?a=1&b=2).")


async def test_slack_model_text_pings_nobody(
    slack_fake: FakeSlack, bot_pipeline: BotPipeline  # noqa: F811
) -> None:
    bot_pipeline.fake.script(Text((PINGS[:40], PINGS[40:])))
    async with slack_adapter(slack_fake, bot_pipeline):
        await slack_fake.push("events_api", message_event("D1", "say hi to all", im=True))
        await asyncio.wait_for(bot_pipeline.replied.wait(), 30)
        reply = bot_pipeline.replies[0]
        assert isinstance(reply, Reply)
        await slack_fake.wait_for(lambda: any(
            "example.com" in m.text for m in slack_fake.in_channel("D1")))
    [shown] = slack_fake.in_channel("D1")
    for text in shown.texts:  # the first post and every edit
        for sequence in ("<!", "<@", "<#"):
            assert sequence not in text, text
    final = shown.text
    assert "&lt;!channel&gt;" in final and "subteam^S0123" in final
    assert "&lt;@U0BOSS01&gt;" in final and "a &lt; b &gt; c" in final
    assert " &amp; " in final and "*mind*" in final  # still mrkdwn
    assert "<https://example.com/?a=1&amp;b=2|a link>" in final  # links stay links


def test_slack_rendering_escapes_even_when_the_converter_fails() -> None:
    # An unclosed fence, a lone '<': whatever path the text takes, no control sequence.
    for text in ("<!channel>", "```\n<!here>", "<@U1|x>", "&<>", "<<!channel>>"):
        rendered = to_slack(text)
        assert "<!" not in rendered and "<@" not in rendered, rendered


async def test_discord_every_post_and_edit_allows_no_mentions(
    discord_fake: FakeDiscord, bot_pipeline: BotPipeline  # noqa: F811
) -> None:
    # Words that never repeat: the chain stops an answer that loops.
    long = "@everyone @here <@510000000000000001> <@&610000000000000001> " + " ".join(
        f"word{i}" for i in range(700))
    bot_pipeline.fake.script(Text((long[:900], long[900:])))
    async with discord_adapter(discord_fake, bot_pipeline):
        await discord_fake.message_create(channel_id=C1, content="<@900000000000000001> ping",
                                          mention_bot=True)
        await asyncio.wait_for(bot_pipeline.replied.wait(), 30)
        reply = bot_pipeline.replies[0]
        assert isinstance(reply, Reply)
        await discord_fake.wait_for(lambda: reply.footer in "".join(
            m.text for m in discord_fake.in_channel(C1)))
    writes = [body for method, path, body in discord_fake.requests
              if method in ("POST", "PATCH") and path.startswith(f"channels/{C1}/messages")]
    assert len(writes) >= 3  # a post, edits, a second part
    for body in writes:  # parse nothing, list nobody: no @everyone, role or user ping
        mentions = body["allowed_mentions"]
        assert mentions["parse"] == [] and not mentions.get("users") \
            and not mentions.get("roles") and not mentions.get("replied_user"), body
