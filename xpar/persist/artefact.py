"""Artefacts: directories that hold a model's weights and describe themselves. Two kinds share
one layout, so every reader takes either:

- a model dir (`kind: model`): weights only, the form weights travel in between runs
  (`trainer.init_from`), the best model a run keeps, and what `python -m xpar.hf` writes;
- a checkpoint (`kind: checkpoint`, xpar.persist.checkpoint): the weights plus the optimizer
  state and what the trainer needs to go on (trainer.json, each rank's rng/rank_R.json).

    meta.json     the manifest: what it holds (xpar.persist.describe) and every file's sha256
    state/        the tensors, sharded (xpar.persist.sharded): safetensors, one file per rank
                  and layer of the process that wrote them
    tokenizer/    the tokenizer, when the weights have one (saved with transformers)

Written through the one atomic writer (xpar.persist.staged); read by any layout, each rank
reading only what it holds. Model dirs of xpar's first format (model.safetensors beside
xpar_model.json) are still read (xpar.persist.legacy).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xpar.checks import UserError, short_list
from xpar.model import ModelConfig
from xpar.parallel.mesh import Mesh
from xpar.persist import legacy, sharded
from xpar.persist.describe import TOKENIZER, Description, TaskInfo, TensorInfo
from xpar.persist.fragments import MODEL
from xpar.persist.sharded import Fragment
from xpar.persist.staged import MANIFEST, Staged, read_json, read_manifest, verify, write_bytes

STATE = "state"
_STEP_DIR = re.compile(r"step_(\d+)")


def save_tokenizer(name: str, out: Path) -> Any:
    """Copy a tokenizer (a local dir, a hub name or `byt5`) into `out` with transformers, and
    return it."""
    from xpar.data.hf_text import load_tokenizer  # transformers; only with a tokenizer

    tokenizer = load_tokenizer(name, model_vocab=sys.maxsize)
    tokenizer.save_pretrained(out)
    return tokenizer


def write(
    final: Path,
    description: Description,
    state: dict[str, Fragment],
    mesh: Mesh | None = None,
    files: dict[str, bytes] | None = None,
    rank_files: dict[str, bytes] | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an artefact at `final` atomically: every rank its pieces of `state` and its
    `rank_files`, rank 0 the `files`, the tokenizer (copied from `tokenizer`, a name or dir)
    and the manifest. `description.tensors` gets each key's dtype as saved."""
    mesh = mesh or Mesh.solo()
    rank0 = mesh.layout.rank == 0
    with Staged(final, mesh, overwrite) as staged:
        own, dtypes = sharded.save(state, staged.tmp / STATE, mesh.distributed)
        for name, data in {**(rank_files or {}), **((files or {}) if rank0 else {})}.items():
            write_bytes(staged.tmp / name, data)
            own.append(staged.tmp / name)
        if rank0 and tokenizer is not None:
            save_tokenizer(tokenizer, staged.tmp / TOKENIZER)
            own += [p for p in (staged.tmp / TOKENIZER).rglob("*") if p.is_file()]
        description.tokenizer = TOKENIZER if tokenizer is not None else None
        assert dtypes.keys() == description.tensors.keys(), "saved keys differ from described"
        for key, info in description.tensors.items():
            info.dtype = dtypes[key]
        return staged.commit(own, description.manifest())


def complete_checkpoints(root: Path) -> list[Path]:
    """`step_N` dirs under root whose manifest parses, oldest first (hashes unchecked)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and read_manifest(p) is not None:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (by step), or None."""
    complete = complete_checkpoints(Path(root))
    return complete[-1] if complete else None


def resolve_source(path: str | Path) -> Path:
    """The artefact `path` names: itself, or the newest complete checkpoint of a
    `checkpoints/` dir or of a run dir."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model dir or checkpoint")
    if (path / MANIFEST).is_file() or legacy.is_model_dir(path):
        return path
    for root in (path, path / "checkpoints"):
        if root.is_dir() and (newest := latest_checkpoint(root)) is not None:
            return newest
    raise UserError(
        f"{path} is neither a model dir nor a checkpoint (no {MANIFEST}), nor a checkpoints "
        f"dir or run dir holding a complete checkpoint"
    )


@dataclass
class Artefact:
    """An artefact opened for reading (its files checked against the manifest)."""

    path: Path
    description: Description
    mesh: Mesh

    @property
    def tokenizer(self) -> str | None:
        """The dir its tokenizer loads from, when it has one."""
        name = self.description.tokenizer
        return None if name is None else str(self.path / name)

    def json(self, name: str) -> Any:
        return read_json(self.path / name)

    def read_whole(self, prefix: str = "") -> dict[str, Tensor]:
        """Every tensor whose key starts with `prefix`, whole and flat, in this one process."""
        infos = {k: v for k, v in self.description.tensors.items() if k.startswith(prefix)}
        tensors = {k: torch.empty(v.numel, dtype=v.torch_dtype) for k, v in infos.items()}
        self.read({k: Fragment.whole(t) for k, t in tensors.items()})
        return tensors

    def read(self, state: dict[str, Fragment]) -> None:
        """Read every key of `state` into its fragment (every rank of the mesh takes part);
        keys the artefact lacks, or of another size, are a UserError naming them."""
        missing = sorted(set(state) - set(self.description.tensors))
        if missing:
            raise UserError(f"{self.path} lacks {short_list(missing, 4)}")
        for key, fragment in state.items():
            saved = self.description.tensors[key].numel
            if saved != fragment.numel:
                raise UserError(
                    f"{self.path}: {key} has {saved} elements, this run {fragment.numel}"
                )
        if legacy.is_model_dir(self.path):
            legacy.read_weights(self.path, state)
        else:
            sharded.load(state, self.path / STATE, self.mesh.distributed)


def open_artefact(path: str | Path, mesh: Mesh | None = None) -> Artefact:
    """The artefact at `path` (see resolve_source), its files checked (ranks share the
    hashing); a missing, corrupt or foreign one is a UserError on every rank."""
    mesh = mesh or Mesh.solo()
    path = resolve_source(path)
    if legacy.is_model_dir(path):
        return Artefact(path, legacy.describe_model_dir(path), mesh)
    meta = verify(path, mesh)
    # DCP's reader takes every safetensors file under state/: none may be unlisted.
    present = {str(p.relative_to(path)) for p in (path / STATE).rglob("*") if p.is_file()}
    if unlisted := sorted(present - set(meta["files"])):
        raise UserError(f"{path} holds files its {MANIFEST} does not list: {unlisted[:3]}")
    return Artefact(path, Description.from_manifest(meta, path), mesh)


def is_artefact(path: Path) -> bool:
    return read_manifest(path) is not None or legacy.is_model_dir(path)


# ---- model dirs from one process -----------------------------------------------------------


@dataclass
class ModelFiles:
    """A model read into one process: global (single-device) CPU weights and what they are."""

    path: Path
    model: ModelConfig
    state: dict[str, Tensor]
    task: TaskInfo
    tokenizer: str | None  # a dir the tokenizer loads from


def read_model(path: str | Path) -> ModelFiles:
    """The weights of any artefact (a model dir, a checkpoint, or a checkpoints or run dir)
    as the single-device model's state dict, in this one process."""
    art = open_artefact(path)
    d = art.description
    flat = art.read_whole(MODEL)
    state = {k[len(MODEL) :]: t.view(d.tensors[k].shape) for k, t in flat.items()}
    return ModelFiles(art.path, d.model, state, d.task, art.tokenizer)


def read_model_info(path: str | Path) -> tuple[ModelConfig, TaskInfo, str | None]:
    """An artefact's architecture, task and tokenizer, without reading its weights."""
    path = resolve_source(path)
    if legacy.is_model_dir(path):
        d = legacy.describe_model_dir(path)
    else:
        meta = read_manifest(path)
        if meta is None:
            raise UserError(f"{path} is incomplete or corrupt: {MANIFEST} does not parse")
        d = Description.from_manifest(meta, path)
    return d.model, d.task, None if d.tokenizer is None else str(path / d.tokenizer)


def write_model_dir(
    out: Path,
    state: dict[str, Tensor],
    model: ModelConfig,
    task: TaskInfo | None = None,
    tokenizer: str | Path | None = None,
    source: str = "",
    overwrite: bool = False,
) -> Path:
    """Write the single-device state dict `state` as a model dir at `out`, atomically; a
    non-empty `out` is refused unless `overwrite` (then replaced whole)."""
    tensors = {MODEL + k: TensorInfo.of(t.shape, t.dtype) for k, t in state.items()}
    description = Description("model", model, task or TaskInfo(), tensors, source=source)
    fragments = {MODEL + k: Fragment.whole(t.detach().cpu().contiguous()) for k, t in state.items()}
    name = None if tokenizer is None else str(tokenizer)
    return write(Path(out), description, fragments, tokenizer=name, overwrite=overwrite)
