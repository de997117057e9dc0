"""A deliberately naive MoE layer: one token at a time, Python loops, no sorting tricks.

Shares weights with an xpar MoELayer and must reproduce its dropless output and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xpar.moe import MoELayer


def _scores(logits: Tensor, score_func: str) -> Tensor:
    return logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()


def _best(values: list[float], k: int, allowed: list[int] | None = None) -> list[int]:
    """Indices of the k largest values, ties to the lower index."""
    cands = range(len(values)) if allowed is None else allowed
    return sorted(cands, key=lambda i: (-values[i], i))[:k]


def route_token(layer: MoELayer, x_D: Tensor) -> list[tuple[int, Tensor]]:
    """(expert, weight) pairs chosen for one token."""
    cfg, router = layer.cfg, layer.router
    logits = router.gate.weight.float() @ x_D.float()
    bias = router.expert_bias.tolist()
    if cfg.router == "topk":
        weights = _scores(logits, cfg.score_func)
        select = [float(weights[e].detach()) + bias[e] for e in range(cfg.num_experts)]
        chosen = _best(select, cfg.top_k)
    else:
        G, X = cfg.num_groups, cfg.experts_per_group
        if cfg.group_score == "learned":
            group_w = (router.group_gate.weight.float() @ x_D.float()).softmax(-1)
            per_group = [logits[g * X : (g + 1) * X] for g in range(G)]
            within = torch.cat([_scores(lg, cfg.score_func) for lg in per_group])
            weights = torch.stack([group_w[e // X] * within[e] for e in range(cfg.num_experts)])
            select = [float(weights[e].detach()) + bias[e] for e in range(cfg.num_experts)]
            group_score = group_w.tolist()
        else:
            weights = _scores(logits, cfg.score_func)
            select = [float(weights[e].detach()) + bias[e] for e in range(cfg.num_experts)]
            group_score = [
                sum(sorted(select[g * X : (g + 1) * X], reverse=True)[: cfg.group_topk_experts])
                for g in range(G)
            ]
        groups = _best(group_score, cfg.top_groups)
        allowed = [e for g in sorted(groups) for e in range(g * X, (g + 1) * X)]
        chosen = _best(select, cfg.top_k, allowed)
    w = [weights[e] for e in chosen]
    if cfg.norm_topk_prob:
        total = sum(w)
        w = [wi / total for wi in w]
    return [(e, wi * cfg.route_scale) for e, wi in zip(chosen, w, strict=True)]


def expert_forward(layer: MoELayer, e: int, x_D: Tensor) -> Tensor:
    ex = layer.experts
    return ex.w2[e] @ (F.silu(ex.w1[e] @ x_D) * (ex.w3[e] @ x_D))


def reference_forward(layer: MoELayer, x: Tensor) -> Tensor:
    """Dropless output of `layer` computed token by token."""
    x_TD = x.reshape(-1, layer.cfg.d_model)
    rows = []
    for x_D in x_TD:
        out = torch.zeros_like(x_D)
        for e, w in route_token(layer, x_D):
            out = out + w.to(x_D.dtype) * expert_forward(layer, e, x_D)
        if layer.shared_expert is not None:
            out = out + layer.shared_expert(x_D)
        rows.append(out)
    return torch.stack(rows).view(x.shape)
