"""Prompts for fact extraction and reconciliation, and defensive parsing of the answers.

Pure functions, no I/O. The model is asked for JSON (``json_mode=True``) but
models still wrap it in code fences, add prose, or invent fields, so parsing
never trusts the shape: anything unusable yields ``None`` (logged by the
caller) and a single bad item is dropped without losing the others.

Extraction answer::

    {"facts": [{"text": "...", "category": "preference", "importance": 0.8,
                "about": "speaker" | "general" | "other"}]}

``about == "other"`` (a fact about a third person) is dropped by the policy:
we cannot tell which user id it belongs to, and storing it as general would
leak a personal fact to everyone (fail closed).

Judgement answer (for a new fact close to existing ones)::

    {"action": "add" | "skip" | "update", "target": <number of the existing fact>}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from engine.types import CompletionRequest, Fact, IncomingMessage, Message

About = Literal["speaker", "general", "other"]
Action = Literal["add", "skip", "update"]

MAX_FACT_CHARS = 500
MAX_FACTS = 10
MAX_INPUT_CHARS = 4000

EXTRACT_SYSTEM = """\
You maintain the long-term memory of a chat assistant. From the exchange below, \
extract durable facts worth remembering in future conversations: stable \
preferences, personal details, plans with dates, relationships, work, decisions. \
Ignore greetings, small talk, questions, one-off requests and anything only the \
assistant said. Never invent facts.

Answer with a JSON object only:
{"facts": [{"text": "...", "category": "...", "importance": 0.0, "about": "..."}]}
- text: one short standalone sentence naming the person ("{speaker} likes tea"), \
never "I" or "you".
- category: one word, e.g. preference, personal, plan, relationship, work, general.
- importance: 0.0 (trivia) to 1.0 (must remember).
- about: "speaker" if it is about {speaker}, "general" if it is about no \
particular person, "other" if it is about someone else.
Return {"facts": []} when nothing is worth remembering."""

JUDGE_SYSTEM = """\
You keep a memory free of duplicates and contradictions. Compare the NEW fact \
with the numbered EXISTING facts and answer with a JSON object only:
{"action": "skip" | "update" | "add", "target": <number or null>}
- "skip": the new fact says nothing beyond an existing one (a duplicate).
- "update": the new fact changes or contradicts existing fact <target> (for \
example a new city, job or preference); the new one replaces it.
- "add": the new fact is compatible with all of them and adds information."""


@dataclass(frozen=True)
class ExtractedFact:
    text: str
    category: str = "general"
    importance: float = 0.5
    about: About = "speaker"


@dataclass(frozen=True)
class Judgement:
    action: Action
    target: int | None = None  # 0-based index into the candidates


def speaker_label(message: IncomingMessage) -> str:
    return message.user_name.strip() or "The user"


def extraction_request(message: IncomingMessage, reply_text: str) -> CompletionRequest:
    """Ask for durable facts from one user message and the bot's reply."""
    speaker = speaker_label(message)
    system = EXTRACT_SYSTEM.replace("{speaker}", speaker)
    user = (
        f"{speaker} said:\n{message.text[:MAX_INPUT_CHARS]}\n\n"
        f"The assistant answered:\n{reply_text[:MAX_INPUT_CHARS]}"
    )
    return CompletionRequest(
        messages=(Message("system", system), Message("user", user)),
        temperature=0.0, max_tokens=600, json_mode=True,
        # budgets count extraction against the bot and the speaker, like the reply
        bot=message.bot, user=message.user,
    )


def judge_request(new: str, existing: list[Fact], *, bot: str = "") -> CompletionRequest:
    """Ask whether ``new`` duplicates, updates or adds to ``existing`` (numbered from 1)."""
    listing = "\n".join(f"{i}. {fact.text}" for i, fact in enumerate(existing, start=1))
    user = f"EXISTING:\n{listing}\n\nNEW:\n{new}"
    return CompletionRequest(
        messages=(Message("system", JUDGE_SYSTEM), Message("user", user)),
        temperature=0.0, max_tokens=100, json_mode=True, bot=bot,
    )


_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def _load_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (code fences and chatter around it tolerated)."""
    text = _FENCE.sub("", text.strip())
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _number(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return default
    try:
        number = float(value)
    except ValueError:
        return default
    return min(1.0, max(0.0, number)) if number == number else default  # NaN -> default


def _fact(item: Any) -> ExtractedFact | None:
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict):
        return None
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        return None
    category = item.get("category")
    category = category.strip().lower()[:32] if isinstance(category, str) else ""
    about = item.get("about", "speaker")
    if about not in ("speaker", "general", "other"):
        about = "other"  # unknown subject: treat as not ours to store
    return ExtractedFact(
        text=" ".join(text.split())[:MAX_FACT_CHARS],
        category=category or "general",
        importance=_number(item.get("importance"), 0.5),
        about=about,
    )


def parse_facts(text: str) -> list[ExtractedFact] | None:
    """The facts in a model's answer, or None when the answer is not usable JSON."""
    data = _load_object(text)
    if data is None:
        return None
    items = data.get("facts")
    if not isinstance(items, list):
        return None
    facts = [fact for fact in map(_fact, items) if fact is not None]
    return facts[:MAX_FACTS]


def parse_judgement(text: str, candidates: int) -> Judgement | None:
    """The judge's decision, or None when unusable (the caller then adds the fact)."""
    data = _load_object(text)
    if data is None:
        return None
    action = data.get("action")
    if action not in ("add", "skip", "update"):
        return None
    target = data.get("target")
    index: int | None = None
    if isinstance(target, int | str) and not isinstance(target, bool):
        try:
            index = int(target) - 1
        except ValueError:
            index = None
    if index is not None and not 0 <= index < candidates:
        index = None
    if action == "update" and index is None:
        return None  # an update must say what it replaces
    return Judgement(action=action, target=index)
