"""The embedded corpus: sequences from a mixture of sparse Markov chains ("domains") over one
vocabulary, generated from a seed at start-up, with its exact entropy floor.

Each domain is a first-order Markov chain in which every token has `branching` possible
successors with Dirichlet-drawn probabilities. A sequence picks one domain uniformly and a
uniform first token, then follows that domain's chain. The Bayes-optimal next-token predictor
mixes the domains' transition probabilities by the posterior over domains given the tokens seen
so far; its cross-entropy on the validation split is the floor no model can beat.

Legend: M domains, V vocab, B successors per token, N sequences, L tokens per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from xpar.data.bundle import DataBundle, Sharding
from xpar.data.config import SyntheticDataConfig
from xpar.data.loader import TensorSequences


@dataclass
class MarkovMixture:
    """M sparse chains: token v of domain m moves to succ_MVB[m, v, b] with prob probs_MVB."""

    succ_MVB: np.ndarray  # int64 successor ids, distinct within a row
    probs_MVB: np.ndarray  # float64, rows sum to 1

    @property
    def num_domains(self) -> int:
        return self.succ_MVB.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.succ_MVB.shape[1]

    @classmethod
    def generate(
        cls, num_domains: int, vocab_size: int, branching: int, concentration: float, seed: int
    ) -> MarkovMixture:
        rng = np.random.default_rng(seed)
        M, V = num_domains, vocab_size
        succ_MVB = np.argsort(rng.random((M, V, V)), axis=-1)[..., :branching]
        probs_MVB = rng.dirichlet(np.full(branching, concentration), size=(M, V))
        return cls(succ_MVB, probs_MVB)

    def sample(self, num_sequences: int, length: int, seed: int) -> tuple[Tensor, Tensor]:
        """(tokens [N, L] int64, domain of each sequence [N])."""
        rng = np.random.default_rng(seed)
        N = num_sequences
        domain_N = rng.integers(0, self.num_domains, N)
        tokens_NL = np.empty((N, length), dtype=np.int64)
        tokens_NL[:, 0] = rng.integers(0, self.vocab_size, N)
        cum_MVB = self.probs_MVB.cumsum(-1)
        for t in range(1, length):
            prev_N = tokens_NL[:, t - 1]
            u_N = rng.random(N)
            # index of the first successor whose cumulative probability exceeds u
            pick_N = (u_N[:, None] >= cum_MVB[domain_N, prev_N]).sum(-1)
            pick_N = np.minimum(pick_N, cum_MVB.shape[-1] - 1)  # guards u ~ 1 - rounding
            tokens_NL[:, t] = self.succ_MVB[domain_N, prev_N, pick_N]
        return torch.from_numpy(tokens_NL), torch.from_numpy(domain_N)

    def transition_prob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """[M, ...] probability of prev -> nxt under each domain."""
        hit_MNB = self.succ_MVB[:, prev] == nxt[None, ..., None]
        return (self.probs_MVB[:, prev] * hit_MNB).sum(-1)

    def bayes_nll(self, tokens_NL: Tensor) -> Tensor:
        """[N, L-1] nats of the Bayes-optimal predictor for each next token: it starts from the
        uniform prior over domains (the first token is uniform in every domain) and updates
        the posterior after every transition."""
        tokens = tokens_NL.numpy()
        N, L = tokens.shape
        log_post_MN = np.full((self.num_domains, N), -np.log(self.num_domains))
        nll_NL = np.empty((N, L - 1))
        with np.errstate(divide="ignore"):
            for t in range(L - 1):
                log_p_MN = np.log(self.transition_prob(tokens[:, t], tokens[:, t + 1]))
                joint_MN = log_post_MN + log_p_MN
                evidence_N = np.logaddexp.reduce(joint_MN, axis=0)
                nll_NL[:, t] = -evidence_N
                log_post_MN = joint_MN - evidence_N
        return torch.from_numpy(nll_NL)


@dataclass
class SyntheticSplits:
    """Train and validation sequences of seq_len + 1 tokens, and the validation floor."""

    train_NL: Tensor
    val_NL: Tensor
    val_domain_N: Tensor
    floor: float  # nats/token of the Bayes-optimal predictor on val_NL
    mixture: MarkovMixture


def build_synthetic(
    vocab_size: int,
    seq_len: int,
    num_domains: int,
    branching: int,
    concentration: float,
    num_train: int,
    num_val: int,
    seed: int,
) -> SyntheticSplits:
    """The corpus for a seed: the chains, then disjoint train and validation draws."""
    mixture = MarkovMixture.generate(num_domains, vocab_size, branching, concentration, seed)
    train_NL, _ = mixture.sample(num_train, seq_len + 1, seed=seed + 1)
    val_NL, val_domain_N = mixture.sample(num_val, seq_len + 1, seed=seed + 2)
    floor = float(mixture.bayes_nll(val_NL).mean())
    return SyntheticSplits(train_NL, val_NL, val_domain_N, floor, mixture)


def build_synthetic_data(cfg: SyntheticDataConfig, model_vocab: int, shard: Sharding) -> DataBundle:
    """The corpus `cfg` describes as an LM's data: this rank's batches of the training split,
    the validation split and its floor."""
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
