"""The run's metrics file (`metrics.jsonl`) read back: by the tracker when a run resumes, and by
`python -m xpar.report`; and an earlier run's file set aside when a new run starts in its run
dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def read_records(path: Path) -> list[Record]:
    """The records of a metrics.jsonl, read line by line, in file order: a line that does not
    parse (a torn last line) or has no integer `step` is skipped; [] without the file."""
    return read_records_counted(path)[0]


def read_records_counted(path: Path) -> tuple[list[Record], int]:
    """read_records, and how many non-blank lines it skipped."""
    if not path.is_file():
        return [], 0
    records, skipped = [], 0
    with path.open(errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                skipped += bool(line.strip())
                continue
            if isinstance(record, dict) and type(record.get("step")) is int:
                records.append(record)
            else:
                skipped += 1
    return records, skipped


def set_aside(path: Path) -> Path | None:
    """Rename a non-empty `path` (metrics.jsonl) to the first free `metrics.N.jsonl` beside
    it, so that a new run starts its own file and the old records stay; returns the new name."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    n = 1
    while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(kept)
    return kept
