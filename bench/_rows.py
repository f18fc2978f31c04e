"""CSV result files shared by the bench scripts: rows appended under one header, widened when a script gains a
column (older rows get an empty cell), so every run of every version stays in one table."""

from __future__ import annotations

import csv
from pathlib import Path


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` (dicts) to the CSV at ``path``; floats are written with 6 significant digits.

    Every row is tagged with the machine and versions (``_env.env_tags``) and a UTC ``date``; a script's own values
    for those keys win."""
    if not rows:
        return
    from _env import env_tags, now_utc

    tags = {"date": now_utc(), **env_tags()}
    rows = [{**tags, **row} for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    old_fields: list[str] = []
    old_rows: list[dict] = []
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields, old_rows = list(reader.fieldnames or []), list(reader)
    union = old_fields + [k for k in fields if k not in old_fields]
    mode = "a" if old_fields and union == old_fields else "w"  # a new column: rewrite with the union header
    with open(path, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=union, restval="")
        if mode == "w":
            w.writeheader()
            w.writerows(old_rows)
        w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    print(f"appended {len(rows)} rows to {path}")
