"""Render the engine's Markdown the way each platform expects.

- Telegram: plain text plus ``MessageEntity`` objects (telegramify-markdown,
  MIT). Entities, unlike MarkdownV2, cannot fail to parse, so a half-streamed
  ``**bold`` never makes Telegram reject an edit.
- Slack: mrkdwn (slackify-markdown, MIT).
- Discord: its own Markdown dialect already; sent as is.

Rendering is pure and never raises: on a converter bug the source text is
shown as plain text.
"""

from __future__ import annotations

import logging
from typing import Any

import telegramify_markdown
from slackify_markdown import slackify_markdown

log = logging.getLogger(__name__)


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
    """Markdown -> Slack mrkdwn."""
    try:
        text = slackify_markdown(markdown)
    except Exception:
        log.warning("slack rendering failed; sending plain text", exc_info=True)
        return markdown
    return text.rstrip("\n") or markdown


def to_discord(markdown: str) -> str:
    """Discord renders Markdown itself."""
    return markdown
