"""A guard against an answer that repeats itself: a model stuck in a loop.

    guard = RepetitionGuard()
    for delta in deltas:
        if guard.feed(delta):       # True once the end of the text has become a loop
            break                   # stop asking the model for more
    guard.text                      # what was fed, the loop cut back to its first turn

A loop is the end of the text repeating itself exactly with some period
``p`` (1..``MAX_PERIOD`` characters) over at least
``max(MIN_SPAN, (MIN_REPEATS - 1) * p)`` characters: one sentence (or word,
or paragraph) written ``MIN_REPEATS`` times in a row, and never less than
``MIN_SPAN`` characters of repetition, so a short run ("....", a table rule,
a word repeated on purpose) is not one. Small models loop (the demo model
wrote one sentence over 6,758 characters until a timeout); sampling penalties
make it rarer, this makes it harmless: the stream stops, and only the first
turn of the loop is kept, so a loop is never stored and fed back as history.

The check looks at the last ``MAX_PERIOD * MIN_REPEATS`` characters only, and
at most every ``CHECK_EVERY`` new characters: cheap enough for every delta.
"""

from __future__ import annotations

MAX_PERIOD = 500  # the longest repeating unit looked for (a paragraph)
MIN_REPEATS = 4
# Characters of repetition before anything counts as a loop: long enough that
# filler a user asked for ("lorem ipsum " forty times) is not one, short enough
# to stop a looping demo model well before its 512-token cap.
MIN_SPAN = 600
CHECK_EVERY = 16  # new characters between two checks
PROBE = 32  # the end of the text that a loop's earlier turn must repeat (< MIN_SPAN)


class RepetitionGuard:
    """Feed it the deltas of one answer; see the module docstring."""

    def __init__(self) -> None:
        self._text = ""
        self._unchecked = 0
        self.looped = False

    @property
    def text(self) -> str:
        return self._text

    def feed(self, delta: str) -> bool:
        """Add ``delta``; True (and the text cut back) once the answer loops."""
        if self.looped:
            return True
        self._text += delta
        self._unchecked += len(delta)
        if self._unchecked < CHECK_EVERY:
            return False
        self._unchecked = 0
        period = loop_period(self._text)
        if period is None:
            return False
        self._text = cut_loop(self._text, period)
        self.looped = True
        return True


def loop_period(text: str) -> int | None:
    """The shortest period with which the end of ``text`` loops, or None."""
    tail = text[-(MAX_PERIOD * MIN_REPEATS):]
    size = len(tail)
    # A loop of period p repeats (at least) its last PROBE characters p earlier,
    # so only where ``str.rfind`` (C speed) finds them again can p be a period:
    # in prose that is nowhere, instead of trying all MAX_PERIOD periods.
    probe = tail[-PROBE:]
    end = size - 1  # an earlier copy ends at least one character before the end
    while True:
        start = tail.rfind(probe, 0, end)
        if start < 0:
            return None
        period = size - start - PROBE  # copies nearest the end first: shortest period
        span = max(MIN_SPAN, (MIN_REPEATS - 1) * period)
        if period > MAX_PERIOD or span + period > size:
            return None  # longer periods need even more text
        if tail[-span:] == tail[-span - period:-period]:
            return period
        end = start + PROBE - 1


def cut_loop(text: str, period: int) -> str:
    """``text`` up to the end of the loop's first turn."""
    start = len(text) - MIN_SPAN - period
    while start > 0 and text[start - 1] == text[start - 1 + period]:
        start -= 1
    return text[:start + period]
