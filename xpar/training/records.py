"""The run's metrics file (`metrics.jsonl`) read back: by the tracker when a run resumes, and by
`python -m xpar.report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def read_records(path: Path) -> list[Record]:
    """The records of a metrics.jsonl, read line by line, in file order: a line that does not
    parse (a torn last line) or has no integer `step` is skipped; [] without the file."""
    if not path.is_file():
        return []
    records = []
    with path.open(errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and type(record.get("step")) is int:
                records.append(record)
    return records
