"""Model dirs of xpar's first format, still read: `model.safetensors` (the single-device state
dict) beside `xpar_model.json` (the architecture and task), no manifest. (Checkpoints of that
format are converted once by `python -m xpar.export`, see xpar.training.legacy.)"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from xpar.checks import UserError
from xpar.persist.describe import (
    TOKENIZER,
    Description,
    TaskInfo,
    TensorInfo,
    from_dict,
    model_config_from_dict,
)
from xpar.persist.sharded import Fragment

WEIGHTS = "model.safetensors"
INFO = "xpar_model.json"
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}  # fmt: skip


def is_model_dir(path: Path) -> bool:
    path = Path(path)
    return (path / INFO).is_file() and not (path / "meta.json").exists()


def _open(path: Path):
    try:
        return safe_open(Path(path) / WEIGHTS, "pt")
    except (OSError, SafetensorError) as e:
        raise UserError(f"{Path(path) / WEIGHTS} is unreadable: {str(e).splitlines()[0]}") from e


def describe_model_dir(path: Path) -> Description:
    """The Description of a first-format model dir, from its info file and tensor headers."""
    where = str(Path(path) / INFO)
    try:
        info = json.loads((Path(path) / INFO).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{where} is unreadable: {e}") from e
    if info.get("format_version") != 1:
        raise UserError(f"{where} has format_version={info.get('format_version')!r}; expected 1")
    tensors = {}
    with _open(path) as f:
        for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            piece = f.get_slice(name)
            shape, dtype = list(piece.get_shape()), _DTYPES[piece.get_dtype()]
            tensors[f"model/{name}"] = TensorInfo(shape, dtype)
    return Description(
        kind="model",
        model=model_config_from_dict(info["model"], where),
        task=from_dict(TaskInfo, info.get("task") or {}, where),
        tensors=tensors,
        tokenizer=TOKENIZER if info.get("tokenizer") else None,
        source=info.get("source", ""),
    )


def read_weights(path: Path, state: dict[str, Fragment]) -> None:
    """Fill `state` (`model/<name>` fragments) from a first-format model dir, reading only the
    expert rows a fragment needs when it is a run of whole rows."""
    with _open(path) as f:
        for key, fragment in state.items():
            piece = f.get_slice(key.removeprefix("model/"))
            shape = piece.get_shape()
            row = fragment.numel // shape[0] if shape else 1
            n = fragment.local.numel()
            if shape and fragment.offset % row == 0 and n % row == 0:
                lo = fragment.offset // row
                src = piece[lo : lo + n // row]
            else:
                src = piece[:].reshape(-1)[fragment.offset : fragment.offset + n]
            fragment.local.copy_(src.reshape(-1))
