"""DeepSpeed checkpoints inside xpar's atomic scheme, and their re-sharding.

`checkpoints/step_N/` of a ZeRO run holds
- `deepspeed/`: DeepSpeed's own save: dense module weights (`mp_rank_00_model_states.pt`) and
  every rank's ZeRO partition of fp32 master weights and AdamW moments
  (`zero_pp_rank_R_mp_rank_00_optim_states.pt`), expert groups included;
- `experts-epK-of-P.safetensors`: the fp32 expert banks of EP rank K, one file per EP rank;
- `model.json` (the parameters in module order with their global shapes, and the layout),
  `scheduler.json`, `trainer.json`, and each rank's RNG state;
- `meta.json`, written last by rank 0 (size and sha256 of every file) as the commit marker.

Every rank writes its files into one temp dir that rank 0 renames into place once all are
written and hashed (ranks hash disjoint subsets), so a crash leaves earlier checkpoints intact.
DeepSpeed's `latest` pointer is not written: xpar's marker decides what is complete.

The same world and EP size resume through DeepSpeed's load, bit-exactly. Any other layout, or a
run without DeepSpeed, reads the checkpoint as a plain xpar checkpoint: the partitions are put
back together from DeepSpeed's parameter-slice maps (dense over all saving ranks, experts over
each EDP group, then EP ranks concatenated), which re-shards experts and their moments to any
EP size. `python -m xpar.export` writes that consolidated form to disk.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor

from xpar.checks import UserError
from xpar.parallel.parallelize import ParallelModel, expert_parameter_names
from xpar.parallel.state import expert_slice, full_model_shapes, load_full_model_state
from xpar.training import checkpoint as ckpt
from xpar.training.optim import decay_split

DS_TAG = "deepspeed"
KIND = "deepspeed"


def _expert_file(ep_rank: int, ep_size: int) -> str:
    return f"experts-ep{ep_rank}-of-{ep_size}.safetensors"


def _zero_file(rank: int) -> str:
    return f"{DS_TAG}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _barrier(pm: ParallelModel) -> None:
    if pm.mesh.layout.world > 1:
        dist.barrier()


def model_description(pm: ParallelModel) -> dict[str, Any]:
    """The parameters in module order with their global shapes, and the layout."""
    experts = set(expert_parameter_names(pm.module))
    shapes = full_model_shapes(pm)
    layout = pm.mesh.layout
    params = [[n, list(shapes[n]), n in experts] for n, _ in pm.module.named_parameters()]
    moe_layers = list(pm.module.moe_layers())
    return {
        "params": params,
        "world": layout.world,
        "ep_size": layout.ep_size,
        "num_experts": moe_layers[0].cfg.num_experts if moe_layers else 0,
    }


# ---- saving --------------------------------------------------------------------------------


def save_zero(
    root: Path,
    step: int,
    pm: ParallelModel,
    engine,
    scheduler_state: dict[str, Any],
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Save through DeepSpeed (every rank takes part) and commit atomically; see the module
    docstring for the layout."""
    from deepspeed.utils import safe_get_full_fp32_param

    layout = pm.mesh.layout
    root = Path(root)
    tmp = root / f".tmp-step_{step}"
    if layout.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(pm)
    engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=False)
    params = dict(pm.module.named_parameters())
    # A frozen bank (finetune.train) has no fp32 master copy: the module's own is the weight.
    banks = {
        n: safe_get_full_fp32_param(params[n]) if params[n].requires_grad else params[n].float()
        for n in expert_parameter_names(pm.module)
    }
    if layout.rank < layout.ep_size:  # EDP rank 0 of each EP rank
        ckpt.write_file(tmp / _expert_file(layout.ep_rank, layout.ep_size), ckpt.to_cpu(banks))
    rng_tensors, rng_rest = ckpt.rng_state()
    ckpt.write_file(tmp / f"rng-rank{layout.rank}.safetensors", rng_tensors)
    ckpt.write_file(tmp / f"rng-rank{layout.rank}.json", ckpt.json_bytes(rng_rest, "RNG state"))
    if layout.rank == 0:
        for name, obj in (
            ("model.json", model_description(pm)),
            ("scheduler.json", scheduler_state),
            ("trainer.json", extra),
        ):
            ckpt.write_file(tmp / name, ckpt.json_bytes(obj, name))
    _barrier(pm)
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    mine = {f: _file_info(tmp / f) for f in files[layout.rank :: layout.world]}
    listed: dict[str, Any] = {}
    for part in pm.gather_objects(mine):
        listed.update(part)
    path = root / f"step_{step}"
    if layout.rank == 0:
        meta = {"format_version": ckpt.FORMAT_VERSION, "step": step, "kind": KIND}
        meta["files"] = dict(sorted(listed.items()))
        ckpt.write_file(tmp / "meta.json", json.dumps(meta, indent=1).encode())
        for d in (tmp / DS_TAG, tmp):
            ckpt.fsync(d)
        path = ckpt.commit(root, tmp, f"step_{step}")
        ckpt.remove_leftovers(root)
        ckpt.prune_checkpoints(root, keep)
    _barrier(pm)
    return path


def _file_info(path: Path) -> dict[str, Any]:
    ckpt.fsync(path)
    return {"bytes": path.stat().st_size, "sha256": ckpt.sha256(path)}


# ---- reading -------------------------------------------------------------------------------


def is_zero_checkpoint(path: Path) -> bool:
    meta = ckpt.read_meta(Path(path))
    return meta is not None and meta.get("kind") == KIND


def verify(path: Path, pm: ParallelModel | None = None) -> dict[str, Any]:
    """Check every file against meta.json (ranks share the hashing) and return model.json.
    Raises the same UserError on every rank."""
    path = Path(path)
    error = None
    try:
        ckpt.verify(path, required=("model.json", "scheduler.json", "trainer.json"), hash_=False)
        meta = ckpt.read_meta(path)
        desc = ckpt.read_json(path / "model.json")
        required = [_zero_file(r) for r in range(desc["world"])]
        required += [_expert_file(k, desc["ep_size"]) for k in range(desc["ep_size"])]
        for name in required:
            if name not in meta["files"]:
                raise UserError(f"checkpoint {path} is incomplete or corrupt: {name} is missing")
        rank, world = (0, 1) if pm is None else (pm.mesh.layout.rank, pm.mesh.layout.world)
        for name in sorted(meta["files"])[rank::world]:
            ckpt.check_file(path, name, meta["files"][name])
    except UserError as e:
        error = str(e)
    errors = [error] if pm is None else pm.gather_objects(error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise UserError(first)
    return desc


def check_model(path: Path, desc: dict[str, Any], pm: ParallelModel) -> None:
    """The saved model must be this run's: same expert count, same parameter shapes."""
    have = model_description(pm)
    if desc["num_experts"] != have["num_experts"]:
        raise UserError(
            f"checkpoint {path} has moe.num_experts={desc['num_experts']}, this run "
            f"moe.num_experts={have['num_experts']}"
        )
    saved = {n: torch.empty(s, device="meta") for n, s, _ in desc["params"]}
    want = {n: tuple(s) for n, s, _ in have["params"]}
    ckpt.check_model_keys(path, want, saved)


def same_layout(desc: dict[str, Any], pm: ParallelModel) -> bool:
    layout = pm.mesh.layout
    return desc["world"] == layout.world and desc["ep_size"] == layout.ep_size


def load_same_layout(path: Path, pm: ParallelModel, engine) -> None:
    """DeepSpeed's own load (the world and EP size it was saved at): dense weights, fp32
    master partitions and moments; then this EP rank's expert banks from its own file (DeepSpeed
    restores the master copies of experts but not the module's). Exact."""
    load_path, _ = engine.load_checkpoint(
        str(path),
        tag=DS_TAG,
        load_module_strict=False,  # the expert banks are not in DeepSpeed's module file
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if load_path is None:
        raise UserError(f"checkpoint {path}: DeepSpeed found nothing to load in {DS_TAG}/")
    layout = pm.mesh.layout
    banks = load_file(path / _expert_file(layout.ep_rank, layout.ep_size))
    params = dict(pm.module.named_parameters())
    with torch.no_grad():
        for name in expert_parameter_names(pm.module):
            params[name].copy_(banks[name])


def restore_rng(path: Path, desc: dict[str, Any], rank: int) -> None:
    """This rank's saved RNG state (rank 0's when the checkpoint had fewer ranks)."""
    r = rank if rank < desc["world"] else 0
    tensors = load_file(path / f"rng-rank{r}.safetensors")
    ckpt.set_rng_state(tensors, ckpt.read_json(path / f"rng-rank{r}.json"))


def _torch_load(path: Path) -> Any:
    # DeepSpeed's own files hold Python objects (loss scaler, slice maps): not weights_only.
    return torch.load(path, map_location="cpu", weights_only=False)


def read_as_plain(path: Path) -> ckpt.Checkpoint:
    """The checkpoint as a plain xpar checkpoint: the global model and the optimizer state in
    the layout a single process's AdamW has (xpar.training.optim groups), put together from
    every rank's ZeRO partition. Reads only; call verify() first."""
    path = Path(path)
    desc = ckpt.read_json(path / "model.json")
    world, P = desc["world"], desc["ep_size"]
    zero = [_torch_load(path / _zero_file(r))["optimizer_state_dict"] for r in range(world)]
    module_state = _torch_load(path / DS_TAG / "mp_rank_00_model_states.pt")["module"]
    local_shapes = {n: [s[0] // P, *s[1:]] if e else s for n, s, e in desc["params"]}
    expert_names = {n for n, _, e in desc["params"] if e}

    def assemble(ranks: list[int], group: int, tensors: list[Tensor]) -> dict[str, Tensor]:
        """name -> full local tensor from the partitions of `ranks` (in partition order)."""
        pieces: dict[str, list[Tensor]] = {}
        for r in ranks:
            for name, addr in zero[r]["param_slice_mappings"][group].items():
                flat = tensors[r].flatten()
                pieces.setdefault(name, []).append(flat[addr.start : addr.start + addr.numel])
        return {n: torch.cat(p).view(local_shapes[n]) for n, p in pieces.items()}

    weights: dict[str, Tensor] = {}
    moments: dict[str, dict[str, Tensor]] = {}
    step = None
    base0 = zero[0]["base_optimizer_state"]
    for g, group in enumerate(base0["param_groups"]):
        if group.get("moe"):
            partition_groups = [list(range(k, world, P)) for k in range(P)]
        else:
            partition_groups = [list(range(world))]
        per_kind: dict[str, list[dict[str, Tensor]]] = {"w": [], "exp_avg": [], "exp_avg_sq": []}
        for ranks in partition_groups:
            fp32 = [z["single_partition_of_fp32_groups"][g] for z in zero]
            per_kind["w"].append(assemble(ranks, g, fp32))
            state = [z["base_optimizer_state"]["state"].get(g, {}) for z in zero]
            if all("exp_avg" in s for s in state):
                step = state[0]["step"]
                for key in ("exp_avg", "exp_avg_sq"):
                    per_kind[key].append(assemble(ranks, g, [s[key] for s in state]))
        for key, parts in per_kind.items():
            for name in parts[0] if parts else []:
                full = (
                    torch.cat([p[name] for p in parts]) if name in expert_names else parts[0][name]
                )
                if key == "w":
                    weights[name] = full
                else:
                    moments.setdefault(name, {})[key] = full
    model_state = {}
    for name, value in module_state.items():  # buffers and module order
        model_state[name] = weights.pop(name, value)
    model_state.update(weights)  # expert banks (not in DeepSpeed's module file)
    # Every bank from the EP ranks' own files: they hold frozen banks too (finetune.train),
    # which DeepSpeed neither partitions nor keeps out of its module file.
    files = [load_file(path / _expert_file(k, P)) for k in range(P)]
    for name in expert_names:
        model_state[name] = torch.cat([f[name] for f in files])
    order = [n for n, _, _ in desc["params"]]
    optimizer_state = _plain_optimizer_state(order, desc, moments, step, base0["param_groups"])
    return ckpt.Checkpoint(
        path,
        model_state,
        optimizer_state,
        ckpt.read_json(path / "scheduler.json"),
        ckpt.read_json(path / "trainer.json"),
    )


def plain_order(params: list[tuple[str, Sequence[int]]]) -> list[str]:
    """Parameter names in the order of a single process's AdamW state
    (xpar.training.optim.param_groups): the decaying ones, then the others."""
    decay, no_decay = decay_split(params)
    return decay + no_decay


def _plain_optimizer_state(
    order: list[str],
    desc: dict[str, Any],
    moments: dict[str, dict[str, Tensor]],
    step: Tensor | None,
    ds_groups: list[dict[str, Any]],
) -> dict[str, Any]:
    shapes = {n: s for n, s, _ in desc["params"]}
    decay, no_decay = decay_split([(n, shapes[n]) for n in order])
    names, n_decay = decay + no_decay, len(decay)
    hyper = {k: v for k, v in ds_groups[0].items() if k not in ("params", "name", "moe")}
    groups = [
        {**hyper, "weight_decay": ds_groups[0]["weight_decay"], "params": list(range(n_decay))},
        {**hyper, "weight_decay": 0.0, "params": list(range(n_decay, len(names)))},
    ]
    state = {}
    if step is not None:
        for i, name in enumerate(names):
            if name in moments:  # frozen parameters (finetune.train) have none
                state[i] = {"step": step.clone(), **moments[name]}
    return {"state": state, "param_groups": groups}


# ---- loading any checkpoint into a ZeRO engine of another layout ---------------------------


def load_plain_into_engine(ck: ckpt.Checkpoint, pm: ParallelModel, engine) -> None:
    """Put a plain (global) checkpoint into this rank's module, fp32 master partitions and
    AdamW moments, slicing expert banks to this rank's experts."""
    load_full_model_state(pm, ck.model_state)
    experts = set(expert_parameter_names(pm.module))
    named = list(pm.module.named_parameters())
    order = plain_order([(n, list(p.shape)) for n, p in named if p.requires_grad])
    saved = ck.optimizer_state["state"]
    by_name = {n: saved.get(i, {}) for i, n in enumerate(order)}
    name_of = {id(p): n for n, p in named}

    def local(name: str, t: Tensor) -> Tensor:
        return expert_slice(t, pm) if name in experts else t

    zero = engine.optimizer
    for g, lp_params in enumerate(zero.bit16_groups):
        flat = zero.single_partition_of_fp32_groups[g]
        have_state = all("exp_avg" in by_name[name_of[id(p)]] for p in lp_params)
        buffers = {k: torch.zeros_like(flat) for k in ("exp_avg", "exp_avg_sq")}
        for lp in lp_params:
            mapping = lp._hp_mapping
            if mapping is None:
                continue
            name = name_of[id(lp)]
            lo, n = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
            hp = mapping.hp_fragment_address.start
            sources = {"w": ck.model_state[name]}
            if have_state:
                sources.update({k: by_name[name][k] for k in buffers})
            for key, src in sources.items():
                piece = local(name, src).flatten()[lo : lo + n].to(flat.device, flat.dtype)
                target = flat.data if key == "w" else buffers[key]
                target[hp : hp + n].copy_(piece)
        if have_state:
            group = zero.optimizer.param_groups[g]
            on_device = group.get("fused") or group.get("capturable")
            step = by_name[name_of[id(lp_params[0])]]["step"]
            zero.optimizer.state[flat] = {
                "step": torch.tensor(
                    float(step), dtype=torch.float32, device=flat.device if on_device else "cpu"
                ),
                **buffers,
            }
