"""Split Markdown at a platform's message limit without breaking code fences.

``split_markdown(text, limit)`` returns parts that each measure at most
``limit`` (``len`` by default; Telegram counts UTF-16 code units, pass
``measure=utf16_len``). A cut goes, in order of preference, at a paragraph
break outside a code fence, a line break outside a fence, a line break inside
a fence (the fence is closed at the end of the part and reopened, with its
language, at the start of the next), a space, and only as a last resort
mid-word; a break in the second half of the part beats any break in the
first half (no tiny messages). Joining the parts (minus the added fence lines) gives the text back.

The split is stable under growth: once a text is longer than the limit, its
first part does not change as more text is appended, so a streamed reply
never rewrites a message that is already full.
"""

from __future__ import annotations

from collections.abc import Callable

Measure = Callable[[str], int]
_CLOSE = "\n```"


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units (what Telegram counts)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def _is_fence(line: str) -> bool:
    stripped = line.lstrip()
    return stripped.startswith("```") or stripped.startswith("~~~")


def _marker(line: str) -> str:
    # The opening line, reused to reopen the fence; capped so a silly info
    # string cannot eat the next part.
    return line.strip()[:24]


def _fit(text: str, budget: int, measure: Measure) -> int:
    """The largest n such that measure(text[:n]) <= budget."""
    if measure(text) <= budget:
        return len(text)
    if measure is len:
        return max(budget, 0)
    used = 0
    for i, ch in enumerate(text):
        used += measure(ch)
        if used > budget:
            return i
    return len(text)


def _choose_cut(window: str, minimum: int) -> tuple[int, str | None]:
    """Where to cut ``window`` and the fence open at that point (or None).

    Returns an index > ``minimum`` into ``window``.
    """
    fence: str | None = None
    para_out = line_out = line_in = -1
    line_in_fence: str | None = None
    pos = 0
    lines = window.split("\n")
    for idx, line in enumerate(lines):
        end = pos + len(line)  # index of the "\n" after this line
        is_last = idx == len(lines) - 1
        if _is_fence(line):
            fence = None if fence is not None else _marker(line)
        if not is_last and end > minimum:
            if fence is None:
                line_out = end
                if end + 1 < len(window) and window[end + 1] == "\n":
                    para_out = end
            else:
                line_in, line_in_fence = end, fence
        pos = end + 1
    # A break outside a fence is preferred, but not at the price of a tiny
    # message: in the first half of the window, cutting inside a fence wins.
    half = len(window) // 2
    for wanted in (half, 1):
        if para_out >= wanted:
            return para_out, None
        if line_out >= wanted:
            return line_out, None
        if line_in >= wanted:
            return line_in, line_in_fence
    space = window.rfind(" ", minimum + 1)
    cut = space if space > minimum else len(window)
    return cut, _fence_at(window[:cut])


def _fence_at(text: str) -> str | None:
    fence: str | None = None
    for line in text.split("\n"):
        if _is_fence(line):
            fence = None if fence is not None else _marker(line)
    return fence


def split_markdown(text: str, limit: int, *, measure: Measure = len) -> list[str]:
    """Split ``text`` into parts of at most ``limit`` (see the module docstring)."""
    if limit < 16:
        raise ValueError("limit must be at least 16")
    parts: list[str] = []
    rest = text
    reopen = ""
    while measure(rest) > limit:
        # Reserve room for closing a fence we may have to cut inside.
        budget = limit - measure(_CLOSE)
        window = rest[: _fit(rest, budget, measure)]
        cut, fence = _choose_cut(window, len(reopen))
        piece = rest[:cut]
        if fence is not None:
            piece += _CLOSE
        parts.append(piece)
        rest = rest[cut:]
        # Paragraph/line breaks at the cut belong to neither part.
        rest = rest.lstrip("\n") if fence is None else rest.removeprefix("\n")
        reopen = fence + "\n" if fence is not None else ""
        rest = reopen + rest
    if rest.strip() or not parts:
        parts.append(rest)
    return parts
