"""Terminal tables that never cut what a person copies next.

Columns are of three kinds: ``ID`` (profile names, recipes, paths, file names: always shown
whole, never wrapped), ``NUM`` (figures: whole, right-aligned) and ``TEXT`` (descriptions,
reasons: folded onto more lines). When the whole columns leave too little room for the text
(a narrow terminal: rich's width is $COLUMNS, 80 without a terminal), the same rows are printed
in a compact table without borders, or, when even that does not fit, as a list of
``field: value`` lines. Titles are printed as plain lines, unwrapped.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ID", "NUM", "TEXT", "print_table", "console"]

ID, NUM, TEXT = "id", "num", "text"
_TEXT_MIN = 14  # the least width a folded text column is given before the list layout is used


def console():
    from rich.console import Console

    return Console(highlight=False)


def _width(cell: str) -> int:
    from rich.text import Text

    return max((Text.from_markup(line).cell_len for line in cell.splitlines() or [""]), default=0)


def print_table(title: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]], out=None) -> None:
    """Print ``rows`` under ``columns`` ((header, kind) pairs) with ``title`` above them."""
    from rich.markup import escape
    from rich.table import Table

    out = out or console()
    # cells are shown as they are ("runs/[v2]/model.gguf" is a path, not markup)
    rows = [[escape(cell) for cell in row] for row in rows]
    widths = [max([_width(name)] + [_width(row[i]) for row in rows]) for i, (name, _) in enumerate(columns)]
    whole = sum(w for w, (_, kind) in zip(widths, columns, strict=True) if kind != TEXT)
    # a folded text column is at least as wide as its longest word: words are never split
    words = [max([_TEXT_MIN] + [_width(word) for row in rows for word in row[i].split()]) if kind == TEXT else 0
             for i, (_, kind) in enumerate(columns)]
    content = whole + sum(min(w, m) for w, m, (_, kind) in zip(widths, words, columns, strict=True) if kind == TEXT)
    out.print(escape(title), soft_wrap=True)
    if content + 3 * len(columns) + 1 <= out.width:  # boxed: "│ " + cell + " " per column, one edge
        table = Table(show_header=True)
    elif content + 2 * len(columns) - 1 <= out.width:  # compact: no edges, one space between columns
        from rich import box

        table = Table(show_header=True, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), pad_edge=False)
    else:
        _print_list(columns, rows, out)
        return
    for (name, kind), width, word in zip(columns, widths, words, strict=True):
        if kind == TEXT:
            table.add_column(name, overflow="fold", min_width=min(width, word))
        else:
            table.add_column(name, no_wrap=True, min_width=width, justify="right" if kind == NUM else "left")
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _print_list(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]], out) -> None:
    for row in rows:
        first, *rest = zip(columns, row, strict=True)
        out.print(f"- {first[0][0]}: {first[1]}", soft_wrap=True)
        for (name, _), value in rest:
            out.print(f"  {name}: {value}", soft_wrap=True)
