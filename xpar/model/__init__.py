"""The MoE transformer LM: config and presets, the model, and analytic param/FLOP counts."""

from xpar.model.config import PRESETS, ModelConfig, get_preset
from xpar.model.flops import ParamCount, count_params, flops_per_token, summary
from xpar.model.transformer import (
    RECOMPUTE_MODES,
    LMOutput,
    MoETransformerLM,
    RMSNorm,
    apply_rotary,
    rope_cos_sin,
)

__all__ = [
    "PRESETS",
    "RECOMPUTE_MODES",
    "LMOutput",
    "ModelConfig",
    "MoETransformerLM",
    "ParamCount",
    "RMSNorm",
    "apply_rotary",
    "count_params",
    "flops_per_token",
    "get_preset",
    "rope_cos_sin",
    "summary",
]
