"""The data sources' typed configs (`data=synthetic|hf_text|local_text|hf_labels`), part of
the job's schema in xpar.config."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from xpar.checks import UserError, at_least


@dataclass
class DataConfig:
    """What every data source shares. `batch_size` is the GLOBAL batch in sequences per
    optimizer step (over ranks and accumulation micro-steps); `micro_batch_size` is per rank per
    forward pass (None: the whole per-rank share at once)."""

    kind: str = MISSING
    seq_len: int = 64
    batch_size: int = 32
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        at_least("data.seq_len", self.seq_len, 1)
        at_least("data.batch_size", self.batch_size, 1)
        if self.micro_batch_size is not None:
            at_least("data.micro_batch_size", self.micro_batch_size, 1)

    def accumulation(self, dp_world: int) -> tuple[int, int]:
        """(micro batch per rank, micro-steps per optimizer step) for `dp_world` data ranks."""
        if self.batch_size % dp_world:
            raise UserError(
                f"data.batch_size={self.batch_size} is not divisible by the {dp_world} "
                f"data-parallel ranks"
            )
        per_rank = self.batch_size // dp_world
        micro = self.micro_batch_size or per_rank
        if per_rank % micro:
            raise UserError(
                f"data.micro_batch_size={micro} must divide data.batch_size / ranks = "
                f"{self.batch_size} / {dp_world} = {per_rank}"
            )
        return micro, per_rank // micro


@dataclass
class SyntheticDataConfig(DataConfig):
    """The embedded corpus (xpar.data.synthetic): a mixture of sparse Markov chains."""

    kind: str = "synthetic"
    vocab_size: int | None = None  # None: the model's vocab
    num_domains: int = 4
    branching: int = 4
    concentration: float = 1.0
    num_train: int = 32768
    num_val: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size is not None:
            at_least("data.vocab_size", self.vocab_size, 2)
        at_least("data.num_domains", self.num_domains, 1)
        at_least("data.concentration", self.concentration, 0.0, strict=True)
        at_least("data.num_train", self.num_train, 1)
        at_least("data.num_val", self.num_val, 1)
        at_least("data.branching", self.branching, 1)
        if self.vocab_size is not None and self.branching > self.vocab_size:
            raise UserError(
                f"data.branching={self.branching} must be <= data.vocab_size={self.vocab_size}"
            )


@dataclass
class HFTextDataConfig(DataConfig):
    """Text through Hugging Face `datasets` and a `transformers` tokenizer, packed into
    seq_len + 1 token blocks. `path` is a hub dataset name or a builder (text, json, csv,
    parquet) reading `data_files`; `tokenizer` is a hub name or a local directory."""

    kind: str = "hf_text"
    path: str = MISSING
    config_name: str | None = None
    data_files: list[str] | None = None
    split: str = "train"
    val_split: str | None = None  # None: hold out val_fraction of the documents
    val_fraction: float = 0.05
    max_val_sequences: int = 512
    text_column: str = "text"
    tokenizer: str = MISSING
    streaming: bool = False
    shuffle_buffer: int = 10000  # streaming: blocks per shuffle window
    num_proc: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        at_least("data.max_val_sequences", self.max_val_sequences, 1)
        at_least("data.shuffle_buffer", self.shuffle_buffer, 1)
        if self.num_proc is not None:
            at_least("data.num_proc", self.num_proc, 1)


@dataclass
class HFLabelsDataConfig(DataConfig):
    """Labelled examples through Hugging Face `datasets` for task=classify|tag: a hub name or a
    builder (csv, json, parquet) reading `data_files` (and `val_files` for validation; else
    `val_split`, else `val_fraction` held out). classify reads `text_column` and
    `label_column`; tag reads a list of words (`tokens_column`) and a list of tags
    (`tags_column`), the tag on each word's first sub-token. Examples longer than seq_len
    tokens are truncated."""

    kind: str = "hf_labels"
    path: str = MISSING
    config_name: str | None = None
    data_files: list[str] | None = None
    val_files: list[str] | None = None
    split: str = "train"
    val_split: str | None = None
    val_fraction: float = 0.1
    text_column: str = "text"
    label_column: str = "label"
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    tokenizer: str = MISSING
    num_proc: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.num_proc is not None:
            at_least("data.num_proc", self.num_proc, 1)
