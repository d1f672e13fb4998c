"""Text tables for the terminal: columns sized to their content, at most 100 characters wide.

:func:`render_table` takes the cells already formatted (the commands format
numbers; this module only lays them out):

* each column is as wide as its widest cell or header, so long hardware,
  model or strategy names are never cut and never push later columns out of
  line;
* a table wider than ``width`` (100 by default) is split into blocks of
  columns, one after the other, each repeating the key columns (the first
  ``keys``, which name the row) so every line still says which row it is;
* in a table too wide for one block, a key cell longer than
  ``max_key_width`` wraps onto continuation lines (after ``-``, ``_``,
  ``/``, ``,``, ``:`` or at spaces where it can), so one very long name
  does not leave room for only one column per block.

Only the standard library is imported (the CLI's start-up stays fast).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence

#: Widest table line, indent included [characters].
TABLE_WIDTH = 100
#: Key cells longer than this wrap onto continuation lines [characters].
MAX_KEY_WIDTH = 28
#: Spaces between columns.
GAP = 2


def wrap_text(text: str, indent: str = "", width: int = TABLE_WIDTH) -> str:
    """A line of prose within ``width``: continuation lines indented two more spaces."""
    return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False, break_long_words=True)


def wrap_cell(text: str, width: int) -> list[str]:
    """``text`` as lines of at most ``width`` characters, broken after ``-_/,:`` or at spaces."""
    if len(text) <= width:
        return [text]
    lines: list[str] = []
    rest = text
    while len(rest) > width:
        head = rest[:width]
        breaks = [m.end() for m in re.finditer(r"[-_/,: ]", head)]
        cut = breaks[-1] if breaks and breaks[-1] > width // 3 else width
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        lines.append(rest)
    return lines


def _blocks(widths: list[int], keys: int, room: int) -> list[list[int]]:
    """Non-key column indices grouped so each block fits ``room`` characters."""
    blocks: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in range(keys, len(widths)):
        need = widths[i] + GAP
        if current and used + need > room:
            blocks.append(current)
            current, used = [], 0
        current.append(i)
        used += need
    if current or not blocks:
        blocks.append(current)
    return blocks


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    align: str | Sequence[str] | None = None,
    width: int = TABLE_WIDTH,
    indent: str = "",
    keys: int = 1,
    max_key_width: int = MAX_KEY_WIDTH,
) -> str:
    """Lay out ``rows`` of text cells under ``headers`` within ``width`` characters.

    Parameters
    ----------
    headers : one per column; the first ``keys`` columns name the row
    rows : cells as text, one sequence per row, as many cells as headers
    align : ``"<"`` (left) or ``">"`` (right) per column, as a string such as
        ``"<<>>>"`` or a sequence; default: key columns left, the others right
    width : widest line, indent included [characters]
    indent : prefix of every line
    keys : leading columns that name a row, repeated in every block
    max_key_width : when the table is too wide, key cells longer than this
        wrap onto continuation lines
    """
    n = len(headers)
    align = list(align) if align is not None else ["<"] * keys + [">"] * (n - keys)
    if len(align) != n or any(len(r) != n for r in rows) or not 1 <= keys <= n:
        raise ValueError("every row and the alignment need one entry per header")
    text = [[str(c) for c in r] for r in rows]
    widths = [max([len(headers[i])] + [len(r[i]) for r in text]) for i in range(n)]
    if len(indent) + sum(widths) + GAP * (n - 1) > width:  # too wide: long names wrap
        for i in range(keys):
            widths[i] = min(widths[i], max(max_key_width, len(headers[i])))
    wrapped = [[wrap_cell(r[i], widths[i]) for i in range(keys)] for r in text]
    room = width - len(indent) - sum(widths[:keys]) - GAP * (keys - 1)
    blocks = _blocks(widths, keys, room)

    def cell(value: str, i: int) -> str:
        return f"{value:<{widths[i]}}" if align[i] == "<" else f"{value:>{widths[i]}}"

    def line(cells: list[str]) -> str:
        return (indent + (" " * GAP).join(cells)).rstrip()

    out: list[str] = []
    for b, block in enumerate(blocks):
        if b:
            out.append("")
        out.append(line([cell(headers[i], i) for i in [*range(keys), *block]]))
        for r, key in zip(text, wrapped, strict=True):
            depth = max(len(k) for k in key)
            for d in range(depth):
                cells = [cell(key[i][d] if d < len(key[i]) else "", i) for i in range(keys)]
                if d == 0:
                    cells += [cell(r[i], i) for i in block]
                out.append(line(cells))
    return "\n".join(out)
