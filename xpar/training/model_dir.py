"""Model directories: a model's weights and architecture without any training state, the form
in which weights travel between runs (`trainer.init_from`), the best model a run keeps, and
`python -m xpar.hf` (upcycled and imported models; the source of exports).

A model dir holds `model.safetensors` (the single-process state dict), `xpar_model.json` (the
ModelConfig, what the weights were trained for, and where they came from) and, when the model
has one, `tokenizer/` (saved with `transformers`). It is written into a temp dir beside its
final place and renamed there, so a failed write leaves nothing behind.

`read_model` also reads training checkpoints (plain or DeepSpeed, a `step_N`, a `checkpoints/`
dir or a run dir): their architecture and task come from the run's `.hydra/config.yaml`, their
label names from the checkpoint's trainer state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from xpar.checks import UserError
from xpar.model import ModelConfig
from xpar.training import checkpoint as ckpt

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
INFO = "xpar_model.json"
TOKENIZER = "tokenizer"


@dataclass
class TaskInfo:
    """What the weights were trained for: `lm`, or a task head over `labels` (in id order)."""

    kind: str = "lm"
    labels: list[str] | None = None
    pooling: str | None = None  # classify: last | mean


@dataclass
class ModelFiles:
    """A model read from disk: global (single-process) CPU weights and their architecture."""

    path: Path
    model: ModelConfig
    state: dict[str, Tensor]
    task: TaskInfo
    tokenizer: str | None  # a local dir (or hub name) the tokenizer loads from


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """A (nested) config dataclass from its asdict() form; dataclass-typed fields, optional or
    not, are rebuilt from their dicts. Unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown {cls.__name__} fields {unknown}")
    kwargs = {}
    for key, value in data.items():
        kind = hints[key]
        union = typing.get_origin(kind) in (typing.Union, types.UnionType)
        args = typing.get_args(kind) if union else (kind,)
        sub = next((a for a in args if dataclasses.is_dataclass(a)), None)
        if sub is not None and isinstance(value, dict):
            value = _from_dict(sub, value, where)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from e


def model_config_from_dict(data: dict[str, Any], where: str = "model config") -> ModelConfig:
    return _from_dict(ModelConfig, dict(data), where)


# ---- writing -------------------------------------------------------------------------------


def check_out_dir(out: Path, overwrite: bool = False) -> None:
    """Refuse an output path that is a file, or a non-empty dir unless `overwrite`, before any
    work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; pick another output dir")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; pick a new output dir (nothing was written)")


@contextmanager
def staged_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temp dir beside `out` to write into; on success it is fsynced and renamed to `out`
    (an existing `out` is moved aside first and deleted after), on failure removed, so `out`
    is never half-written."""
    out = Path(out)
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        ckpt.fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = None
    if out.exists():
        aside = out.parent / f".old-{out.name}-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(out, aside)
    os.replace(tmp, out)
    ckpt.fsync(out.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def write_model_dir(
    out: Path,
    state: dict[str, Tensor],
    model: ModelConfig,
    task: TaskInfo | None = None,
    tokenizer: str | Path | None = None,
    source: str = "",
    overwrite: bool = False,
) -> Path:
    """Write a model dir at `out` atomically and return its path. A non-empty `out` is refused
    unless `overwrite` (then it is replaced whole, never left half-written)."""
    info = {
        "format_version": FORMAT_VERSION,
        "model": model_config_to_dict(model),
        "task": dataclasses.asdict(task or TaskInfo()),
        "tokenizer": TOKENIZER if tokenizer is not None else None,
        "source": source,
    }
    info_bytes = ckpt.json_bytes(info, "model info")  # fails before anything is written
    with staged_dir(out, overwrite) as tmp:
        ckpt.write_file(tmp / WEIGHTS, ckpt.to_cpu(state))
        if tokenizer is not None:
            save_tokenizer(str(tokenizer), tmp / TOKENIZER)
        ckpt.write_file(tmp / INFO, info_bytes)
    return Path(out)


def save_tokenizer(name: str, out: Path) -> Any:
    """Copy a tokenizer (a local dir, a hub name or `byt5`) into `out` with transformers, and
    return it."""
    from xpar.data.hf_text import load_tokenizer  # transformers; only with a tokenizer

    tokenizer = load_tokenizer(name, model_vocab=sys.maxsize)
    tokenizer.save_pretrained(out)
    return tokenizer


# ---- reading -------------------------------------------------------------------------------


def is_model_dir(path: Path) -> bool:
    return (Path(path) / INFO).is_file()


def resolve_source(path: str | Path) -> Path:
    """The model dir or checkpoint `path` names: itself, or the newest complete checkpoint of
    a `checkpoints/` dir or of a run dir."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model dir or checkpoint")
    if is_model_dir(path) or ckpt.read_meta(path) is not None:
        return path
    for root in (path, path / "checkpoints"):
        if root.is_dir() and (newest := ckpt.latest_checkpoint(root)) is not None:
            return newest
    raise UserError(
        f"{path} is neither a model dir (no {INFO}) nor a checkpoint, checkpoints dir or run "
        f"dir holding a complete checkpoint"
    )


def read_model_info(path: str | Path) -> tuple[ModelConfig, TaskInfo, str | None]:
    """A model's architecture, task and tokenizer, without reading its weights."""
    source = resolve_source(path)
    if is_model_dir(source):
        info = _read_info(source)
        task = _from_dict(TaskInfo, info.get("task") or {}, str(source / INFO))
        tokenizer = source / TOKENIZER if info.get("tokenizer") else None
        model = model_config_from_dict(info["model"], str(source / INFO))
        return model, task, None if tokenizer is None else str(tokenizer)
    return _checkpoint_info(source)


def read_model(path: str | Path) -> ModelFiles:
    """Weights and architecture from a model dir or any training checkpoint (see module doc)."""
    from xpar.training import zero_checkpoint as zc  # DeepSpeed-free, but only when needed

    source = resolve_source(path)
    model, task, tokenizer = read_model_info(source)
    if is_model_dir(source):
        state = read_weights(source / WEIGHTS)
    elif zc.is_zero_checkpoint(source):
        zc.verify(source)
        state = zc.read_as_plain(source).model_state
    else:
        ckpt.verify(source)
        state = read_weights(source / WEIGHTS)
    return ModelFiles(source, model, state, task, tokenizer)


def read_weights(file: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors; a truncated or corrupt file is a UserError."""
    try:
        return load_file(file)
    except (OSError, SafetensorError) as e:
        raise UserError(f"{file} is unreadable: {str(e).splitlines()[0]}") from e


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads((path / INFO).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / INFO} is unreadable: {e}") from e
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"{path / INFO} has format_version={version}; this xpar reads {FORMAT_VERSION}"
        )
    return info


def _checkpoint_info(step_dir: Path) -> tuple[ModelConfig, TaskInfo, str | None]:
    """A training checkpoint's architecture and task, from its run's resolved config (the
    checkpoint sits at <run dir>/checkpoints/step_N) and its trainer state."""
    from omegaconf import OmegaConf

    config_path = step_dir.parent.parent / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise UserError(
            f"{step_dir} is a checkpoint without its run's config ({config_path} is missing), "
            f"so its architecture is unknown; point at a checkpoint inside its run dir"
        )
    cfg = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    assert isinstance(cfg, dict)
    model = model_config_from_dict({**cfg["model"], "moe": cfg.get("moe")}, str(config_path))
    saved = ckpt.read_json(step_dir / "trainer.json").get("task") or {}
    section = cfg.get("task") or {}
    task = TaskInfo(
        kind=saved.get("kind", section.get("kind", "lm")),
        labels=saved.get("labels"),
        pooling=saved.get("pooling", section.get("pooling")),
    )
    tokenizer = (cfg.get("data") or {}).get("tokenizer")
    return model, task, tokenizer
