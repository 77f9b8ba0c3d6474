"""A run's scalars as CSV files a spreadsheet or pandas reads: one header, every row under it.

Training rows (``scalars.csv``) and validation rows (``val_scalars.csv``) go to separate files,
each with one header. A row with a column the file has not seen yet (the lip-sync term switching
on at ``sync_start_epoch``, say) rewrites the file once with the widened header, earlier rows
leaving that cell empty; rows are otherwise appended.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

__all__ = ["append_row", "read_rows"]


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a scalars file as dicts (empty cells are ''), [] when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append ``row`` under the file's header, widening the header first if the row brings new columns."""
    path = Path(path)
    header = []
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    new = [k for k in row if k not in header]
    if new and header:  # rewrite once with the wider header (atomic: a crash leaves the old file)
        rows = read_rows(path)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            # extrasaction: a file written before this module had rows longer than its header
            # (their extra cells, under DictReader's key None, cannot be named: dropped).
            w = csv.DictWriter(f, fieldnames=header + new, restval="", extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header + new, restval="")
        if not header:
            w.writeheader()
        w.writerow(row)
