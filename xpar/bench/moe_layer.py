"""Time one MoE layer, forward + backward, beside a dense SwiGLU doing the same expert FLOPs
and peer implementations, all in one process and one run.

    python -m xpar.bench.moe_layer                  # shapes A, B, C; bf16 on the GPU
    python -m xpar.bench.moe_layer --shapes small   # a quick run that also works on the CPU

Rows: the dense SwiGLU over T*k rows (the practical ceiling), Hugging Face Mixtral's sparse
block (grouped_mm and eager experts), DeepSpeed-MoE (capacity 1.0, 1.25, dropless), xpar
dropless, xpar's expert-parallel code path at ep_size=1, xpar cf=1.25 and xpar two-level.
Then, unless --a2a-steps=0, an estimate of all-to-all traffic per rank at shape B, off the
rank and across nodes, for flat, rank-dedup and hierarchical dispatch at EP=8 (one node) and
EP=64 (8 nodes x 8), from the routing of tiny models trained here (xpar.bench.a2a_estimate).

Columns: mean ms per forward + backward, TFLOPS of the expert matmuls (18 * T * k * D * F per
step, whatever a row drops), that as a fraction of the dense row's, and peak device memory.
Peers that are missing or cannot take a shape get a note instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from xpar.bench import a2a_estimate, peers
from xpar.moe import MoEConfig, MoELayer, SwiGLU
from xpar.parallel.dispatcher import AllToAllDispatcher


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    num_groups: int  # for the two-level row
    top_groups: int

    def expert_flops(self) -> float:
        """Forward + backward FLOPs of the three expert matmuls over T*k routed rows."""
        return 18.0 * self.tokens * self.top_k * self.d_model * self.d_ff

    def __str__(self) -> str:
        return f"T={self.tokens} D={self.d_model} F={self.d_ff} E={self.num_experts} k={self.top_k}"


SHAPES = {
    "A": Shape("A", 8192, 4096, 14336, 8, 2, num_groups=4, top_groups=2),
    "B": Shape("B", 16384, 2048, 1024, 64, 8, num_groups=8, top_groups=4),
    "C": Shape("C", 16384, 1024, 512, 32, 4, num_groups=8, top_groups=4),
    # CPU-sized stand-ins with the same E and k, for smoke runs and tests
    "a": Shape("a", 256, 64, 224, 8, 2, num_groups=4, top_groups=2),
    "b": Shape("b", 512, 64, 32, 64, 8, num_groups=8, top_groups=4),
    "c": Shape("c", 512, 32, 16, 32, 4, num_groups=8, top_groups=4),
}
SHAPE_SETS = {"full": "ABC", "small": "abc"}


@dataclass
class Result:
    shape: str
    row: str
    ms: float | None = None
    tflops: float | None = None
    vs_dense: float | None = None
    peak_gib: float | None = None
    note: str = ""


def xpar_config(shape: Shape, **overrides) -> MoEConfig:
    """The benchmarked xpar layer: Mixtral-style routing (softmax, renormalised top-k)."""
    return MoEConfig(
        d_model=shape.d_model,
        d_ff=shape.d_ff,
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        norm_topk_prob=True,
        **overrides,
    )


def two_level_overrides(shape: Shape) -> dict:
    return dict(
        router="two_level",
        num_groups=shape.num_groups,
        top_groups=shape.top_groups,
        group_score="topk_sum",
    )


class Dense(nn.Module):
    """The ceiling: one SwiGLU of hidden F over the T*k rows the experts would see."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.top_k = shape.top_k
        self.mlp = SwiGLU(shape.d_model, shape.d_ff)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.mlp(x_TD.expand(self.top_k, *x_TD.shape).reshape(-1, x_TD.shape[-1]))


Builder = Callable[[MoELayer], nn.Module]


def ep_path(layer: MoELayer) -> nn.Module:
    """The layer with the expert-parallel dispatcher at ep_size=1: every step of EP but the
    network (counts, the host sync for the splits, row metadata, expansion)."""
    layer.dispatcher = AllToAllDispatcher(layer.cfg, None, ep_size=1)
    return peers.OneSequence(layer)


def rows_for(shape: Shape) -> list[tuple[str, Builder, dict]]:
    """(row name, builder from a reference xpar layer, xpar config overrides) in table order."""
    return [
        ("dense SwiGLU, same FLOPs", lambda ref: Dense(shape), {}),
        ("HF Mixtral grouped_mm", lambda ref: peers.hf_mixtral_block(ref, "grouped_mm"), {}),
        ("HF Mixtral eager", lambda ref: peers.hf_mixtral_block(ref, "eager"), {}),
        ("DeepSpeed-MoE cf=1.0", lambda ref: peers.deepspeed_moe(ref, 1.0), {}),
        ("DeepSpeed-MoE cf=1.25", lambda ref: peers.deepspeed_moe(ref, 1.25), {}),
        ("DeepSpeed-MoE dropless", lambda ref: peers.deepspeed_moe(ref, None), {}),
        ("xpar dropless", peers.OneSequence, {}),
        ("xpar EP path, ep_size=1", ep_path, {}),
        ("xpar cf=1.25", peers.OneSequence, {"capacity_factor": 1.25}),
        ("xpar two-level dropless", peers.OneSequence, two_level_overrides(shape)),
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(module: nn.Module, x_TD: Tensor, iters: int, warmup: int) -> float:
    """Mean milliseconds of one forward + backward, gradients reset to None each time."""
    grad = None

    def step() -> None:
        nonlocal grad
        module.zero_grad(set_to_none=True)
        x_TD.grad = None
        out = module(x_TD)
        grad = torch.randn_like(out) if grad is None else grad
        out.backward(grad)

    for _ in range(warmup):
        step()
    sync(x_TD.device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(x_TD.device)
    return (time.perf_counter() - start) * 1e3 / iters


def time_row(
    shape: Shape,
    build: Builder,
    overrides: dict,
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
) -> tuple[float, float | None]:
    """(ms, peak GiB or None off CUDA) of one row; its tensors are freed on return."""
    torch.manual_seed(0)
    ref = MoELayer(xpar_config(shape, **overrides)).to(device=device, dtype=dtype)
    module = build(ref).to(device=device, dtype=dtype)
    del ref
    x_TD = torch.randn(shape.tokens, shape.d_model, device=device, dtype=dtype)
    x_TD.requires_grad_()
    if device.type != "cuda":
        return time_fwd_bwd(module, x_TD, args.iters, args.warmup), None
    torch.cuda.reset_peak_memory_stats(device)
    ms = time_fwd_bwd(module, x_TD, args.iters, args.warmup)
    return ms, torch.cuda.max_memory_allocated(device) / 2**30


def measure(
    shape: Shape,
    name: str,
    build: Builder,
    overrides: dict,
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
) -> Result:
    result = Result(shape.name, name)
    try:
        result.ms, result.peak_gib = time_row(shape, build, overrides, device, dtype, args)
        result.tflops = shape.expert_flops() / (result.ms * 1e-3) / 1e12
    except peers.Unsupported as e:
        result.note = str(e)
    except torch.OutOfMemoryError:
        result.note = "out of memory"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def fmt(value: float | None, width: int, spec: str) -> str:
    return ("-" if value is None else format(value, spec)).rjust(width)


def print_table(shape: Shape, results: list[Result]) -> None:
    print(f"\nshape {shape.name}: {shape}  ({shape.expert_flops() / 1e12:.2f} TFLOP per step)")
    print(f"| {'row':<26} | {'ms':>9} | {'TFLOPS':>7} | {'vs dense':>8} | {'peak GiB':>8} | note")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 9}|{'-' * 10}|{'-' * 10}|------")
    for r in results:
        print(
            f"| {r.row:<26} | {fmt(r.ms, 9, '.3f')} | {fmt(r.tflops, 7, '.3g')} | "
            f"{fmt(r.vs_dense, 8, '.2f')} | {fmt(r.peak_gib, 8, '.2f')} | {r.note}"
        )


def run(args: argparse.Namespace) -> list[Result]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    names = SHAPE_SETS.get(args.shapes, args.shapes)
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(
            f"--shapes={args.shapes!r}: unknown shape(s) {unknown}; valid: {sorted(SHAPES)} "
            f"or {sorted(SHAPE_SETS)}"
        )
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"MoE layer forward + backward on {label}, {dtype}, torch {torch.__version__}; "
        f"mean of {args.iters} iterations after {args.warmup} warm-up"
    )
    results = []
    for name in names:
        shape = SHAPES[name]
        rows = [measure(shape, *row, device, dtype, args) for row in rows_for(shape)]
        dense = rows[0].tflops
        for r in rows:
            if r.tflops is not None and dense:
                r.vs_dense = r.tflops / dense
        print_table(shape, rows)
        results += rows
    if args.json:
        with open(args.json, "w") as f:
            for r in results:
                f.write(json.dumps({"device": label, **asdict(r)}) + "\n")
    if args.a2a_steps:
        a2a_estimate.print_estimate(a2a_estimate.estimate(args.a2a_steps, device))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m xpar.bench.moe_layer", description=__doc__)
    p.add_argument("--shapes", default="full", help="'full' (A,B,C), 'small' or letters: 'AB'")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU")
    p.add_argument("--json", default=None, help="also write one JSON line per row here")
    p.add_argument(
        "--a2a-steps", type=int, default=None, help="training steps of the all-to-all estimate's "
        "tiny models (default 300 on a GPU, 60 on the CPU; 0 skips the estimate)"
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.a2a_steps is None:
        args.a2a_steps = 300 if torch.cuda.is_available() else 60
    if args.iters < 1 or args.warmup < 0 or args.a2a_steps < 0:
        p.error(
            f"--iters={args.iters} must be >= 1, --warmup={args.warmup} >= 0 and "
            f"--a2a-steps={args.a2a_steps} >= 0"
        )
    return args


if __name__ == "__main__":
    run(parse_args())
