"""Model state per GPU: weights, gradients, optimizer state and fp32 masters, dense and expert
parts apart, for each training backend, counted exactly as its tensors hold them.

The parameter list comes from the model built on the meta device (nothing is allocated), with
the job's fine-tuning freezes; experts split evenly over the EP group, so the per-rank count of
any EP size follows from the EP=1 list.

- `deepspeed=none` (xpar's own loop): fp32 parameters (autocast casts per matmul), fp32
  gradients of the trained ones, AdamW's two fp32 moments and a 4-byte step per trained tensor.
- `deepspeed=zero1|zero2`: DeepSpeed flattens each optimizer group (the dense groups over all
  W ranks, the expert banks over their W / P expert-data-parallel ranks) into one buffer in the
  training dtype, padded to a multiple of 2 * ranks elements; each rank holds 1 / ranks of it
  as fp32 masters with their two moments and one step, and that partition's gradient. Frozen
  parameters stay as they are, cast to the training dtype.
- `parallel.shard=fsdp` (FSDP2, xpar.training.fsdp): every parameter, trained or frozen, is cut
  on dim 0 into chunks of ceil(rows / ranks) rows over its unit's ranks (an expert bank's E / P
  rows over the W / P expert-data-parallel ranks; the dense ones over `parallel.shard_size`,
  all W by default), and every rank's storage holds a whole chunk, padding included. Those fp32
  shards are the master weights (the training dtype is only that of the gathered copies). The
  gradients of a unit's trained parameters share one fp32 buffer of their padded chunks (its
  reduce-scatter's output); AdamW's two fp32 moments cover the rank's own rows only (the last
  ranks' chunks are shorter, and a rank past the rows has none), plus a 4-byte step per trained
  tensor. Rank 0's chunks are all whole, so it holds the most. Under `parallel.offload` the
  same bytes live in host memory, the gradients copied out of that buffer one tensor at a time
  (unpadded: the same bytes on rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xpar.config import TrainConfig
from xpar.model import MoETransformerLM
from xpar.model.trainable import apply_policy, head_names
from xpar.moe import GroupedExperts
from xpar.parallel.parallelize import expert_parameter_names
from xpar.training.fsdp import shard_rows
from xpar.training.optim import group_params

FP32 = 4
STEP_BYTES = 4  # AdamW's step count: a float32 scalar tensor


@dataclass(frozen=True)
class Split:
    """Bytes of the dense and the expert parameters' share."""

    dense: int = 0
    expert: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.expert


@dataclass(frozen=True)
class Shape:
    """A parameter as FSDP shards it: its rows (dim 0; an expert bank's for all E experts) and
    the elements of one row."""

    rows: int
    row: int
    trained: bool


@dataclass(frozen=True)
class Unit:
    """One FSDP unit (xpar.training.fsdp): a layer's expert bank, a block's dense parameters
    (attention, norms, router, shared experts), or the root's (embedding, final norm, head)."""

    kind: str  # "expert", "block" or "root"
    params: tuple[Shape, ...]

    @property
    def expert(self) -> bool:
        return self.kind == "expert"


@dataclass(frozen=True)
class ParamInventory:
    """A model's parameters as the backends group them, at EP=1 (element counts)."""

    dense_groups: list[int]  # trained dense parameters per AdamW group
    dense_tensors: int  # trained dense parameter tensors
    expert_trained: int  # trained expert-bank elements, all experts
    expert_tensors: int  # trained expert banks
    frozen_dense: int
    frozen_expert: int
    units: tuple[Unit, ...]  # FSDP's, in forward order, the root last

    @property
    def total(self) -> int:
        trained = sum(self.dense_groups) + self.expert_trained
        return trained + self.frozen_dense + self.frozen_expert


def inventory(cfg: TrainConfig) -> ParamInventory:
    """The parameter list of the job's model (its LM; built on the meta device)."""
    with torch.device("meta"):
        model = MoETransformerLM(cfg.model_config())
    apply_policy(model, cfg.finetune.train)
    experts = set(expert_parameter_names(model))
    named = dict(model.named_parameters())
    dense = {n: p for n, p in named.items() if n not in experts and p.requires_grad}
    groups = group_params(dense, head_names(model), cfg.optim.weight_decay, cfg.finetune.head_lr)
    banks = [p for n, p in named.items() if n in experts]
    return ParamInventory(
        dense_groups=[sum(p.numel() for p in g["params"]) for g in groups],
        dense_tensors=len(dense),
        expert_trained=sum(p.numel() for p in banks if p.requires_grad),
        expert_tensors=sum(1 for p in banks if p.requires_grad),
        frozen_dense=sum(p.numel() for n, p in named.items() if n not in experts)
        - sum(p.numel() for p in dense.values()),
        frozen_expert=sum(p.numel() for p in banks if not p.requires_grad),
        units=fsdp_units(model),
    )


def fsdp_units(model: MoETransformerLM) -> tuple[Unit, ...]:
    """The model's FSDP units as xpar.training.fsdp wraps them: in each block its expert banks,
    then the block's other parameters; the root's last."""

    def shapes(params) -> tuple[Shape, ...]:
        return tuple(Shape(p.shape[0], p.numel() // p.shape[0], p.requires_grad) for p in params)

    units, taken = [], set()
    for block in model.layers:
        for m in block.modules():
            if isinstance(m, GroupedExperts):
                units.append(Unit("expert", shapes(m.parameters())))
                taken |= {id(p) for p in m.parameters()}
        units.append(Unit("block", shapes(p for p in block.parameters() if id(p) not in taken)))
        taken |= {id(p) for p in block.parameters()}
    units.append(Unit("root", shapes(p for p in model.parameters() if id(p) not in taken)))
    return tuple(units)


@dataclass(frozen=True)
class StateBytes:
    """One rank's model state (see the module docstring)."""

    weights: Split
    grads: Split
    optimizer: Split  # AdamW moments and steps
    masters: Split  # fp32 master weights (ZeRO only)
    groups: dict[str, int] = field(default_factory=dict)  # ZeRO: elements of each flat group

    @property
    def total(self) -> int:
        return self.weights.total + self.grads.total + self.optimizer.total + self.masters.total


def padded(numel: int, ranks: int) -> int:
    """A DeepSpeed flat group's length: padded to a multiple of 2 * ranks elements."""
    align = 2 * ranks
    return -(-numel // align) * align


def state_bytes(
    inv: ParamInventory, stage: int, train_bytes: int, world: int, ep_size: int
) -> StateBytes:
    """One rank's state under ZeRO `stage` (0: xpar's own loop) with parameters of
    `train_bytes` bytes each under ZeRO (2 for bf16/fp16, 4 for fp32)."""
    expert_trained = inv.expert_trained // ep_size
    frozen_expert = inv.frozen_expert // ep_size
    if stage == 0:
        dense_trained = sum(inv.dense_groups)
        expert_tensors = inv.expert_tensors if inv.expert_trained else 0
        return StateBytes(
            weights=Split(
                FP32 * (dense_trained + inv.frozen_dense), FP32 * (expert_trained + frozen_expert)
            ),
            grads=Split(FP32 * dense_trained, FP32 * expert_trained),
            optimizer=Split(
                2 * FP32 * dense_trained + STEP_BYTES * inv.dense_tensors,
                2 * FP32 * expert_trained + STEP_BYTES * expert_tensors,
            ),
            masters=Split(),
        )
    edp = world // ep_size
    flats = {f"dense{i}": (padded(n, world), world) for i, n in enumerate(inv.dense_groups)}
    if expert_trained:
        flats["expert"] = (padded(expert_trained, edp), edp)

    def split(per_group) -> Split:
        dense = sum(per_group(*v) for k, v in flats.items() if k != "expert")
        expert = per_group(*flats["expert"]) if "expert" in flats else 0
        return Split(dense, expert)

    weights = split(lambda n, ranks: train_bytes * n)
    return StateBytes(
        weights=Split(
            weights.dense + train_bytes * inv.frozen_dense,
            weights.expert + train_bytes * frozen_expert,
        ),
        grads=split(lambda n, ranks: train_bytes * (n // ranks)),
        optimizer=split(lambda n, ranks: 2 * FP32 * (n // ranks) + STEP_BYTES),
        masters=split(lambda n, ranks: FP32 * (n // ranks)),
        groups={k: n for k, (n, _) in flats.items()},
    )


def chunk(rows: int, ranks: int) -> int:
    """Rows of an FSDP shard's storage: ceil(rows / ranks), as torch.chunk cuts dim 0."""
    return -(-rows // ranks)


@dataclass(frozen=True)
class Sharding:
    """How a unit is sharded on one rank: the unit's rows per parameter (an expert bank's E / P
    of this EP rank), the ranks it is cut over, and this rank's index among them."""

    rows_divisor: int
    ranks: int
    index: int


def sharding(
    unit: Unit, world: int, ep_size: int, shard_size: int | None, rank: int = 0
) -> Sharding:
    """Rank `rank`'s Sharding of `unit`: experts over the EDP group (rank // P among W / P, the
    (edp, ep) mesh), dense units over their shard group (rank % S among S)."""
    if unit.expert:
        return Sharding(ep_size, world // ep_size, rank // ep_size)
    S = shard_size or world
    return Sharding(1, S, rank % S)


def gathered(unit: Unit, sh: Sharding, trained: bool = False) -> int:
    """Elements of `unit` gathered on every rank: all its ranks' chunks of each parameter,
    padding included (the trained parameters only, with `trained`)."""
    return sum(
        chunk(s.rows // sh.rows_divisor, sh.ranks) * sh.ranks * s.row
        for s in unit.params
        if s.trained or not trained
    )


def fsdp_state_bytes(
    inv: ParamInventory, world: int, ep_size: int, shard_size: int | None, rank: int = 0
) -> StateBytes:
    """Rank `rank`'s state under `parallel.shard=fsdp` (see the module docstring); rank 0's,
    the largest, by default."""
    weights, grads, optimizer = {False: 0, True: 0}, {False: 0, True: 0}, {False: 0, True: 0}
    for unit in inv.units:
        sh = sharding(unit, world, ep_size, shard_size, rank)
        for s in unit.params:
            rows = s.rows // sh.rows_divisor
            padded = FP32 * chunk(rows, sh.ranks) * s.row
            weights[unit.expert] += padded
            if s.trained:
                grads[unit.expert] += padded
                own = shard_rows(rows, sh.ranks, sh.index)[1] * s.row
                optimizer[unit.expert] += 2 * FP32 * own + STEP_BYTES

    def split(d: dict[bool, int]) -> Split:
        return Split(d[False], d[True])

    return StateBytes(split(weights), split(grads), split(optimizer), Split())
