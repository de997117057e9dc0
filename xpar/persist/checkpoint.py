"""Training checkpoints: `root/step_N/`, an artefact (xpar.persist.artefact) of kind
`checkpoint` holding the weights and AdamW state under xpar.persist.fragments' keys, the
trainer's state (`trainer.json`: step, counters, data positions, schedule, the backend's own
small state) and each rank's RNG states (`rng/rank_R.json`).

Every rank writes its own pieces and reads what its layout needs, at any world size and EP size;
nothing is gathered and nothing is unpickled. A save is committed by its manifest, written last,
so a crash leaves the earlier checkpoints as they were and the newest complete one is what
`latest_checkpoint` finds.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xpar.checks import UserError
from xpar.parallel.mesh import Mesh
from xpar.persist import artefact
from xpar.persist.artefact import Artefact, complete_checkpoints, latest_checkpoint
from xpar.persist.describe import Description
from xpar.persist.sharded import Fragment
from xpar.persist.staged import json_bytes, remove_leftovers

__all__ = [
    "TRAINER",
    "complete_checkpoints",
    "latest_checkpoint",
    "open_checkpoint",
    "prune_checkpoints",
    "restore_rng",
    "rng_file",
    "saved_rngs",
    "save_checkpoint",
]

TRAINER = "trainer.json"
log = logging.getLogger(__name__)


def rng_file(rank: int) -> str:
    return f"rng/rank_{rank}.json"


def save_checkpoint(
    root: Path,
    description: Description,
    state: dict[str, Fragment],
    trainer: dict[str, Any],
    mesh: Mesh,
    tokenizer: str | None = None,
    keep: int = 0,
) -> Path:
    """Write `root/step_{description.step}` (every rank takes part; one saved before at the
    same step is replaced whole) and prune to the newest `keep` (0 keeps all). `trainer` must
    be JSON-able: that is checked before anything is written."""
    files = {TRAINER: json_bytes(trainer, "trainer state")}
    rank_files = {rng_file(mesh.layout.rank): json_bytes(rng_state(), "RNG state")}
    root = Path(root)
    final = root / f"step_{description.step}"
    path = artefact.write(final, description, state, mesh, files, rank_files, tokenizer, True)
    if mesh.layout.rank == 0:
        try:  # the checkpoint is saved: a failure here must not stop the run
            remove_leftovers(root)
            prune_checkpoints(root, keep)
        except OSError as e:
            log.warning("saved %s, but could not remove older checkpoints: %s", path, e)
    mesh.barrier()
    return path


def open_checkpoint(path: Path, mesh: Mesh | None = None) -> Artefact:
    """A checkpoint (a step_N dir, or the newest of a checkpoints or run dir) opened for
    reading, its files checked; anything else is a UserError on every rank."""
    art = artefact.open_artefact(path, mesh)
    if art.description.kind != "checkpoint":
        raise UserError(
            f"{art.path} is a {art.description.kind} dir (weights only), not a checkpoint; "
            f"start from it with trainer.init_from={art.path}"
        )
    return art


def restore_rng(checkpoint: Artefact, rank: int) -> None:
    """This rank's saved RNG states (rank 0's when the checkpoint had fewer ranks)."""
    own = rng_file(rank)
    set_rng_state(checkpoint.json(own if (checkpoint.path / own).is_file() else rng_file(0)))


def saved_rngs(checkpoint: Artefact) -> dict[int, Any]:
    """Every rank's saved RNG states, by rank."""
    ranks = sorted(int(p.stem.removeprefix("rank_")) for p in (checkpoint.path / "rng").iterdir())
    return {r: checkpoint.json(rng_file(r)) for r in ranks}


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep=0 keeps all)."""
    if keep < 0:
        raise UserError(f"checkpoints to keep must be >= 0, got {keep}")
    complete = complete_checkpoints(Path(root))
    for old in complete[:-keep] if keep else []:
        # Rename first: a crash mid-delete then leaves a leftover, not a half-deleted step_N.
        aside = old.with_name(f".old-{old.name}-{os.getpid()}")
        os.replace(old, aside)
        shutil.rmtree(aside)


# ---- RNG states as JSON --------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch's on the CPU and on its current GPU (if any), Python's
    and NumPy's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state().tolist() if torch.cuda.is_initialized() else None
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": cuda,
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
