"""Planned against measured memory, and throughput, for each activation recompute mode.

    python -m xpar.bench.memory            # GPU: model=moe_300m, bf16, micro-batches 4 and 8
    python -m xpar.bench.memory --cpu      # CPU stand-in: a wide-F tiny model, fp32

Each row trains the job through xpar's trainer (a few warm-up steps, then the timed ones) at
one `trainer.recompute` mode and micro-batch, beside the planner's figures for the same job
on one GPU (`xpar.plan.planner.plan_job`). On a GPU the measured peak is
`torch.cuda.max_memory_allocated` over the timed steps, against the planned peak (model state,
one micro-batch's activations, buffers); on the CPU, which has no allocator statistics, it is
the activation bytes autograd saves for one micro-batch (`xpar.plan.measure`), against the
planned activations. Rows run one after the other in this process: their tokens/s ratios are
a same-run comparison.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch

from xpar.bench.backends import job, timed_steps
from xpar.plan.gpus import GPU
from xpar.plan.planner import Cluster, plan_job

MODES = ("none", "experts", "full")
GIB = 2**30


def measure(overrides: list[str], steps: int, warmup: int, cuda: bool) -> dict:
    from xpar.plan.measure import measure_activations
    from xpar.training.trainer import Trainer

    cfg = job(overrides)
    # One GPU of this machine's memory: only the memory figures are compared here.
    memory = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else 1e6
    planned = plan_job(cfg, Cluster(1, 1, GPU("this", memory, 1.0, 1.0, 1.0, 1.0)))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), {})
        seconds, _ = timed_steps(trainer, steps, warmup, cuda)
        if cuda:
            measured, plan = torch.cuda.max_memory_allocated(), planned.peak_bytes
        else:
            rows = trainer.data.train.next_step()[0]
            measured = measure_activations(trainer.model, rows).total
            plan = planned.activations.total
        del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    tokens = steps * cfg.data.batch_size * cfg.data.seq_len
    return {"tokens_per_s": tokens / seconds, "measured": measured, "planned": plan}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny wide-F model on the CPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write one line a row here")
    parser.add_argument(
        "--micro-batches", type=int, nargs="+", default=None, help="default: 4 8 (GPU), 2 4"
    )
    args = parser.parse_args(argv)
    cuda = not args.cpu and torch.cuda.is_available()
    if cuda:
        base = ["model=moe_300m", "trainer.device=cuda", "trainer.precision=bf16"]
        base += ["data.seq_len=1024", "data.batch_size=16", "data.vocab_size=1024"]
        base += ["data.num_train=4096", "data.num_val=64"]
        micros, steps = (4, 8), args.steps or 10
    else:
        base = ["trainer.device=cpu", "trainer.precision=fp32", "data.num_train=512"]
        base += ["data.num_val=64", "data.batch_size=8", "moe.d_ff=512"]
        micros, steps = (2, 4), args.steps or 4
    base += ["trainer.progress=false", f"trainer.max_steps={steps + args.warmup}", "run_name=b"]
    device = torch.cuda.get_device_name() if cuda else "CPU"
    what = "peak allocated" if cuda else "activations saved"
    print(f"\n{device}; {' '.join(base)}; {steps} timed steps; {what}, GiB")
    print(f"{'recompute':<10}{'micro':>6}{'planned':>10}{'measured':>10}{'ratio':>7}"
          f"{'tokens/s':>11}{'vs none':>8}")  # fmt: skip
    rows = []
    for micro in args.micro_batches or micros:
        ref = None
        for mode in MODES:
            extra = [f"trainer.recompute={mode}", f"data.micro_batch_size={micro}"]
            r = measure([*base, *extra], steps, args.warmup, cuda)
            ref = ref or r["tokens_per_s"]
            print(
                f"{mode:<10}{micro:>6}{r['planned'] / GIB:>10.3f}{r['measured'] / GIB:>10.3f}"
                f"{r['planned'] / r['measured']:>7.3f}{r['tokens_per_s']:>11.0f}"
                f"{r['tokens_per_s'] / ref:>8.2f}"
            )
            rows.append(
                {
                    "device": device,
                    "recompute": mode,
                    "micro_batch": micro,
                    "planned_GiB": r["planned"] / GIB,
                    "measured_GiB": r["measured"] / GIB,
                    "tokens_per_s": r["tokens_per_s"],
                    "what": what,
                }
            )
    if args.json is not None:
        args.json.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
