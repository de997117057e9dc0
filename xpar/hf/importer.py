"""`import`: a local Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE checkpoint as an xpar model dir
(top-k routing over all experts, dropless, balancing bias zero) that computes the same logits."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from xpar.checks import UserError
from xpar.hf import deepseek, families
from xpar.hf.hf_dir import HFWeights, has_tokenizer, read_hf_config
from xpar.hf.names import check_shapes, from_hf
from xpar.model import ModelConfig
from xpar.persist import check_out_dir, write_model_dir


def import_hf(src: Path, out: Path) -> tuple[Path, ModelConfig, str]:
    """Convert the HF checkpoint dir `src` into the model dir `out` (which must be new or
    empty). Returns the dir, its ModelConfig and the source's model_type."""
    src, out = Path(src), Path(out)
    check_out_dir(out)
    hf = read_hf_config(src, families.moe_config_classes(), "import")
    if hf.model_type == "deepseek_v3":
        cfg, state = _from_deepseek_v3(src)
    else:
        cfg = families.model_config_from_hf(hf, str(src / "config.json"))
        state = from_hf(HFWeights(src), cfg, families.LAYOUTS[hf.model_type])
    check_shapes(state, cfg, str(src))
    tokenizer = str(src) if has_tokenizer(src) else None
    write_model_dir(out, state, cfg, tokenizer=tokenizer, source=f"{hf.model_type}:{src}")
    return out, cfg, hf.model_type


def _from_deepseek_v3(src: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """DeepSeek-V3 through `xpar.hf.deepseek`, which maps every tensor itself."""
    weights = HFWeights(src)
    state = {name: weights.take(name) for name in weights.names()}
    try:
        return deepseek.from_deepseek_v3(json.loads((src / "config.json").read_text()), state)
    except ValueError as e:
        raise UserError(f"{src / 'config.json'}: {e}") from e
