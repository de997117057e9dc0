"""Token-choice routers: they decide which experts see each token, and never move data.

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xpar.moe.config import MoEConfig
from xpar.moe.dispatcher import count_per_expert

# A routing decision: the experts each token chose, and which slots the router kept.
Choices = tuple[Tensor, Tensor | None]


@dataclass
class RouterOutput:
    """What a router decided for T tokens, and its losses and statistics."""

    topk_idx_TK: Tensor  # int64 expert ids; a token never picks one expert twice
    topk_w_TK: Tensor  # fp32 combine weights
    keep_TK: Tensor | None  # False where the router itself dropped a slot (group capacity)
    probs_mean_E: Tensor  # P_e: mean routing probability of each expert, differentiable
    z_loss: Tensor  # mean over tokens of logsumexp(logits)^2, differentiable
    entropy: Tensor  # mean entropy of the tokens' routing distributions, detached
    tokens_per_expert_E: Tensor  # slots each expert was chosen for (before any drop)

    @property
    def choices(self) -> Choices:
        return self.topk_idx_TK, self.keep_TK


def stable_topk(scores_TX: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores per row; ties go to the lower index, every run."""
    return torch.sort(scores_TX, dim=-1, descending=True, stable=True).indices[:, :k]


def apply_scores(logits: Tensor, score_func: str) -> Tensor:
    return logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()


def as_distribution(scores: Tensor, score_func: str) -> Tensor:
    """The scores as a probability distribution over the last dim (sigmoid ones rescaled)."""
    if score_func == "softmax":
        return scores
    return scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def load_balance_loss(probs_mean_E: Tensor, counts_E: Tensor) -> Tensor:
    """Switch/GShard loss E * sum_e f_e * P_e (1.0 at perfect balance): f_e the fraction of
    the routed slots given to expert e (not differentiable), P_e its mean routing probability.
    The counts may cover more tokens than P (all ranks'): the load is a global property."""
    f_E = counts_E.to(probs_mean_E.dtype) / counts_E.sum().clamp_min(1)
    return probs_mean_E.shape[0] * (f_E * probs_mean_E).sum()


def z_loss(logits_TX: Tensor) -> Tensor:
    """ST-MoE router z-loss: keeps gate logits small for numerical stability."""
    return torch.logsumexp(logits_TX, dim=-1).square().mean()


def entropy(probs_TE: Tensor) -> Tensor:
    p = probs_TE.detach()
    return -(p * p.clamp_min(1e-20).log()).sum(-1).mean()


class BaseRouter(nn.Module):
    """Gate, balancing-bias buffers and the loss/statistics shared by both routers."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        # Aux-loss-free balancing (DeepSeek-V3): shifts which experts are selected, never
        # the combine weights. Saved with the model; the load tally is per step only.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self.register_buffer("pending_load", torch.zeros(cfg.num_experts), persistent=False)
        nn.init.normal_(self.gate.weight, std=cfg.init_std)

    def gate_input(self, x_TD: Tensor) -> Tensor:
        """fp32 router input, with multiplicative jitter while training."""
        x_TD = x_TD.float()
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return x_TD

    def logits(self, x_TD: Tensor, linear: nn.Linear) -> Tensor:
        return F.linear(x_TD, linear.weight.float())

    def finish(
        self,
        topk_idx_TK: Tensor,
        topk_w_TK: Tensor,
        probs_TE: Tensor,
        logits: list[Tensor],
        keep_TK: Tensor | None = None,
        replayed: bool = False,
    ) -> RouterOutput:
        """Renormalise and scale the weights, and gather what the losses need. A `replayed`
        decision (a recompute's) was tallied when it was first made, so it is not again."""
        cfg = self.cfg
        if cfg.norm_topk_prob:
            denom = topk_w_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(topk_w_TK.dtype).tiny)
            topk_w_TK = topk_w_TK / denom
        topk_w_TK = topk_w_TK * cfg.route_scale
        counts_E = count_per_expert(topk_idx_TK.flatten(), cfg.num_experts)
        if self.training and cfg.bias_update_rate > 0 and not replayed:
            self.pending_load += counts_E.to(self.pending_load.dtype)
        return RouterOutput(
            topk_idx_TK=topk_idx_TK,
            topk_w_TK=topk_w_TK,
            keep_TK=keep_TK,
            probs_mean_E=probs_TE.mean(0),
            z_loss=sum(z_loss(lg) for lg in logits),
            entropy=entropy(probs_TE),
            tokens_per_expert_E=counts_E,
        )

    @torch.no_grad()
    def update_bias(self, load_E: Tensor | None = None) -> None:
        """One aux-loss-free balancing step: raise the bias of under-loaded experts and lower
        that of over-loaded ones by `bias_update_rate`. Call it once per optimizer step.

        `load_E` defaults to the load this router tallied since the last call; a parallel
        trainer passes the tally summed over ranks instead (load is a global property).
        """
        load_E = self.pending_load if load_E is None else load_E.to(self.pending_load)
        if self.cfg.bias_update_rate > 0:  # no load at all: every sign is 0, nothing moves
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.pending_load.zero_()

    def discard_load(self) -> None:
        """Forget the load tallied since the last update (its step was skipped)."""
        self.pending_load.zero_()


class TopKRouter(BaseRouter):
    """Token choice: each token picks its top_k experts by score (softmax or sigmoid).

    `forward(x_TD, choices)`: given `choices` (the (topk_idx_TK, keep_TK) an earlier pass over
    the same tokens made, as a recompute replays it), the router takes them instead of choosing
    again, and computes only the differentiable weights and losses."""

    def forward(self, x_TD: Tensor, choices: Choices | None = None) -> RouterOutput:
        logits_TE = self.logits(self.gate_input(x_TD), self.gate)
        scores_TE = apply_scores(logits_TE, self.cfg.score_func)
        if choices is None:  # no graph for the selection: a replay saves what this saves
            topk_idx_TK = stable_topk(scores_TE.detach() + self.expert_bias, self.cfg.top_k)
        else:
            topk_idx_TK = choices[0]
        topk_w_TK = scores_TE.gather(1, topk_idx_TK)
        probs_TE = as_distribution(scores_TE, self.cfg.score_func)
        return self.finish(
            topk_idx_TK, topk_w_TK, probs_TE, [logits_TE], replayed=choices is not None
        )
