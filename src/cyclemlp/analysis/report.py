"""Writing the analyses' tables (CSV and JSON) and figures (PNG), always atomically."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io import atomic_write

__all__ = ["save_figure", "write_rows"]


def write_rows(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write a list of flat records as CSV (``.csv``) or JSON (any other suffix).

    JSON files hold ``{"meta": meta, "rows": rows}`` so that the settings of a run travel with its
    numbers, ``meta`` completed with where it was measured (machine, threads, versions, date and
    the command: :func:`cyclemlp.tools.environment.environment`); CSV files hold the rows only
    (columns in first-seen order).
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
    else:
        from ..tools.environment import environment

        meta = {**dict(meta or {}), "environment": environment()}
        text = json.dumps({"meta": meta, "rows": list(rows)}, indent=2, default=str)

        def write(tmp: str) -> None:
            Path(tmp).write_text(text + "\n")

    return atomic_write(path, write)


def save_figure(figure: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib ``Figure`` as PNG, atomically.

    The analyses build ``matplotlib.figure.Figure`` objects directly, without pyplot, so no
    display backend or global figure state is involved.
    """
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
