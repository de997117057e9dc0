"""xpar.data.hf_text offline: local text/json/parquet files, a tokenizer trained here and saved
as a directory, and the in-memory ByT5 tokenizer."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import huggingface_hub
import pandas as pd
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerFast

from xpar.checks import UserError
from xpar.data import Sharding
from xpar.data.config import HFTextDataConfig
from xpar.data.hf_text import PACK_BATCH, StreamLoader, build_hf_text
from xpar.training.inputs import build_data

from distributed import free_port
from jobs import build

REPO = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(12)]
NUM_DOCS = 2500  # more than one packing batch
VOCAB = 4096
L = 16  # seq_len + 1 in these tests
FORMATS = {"text": ("txt", "text"), "json": ("jsonl", "body"), "parquet": ("parquet", "body")}


@pytest.fixture(autouse=True)
def _offline(hf_offline):
    """Every test here runs without network (conftest.hf_offline)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """NUM_DOCS documents, each opening with its own tag word `d<i>`, as text, jsonl and
    parquet files, and a word-level tokenizer trained on them, saved as a directory."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [" ".join([f"d{i}", *rng.choices(WORDS, k=rng.randint(1, 8))]) for i in range(NUM_DOCS)]
    (root / "docs.txt").write_text("\n".join(docs) + "\n")
    rows = [{"id": i, "body": doc} for i, doc in enumerate(docs)]
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(root / "docs.parquet")
    word_level = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"])
    word_level.train_from_iterator(docs, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="</s>", unk_token="[UNK]")
    tok.save_pretrained(root / "tok")
    tok = AutoTokenizer.from_pretrained(root / "tok")
    vocab = tok.get_vocab()
    return {
        "root": root,
        "tok": str(root / "tok"),
        "ids": [tok(doc)["input_ids"] + [tok.eos_token_id] for doc in docs],
        "tag_of": {vocab[f"d{i}"]: i for i in range(NUM_DOCS)},
    }


def _cfg(corpus: dict, tmp_path: Path, **kw) -> HFTextDataConfig:
    args = {
        "path": "text",
        "data_files": [str(corpus["root"] / "docs.txt")],
        "tokenizer": corpus["tok"],
        "seq_len": L - 1,
        "batch_size": 8,
        "cache_dir": str(tmp_path / "cache"),
    }
    return HFTextDataConfig(**(args | kw))


def _blocks(corpus: dict, lo: int, hi: int) -> list[list[int]]:
    """Documents lo..hi packed by hand from the tokenizer's own ids: EOS after each document,
    cut into blocks of L inside each batch of PACK_BATCH documents (dropping its tail)."""
    blocks = []
    for start in range(lo, hi, PACK_BATCH):
        ids = [i for doc in corpus["ids"][start : min(start + PACK_BATCH, hi)] for i in doc]
        blocks += [ids[i : i + L] for i in range(0, len(ids) - L + 1, L)]
    return blocks


def _tags(corpus: dict, tokens: torch.Tensor) -> set[int]:
    """The documents whose tag word appears in `tokens`."""
    return {corpus["tag_of"][t] for t in tokens.flatten().tolist() if t in corpus["tag_of"]}


def _all(source) -> torch.Tensor:
    return source.take(list(range(len(source))))


def _steps(loader, n: int) -> list[torch.Tensor]:
    return [torch.cat(loader.next_step()) for _ in range(n)]


def _files(corpus: dict, fmt: str) -> dict:
    """The config keys that read the corpus in file format `fmt`."""
    ext, column = FORMATS[fmt]
    return {"path": fmt, "data_files": [str(corpus["root"] / f"docs.{ext}")], "text_column": column}


@pytest.mark.parametrize("fmt", ["text", "json", "parquet"])
def test_files_pack_into_blocks_of_the_tokenizers_ids(corpus, tmp_path, fmt):
    cfg = _cfg(
        corpus,
        tmp_path,
        **_files(corpus, fmt),
        split="train[:80%]",
        val_split="train[80%:]",
        max_val_sequences=50,
    )
    bundle = build_hf_text(cfg, VOCAB, Sharding(micro_batch=4))
    train_NL, val_NL = _all(bundle.train.source), _all(bundle.val)
    assert train_NL.tolist() == _blocks(corpus, 0, 2000)  # the first 80% of the documents
    assert val_NL.tolist() == _blocks(corpus, 2000, NUM_DOCS)[:50]  # max_val_sequences
    assert _tags(corpus, train_NL) <= set(range(2000)) and min(_tags(corpus, val_NL)) == 2000
    assert bundle.vocab_size == VOCAB and bundle.floor is None
    assert f"{len(train_NL)} train / 50 val blocks of {L} tokens" in bundle.description


def test_val_fraction_holds_out_whole_documents_and_maps_are_cached(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path, val_fraction=0.1)
    bundle = build_hf_text(cfg, VOCAB, Sharding(micro_batch=8))
    train_tags, val_tags = _tags(corpus, _all(bundle.train.source)), _tags(corpus, _all(bundle.val))
    assert not train_tags & val_tags
    assert 240 <= len(val_tags) <= 250 and len(train_tags | val_tags) >= NUM_DOCS - 10
    again = build_hf_text(cfg, VOCAB, Sharding(micro_batch=8))
    files = bundle.train.source.blocks.cache_files
    assert files and again.train.source.blocks.cache_files == files  # both maps from the cache
    assert torch.equal(_all(again.train.source), _all(bundle.train.source))


def test_tiny_inputs_keep_one_document_for_validation(tmp_path):
    (tmp_path / "three.txt").write_text("first line\nsecond line\nthird line\n")
    cfg = HFTextDataConfig(
        path="text",
        data_files=[str(tmp_path / "three.txt")],
        tokenizer="byt5",
        seq_len=3,
        batch_size=2,
        val_fraction=0.05,
        cache_dir=str(tmp_path / "cache"),
    )
    bundle = build_hf_text(cfg, 384, Sharding(micro_batch=2))
    val_text = ByT5Tokenizer().decode(_all(bundle.val).flatten().tolist())
    assert val_text in ("first li", "second l", "third li")  # one line's first 2 blocks of 4
    (tmp_path / "one.txt").write_text("a single line\n")
    with pytest.raises(UserError, match="holds 1 document.*data.val_fraction"):
        build_hf_text(
            dataclasses.replace(cfg, data_files=[str(tmp_path / "one.txt")]), 384, Sharding(2)
        )


def test_arrow_loader_is_deterministic_resumable_and_split_by_rank(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path, batch_size=64)
    a, b = (build_hf_text(cfg, VOCAB, Sharding(micro_batch=16, seed=3)).train for _ in range(2))
    first = _steps(a, 3)
    assert all(torch.equal(x, y) for x, y in zip(first, _steps(b, 3), strict=True))
    state = json.loads(json.dumps(a.state_dict()))
    expected = _steps(a, 20)  # runs past the end of the epoch
    assert a.epoch == 1
    resumed = build_hf_text(cfg, VOCAB, Sharding(micro_batch=16, seed=3)).train
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, _steps(resumed, 20), strict=True))
    ranks = [build_hf_text(cfg, VOCAB, Sharding(16, r, 2, seed=3)).train for r in range(2)]
    steps = [torch.cat(_steps(r, 3)) for r in ranks]
    assert steps[0].shape == (96, L)
    assert not {tuple(x) for x in steps[0].tolist()} & {tuple(x) for x in steps[1].tolist()}
    assert torch.equal(torch.cat([steps[0][:32], steps[1][:32]]), first[0])


@pytest.mark.parametrize("fmt", ["text", "parquet"])
def test_stream_resumes_exactly_across_windows_and_epochs(corpus, tmp_path, fmt):
    stream_args = {"streaming": True, "max_val_sequences": 4, "shuffle_buffer": 7}
    cfg = _cfg(corpus, tmp_path, **_files(corpus, fmt), **stream_args)
    bundle = build_hf_text(cfg, VOCAB, Sharding(micro_batch=2, seed=1))
    stream = _blocks(corpus, 0, NUM_DOCS)
    assert _all(bundle.val).tolist() == stream[:4]  # the stream's first blocks
    steps = (len(stream) - 4) // 8  # in the first epoch
    epoch = torch.cat(_steps(bundle.train, steps)).tolist()
    # no val block, none twice, each window of 7 blocks in its own random order
    assert {tuple(x) for x in epoch} <= {tuple(x) for x in stream[4:]}
    assert len({tuple(x) for x in epoch}) == len(epoch)
    assert sorted(epoch[:7]) == sorted(stream[4:11]) and epoch[:7] != stream[4:11]
    for k in (0, 3, 7, steps - 1):  # mid-window, at window edges, across the epoch's end
        a = build_hf_text(cfg, VOCAB, Sharding(micro_batch=2, seed=1)).train
        _steps(a, k)
        state = json.loads(json.dumps(a.state_dict()))
        b = build_hf_text(cfg, VOCAB, Sharding(micro_batch=2, seed=1)).train
        b.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(_steps(a, 6), _steps(b, 6), strict=True))
    assert a.epoch == b.epoch == 1
    ranks = [build_hf_text(cfg, VOCAB, Sharding(2, r, 2, seed=1)).train for r in range(2)]
    seen = [{tuple(x) for x in torch.cat(_steps(r, steps)).tolist()} for r in ranks]
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 4 * steps


def test_stream_overfit_repeats_the_first_batches(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path, streaming=True, max_val_sequences=4)
    loader = build_hf_text(cfg, VOCAB, Sharding(micro_batch=8, overfit_batches=2)).train
    steps = _steps(loader, 4)
    assert torch.equal(steps[0], steps[2]) and torch.equal(steps[1], steps[3])
    assert sorted(torch.cat(steps[:2]).tolist()) == sorted(_blocks(corpus, 0, NUM_DOCS)[4:20])


def test_stream_loader_serves_every_block_once_per_epoch_and_resumes_anywhere():
    """Epochs that end exactly at a window's end, two shards split between two ranks."""
    blocks = Dataset.from_dict({"input_ids": [[i] * 3 for i in range(12)]})
    stream = blocks.to_iterable_dataset(num_shards=2)
    loader = StreamLoader(stream, 4, Sharding(micro_batch=2, seed=5), window=4, vocab=12)
    steps = _steps(loader, 9)  # three epochs
    assert [s.shape for s in loader.next_step()] == [(2, 3), (2, 3)]
    for epoch in range(3):
        ids = torch.cat(steps[3 * epoch : 3 * epoch + 3])[:, 0]
        assert sorted(ids.tolist()) == list(range(12))
    for k in range(10):
        a = StreamLoader(stream, 4, Sharding(micro_batch=2, seed=5), window=4, vocab=12)
        _steps(a, k)
        b = StreamLoader(stream, 4, Sharding(micro_batch=2, seed=5), window=4, vocab=12)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        assert all(torch.equal(x, y) for x, y in zip(_steps(a, 4), _steps(b, 4), strict=True))
    ranks = [StreamLoader(stream, 4, Sharding(2, r, 2), window=4, vocab=12) for r in (0, 1)]
    firsts = [set(torch.cat(_steps(r, 3))[:, 0].tolist()) for r in ranks]
    assert firsts[0] | firsts[1] == set(range(12)) and not firsts[0] & firsts[1]
    with pytest.raises(UserError, match="training stream: token id 11 is outside"):
        _steps(StreamLoader(stream, 12, Sharding(micro_batch=12), window=4, vocab=11), 1)


def _error(corpus: dict, tmp_path: Path, case: str, monkeypatch) -> UserError:
    vocab, kw = VOCAB, {}
    if case == "no_file":
        kw = {"data_files": [str(tmp_path / "x" / "*.txt")]}
    elif case == "offline_hub":
        kw = {"path": "no_such_user/no_such_dataset", "data_files": None}
    elif case == "empty_file":
        (tmp_path / "empty.txt").write_text("")
        kw = {"data_files": [str(tmp_path / "empty.txt")]}
    elif case == "no_tokenizer":
        kw = {"tokenizer": str(tmp_path / "no_tokenizer")}
    elif case == "no_column":
        kw = {"text_column": "body"}
    elif case == "too_small":
        kw = {"seq_len": 100_000}
    elif case == "big_tokenizer":
        vocab = 20
    elif case == "bad_json_line":  # datasets names neither the file nor the line (0-based row)
        lines = [json.dumps({"text": f"doc {i}"}) for i in range(4)]
        (tmp_path / "docs.jsonl").write_text("\n".join([*lines[:2], "{bad", *lines[2:]]) + "\n")
        kw = {"path": "json", "data_files": [str(tmp_path / "docs.jsonl")]}
    elif case == "bad_json_document":
        (tmp_path / "doc.json").write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
        kw = {"path": "json", "data_files": [str(tmp_path / "doc.json")]}
    elif case == "hub_unreachable":  # not cached, and the hub's port is closed: no retries
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
        kw = {"tokenizer": "no-such-org/no-such-tokenizer"}
    with pytest.raises(UserError) as info:
        build_hf_text(_cfg(corpus, tmp_path, **kw), vocab, Sharding(micro_batch=8))
    return info.value


@pytest.mark.parametrize(
    "case, names",
    [
        ("no_file", "data.data_files=["),
        ("offline_hub", "data.path='no_such_user/no_such_dataset'"),
        ("empty_file", "empty.txt'] holds no document: the files are empty"),
        ("no_tokenizer", "data.tokenizer="),
        ("no_column", "data.text_column='body' is not among the columns ['text']"),
        ("too_small", "tokens, too few for one block of data.seq_len + 1 = 100001"),
        ("big_tokenizer", "but model.vocab_size=20"),
        ("bad_json_line", "docs.jsonl line 3 is not JSON (Expecting property name"),
        ("bad_json_document", "doc.json line 3 is not JSON"),
        ("hub_unreachable", "is not in the local Hugging Face cache and the hub (127.0.0.1)"),
    ],
)
def test_bad_input_is_a_one_line_user_error(corpus, tmp_path, case, names, monkeypatch):
    start = time.monotonic()
    message = str(_error(corpus, tmp_path, case, monkeypatch))
    assert names in message and "\n" not in message
    assert "data.path=text|json" not in message or case == "offline_hub"  # json was set
    assert time.monotonic() - start < 30  # the hub client's retries took most of a minute


@pytest.mark.parametrize("where", ["validation split", "train blocks", "training stream"])
def test_token_ids_beyond_the_model_vocab_stop_on_the_cpu(tmp_path, where):
    """A tokenizer whose ids have gaps passes the len() check; the blocks are still checked, the
    validation split at start-up and the training batches at every step."""
    vocab = {"[UNK]": 0, "</s>": 1, "alpha": 2, "beta": 40}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="</s>", unk_token="[UNK]")
    tok.save_pretrained(tmp_path / "tok")
    assert len(tok) == 4
    (tmp_path / "a.txt").write_text("alpha alpha\n" * 40 + "alpha beta\n" * 40)
    splits = {
        "validation split": {"split": "train[:50%]", "val_split": "train[50%:]"},
        "train blocks": {"split": "train[50%:]", "val_split": "train[:50%]"},
        "training stream": {"streaming": True, "max_val_sequences": 2},  # val: 2 alpha blocks
    }[where]
    cfg = HFTextDataConfig(
        path="text",
        data_files=[str(tmp_path / "a.txt")],
        tokenizer=str(tmp_path / "tok"),
        seq_len=5,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
        **splits,
    )
    with pytest.raises(UserError, match=f"{where}: token id 40 .*model.vocab_size=10"):
        bundle = build_hf_text(cfg, 10, Sharding(micro_batch=4))
        assert where != "validation split"
        for _ in range(20):
            bundle.train.next_step()


def test_byt5_and_the_local_text_preset_run_offline(tmp_path, monkeypatch):
    """conf/data/local_text.yaml as it is, from another directory than the checkout (its
    default file is the checkout's README): ByT5 needs no files, and the preset gives the
    model the 384 embeddings it needs."""
    monkeypatch.chdir(tmp_path)
    job = build(["data=local_text", f"data.cache_dir={tmp_path}"])
    assert job.model.vocab_size == 384
    bundle = build_data(job.data, job.model_config().vocab_size, Sharding(micro_batch=8))
    assert f"text files {REPO}/README.md, tokenizer byt5 (384 tokens)" in bundle.description
    readme, tok = (REPO / "README.md").read_text(), ByT5Tokenizer()
    eos = 0
    for tokens_BL in [*bundle.train.next_step(), bundle.val.take([0])]:
        assert tokens_BL.shape[1] == 129
        for row in tokens_BL.tolist():  # a window may lie inside one long line: no EOS in it
            pieces = tok.decode(row).split("</s>")  # lines, EOS after each
            assert all(p in readme for p in pieces), pieces
            eos += len(pieces) - 1
    assert eos > 0
    small = build(["data=local_text", "model.vocab_size=256", f"data.cache_dir={tmp_path}"])
    with pytest.raises(UserError, match="data.tokenizer='byt5' has 384 tokens but model.vocab"):
        build_data(small.data, small.model_config().vocab_size, Sharding(micro_batch=8))
