"""The line under a reply that says who served it, per the bot's footer mode.

    -- served by backup (gpt-4o-mini); primary failed: rate limited

``on_failover`` shows it only when some provider failed or was skipped,
``always`` on every reply, ``never`` not at all. Notices (a truncated
message, the demo model) are about the answer itself and always shown.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.types import Failure, FooterMode


def served_line(served_by: str, model: str | None, failures: Sequence[Failure]) -> str:
    served = f"served by {served_by} ({model})" if model else f"served by {served_by}"
    # A skip rule's verdict (over budget) is a choice, not a failure: say so.
    failed = [f"{f.provider} {'skipped' if f.kind == 'skipped' else 'failed'}: {f.reason}"
              for f in failures]
    return "-- " + "; ".join([served, *failed])


def footer(
    mode: FooterMode,
    *,
    served_by: str | None,
    model: str | None,
    failures: Sequence[Failure] = (),
    notices: Sequence[str] = (),
) -> str:
    """The footer text, or "" when there is nothing to show."""
    lines: list[str] = []
    if served_by and (mode == "always" or (mode == "on_failover" and failures)):
        lines.append(served_line(served_by, model, failures))
    lines.extend(f"-- {n}" for n in notices)
    return "\n".join(lines)
