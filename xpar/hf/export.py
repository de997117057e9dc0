"""`export`: an xpar model (a model dir or any training checkpoint) as a Hugging Face
checkpoint that `AutoModelForCausalLM.from_pretrained` loads and that computes the same
logits: Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE (see `families.choose_family`), Llama for a
dense model, or DeepSeek-V3 (`xpar.hf.deepseek`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from xpar.checks import UserError
from xpar.hf import deepseek, families
from xpar.hf.hf_dir import write_hf_dir
from xpar.hf.names import to_hf
from xpar.model import ModelConfig
from xpar.persist import ModelFiles, check_out_dir, read_model


@dataclass
class Exported:
    """What export wrote: the dir, the HF architecture, and notes on training-only settings."""

    path: Path
    architecture: str
    notes: list[str] = field(default_factory=list)


def export_hf(src: Path, out: Path) -> Exported:
    """Write the model at `src` (anything `read_model` takes) as an HF checkpoint dir `out`,
    which must be new or empty; nothing is left in `out` when a field does not map."""
    out = Path(out)
    check_out_dir(out)
    files = read_model(src)
    if files.task.kind != "lm":
        raise UserError(
            f"{files.path} was trained for task={files.task.kind!r}; export writes causal LMs "
            f"only (task=lm)"
        )
    try:
        family = families.choose_family(files.model)
        check_expert_bias(files.state, files.model)
    except UserError as ours:
        config, state = _deepseek_or_raise(files, ours)
    else:
        config, state = _export_family(family, files)
    write_hf_dir(out, config, state, files.tokenizer)
    return Exported(out, config["architectures"][0], notes_on(files.model, config))


def check_expert_bias(state: dict[str, Tensor], cfg: ModelConfig) -> None:
    """HF Mixtral/Qwen/OLMoE routers select by score alone: a non-zero aux-free balancing
    bias changes which experts a token gets, so it does not map."""
    for i in cfg.moe_layer_ids():
        name = f"layers.{i}.ffn.router.expert_bias"
        if name in state and bool(state[name].abs().max() > 0):
            rate = cfg.moe.bias_update_rate if cfg.moe is not None else 0.0
            raise families.refuse_export(
                name,
                "non-zero",
                f"aux-free balancing (moe.bias_update_rate={rate}) shifts expert selection, "
                f"which their routers cannot",
            )


def notes_on(cfg: ModelConfig, config: dict[str, Any]) -> list[str]:
    """What a user may not expect of the export of `cfg` as `config`."""
    moe, notes = cfg.moe, []
    if moe is not None and moe.capacity_factor is not None:
        notes.append(
            f"moe.capacity_factor={moe.capacity_factor} drops tokens in xpar; the HF model is "
            f"dropless, so its logits equal xpar's only where xpar dropped nothing"
        )
    if config.get("model_type") == "qwen2_moe" and moe is not None and not moe.shared_expert_gate:
        how = "gate weights 0 and a doubled down projection keep it exact"
        if not moe.num_shared_experts:
            how = "a zero shared expert of width 1 stands for none"
        notes.append(f"written as Qwen2-MoE, whose shared expert is always gated: {how}")
    return notes


def _export_family(family: str, files: ModelFiles) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg, state = files.model, files.state
    if family == "qwen2_moe":
        cfg, state = as_gated_shared_expert(cfg, state)
    dtype = str(files.state["embed.weight"].dtype).removeprefix("torch.")
    config = families.hf_config_from_model(family, cfg, dtype)
    return config, to_hf(state, cfg, families.LAYOUTS[family])


def as_gated_shared_expert(
    cfg: ModelConfig, state: dict[str, Tensor]
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """An equivalent model whose MoE layers all have a sigmoid-gated shared expert, the only
    form Qwen2-MoE has. No shared expert becomes one of width 1 with zero weights (it adds an
    exact 0); an ungated one gets gate weights 0, so sigmoid(x @ 0) = 1/2, and a doubled
    down projection: scaling by a power of two is exact in binary floating point."""
    moe = cfg.moe
    assert moe is not None
    if moe.shared_expert_gate:
        return cfg, state
    state, d = dict(state), cfg.d_model
    like = state["embed.weight"]
    for i in cfg.moe_layer_ids():
        ffn = f"layers.{i}.ffn."
        state[ffn + "shared_gate.weight"] = like.new_zeros(1, d)
        if moe.num_shared_experts:
            state[ffn + "shared_expert.w2.weight"] = state[ffn + "shared_expert.w2.weight"] * 2
        else:
            for w, shape in (("w1", (1, d)), ("w3", (1, d)), ("w2", (d, 1))):
                state[f"{ffn}shared_expert.{w}.weight"] = like.new_zeros(shape)
    shared = dict(shared_expert_gate=True, num_shared_experts=1, shared_d_ff=moe.shared_hidden or 1)
    return dataclasses.replace(cfg, moe=dataclasses.replace(moe, **shared)), state


def _deepseek_or_raise(
    files: ModelFiles, ours: UserError
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The DeepSeek-V3 mapping when it takes the layout the other families refused; else
    the other families' error, with DeepSeek-V3's reason when the layout is DeepSeek-like."""
    reason = deepseek.deepseek_v3_mismatch(files.model)
    if reason is None:
        try:
            return deepseek.to_deepseek_v3(files.model, files.state)
        except ValueError as e:
            raise UserError(str(e)) from e
    cfg = files.model
    deepseek_like = cfg.mla is not None or (
        cfg.moe is not None and (cfg.moe.router == "two_level" or cfg.moe.score_func == "sigmoid")
    )
    if deepseek_like:
        raise UserError(f"{ours}; nor to DeepSeek-V3: {reason}") from None
    raise ours
