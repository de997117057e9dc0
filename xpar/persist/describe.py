"""What an artefact holds, written into its manifest (meta.json) so that no reader looks
anywhere else: the model's architecture (the ModelConfig with its MoE layer), what its weights
were trained for (the task and its labels), whether a tokenizer is inside, the global shape and
dtype of every tensor, and, for a checkpoint, its step and the layout that wrote it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xpar.checks import UserError
from xpar.model import ModelConfig

FORMAT_VERSION = 2
KINDS = ("checkpoint", "model")
TOKENIZER = "tokenizer"  # the dir inside an artefact that holds its tokenizer
CONVERT = "python -m xpar.export"  # what turns an older checkpoint into this format


@dataclass
class TaskInfo:
    """What the weights were trained for: `lm`, or a task head over `labels` (in id order)."""

    kind: str = "lm"
    labels: list[str] | None = None
    pooling: str | None = None  # classify: last | mean


@dataclass
class TensorInfo:
    """A saved tensor's global shape and dtype (it is stored flat, in pieces)."""

    shape: list[int]
    dtype: str

    @classmethod
    def of(cls, shape: typing.Sequence[int], dtype: torch.dtype) -> TensorInfo:
        return cls([int(s) for s in shape], str(dtype).removeprefix("torch."))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class Description:
    """An artefact's own account of itself (see the module docstring)."""

    kind: str
    model: ModelConfig
    task: TaskInfo = field(default_factory=TaskInfo)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    tokenizer: str | None = None  # TOKENIZER when the artefact holds one
    step: int | None = None
    layout: dict[str, Any] | None = None  # checkpoints: world, ep_size, backend
    source: str = ""  # where the weights came from (free text)

    def manifest(self) -> dict[str, Any]:
        """The manifest fields (the file list is the writer's)."""
        body = dataclasses.asdict(self)
        return {"format_version": FORMAT_VERSION, **body}

    @classmethod
    def from_manifest(cls, meta: dict[str, Any], path: Path) -> Description:
        """Parse a manifest; an older or foreign one is a UserError saying what to do."""
        where = str(Path(path) / "meta.json")
        version = meta.get("format_version")
        if version == 1:
            raise UserError(
                f"{path} is a checkpoint in xpar's first format (gathered weights, or "
                f"DeepSpeed's own files); convert it once with `{CONVERT} {path} NEW_DIR` and "
                f"use NEW_DIR/step_N"
            )
        if version != FORMAT_VERSION:
            raise UserError(
                f"{where} has format_version={version!r}; this xpar reads 2 (and converts 1)"
            )
        kind = meta.get("kind")
        if kind not in KINDS:
            hint = "; bring it in with `python -m xpar.hf import`" if kind == "huggingface" else ""
            raise UserError(f"{path} holds a {kind!r} dir, not an xpar model or checkpoint{hint}")
        body = {k: v for k, v in meta.items() if k not in ("format_version", "files")}
        return from_dict(cls, body, where)


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """A (nested) config dataclass from its asdict() form; dataclass-typed fields (optional,
    or in a dict of them) are rebuilt from their dicts. Unknown keys are an error naming them."""
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
        if typing.get_origin(kind) is dict and isinstance(value, dict):
            sub = typing.get_args(kind)[1]
            if dataclasses.is_dataclass(sub):
                value = {k: from_dict(sub, v, where) for k, v in value.items()}
        sub = next((a for a in args if dataclasses.is_dataclass(a)), None)
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, where)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from e


def model_config_from_dict(data: dict[str, Any], where: str = "model config") -> ModelConfig:
    return from_dict(ModelConfig, dict(data), where)
