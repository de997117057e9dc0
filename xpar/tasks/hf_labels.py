"""Labelled examples through Hugging Face `datasets` (`data=hf_labels`), tokenised by a
`transformers` tokenizer into rows of xpar.tasks.rows' layout.

- classify: `data.text_column` is tokenised (EOS appended when the tokenizer has one, so that
  last-token pooling reads a fixed end marker) and labelled by `data.label_column`.
- tag: `data.tokens_column` holds a list of words and `data.tags_column` a tag per word; each
  word is tokenised on its own and its tag goes on its first sub-token (the rest get -100).

Label names: an integer ClassLabel feature's own names (in id order); otherwise the sorted
distinct values of the training split. Examples longer than data.seq_len tokens are truncated
(logged once). Errors name the field: a column missing from a split, and a label of the
validation split that the training split does not have.

Legend: N examples, W row width.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

from datasets import ClassLabel, Dataset, Features, List, Value
from torch import Tensor

from xpar.checks import UserError
from xpar.data import DataBundle, Sharding
from xpar.data.config import HFLabelsDataConfig
from xpar.data.hf_text import (
    check_data_files,
    hold_out,
    load_split,
    load_tokenizer,
)
from xpar.data.loader import TensorSequences
from xpar.tasks.config import TaskConfig
from xpar.tasks.rows import IGNORE, pack_classify, pack_tag

log = logging.getLogger(__name__)

IDS = List(Value("int32"))
ENCODED = {
    "classify": Features({"ids": IDS, "label": Value("int64"), "truncated": Value("bool")}),
    "tag": Features({"ids": IDS, "labels": List(Value("int64")), "truncated": Value("bool")}),
}


def _load(cfg: HFLabelsDataConfig, files: list[str] | None, split: str, field: str) -> Dataset:
    return load_split(cfg, files, split, field, "csv|json|parquet")


def _splits(cfg: HFLabelsDataConfig, seed: int) -> tuple[Dataset, Dataset, str]:
    """(train, validation, how the validation split is named in errors)."""
    train = _load(cfg, cfg.data_files, cfg.split, "data.split")
    if cfg.val_files:
        return train, _load(cfg, cfg.val_files, "train", "data.val_files"), "data.val_files"
    if cfg.val_split is not None:
        val = _load(cfg, cfg.data_files, cfg.val_split, "data.val_split")
        return train, val, f"data.val_split={cfg.val_split!r}"
    kept, held = hold_out(train, cfg, seed, "example(s)", "add data or set data.val_files")
    return kept, held, "the data.val_fraction held out"


def _columns(cfg: HFLabelsDataConfig, kind: str) -> dict[str, str]:
    """{field: column} of the two columns the task reads, inputs first."""
    if kind == "classify":
        return {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column}
    return {"data.tokens_column": cfg.tokens_column, "data.tags_column": cfg.tags_column}


def _check_columns(ds: Dataset, columns: dict[str, str], where: str) -> None:
    for field, column in columns.items():
        if column not in ds.column_names:
            raise UserError(
                f"{field}={column!r} is not a column of {where}; its columns are {ds.column_names}"
            )


def _class_label(ds: Dataset, column: str) -> ClassLabel | None:
    feature = ds.features[column]
    feature = getattr(feature, "feature", feature)  # a list's elements (tag)
    return feature if isinstance(feature, ClassLabel) else None


def _values(ds: Dataset, column: str, kind: str) -> set:
    if kind == "classify":
        return set(ds.unique(column))
    return set(itertools.chain.from_iterable(ds[column]))


def label_names(train: Dataset, field: str, column: str, kind: str) -> tuple[list[str], dict]:
    """(label names in id order, {value in the column: id})."""
    feature = _class_label(train, column)
    if feature is not None:
        return list(feature.names), {i: i for i in range(feature.num_classes)}
    values = _values(train, column, kind)
    if None in values:
        raise UserError(f"{field}={column!r} has examples without a label in the training split")
    ordered = sorted(values)
    names = [str(v) for v in ordered]
    if len(names) < 2:
        raise UserError(
            f"{field}={column!r} holds {len(names)} distinct label(s) {names} in the training "
            f"split; a {kind} head needs at least 2"
        )
    return names, {v: i for i, v in enumerate(ordered)}


def _check_seen(ds: Dataset, field: str, column: str, kind: str, to_id: dict, where: str) -> None:
    unseen = sorted((v for v in _values(ds, column, kind) if v not in to_id), key=str)
    if unseen:
        raise UserError(
            f"{field}={column!r}: label {unseen[0]!r} of {where} does not occur in the training "
            f"split ({len(unseen)} such label(s)); the head only knows the training labels"
        )


def _encode_classify(
    batch: dict[str, list], tokenizer: Any, columns: list[str], to_id: dict, seq_len: int
) -> dict[str, list]:
    text, label = columns
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    docs = tokenizer([t or "" for t in batch[text]], add_special_tokens=False)["input_ids"]
    docs = [(doc + eos) or [0] for doc in docs]  # never empty: pooling needs a token
    return {
        "ids": [doc[:seq_len] for doc in docs],
        "label": [to_id[v] for v in batch[label]],
        "truncated": [len(doc) > seq_len for doc in docs],
    }


def _encode_tag(
    batch: dict[str, list], tokenizer: Any, columns: list[str], to_id: dict, seq_len: int
) -> dict[str, list]:
    words_col, tags_col = columns
    out: dict[str, list] = {"ids": [], "labels": [], "truncated": []}
    for words, tags in zip(batch[words_col], batch[tags_col], strict=True):
        if len(words) != len(tags):
            raise UserError(
                f"data.tags_column={tags_col!r} has {len(tags)} tags for the {len(words)} words "
                f"of data.tokens_column={words_col!r} in an example; give one tag per word"
            )
        pieces = tokenizer(list(words), add_special_tokens=False)["input_ids"] if words else []
        ids, labels = [], []
        for piece, tag in zip(pieces, tags, strict=True):
            ids += piece
            labels += [to_id[tag], *[IGNORE] * (len(piece) - 1)][: len(piece)]
        out["ids"].append(ids[:seq_len])
        out["labels"].append(labels[:seq_len])
        out["truncated"].append(len(ids) > seq_len)
    return out


def _encode(
    ds: Dataset, cfg: HFLabelsDataConfig, kind: str, tokenizer: Any, to_id: dict, name: str
) -> tuple[Tensor, int]:
    """(rows [N, W], how many examples were truncated)."""
    columns = list(_columns(cfg, kind).values())
    encoded = ds.map(
        _encode_classify if kind == "classify" else _encode_tag,
        batched=True,
        remove_columns=ds.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "columns": columns,
            "to_id": to_id,
            "seq_len": cfg.seq_len,
        },  # fmt: skip
        features=ENCODED[kind],
        num_proc=cfg.num_proc,
        desc=f"tokenising {name}",
    )
    labels = encoded["label" if kind == "classify" else "labels"]
    pack = pack_classify if kind == "classify" else pack_tag
    return pack(encoded["ids"], labels, cfg.seq_len), sum(encoded["truncated"])


def build_hf_labels(
    cfg: HFLabelsDataConfig, task: TaskConfig, model_vocab: int, shard: Sharding
) -> DataBundle:
    """Labelled rows for `task` from `cfg`, served as this rank's share of each global batch."""
    check_data_files(cfg)
    kind = task.kind
    tokenizer = load_tokenizer(cfg.tokenizer, model_vocab)
    train, val, val_name = _splits(cfg, shard.seed)
    columns = _columns(cfg, kind)
    _check_columns(train, columns, f"the training split ({cfg.path})")
    _check_columns(val, columns, f"the validation split ({val_name})")
    field, column = list(columns.items())[1]
    labels, to_id = label_names(train, field, column, kind)
    _check_seen(val, field, column, kind, to_id, f"the validation split ({val_name})")
    train_NW, cut_train = _encode(train, cfg, kind, tokenizer, to_id, "train")
    val_NW, cut_val = _encode(val, cfg, kind, tokenizer, to_id, "validation")
    if cut_train + cut_val:
        log.info(
            "%d of %d examples are longer than data.seq_len=%d tokens and were truncated",
            cut_train + cut_val, len(train_NW) + len(val_NW), cfg.seq_len,
        )  # fmt: skip
    loader = shard.loader(TensorSequences(train_NW), cfg.batch_size)
    description = (
        f"hf_labels {kind}: {cfg.path} ({', '.join(cfg.data_files or [])}), {len(labels)} "
        f"labels, tokenizer {cfg.tokenizer}, {len(train_NW)} train / {len(val_NW)} val "
        f"examples of up to {cfg.seq_len} tokens"
    )
    return DataBundle(
        loader, TensorSequences(val_NW), model_vocab, None, description, labels, cfg.tokenizer
    )
