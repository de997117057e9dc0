"""Checkpoints of xpar's first format, read once to convert them (`python -m xpar.export`):

- plain: the gathered global model (`model.safetensors`), torch's optimizer state numbered in
  xpar's AdamW group order (`optimizer.safetensors` + `optimizer.json`), `scheduler.json`,
  `trainer.json`, rank 0's RNG;
- DeepSpeed: DeepSpeed's own files (every rank's ZeRO partition, `deepspeed/*.pt`), the expert
  banks per EP rank, `model.json` (parameters, layout), each rank's RNG.

Neither holds its architecture: it comes from the run's `.hydra/config.yaml`, two levels up.
DeepSpeed's `.pt` files are pickles; they are read with torch's weights-only loader, which
builds nothing but tensors, containers and the three DeepSpeed record types allowed below.
"""

from __future__ import annotations

import pickle  # for its exception type: the file is read by torch's weights-only loader
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from xpar.checks import UserError
from xpar.model.trainable import apply_policy
from xpar.persist.describe import Description, TaskInfo, TensorInfo, model_config_from_dict
from xpar.persist.fragments import MODEL, MOMENTS, optim_key
from xpar.persist.staged import read_json, read_manifest, verify
from xpar.tasks.config import TaskConfig
from xpar.tasks.models import build_model
from xpar.training.optim import param_groups


@dataclass
class Consolidated:
    """A whole checkpoint in one process: the tensors under xpar.persist.fragments' keys (each
    flat, as stored), what it is, the trainer state and each saving rank's RNG states."""

    description: Description
    tensors: dict[str, Tensor]
    trainer: dict[str, Any]
    rngs: dict[int, dict[str, Any]]  # rank -> RNG states
    tokenizer: str | None = None  # a dir or name it loads from


def is_first_format(path: Path) -> bool:
    meta = read_manifest(path)
    return meta is not None and meta.get("format_version") == 1


def read_first_format(path: Path) -> Consolidated:
    """A first-format checkpoint (see the module docstring), checked against its manifest."""
    path = Path(path)
    verify(path)
    config = _run_config(path)
    trainer = read_json(path / "trainer.json")
    task_cfg = config.get("task") or {}
    saved_task = trainer.get("task") or {}
    task = TaskInfo(
        kind=saved_task.get("kind", task_cfg.get("kind", "lm")),
        labels=saved_task.get("labels"),
        pooling=saved_task.get("pooling", task_cfg.get("pooling")),
    )
    model_cfg = model_config_from_dict({**config["model"], "moe": config.get("moe")}, str(path))
    try:
        backend: dict[str, Any] = {}
        if (path / "model.json").is_file():
            weights, moments, backend = _deepspeed_state(path)
            world = read_json(path / "model.json")["world"]
            rngs = {
                r: _rng(path / f"rng-rank{r}.safetensors", path / f"rng-rank{r}.json")
                for r in range(world)
            }
        else:
            weights = load_file(path / "model.safetensors")
            moments = _plain_moments(path, model_cfg, task, config)
            rngs = {0: _rng(path / "rng.safetensors", path / "rng.json")}
            for r, cuda in enumerate(trainer.get("cuda_rng") or []):  # per rank, if on GPUs
                rngs.setdefault(r, dict(rngs[0]))["cuda"] = cuda
    except (OSError, SafetensorError, KeyError, ValueError, IndexError) as e:
        raise UserError(f"{path}: cannot read it as a first-format checkpoint ({e})") from e
    tensors = {MODEL + n: t for n, t in weights.items()} | moments
    infos = {k: TensorInfo.of(t.shape, t.dtype) for k, t in tensors.items()}
    step = int(trainer["step"])
    description = Description(
        "checkpoint", model_cfg, task, infos, step=step, source=f"converted from {path}",
        layout={"world": 1, "ep_size": 1, "backend": "export"},
    )  # fmt: skip
    state = {key: trainer[key] for key in ("step", "bad_steps", "bad_streak", "data", "monitor")}
    state["scheduler"] = read_json(path / "scheduler.json")
    state["backend"] = backend
    flat = {k: t.contiguous().view(-1) for k, t in tensors.items()}
    tokenizer = (config.get("data") or {}).get("tokenizer")
    return Consolidated(description, flat, state, rngs, tokenizer)


def _run_config(step_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    config_path = step_dir.parent.parent / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise UserError(
            f"{step_dir} is a first-format checkpoint, which does not hold its architecture: "
            f"convert it inside its run dir (where {config_path} is)"
        )
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    assert isinstance(config, dict)
    return config


def _rng(tensors_file: Path, rest_file: Path) -> dict[str, Any]:
    rest, tensors = read_json(rest_file), load_file(tensors_file)
    return {
        "torch": tensors["torch_cpu"].tolist(),
        "cuda": tensors["cuda.0"].tolist() if "cuda.0" in tensors else None,
        "python": rest["python"],
        "numpy": rest["numpy"],
    }


def _plain_moments(
    path: Path, model_cfg: Any, task: TaskInfo, config: dict[str, Any]
) -> dict[str, Tensor]:
    """AdamW's state by key: torch numbers the parameters in the order of xpar's AdamW groups
    (xpar.training.optim.param_groups) over the trained parameters."""
    task_cfg = TaskConfig(kind=task.kind, pooling=task.pooling or "last")
    with torch.device("meta"):
        model = build_model(model_cfg, task_cfg, len(task.labels or ()))
    finetune, optim = config.get("finetune") or {}, config.get("optim") or {}
    apply_policy(model, finetune.get("train", "all"))
    groups = param_groups(model, optim.get("weight_decay", 0.1), finetune.get("head_lr"))
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in groups for p in g["params"]]
    out = {}
    for key, t in load_file(path / "optimizer.safetensors").items():
        index, kind = key.split(".", 1)
        name = order[int(index)]
        out[optim_key(kind, name)] = t.reshape(1) if kind == "step" else t
    return out


def _torch_load(path: Path) -> Any:
    """A DeepSpeed file with torch's weights-only unpickler: tensors and containers, and no
    classes but DeepSpeed's loss scaler, ZeRO stage and fragment-address records."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler refuses anything else
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"a pickle calling {found.group(1)}" if found else "a pickle torch refuses"
        raise UserError(
            f"{path} holds more than DeepSpeed's state ({what}); it was not loaded, and nothing "
            f"in it ran"
        ) from e


def _deepspeed_state(
    path: Path,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """The global weights and AdamW state, put back together from every rank's ZeRO partition
    (dense over all saving ranks, experts over each EDP group, EP ranks concatenated), and the
    fp16 loss scale as xpar.training.zero.ZeroBackend keeps it."""
    desc = read_json(path / "model.json")
    world, P = desc["world"], desc["ep_size"]
    zero = [
        _torch_load(path / f"deepspeed/zero_pp_rank_{r}_mp_rank_00_optim_states.pt")[
            "optimizer_state_dict"
        ]
        for r in range(world)
    ]
    module_state = _torch_load(path / "deepspeed/mp_rank_00_model_states.pt")["module"]
    local_shapes = {n: [s[0] // P, *s[1:]] if e else s for n, s, e in desc["params"]}
    expert_names = {n for n, _, e in desc["params"] if e}

    def assemble(ranks: list[int], group: int, tensors: list[Tensor]) -> dict[str, Tensor]:
        pieces: dict[str, list[Tensor]] = {}
        for r in ranks:
            for name, addr in zero[r]["param_slice_mappings"][group].items():
                flat = tensors[r].flatten()
                pieces.setdefault(name, []).append(flat[addr.start : addr.start + addr.numel])
        return {n: torch.cat(p).view(local_shapes[n]) for n, p in pieces.items()}

    weights: dict[str, Tensor] = {}
    moments: dict[str, Tensor] = {}
    for g, group in enumerate(zero[0]["base_optimizer_state"]["param_groups"]):
        ranks_of = (
            [list(range(k, world, P)) for k in range(P)]
            if group.get("moe")
            else [list(range(world))]
        )
        states = [z["base_optimizer_state"]["state"].get(g, {}) for z in zero]
        kinds = {"w": [z["single_partition_of_fp32_groups"][g] for z in zero]}
        if all("exp_avg" in s for s in states):
            kinds |= {k: [s[k] for s in states] for k in MOMENTS}
        for kind, tensors in kinds.items():
            parts = [assemble(ranks, g, tensors) for ranks in ranks_of]
            for name in parts[0]:
                full = (
                    torch.cat([p[name] for p in parts]) if name in expert_names else parts[0][name]
                )
                if kind == "w":
                    weights[name] = full
                else:
                    moments[optim_key(kind, name)] = full
                    step = states[0]["step"]
                    moments[optim_key("step", name)] = torch.tensor([float(step)])
    model_state = {name: weights.pop(name, value) for name, value in module_state.items()}
    model_state.update(weights)
    # Every bank from the EP ranks' own files (they hold frozen banks too).
    banks = [load_file(path / f"experts-ep{k}-of-{P}.safetensors") for k in range(P)]
    for name in expert_names:
        model_state[name] = torch.cat([b[name] for b in banks])
    order = [n for n, _, _ in desc["params"]]
    buffers = [n for n in model_state if n not in set(order)]
    from xpar.training.zero import loss_scaler_state  # DeepSpeed, as for reading its files

    backend = {"loss_scaler": loss_scaler_state(zero[0].get("loss_scaler"))}
    return {n: model_state[n] for n in [*order, *buffers]}, moments, backend
