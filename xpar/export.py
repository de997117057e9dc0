"""`python -m xpar.export CHECKPOINT OUT_DIR`: any xpar checkpoint as one consolidated
checkpoint for a single process, `OUT_DIR/step_N/`: the whole model and optimizer state in one
rank's files (one per layer), what it is, the schedule, data positions and every rank's RNG, so
that
`trainer.resume=OUT_DIR/step_N` continues the run in one process or at any layout, and
`trainer.init_from` and `python -m xpar.hf export` take it from anywhere.

CHECKPOINT may be written by any layout and backend, or by xpar's first format (gathered
weights, or DeepSpeed's own files), which this converts; a step_N dir, or a checkpoints or run
dir (its newest checkpoint). OUT_DIR must be new or empty. The whole state passes through this
one process's memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xpar.checks import UserError, report_error
from xpar.persist import artefact
from xpar.persist.checkpoint import TRAINER, open_checkpoint, rng_file, saved_rngs
from xpar.persist.sharded import Fragment
from xpar.persist.staged import check_out_dir, json_bytes
from xpar.training.legacy import Consolidated, is_first_format, read_first_format


def consolidate(src: Path) -> Consolidated:
    """The checkpoint at `src` whole, in this process."""
    path = artefact.resolve_source(src)
    if is_first_format(path):
        return read_first_format(path)
    checkpoint = open_checkpoint(path)
    d = checkpoint.description
    tensors = checkpoint.read_whole()
    d.source = f"exported from {checkpoint.path}"
    d.layout = {"world": 1, "ep_size": 1, "backend": "export"}
    trainer, rngs = checkpoint.json(TRAINER), saved_rngs(checkpoint)
    return Consolidated(d, tensors, trainer, rngs, checkpoint.tokenizer)


def export(src: Path, out: Path) -> Path:
    """Consolidate `src` into `out/step_N` (see the module docstring); returns that path.
    `out` must be new or empty, as for every other writer of artefacts."""
    check_out_dir(out)
    c = consolidate(src)
    final = Path(out) / f"step_{c.description.step}"
    files = {TRAINER: json_bytes(c.trainer, TRAINER)}
    files |= {rng_file(rank): json_bytes(state, "RNG states") for rank, state in c.rngs.items()}
    state = {k: Fragment.whole(t) for k, t in c.tensors.items()}
    return artefact.write(final, c.description, state, files=files, tokenizer=c.tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpar.export", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="checkpoints/step_N (or checkpoints/)")
    parser.add_argument("out_dir", type=Path, help="a new or empty dir; step_N/ goes into it")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out_dir)
    except UserError as e:
        return report_error(str(e))
    print(f"wrote {path} (a consolidated checkpoint; resume or init_from it anywhere)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
