"""Training throughput and memory of the three training backends, in one process: xpar's own
(deepspeed=none), DeepSpeed ZeRO-2 and FSDP2 (parallel.shard=fsdp).

    python -m xpar.bench.backends                  # GPU: model=moe_300m, bf16, 50 steps each
    python -m xpar.bench.backends --cpu            # CPU stand-in: model=tiny, fp32, 10 steps

Each row trains the same model on the synthetic corpus through xpar's trainer for a few warm-up
steps and then the timed steps, and reports tokens/s, MFU (on a GPU of known peak), peak GPU
memory and the last loss. The rows run in this process, one after the other, so their ratios
are a same-run comparison. In one process nothing is sharded: the rows measure what each
backend's step costs (FSDP's all-gathers and casts, ZeRO's flat buffers) over xpar's own.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from xpar.config import CONF_DIR, register_configs, to_train_config
from xpar.model import flops_per_token

ROWS = {
    "deepspeed=none": ["deepspeed=none"],
    "deepspeed=zero2": ["deepspeed=zero2"],
    "parallel.shard=fsdp": ["parallel.shard=fsdp"],
}


def job(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_train_config(compose("config", overrides=overrides))


def timed_steps(trainer, steps: int, warmup: int, cuda: bool):
    """(seconds, last StepResult) of `steps` training steps after `warmup` untimed ones; on a
    GPU the peak-memory statistics start with the timed steps."""
    for _ in range(warmup):
        trainer.train_step(trainer.data.train.next_step())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        result = trainer.train_step(trainer.data.train.next_step())
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def measure(overrides: list[str], steps: int, warmup: int) -> dict:
    from xpar.training.trainer import Trainer

    cfg = job(overrides)
    cuda = torch.cuda.is_available() and cfg.trainer.device != "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), {})
        seconds, result = timed_steps(trainer, steps, warmup, cuda)
        tokens_per_s = steps * cfg.data.batch_size * cfg.data.seq_len / seconds
        model_cfg = cfg.model_config()
        row = {
            "tokens_per_s": tokens_per_s,
            "loss": result.loss,
            "params_M": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
            "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "mfu": None,
        }
        if trainer.peak is not None:
            flops = tokens_per_s * flops_per_token(model_cfg, cfg.data.seq_len)
            row["mfu"] = flops / (trainer.peak * 1e12)
        del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.cpu:
        base = ["trainer.device=cpu", "trainer.precision=fp32", "data.num_train=512"]
        base += ["data.num_val=64", "data.batch_size=8"]
        steps = args.steps or 10
    else:
        base = ["model=moe_300m", "trainer.device=cuda", "trainer.precision=bf16"]
        base += ["data.seq_len=1024", "data.batch_size=16", "data.micro_batch_size=8"]
        # The synthetic corpus keeps a dense [domains, V, V] table while it is generated: a
        # 1024-token corpus inside the model's 32k vocabulary (the model's FLOPs are unchanged).
        base += ["data.vocab_size=1024", "data.num_train=4096", "data.num_val=64"]
        steps = args.steps or 50
    base += ["trainer.progress=false", f"trainer.max_steps={steps + args.warmup}", "run_name=b"]
    device = "CPU" if args.cpu else torch.cuda.get_device_name()
    rows = {name: measure([*base, *extra], steps, args.warmup) for name, extra in ROWS.items()}
    ref = rows["deepspeed=none"]["tokens_per_s"]
    print(f"\n{device}; {' '.join(base)}; {steps} timed steps")
    print(f"{'row':<21}{'tokens/s':>12}{'vs none':>9}{'MFU':>8}{'peak GiB':>10}{'loss':>9}")
    for name, r in rows.items():
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_mem_GiB"] is None else f"{r['peak_mem_GiB']:.2f}"
        ratio = r["tokens_per_s"] / ref
        line = f"{name:<21}{r['tokens_per_s']:>12.0f}{ratio:>9.2f}{mfu:>8}{mem:>10}"
        print(f"{line}{r['loss']:>9.4f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
