"""The keys a model and its optimizer state are saved under, and this rank's pieces of them.

Keys: `model/<name>` for every tensor of the single-device model's state dict (weights and
balancing biases), `optim/<kind>/<name>` for AdamW's `exp_avg`, `exp_avg_sq` and `step` of
each trained parameter. Every backend saves these same keys, so any layout reads any other's.
"""

from __future__ import annotations

from torch import Tensor, nn

from xpar.parallel.mesh import Layout
from xpar.parallel.parallelize import expert_parameter_names
from xpar.persist.sharded import Fragment

MODEL = "model/"
OPTIM = "optim/"
MOMENTS = ("exp_avg", "exp_avg_sq")


def optim_key(kind: str, name: str) -> str:
    return f"{OPTIM}{kind}/{name}"


def param_name(key: str) -> str:
    """The parameter (or buffer) name a key belongs to."""
    if key.startswith(MODEL):
        return key[len(MODEL) :]
    return key[len(OPTIM) :].split("/", 1)[1]


def module_fragments(module: nn.Module, layout: Layout) -> dict[str, Fragment]:
    """`model/<name>` for every tensor of `module`'s state dict, as this rank holds it: an
    expert bank (E / P experts) at its EP rank's place in the global bank, the rest whole."""
    experts = set(expert_parameter_names(module))
    out = {}
    for name, t in module.state_dict().items():
        if name in experts:
            n = t.numel()
            out[MODEL + name] = Fragment(t.view(-1), layout.ep_rank * n, n * layout.ep_size)
        else:
            out[MODEL + name] = Fragment.whole(t)
    return out


def like(fragment: Fragment, t: Tensor) -> Fragment:
    """`t`, laid out like the parameter `fragment` is a piece of (an AdamW moment)."""
    return Fragment(t.view(-1), fragment.offset, fragment.numel)


def global_shapes(module: nn.Module, ep_size: int) -> dict[str, list[int]]:
    """The single-device model's state-dict shapes (expert banks hold E / P experts here)."""
    experts = set(expert_parameter_names(module))
    return {
        name: [t.shape[0] * ep_size, *t.shape[1:]] if name in experts else list(t.shape)
        for name, t in module.state_dict().items()
    }


def key_shape(key: str, shapes: dict[str, list[int]]) -> list[int]:
    """A key's global shape: its parameter's, or [1] for AdamW's step count."""
    if key.startswith(OPTIM + "step/"):
        return [1]
    return shapes[param_name(key)]
