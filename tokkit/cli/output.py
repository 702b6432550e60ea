"""How results reach stdout: a rich table in a terminal wide enough for it, whole values everywhere else.

- ``--json``: one JSON object on stdout and nothing else there (progress and notes go to stderr).
- stdout a terminal and the table fits its width: a rich table.
- stdout a terminal too narrow for the table: one block per row, ``header: value`` lines (nothing cut).
- stdout a file or a pipe: plain aligned columns, or ``key: value`` lines, at whatever width the values need.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from tokkit.cli.common import console


def emit_json(obj: Any) -> None:
    """``obj`` (dataclasses, paths, numpy scalars ... included) as one JSON document on stdout."""
    typer.echo(json.dumps(jsonable(obj), indent=2, sort_keys=False))


def jsonable(obj: Any) -> Any:
    """Plain JSON values for ``obj``: dataclasses -> dicts, paths -> strings, numpy -> Python, NaN -> null."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return jsonable(obj.item())
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    return str(obj)


def emit_facts(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """A two-column ``key  value`` table; ``key: value`` lines when stdout is not a terminal."""
    if not console.is_terminal:
        typer.echo(title)
        for k, v in rows:
            typer.echo(f"  {k}: {v}")
        return
    table = Table(title=title, show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def emit_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 2, wrap_last: bool = False
) -> None:
    """A table whose values are never cut.

    Args:
        title: printed above.
        headers: column names.
        rows: cells, already formatted.
        right_from: columns from this index on are right-aligned (numbers).
        wrap_last: the last column is prose that may wrap in a terminal (a description).
    """
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    if not console.is_terminal:
        typer.echo(title)
        for cells in [list(headers), *rows]:
            pairs = enumerate(zip(cells, widths, strict=True))
            parts = [c.rjust(w) if i >= right_from else c.ljust(w) for i, (c, w) in pairs]
            typer.echo("  ".join(parts).rstrip())
        return
    fixed = widths[:-1] + ([min(widths[-1], 30)] if wrap_last else widths[-1:])
    if sum(fixed) + 3 * len(widths) + 1 <= console.width:  # borders and padding of rich's default box
        table = Table(title=title)
        for i, h in enumerate(headers):
            last_wraps = wrap_last and i == len(headers) - 1
            table.add_column(
                h, justify="right" if i >= right_from else "left", no_wrap=not last_wraps,
                overflow="fold" if last_wraps else "ellipsis", min_width=None if last_wraps else widths[i],
            )  # fmt: skip
        for r in rows:
            table.add_row(*r)
        console.print(table)
        return
    console.print(f"[bold]{title}[/]", highlight=False)
    for r in rows:  # too narrow for columns: one block per row
        console.print(f"[bold]{r[0]}[/]", highlight=False, soft_wrap=True)
        for h, c in zip(headers[1:], r[1:], strict=True):
            console.print(f"  {h}: {c}", highlight=False, soft_wrap=True)
