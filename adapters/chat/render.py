"""Render the engine's Markdown the way each platform expects.

- Telegram: plain text plus ``MessageEntity`` objects (telegramify-markdown,
  MIT). Entities, unlike MarkdownV2, cannot fail to parse, so a half-streamed
  ``**bold`` never makes Telegram reject an edit.
- Slack: mrkdwn (slackify-markdown, MIT), then every ``<``, ``>`` and bare
  ``&`` the model wrote is escaped: Slack reads ``<!channel>``, ``<!here>``,
  ``<!subteam^...>``, ``<@U...>`` and ``<#C...>`` as pings, and the converter
  passes them through as inline HTML (it even decodes ``&lt;`` into them).
  Only the ``<URL|label>`` links the converter made stay markup.
- Discord: its own Markdown dialect already; sent as is.

Rendering is pure and never raises: on a converter bug the source text is
shown as plain text.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import telegramify_markdown
from slackify_markdown import slackify_markdown

log = logging.getLogger(__name__)

# A link as slackify writes it: <http(s)://...|label> or <mailto:...>; nothing nested.
_SLACK_LINK = re.compile(r"<(?:https?://|mailto:)[^<>|\s]+(?:\|[^<>]*)?>")
_SLACK_BARE_AMP = re.compile(r"&(?!(?:amp|lt|gt);)")


def to_telegram(markdown: str) -> tuple[str, list[dict[str, Any]]]:
    """Markdown -> (text, entities as Bot API dicts)."""
    try:
        text, entities = telegramify_markdown.convert(markdown)
    except Exception:
        log.warning("telegram rendering failed; sending plain text", exc_info=True)
        return markdown, []
    if not text.strip():
        return markdown, []
    return text, [entity.to_dict() for entity in entities]


def to_slack(markdown: str) -> str:
    """Markdown -> Slack mrkdwn in which nothing but a link is markup (no pings)."""
    try:
        text = slackify_markdown(markdown).rstrip("\n") or markdown
    except Exception:
        log.warning("slack rendering failed; sending plain text", exc_info=True)
        text = markdown
    return _slack_escape(text)


def _slack_escape(text: str) -> str:
    """Escape ``&``, ``<``, ``>`` everywhere except inside the links made by the converter."""
    out: list[str] = []
    last = 0
    for link in _SLACK_LINK.finditer(text):
        out.append(_slack_escape_plain(text[last:link.start()]))
        out.append(link.group().replace("&", "&amp;").replace("&amp;amp;", "&amp;"))
        last = link.end()
    out.append(_slack_escape_plain(text[last:]))
    return "".join(out)


def _slack_escape_plain(text: str) -> str:
    # The converter already wrote &amp; &lt; &gt; for some characters: keep those.
    return _SLACK_BARE_AMP.sub("&amp;", text).replace("<", "&lt;").replace(">", "&gt;")


def to_discord(markdown: str) -> str:
    """Discord renders Markdown itself."""
    return markdown
