"""Worker for tests/test_plan.py, run on every rank (gloo) or in one process: for each job it
is given (space-separated overrides, one job an argument), a real Trainer takes one step and
one more backward pass, and this prints one JSON line per rank with what its tensors hold
(xpar.plan.resident) beside what the planner predicts for it (xpar.plan.state), for this rank
(FSDP's shards differ from rank to rank)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist

from xpar.plan.resident import resident_state
from xpar.plan.state import fsdp_state_bytes, inventory, state_bytes
from xpar.training.trainer import Trainer

from jobs import FAST, build

BASE = [*FAST, "trainer.save_every=100", "data.micro_batch_size=2", "run_name=plan"]


def check(overrides: list[str], out: Path) -> dict:
    cfg = build([*BASE, *overrides])
    trainer = Trainer(cfg, out, {})
    trainer.train_step(trainer.data.train.next_step())
    trainer.model.train()
    with trainer.backend.micro_step(last=True) as module:
        o = trainer._forward(trainer.data.train.next_step()[0], module)
        trainer.backend.backward(o.loss + o.aux_loss)
    held = resident_state(trainer)
    nbytes = 4 if trainer.autocast_dtype is None else 2  # the CPU's auto precision is fp32
    par, inv = cfg.parallel, inventory(cfg)
    if par.shard == "fsdp":
        planned = fsdp_state_bytes(inv, trainer.world, par.ep_size, par.shard_size, trainer.rank)
    else:
        planned = state_bytes(inv, cfg.deepspeed.stage, nbytes, trainer.world, par.ep_size)
    return {
        "rank": trainer.rank,
        "job": " ".join(overrides),
        "held": dataclasses.asdict(held),
        "planned": dataclasses.asdict(planned),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for i, job in enumerate(sys.argv[1:]):
            rank = os.environ.get("RANK", "0")
            print(json.dumps(check(job.split(), Path(tmp) / f"{i}_{rank}")), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
