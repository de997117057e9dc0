"""Time per optimizer step, per GPU, from FLOP counts, bytes moved and stated efficiencies.

Every GPU does the same work (uniform routing balances the experts), so one GPU's time is the
step's. The parts are summed: xpar does not overlap its all-to-all or gradient reduction with
compute, so nothing hides behind anything else. Compute is FLOPs over peak times an achieved
fraction (`Efficiency`, stated and overridable); attention's S x S matmuls are counted causal
(half the square); communication is bytes over the link bandwidth times `network`.

The all-to-all's rows (xpar.plan.traffic) cross NVLink inside a node and the NIC beyond. A flat
all-to-all drives both at once, so the slower sets its pace; a hierarchical one runs its hops
in turn (to the nodes over the NIC, then inside each node over NVLink), so their times add.

Under `parallel.shard=fsdp` the collectives are FSDP2's, summed the same way (no overlap with
compute nor with each other, though FSDP prefetches the next unit's all-gather behind the
current unit's compute, so the sum is an upper bound): in every micro-step each unit's
all-gather in the compute dtype for its forward and again for its backward (the root's once: it
stays gathered), (ranks - 1) / ranks of the unit a GPU; in the last micro-step (in every one
under `parallel.reduce_micro_steps`) a reduce-scatter of fp32 gradients and, under HSDP, an
all-reduce of the 1 / shard_size fp32 shard across the world / shard_size replicas. A group
runs over NVLink when its ranks lie within a node and over the NIC otherwise.
`parallel.offload` adds, over PCIe, the fp32 shard each all-gather reads from the host and the
fp32 gradient shard sent back, and runs AdamW on the host at the GPU's `host_adamw_gbps`.

Legend: T tokens a GPU a step, S sequence length, D model dim, F expert hidden dim, K top-k,
V vocab, W GPUs, P ep_size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from xpar.model import ModelConfig, flops_per_token
from xpar.model.flops import attention_params
from xpar.plan.gpus import GPU
from xpar.plan.state import FP32, ParamInventory, gathered, sharding
from xpar.plan.traffic import RowsPerToken

ROW_META_BYTES = 12  # a dispatched row's K entries: int64 local expert id, fp32 weight
ADAMW_BYTES_PER_ELEMENT = 32  # read param, grad, two moments; write param, two moments


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak the planner assumes (not measured here: adjust them to a cluster's)."""

    dense_gemm: float = 0.70
    expert_gemm: float = 0.55  # grouped GEMMs over many small experts
    attention: float = 0.50
    network: float = 0.80  # of NVLink / NIC / PCIe bandwidth: all-to-all, other collectives
    hbm: float = 0.80  # the optimizer step is memory-bound


@dataclass(frozen=True)
class Job:
    """What the timing depends on, beyond the model."""

    seq_len: int
    tokens: int  # per GPU per optimizer step
    world: int
    gpus_per_node: int
    ep_size: int
    recompute: str
    recompute_layers: int
    stage: int  # ZeRO stage; 0 is xpar's own loop (fp32 gradients all-reduced) or fsdp
    train_bytes: int  # bytes of a gradient under ZeRO, of a gathered parameter under fsdp
    act_bytes: int  # bytes of an activation value crossing the all-to-all (bf16: 2)
    shard: str = "none"  # parallel.shard
    shard_size: int | None = None  # parallel.shard_size (None: the world)
    offload: bool = False
    reduce_micro_steps: bool = False  # fsdp: a reduce-scatter every micro-step
    accumulation: int = 1  # micro-steps a step
    a2a: str = "flat"  # parallel.a2a, resolved: flat or hierarchical


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, by part; tflop: the FLOPs each compute part runs."""

    expert_gemm: float
    dense_gemm: float
    attention: float
    all_to_all: float
    grad_reduce: float
    optimizer: float
    tflop: dict[str, float]
    a2a_gb: dict[str, float]  # per GPU a step: intra-node and inter-node
    param_gather: float = 0.0  # fsdp's all-gathers
    host_copy: float = 0.0  # parallel.offload: shards and gradients over PCIe
    mfu: float = 0.0
    tokens_per_s: float = 0.0  # per GPU

    @property
    def total(self) -> float:
        return (
            self.expert_gemm
            + self.dense_gemm
            + self.attention
            + self.all_to_all
            + self.grad_reduce
            + self.optimizer
            + self.param_gather
            + self.host_copy
        )


def _recomputed(i: int, job: Job) -> bool:
    return job.recompute != "none" and i % job.recompute_layers == 0


def _forward_flops(cfg: ModelConfig, job: Job) -> dict[str, float]:
    """Forward FLOPs per GPU per step of each part, plus what recompute runs again."""
    T, S, D = job.tokens, job.seq_len, cfg.d_model
    d_attn = cfg.n_heads * cfg.head_dim
    if cfg.mla is not None:
        d_attn = cfg.n_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim) / 2
    out = {"expert": 0.0, "dense": 2.0 * T * D * cfg.vocab_size, "attention": 0.0}
    again = dict.fromkeys(out, 0.0)
    for i in range(cfg.n_layers):
        layer = {"attention": 2.0 * T * d_attn * S, "expert": 0.0}  # causal: S / 2 keys a query
        layer["dense"] = 2.0 * T * attention_params(cfg)
        if cfg.is_moe_layer(i):
            moe = cfg.moe
            router = moe.num_experts + (moe.num_groups if moe.group_score == "learned" else 0)
            layer["dense"] += 2.0 * T * D * router
            layer["expert"] = 2.0 * T * 3 * D * (moe.top_k * moe.d_ff + moe.shared_hidden)
        else:
            layer["dense"] += 2.0 * T * 3 * D * cfg.d_ff
        for part, flops in layer.items():
            out[part] += flops
            if _recomputed(i, job) and (job.recompute == "full" or part == "expert"):
                again[part] += flops
    return {part: 3.0 * out[part] + again[part] for part in out}


def _all_to_all(cfg: ModelConfig, job: Job, rows: RowsPerToken, gpu: GPU, eff: Efficiency):
    """(seconds, GB intra-node, GB inter-node) of the step's all-to-alls on one GPU: each MoE
    layer's dispatch and combine, forward and backward (4 crossings), and the forward two
    again in a fully recomputed layer (see the module docstring for the links)."""
    if job.ep_size == 1:
        return 0.0, 0.0, 0.0
    row_bytes = cfg.d_model * job.act_bytes
    seconds = intra_gb = inter_gb = 0.0
    for i in cfg.moe_layer_ids():
        crossings = 6 if _recomputed(i, job) and job.recompute == "full" else 4
        per_row = crossings * row_bytes + crossings // 2 * cfg.moe.top_k * ROW_META_BYTES
        intra = job.tokens * rows.intra_node * per_row
        inter = job.tokens * rows.off_node * per_row
        nvlink = intra / (gpu.nvlink_gbps * 1e9 * eff.network)
        network = inter / (gpu.network_gbps * 1e9 * eff.network)
        seconds += nvlink + network if job.a2a == "hierarchical" else max(nvlink, network)
        intra_gb, inter_gb = intra_gb + intra / 1e9, inter_gb + inter / 1e9
    return seconds, intra_gb, inter_gb


def _grad_reduce(inv: ParamInventory, job: Job, gpu: GPU, eff: Efficiency) -> float:
    """Ring all-reduce (or ZeRO's reduce-scatter plus all-gather: the same bytes) of the dense
    gradients over all W GPUs and of the expert ones over their W / P expert-data-parallel
    GPUs, through NVLink inside one node and the NIC beyond."""
    grad_bytes = 4 if job.stage == 0 else job.train_bytes
    spans_nodes = job.world > job.gpus_per_node
    link = (gpu.network_gbps if spans_nodes else gpu.nvlink_gbps) * 1e9 * eff.network
    seconds = 0.0
    for numel, ranks in (
        (sum(inv.dense_groups), job.world),
        (inv.expert_trained // job.ep_size, job.world // job.ep_size),
    ):
        if ranks > 1:
            seconds += 2 * (ranks - 1) / ranks * numel * grad_bytes / link
    return seconds


def _link(ranks: int, stride: int, job: Job, gpu: GPU, eff: Efficiency) -> float:
    """Bytes/s of a collective over `ranks` ranks `stride` apart: NVLink when they lie within a
    node, the NIC otherwise."""
    gbps = gpu.nvlink_gbps if ranks * stride <= job.gpus_per_node else gpu.network_gbps
    return gbps * 1e9 * eff.network


def _fsdp(inv: ParamInventory, job: Job, gpu: GPU, eff: Efficiency) -> dict[str, float]:
    """Seconds of FSDP's collectives a step (see the module docstring): param_gather,
    grad_reduce and host_copy."""
    W, P, S = job.world, job.ep_size, job.shard_size or job.world
    out = dict.fromkeys(("param_gather", "grad_reduce", "host_copy"), 0.0)
    pcie = gpu.pcie_gbps * 1e9 * eff.network
    for unit in inv.units:
        sh = sharding(unit, W, P, job.shard_size)
        stride = P if unit.expert else 1  # EDP groups take every P-th rank
        link = _link(sh.ranks, stride, job, gpu, eff)
        numel, trained = gathered(unit, sh), gathered(unit, sh, trained=True)
        gathers = job.accumulation * (1 if unit.kind == "root" else 2)
        reduces = job.accumulation if job.reduce_micro_steps else 1
        share = (sh.ranks - 1) / sh.ranks
        out["param_gather"] += gathers * share * numel * job.train_bytes / link
        out["grad_reduce"] += reduces * share * trained * FP32 / link
        if not unit.expert and S < W:  # HSDP: the shard's all-reduce across the replicas
            replicas = W // S
            across = _link(replicas, S, job, gpu, eff)  # every S-th rank
            all_reduce = 2 * (replicas - 1) / replicas * trained / S * FP32 / across
            out["grad_reduce"] += reduces * all_reduce
        if job.offload:
            out["host_copy"] += (gathers * numel + reduces * trained) / sh.ranks * FP32 / pcie
    return out


def step_time(
    cfg: ModelConfig,
    job: Job,
    inv: ParamInventory,
    rows: RowsPerToken,
    optimizer_elements: int,
    gpu: GPU,
    eff: Efficiency,
) -> StepTime:
    """One GPU's optimizer step (see the module docstring); `optimizer_elements`: the AdamW
    elements this GPU updates (its ZeRO partition or FSDP shards, or every trained parameter
    it holds)."""
    flops = _forward_flops(cfg, job)
    peak = gpu.peak_tflops * 1e12
    a2a, intra_gb, inter_gb = _all_to_all(cfg, job, rows, gpu, eff)
    if job.shard == "fsdp":
        comm = _fsdp(inv, job, gpu, eff)
    else:
        comm = {"grad_reduce": _grad_reduce(inv, job, gpu, eff)}
    adamw_rate = gpu.host_adamw_gbps * 1e9 if job.offload else gpu.hbm_tbps * 1e12 * eff.hbm
    time = StepTime(
        expert_gemm=flops["expert"] / (peak * eff.expert_gemm),
        dense_gemm=flops["dense"] / (peak * eff.dense_gemm),
        attention=flops["attention"] / (peak * eff.attention),
        all_to_all=a2a,
        optimizer=optimizer_elements * ADAMW_BYTES_PER_ELEMENT / adamw_rate,
        tflop={k: v / 1e12 for k, v in flops.items()},
        a2a_gb={"intra_node": intra_gb, "inter_node": inter_gb},
        **comm,
    )
    model_flops = flops_per_token(cfg, job.seq_len) * job.tokens  # the trainer's MFU counts
    return replace(
        time, mfu=model_flops / (time.total * peak), tokens_per_s=job.tokens / time.total
    )
