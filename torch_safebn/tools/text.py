"""Plain-text output of the tools: times, tables whose columns line up, and
prose wrapped to fit WIDTH columns."""
from __future__ import annotations

import textwrap
from collections.abc import Collection, Sequence

__all__ = ["WIDTH", "format_time", "render_table", "wrap"]

WIDTH = 100  # every line the tools print fits a terminal this wide


def format_time(microseconds: float) -> str:
    """Three significant digits in the unit that suits: "578 us", "2.81 ms", "1.02 s"."""
    if microseconds >= 1e6:
        return f"{microseconds / 1e6:.3g} s"
    if microseconds >= 1e3:
        return f"{microseconds / 1e3:.3g} ms"
    return f"{microseconds:.3g} us"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str] | str], text_columns: Collection[int] = (0,),
                 ) -> list[str]:
    """Columns padded to their widest cell, a rule under the header; the text
    columns left-aligned, the numbers right-aligned. A row given as a plain
    string is a heading for the rows under it, printed as it is."""
    cells = [header, *(row for row in rows if not isinstance(row, str))]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i in text_columns else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths))).rstrip()

    return [line(header), "  ".join("-" * w for w in widths),
            *(row if isinstance(row, str) else line(row) for row in rows)]


def wrap(text: str, indent: str = "") -> str:
    """text in lines of at most WIDTH columns, each starting with indent."""
    return textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)
