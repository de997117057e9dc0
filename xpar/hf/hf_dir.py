"""Local Hugging Face checkpoint dirs: the config, tensors read on demand from the safetensors
file or its shards, the tokenizer, and writing a new checkpoint dir atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import Tensor

from xpar.checks import UserError
from xpar.persist.artefact import save_tokenizer
from xpar.persist.describe import FORMAT_VERSION
from xpar.persist.staged import Staged, fsync, write_bytes

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
HF_KIND = "huggingface"  # what xpar's manifest of a Hugging Face dir says it is
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def read_hf_config(path: Path, config_classes: dict[str, type], command: str) -> Any:
    """The transformers config of the checkpoint at `path`, parsed by the class its
    `model_type` names; a model_type outside `config_classes` is a UserError listing them."""
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is not a Hugging Face checkpoint dir (no config.json)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is unreadable: {e}") from e
    model_type = raw.get("model_type")
    if model_type not in config_classes:
        raise UserError(
            f"{file}: model_type={model_type!r} is not supported by `xpar.hf {command}`; "
            f"supported: {sorted(config_classes)}"
        )
    try:
        return config_classes[model_type].from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{file}: {str(e).splitlines()[0]}") from e


def open_safetensors(file: Path) -> Any:
    """safetensors' lazy reader of `file`; a missing, truncated or corrupt file is a UserError."""
    try:
        return safe_open(file, "pt")
    except (OSError, SafetensorError) as e:
        raise UserError(f"{file} is unreadable: {str(e).splitlines()[0]}") from e


class HFWeights:
    """The tensors of a local checkpoint by name, each read when it is taken. Tracks what was
    never taken, so a converter can refuse tensors it does not understand."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if (path / INDEX).is_file():
            try:
                index = json.loads((path / INDEX).read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise UserError(f"{path / INDEX} is unreadable: {str(e).splitlines()[0]}") from e
            self._file_of = {name: path / shard for name, shard in index.items()}
        elif (path / SINGLE).is_file():
            with open_safetensors(path / SINGLE) as f:
                self._file_of = {name: path / SINGLE for name in f.keys()}  # noqa: SIM118
        else:
            raise UserError(
                f"{path} holds no {SINGLE} or {INDEX}; only safetensors checkpoints are read "
                f"(re-save it with transformers' save_pretrained)"
            )
        self._handles: dict[Path, Any] = {}
        self._untaken = set(self._file_of)

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def take(self, *names: str) -> Tensor:
        """The first of `names` the checkpoint holds (alternatives name one tensor in the
        layouts different transformers versions write)."""
        for name in names:
            if name in self._file_of:
                file = self._file_of[name]
                if file not in self._handles:
                    self._handles[file] = open_safetensors(file)
                self._untaken.discard(name)
                return self._handles[file].get_tensor(name)
        raise UserError(f"the checkpoint lacks the tensor {names[0]!r}")

    def skip(self, name: str) -> None:
        """Mark a tensor as understood without reading it (a tied head's copy)."""
        self._untaken.discard(name)

    def untaken(self) -> list[str]:
        """Tensors never taken, less the rotary tables old checkpoints carry (derived)."""
        return sorted(n for n in self._untaken if not n.endswith(".rotary_emb.inv_freq"))


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / name).is_file() for name in _TOKENIZER_FILES)


def write_hf_dir(
    out: Path, config: dict[str, Any], state: dict[str, Tensor], tokenizer: str | None
) -> Path:
    """Write config.json, model.safetensors and the tokenizer into a temp dir beside `out`,
    then rename it into place (xpar's meta.json, with every file's sha256, beside them): a
    failure leaves no half-written checkpoint. The tokenizer's special token ids go into the
    config, since the model alone does not know them."""
    with Staged(out) as staged:
        tmp = staged.tmp
        if tokenizer is not None:
            tok = save_tokenizer(tokenizer, tmp)
            ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
            config = {**config, **ids, "pad_token_id": tok.pad_token_id}
        tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
        save_file_hf(tensors, tmp / SINGLE)
        write_bytes(tmp / "config.json", json.dumps(config, indent=2).encode() + b"\n")
        return staged.commit(None, {"format_version": FORMAT_VERSION, "kind": HF_KIND})


def save_file_hf(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # transformers refuses safetensors files without the "pt" format tag.
    save_file(tensors, path, metadata={"format": "pt"})
    fsync(path)
