"""Worker for tests/test_fsdp.py, run on every rank (gloo): prints one JSON line per rank.

`grads OUT [OVERRIDES...]`: for each case (top-k and two-level routing, with and without
gradient accumulation; HSDP with recompute; CPU offload), one step through parallel.shard=fsdp
at the job's layout and (on rank 0) through a single-process plain trainer on the whole batch,
then 10 training steps of both; reports the largest relative difference of every gathered
gradient, of the gradient norm and of the losses, and the bytes this rank holds of the
parameters and of AdamW's state against what its shards should hold.

`skewed OUT`: every token routed to EP rank 0's experts (their balancing bias raised), three
steps through fsdp at EP=2 beside the single-process run; reports the losses of both and the
tokens each rank's experts got.

`resave CHECKPOINT OUT OVERRIDES...`: resume CHECKPOINT at the layout OVERRIDES name and save
it again at once into OUT, so the test can compare the two consolidated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from xpar.parallel.mesh import Mesh, init_mesh, world_from_env
from xpar.parallel.parallelize import expert_parameter_names
from xpar.training.fsdp import shard_range
from xpar.training.plain import local_shard
from xpar.training.trainer import Trainer

from jobs import FAST, build

BASE = [*FAST, "moe.capacity_factor=null", "trainer.save_every=100", "optim.grad_clip=0"]
STEPS = 10
# Per case: the overrides of both runs, and those of the fsdp run alone. Routing, and
# micro-batches: a batch of 8 over W ranks is 8 / W rows per rank in one micro-step, or in
# micro-steps of one row. The balancing loss is taken per micro-batch: under accumulation each
# rank keeps its own (parallel.reduce_aux_stats=false), so that one process in micro-batches of
# one row sees the same; reduced into the shards every micro-step, too. Then, at 4 ranks, HSDP
# (shards of 2 ranks, replicated twice) with full recompute, and at 2 the state offloaded to
# the CPU.
ACCUM = ["data.micro_batch_size=1", "parallel.reduce_aux_stats=false"]
CASES = {
    "topk": (["moe=topk"], []),
    "topk_accum": (["moe=topk", *ACCUM], []),
    "two_level": (["moe=two_level"], []),
    "two_level_accum": (["moe=two_level", *ACCUM], []),
    "topk_accum_reduced": (["moe=topk", *ACCUM], ["parallel.reduce_micro_steps=true"]),
    "hsdp_recompute": (["moe=topk"], ["parallel.shard_size=2", "trainer.recompute=full"]),
    "offload": (["moe=topk"], ["parallel.offload=true"]),
}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def backward(trainer: Trainer) -> torch.Tensor:
    """One step's forward and backward over the trainer's own batch; the gradient norm."""
    batch = trainer.data.train.next_step()
    n = len(batch)
    for i, rows in enumerate(batch):
        with trainer.backend.micro_step(last=i == n - 1) as module:
            out = trainer._forward(rows, module)
            trainer.backend.backward((out.loss + out.aux_loss) / n)
    return trainer.backend.clip_grad_norm()


def full_grad(trainer: Trainer, name: str, p: torch.nn.Parameter, experts: set[str]):
    """The single-device model's gradient of `name`: FSDP's shards gathered, and for an
    expert bank every EP rank's experts."""
    g = p.grad.full_tensor()
    if name not in experts or trainer.mesh.layout.ep_size == 1:
        return g
    parts = [torch.empty_like(g) for _ in range(trainer.mesh.layout.ep_size)]
    dist.all_gather(parts, g.contiguous(), group=trainer.mesh.ep_group)
    return torch.cat(parts)


def local_bytes(trainer: Trainer, experts: set[str]) -> dict[str, dict[str, int]]:
    """Bytes of this rank's rows of the parameters and of their AdamW state (moments and
    steps), as the tensors hold them (FSDP's storage pads the last ranks' rows to a whole
    chunk; this counts the rows)."""
    out = {"params": {"dense": 0, "expert": 0}, "optimizer": {"dense": 0, "expert": 0}}
    for name, p in trainer.model.named_parameters():
        kind = "expert" if name in experts else "dense"
        out["params"][kind] += nbytes(local_shard(p))
        for t in trainer.optimizer.state.get(p, {}).values():
            out["optimizer"][kind] += nbytes(local_shard(t))
    return out


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def expected_bytes(trainer: Trainer, experts: set[str]) -> dict[str, dict[str, int]]:
    """What this rank's shards hold: the rows shard_range gives it of every tensor (FSDP's
    ceil(rows / ranks) chunks; the last rank's is shorter, and a rank past the rows holds
    none), fp32; AdamW: two moments per trained element and a 4-byte step per trained tensor."""
    out = {"params": {"dense": 0, "expert": 0}, "optimizer": {"dense": 0, "expert": 0}}
    for name, p in trainer.model.named_parameters():
        kind = "expert" if name in experts else "dense"
        _, rows = shard_range(p)
        numel = rows * (p.numel() // p.shape[0])
        out["params"][kind] += 4 * numel
        if p.requires_grad:
            out["optimizer"][kind] += 2 * 4 * numel + 4
    return out


def grads(out: Path, extra: list[str]) -> dict:
    """See the module docstring; rank 0 alone runs the single-process reference and reports
    the differences, every rank its bytes."""
    rank, results, mesh = world_from_env()[1], {}, None
    world = world_from_env()[0]
    for case, (overrides, own) in CASES.items():
        if (case, world) in (("hsdp_recompute", 2), ("offload", 4)):
            continue
        cfg = build([*BASE, *overrides, *extra, *own, "parallel.shard=fsdp", "run_name=f"])
        mesh = mesh or init_mesh(cfg.parallel, cfg.moe, torch.device("cpu"))
        sharded = Trainer(cfg, out / f"{case}_f{rank}", {}, mesh)
        ref = None
        if rank == 0:
            ref = Trainer(build([*BASE, *overrides, "run_name=ref"]), out / case, {}, Mesh.solo())
        norm = backward(sharded)
        experts = set(expert_parameter_names(sharded.model))
        grads = {n: full_grad(sharded, n, p, experts) for n, p in sharded.model.named_parameters()}
        results[case] = {"accum": sharded.accum_steps}
        curves: dict[str, list[float]] = {"fsdp": [], "ref": []}
        if ref is not None:
            ref_norm = backward(ref)
            diffs = {"expert": 0.0, "dense": 0.0}
            for name, p in ref.model.named_parameters():
                kind = "expert" if name in experts else "dense"
                diffs[kind] = max(diffs[kind], rel_diff(grads[name], p.grad))
            results[case] |= {"grad_rel_diff": diffs, "norm_rel_diff": rel_diff(norm, ref_norm)}
        for trainer, curve in ((sharded, curves["fsdp"]), (ref, curves["ref"])):
            if trainer is None:
                continue
            trainer.optimizer.zero_grad(set_to_none=True)  # that step is not taken
            trainer.model.discard_expert_load()
            for _ in range(STEPS):
                curve.append(trainer.train_step(trainer.data.train.next_step()).loss)
        if ref is not None:
            pairs = zip(*curves.values(), strict=True)
            results[case]["loss_rel_diff"] = max(abs(a - b) / b for a, b in pairs)
        results[case] |= {
            "bytes": local_bytes(sharded, experts),
            "expected": expected_bytes(sharded, experts),
        }
    layout = mesh.layout
    return {"rank": layout.rank, "world": layout.world, "ep": layout.ep_size, "cases": results}


def skewed(out: Path, extra: list[str]) -> dict:
    same = [*BASE, "parallel.ep_size=2", "data.micro_batch_size=2", "trainer.max_steps=3"]
    cfg = build([*same, "parallel.shard=fsdp", "run_name=f"])
    mesh = init_mesh(cfg.parallel, cfg.moe, torch.device("cpu"))
    sharded = Trainer(cfg, out / f"f{mesh.layout.rank}", {}, mesh)
    ref = Trainer(build([*BASE, "run_name=ref"]), out / f"ref{mesh.layout.rank}", {}, Mesh.solo())
    X = cfg.moe.num_experts // 2  # EP rank 0 holds experts [0, X)
    for trainer in (sharded, ref):
        for layer in trainer.model.moe_layers():
            layer.router.expert_bias[:X] += 100.0
    losses, load = {"fsdp": [], "ref": []}, []
    for _ in range(3):
        r = sharded.train_step(sharded.data.train.next_step())
        losses["fsdp"].append(r.loss)
        load.append(r.load_LE.tolist())
        losses["ref"].append(ref.train_step(ref.data.train.next_step()).loss)
    return {"rank": mesh.layout.rank, "losses": losses, "load": load, "experts_per_rank": X}


def resave(out: Path, extra: list[str]) -> dict:
    checkpoint, *overrides = extra
    cfg = build([*BASE, *overrides, f"trainer.resume={checkpoint}", "run_name=r"])
    trainer = Trainer(cfg, out, {})
    path = trainer.save()
    return {"rank": trainer.rank, "step": trainer.step, "path": str(path)}


def main() -> None:
    mode, out, extra = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    result = {"grads": grads, "skewed": skewed, "resave": resave}[mode](out, extra)
    print(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
