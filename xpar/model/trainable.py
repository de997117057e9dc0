"""Which parameters train under a fine-tuning policy (`finetune.train`); the rest are frozen.

Policies: `all`; `head` (the task head, or the LM head: `lm_head`, or the embedding when it is
tied); `experts` (routed expert banks and shared experts, and the head); `router+head` (the
routers' gates, and the head).
"""

from __future__ import annotations

from torch import nn

from xpar.moe import MoELayer

POLICIES = ("all", "head", "experts", "router+head")


def head_names(model: nn.Module) -> set[str]:
    """The head's parameter names: a task model's `head`, else the LM head (the embedding
    when the two are tied)."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return {f"head.{n}" for n, _ in head.named_parameters()}
    if getattr(model, "lm_head", None) is not None:
        return {"lm_head.weight"}
    return {"embed.weight"}


def _moe_part_names(model: nn.Module, part: str) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, MoELayer):
            continue
        for sub in (part,) if part == "router" else ("experts", "shared_expert", "shared_gate"):
            child = getattr(mod, sub, None)
            if isinstance(child, nn.Module):
                names |= {f"{mod_name}.{sub}.{n}" for n, _ in child.named_parameters()}
    return names


def trainable_names(model: nn.Module, policy: str) -> set[str]:
    """The parameter names `policy` trains."""
    if policy not in POLICIES:
        raise ValueError(f"finetune.train={policy!r} must be one of {', '.join(POLICIES)}")
    every = {n for n, _ in model.named_parameters()}
    if policy == "all":
        return every
    names = head_names(model)
    if policy == "experts":
        names |= _moe_part_names(model, "experts")
    elif policy == "router+head":
        names |= _moe_part_names(model, "router")
    return names & every


def apply_policy(model: nn.Module, policy: str) -> None:
    """Freeze (requires_grad=False) every parameter `policy` does not train."""
    train = trainable_names(model, policy)
    for name, p in model.named_parameters():
        p.requires_grad_(name in train)


def routers_frozen(model: nn.Module) -> bool:
    """Whether the routers' gates are frozen (their balancing biases then stay put too)."""
    gates = [m.router.gate.weight for m in model.modules() if isinstance(m, MoELayer)]
    return bool(gates) and not any(p.requires_grad for p in gates)
