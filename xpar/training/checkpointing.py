"""The trainer's checkpoints: which one a run resumes from, and saving and loading them (and the
best model) through the backend, every rank its own pieces (xpar.persist.checkpoint)."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any

from xpar.checks import UserError, report_warning
from xpar.model import ModelConfig
from xpar.parallel.mesh import Mesh
from xpar.parallel.parallelize import ParallelModel
from xpar.persist import artefact
from xpar.persist import checkpoint as ckpt
from xpar.persist.describe import Description, TaskInfo, TensorInfo
from xpar.persist.fragments import MODEL, MOMENTS, global_shapes, key_shape, optim_key
from xpar.persist.staged import json_bytes
from xpar.training.backend import Backend

log = logging.getLogger(__name__)

BEST_DIR = "best"
BEST_INFO = "best.json"
RESTART_COUNTERS = {
    "TORCHELASTIC_RESTART_COUNT": "torchrun restart",  # torchrun --max-restarts
    "SLURM_RESTART_COUNT": "Slurm requeue",  # a preempted or requeued job
}


def restart_reason() -> str | None:
    """Why this process continues an interrupted job (`torchrun restart 1`, `Slurm requeue 2`),
    or None for a job's first attempt."""
    for var, what in RESTART_COUNTERS.items():
        count = os.environ.get(var, "0")
        if count.isdigit() and int(count) > 0:
            return f"{what} {count}"
    return None


def resume_path(resume: bool | str, root: Path, mesh: Mesh | None = None) -> Path | None:
    """`choose_resume`'s answer on rank 0, on every rank of `mesh` (ranks looking at a shared
    file system a moment apart could see different newest checkpoints), or its error."""
    mesh = mesh or Mesh.solo()
    try:
        choice = (choose_resume(resume, root), None) if mesh.layout.rank == 0 else (None, None)
    except UserError as e:
        choice = (None, str(e))
    path, error = mesh.broadcast_object(choice)
    if error is not None:
        raise UserError(error)
    return path


def choose_resume(resume: bool | str, root: Path) -> Path | None:
    """The checkpoint `trainer.resume` names, or None for a fresh run. A fresh run refuses a
    checkpoints dir that already holds checkpoints, which it would otherwise overwrite. A
    restarted attempt of a job (restart_reason) resumes the run's newest checkpoint, whatever
    `resume` names: that is where the attempt it replaces got to. PATH may be a checkpoint, or
    a checkpoints dir or run dir (its newest checkpoint)."""
    if (why := restart_reason()) is not None and (newest := ckpt.latest_checkpoint(root)):
        log.info("%s: resuming the run's newest checkpoint %s", why, newest)
        return newest
    if resume is False and why is not None:  # restarted before its first checkpoint
        return None
    if resume is False:
        if ckpt.latest_checkpoint(root) is not None:
            raise UserError(
                f"{root} already holds checkpoints; pass trainer.resume=true to continue that "
                f"run, or another run_name to start a new one"
            )
        return None
    if resume is True:
        path = ckpt.latest_checkpoint(root)
        if path is None:
            report_warning(nothing_to_resume(root), log)
        return path
    path = Path(resume)
    if not path.exists():
        raise UserError(f"trainer.resume={resume}: no such checkpoint")
    try:  # a checkpoint, or the newest of a checkpoints dir or a run dir
        return artefact.resolve_source(path)
    except UserError:
        raise UserError(f"trainer.resume={resume}: holds no complete checkpoint") from None


def nothing_to_resume(root: Path) -> str:
    """What `trainer.resume=true` found when `root` holds no checkpoint: where it looked, and
    the runs beside it with names like this one's that do hold checkpoints (a mistyped
    run_name)."""
    run_dir = root.parent
    line = f"trainer.resume=true found nothing to resume in {root}: starting a new run at step 0"
    if not run_dir.parent.is_dir():
        return line
    names = [p.name for p in run_dir.parent.iterdir() if p.is_dir() and p != run_dir]
    close = difflib.get_close_matches(run_dir.name, names, n=5, cutoff=0.5)
    near = [n for n in close if ckpt.latest_checkpoint(run_dir.parent / n / "checkpoints")]
    if near:
        line += f" (similar runs with checkpoints: {', '.join(near)}; is run_name right?)"
    return line


def check_compatible(path: Path, saved: Description, pm: ParallelModel) -> None:
    """The checkpoint's model must be this run's (same expert count, same tensor shapes), and
    it must hold AdamW's state of every parameter this run trains. The verdict is the same on
    every rank (it looks at the whole model, not at what this rank holds)."""
    moe_saved, moe_now = saved.model.moe, pm.module.cfg.moe
    experts = [0 if m is None else m.num_experts for m in (moe_saved, moe_now)]
    if experts[0] != experts[1]:
        raise UserError(
            f"checkpoint {path} has moe.num_experts={experts[0]}, this run "
            f"moe.num_experts={experts[1]}"
        )
    want = global_shapes(pm.module, pm.mesh.layout.ep_size)
    have = {k[len(MODEL) :]: v.shape for k, v in saved.tensors.items() if k.startswith(MODEL)}
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    shapes = [
        f"{k}: checkpoint {tuple(have[k])} vs model {tuple(want[k])}"
        for k in sorted(want.keys() & have.keys())
        if list(have[k]) != list(want[k])
    ]
    if missing or unexpected or shapes:
        raise UserError(
            f"checkpoint {path} does not match the model: missing keys {_short(missing)}, "
            f"unexpected keys {_short(unexpected)}, shape mismatches {_short(shapes)}"
        )
    trained = [n for n, p in pm.module.named_parameters() if p.requires_grad]
    untracked = [n for n in trained if optim_key("exp_avg", n) not in saved.tensors]
    if untracked:
        raise UserError(
            f"checkpoint {path} holds no AdamW state for {len(untracked)} parameters this run "
            f"trains ({_short(untracked, 3)}): it was saved by a run that trained less "
            f"(finetune.train); start from its weights with trainer.init_from={path}"
        )


def _short(items: list[str], limit: int = 8) -> str:
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + more + "]"


class Checkpoints:
    """A run's checkpoints dir and best model, saved from and loaded into a backend."""

    def __init__(
        self,
        run_dir: Path,
        pm: ParallelModel,
        model_cfg: ModelConfig,
        tokenizer: str | None,
        keep: int,
    ) -> None:
        self.run_dir, self.root = Path(run_dir), Path(run_dir) / "checkpoints"
        self.pm, self.model_cfg, self.tokenizer, self.keep = pm, model_cfg, tokenizer, keep

    def _description(self, kind: str, task: TaskInfo, with_optimizer: bool) -> Description:
        module, layout = self.pm.module, self.pm.mesh.layout
        shapes = global_shapes(module, layout.ep_size)
        keys = [MODEL + name for name in shapes]
        if with_optimizer:
            trained = [n for n, p in module.named_parameters() if p.requires_grad]
            keys += [optim_key(k, n) for n in trained for k in (*MOMENTS, "step")]
        # dtypes are filled in from what the ranks saved
        tensors = {k: TensorInfo(key_shape(k, shapes), "float32") for k in keys}
        return Description(kind, self.model_cfg, task, tensors)

    def save(self, step: int, backend: Backend, task: TaskInfo, trainer: dict[str, Any]) -> Path:
        """Write checkpoints/step_{step} (every rank takes part) and prune old ones."""
        layout = self.pm.mesh.layout
        description = self._description("checkpoint", task, with_optimizer=True)
        description.step = step
        description.layout = {
            "world": layout.world,
            "ep_size": layout.ep_size,
            "backend": backend.name,
        }
        trainer = {**trainer, "backend": backend.extra_state()}
        return ckpt.save_checkpoint(
            self.root, description, backend.state(), trainer, self.pm.mesh, self.tokenizer,
            self.keep,
        )  # fmt: skip

    def load(self, path: Path, backend: Backend, task: TaskInfo) -> dict[str, Any]:
        """Check the checkpoint at `path` against this run's model and task, restore the
        backend's state and this rank's RNG, and return the trainer state. A bad checkpoint is
        reported with the next older one to try."""
        try:
            checkpoint = ckpt.open_checkpoint(path, self.pm.mesh)
            saved = checkpoint.description
            check_compatible(checkpoint.path, saved, self.pm)
            if (saved.task.kind, saved.task.labels) != (task.kind, task.labels):
                raise UserError(
                    f"trainer.resume: {checkpoint.path} was trained for task={saved.task.kind} "
                    f"with labels {saved.task.labels}, this run is task={task.kind} with "
                    f"labels {task.labels}; start a new run with trainer.init_from="
                    f"{checkpoint.path}"
                )
            trainer = checkpoint.json(ckpt.TRAINER)
            backend.load(checkpoint.read, trainer.get("backend") or {})
            ckpt.restore_rng(checkpoint, self.pm.mesh.layout.rank)
        except UserError as e:
            path = Path(path)
            older = [p for p in ckpt.complete_checkpoints(path.parent) if p != path]
            hint = (
                f"; to resume from an earlier one pass trainer.resume={older[-1]}" if older else ""
            )
            raise UserError(f"{e}{hint}") from e
        return trainer

    def save_best(self, backend: Backend, task: TaskInfo, best: dict[str, Any]) -> Path:
        """Write the model as it is now to run_dir/best (a model dir, replaced whole) with
        best.json {step, metric, value} inside; every rank writes its own pieces."""
        description = self._description("model", task, with_optimizer=False)
        description.source = (
            f"{self.run_dir} step {best['step']} ({best['metric']}={best['value']})"
        )
        return artefact.write(
            self.run_dir / BEST_DIR, description, backend.model_state(), self.pm.mesh,
            files={BEST_INFO: json_bytes(best, BEST_INFO)}, tokenizer=self.tokenizer,
            overwrite=True,
        )  # fmt: skip
