"""The run's metrics sink: `metrics.jsonl` always, Weights & Biases when `logger=wandb`, and
expert-load heatmaps under `plots/`. Only rank 0 tracks; other ranks pass `enabled=False`.

The API key never reaches a file the run writes: it is not passed to wandb (wandb reads
WANDB_API_KEY itself, online only), and wandb's console capture is off, so nothing printed to
stdout/stderr lands in the run's `output.log`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from xpar.checks import UserError
from xpar.config import LoggerConfig
from xpar.training.load_plot import load_figure
from xpar.training.records import read_records

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "wandb_run_id"


def wandb_mode(mode: str) -> str:
    """`auto` runs online only when an API key is in the environment, so a run without one
    still records everything (offline, for `wandb sync` later) instead of failing."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def _jsonable(value: Any, key: str) -> Any:
    """Plain Python for json: numpy/torch scalars and arrays become numbers and lists, and
    non-finite floats become None so every line stays strict JSON."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, key) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return _jsonable(value.tolist(), key)
    raise TypeError(f"metric {key!r} has type {type(value).__name__}, which cannot go to JSON")


def _truncate_after(path: Path, step: int) -> int:
    """Drop the lines of `path` logged after `step` (and a torn last line from a crash), so a
    run resumed from a checkpoint at `step` does not log those steps twice. Returns how many
    lines were dropped. Atomic: a crash here leaves the old file or the new one."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += line.strip() != ""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return dropped


def _max_over_mean(row: list[Any]) -> float | None:
    values = [v for v in row if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not values or sum(values) == 0:
        return None
    return max(values) / (sum(values) / len(values))


METRIC_SUMMARIES = {
    "loss": "min",
    "val_loss": "min",
    "val_gap": "min",
    "tokens_per_s": "mean",
    **dict.fromkeys(
        ("val_accuracy", "val_macro_f1", "val_precision", "val_recall", "val_f1"), "max"
    ),
}
REPORT_FILE = "label_report.json"


def wandb_labels(
    cfg: LoggerConfig, config: dict[str, Any], default_name: str
) -> tuple[str, str | None, list[str]]:
    """The wandb run's name, group and tags. Name: logger.name, else run_name (a -m sweep job
    adds its overrides). Group: logger.group, else the experiment, else the sweep. Tags: the
    config's logger.tags plus router=, ep=, zero=, shard= (when sharded), experiment= and
    world=, so runs filter and group by how they were trained."""
    launch = config.get("launch") or {}
    moe = config.get("moe") or {}
    name = cfg.name or str(config.get("run_name") or default_name)
    if cfg.name is None and launch.get("job"):
        name = f"{name}/{launch['job']}"
    group = cfg.group or launch.get("experiment") or launch.get("sweep")
    parallel = config.get("parallel") or {}
    derived = {
        "router": moe.get("router", "dense") if moe else "dense",
        "ep": parallel.get("ep_size"),
        "zero": (config.get("deepspeed") or {}).get("stage"),
        "shard": None if parallel.get("shard") == "none" else parallel.get("shard"),
        "experiment": launch.get("experiment"),
        "world": launch.get("world"),
    }
    tags = list(cfg.tags) + [f"{k}={v}" for k, v in derived.items() if v is not None]
    return name, group, [t[:64] for t in dict.fromkeys(tags)]  # wandb: tags of <= 64 chars


def unreachable_message(cfg: LoggerConfig, error: Exception) -> str:
    """The one line for an online wandb.init that did not reach the W&B server within
    logger.init_timeout_s (no network, a firewall, a wrong WANDB_BASE_URL)."""
    why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    mode = (
        "logger.mode=auto and WANDB_API_KEY is set" if cfg.mode == "auto" else "logger.mode=online"
    )
    return (
        f"logger=wandb could not start an online run ({mode}) within "
        f"logger.init_timeout_s={cfg.init_timeout_s:g}: {why}; without a network use "
        "logger.mode=offline (and `wandb sync` the run later)"
    )


class LoadHistory:
    """The expert load of logged training steps, for the heatmap over time. At most
    `max_columns` steps are kept: past that, every other one is dropped and from then on only
    every other logged step is taken, so a long run costs bounded memory and drawing time."""

    def __init__(self, max_columns: int = 512) -> None:
        self.max_columns = max_columns
        self.steps: list[int] = []
        self.loads: list[np.ndarray] = []  # [MoE layers, experts] each
        self.stride, self._seen = 1, 0

    def add(self, step: int, rows: Any) -> None:
        if not isinstance(rows, list) or not rows:
            return
        self._seen += 1
        if (self._seen - 1) % self.stride:
            return
        load_LE = np.array([[np.nan if v is None else v for v in row] for row in rows], np.float32)
        if self.loads and load_LE.shape != self.loads[0].shape:
            return
        self.steps.append(step)
        self.loads.append(load_LE)
        if len(self.steps) > self.max_columns:
            self.steps, self.loads = self.steps[::2], self.loads[::2]
            self.stride *= 2


class Tracker:
    """Writes each logged step to `run_dir/metrics.jsonl` (nan/inf are written as null) and,
    with `cfg.kind == "wandb"`, to a wandb run whose files live under `run_dir/wandb/`."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        config: dict[str, Any],
        *,
        enabled: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._file: TextIO | None = None
        self._run: Any = None  # wandb Run
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS_FILE
        if resume_step is not None and (dropped := _truncate_after(metrics, resume_step)):
            log.info("dropped %d lines after step %d from %s", dropped, resume_step, metrics)
        self._history = LoadHistory()
        if resume_step is not None:  # the heatmap over time goes on from the earlier steps
            for record in read_records(metrics):
                self._history.add(record["step"], record.get("expert_load"))
        if cfg.kind == "wandb":  # first: a run that cannot start leaves no file open
            self._run = self._start_wandb(cfg, config)
        self._file = metrics.open("a")

    def _start_wandb(self, cfg: LoggerConfig, config: dict[str, Any]) -> Any:
        import wandb  # only runs that track with wandb pay for its import

        # Resuming continues the same wandb run. Online, wandb drops steps below the last one it
        # holds, so steps redone after an older checkpoint reach metrics.jsonl but not wandb.
        id_file = self.run_dir / RUN_ID_FILE
        resume = {"id": id_file.read_text().strip(), "resume": "allow"} if id_file.exists() else {}
        name, group, tags = wandb_labels(cfg, config, self.run_dir.name)
        mode = wandb_mode(cfg.mode)
        # console="off": captured stdout could hold anything (even an echoed key); the
        # trainer's numbers reach wandb through log() anyway. silent: no banner spam.
        settings = wandb.Settings(
            silent=True, console="off", save_code=False, init_timeout=cfg.init_timeout_s
        )
        wandb.setup(settings)  # also global: wandb logs in (and says so) before init() reads them
        try:
            run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=name,
                group=group,
                tags=tags,
                config=config,
                dir=str(self.run_dir),
                mode=mode,
                settings=settings,
                **resume,
            )
        except (wandb.errors.CommError, TimeoutError) as e:
            if mode != "online":
                raise
            wandb.teardown()  # now, within the bound, rather than at exit
            raise UserError(unreachable_message(cfg, e)) from e
        id_file.write_text(run.id)
        # Every metric against the optimizer step (also after a resume); best-so-far summaries.
        run.define_metric("step", hidden=True)
        run.define_metric("*", step_metric="step")
        for key, summary in METRIC_SUMMARIES.items():
            run.define_metric(key, step_metric="step", summary=summary)
        sync_dir = run.settings.sync_dir
        msg = f"wandb offline run in {sync_dir}; upload: wandb sync {sync_dir}"
        if not run.offline:
            msg = f"wandb run {run.url}"
        log.info(msg)
        print(msg, flush=True)
        return run

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append `{"step": step, **metrics}` as one line (flushed: a crash loses nothing) and
        send the scalars to wandb; list metrics go to wandb as max/mean per row."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v, k) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        self._history.add(record["step"], record.get("expert_load"))
        if self._run is not None:
            self._run.log({"step": int(step), **self._wandb_scalars(record)}, step=int(step))

    def _wandb_scalars(self, record: dict[str, Any]) -> dict[str, Any]:
        """Scalars as they are; a list of rows (expert_load: one per MoE layer) as
        `key/max_over_mean/<row>`, since wandb charts scalars; the heatmap carries the rest."""
        out: dict[str, Any] = {}
        for key, value in record.items():
            if key == "step" or value is None:
                continue
            if not isinstance(value, (list, dict)):
                out[key] = value
            elif value and all(isinstance(row, list) for row in value):
                for i, row in enumerate(value):
                    if (ratio := _max_over_mean(row)) is not None:
                        out[f"{key}/max_over_mean/{i}"] = ratio
            elif isinstance(value, list) and (ratio := _max_over_mean(value)) is not None:
                out[f"{key}/max_over_mean"] = ratio
        return out

    def summarize(self, values: dict[str, Any]) -> None:
        """Facts about the run as a whole (parameter counts) for wandb's run summary."""
        if self._run is not None:
            self._run.summary.update(values)

    def log_report(self, step: int, title: str, rows: list[dict[str, Any]]) -> Path | None:
        """The final per-label report: a metrics.jsonl record `{"step", "label_report":
        {"title", "rows"}}`, `label_report.json` in the run dir, and a wandb Table."""
        if not self.enabled:
            return None
        report = {"title": title, "rows": rows}
        self.log(step, {"label_report": report})
        path = self.run_dir / REPORT_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"step": int(step), **report}, indent=1) + "\n")
        os.replace(tmp, path)
        if self._run is not None and rows:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            self._run.log({"step": int(step), "label_report": table}, step=int(step))
        return path

    def log_expert_load(self, step: int, load_LE: np.ndarray, layer_ids: list[int]) -> Path | None:
        """Save a heatmap of `load_LE` [MoE layers, experts] (fraction of routed slots per
        expert, rows sum to 1) as `plots/expert_load_step{step}.png`; returns its path."""
        if not self.enabled:
            return None
        load_LE = np.asarray(load_LE, dtype=np.float64)
        if load_LE.ndim != 2 or load_LE.shape[0] != len(layer_ids):
            raise ValueError(
                f"load_LE has shape {load_LE.shape}; expected [len(layer_ids)={len(layer_ids)}, "
                "num_experts]"
            )
        path = self.run_dir / "plots" / f"expert_load_step{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_heatmap(load_LE, layer_ids, step, path)
        over_time = self._save_load_over_time()
        if self._run is not None:
            import wandb

            images = {"expert_load": wandb.Image(str(path))}
            if over_time is not None:
                images["expert_load_over_time"] = wandb.Image(str(over_time))
            self._run.log({"step": int(step), **images}, step=int(step))
        return path

    def _save_load_over_time(self) -> Path | None:
        """`plots/expert_load_over_time.png`: the expert load of the logged training steps so
        far (experts by steps, one panel per MoE layer)."""
        if not self._history.steps:
            return None
        path = self.run_dir / "plots" / "expert_load_over_time.png"
        steps_S = np.asarray(self._history.steps)
        load_figure(steps_S, np.stack(self._history.loads)).savefig(path, dpi=90)
        return path

    def finish(self) -> None:
        """Close metrics.jsonl and the wandb run (safe to call twice). On return the run's
        files under `run_dir/wandb/` are complete: an offline run can be synced at once."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._run is not None:
            import wandb

            run, self._run = self._run, None
            run.finish()
            # run.finish() only notifies wandb-core, which writes out and closes the run's
            # transaction log (run-*.wandb) when it gets to that notice, maybe after finish()
            # has returned. teardown() waits for wandb-core to do so and exit; the next
            # wandb.init starts a new one.
            wandb.teardown()
            if run.offline:
                print(f"wandb: upload this run with: wandb sync {run.settings.sync_dir}")


def _save_heatmap(load_LE: np.ndarray, layer_ids: list[int], step: int, path: Path) -> None:
    """Load relative to uniform (1 = balanced), diverging around 1 so hot and starved experts
    stand out. A bare Figure, not pyplot: nothing global to leak, no display backend needed."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    num_layers, num_experts = load_LE.shape
    rel_LE = load_LE * num_experts
    fig = Figure(figsize=(min(3 + 0.3 * num_experts, 24), min(1.5 + 0.35 * num_layers, 24)))
    ax = fig.add_subplot()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(rel_LE.max())))
    image = ax.imshow(rel_LE, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(num_layers), [str(i) for i in layer_ids])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"expert load / uniform (1/{num_experts}), step {step}")
    fig.colorbar(image, ax=ax, label="load × num_experts")
    fig.savefig(path, dpi=100, bbox_inches="tight")
