"""`upcycle`: a dense Llama/Mistral checkpoint as an xpar MoE model whose output at init is the
dense model's (sparse upcycling, Komatsuzaki et al. 2022).

Every expert starts as a copy of the dense MLP, so whichever experts the router picks, the
layer computes the dense MLP as long as their weights sum to 1: normalised top-k weights,
route_scale 1, dropless routing and no shared experts. Attention, norms, embeddings and the
head carry over; routers start random. Optional noise (a fraction of each weight's std) makes
the experts differ from the start, at the price of that equality.

Legend: E experts, F hidden dim (the dense intermediate size), D model dim.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from xpar.checks import UserError
from xpar.hf import families
from xpar.hf.hf_dir import HFWeights, has_tokenizer, read_hf_config
from xpar.hf.names import check_shapes, common_names, dense_ffn_names
from xpar.model import ModelConfig
from xpar.moe import MoEConfig
from xpar.persist import check_out_dir, write_model_dir

MODEL_KEYS = ("first_k_dense", "moe_every")
# What keeps an upcycled layer equal to the dense MLP: top-k weights that sum to 1, nothing
# dropped, nothing added.
EXACT = {
    "norm_topk_prob": True,
    "route_scale": 1.0,
    "capacity_factor": None,
    "group_capacity_factor": None,
    "num_shared_experts": 0,
}


def dense_config_classes() -> dict[str, type]:
    from transformers import LlamaConfig, MistralConfig

    return {"llama": LlamaConfig, "mistral": MistralConfig}


def parse_overrides(items: list[str]) -> tuple[dict, dict]:
    """`moe.KEY=VALUE` and `model.first_k_dense|moe_every=N` (values parsed as YAML) into
    (MoEConfig kwargs, ModelConfig kwargs)."""
    moe_fields = typing.get_type_hints(MoEConfig)
    model_fields = typing.get_type_hints(ModelConfig)
    moe, model = {}, {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"{item!r} is not KEY=VALUE (e.g. moe.num_experts=8)")
        section, _, name = key.partition(".")
        value = yaml.safe_load(text)
        if section == "moe" and name in moe_fields:
            moe[name] = _typed(key, value, moe_fields[name])
        elif section == "model" and name in MODEL_KEYS:
            model[name] = _typed(key, value, model_fields[name])
        else:
            raise UserError(
                f"unknown override {key!r}: upcycle takes moe.<MoEConfig field> and "
                f"model.{' / model.'.join(MODEL_KEYS)}"
            )
    return moe, model


def _typed(key: str, value: object, hint: object) -> object:
    """`value` checked against a config field's type (int -> float where a float is due)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    for kind in allowed:
        if kind is not type(None) and type(value) is kind:
            return value
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise UserError(f"{key}={value!r} must be {names}")


def upcycle_config(hf, moe_kw: dict, model_kw: dict, where: str) -> ModelConfig:
    """The MoE ModelConfig of the dense HF config `hf` with the user's overrides."""
    if hf.model_type == "mistral":
        families.check_no_sliding_window(where, hf.sliding_window, hf.max_position_embeddings)
    for field in ("attention_bias", "mlp_bias"):
        if getattr(hf, field, False):
            raise families.refuse(where, field, True, "xpar's Llama layers have no such biases")
    for key, value in EXACT.items():
        if key in moe_kw and moe_kw[key] != value:
            raise UserError(
                f"moe.{key}={moe_kw[key]} breaks upcycling's equality with the dense model, "
                f"which needs {', '.join(f'moe.{k}={v}' for k, v in EXACT.items())}; "
                f"drop the override (change it later when training on)"
            )
    if "num_experts" not in moe_kw:
        raise UserError("upcycle needs moe.num_experts=N (and moe.top_k=K, default 2)")
    fixed = {"d_model": hf.hidden_size, "d_ff": hf.intermediate_size}
    for key, value in fixed.items():
        if moe_kw.get(key, value) != value:
            raise UserError(
                f"moe.{key}={moe_kw[key]} must be the dense model's {value}: experts are "
                f"copies of its MLP"
            )
    model = families.common_from_hf(hf, where) | {"d_ff": hf.intermediate_size} | model_kw
    try:
        moe = MoEConfig(**(moe_kw | EXACT | fixed))
        return ModelConfig(**model, moe=moe)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e


def upcycled_state(
    weights: HFWeights, cfg: ModelConfig, noise: float, seed: int
) -> dict[str, Tensor]:
    """The MoE model's weights: the dense ones renamed, each MoE layer's experts copies of
    its dense MLP (plus noise), routers (and a two-level router's group gate) normal(0,
    moe.init_std): whatever they pick, the renormalised weights of identical experts sum to
    one."""
    moe = cfg.moe
    assert moe is not None
    gen = torch.Generator().manual_seed(seed)
    state = {ours: weights.take(theirs) for ours, theirs in common_names(cfg).items()}
    if cfg.tie_embeddings:
        weights.skip("lm_head.weight")
    for i in tqdm(range(cfg.n_layers), desc="layers", leave=False, disable=cfg.n_layers < 8):
        mlp = {ours: weights.take(theirs) for ours, theirs in dense_ffn_names(i).items()}
        if not cfg.is_moe_layer(i):
            state |= mlp
            continue
        ffn = f"layers.{i}.ffn."
        for w in ("w1", "w3", "w2"):
            dense = mlp[f"{ffn}{w}.weight"]
            state[f"{ffn}experts.{w}"] = _copies(dense, moe.num_experts, noise, gen)
        dtype = state["embed.weight"].dtype
        router_ED = torch.randn(moe.num_experts, cfg.d_model, generator=gen) * moe.init_std
        state[ffn + "router.gate.weight"] = router_ED.to(dtype)
        if moe.router == "two_level" and moe.group_score == "learned":
            group_GD = torch.randn(moe.num_groups, cfg.d_model, generator=gen) * moe.init_std
            state[ffn + "router.group_gate.weight"] = group_GD.to(dtype)
        state[ffn + "router.expert_bias"] = torch.zeros(moe.num_experts)
    if left := weights.untaken():
        raise UserError(f"the checkpoint holds tensors a Llama model does not: {left[:4]}")
    return state


def _copies(w: Tensor, n: int, noise: float, gen: torch.Generator) -> Tensor:
    """n copies of w stacked [n, *w.shape], each plus N(0, (noise * std(w))^2) when noise > 0."""
    bank = w.unsqueeze(0).repeat(n, *([1] * w.dim()))
    if noise > 0:
        w32 = w.float()
        jitter = torch.randn(bank.shape, generator=gen) * (noise * w32.std())
        bank = (w32 + jitter).to(w.dtype)
    return bank


def upcycle(
    src: Path, out: Path, overrides: list[str], noise: float = 0.0, seed: int = 0
) -> tuple[Path, ModelConfig]:
    """Upcycle the dense HF checkpoint dir `src` into the xpar model dir `out` (new or empty)."""
    src, out = Path(src), Path(out)
    if noise < 0:
        raise UserError(f"--noise={noise} must be >= 0")
    moe_kw, model_kw = parse_overrides(overrides)
    check_out_dir(out)
    hf = read_hf_config(src, dense_config_classes(), "upcycle")
    cfg = upcycle_config(hf, moe_kw, model_kw, str(src / "config.json"))
    state = upcycled_state(HFWeights(src), cfg, noise, seed)
    check_shapes(state, cfg, str(src))
    tokenizer = str(src) if has_tokenizer(src) else None
    source = f"upcycled {hf.model_type}:{src} (noise {noise}, seed {seed})"
    write_model_dir(out, state, cfg, tokenizer=tokenizer, source=source)
    return out, cfg
