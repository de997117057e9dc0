"""Worker for tests/test_tasks.py, run on every rank (gloo): `RUN_DIR OVERRIDES...` builds the
trainer (EP as the overrides say), trains trainer.max_steps steps without evaluating, then
evaluates and prints the metrics as one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from xpar.training.trainer import Trainer

from jobs import build


def main() -> None:
    run_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    trainer = Trainer(build(overrides), run_dir / f"rank{os_rank()}", {})
    for _ in range(trainer.cfg.trainer.max_steps):
        trainer.train_step(trainer.data.train.next_step())
    print(json.dumps(trainer.evaluate()[0]))
    if dist.is_initialized():
        dist.destroy_process_group()


def os_rank() -> str:
    import os

    return os.environ.get("RANK", "0")


if __name__ == "__main__":
    main()
