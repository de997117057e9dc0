"""Worker for tests/test_sharded.py, run on every rank (gloo): prints one JSON line per rank.

`source OUT`: train a model whose expert banks dominate its state for 5 steps at EP = the
world, save step_5 into OUT/checkpoints (a warm-up save at step 4 first), read it back into the
same trainer, then train on to step 10: the losses of a run that never stopped.

`resume CHECKPOINT EP OUT`: at this world and EP size, read CHECKPOINT into a fresh trainer,
save it again at once into OUT/checkpoints (twice, the second save timed; the test compares it
with CHECKPOINT consolidated), then train 5 steps.

Both report, for every save and load they time, the most resident memory the process held
beyond what it held before (Linux's high-water mark, reset just before), the bytes of training
state it holds, the largest file it wrote, and the bytes of the experts the other EP ranks hold.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from xpar.training.trainer import Trainer

from jobs import FAST, build

# Expert banks are most of the state: 4 layers of 8 experts of 64 x 1024.
MODEL = ["moe.d_ff=1024", "trainer.eval_every=1000"]
RUN = [*FAST, *MODEL, "trainer.max_steps=10", "trainer.save_every=1000", "trainer.log_every=1"]


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def peak_extra(fn) -> int:
    """The most resident bytes `fn` adds at any moment (VmHWM after a reset, less VmRSS)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def held(trainer: Trainer) -> dict[str, int]:
    """This rank's training state in bytes, and the bytes of the other EP ranks' experts."""
    module = trainer.model
    tensors = [*module.state_dict().values()]
    tensors += [t for s in trainer.optimizer.state.values() for t in s.values()]
    own = sum(t.numel() * t.element_size() for t in tensors)
    experts = sum(p.numel() * p.element_size() for p in trainer.pm.expert_params)
    others = 3 * experts * (trainer.mesh.layout.ep_size - 1)  # weights and two moments
    return {"training_state": own, "other_ranks_experts": others}


def largest_own_file(path: Path, rank: int) -> int:
    return max(p.stat().st_size for p in (path / "state").glob(f"shard-{rank + 1:05d}-*"))


def make(out: Path, ep: int, extra: list[str] = ()) -> Trainer:
    cfg = build([*RUN, f"parallel.ep_size={ep}", f"run_name={out.name}", *extra])
    return Trainer(cfg, out, {})


def train(trainer: Trainer, steps: int) -> dict[int, float]:
    losses = {}
    for _ in range(steps):
        result = trainer.train_step(trainer.data.train.next_step())
        trainer.step += 1
        losses[trainer.step] = result.loss
    return losses


def source(out: Path) -> dict:
    trainer = make(out, int(os.environ["WORLD_SIZE"]))
    rank = trainer.mesh.layout.rank
    train(trainer, 4)
    trainer.save()  # a warm-up save: DCP's first use sets up what every save reuses
    train(trainer, 1)
    saved = {}
    save_peak = peak_extra(lambda: saved.setdefault("path", trainer.save()))
    path = saved["path"]
    load_peak = peak_extra(lambda: trainer._load(path))
    losses = train(trainer, 5)
    return {
        "save_peak": save_peak,
        "load_peak": load_peak,
        "largest_file": largest_own_file(path, rank),
        **held(trainer),
        "losses": losses,
        "path": str(path),
    }


def resume(checkpoint: Path, ep: int, out: Path) -> dict:
    trainer = make(out, ep)
    trainer.backend.state()  # AdamW's state as its first step makes it: held for training
    load_peak = peak_extra(lambda: trainer._load(checkpoint))
    trainer.save()  # the warm-up save
    saved = {}
    save_peak = peak_extra(lambda: saved.setdefault("path", trainer.save()))
    path = saved["path"]
    losses = train(trainer, 5)
    return {
        "load_peak": load_peak,
        "save_peak": save_peak,
        "largest_file": largest_own_file(path, trainer.mesh.layout.rank),
        **held(trainer),
        "losses": losses,
        "path": str(path),
    }


def main() -> None:
    mode = sys.argv[1]
    if mode == "source":
        result = source(Path(sys.argv[2]))
    else:
        result = resume(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    print(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
