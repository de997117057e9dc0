"""Task heads (task=classify|tag): metrics by hand, the row layouts, the embedded corpus'
classify and tag tasks trained to a stated score, labelled csv/json data offline, one-line
errors, and EP=2 evaluation equal to one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from xpar.checks import UserError
from xpar.data import Sharding
from xpar.persist import read_model
from xpar.tasks import metrics as M
from xpar.tasks.rows import IGNORE, pack_classify, pack_tag, unpack_classify, unpack_tag
from xpar.tasks.synthetic import TAGS, bio_tags
from xpar.training.inputs import build_data
from xpar.training.tracking import Tracker
from xpar.training.trainer import Trainer

from distributed import assert_all_ok, run_ranks
from jobs import build, compose_job, run_cli

# The embedded corpus made quick to learn: 32 tokens with 2 successors each per domain,
# sequences of 32, a 2-layer tiny model.
QUICK = [
    "trainer.device=cpu",
    "trainer.progress=false",
    "model.vocab_size=32",
    "model.n_layers=2",
    "data.num_train=2048",
    "data.num_val=256",
    "data.seq_len=32",
    "data.batch_size=32",
    "optim.warmup_steps=10",
    "trainer.log_every=10",
]


def make(run_dir: Path, overrides: list[str]) -> Trainer:
    """A trainer as `python -m xpar.train` builds it, with the run's resolved config written
    (what read_model reads a checkpoint's architecture from)."""
    composed = compose_job(overrides)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(composed, run_dir / ".hydra/config.yaml", resolve=True)
    config = OmegaConf.to_container(composed, resolve=True)
    return Trainer(build(overrides), run_dir, config)


# ---- metrics ---------------------------------------------------------------------------------


def test_classification_scores_by_hand():
    gold, pred = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 1, 0, 2])
    conf = M.confusion_matrix(gold, pred, 4).numpy()  # label 3: never seen nor predicted
    assert conf[:3, :3].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]] and conf[3].sum() == 0
    scores = M.classification_scores(conf)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    # F1 per label: 0.5 (p 1/2, r 1/2), 0.8 (p 2/3, r 1), 2/3 (p 1, r 1/2); label 3 left out
    assert scores["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    rows = M.classification_report(conf, ["a", "b", "c", "d"])
    assert [r["support"] for r in rows] == [2, 2, 2, 0]
    assert rows[1]["precision"] == pytest.approx(2 / 3) and rows[1]["recall"] == 1.0
    assert rows[3] == {"label": "d", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


@pytest.mark.parametrize(
    "tags,entities",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),
        # conlleval: an I- after O or another type begins an entity; B- always does
        (["I-PER", "I-PER", "B-PER", "I-LOC"], {("PER", 0, 1), ("PER", 2, 2), ("LOC", 3, 3)}),
        (["S-X", "B-Y", "E-Y", "O", "E-Y"], {("X", 0, 0), ("Y", 1, 2), ("Y", 4, 4)}),
        (["X", "X", "O", "Y"], {("X", 0, 1), ("Y", 3, 3)}),  # no prefix: IO tags
        (["O", "O"], set()),
    ],
)
def test_entity_spans_follow_seqeval(tags, entities):
    assert M.spans([M.parse_tag(t) for t in tags]) == entities


def test_entity_counts_need_type_and_both_boundaries():
    labels = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
    ids = {name: i for i, name in enumerate(labels)}
    gold = [[ids[t] for t in ("B-PER", "I-PER", "O", "B-LOC")], [ids["B-LOC"], ids["I-LOC"]]]
    pred = [[ids[t] for t in ("B-PER", "O", "O", "B-LOC")], [ids["B-PER"], ids["I-PER"]]]
    counts = M.entity_counts(gold, pred, labels)  # types LOC, PER: (tp, predicted, gold)
    assert counts.tolist() == [[1, 1, 2], [0, 2, 1]]
    assert M.tagging_scores(counts) == pytest.approx(
        {"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3}
    )
    assert [r["f1"] for r in M.tagging_report(counts, ["LOC", "PER"])] == pytest.approx([2 / 3, 0])


def test_rows_round_trip_and_synthetic_bio_tags():
    rows = pack_classify([[5, 6, 7], [8]], [1, 0], seq_len=4)
    assert rows.tolist() == [[5, 6, 7, 0, 3, 1], [8, 0, 0, 0, 1, 0]]
    tokens, lengths, labels = unpack_classify(rows)
    assert tokens.shape == (2, 4) and lengths.tolist() == [3, 1] and labels.tolist() == [1, 0]
    rows = pack_tag([[5, 6], [7, 8, 9]], [[2, IGNORE], [0, 1, 1]], seq_len=3)
    tokens, labels = unpack_tag(rows)
    assert tokens.tolist() == [[5, 6, 0], [7, 8, 9]]
    assert labels.tolist() == [[2, IGNORE, IGNORE], [0, 1, 1]]
    # vocab 16: LOW < 4, HIGH >= 12
    tags = bio_tags(torch.tensor([[0, 1, 5, 12, 13, 3, 15]]), vocab=16)
    assert [TAGS[i] for i in tags[0]] == ["B-LOW", "I-LOW", "O", "B-HIGH", "I-HIGH", "B-LOW",
                                          "B-HIGH"]  # fmt: skip


# ---- the embedded corpus -----------------------------------------------------------------------


def test_classify_reaches_95_percent_on_the_embedded_corpus(tmp_path):
    steps = ["trainer.max_steps=60", "trainer.eval_every=30", "trainer.save_every=60"]
    trainer = make(tmp_path, [*QUICK, "task=classify", "data.branching=2", *steps])
    assert trainer.data.labels == ["domain_0", "domain_1", "domain_2", "domain_3"]
    assert trainer.model.lm_head is None and trainer.model.head.weight.shape == (4, 64)
    result = trainer.fit()
    assert result.metrics["val_accuracy"] >= 0.95, result.metrics
    assert result.metrics["val_macro_f1"] >= 0.95
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [30, 60] and "val_gap" not in evals[0]
    (report,) = [r["label_report"] for r in records if "label_report" in r]
    saved = json.loads((tmp_path / "label_report.json").read_text())
    assert saved["step"] == 60 and saved["rows"] == report["rows"]
    assert [r["label"] for r in report["rows"]] == trainer.data.labels
    assert sum(r["support"] for r in report["rows"]) == 256
    model = read_model(tmp_path / "checkpoints/step_60")
    assert (model.task.kind, model.task.labels, model.task.pooling) == (
        "classify", trainer.data.labels, "last")  # fmt: skip


TAG_F1 = 0.90  # stated: entity F1 on the embedded corpus' tag task after 100 steps (~0.97)


def test_tag_reaches_the_stated_entity_f1(tmp_path):
    steps = ["trainer.max_steps=100", "trainer.eval_every=100", "trainer.save_every=100"]
    result = make(tmp_path, [*QUICK, "task=tag", *steps]).fit()
    assert result.metrics["val_f1"] >= TAG_F1, result.metrics
    rows = json.loads((tmp_path / "label_report.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["HIGH", "LOW"] and all(r["f1"] > 0.8 for r in rows)


def test_report_goes_to_wandb_as_a_table(tmp_path):
    logged = []

    class Run:
        summary: dict = {}

        def log(self, data, step):
            logged.append(data)

    from xpar.config import LoggerConfig

    tracker = Tracker(tmp_path, LoggerConfig(), {})
    tracker._run = Run()
    rows = [{"label": "a", "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}]
    tracker.log_report(7, "label", rows)
    tracker._run = None
    tracker.finish()
    table = logged[-1]["label_report"]
    assert table.columns == ["label", "precision", "recall", "f1", "support"]
    assert table.data == [["a", 1.0, 0.5, 2 / 3, 2]]


# ---- labelled data through datasets -----------------------------------------------------------


@pytest.fixture(autouse=True)
def _offline(hf_offline):
    """Every test here runs without network (conftest.hf_offline)."""


WORDS = ["good", "fine", "bad", "awful", "the", "film", "was", "very"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """train.csv / val.csv (text, label), train.jsonl / val.jsonl (words, tags), and a
    word-level tokenizer over WORDS saved as a directory."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)

    def review(i: int) -> tuple[str, str]:
        mood = ["good", "fine"] if i % 2 else ["bad", "awful"]
        words = ["the", "film", "was", *rng.choice(["very", "the"], 3 + i % 5), rng.choice(mood)]
        return " ".join(words), "pos" if i % 2 else "neg"

    for name, n in (("train", 64), ("val", 16)):
        lines = ["text,label", *(",".join(review(i)) for i in range(n))]
        (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
        examples = [
            {"words": ["the", "Paris", "film"], "tags": ["O", "B-LOC", "O"]},
            {"words": ["New", "York", "was"], "tags": ["B-LOC", "I-LOC", "O"]},
        ] * (n // 2)
        (root / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    (root / "unseen.csv").write_text("text,label\nthe film,pos\nthe film,meh\n")
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "</s>", *WORDS])},
                                            unk_token="[UNK]"))  # fmt: skip
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="</s>", unk_token="[UNK]")
    tok.save_pretrained(root / "tok")
    return root


def labelled(files: Path, task: str, *extra: str) -> list[str]:
    if task == "classify":
        data = ["data.path=csv", f"data.data_files=[{files}/train.csv]",
                f"data.val_files=[{files}/val.csv]", f"data.tokenizer={files}/tok"]  # fmt: skip
    else:
        data = ["data.path=json", f"data.data_files=[{files}/train.jsonl]",
                f"data.val_files=[{files}/val.jsonl]", "data.tokenizer=byt5",
                "data.tokens_column=words", "data.tags_column=tags"]  # fmt: skip
    return ["trainer.device=cpu", "trainer.progress=false", f"task={task}", "data=hf_labels",
            "model.vocab_size=384", "model.n_layers=2", "data.seq_len=8", "data.batch_size=8",
            f"data.cache_dir={files}/cache", *data, *extra]  # fmt: skip


def bundle(overrides: list[str]):
    cfg = build(overrides)
    return build_data(cfg.data, cfg.model_config().vocab_size, Sharding(micro_batch=8), cfg.task)


def test_csv_classification_rows(files, caplog):
    caplog.set_level("INFO")
    data = bundle(labelled(files, "classify"))
    assert data.labels == ["neg", "pos"] and data.tokenizer == f"{files}/tok"
    tokens, lengths, labels = unpack_classify(data.val.take([0, 1]))
    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", *WORDS])}
    text = (files / "val.csv").read_text().splitlines()[1].split(",")[0]  # 7 words, then EOS
    assert lengths.tolist() == [8, 8] and labels.tolist() == [0, 1]
    assert tokens[0].tolist() == [vocab[w] for w in text.split(" ")] + [vocab["</s>"]]
    assert "longer than data.seq_len=8 tokens and were truncated" in caplog.text  # 8+ words


def test_json_tags_go_on_each_words_first_byte(files):
    data = bundle(labelled(files, "tag"))
    assert data.labels == ["B-LOC", "I-LOC", "O"]
    tokens, labels = unpack_tag(data.train.source.take([1]))
    # "New" "York" "was" in ByT5 bytes (id = byte + 3): 3 + 4 + 3 bytes, cut at 8 tokens
    assert tokens[0].tolist() == [b + 3 for b in b"NewYorkw"]
    assert labels[0].tolist() == [0, IGNORE, IGNORE, 1, IGNORE, IGNORE, IGNORE, 2]


def test_labelled_data_trains_and_keeps_the_label_map(files, tmp_path):
    steps = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2"]
    result = make(tmp_path / "c", labelled(files, "classify", *steps)).fit()
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0
    assert read_model(tmp_path / "c/checkpoints/step_2").task.labels == ["neg", "pos"]
    result = make(tmp_path / "t", labelled(files, "tag", *steps)).fit()
    assert set(result.metrics) >= {"val_loss", "val_precision", "val_recall", "val_f1"}


@pytest.mark.parametrize(
    "extra,message",
    [
        (["data.label_column=stars"],
         r"data\.label_column='stars' is not a column of the training split \(csv\); its "
         r"columns are \['text', 'label'\]"),
        (["data.val_files=[{files}/unseen.csv]"],
         r"data\.label_column='label': label 'meh' of the validation split \(data\.val_files\) "
         r"does not occur in the training split"),
    ],
    ids=["missing_column", "unseen_label"],
)  # fmt: skip
def test_bad_labelled_data_is_one_line_naming_the_field(files, extra, message):
    overrides = labelled(files, "classify", *(e.format(files=files) for e in extra))
    with pytest.raises(UserError, match=message) as info:
        bundle(overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["task=tag", "data=hf_text", "data.path=text", "data.tokenizer=byt5"],
         r"task=tag needs labelled data: data=synthetic .* not data=hf_text"),
        (["data=hf_labels", "data.path=csv", "data.tokenizer=byt5"],
         r"data=hf_labels holds labelled examples for task=classify\|tag"),
        (["task=classify", "finetune.monitor=val_f1"],
         r"finetune\.monitor='val_f1' is not a metric of task=classify; valid: val_loss, "
         r"val_accuracy, val_macro_f1"),
        (["task=classify", "data.num_domains=1"], r"data\.num_domains=1 must be >= 2"),
        (["task=segment"], r"Could not find 'task/segment'"),
    ],
    ids=["tag_on_text", "lm_on_labels", "monitor", "one_domain", "unknown_task"],
)  # fmt: skip
def test_bad_task_config_is_one_line(overrides, message):
    from hydra.errors import HydraException

    with pytest.raises((UserError, HydraException), match=message):
        build(overrides)


def test_task_presets_compose_for_the_embedded_corpus():
    for task in ("classify", "tag"):
        cfg = build([f"task={task}"])
        assert cfg.task.kind == task and cfg.data.seq_len == 32 and cfg.trainer.max_steps <= 400
    assert build(["task=lm"]).trainer.max_steps == 1500  # the LM default job is untouched


def test_cli_trains_a_task_and_refuses_a_task_without_labels(tmp_path):
    quick = ["trainer.device=cpu", "trainer.progress=false", "data.num_train=256",
             "data.num_val=32", "trainer.max_steps=4", "trainer.eval_every=4"]  # fmt: skip
    proc = run_cli([*quick, "task=tag", "run_name=t"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "per-label report at step 4" in proc.stdout + proc.stderr
    assert (tmp_path / "runs/t/label_report.json").exists()
    proc = run_cli(["trainer.device=cpu", "task=classify", "data=local_text"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "xpar: error: task=classify needs labelled data: data=synthetic (the embedded corpus) "
        "or data=hf_labels, not data=hf_text"
    )


# ---- EP=2 ----------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_ep2_classification_metrics_equal_one_process(tmp_path):
    """Train 4 steps and evaluate 33 validation sequences (uneven rank shares) at EP=2, then
    the same in this process: the summed counts give the same metrics."""
    args = [*QUICK, "task=classify", "data.num_val=33", "trainer.max_steps=4"]
    script = Path(__file__).parent / "task_eval_check.py"
    results = run_ranks([str(script), str(tmp_path), *args, "parallel.ep_size=2"], world=2)
    assert_all_ok(results)
    ep = json.loads(results[0].stdout.strip().splitlines()[-1])
    trainer = make(tmp_path / "one", args)
    for _ in range(4):
        trainer.train_step(trainer.data.train.next_step())
    one = trainer.evaluate()[0]
    assert ep["val_accuracy"] == one["val_accuracy"] and ep["val_macro_f1"] == one["val_macro_f1"]
    assert ep["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
