"""Sharded tensors on disk through torch.distributed.checkpoint (DCP) and its safetensors
storage: every rank writes the pieces it holds and reads the pieces its layout needs, whatever
layout wrote them, and nothing is gathered. Nothing here unpickles: the files are safetensors,
whose JSON headers are DCP's metadata, and only tensors are handed to DCP (it would pickle
anything else).

Every tensor is stored flat. A rank hands over `Fragment`s, each a 1-D view of the elements
[offset, offset + n) of a flattened global tensor. A replicated tensor is one fragment covering
all of it on every rank (DCP writes it once, spreading such tensors over the ranks by size); an
expert bank sharded over EP ranks, a ZeRO partition's piece of a parameter and an FSDP shard
are contiguous ranges of the flattened tensor too.

Files: one per rank and layer (`file_index`). DCP's safetensors writer builds each file in
memory before writing it, so a save holds at most one such file's bytes beyond the state itself.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

_LAYER = re.compile(r"(?:^|[./])layers\.(\d+)\.")


@dataclasses.dataclass
class Fragment:
    """Elements [offset, offset + local.numel()) of a flattened tensor of `numel` elements;
    `local` is a 1-D view onto the rank's own memory (written from, or read into)."""

    local: Tensor
    offset: int
    numel: int

    @classmethod
    def whole(cls, t: Tensor) -> Fragment:
        """All of `t` (replicated, or held by one process)."""
        return cls(t.detach().view(-1), 0, t.numel())

    def size(self) -> torch.Size:
        return torch.Size([self.numel])

    # DCP's checkpointable protocol (torch.distributed._checkpointable), as DTensor has it.
    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        chunk = self.__create_chunk_list__()[0]
        return [
            WriteItem(
                index=MetadataIndex(fqn, chunk.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=chunk,
                    properties=TensorProperties.create_from_tensor(self.local),
                    size=self.size(),
                ),
            )
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size([self.offset]), torch.Size([self.local.numel()]))]


def file_index(key: str) -> int:
    """The file (per rank) a key goes to: 1 for tensors outside the layers, 2 + i for layer i."""
    m = _LAYER.search(key)
    return 1 if m is None else 2 + int(m.group(1))


class _SavePlanner(DefaultSavePlanner):
    """DCP's planner over a flat dict of Fragments."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> Tensor:
        return self.state_dict[index.fqn].local


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's planner over a flat dict of Fragments, read in place into their views."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        # DefaultLoadPlanner's own set-up would replace values that are not tensors by None.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> Tensor:
        return self.state_dict[index.fqn].local


class _Writer(HuggingFaceStorageWriter):
    """DCP's safetensors writer, one file per (rank, layer): each rank buckets its own items
    (DCP would hand every rank the coordinator's bucketing, which lacks keys it does not hold)."""

    def __init__(self, path: Path, keys: list[str]) -> None:
        self._files = {key: file_index(key) for key in keys}
        super().__init__(str(path), save_distributed=True)

    def write_data(self, plan, planner):
        storage = {**plan.storage_data, "fqn_to_index_mapping": self._files}
        return super().write_data(dataclasses.replace(plan, storage_data=storage), planner)


@contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP warns that it saves or loads in a single process: what a world of one means to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def save(
    state: dict[str, Fragment], path: Path, distributed: bool
) -> tuple[list[Path], dict[str, str]]:
    """Write `state` under `path` (every rank of the default process group takes part when
    `distributed`). Returns the files this process wrote, and every key's saved dtype (over
    all ranks)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank() if distributed else 0
    writer, planner = _Writer(path, list(state)), _SavePlanner()
    with _one_process_quietly():
        metadata = dcp.save(state, storage_writer=writer, planner=planner, no_dist=not distributed)
    dtypes = {
        key: str(md.properties.dtype).removeprefix("torch.")
        for key, md in metadata.state_dict_metadata.items()
    }
    return sorted(path.glob(f"shard-{rank + 1:05d}-*.safetensors")), dtypes


def load(state: dict[str, Fragment], path: Path, distributed: bool) -> None:
    """Read every key of `state` from `path` into its fragment's view (every rank of the
    default process group takes part when `distributed`)."""
    reader = HuggingFaceStorageReader(str(path))
    with _one_process_quietly():
        dcp.load(state, storage_reader=reader, planner=_LoadPlanner(), no_dist=not distributed)
