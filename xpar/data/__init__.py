"""Training data: the embedded synthetic corpus or text through Hugging Face datasets, served
as deterministic, resumable batches of seq_len + 1 token ids per data-parallel rank (for a
task head, of labelled rows laid out as xpar.tasks.rows describes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from xpar.data.config import DataConfig, HFLabelsDataConfig, HFTextDataConfig, SyntheticDataConfig
from xpar.data.loader import (
    SequenceLoader,
    SequenceSource,
    TensorSequences,
    check_token_ids,
    eval_batches,
)
from xpar.data.synthetic import build_synthetic
from xpar.tasks.config import TaskConfig


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


def build_synthetic_data(cfg: SyntheticDataConfig, model_vocab: int, shard: Sharding) -> DataBundle:
    vocab = cfg.vocab_size or model_vocab
    splits = build_synthetic(
        vocab_size=vocab,
        seq_len=cfg.seq_len,
        num_domains=cfg.num_domains,
        branching=cfg.branching,
        concentration=cfg.concentration,
        num_train=cfg.num_train,
        num_val=cfg.num_val,
        seed=cfg.seed,
    )
    train = shard.loader(TensorSequences(splits.train_NL), cfg.batch_size)
    description = (
        f"synthetic corpus: {cfg.num_domains} Markov domains over {vocab} tokens, "
        f"{cfg.num_train} train / {cfg.num_val} val sequences of {cfg.seq_len + 1} tokens, "
        f"entropy floor {splits.floor:.4f} nats/token"
    )
    return DataBundle(train, TensorSequences(splits.val_NL), vocab, splits.floor, description)


def build_data(
    cfg: DataConfig, model_vocab: int, shard: Sharding, task: TaskConfig | None = None
) -> DataBundle:
    """The data bundle for `cfg` (a SyntheticDataConfig, HFTextDataConfig or, for a task,
    HFLabelsDataConfig); with a `task` other than lm, labelled rows (xpar.tasks.rows)."""
    kind = "lm" if task is None else task.kind
    if kind != "lm" and isinstance(cfg, SyntheticDataConfig):
        from xpar.tasks.synthetic import build_synthetic_task

        return build_synthetic_task(cfg, task, model_vocab, shard)
    if kind != "lm" and isinstance(cfg, HFLabelsDataConfig):
        from xpar.tasks.hf_labels import build_hf_labels  # datasets/transformers when used

        return build_hf_labels(cfg, task, model_vocab, shard)
    if isinstance(cfg, SyntheticDataConfig):
        return build_synthetic_data(cfg, model_vocab, shard)
    if isinstance(cfg, HFTextDataConfig):
        from xpar.data.hf_text import build_hf_text  # datasets/transformers load only if used

        return build_hf_text(cfg, model_vocab, shard)
    raise TypeError(f"no data source for {type(cfg).__name__}")


__all__ = [
    "BatchStream",
    "DataBundle",
    "SequenceLoader",
    "SequenceSource",
    "Sharding",
    "TensorSequences",
    "build_data",
    "check_token_ids",
    "eval_batches",
]
