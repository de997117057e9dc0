"""Two-level routing: each token picks `top_groups` of G expert groups, then `top_k` experts
inside the chosen groups only.

Legend: T tokens, D model dim, E experts, G groups, K top-k, J top groups, X experts per group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from xpar.moe.config import MoEConfig
from xpar.moe.router import (
    BaseRouter,
    Choices,
    RouterOutput,
    apply_scores,
    as_distribution,
    stable_topk,
)


def group_capacity_keep(group_idx_TJ: Tensor, num_groups: int, capacity: int) -> Tensor:
    """[T, G] mask of the (token, group) choices that fit in each group's capacity,
    first come first served in token order."""
    num_tokens = group_idx_TJ.shape[0]
    onehot_TJG = torch.nn.functional.one_hot(group_idx_TJ, num_groups)
    # 1-based arrival order of each choice at its group, earlier tokens first.
    order_TJG = onehot_TJG.flatten(0, 1).cumsum(0).view_as(onehot_TJG)
    fits_TJ = (order_TJG * onehot_TJG).sum(-1) <= capacity
    keep_TG = torch.zeros(num_tokens, num_groups, dtype=torch.bool, device=group_idx_TJ.device)
    return keep_TG.scatter(1, group_idx_TJ, fits_TJ)


class TwoLevelRouter(BaseRouter):
    """Group → expert routing over E experts in G equal groups (expert e is in group e // X).

    `group_score="learned"`: a gate of its own scores the groups (softmax over G); an expert's
    weight is its group's weight times its within-group score (softmax over the group, or
    sigmoid), as in the hierarchical MoE of Shazeer et al. (2017).
    `group_score="topk_sum"`: a group's score is the sum of its best `group_topk_experts`
    expert scores, and the weights are the plain expert scores (DeepSeek-V3's group-limited
    routing). With `group_capacity_factor`, a group takes at most
    ceil(factor * T * top_groups / G) tokens; later tokens lose their slots in that group.
    Given `choices`, it takes them as TopKRouter does.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.group_gate = None
        if cfg.group_score == "learned":
            self.group_gate = nn.Linear(cfg.d_model, cfg.num_groups, bias=False)
            nn.init.normal_(self.group_gate.weight, std=cfg.init_std)

    def forward(self, x_TD: Tensor, choices: Choices | None = None) -> RouterOutput:
        cfg = self.cfg
        G, X = cfg.num_groups, cfg.experts_per_group
        x_TD = self.gate_input(x_TD)
        logits_TE = self.logits(x_TD, self.gate)
        if self.group_gate is None:
            scores_TE = apply_scores(logits_TE, cfg.score_func)
            weights_TE, group_score_TG = scores_TE, None
            probs_TE = as_distribution(scores_TE, cfg.score_func)
            logits = [logits_TE]
        else:
            group_logits_TG = self.logits(x_TD, self.group_gate)
            group_score_TG = group_logits_TG.softmax(-1)
            within_TGX = apply_scores(logits_TE.view(-1, G, X), cfg.score_func)
            group_w_TE = group_score_TG.repeat_interleave(X, dim=1)
            weights_TE = group_w_TE * within_TGX.flatten(1)
            probs_TE = group_w_TE * as_distribution(within_TGX, cfg.score_func).flatten(1)
            logits = [logits_TE, group_logits_TG]
        replayed = choices is not None
        if choices is None:
            choices = self.choose(weights_TE.detach(), group_score_TG)
        topk_idx_TK, keep_TK = choices
        topk_w_TK = weights_TE.gather(1, topk_idx_TK)
        return self.finish(topk_idx_TK, topk_w_TK, probs_TE, logits, keep_TK, replayed=replayed)

    @torch.no_grad()
    def choose(self, weights_TE: Tensor, group_score_TG: Tensor | None) -> Choices:
        """The groups, then the experts inside them, and the group-capacity keep mask.
        Selection builds no graph (the weights are gathered afterwards), so a recompute that
        replays it saves the same tensors for backward as the forward pass did."""
        cfg = self.cfg
        num_tokens, G, X = weights_TE.shape[0], cfg.num_groups, cfg.experts_per_group
        select_TE = weights_TE + self.expert_bias
        if group_score_TG is None:  # topk_sum: a group scores its best experts' sum
            group_score_TG = select_TE.view(-1, G, X).topk(cfg.group_topk_experts, -1).values
            group_score_TG = group_score_TG.sum(-1)
        group_idx_TJ = stable_topk(group_score_TG.detach(), cfg.top_groups)
        chosen_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        chosen_TG.scatter_(1, group_idx_TJ, True)
        select_TE = select_TE.masked_fill(~chosen_TG.repeat_interleave(X, dim=1), -math.inf)
        topk_idx_TK = stable_topk(select_TE, cfg.top_k)
        keep_TK = None
        if cfg.group_capacity_factor is not None:
            cap = math.ceil(cfg.group_capacity_factor * num_tokens * cfg.top_groups / G)
            keep_TG = group_capacity_keep(group_idx_TJ, G, max(cap, cfg.min_capacity))
            keep_TK = keep_TG.gather(1, topk_idx_TK // X)
        return topk_idx_TK, keep_TK
