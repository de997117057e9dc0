"""The training loop: one process or many (torchrun). Accumulation, clipping, skipped
non-finite steps, evaluation against the data's floor (or a task's metrics), early stopping and
the best model, checkpoints, tracking, and a clean stop on SIGINT/SIGTERM that every rank
agrees on. What differs per task (lm, classify, tag) lives in xpar.tasks.

Legend: B micro-batch, L sequence length + 1, W a task's row width (xpar.tasks.rows).
"""

from __future__ import annotations

import logging
import math
import os
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
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from xpar.checks import UserError, report_warning
from xpar.config import TrainConfig
from xpar.data import Sharding, check_token_ids
from xpar.model import flops_per_token
from xpar.parallel.mesh import Mesh, init_mesh, world_from_env
from xpar.parallel.parallelize import parallelize
from xpar.tasks.models import build_model
from xpar.tasks.runner import build_runner
from xpar.training.backend import build_backend
from xpar.training.checkpointing import Checkpoints, resume_path
from xpar.training.finetune import load_init_weights, trainable_counts
from xpar.training.inputs import build_data
from xpar.training.optim import build_scheduler, load_scheduler
from xpar.training.records import set_aside
from xpar.training.stats import StepStats, Tally
from xpar.training.tracking import METRICS_FILE, Tracker
from xpar.training.validation import Validation

log = logging.getLogger(__name__)

# Dense bf16 peak of the GPUs MFU is usually quoted for (TFLOP/s); others need trainer.peak_tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class StepResult(StepStats):
    """One optimizer step, reduced over ranks."""

    grad_norm: float = math.nan
    skipped: bool = False
    overflow: str | None = None  # fp16: skipped for a loss-scale overflow (not a bad step)


@dataclass
class FitResult:
    """What a call to fit() did."""

    step: int
    val_loss: float | None
    floor: float | None
    skipped_steps: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss
    stopped_early: bool = False  # by a signal or stop_at, before trainer.max_steps
    early_stopped: bool = False  # finetune.patience ran out: a normal end, saved
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's
    best: dict[str, Any] | None = None  # the monitored metric's best: step, value


def pick_device(name: str) -> torch.device:
    """The device `trainer.device` names; under torchrun, the rank's own GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", world_from_env()[2])


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
    """Builds the model, data, backend and tracker for a TrainConfig and runs the loop.

    The model is built on the meta device and materialised by parallelize(), so its weights
    are the same whatever the number of processes and EP size. The loop steps through the
    backend (xpar.training.backend) and knows nothing of how it reduces or partitions.
    """

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, config_dict: dict[str, Any], mesh: Mesh | None = None
    ) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        tc = cfg.trainer
        self.mesh = mesh or init_mesh(cfg.parallel, cfg.moe, pick_device(tc.device))
        self.device, layout = self.mesh.device, self.mesh.layout
        self.rank, self.world = layout.rank, layout.world
        precision = tc.precision_on(self.device.type)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        resume_from = resume_path(tc.resume, self.ckpt_root, self.mesh)
        self.model_cfg = cfg.model_config()
        micro, self.accum_steps = cfg.data.accumulation(dp_world=self.world)
        shard = Sharding(micro, self.rank, self.world, tc.seed, tc.overfit_batches)
        with self._rank_zero_first():  # rank 0 fills the datasets cache, the others reuse it
            self.data = build_data(cfg.data, self.model_cfg.vocab_size, shard, cfg.task)
        self.runner = build_runner(cfg.task.kind, self.data.labels)  # the labels come from data
        seed_everything(tc.seed)
        with torch.device("meta"):
            self.model = build_model(self.model_cfg, cfg.task, len(self.data.labels or ()))
        ft = cfg.finetune
        self.pm = parallelize(self.model, self.mesh, cfg.parallel, train=ft.train)
        self.model.set_recompute(tc.recompute, tc.recompute_layers)
        self._init_from(tc.init_from, resume_from)
        self.backend = build_backend(self.pm, cfg, micro, self.accum_steps)
        self.optimizer = self.backend.optimizer
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, tc.max_steps)
        self.validation = Validation(cfg, self.pm, self.data, self.runner)
        self.monitor = self.validation.monitor
        self.checkpoints = Checkpoints(
            self.run_dir, self.pm, self.model_cfg, self.data.tokenizer, tc.keep_checkpoints
        )
        self.step = self.bad_steps = self.bad_streak = 0
        if resume_from is not None:
            self._load(resume_from)
        trainable, total = trainable_counts(self.model, layout.ep_size)
        log.info(
            "trainable %d / total %d parameters (%.1f%%; finetune.train=%s)",
            trainable, total, 100 * trainable / total, ft.train,
        )  # fmt: skip
        params = {"params_trainable": trainable, "params_total": total}
        if (
            resume_from is None
            and self.rank == 0
            and (kept := set_aside(self.run_dir / METRICS_FILE))
        ):
            log.info("a new run: the earlier run's metrics are kept as %s", kept)
        self.tracker = Tracker(
            self.run_dir,
            cfg.logger,
            {**config_dict, **params},
            enabled=self.rank == 0,
            resume_step=self.step if resume_from else None,
        )
        self.tracker.summarize(params)
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.data.seq_len)
        self.peak = peak_tflops(self.device, tc.peak_tflops)
        self._stop_signal: int | None = None
        self._submitit_handler: Any = None

    # ---- checkpoints -------------------------------------------------------------------------

    @contextmanager
    def _rank_zero_first(self):
        if self.rank != 0:
            self.mesh.barrier()
        yield
        if self.rank == 0:
            self.mesh.barrier()

    def _init_from(self, path: str | None, resume_from: Path | None) -> None:
        """trainer.init_from: weights only, before any optimizer (DeepSpeed copies the weights
        when it starts). A resumed run has its own weights: resume wins."""
        if path is None:
            return
        if resume_from is not None:
            log.info("trainer.init_from=%s ignored: resuming from %s", path, resume_from)
            return
        log.info(load_init_weights(self.pm, path, self.cfg.task, self.data.labels))

    def _load(self, path: Path) -> None:
        task = self.validation.task_info()
        state = self.checkpoints.load(path, self.backend, task)
        self.step, self.bad_steps = int(state["step"]), int(state["bad_steps"])
        self.bad_streak = int(state["bad_streak"])
        self.monitor.load_state_dict(state.get("monitor"))
        self.data.train.load_state_dict(self._own(state["data"], "data position"))
        load_scheduler(self.scheduler, state["scheduler"])
        log.info("resumed from %s at step %d", path, self.step)

    def _own(self, per_rank: list, what: str):
        """This rank's entry of a per-rank list saved by a run of any size: its own when the
        world is the same, else the common one (a sequence loader's position is the same on
        every rank and does not depend on the world size)."""
        if len(per_rank) == self.world:
            return per_rank[self.rank]
        if all(entry == per_rank[0] for entry in per_rank):
            return per_rank[0]
        raise UserError(
            f"the checkpoint's {what} differs between its {len(per_rank)} ranks (a stream); "
            f"resume it with {len(per_rank)} processes, not {self.world}"
        )

    def save(self) -> Path:
        """A checkpoint of this step (every rank takes part)."""
        state = {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "bad_streak": self.bad_streak,
            "data": self.mesh.gather_objects(self.data.train.state_dict()),
            "monitor": self.monitor.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        task = self.validation.task_info()
        return self.checkpoints.save(self.step, self.backend, task, state)

    # ---- one step ----------------------------------------------------------------------------

    def _tally(self, num_counts: int = 0) -> Tally:
        moe = self.model_cfg.moe
        num_experts = 0 if moe is None else moe.num_experts
        num_layers = len(self.model_cfg.moe_layer_ids())
        return Tally(num_layers, num_experts, self.device, self.rank, self.world, num_counts)

    def _forward(self, rows_BW: Tensor, module: nn.Module | Any):
        """One forward pass over a batch of rows (token ids [B, L] for the LM)."""
        check_token_ids(self.runner.tokens(rows_BW), self.model_cfg.vocab_size, "training batch")
        rows_BW = rows_BW.to(self.device, non_blocking=True)
        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled):
            return self.runner.forward(module, rows_BW)

    def train_step(self, micro_batches: list[Tensor]) -> StepResult:
        """Forward/backward over the micro-batches, reduce and clip the gradients, then step
        unless anything is non-finite on any rank, in which case the weights, optimizer state
        and balancing biases stay as they were."""
        self.model.train()
        n, backend = len(micro_batches), self.backend
        tally = self._tally()
        for i, rows_BW in enumerate(micro_batches):
            with backend.micro_step(last=i == n - 1) as module:
                out = self._forward(rows_BW, module)
                backend.backward((out.loss + out.aux_loss) / n)
            tally.add(out, 1.0 / n)
        norm = backend.clip_grad_norm()
        stats, grad_norm = tally.reduce(self.mesh, self._stop_signal is not None, norm)
        loss_finite = math.isfinite(stats.loss) and math.isfinite(stats.aux_loss)
        outcome = backend.step(loss_finite, loss_finite and math.isfinite(grad_norm))
        if outcome.applied:
            self.pm.update_expert_bias()
        else:
            self.model.discard_expert_load()
        self.scheduler.step()
        skipped = not outcome.applied and outcome.overflow is None
        return StepResult(
            **vars(stats), grad_norm=grad_norm, skipped=skipped, overflow=outcome.overflow
        )

    # ---- evaluation --------------------------------------------------------------------------

    def evaluate(self) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """(validation metrics, expert load [L, E], the task's counts): see Validation."""
        return self.validation.evaluate(self._forward, self._tally(self.runner.num_counts))

    def _eval_and_log(self) -> tuple[dict[str, float], np.ndarray]:
        metrics, load_LE, counts = self.evaluate()
        if self.validation.log(self.step, metrics, load_LE, self.tracker):
            task, best = self.validation.task_info(), self.monitor.best_info()
            path = self.checkpoints.save_best(self.backend, task, best)
            log.info("best model so far (%s) in %s", self.monitor.describe(), path)
        return metrics, counts

    # ---- the loop ----------------------------------------------------------------------------

    @contextmanager
    def _stop_on_signals(self):
        """SIGINT/SIGTERM ask the loop to save and stop after the current step (the ranks agree
        on which step through the step's all-reduce); a second SIGINT interrupts at once. In a
        submitit job (launcher=slurm) so does SIGUSR2, Slurm's warning before the time limit,
        whose submitit handler (it requeues the job) runs after the save."""

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        signals = [signal.SIGINT, signal.SIGTERM]
        if os.environ.get("SUBMITIT_EXECUTOR"):
            signals.append(signal.SIGUSR2)
        previous = {s: signal.signal(s, handler) for s in signals}
        self._submitit_handler = previous.get(signal.SIGUSR2)
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
            **r.a2a,
        }
        if self.peak is not None:
            peak = self.peak * 1e12 * self.world
            metrics["mfu"] = tokens_per_s * self.flops_per_token / peak
        return metrics

    def fit(self, stop_at: int | None = None) -> FitResult:
        """Train to trainer.max_steps (or `stop_at`, then save as a signal would)."""
        tc = self.cfg.trainer
        end = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
        result = FitResult(self.step, None, self.data.floor, self.bad_steps)
        result.early_stopped = self.monitor.should_stop  # resumed after stopping early: done
        if self.step >= end and self.rank == 0 and not result.early_stopped:
            report_warning(
                f"nothing to train: the run is at step {self.step} and trainer.max_steps="
                f"{tc.max_steps}; raise trainer.max_steps to train further",
                log,
            )
        torch.autograd.set_detect_anomaly(tc.detect_anomaly)
        # A live bar on a terminal; in a log file (batch jobs, CI) one line per logged step.
        live = tc.progress and sys.stderr.isatty() and self.rank == 0
        bar = tqdm(
            total=tc.max_steps,
            initial=self.step,
            dynamic_ncols=True,
            desc="train",
            disable=not live,
        )
        tick, tokens, stopping, counts = time.perf_counter(), 0, False, None
        try:
            with self._stop_on_signals(), logging_redirect_tqdm():
                while self.step < end and not stopping and not result.early_stopped:
                    r = self.train_step(self.data.train.next_step())
                    self.step += 1
                    tokens += self.tokens_per_step
                    stopping = r.stop
                    self._count_bad(r)
                    result.losses[self.step] = r.loss
                    bar.update(1)
                    if self.step % tc.log_every == 0 or self.step == end or stopping:
                        elapsed = time.perf_counter() - tick
                        metrics = self._step_metrics(r, tokens / max(elapsed, 1e-9))
                        self.tracker.log(self.step, metrics)
                        self._show(bar, metrics)
                        tick, tokens = time.perf_counter(), 0
                    if self.step % tc.eval_every == 0 or self.step == tc.max_steps:
                        result.metrics, counts = self._eval_and_log()
                        result.val_loss = result.metrics["val_loss"]
                        result.early_stopped = self.monitor.should_stop
                        tick, tokens = time.perf_counter(), 0
                    if (
                        self.step % tc.save_every == 0
                        or self.step == tc.max_steps
                        or (result.early_stopped)
                    ):
                        self.save()
                        tick, tokens = time.perf_counter(), 0
            bar.close()
            result.step, result.skipped_steps = self.step, self.bad_steps
            result.best = self.monitor.state_dict() if self.monitor.best_step else None
            if self.step < tc.max_steps and not result.early_stopped:  # a signal or stop_at
                self._stop_early(result, by_signal=stopping)
            else:
                self._end(result, counts)
        finally:
            self.tracker.finish()
        return result

    def _end(self, result: FitResult, counts: np.ndarray | None) -> None:
        """A normal end (trainer.max_steps, or early stopping): say so, and report per label."""
        if result.early_stopped:
            m = self.monitor
            log.info(
                "early stop at step %d: no better %s in %d evaluations (best %s)",
                self.step, m.metric, m.patience, m.describe(),
            )  # fmt: skip
        if counts is not None:
            self.validation.report(self.step, counts, self.tracker)

    def _stop_early(self, result: FitResult, by_signal: bool) -> None:
        """Save (unless this step just did) and say why the run stopped."""
        path = self.ckpt_root / f"step_{self.step}"
        if self.step % self.cfg.trainer.save_every:
            path = self.save()
        if self._stop_signal is not None:
            why = f"signal {signal.Signals(self._stop_signal).name}"
        else:
            why = "a signal on another rank" if by_signal else "stop_at"
        log.info("stopped at step %d (%s); checkpoint %s", self.step, why, path)
        result.stopped_early = True
        if self._stop_signal == signal.SIGUSR2 and callable(self._submitit_handler):
            self.tracker.finish()
            self._submitit_handler(signal.SIGUSR2, None)  # rank 0 requeues the job and exits

    def _show(self, bar: tqdm, metrics: dict[str, Any]) -> None:
        loss, lr, tok_s = metrics["loss"], metrics["lr"], metrics["tokens_per_s"]
        if not bar.disable:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        elif self.cfg.trainer.progress:
            max_steps = self.cfg.trainer.max_steps
            log.info(
                "step %d/%d loss %.4f lr %.2e tokens/s %.0f", self.step, max_steps, loss, lr, tok_s
            )

    def _count_bad(self, r: StepResult) -> None:
        if r.overflow:
            log.info("step %d skipped: %s", self.step, r.overflow)
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
