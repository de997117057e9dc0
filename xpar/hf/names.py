"""State-dict names of xpar's MoETransformerLM against the Hugging Face Llama family (Llama,
Mistral, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), and whole state dicts converted both ways.

HF checkpoints keep one tensor per expert (`...experts.3.w1.weight`, the layout the hub's
checkpoints use and transformers 5 still writes); transformers fuses them on load. The fused
layout (`mlp.experts.gate_up_proj` [E, 2F, D], gate rows first) is read too.

Legend: E experts, F expert hidden dim, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from xpar.checks import UserError
from xpar.hf.hf_dir import HFWeights
from xpar.model import ModelConfig


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its MoE FFN tensors; everything else is common Llama naming."""

    moe_module: str  # the MoE block under model.layers.i
    expert_proj: tuple[str, str, str]  # HF names of xpar's w1 (gate), w3 (up), w2 (down)


MIXTRAL = Layout("block_sparse_moe", ("w1", "w3", "w2"))
QWEN = Layout("mlp", ("gate_proj", "up_proj", "down_proj"))  # Qwen2/3-MoE and OLMoE

_ATTN = (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))
_MLP = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))


def common_names(cfg: ModelConfig) -> dict[str, str]:
    """xpar name -> HF name of every tensor outside the FFNs."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for w, proj in _ATTN:
            names[f"{ours}attn.{w}.weight"] = f"{theirs}self_attn.{proj}.weight"
            if cfg.attn_bias and w != "wo":
                names[f"{ours}attn.{w}.bias"] = f"{theirs}self_attn.{proj}.bias"
        if cfg.qk_norm != "none":
            for norm in ("q_norm", "k_norm"):
                names[f"{ours}attn.{norm}.weight"] = f"{theirs}self_attn.{norm}.weight"
    return names


def swiglu_names(ours: str, theirs: str) -> dict[str, str]:
    """xpar -> HF names of a dense SwiGLU MLP (a dense FFN or a shared expert)."""
    return {f"{ours}.{w}.weight": f"{theirs}.{p}.weight" for w, p in _MLP}


def dense_ffn_names(i: int) -> dict[str, str]:
    return swiglu_names(f"layers.{i}.ffn", f"model.layers.{i}.mlp")


def moe_names(cfg: ModelConfig, layout: Layout, i: int) -> dict[str, str]:
    """xpar -> HF names of an MoE layer's router, shared expert and shared gate."""
    ours, block = f"layers.{i}.ffn.", f"model.layers.{i}.{layout.moe_module}."
    names = {ours + "router.gate.weight": block + "gate.weight"}
    assert cfg.moe is not None
    if cfg.moe.num_shared_experts:
        names |= swiglu_names(ours + "shared_expert", block + "shared_expert")
    if cfg.moe.shared_expert_gate:
        names[ours + "shared_gate.weight"] = block + "shared_expert_gate.weight"
    return names


def expert_names(layout: Layout, i: int, e: int) -> list[str]:
    """HF names of expert e's w1, w3, w2 in layer i."""
    block = f"model.layers.{i}.{layout.moe_module}.experts.{e}."
    return [f"{block}{p}.weight" for p in layout.expert_proj]


def from_hf(weights: HFWeights, cfg: ModelConfig, layout: Layout) -> dict[str, Tensor]:
    """The xpar state dict of an HF checkpoint in `layout`; a tensor it does not consume is
    an error naming it (it would change the math if it were dropped)."""
    state = {ours: weights.take(theirs) for ours, theirs in common_names(cfg).items()}
    if cfg.tie_embeddings:
        weights.skip("lm_head.weight")
    for i in tqdm(range(cfg.n_layers), desc="layers", leave=False, disable=cfg.n_layers < 8):
        if cfg.is_moe_layer(i):
            state |= _moe_from_hf(weights, cfg, layout, i)
        else:
            state |= {ours: weights.take(t) for ours, t in dense_ffn_names(i).items()}
    if left := weights.untaken():
        raise UserError(
            f"the checkpoint holds tensors its config does not explain: {left[:4]}"
            f"{' ...' if len(left) > 4 else ''} ({len(left)} in all)"
        )
    return state


def _moe_from_hf(weights: HFWeights, cfg: ModelConfig, layout: Layout, i: int) -> dict:
    moe = cfg.moe
    assert moe is not None
    ours = f"layers.{i}.ffn."
    state = {}
    for name, theirs in moe_names(cfg, layout, i).items():
        fused = theirs.replace(f".{layout.moe_module}.", ".mlp.")  # transformers 5 naming
        state[name] = weights.take(theirs, fused)
    state[ours + "router.expert_bias"] = torch.zeros(moe.num_experts)
    fused = f"model.layers.{i}.mlp.experts."
    if weights.has(fused + "gate_up_proj"):
        gate_up_E2FD = weights.take(fused + "gate_up_proj")
        state[ours + "experts.w1"], state[ours + "experts.w3"] = gate_up_E2FD.chunk(2, dim=1)
        state[ours + "experts.w2"] = weights.take(fused + "down_proj")
        return state
    per_expert = [
        [weights.take(n) for n in expert_names(layout, i, e)] for e in range(moe.num_experts)
    ]
    for j, w in enumerate(("w1", "w3", "w2")):
        state[f"{ours}experts.{w}"] = torch.stack([tensors[j] for tensors in per_expert])
    return state


def to_hf(state: dict[str, Tensor], cfg: ModelConfig, layout: Layout) -> dict[str, Tensor]:
    """The HF state dict (one tensor per expert) of an xpar state dict. Balancing biases are
    not written: callers check they are zero (HF routers have none)."""
    out = {theirs: state[ours] for ours, theirs in common_names(cfg).items()}
    for i in range(cfg.n_layers):
        if not cfg.is_moe_layer(i):
            out |= {theirs: state[ours] for ours, theirs in dense_ffn_names(i).items()}
            continue
        out |= {theirs: state[ours] for ours, theirs in moe_names(cfg, layout, i).items()}
        banks = [state[f"layers.{i}.ffn.experts.{w}"] for w in ("w1", "w3", "w2")]
        for e in range(cfg.moe.num_experts):
            for name, bank in zip(expert_names(layout, i, e), banks, strict=True):
                out[name] = bank[e].clone()  # safetensors refuses views sharing storage
    return out


def check_shapes(state: dict[str, Tensor], cfg: ModelConfig, where: str) -> None:
    """`state` has exactly the names and shapes of `MoETransformerLM(cfg)`'s state dict (a
    config.json that disagrees with its tensors fails here, naming one)."""
    from xpar.model import MoETransformerLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MoETransformerLM(cfg).state_dict().items()}
    if missing := sorted(set(expected) - set(state)):
        raise UserError(f"{where}: the converted model lacks {missing[:4]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise UserError(
                f"{where}: {name} has shape {list(state[name].shape)} but the config implies "
                f"{list(shape)}"
            )
