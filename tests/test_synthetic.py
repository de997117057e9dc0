"""The embedded corpus: reproducible, follows its chains, and its floor is the Bayes optimum."""

import math

import numpy as np
import torch

from xpar.data.synthetic import MarkovMixture, build_synthetic


def small_mixture(seed=0):
    return MarkovMixture.generate(3, 16, branching=3, concentration=1.0, seed=seed)


def test_same_seed_same_corpus_other_seed_differs():
    a = build_synthetic(32, 16, 3, 3, 1.0, num_train=64, num_val=16, seed=5)
    b = build_synthetic(32, 16, 3, 3, 1.0, num_train=64, num_val=16, seed=5)
    c = build_synthetic(32, 16, 3, 3, 1.0, num_train=64, num_val=16, seed=6)
    assert torch.equal(a.train_NL, b.train_NL) and torch.equal(a.val_NL, b.val_NL)
    assert a.floor == b.floor
    assert not torch.equal(a.train_NL, c.train_NL)
    assert a.train_NL.shape == (64, 17) and a.val_NL.shape == (16, 17)
    assert not torch.equal(a.train_NL[:16], a.val_NL)  # disjoint draws


def test_chains_are_sparse_distributions():
    mix = small_mixture()
    assert np.allclose(mix.probs_MVB.sum(-1), 1.0)
    for m in range(3):
        for v in range(16):
            assert len(set(mix.succ_MVB[m, v].tolist())) == 3  # distinct successors


def test_sequences_only_take_allowed_transitions_at_the_right_rates():
    mix = small_mixture()
    tokens, domain = mix.sample(4000, 12, seed=1)
    p = mix.transition_prob(tokens[:, :-1].numpy(), tokens[:, 1:].numpy())  # [M, N, L-1]
    own = p[domain.numpy(), np.arange(4000)]
    assert (own > 0).all()  # every step is an edge of the sequence's own chain
    # empirical successor frequencies of one (domain, token) match the chain
    m, v = 0, int(mix.succ_MVB[0, 0, 0])
    prev, nxt = tokens[:, :-1][domain == m], tokens[:, 1:][domain == m]
    follow = nxt[prev == v]
    freq = [(follow == s).float().mean().item() for s in mix.succ_MVB[m, v]]
    assert np.allclose(freq, mix.probs_MVB[m, v], atol=0.05)


def brute_force_nll(mix: MarkovMixture, seq: list[int]) -> list[float]:
    """Next-token nats of the Bayes predictor, by enumerating domains with plain floats."""
    M = mix.num_domains
    post = [1.0 / M] * M
    out = []
    for a, b in zip(seq[:-1], seq[1:], strict=True):
        probs = [float(mix.transition_prob(np.array([a]), np.array([b]))[m, 0]) for m in range(M)]
        pred = sum(post[m] * probs[m] for m in range(M))
        out.append(-math.log(pred))
        post = [post[m] * probs[m] / pred for m in range(M)]
    return out


def test_floor_is_the_bayes_predictor_cross_entropy():
    mix = small_mixture()
    tokens, _ = mix.sample(5, 10, seed=2)
    nll = mix.bayes_nll(tokens)
    for n in range(5):
        expected = brute_force_nll(mix, tokens[n].tolist())
        assert np.allclose(nll[n].numpy(), expected, rtol=1e-10)


def test_floor_beats_knowing_only_the_previous_token_and_loses_to_knowing_the_domain():
    split = build_synthetic(64, 32, 4, 4, 1.0, num_train=8, num_val=2000, seed=0)
    mix, val = split.mixture, split.val_NL.numpy()
    p_MNL = mix.transition_prob(val[:, :-1], val[:, 1:])
    oracle = -np.log(p_MNL[split.val_domain_N.numpy(), np.arange(len(val))]).mean()
    bigram = -np.log(p_MNL.mean(0)).mean()  # the domain-blind mixture of the chains
    assert oracle < split.floor < bigram
    # after a few tokens the posterior has found the domain, so late positions cost the oracle
    late = mix.bayes_nll(split.val_NL)[:, 16:].mean().item()
    oracle_late = -np.log(p_MNL[split.val_domain_N.numpy(), np.arange(len(val))][:, 16:]).mean()
    assert abs(late - oracle_late) < 0.01
