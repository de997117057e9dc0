"""What a data source hands the trainer (DataBundle), and how a rank reads it (Sharding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from xpar.data.loader import SequenceLoader, SequenceSource


class BatchStream(Protocol):
    """A rank's training batches: next_step() gives the micro-batches [b, L] of one optimizer
    step; state_dict()/load_state_dict() save and restore the position."""

    def next_step(self) -> list[Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class DataBundle:
    """Everything the trainer needs from a data source."""

    train: BatchStream
    val: SequenceSource
    vocab_size: int  # every token id lies in [0, vocab_size)
    floor: float | None  # nats/token the best possible model reaches on `val`, when known
    description: str  # one line for the console
    labels: list[str] | None = None  # a task's label names, in id order (None: the LM)
    tokenizer: str | None = None  # the tokenizer's name or directory, when the data has one


@dataclass(frozen=True)
class Sharding:
    """How this rank reads the data: its micro-batch and its place among data ranks."""

    micro_batch: int
    dp_rank: int = 0
    dp_world: int = 1
    seed: int = 0
    overfit_batches: int = 0

    def loader(
        self, source: SequenceSource, global_batch: int, name: str = "train"
    ) -> SequenceLoader:
        """This rank's shuffled, resumable batches over `source` (see SequenceLoader)."""
        return SequenceLoader(
            source,
            global_batch,
            self.micro_batch,
            self.dp_rank,
            self.dp_world,
            self.seed,
            self.overfit_batches,
            name,
        )
