"""Task models: the MoE transformer backbone with a classification head in place of the LM head.

Both are MoETransformerLMs (so parallelize, EP, ZeRO and checkpoints treat them as the LM) whose
`lm_head` is gone and whose embedding is not used as a head; the head is `head`
(nn.Linear(d_model, num_labels) with a bias: state-dict names `head.weight`, `head.bias`).

Legend: B batch, S sequence, D model dim, C labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xpar.model import LMOutput, ModelConfig, MoETransformerLM
from xpar.model.transformer import total_aux_loss
from xpar.tasks.config import TaskConfig


@dataclass
class TaskOutput(LMOutput):
    """One forward pass of a task model: `logits` [B, C] (classify) or [B, S, C] (tag), the
    task's mean cross-entropy, and the MoE layers' auxiliary losses."""


class _TaskModel(MoETransformerLM):
    """The backbone without an LM head, and a fresh `head` over `num_labels` labels."""

    def __init__(self, cfg: ModelConfig, num_labels: int) -> None:
        super().__init__(cfg)  # its init_weights() runs before the head exists
        self.lm_head = None
        self.num_labels = num_labels
        self.head = nn.Linear(cfg.d_model, num_labels, bias=True)
        self._init_head()

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        if getattr(self, "head", None) is not None:
            self._init_head()

    @torch.no_grad()
    def _init_head(self) -> None:
        nn.init.normal_(self.head.weight, std=self.cfg.init_std)
        self.head.bias.zero_()

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n


class SequenceClassifier(_TaskModel):
    """One label per sequence, from the final hidden states at each sequence's last real token
    (`pooling="last"`) or averaged over its real tokens (`"mean"`). Sequences are right-padded
    to S; attention is causal, so the padding never reaches a real token."""

    def __init__(self, cfg: ModelConfig, num_labels: int, pooling: str = "last") -> None:
        super().__init__(cfg, num_labels)
        self.pooling = pooling

    def forward(
        self, tokens_BS: Tensor, lengths_B: Tensor, labels_B: Tensor | None = None
    ) -> TaskOutput:
        x_BSD, auxes = self.hidden_states(tokens_BS)
        B, S, _ = x_BSD.shape
        if self.pooling == "last":
            pooled_BD = x_BSD[torch.arange(B, device=x_BSD.device), lengths_B - 1]
        else:
            real_BS = torch.arange(S, device=x_BSD.device) < lengths_B[:, None]
            summed_BD = (x_BSD * real_BS[..., None].to(x_BSD.dtype)).sum(1)
            pooled_BD = summed_BD / lengths_B[:, None].to(x_BSD.dtype)
        logits_BC = self.head(pooled_BD)
        loss = None
        if labels_B is not None:
            loss = F.cross_entropy(logits_BC.float(), labels_B)  # fp32: unrounded under bf16
        return TaskOutput(logits_BC, loss, total_aux_loss(auxes, x_BSD), auxes)


class TokenTagger(_TaskModel):
    """One label per token; -100 marks tokens without one (padding, later sub-tokens)."""

    def forward(self, tokens_BS: Tensor, labels_BS: Tensor | None = None) -> TaskOutput:
        x_BSD, auxes = self.hidden_states(tokens_BS)
        logits_BSC = self.head(x_BSD)
        loss = None
        if labels_BS is not None:
            # The mean over labelled tokens; a batch without any gives 0, not 0/0.
            total = F.cross_entropy(
                logits_BSC.flatten(0, 1).float(), labels_BS.flatten(), reduction="sum"
            )
            loss = total / (labels_BS != -100).sum().clamp_min(1)
        return TaskOutput(logits_BSC, loss, total_aux_loss(auxes, x_BSD), auxes)


def build_model(model_cfg: ModelConfig, task: TaskConfig, num_labels: int = 0) -> nn.Module:
    """The model `task` trains: the LM, or the backbone with a head over `num_labels`."""
    if task.kind == "lm":
        return MoETransformerLM(model_cfg)
    if num_labels < 2:
        raise ValueError(f"task={task.kind} needs at least 2 labels, got {num_labels}")
    if task.kind == "classify":
        return SequenceClassifier(model_cfg, num_labels, task.pooling)
    return TokenTagger(model_cfg, num_labels)
