"""The training loop of one process: accumulation, clipping, skipped non-finite steps,
evaluation against the data's floor, checkpoints, tracking, and a clean stop on SIGINT/SIGTERM.

Legend: B micro-batch, S sequence length, L MoE layers, E experts.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from xpar.checks import UserError
from xpar.config import TrainConfig
from xpar.data import Sharding, build_data, check_token_ids, eval_batches
from xpar.model import MoETransformerLM, flops_per_token
from xpar.training import checkpoint as ckpt
from xpar.training.optim import build_optimizer, build_scheduler
from xpar.training.tracking import Tracker

log = logging.getLogger(__name__)

# Dense bf16 peak of the GPUs MFU is usually quoted for (TFLOP/s); others need trainer.peak_tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class StepResult:
    """One optimizer step, as Python numbers (read once, after the step)."""

    loss: float  # LM cross-entropy
    aux_loss: float  # weighted aux + z losses summed over MoE layers
    grad_norm: float
    skipped: bool
    dropped_fraction: float
    load_LE: np.ndarray  # fraction of routed slots per expert, per MoE layer


@dataclass
class FitResult:
    """What a call to fit() did."""

    step: int
    val_loss: float | None
    floor: float | None
    skipped_steps: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> LM loss
    stopped_early: bool = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu")
    return torch.device(name)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Builds the model, data, optimizer and tracker for a TrainConfig and runs the loop."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, config_dict: dict[str, Any]) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        tc = cfg.trainer
        self.device = pick_device(tc.device)
        use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        resume_from = self._resume_path()
        seed_everything(tc.seed)
        self.model_cfg = cfg.model_config()
        self.model = MoETransformerLM(self.model_cfg).to(self.device)
        micro, self.accum_steps = cfg.data.accumulation(dp_world=1)
        shard = Sharding(micro, seed=tc.seed, overfit_batches=tc.overfit_batches)
        self.data = build_data(cfg.data, self.model_cfg.vocab_size, shard)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, tc.max_steps)
        self.step = self.bad_steps = self.bad_streak = 0
        if resume_from is not None:
            self._load(resume_from)
        self.tracker = Tracker(
            self.run_dir, cfg.logger, config_dict, resume_step=self.step if resume_from else None
        )
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.data.seq_len)
        self.peak = peak_tflops(self.device, tc.peak_tflops)
        self._stop_signal: int | None = None

    # ---- resume -----------------------------------------------------------------------------

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from, or None for a fresh run. A fresh run refuses a run dir
        that already holds checkpoints, which it would otherwise overwrite."""
        resume = self.cfg.trainer.resume
        if resume is False:
            if ckpt.latest_checkpoint(self.ckpt_root) is not None:
                raise UserError(
                    f"{self.ckpt_root} already holds checkpoints; pass trainer.resume=true to "
                    f"continue that run, or another run_name to start a new one"
                )
            return None
        if resume is True:
            path = ckpt.latest_checkpoint(self.ckpt_root)
            if path is None:
                log.warning(
                    "trainer.resume=true: no checkpoint in %s, starting at step 0", self.ckpt_root
                )
            return path
        path = Path(resume)
        if not path.exists():
            raise UserError(f"trainer.resume={resume}: no such checkpoint")
        if not (path / "meta.json").exists():  # a checkpoints/ dir: its newest checkpoint
            newest = ckpt.latest_checkpoint(path)
            if newest is None:
                raise UserError(f"trainer.resume={resume}: holds no complete checkpoint")
            path = newest
        return path

    def _load(self, path: Path) -> None:
        try:
            extra = ckpt.load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        except UserError as e:
            older = [p for p in ckpt.complete_checkpoints(path.parent) if p != path]
            hint = (
                f"; to resume from an earlier one pass trainer.resume={older[-1]}" if older else ""
            )
            raise UserError(f"{e}{hint}") from e
        self.step, self.bad_steps = int(extra["step"]), int(extra["bad_steps"])
        self.bad_streak = int(extra["bad_streak"])
        self.data.train.load_state_dict(extra["data"])
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Path:
        extra = {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "bad_streak": self.bad_streak,
            "data": self.data.train.state_dict(),
        }
        path = ckpt.save_checkpoint(
            self.ckpt_root, self.step, self.model, self.optimizer, self.scheduler, extra
        )
        ckpt.prune_checkpoints(self.ckpt_root, self.cfg.trainer.keep_checkpoints)
        return path

    # ---- one step ----------------------------------------------------------------------------

    def _autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)

    def _forward(self, tokens_BL: Tensor):
        check_token_ids(tokens_BL, self.model_cfg.vocab_size, "training batch")
        tokens_BL = tokens_BL.to(self.device, non_blocking=True)
        with self._autocast():
            return self.model(tokens_BL[:, :-1], targets_BS=tokens_BL[:, 1:])

    def train_step(self, micro_batches: list[Tensor]) -> StepResult:
        """Forward/backward over the micro-batches, clip, then step unless anything is
        non-finite, in which case the weights, optimizer state and balancing biases stay as
        they were."""
        self.model.train()
        n = len(micro_batches)
        lm = aux = dropped = torch.zeros((), device=self.device)
        load_LE = None
        for tokens_BL in micro_batches:
            out = self._forward(tokens_BL)
            ((out.loss + out.aux_loss) / n).backward()
            lm, aux = lm + out.loss.detach() / n, aux + out.aux_loss.detach() / n
            if out.aux:
                counts_LE = torch.stack([a.tokens_per_expert for a in out.aux]).float()
                load_LE = counts_LE if load_LE is None else load_LE + counts_LE
                dropped = dropped + torch.stack([a.dropped for a in out.aux]).mean() / n
        clip = self.cfg.optim.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        loss, aux_loss, norm = (float(v) for v in (lm, aux, grad_norm))
        skipped = not all(math.isfinite(v) for v in (loss, aux_loss, norm))
        if skipped:
            self.model.discard_expert_load()
        else:
            self.optimizer.step()
            self.model.update_expert_bias()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if load_LE is None:
            load_LE = torch.zeros(0, 0)
        load_LE = load_LE / load_LE.sum(-1, keepdim=True).clamp_min(1)
        return StepResult(loss, aux_loss, norm, skipped, float(dropped), load_LE.cpu().numpy())

    # ---- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> tuple[float, np.ndarray]:
        """(mean LM loss per token over the validation split, expert load [L, E] on it)."""
        self.model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count, load_LE = 0, None
        micro = self.cfg.data.micro_batch_size or self.cfg.data.batch_size
        for tokens_BL in eval_batches(self.data.val, micro, self.cfg.trainer.eval_batches):
            out = self._forward(tokens_BL)
            targets = tokens_BL[:, 1:].numel()
            total += out.loss.double() * targets
            count += targets
            if out.aux:
                counts_LE = torch.stack([a.tokens_per_expert for a in out.aux]).double()
                load_LE = counts_LE if load_LE is None else load_LE + counts_LE
        self.model.train()
        if load_LE is None:
            load_LE = torch.zeros(0, 0)
        load_LE = load_LE / load_LE.sum(-1, keepdim=True).clamp_min(1)
        return float(total) / max(count, 1), load_LE.cpu().numpy()

    def _eval_and_log(self) -> float:
        val_loss, load_LE = self.evaluate()
        metrics: dict[str, Any] = {"val_loss": val_loss}
        floor = self.data.floor
        msg = f"step {self.step}: val loss {val_loss:.4f}"
        if floor is not None:
            metrics.update(floor=floor, val_gap=val_loss - floor)
            msg += f" (floor {floor:.4f}, gap {val_loss - floor:.4f})"
        self.tracker.log(self.step, metrics)
        if load_LE.size:
            self.tracker.log_expert_load(self.step, load_LE, self.model_cfg.moe_layer_ids())
        log.info(msg)
        return val_loss

    # ---- the loop ----------------------------------------------------------------------------

    @contextmanager
    def _stop_on_signals(self):
        """SIGINT/SIGTERM ask the loop to save and stop after the current step; a second
        SIGINT interrupts at once."""

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _step_metrics(self, r: StepResult, tokens_per_s: float) -> dict[str, Any]:
        metrics = {
            "loss": r.loss,
            "aux_loss": r.aux_loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": r.grad_norm,
            "tokens_per_s": tokens_per_s,
            "dropped_fraction": r.dropped_fraction,
            "skipped_steps": self.bad_steps,
            "expert_load": np.round(r.load_LE.astype(np.float64), 5).tolist(),
        }
        if self.peak is not None:
            metrics["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * 1e12)
        return metrics

    def fit(self, stop_at: int | None = None) -> FitResult:
        """Train to trainer.max_steps (or `stop_at`, then save as a signal would)."""
        tc = self.cfg.trainer
        end = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
        result = FitResult(self.step, None, self.data.floor, self.bad_steps)
        torch.autograd.set_detect_anomaly(tc.detect_anomaly)
        # A live bar on a terminal; in a log file (batch jobs, CI) one line per logged step.
        bar = tqdm(
            total=tc.max_steps,
            initial=self.step,
            dynamic_ncols=True,
            desc="train",
            disable=not (tc.progress and sys.stderr.isatty()),
        )
        tick, tokens = time.perf_counter(), 0
        with self._stop_on_signals(), logging_redirect_tqdm():
            while self.step < end and self._stop_signal is None:
                r = self.train_step(self.data.train.next_step())
                self.step += 1
                tokens += self.tokens_per_step
                self._count_bad(r)
                result.losses[self.step] = r.loss
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == end:
                    elapsed = time.perf_counter() - tick
                    metrics = self._step_metrics(r, tokens / max(elapsed, 1e-9))
                    self.tracker.log(self.step, metrics)
                    self._show(bar, metrics)
                    tick, tokens = time.perf_counter(), 0
                if self.step % tc.eval_every == 0 or self.step == tc.max_steps:
                    result.val_loss = self._eval_and_log()
                    tick, tokens = time.perf_counter(), 0
                if self.step % tc.save_every == 0 or self.step == tc.max_steps:
                    self.save()
                    tick, tokens = time.perf_counter(), 0
        bar.close()
        result.step, result.skipped_steps = self.step, self.bad_steps
        if self.step < tc.max_steps:  # stopped by a signal or stop_at
            path = self.save()
            why = (
                f"signal {signal.Signals(self._stop_signal).name}"
                if self._stop_signal
                else ("stop_at")
            )
            log.info("stopped at step %d (%s); checkpoint %s", self.step, why, path)
            result.stopped_early = True
        self.tracker.finish()
        return result

    def _show(self, bar: tqdm, metrics: dict[str, Any]) -> None:
        loss, lr, tok_s = metrics["loss"], metrics["lr"], metrics["tokens_per_s"]
        if not bar.disable:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        elif self.cfg.trainer.progress:
            log.info(
                "step %d/%d loss %.4f lr %.2e tokens/s %.0f",
                self.step,
                self.cfg.trainer.max_steps,
                loss,
                lr,
                tok_s,
            )

    def _count_bad(self, r: StepResult) -> None:
        if not r.skipped:
            self.bad_streak = 0
            return
        self.bad_steps += 1
        self.bad_streak += 1
        log.warning("step %d skipped: loss %s, grad norm %s", self.step, r.loss, r.grad_norm)
        if self.bad_streak >= self.cfg.trainer.max_bad_steps:
            raise TrainingDiverged(
                f"stopping at step {self.step}: {self.bad_streak} consecutive steps had a "
                f"non-finite loss or gradient norm (last loss {r.loss}, grad norm "
                f"{r.grad_norm}); lower optim.lr or check the data"
            )
