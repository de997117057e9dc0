"""A plan as text (tables a person reads) or as one JSON object (what a script reads)."""

from __future__ import annotations

import dataclasses
from typing import Any

from xpar.config import TrainConfig
from xpar.plan.planner import GIB, RESERVE_GIB, Cluster, Plan


def _gib(n: float) -> str:
    return f"{n / GIB:9.2f}"


def header(cfg: TrainConfig, cluster: Cluster, model_name: str, notes: list[str]) -> list[str]:
    nodes = -(-cluster.gpus // cluster.gpus_per_node)
    d = cfg.data
    lines = [
        f"plan: {model_name} on {cluster.gpus} x {cluster.gpu.name} ({nodes} node"
        f"{'s' if nodes > 1 else ''} of {cluster.gpus_per_node}), "
        f"{'fp32' if cfg.trainer.precision == 'fp32' else 'bf16'}; data.seq_len={d.seq_len}, "
        f"data.batch_size={d.batch_size} ({d.batch_size * d.seq_len} tokens a step)",
    ]
    return lines + [f"note: {n}" for n in notes]


BUFFERS = {
    "all_to_all": "all-to-all buffers",
    "unsharded_params": "gathered units (fsdp)",
    "gradients": "gradient buffers",
}


def memory_table(p: Plan) -> list[str]:
    s, fsdp = p.state, p.backend.shard == "fsdp"
    rows = [
        ("weights (fp32 shards)" if fsdp else "weights", s.weights),
        ("gradients", s.grads),
        ("optimizer state (AdamW)", s.optimizer),
        ("fp32 masters", s.masters),
    ]
    where = " (host memory)" if p.backend.offload else ""
    lines = [
        f"memory per GPU (GiB)          {'dense':>9} {'expert':>9} {'total':>9}",
        *(
            f"  {name:<27} {_gib(x.dense)} {_gib(x.expert)} {_gib(x.total)}{where}"
            for name, x in rows
        ),
        f"  {'activations':<27} {'':>9} {'':>9} {_gib(p.activations.total)}"
        f"  (recompute={p.recompute}, micro-batch {p.micro_batch})",
        *(
            f"  {name:<27} {'':>9} {'':>9} {_gib(p.buffers[key])}"
            for key, name in BUFFERS.items()
            if key in p.buffers
        ),
    ]
    verdict = "fits" if p.fits_gpu else (
        f"does NOT fit: {(p.peak_bytes + RESERVE_GIB * GIB - p.memory_bytes) / GIB:.1f} GiB over"
    )  # fmt: skip
    lines.append(
        f"  {'peak allocated':<27} {'':>9} {'':>9} {_gib(p.peak_bytes)}  of "
        f"{p.memory_bytes / GIB:.1f} GiB with {RESERVE_GIB:g} GiB reserved: {verdict}"
    )
    verdict = "fits" if p.fits_host else "does NOT fit"
    share = f"{p.host_memory_bytes / GIB:.1f} GiB a GPU's share of its node's: {verdict}"
    if p.backend.offload:
        lines.append(
            f"  {'host memory (model state)':<27} {'':>9} {'':>9} {_gib(p.host_bytes)}  of {share}"
        )
    lines.append(
        f"  {'host at start-up (fp32)':<27} {'':>9} {'':>9} {_gib(p.startup_host_bytes)}  of "
        f"{share}"
    )
    return lines


def time_table(p: Plan, cluster: Cluster) -> list[str]:
    t, e, peak = p.time, cluster.efficiency, cluster.gpu.peak_tflops
    parts = [
        ("expert GEMMs", t.expert_gemm, f"{t.tflop['expert']:.1f} TFLOP at {e.expert_gemm:.0%}"),
        ("dense GEMMs", t.dense_gemm, f"{t.tflop['dense']:.1f} TFLOP at {e.dense_gemm:.0%}"),
        ("attention", t.attention, f"{t.tflop['attention']:.1f} TFLOP at {e.attention:.0%}"),
        (
            "all-to-all",
            t.all_to_all,
            f"{p.a2a}: {t.a2a_gb['intra_node']:.2f} GB NVLink, "
            f"{t.a2a_gb['inter_node']:.2f} GB network",
        ),
        ("gradient reduction", t.grad_reduce, ""),
        ("optimizer step", t.optimizer, "on the host" if p.backend.offload else ""),
    ]
    if p.backend.shard == "fsdp":
        parts.insert(4, ("parameter all-gather", t.param_gather, "fsdp"))
    if p.backend.offload:
        parts.append(("host copies", t.host_copy, "PCIe, shards in and gradients out"))
    return [
        f"time per optimizer step (predicted: uniform routing, no overlap; peak {peak:g} "
        f"TFLOP/s, NVLink {cluster.gpu.nvlink_gbps:g} GB/s, network "
        f"{cluster.gpu.network_gbps:g} GB/s at {e.network:.0%})",
        *(f"  {name:<20} {sec * 1e3:10.1f} ms  {how}" for name, sec, how in parts),
        f"  {'total':<20} {t.total * 1e3:10.1f} ms  {t.tokens_per_s:,.0f} tokens/s per GPU, "
        f"MFU {t.mfu:.1%}",
    ]


def search_table(plans: list[Plan], top: int) -> list[str]:
    fitting = [p for p in plans if p.fits]
    shown = fitting[:top] if fitting else plans[:top]
    lines = [
        f"{len(fitting)} of {len(plans)} layouts fit"
        + ("; fastest first:" if fitting else "; none fits, the smallest:"),
        f"  {'ep':>4} {'a2a':<12} {'recompute':<9} {'backend':<14} {'micro':>5} {'GiB':>8} "
        f"{'step s':>8} {'MFU':>6}  settings",
    ]
    for p in shown:
        lines.append(
            f"  {p.ep_size:>4} {p.a2a:<12} {p.recompute:<9} {p.backend.name:<14} "
            f"{p.micro_batch:>5} {p.peak_bytes / GIB:8.1f} {p.time.total:8.3f} {p.time.mfu:6.1%}"
            f"  {p.overrides}"
        )
    return lines


def as_json(plan: Plan) -> dict[str, Any]:
    state = {k: dataclasses.asdict(getattr(plan.state, k)) for k in
             ("weights", "grads", "optimizer", "masters")}  # fmt: skip
    t = plan.time
    return {
        "layout": {
            "ep_size": plan.ep_size,
            "a2a": plan.a2a,
            "recompute": plan.recompute,
            "backend": plan.backend.name,
            "zero_stage": plan.stage,
            "shard": plan.backend.shard,
            "shard_size": plan.backend.shard_size,
            "offload": plan.backend.offload,
            "reduce_micro_steps": plan.backend.reduce_micro_steps,
            "micro_batch": plan.micro_batch,
            "accumulation": plan.accumulation,
            "overrides": plan.overrides,
        },
        "memory_bytes": {
            **state,
            "activations": plan.activations.total,
            "activations_per_layer": plan.activations.per_layer,
            "buffers": plan.buffers,
            "peak": plan.peak_bytes,
            "gpu": plan.memory_bytes,
            "reserve": RESERVE_GIB * GIB,
            "host": plan.host_bytes,
            "startup_host": plan.startup_host_bytes,
            "host_memory": plan.host_memory_bytes,
        },
        "fits": plan.fits,
        "time_s": {
            "expert_gemm": t.expert_gemm,
            "dense_gemm": t.dense_gemm,
            "attention": t.attention,
            "all_to_all": t.all_to_all,
            "grad_reduce": t.grad_reduce,
            "optimizer": t.optimizer,
            "param_gather": t.param_gather,
            "host_copy": t.host_copy,
            "total": t.total,
        },
        "tflop": t.tflop,
        "a2a_gb": t.a2a_gb,
        "tokens_per_s_per_gpu": t.tokens_per_s,
        "mfu": t.mfu,
    }
