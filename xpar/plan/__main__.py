"""`python -m xpar.plan [hydra overrides] --gpus N [--gpu h200] [--search] [--json]`: will the
job the overrides describe fit on N GPUs, and how fast will it run? Nothing is instantiated
(the model is counted on the meta device), so it plans DeepSeek-V3 on a laptop in seconds.

Unless the overrides say otherwise, a job is planned at data.seq_len = min(model.max_seq_len,
4096), data.batch_size = 4 sequences per GPU and data.micro_batch_size = 1 (the trainer's own
defaults are sized for the embedded corpus on a CPU). `--measure` builds the (small) model on the
CPU instead and prints its measured activation bytes beside the planned ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from xpar.checks import UserError, report_error
from xpar.compose import checked_job, compose_checked
from xpar.config import TrainConfig, register_configs
from xpar.plan.gpus import GPUS, get_gpu
from xpar.plan.planner import Cluster, gpus_needed, plan_job, search
from xpar.plan.report import as_json, header, memory_table, search_table, time_table
from xpar.plan.timing import Efficiency

PLAN_SEQ_LEN, PLAN_SEQS_PER_GPU = 4096, 4
MEASURE_MAX_PARAMS = 2e9


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other xpar command
        raise UserError(f"{message} (python -m xpar.plan --help lists the options)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m xpar.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=1, help="GPUs in the job (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="default 8")
    p.add_argument("--gpu", default="h200", help=f"one of {', '.join(GPUS)} (default h200)")
    p.add_argument("--search", action="store_true", help="every layout, fastest fitting first")
    p.add_argument("--top", type=int, default=10, help="layouts --search prints (default 10)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.add_argument("--measure", action="store_true", help="measure activations on the CPU")
    for name, what in (
        ("peak-tflops", "dense bf16 peak"),
        ("memory-gib", "GPU memory"),
        ("nvlink-gbps", "NVLink GB/s per direction"),
        ("network-gbps", "network GB/s per GPU per direction"),
        ("pcie-gbps", "PCIe GB/s to the host per direction (parallel.offload)"),
        ("host-memory-gib", "share of its node's host memory (parallel.offload)"),
        ("host-adamw-gbps", "host AdamW rate for its shards, GB/s (parallel.offload)"),
    ):
        p.add_argument(f"--{name}", type=float, help=f"override the GPU's {what}")
    defaults = Efficiency()
    for f in dataclasses.fields(Efficiency):
        p.add_argument(
            f"--{f.name.replace('_', '-')}-efficiency",
            type=float,
            dest=f"eff_{f.name}",
            help=f"achieved fraction of peak (default {getattr(defaults, f.name)})",
        )
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    args, rest = parser().parse_known_args(argv)
    for arg in rest:
        if arg.startswith("-") or "=" not in arg:
            raise UserError(f"{arg}: not a planner option nor a key=value override")
    if args.gpus < 1:
        raise UserError(f"--gpus={args.gpus} must be >= 1")
    if args.gpus_per_node < 1:
        raise UserError(f"--gpus-per-node={args.gpus_per_node} must be >= 1")
    if args.gpus > args.gpus_per_node and args.gpus % args.gpus_per_node:
        raise UserError(
            f"--gpus={args.gpus} is not a whole number of nodes of --gpus-per-node="
            f"{args.gpus_per_node}; use a multiple of it"
        )
    if args.top < 1:
        raise UserError(f"--top={args.top} must be >= 1")
    for f in dataclasses.fields(Efficiency):
        value = getattr(args, f"eff_{f.name}")
        if value is not None and not 0 < value <= 1:
            raise UserError(f"--{f.name.replace('_', '-')}-efficiency={value} must be in (0, 1]")
    return args, rest


def planned_job(overrides: list[str], gpus: int) -> tuple[TrainConfig, list[str]]:
    """The checked job with the planning defaults (see the module docstring), and notes on
    what was defaulted."""
    register_configs()
    cfg = checked_job(compose_checked(overrides), overrides)
    if cfg.task.kind != "lm":
        raise UserError(f"task={cfg.task.kind}: xpar.plan plans language-model jobs (task=lm)")
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    data, notes = {}, []
    if "data.seq_len" not in given:
        data["seq_len"] = min(cfg.model.max_seq_len, PLAN_SEQ_LEN)
        notes.append(f"data.seq_len={data['seq_len']} (not given: min(model.max_seq_len, 4096))")
    if "data.batch_size" not in given:
        data["batch_size"] = PLAN_SEQS_PER_GPU * gpus
        notes.append(f"data.batch_size={data['batch_size']} (not given: 4 sequences per GPU)")
    if "data.micro_batch_size" not in given:
        data["micro_batch_size"] = 1
        notes.append("data.micro_batch_size=1 (not given)")
    if data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))
    return cfg, notes


def cluster_of(args: argparse.Namespace) -> Cluster:
    gpu = get_gpu(args.gpu).with_overrides(
        peak_tflops=args.peak_tflops,
        memory_gib=args.memory_gib,
        nvlink_gbps=args.nvlink_gbps,
        network_gbps=args.network_gbps,
        pcie_gbps=args.pcie_gbps,
        host_memory_gib=args.host_memory_gib,
        host_adamw_gbps=args.host_adamw_gbps,
    )
    eff = Efficiency(**{
        f.name: v for f in dataclasses.fields(Efficiency)
        if (v := getattr(args, f"eff_{f.name}")) is not None
    })  # fmt: skip
    return Cluster(args.gpus, min(args.gpus_per_node, args.gpus), gpu, eff)


def model_name(overrides: list[str]) -> str:
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("model=")]
    return f"model={names[-1]}" if names else "model=tiny"


def advice(cfg: TrainConfig, cluster: Cluster) -> str:
    """What to change when a layout does not fit."""
    fitting = [p for p in search(cfg, cluster) if p.fits]
    if fitting:
        best = fitting[0]
        return (
            f"to fit on {cluster.gpus} GPUs: {best.overrides} (predicted {best.time.total:.2f} "
            f"s a step, MFU {best.time.mfu:.1%}; --search lists the others)"
        )
    needed = gpus_needed(cfg, cluster)
    if needed is None:
        return f"no layout fits on up to {1 << 16} x {cluster.gpu.name}"
    return (
        f"no layout fits on {cluster.gpus} x {cluster.gpu.name}; the fewest GPUs on which one "
        f"does: {needed} (at the same sequences per GPU)"
    )


def measured_vs_planned(cfg: TrainConfig) -> list[str]:
    """One micro-batch's activation bytes measured on the CPU (fp32, one process) beside the
    planned ones, per layer and in all."""
    import torch

    from xpar.model import MoETransformerLM, count_params
    from xpar.plan.activations import activation_bytes
    from xpar.plan.measure import measure_activations

    model_cfg, data, tc = cfg.model_config(), cfg.data, cfg.trainer
    total = count_params(model_cfg).total
    if total > MEASURE_MAX_PARAMS:
        raise UserError(
            f"--measure builds the model on the CPU: this one has {total / 1e9:.1f}B parameters "
            f"(at most {MEASURE_MAX_PARAMS / 1e9:g}B); measure a smaller config"
        )
    micro = data.micro_batch_size or 1
    torch.manual_seed(tc.seed)
    model = MoETransformerLM(model_cfg)
    model.set_recompute(tc.recompute, tc.recompute_layers)
    tokens_BL = torch.randint(0, model_cfg.vocab_size, (micro, data.seq_len + 1))
    measured = measure_activations(model, tokens_BL)
    mla = model_cfg.mla
    math_sdpa = mla is not None and mla.v_head_dim != mla.qk_head_dim  # CPU's SDPA fallback
    planned = activation_bytes(
        model_cfg, micro, data.seq_len, tc.recompute, tc.recompute_layers, "fp32",
        attention="math" if math_sdpa else "fused",
    )  # fmt: skip
    lines = [
        f"activations of one micro-batch ({micro} x {data.seq_len} tokens, fp32, CPU, "
        f"trainer.recompute={tc.recompute}), bytes:",
        f"  {'':<8} {'measured':>14} {'planned':>14} {'planned/measured':>17}",
    ]
    rows = [(f"layer {i}", m, p) for i, (m, p) in
            enumerate(zip(measured.per_layer, planned.per_layer, strict=True))]  # fmt: skip
    rows += [("outside", measured.outside, planned.outside)]
    rows += [("total", measured.total, planned.total)]
    for name, m, p in rows:
        lines.append(f"  {name:<8} {m:>14,} {p:>14,} {p / max(m, 1):>17.3f}")
    return lines


def run(argv: list[str]) -> int:
    args, overrides = parse(argv)
    cluster = cluster_of(args)
    cfg, notes = planned_job(overrides, args.gpus)
    if args.measure:
        print("\n".join(measured_vs_planned(cfg)))
        return 0
    plan = plan_job(cfg, cluster)
    plans = search(cfg, cluster) if args.search else []
    if args.json:
        out = {"plan": as_json(plan), "fits": plan.fits}
        if args.search:
            out["search"] = [as_json(p) for p in plans[: args.top]]
        print(json.dumps(out, indent=1))
        return 0
    lines = header(cfg, cluster, model_name(overrides), notes)
    layout = (
        f"{plan.overrides} (backend {plan.backend.name}, accumulation {plan.accumulation}, "
        f"a2a {plan.a2a})"
    )
    lines += ["", f"layout: {layout}"]
    lines += memory_table(plan) + time_table(plan, cluster)
    if not plan.fits and not args.search:
        lines.append(advice(cfg, cluster))
    if args.search:
        lines += [""] + search_table(plans, args.top)
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        return report_error(str(e))


if __name__ == "__main__":
    sys.exit(main())
