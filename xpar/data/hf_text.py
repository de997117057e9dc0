"""Text through Hugging Face `datasets`, tokenised by a `transformers` tokenizer and packed into
blocks of seq_len + 1 token ids: an arrow dataset (cached, random access) or a stream.

Legend: N blocks, L tokens per block (seq_len + 1), W blocks per shuffle window, b micro-batch.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import socket
from typing import Any
from urllib.parse import urlparse

import torch
from datasets import Dataset, Features, IterableDataset, List, Value, load_dataset
from datasets.distributed import split_dataset_by_node
from datasets.exceptions import DatasetsError
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
from huggingface_hub import constants as hf_constants
from torch import Tensor
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from xpar.checks import UserError
from xpar.data import DataBundle, Sharding
from xpar.data.config import HFLabelsDataConfig, HFTextDataConfig
from xpar.data.loader import TensorSequences, check_same_data, check_token_ids

BUILDERS = frozenset(_PACKAGED_DATASETS_MODULES)  # text, json, csv, parquet, ...
PACK_BATCH = 1000  # documents packed together (at least L); each batch drops its partial tail
IDS = List(Value("int32"))  # a fixed schema, so that a split without text still has its column


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_tokenizer(name: str, model_vocab: int) -> PreTrainedTokenizerBase:
    """`name` from the hub or a local directory; "byt5" is the byte-level ByT5 tokenizer, which
    needs no files. Its vocabulary must fit the model's embedding."""
    if name == "byt5":
        tokenizer = ByT5Tokenizer()
    elif name.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise UserError(f"data.tokenizer={name!r} is no directory; give a tokenizer directory")
    else:
        tokenizer = _pretrained_tokenizer(os.path.expanduser(name))
    if len(tokenizer) > model_vocab:
        raise UserError(
            f"data.tokenizer={name!r} has {len(tokenizer)} tokens but model.vocab_size="
            f"{model_vocab}; raise model.vocab_size or use a smaller tokenizer"
        )
    return tokenizer


def _pretrained_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """A tokenizer dir; or a hub name, from the local cache, else from the hub. A hub that
    cannot be reached fails at once: the hub client would retry for most of a minute."""
    hint = "give a local tokenizer directory, 'byt5', or a hub name while online"
    if not os.path.isdir(name) and not hf_constants.HF_HUB_OFFLINE:
        try:
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            pass
        if (host := unreachable_hub()) is not None:
            raise UserError(
                f"data.tokenizer={name!r} is not in the local Hugging Face cache and the hub "
                f"({host}) cannot be reached; {hint}"
            )
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(
            f"data.tokenizer={name!r} could not be loaded ({first_line(e)}); {hint}"
        ) from e


def unreachable_hub(timeout_s: float = 3.0) -> str | None:
    """The hub's host when a connection to it fails within `timeout_s` (no proxy set, which
    would be the client's to use), else None."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    try:
        socket.create_connection((host, endpoint.port or 443), timeout=timeout_s).close()
    except OSError:
        return host
    return None


def check_data_files(cfg: HFTextDataConfig | HFLabelsDataConfig) -> None:
    """Local builders need data.data_files (and data.val_files, when set) that exist."""
    if cfg.path not in BUILDERS:
        return
    if not cfg.data_files:
        raise UserError(f"data.path={cfg.path!r} reads local files: set data.data_files")
    paths = [*cfg.data_files, *(getattr(cfg, "val_files", None) or [])]
    found = {p: glob.glob(p, recursive=True) for p in paths if "://" not in p}
    missing = [p for p, files in found.items() if not files]
    if missing:
        raise UserError(f"data.data_files={missing} matches no file")
    if found and all(os.path.getsize(f) == 0 for files in found.values() for f in files):
        raise UserError(f"data.data_files={cfg.data_files} holds no document: the files are empty")


def load_split(
    cfg: HFTextDataConfig | HFLabelsDataConfig,
    files: list[str] | None,
    split: str,
    field: str,
    builders: str,
    streaming: bool = False,
) -> Any:
    """`datasets.load_dataset` of one split of data.path; a failure is one line naming
    `field` and, for a hub name, the local `builders` that read data.data_files; for a local
    JSON file that does not parse, the file and its first bad line (1-based)."""
    try:
        return load_dataset(
            cfg.path,
            cfg.config_name,
            data_files=files,
            split=split,
            streaming=streaming,
            cache_dir=cfg.cache_dir,
        )
    except (OSError, ValueError, DatasetsError) as e:
        why = first_line(e) + (f": {first_line(e.__cause__)}" if e.__cause__ else "")
        if cfg.path == "json" and (bad := first_bad_json_line(files or [])):
            raise UserError(f"data.path='json': {bad}; fix or remove that line") from e
        if cfg.path in BUILDERS:
            raise UserError(
                f"data.path={cfg.path!r} could not read {files} ({field}={split!r}): {why}"
            ) from e
        raise UserError(
            f"data.path={cfg.path!r} ({field}={split!r}) could not be loaded ({why}); check the "
            f"name, or read local files with data.path={builders} and data.data_files"
        ) from e


def first_bad_json_line(patterns: list[str]) -> str | None:
    """`FILE line N is not JSON (why)`: the first line of the files `patterns` match that
    does not parse as one JSON value (JSON Lines), or where a file that is one JSON document
    over many lines breaks; None when every file parses."""
    for path in sorted({f for p in patterns for f in glob.glob(p, recursive=True)}):
        with open(path, encoding="utf-8", errors="replace") as f:
            numbered = ((n, line) for n, line in enumerate(f, 1) if line.strip())
            for index, (number, line) in enumerate(numbered):
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    if index > 0:
                        return f"{path} line {number} is not JSON ({e.msg})"
                    break  # the first line is no value alone: perhaps one document
            else:
                continue
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                json.load(f)
        except json.JSONDecodeError as e:
            return f"{path} line {e.lineno} is not JSON ({e.msg})"
    return None


def _load(cfg: HFTextDataConfig, field: str, split: str) -> tuple[Any, list[str]]:
    """(one split of the documents, its columns), with `cfg.text_column` among them."""
    docs = load_split(cfg, cfg.data_files, split, field, "text|json|csv|parquet", cfg.streaming)
    columns = docs.column_names
    if columns is None:  # a stream whose features are unknown until read: peek at one document
        columns = list(next(iter(docs), {}))
    if not columns:
        raise UserError(f"data.path={cfg.path!r} ({field}={split!r}) holds no document")
    if cfg.text_column not in columns:
        raise UserError(f"data.text_column={cfg.text_column!r} is not among the columns {columns}")
    return docs, columns


def _tokenise(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, column: str, eos: list[int]
) -> dict[str, list]:
    texts = [text for text in batch[column] if text]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return {"ids": [doc + eos for doc in ids if doc]}


def _cut(batch: dict[str, list], block: int) -> dict[str, list]:
    flat = list(itertools.chain.from_iterable(batch["ids"]))
    return {"input_ids": [flat[i : i + block] for i in range(0, len(flat) - block + 1, block)]}


def _map_args(cfg: HFTextDataConfig, desc: str) -> dict[str, Any]:
    """Arrow datasets map in `num_proc` processes with a progress bar; streams map lazily."""
    return {} if cfg.streaming else {"num_proc": cfg.num_proc, "desc": desc}


def _packed(
    loaded: tuple[Any, list[str]], cfg: HFTextDataConfig, tokenizer: Any, name: str
) -> tuple[Any, Any]:
    """(token ids per document with EOS after each, blocks of exactly L ids in `input_ids`).
    A full packing batch (at least L documents of at least one id) always yields a block, so
    a split without blocks is small."""
    docs, columns = loaded
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids = docs.map(
        _tokenise,
        batched=True,
        remove_columns=columns,
        fn_kwargs={"tokenizer": tokenizer, "column": cfg.text_column, "eos": eos},
        features=Features({"ids": IDS}),
        **_map_args(cfg, f"tokenising {name}"),
    )
    blocks = ids.map(
        _cut,
        batched=True,
        batch_size=max(PACK_BATCH, cfg.seq_len + 1),
        remove_columns=["ids"],
        fn_kwargs={"block": cfg.seq_len + 1},
        features=Features({"input_ids": IDS}),
        **_map_args(cfg, f"packing {name} into {cfg.seq_len + 1}-token blocks"),
    )
    return ids, blocks


def _too_small(ids: Any, cfg: HFTextDataConfig, name: str) -> UserError:
    tokens = sum(len(doc["ids"]) for doc in ids)  # a few blocks' worth at most: cheap
    hint = " or raise data.val_fraction" if name == "validation" and not cfg.val_split else ""
    return UserError(
        f"the {name} split of data.path={cfg.path!r} holds {tokens} tokens, too few for one "
        f"block of data.seq_len + 1 = {cfg.seq_len + 1}; add text, lower data.seq_len{hint}"
    )


def _arrow_blocks(
    loaded: tuple[Dataset, list[str]], cfg: HFTextDataConfig, tokenizer: Any, name: str
) -> Dataset:
    ids, blocks = _packed(loaded, cfg, tokenizer, name)
    if len(blocks) == 0:
        raise _too_small(ids, cfg, name)
    return blocks


def hold_out(
    rows: Dataset, cfg: HFTextDataConfig | HFLabelsDataConfig, seed: int, what: str, remedy: str
) -> tuple[Dataset, Dataset]:
    """(kept, held out): data.val_fraction of `rows` (at least one, and one fewer than all),
    drawn at random by `seed`."""
    if len(rows) < 2:
        raise UserError(
            f"data.path={cfg.path!r} holds {len(rows)} {what}, too few to hold out "
            f"data.val_fraction of them; {remedy}"
        )
    n_val = min(len(rows) - 1, max(1, round(cfg.val_fraction * len(rows))))
    parts = rows.train_test_split(test_size=n_val, seed=seed)
    return parts["train"], parts["test"]


def _arrow_splits(cfg: HFTextDataConfig, tokenizer: Any, seed: int) -> tuple[Dataset, Dataset]:
    """(train, val) blocks, cached by datasets. Without data.val_split, val_fraction of the
    documents (at least one, and one fewer than all) is held out at random by `seed` before
    packing, so no document reaches both splits."""
    train = _load(cfg, "data.split", cfg.split)
    if cfg.val_split is not None:
        val = _load(cfg, "data.val_split", cfg.val_split)
    else:
        docs, columns = train
        kept, held = hold_out(docs, cfg, seed, "document(s)", "add text or set data.val_split")
        train, val = (kept, columns), (held, columns)
    val_blocks = _arrow_blocks(val, cfg, tokenizer, "validation")
    val_blocks = val_blocks.select(range(min(len(val_blocks), cfg.max_val_sequences)))
    return _arrow_blocks(train, cfg, tokenizer, "train"), val_blocks


def _stream_splits(cfg: HFTextDataConfig, tokenizer: Any) -> tuple[IterableDataset, Tensor]:
    """(train stream, val blocks [N, L] in memory). Val is the first max_val_sequences blocks
    of data.val_split, or else of data.split, which the train stream then skips."""
    cap, name = cfg.max_val_sequences, "train"
    ids, blocks = _packed(_load(cfg, "data.split", cfg.split), cfg, tokenizer, name)
    train = blocks.skip(cap)
    if cfg.val_split is not None:
        train, name = blocks, "validation"
        ids, blocks = _packed(_load(cfg, "data.val_split", cfg.val_split), cfg, tokenizer, name)
    rows = [block["input_ids"] for block in blocks.take(cap)]
    if not rows:
        raise _too_small(ids, cfg, name)
    if cfg.val_split is None and len(rows) < cap:
        raise UserError(
            f"data.path={cfg.path!r} gives {len(rows)} blocks, all held out for validation by "
            f"data.max_val_sequences={cap}; lower it or set data.val_split"
        )
    return train, torch.tensor(rows, dtype=torch.long)


class ArrowSequences:
    """A SequenceSource over packed blocks in an arrow dataset (memory-mapped, so a take reads
    only the rows asked for); the ids are checked against the vocabulary on every take."""

    def __init__(self, blocks: Dataset, block_len: int, vocab_size: int, name: str) -> None:
        self.blocks = blocks.with_format("torch", columns=["input_ids"])
        self.block_len, self.vocab_size, self.name = block_len, vocab_size, name

    def __len__(self) -> int:
        return len(self.blocks)

    def take(self, indices: list[int]) -> Tensor:
        if not indices:
            return torch.empty(0, self.block_len, dtype=torch.long)
        tokens_NL = self.blocks[indices]["input_ids"].long()
        check_token_ids(tokens_NL, self.vocab_size, f"{self.name} blocks")
        return tokens_NL


class StreamLoader:
    """Training batches from a stream of blocks, for one data-parallel rank. The rank reads its
    part of the stream (datasets' split_dataset_by_node) in windows of W blocks and serves each
    window in a random order drawn from (seed, epoch, window); at the end of the stream the
    next epoch begins (datasets reorders the stream's shards by epoch). The position is
    datasets' own state_dict at the start of the window, which is exact through the batched
    maps, plus the blocks served from the window: a resume re-reads one window and goes on
    exactly where it stopped. (datasets' shuffle buffer is not used: its state_dict leaves the
    buffer's content out, so a resume would skip and reorder blocks.)"""

    def __init__(
        self, blocks: IterableDataset, global_batch: int, shard: Sharding, window: int, vocab: int
    ) -> None:
        self.blocks, self.shard, self.window, self.vocab_size = blocks, shard, window, vocab
        self.per_rank = global_batch // shard.dp_world
        self.epoch, self.index, self.served = 0, 0, 0  # index: the window's number in its epoch
        self.start: dict | None = None  # datasets' state at the window's start; None: epoch start
        self._stream: IterableDataset | None = None
        self._it: Any = None
        self._window_WL: Tensor | None = None

    def _open(self) -> None:
        """Read this rank's part of the stream from the current window's start."""
        self._stream = split_dataset_by_node(
            self.blocks, rank=self.shard.dp_rank, world_size=self.shard.dp_world
        )
        self._stream.set_epoch(self.epoch)
        if self.start is not None:
            self._stream.load_state_dict(self.start)
        self._it = iter(self._stream)

    def _fill(self) -> None:
        if self._it is None:
            self._open()
        rows = [block["input_ids"] for block in itertools.islice(self._it, self.window)]
        if not rows and self.index == 0:
            raise UserError(
                f"the training stream gives data rank {self.shard.dp_rank} of "
                f"{self.shard.dp_world} no block; add text or lower data.max_val_sequences"
            )
        seed = (self.shard.seed * 1_000_003 + self.epoch) * 1_000_003 + self.index
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed % 2**63))
        self._window_WL = torch.tensor(rows, dtype=torch.int32)[order]  # [0] when rows is empty

    def _advance(self) -> None:
        """On to the next window, or to the next epoch when the stream has run out."""
        assert self._window_WL is not None and self._stream is not None
        if len(self._window_WL) == self.window:
            self.start, self.index = self._stream.state_dict(), self.index + 1
        else:
            self.epoch, self.index, self.start, self._it = self.epoch + 1, 0, None, None
        self.served = 0
        self._fill()

    def next_step(self) -> list[Tensor]:
        """This rank's micro-batches [b, L] for the next optimizer step."""
        rows = []
        while (need := self.per_rank - sum(len(r) for r in rows)) > 0:
            if self._window_WL is None:
                self._fill()
            elif self.served == len(self._window_WL):
                self._advance()
            else:
                rows.append(self._window_WL[self.served : self.served + need])
                self.served += len(rows[-1])
        tokens_BL = torch.cat(rows).long()
        check_token_ids(tokens_BL, self.vocab_size, "training stream")
        return list(tokens_BL.split(self.shard.micro_batch))

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "epoch": self.epoch,
            "window": self.index,
            "start": self.start,
            "served": self.served,
            "per_rank": self.per_rank,
            "window_size": self.window,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_data(state, self.state_dict(), ("per_rank", "window_size"))
        self.epoch, self.index = int(state["epoch"]), int(state["window"])
        self.start, self.served = state["start"], int(state["served"])
        self._stream = self._it = self._window_WL = None


def _source(cfg: HFTextDataConfig) -> str:
    if cfg.path in BUILDERS:
        return f"{cfg.path} files {', '.join(cfg.data_files or [])}"
    return cfg.path if cfg.config_name is None else f"{cfg.path} ({cfg.config_name})"


def build_hf_text(cfg: HFTextDataConfig, model_vocab: int, shard: Sharding) -> DataBundle:
    """Documents from `cfg.path`, tokenised by `cfg.tokenizer` with EOS after each, packed into
    blocks of seq_len + 1 ids and served as this rank's share of each global batch."""
    check_data_files(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer, model_vocab)
    if not cfg.streaming:
        train_blocks, val_blocks = _arrow_splits(cfg, tokenizer, shard.seed)
        source = ArrowSequences(train_blocks, cfg.seq_len + 1, model_vocab, "train")
        train = shard.loader(source, cfg.batch_size)
        val_NL, n_train = val_blocks.with_format("torch")[:]["input_ids"].long(), str(len(source))
    else:
        stream, val_NL = _stream_splits(cfg, tokenizer)
        n_train = "streamed"
        if shard.overfit_batches:  # the first batches, in memory, as the arrow path serves them
            rows = [b["input_ids"] for b in stream.take(shard.overfit_batches * cfg.batch_size)]
            first = TensorSequences(torch.tensor(rows, dtype=torch.long))
            check_token_ids(first.tokens_NL, model_vocab, "training stream")
            train = shard.loader(first, cfg.batch_size)
        else:
            train = StreamLoader(stream, cfg.batch_size, shard, cfg.shuffle_buffer, model_vocab)
    check_token_ids(val_NL, model_vocab, "validation split")
    description = (
        f"hf_text: {_source(cfg)}, tokenizer {cfg.tokenizer} ({len(tokenizer)} tokens), "
        f"{n_train} train / {len(val_NL)} val blocks of {cfg.seq_len + 1} tokens"
    )
    return DataBundle(train, TensorSequences(val_NL), model_vocab, None, description)
