"""Plain text laid out within a width: tables, lists cut to fit, lines wrapped or cut, a terminal's frame.
Shared by ``extproc status`` and ``extproc models``."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

__all__ = ["fit_frame", "fit_lines", "fit_list", "format_table"]


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()
) -> list[str]:
    """Plain text columns, two spaces apart; columns in ``right`` are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def fit_list(items: Sequence[str], width: int, sep: str = " ") -> str:
    """``items`` joined, as many as fit in ``width`` characters, then ``+N`` for the rest."""
    text = ""
    for i, item in enumerate(items):
        candidate = f"{text}{sep}{item}" if text else item
        rest = len(items) - i - 1
        if len(candidate) + (len(f"{sep}+{rest}") if rest else 0) > width:
            more = len(items) - i
            return f"{text}{sep}+{more}" if text else f"+{more}"
        text = candidate
    return text


def fit_lines(lines: Sequence[str], width: int) -> list[str]:
    """Lines no wider than ``width``: a message is wrapped (indented), a table row (columns are two spaces
    apart) cut, since wrapping it would break its columns."""
    out: list[str] = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
        elif "  " in line.strip():
            out.append(line[:width])
        else:
            out.extend(textwrap.wrap(line, width, subsequent_indent="    ", break_on_hyphens=False))
    return out


def fit_frame(text: str, columns: int, rows: int) -> str:
    """Cut the frame to the terminal so a refresh never wraps or scrolls the screen; the last line (how to
    stop) stays."""
    lines = [line[:columns] for line in text.splitlines()]
    if len(lines) >= rows:
        cut = len(lines) - rows + 2
        lines = [*lines[: rows - 3], f"... {cut} more lines (--top N, --tier/--state/--model)", lines[-1]]
    return "\n".join(lines) + "\n"
