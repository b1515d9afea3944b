"""Result tables on the console: 80 columns wide wherever they are printed (a terminal, a pipe,
a file), a simple header rule and no cell borders, so a cell never wraps into its neighbours."""

from __future__ import annotations

WIDTH = 80


def print_table(columns: list[str], rows: list[list[str]], title: str | None = None, right: tuple[str, ...] = (),
                wrap: tuple[str, ...] = ()) -> None:
    """`right`: right-justified (numeric) columns; `wrap`: columns that may wrap (notes); every
    other cell stays on one line."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, padding=0, show_edge=False, title=title)  # one space between columns
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left", no_wrap=col not in wrap,
                     overflow="fold" if col in wrap else "ellipsis")
    for r in rows:
        t.add_row(*r)
    Console(width=WIDTH).print(t)
