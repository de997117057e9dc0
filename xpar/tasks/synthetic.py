"""The embedded corpus as labelled data (`data=synthetic` with `task=classify|tag`): sequences of
data.seq_len tokens drawn from the same Markov mixture as the LM corpus (xpar.data.synthetic),
labelled by what the generator knows.

- classify: the domain (Markov chain) that generated the sequence: labels `domain_0` ..
  `domain_{M-1}`. The chains' successor sets barely overlap, so a few transitions identify the
  domain; the Bayes-optimal accuracy on seq_len >= 16 is ~100%.
- tag: BIO spans over maximal runs of tokens of one class, where the class is the token id's
  quarter of the vocabulary: `LOW` (the first quarter), `HIGH` (the last), none otherwise.
  Labels `B-HIGH, B-LOW, I-HIGH, I-LOW, O`. A token's tag depends on its own class and the
  previous token's, so a causal model can reach F1 = 1.

Legend: N sequences, S sequence length, V vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xpar.data import DataBundle, Sharding
from xpar.data.config import SyntheticDataConfig
from xpar.data.loader import TensorSequences
from xpar.data.synthetic import MarkovMixture
from xpar.tasks.config import TaskConfig
from xpar.tasks.rows import pack_classify

TAGS = ["B-HIGH", "B-LOW", "I-HIGH", "I-LOW", "O"]


def token_class(tokens_NS: Tensor, vocab: int) -> Tensor:
    """[N, S]: 1 for LOW tokens (id < V/4), 2 for HIGH ones (id >= 3V/4), 0 otherwise."""
    low, high = tokens_NS < vocab // 4, tokens_NS >= vocab - vocab // 4
    return low.long() + 2 * high.long()


def bio_tags(tokens_NS: Tensor, vocab: int) -> Tensor:
    """[N, S] ids into TAGS: B- where a run of a class starts, I- inside it, O outside."""
    cls_NS = token_class(tokens_NS, vocab)
    prev_NS = torch.cat([torch.zeros_like(cls_NS[:, :1]), cls_NS[:, :-1]], dim=1)
    begin_NS = cls_NS != prev_NS
    ids = {name: i for i, name in enumerate(TAGS)}
    tags_NS = torch.full_like(cls_NS, ids["O"])
    for c, name in ((1, "LOW"), (2, "HIGH")):
        tags_NS[(cls_NS == c) & begin_NS] = ids[f"B-{name}"]
        tags_NS[(cls_NS == c) & ~begin_NS] = ids[f"I-{name}"]
    return tags_NS


def task_rows(
    mixture: MarkovMixture, kind: str, n: int, seq_len: int, seed: int
) -> tuple[Tensor, list[str]]:
    """(rows [N, W] in xpar.tasks.rows' layout, label names)."""
    tokens_NS, domain_N = mixture.sample(n, seq_len, seed=seed)
    if kind == "classify":
        labels = [f"domain_{m}" for m in range(mixture.num_domains)]
        return pack_classify(tokens_NS.tolist(), domain_N.tolist(), seq_len), labels
    return torch.cat([tokens_NS, bio_tags(tokens_NS, mixture.vocab_size)], dim=1), TAGS


def build_synthetic_task(
    cfg: SyntheticDataConfig, task: TaskConfig, model_vocab: int, shard: Sharding
) -> DataBundle:
    vocab = cfg.vocab_size or model_vocab
    mixture = MarkovMixture.generate(
        cfg.num_domains, vocab, cfg.branching, cfg.concentration, cfg.seed
    )
    train_NW, labels = task_rows(mixture, task.kind, cfg.num_train, cfg.seq_len, cfg.seed + 1)
    val_NW, _ = task_rows(mixture, task.kind, cfg.num_val, cfg.seq_len, cfg.seed + 2)
    train = shard.loader(TensorSequences(train_NW), cfg.batch_size)
    what = {
        "classify": f"classify the domain of {cfg.num_domains}",
        "tag": "tag runs of LOW/HIGH tokens (BIO)",
    }[task.kind]
    description = (
        f"synthetic {task.kind}: {what} over {vocab} tokens, {cfg.num_train} train / "
        f"{cfg.num_val} val sequences of {cfg.seq_len} tokens"
    )
    return DataBundle(train, TensorSequences(val_NW), vocab, None, description, labels)
