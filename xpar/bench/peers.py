"""Peer MoE layers for the benchmark, built with the same weights as an xpar MoELayer:
Hugging Face transformers' Mixtral sparse block and DeepSpeed's `deepspeed.moe.layer.MoE`.

A builder returns a module mapping x_TD -> out_TD, or raises `Unsupported` with a note when
the peer is not installed or cannot take the shape.
"""

from __future__ import annotations

import importlib.util
import os
import socket

import torch
from torch import Tensor, nn

from xpar.moe import MoELayer, SwiGLU


class Unsupported(Exception):
    """This peer cannot run here; the message says why."""


class OneSequence(nn.Module):
    """Runs a layer that takes [B, S, D] (and may return a tuple) on T tokens as one sequence."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x_TD: Tensor) -> Tensor:
        out = self.inner(x_TD.unsqueeze(0))
        return (out[0] if isinstance(out, tuple) else out).squeeze(0)


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Unsupported(f"{module} is not installed")


def hf_mixtral_block(layer: MoELayer, experts_implementation: str) -> nn.Module:
    """Mixtral's sparse block (softmax top-k, renormalised weights) holding `layer`'s weights.

    Matches the xpar layer's dropless output when that layer has `norm_topk_prob=True`.
    """
    _need("transformers")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = layer.cfg
    hf_cfg = MixtralConfig(
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        router_jitter_noise=0.0,
        experts_implementation=experts_implementation,
    )
    w1 = layer.experts.w1
    block = MixtralSparseMoeBlock(hf_cfg).to(device=w1.device, dtype=w1.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([w1, layer.experts.w3], dim=1))
        block.experts.down_proj.copy_(layer.experts.w2)
    return OneSequence(block)


def init_single_process_group(device: torch.device) -> None:
    """A world of one (DeepSpeed-MoE wants torch.distributed even on one device)."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def deepspeed_moe(layer: MoELayer, capacity_factor: float | None) -> nn.Module:
    """DeepSpeed-MoE (its TopKGate and per-expert loop) with `layer`'s weights;
    `capacity_factor=None` is its dropless mode (`drop_tokens=False`)."""
    _need("deepspeed")
    from deepspeed.moe.layer import MoE

    cfg = layer.cfg
    w1 = layer.experts.w1
    init_single_process_group(w1.device)
    moe = MoE(
        cfg.d_model,
        SwiGLU(cfg.d_model, cfg.d_ff),
        num_experts=cfg.num_experts,
        ep_size=1,
        k=cfg.top_k,
        capacity_factor=capacity_factor or 1.0,
        eval_capacity_factor=capacity_factor or 1.0,
        min_capacity=cfg.min_capacity,
        drop_tokens=capacity_factor is not None,
    )
    moe.set_deepspeed_parallelism()
    moe = moe.to(device=w1.device, dtype=w1.dtype)
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(layer.router.gate.weight)
        for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.w1.weight.copy_(layer.experts.w1[e])
            expert.w3.weight.copy_(layer.experts.w3[e])
            expert.w2.weight.copy_(layer.experts.w2[e])
    return OneSequence(moe)
