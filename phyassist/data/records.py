"""The unit the data stage works on: one question/answer pair and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """Input that cannot be used; the message names the file, row and field."""


@dataclass(frozen=True)
class Row:
    source: str  # config name of the source (DR, counsel-chat, ...)
    question: str
    answer: str  # the gold answer evaluation compares against
    origin: str  # "file:row" (1-based data row, header excluded) so a report points at the line
    group: str = ""  # the source's own group id (counsel-chat questionID); see sources.group_of
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Removed:
    row: Row
    rule: str
    detail: str = ""


def snippet(text: str, width: int = 160) -> str:
    """A one-line excerpt for reports."""
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 1] + "…"
