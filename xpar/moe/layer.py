"""MoELayer: router → dispatcher → grouped experts → weighted combine (+ shared experts).

Legend: T tokens, D model dim, E experts, M rows handed to the experts.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from xpar.moe.config import MoEConfig
from xpar.moe.dispatcher import A2AStats, LocalDispatcher
from xpar.moe.experts import GroupedExperts, SwiGLU
from xpar.moe.router import Choices, TopKRouter, load_balance_loss
from xpar.moe.two_level import TwoLevelRouter


@dataclass
class MoEAux:
    """A layer's losses and statistics for one forward pass. Statistics are detached
    tensors: on one device, reading them as Python numbers is the only thing that waits on
    it (expert parallelism reads the counts it needs for its all-to-all splits)."""

    loss: Tensor  # coefficient-weighted aux + z loss: add it to the training loss
    aux_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor  # [E] slots routed to each expert, before drops
    dropped: Tensor  # 0-dim fraction of the T*K slots dropped
    router_entropy: Tensor
    a2a: A2AStats | None = None  # what expert parallelism sent; None on one process

    @property
    def dropped_fraction(self) -> float:
        return float(self.dropped)


class RoutingTape:
    """What one forward pass of an MoE layer decided, for its recompute to replay: the routing
    choices (so jitter noise or a tie cannot change them) and the load the balancing loss saw
    (so the recompute neither sums it over ranks again nor tallies it for the balancing bias).
    The all-to-all runs again: what it moved is not kept (that would hold the rows the
    recompute is there to free)."""

    def __init__(self) -> None:
        self.replaying = False
        self.choices: Choices | None = None
        self.load_E: Tensor | None = None

    @contextmanager
    def replay(self):
        """The recompute's context: the layer takes the recorded decisions."""
        self.replaying = True
        try:
            yield
        finally:
            self.replaying = False


class MoELayer(nn.Module):
    """A sparse MoE FFN. `forward(x)` takes [T, D] or [B, S, D] and returns (out, MoEAux).

    `recompute_experts`: the routed and shared experts keep only their inputs for backward and
    recompute their SwiGLU hidden activations there (routing and dispatch are not re-run).
    `forward(x, tape)` records its decisions on `tape`, or replays them while it replays (see
    RoutingTape): how a recomputed block makes the same choices as its forward pass.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = TwoLevelRouter(cfg) if cfg.router == "two_level" else TopKRouter(cfg)
        self.dispatcher = LocalDispatcher(cfg)
        self.experts = GroupedExperts(cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.experts_impl)
        self.experts.reset_parameters(cfg.init_std)
        self.shared_expert = None
        if cfg.num_shared_experts:
            self.shared_expert = SwiGLU(cfg.d_model, cfg.shared_hidden)
            for p in self.shared_expert.parameters():
                nn.init.normal_(p, std=cfg.init_std)
        # Qwen2-MoE's per-token scalar gate on the shared expert: sigmoid(x @ g), g [1, D].
        self.shared_gate = None
        if cfg.shared_expert_gate:
            self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False)
            nn.init.normal_(self.shared_gate.weight, std=cfg.init_std)
        self.recompute_experts = False

    def _expert_call(self, module: nn.Module, *args: Tensor) -> Tensor:
        if self.recompute_experts and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False, preserve_rng_state=False)
        return module(*args)

    def forward(self, x: Tensor, tape: RoutingTape | None = None) -> tuple[Tensor, MoEAux]:
        x_TD = x.reshape(-1, self.cfg.d_model)
        replay = tape is not None and tape.replaying
        r = self.router(x_TD, tape.choices if replay else None)
        # The dispatcher may sum the counts over ranks: balance is a property of the global batch.
        if replay:
            load_E = tape.load_E
        else:
            load_E = self.dispatcher.load_counts(r.tokens_per_expert_E)
            if tape is not None:
                tape.choices, tape.load_E = r.choices, load_E
        aux_loss = load_balance_loss(r.probs_mean_E, load_E)
        # Rows travel in the experts' compute dtype (bf16 under autocast): half the bytes to
        # permute and send, and nothing the experts would not round away themselves.
        x_rows_TD = x_TD.to(self.experts.compute_dtype(x_TD))
        x_MD, rows_per_expert_E, ctx = self.dispatcher.dispatch(
            x_rows_TD, r.topk_idx_TK, r.topk_w_TK, r.keep_TK
        )
        y_MD = self._expert_call(self.experts, x_MD, rows_per_expert_E)
        out_TD = self.dispatcher.combine(y_MD, ctx).to(x.dtype)
        if self.shared_expert is not None:
            shared_TD = self._expert_call(self.shared_expert, x_TD)
            if self.shared_gate is not None:
                shared_TD = self.shared_gate(x_TD).sigmoid() * shared_TD
            out_TD = out_TD + shared_TD
        aux = MoEAux(
            loss=self.cfg.aux_loss_coef * aux_loss + self.cfg.z_loss_coef * r.z_loss,
            aux_loss=aux_loss,
            z_loss=r.z_loss,
            tokens_per_expert=r.tokens_per_expert_E,
            dropped=ctx.dropped_fraction,
            router_entropy=r.entropy,
            a2a=ctx.stats,
        )
        return out_TD.view(x.shape), aux
