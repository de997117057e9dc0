"""Worker for tests/test_zero.py, run on every rank (gloo): prints one JSON line per rank.

`grads STAGE OUT`: the same first step through deepspeed=none (xpar's loop, ZeRO-0) and
deepspeed=zeroSTAGE on EP=2; reports whether DeepSpeed left each rank's experts as they were
(not rank 0's), the largest relative difference of expert and dense gradients, and the optimizer
state bytes this rank holds against the replicated state.

`kept TRAIN OUT`: the same model under deepspeed=zero2 on EP=2 with finetune.train=TRAIN
(experts frozen: DeepSpeed does not take them for experts); reports whether each rank's experts
are still its own after DeepSpeed starts.

`resave CHECKPOINT OUT`: resume CHECKPOINT at this layout (ZeRO-2, EP = the world) and save it
again at once into OUT, so the test can compare the two consolidated.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from xpar.parallel.mesh import init_mesh
from xpar.parallel.parallelize import expert_parameter_names
from xpar.training.trainer import Trainer

from jobs import FAST, build

BASE = [*FAST, "moe.capacity_factor=null", "data.micro_batch_size=2", "trainer.save_every=100"]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def grads(stage: str, out: Path) -> dict:
    from deepspeed.utils import safe_get_full_grad

    from xpar.training.zero import local_optimizer_bytes

    # Unclipped gradients are compared: DeepSpeed clips inside its step, after they are read.
    same = [*BASE, "parallel.ep_size=2", "optim.grad_clip=0"]
    cfg_ref = build([*same, "run_name=ref"])
    cfg_zero = build([*same, f"deepspeed=zero{stage}", "run_name=z"])
    mesh = init_mesh(cfg_ref.parallel, cfg_ref.moe, torch.device("cpu"))
    ref = Trainer(cfg_ref, out / f"ref{mesh.layout.rank}", {}, mesh)
    zero = Trainer(cfg_zero, out / f"zero{mesh.layout.rank}", {}, mesh)
    experts = expert_parameter_names(ref.model)
    ref_params, zero_params = (
        dict(ref.model.named_parameters()),
        dict(zero.model.named_parameters()),
    )
    # DeepSpeed's start-up broadcast must leave every rank's experts as xpar made them.
    kept = all(torch.equal(ref_params[n], zero_params[n]) for n in experts)
    checksum = float(sum(zero_params[n].double().sum() for n in experts))

    batch = ref.data.train.next_step()
    n = len(batch)
    for trainer in (ref, zero):
        for i, tokens in enumerate(batch):
            with trainer.backend.micro_step(last=i == n - 1) as module:
                o = trainer._forward(tokens, module)
                trainer.backend.backward((o.loss + o.aux_loss) / n)
    ref.backend.clip_grad_norm()  # reduces; optim.grad_clip=0 only measures
    diffs = {"expert": 0.0, "dense": 0.0}
    for name, p in ref_params.items():
        kind = "expert" if name in experts else "dense"
        got = safe_get_full_grad(zero_params[name])
        diffs[kind] = max(diffs[kind], rel_diff(got, p.grad))
    zero.backend.clip_grad_norm()  # DeepSpeed's step
    dense_numel = sum(p.numel() for n, p in ref_params.items() if n not in experts)
    expert_numel = sum(ref_params[n].numel() for n in experts)
    # Replicated: an fp32 master copy and AdamW's two moments of every parameter, on every rank.
    return {
        "rank": mesh.layout.rank,
        "ep_rank": mesh.layout.ep_rank,
        "experts_kept": kept,
        "expert_checksum": checksum,
        "grad_rel_diff": diffs,
        "bytes": local_optimizer_bytes(zero.backend.engine),
        "replicated": {"dense": 12 * dense_numel, "expert": 12 * expert_numel},
        "world": mesh.layout.world,
        "edp": mesh.layout.edp_size,
    }


def kept(train: str, out: Path) -> dict:
    same = [*BASE, "parallel.ep_size=2", f"finetune.train={train}"]
    mesh = init_mesh(build(same).parallel, build(same).moe, torch.device("cpu"))
    ref = Trainer(build([*same, "run_name=ref"]), out / f"ref{mesh.layout.rank}", {}, mesh)
    zero = Trainer(build([*same, "deepspeed=zero2", "run_name=z"]), out / "z", {}, mesh)
    zero_params = dict(zero.model.named_parameters())
    names = expert_parameter_names(ref.model)
    frozen = not any(zero_params[n].requires_grad for n in names)
    same_banks = all(
        torch.equal(p, zero_params[n]) for n, p in ref.model.named_parameters() if n in names
    )
    return {"rank": mesh.layout.rank, "frozen": frozen, "experts_kept": same_banks}


def resave(checkpoint: Path, out: Path) -> dict:
    world = int(os.environ.get("WORLD_SIZE", 1))
    resume = f"trainer.resume={checkpoint}"
    cfg = build([*BASE, f"parallel.ep_size={world}", "deepspeed=zero2", resume, "run_name=r"])
    trainer = Trainer(cfg, out, {})
    path = trainer.save()
    return {"rank": trainer.rank, "step": trainer.step, "path": str(path)}


def main() -> None:
    mode, a, b = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    result = {"grads": grads, "kept": kept}[mode](a, b) if mode != "resave" else resave(Path(a), b)
    print(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
