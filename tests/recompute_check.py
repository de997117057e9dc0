"""Activation recompute against none: the run tests/test_recompute.py makes in its own process,
and its worker for EP=2, run on every rank (gloo), printing one JSON line per rank.

`train(overrides, mode, run_dir)` drives Trainer.train_step for STEPS steps as the loop does,
then runs one more forward and backward without stepping and keeps what a comparison needs:
the per-step figures, every gradient, the weights and buffers, how often each layer's attention
and experts ran in that pass, and the bytes autograd saved for backward outside checkpoints.

`python recompute_check.py OUT`: every case of EP_CASES under trainer.recompute=none|experts|full
in one process group (EP=2); per case and mode, what differs from none on this rank.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from xpar.moe import MoELayer
from xpar.parallel.mesh import Mesh, init_mesh
from xpar.training.trainer import Trainer

from jobs import FAST, build

STEPS = 5
MODES = ("none", "experts", "full")
# Several micro-batches a step (4 in one process, 2 a rank at EP=2): accumulation runs
# through the recompute too.
BASE = [
    *FAST,
    "data.batch_size=4",
    "data.micro_batch_size=1",
    "optim.warmup_steps=1",
    "trainer.save_every=100",
]
EP_CASES = {
    "topk": [],
    "two_level": ["moe=two_level"],
    "capacity_jitter": ["moe=capacity", "moe.jitter_eps=0.1"],
    "aux_free": ["moe=aux_free"],
    "zero2": ["deepspeed=zero2"],
}


@dataclass
class Run:
    """What one run under one recompute mode leaves to compare."""

    steps: dict[str, list[float]]  # loss, aux_loss, grad_norm, dropped_fraction per step
    a2a: list[dict[str, int]]  # a2a_rows and a2a_bytes per step (EP only)
    grads: dict[str, Tensor]
    trainable: set[str]  # the parameters that require grad
    weights: dict[str, Tensor]
    buffers: dict[str, Tensor]
    calls: dict[str, int] = field(default_factory=dict)  # calls in the extra pass, by layer.part
    saved_bytes: int = 0  # what autograd kept for backward in the extra pass
    tokens: int = 0  # tokens in the extra pass
    micro_steps: int = 0  # micro-batches in the extra pass
    top_k: int = 0


def _count_calls(model: torch.nn.Module, calls: dict[str, int]) -> list:
    """Count into `calls` each layer's attention, experts and shared expert calls."""
    handles = []
    for i, block in enumerate(model.layers):
        parts = {"attn": block.attn}
        if isinstance(block.ffn, MoELayer):
            parts["experts"] = block.ffn.experts
            if block.ffn.shared_expert is not None:
                parts["shared"] = block.ffn.shared_expert
        for part, module in parts.items():
            key = f"{i}.{part}"
            calls[key] = 0

            def hook(*_, key=key):
                calls[key] += 1

            # A pre-hook: a recompute stops once it has what backward needs (torch's early
            # stop), before a forward hook would run.
            handles.append(module.register_forward_pre_hook(hook))
    return handles


def _full_grads(trainer: Trainer) -> dict[str, Tensor]:
    params = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    if trainer.backend.name == "deepspeed":  # the grads live in DeepSpeed's partitions
        from deepspeed.utils import safe_get_full_grad

        return {n: safe_get_full_grad(p).clone() for n, p in params}
    return {n: p.grad.clone() for n, p in params if p.grad is not None}


def train(overrides: list[str], mode: str, run_dir: Path, mesh: Mesh | None = None) -> Run:
    """STEPS steps under trainer.recompute=MODE, then one forward and backward (see module)."""
    cfg = build([*BASE, *overrides, f"trainer.recompute={mode}", "run_name=r"])
    trainer = Trainer(cfg, run_dir, {}, mesh)
    steps: dict[str, list[float]] = {k: [] for k in ("loss", "aux_loss", "grad_norm")}
    steps["dropped_fraction"] = []
    a2a = []
    for _ in range(STEPS):
        r = trainer.train_step(trainer.data.train.next_step())
        for key, values in steps.items():
            values.append(getattr(r, key))
        a2a.append({k: r.a2a[k] for k in ("a2a_rows", "a2a_bytes") if k in r.a2a})
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    # One more step's forward and backward, through the backend as train_step goes (DeepSpeed
    # reduces into its partitions at the last micro-step), without stepping.
    batch = trainer.data.train.next_step()
    trainer.model.train()
    calls: dict[str, int] = {}
    handles = _count_calls(trainer.model, calls)
    saved = [0]

    def pack(t: Tensor) -> Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    for i, rows in enumerate(batch):
        with trainer.backend.micro_step(last=i == len(batch) - 1) as module:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = trainer._forward(rows, module)
            trainer.backend.backward((out.loss + out.aux_loss) / len(batch))
    for h in handles:
        h.remove()
    moe = cfg.model_config().moe
    return Run(
        steps=steps,
        a2a=a2a,
        grads=_full_grads(trainer),
        trainable={n for n, p in trainer.model.named_parameters() if p.requires_grad},
        weights=weights,
        buffers={n: b.clone() for n, b in trainer.model.named_buffers()},
        calls=calls,
        saved_bytes=saved[0],
        tokens=sum(trainer.runner.tokens(rows)[:, :-1].numel() for rows in batch),  # LM inputs
        micro_steps=len(batch),
        top_k=moe.top_k if moe else 0,
    )


def differences(ref: Run, got: Run) -> list[str]:
    """What is not bitwise equal between two runs: per-step figures, and tensors by name
    (a name only one run has counts as a difference)."""
    out = [key for key in ref.steps if ref.steps[key] != got.steps[key]]
    for kind in ("grads", "weights", "buffers"):
        a, b = getattr(ref, kind), getattr(got, kind)
        out += [f"{kind}:{n}" for n in sorted(a.keys() ^ b.keys())]
        out += [f"{kind}:{n}" for n in sorted(a.keys() & b.keys()) if not torch.equal(a[n], b[n])]
    return out


def pending_loads(run: Run) -> list[float]:
    """Each MoE layer's balancing-load tally after the extra pass (slots routed)."""
    return [float(b.sum()) for n, b in run.buffers.items() if n.endswith("router.pending_load")]


def main() -> None:
    out = Path(sys.argv[1])
    ep = ["parallel.ep_size=2"]
    cfg = build([*BASE, *ep])
    mesh = init_mesh(cfg.parallel, cfg.moe, torch.device("cpu"))
    rank = mesh.layout.rank
    result: dict = {"rank": rank, "cases": {}}
    for case, extra in EP_CASES.items():
        runs = {m: train([*ep, *extra], m, out / f"{case}_{m}_{rank}", mesh) for m in MODES}
        result["cases"][case] = {
            m: {
                "differ": differences(runs["none"], r),
                "a2a": r.a2a,
                "calls": r.calls,
                "pending": pending_loads(r),
                "tokens": r.tokens,
                "micro_steps": r.micro_steps,
                "top_k": r.top_k,
                "grad_count": len(r.grads),
            }
            for m, r in runs.items()
        }
    print(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
