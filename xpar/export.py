"""`python -m xpar.export CHECKPOINT OUT_DIR`: write any xpar checkpoint (a DeepSpeed one with
its per-rank partitions, or a plain one) as one consolidated plain checkpoint: the global model
in OUT_DIR/step_N/model.safetensors (loads into a single-process MoETransformerLM with
load_state_dict) with the optimizer state, schedule and trainer state beside it, so that
`trainer.resume=OUT_DIR` continues the run in one process or at any EP size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xpar.checks import UserError, report_error
from xpar.training import checkpoint as ckpt
from xpar.training import zero_checkpoint as zc


def export(src: Path, out: Path) -> Path:
    """Consolidate `src` (a step_N dir, or a checkpoints dir: its newest) into `out`."""
    src = Path(src)
    if src.is_dir() and not (src / "meta.json").exists():
        newest = ckpt.latest_checkpoint(src)
        if newest is None:
            raise UserError(f"{src} holds no complete checkpoint")
        src = newest
    if zc.is_zero_checkpoint(src):
        desc = zc.verify(src)
        ck = zc.read_as_plain(src)
        zc.restore_rng(src, desc, rank=0)  # saved with the export: rank 0's RNG state
    else:
        ck = ckpt.load_checkpoint(src, model_shapes=None)
    step = int(ck.extra["step"])
    if (Path(out) / f"step_{step}").exists():
        raise UserError(f"{out}/step_{step} already exists; pick another OUT_DIR")
    return ckpt.save_checkpoint(
        Path(out), step, ck.model_state, ck.optimizer_state, ck.scheduler_state, ck.extra
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpar.export", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="checkpoints/step_N (or checkpoints/)")
    parser.add_argument("out_dir", type=Path, help="where step_N/ is written")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out_dir)
    except UserError as e:
        return report_error(str(e))
    print(f"wrote {path / 'model.safetensors'} (and the optimizer state beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
