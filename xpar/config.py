"""The training job's typed config: one dataclass per concern (the data sources' in
xpar.data.config, the task's and fine-tuning's in xpar.tasks.config). Registered with Hydra's
ConfigStore as the schema that the YAML groups under conf/ compose; `TrainConfig` checks the
sections against each other once they are all built.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException, ValidationError

from xpar.checks import UserError, at_least, one_of, short_list
from xpar.data.config import DataConfig, HFLabelsDataConfig, HFTextDataConfig, SyntheticDataConfig
from xpar.model import PRESETS, RECOMPUTE_MODES, ModelConfig
from xpar.moe import MoEConfig
from xpar.parallel.config import ParallelConfig
from xpar.tasks.config import FinetuneConfig, TaskConfig


def _conf_dir() -> str:
    """The Hydra config tree: the package xpar.conf (the repository's conf/, which a wheel
    ships inside xpar and an editable install maps there); in a source tree that is not
    installed, conf/ beside the package."""
    try:
        return str(Path(importlib.import_module("xpar.conf").__file__).parent)
    except ModuleNotFoundError:
        return str(Path(__file__).resolve().parent.parent / "conf")


CONF_DIR = _conf_dir()
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then a cosine (or linear, or constant) decay to
    `min_lr_ratio * lr` at `trainer.max_steps`."""

    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    schedule: str = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    fused: bool | None = None  # None: fused kernels on CUDA

    def __post_init__(self) -> None:
        at_least("optim.lr", self.lr, 0.0, strict=True)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"optim.{name}={value} must be in [0, 1)")
        at_least("optim.eps", self.eps, 0.0, strict=True)
        at_least("optim.weight_decay", self.weight_decay, 0.0)
        at_least("optim.grad_clip", self.grad_clip, 0.0)
        one_of("optim.schedule", self.schedule, SCHEDULES)
        at_least("optim.warmup_steps", self.warmup_steps, 0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainerConfig:
    """The loop: steps, evaluation, checkpoints, devices and failure handling."""

    max_steps: int = 1500
    eval_every: int = 250
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    resume: Any = False  # false | true (newest complete checkpoint in the run dir) | PATH
    device: str = "auto"
    # auto: bf16 on CUDA, fp32 on the CPU; fp16 (loss-scaled) needs deepspeed=zero1|zero2
    precision: str = "auto"
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    keep_checkpoints: int = 3  # newest N kept; 0 keeps all
    eval_batches: int | None = None  # None: the whole validation split
    overfit_batches: int = 0  # > 0: train on the first N batches over and over
    detect_anomaly: bool = False
    peak_tflops: float | None = None  # for MFU; None: looked up from the GPU's name
    progress: bool = True  # console progress bar
    # Start from these weights (a model dir, a checkpoint, or a run's checkpoints): weights
    # only, a new optimizer and schedule from step 0. None: fresh weights.
    init_from: str | None = None
    # Activation recompute: none | experts (the experts' SwiGLU activations) | full (whole
    # blocks), in every recompute_layers-th layer (0, n, 2n, ...).
    recompute: str = "none"
    recompute_layers: int = 1

    def __post_init__(self) -> None:
        at_least("trainer.max_steps", self.max_steps, 1)
        for name in ("eval_every", "save_every", "log_every", "max_bad_steps"):
            at_least(f"trainer.{name}", getattr(self, name), 1)
        at_least("trainer.keep_checkpoints", self.keep_checkpoints, 0)
        at_least("trainer.overfit_batches", self.overfit_batches, 0)
        if self.eval_batches is not None:
            at_least("trainer.eval_batches", self.eval_batches, 1)
        if self.peak_tflops is not None:
            at_least("trainer.peak_tflops", self.peak_tflops, 0.0, strict=True)
        one_of("trainer.device", self.device, DEVICES)
        one_of("trainer.precision", self.precision, PRECISIONS)
        one_of("trainer.recompute", self.recompute, RECOMPUTE_MODES)
        at_least("trainer.recompute_layers", self.recompute_layers, 1)
        if isinstance(self.resume, str) and self.resume.lower() in ("true", "false"):
            self.resume = self.resume.lower() == "true"
        if not isinstance(self.resume, bool | str) or self.resume == "":
            raise UserError(f"trainer.resume={self.resume!r} must be true, false or a path")
        if self.init_from == "":
            raise UserError("trainer.init_from='' must be a path (or null for fresh weights)")

    def precision_on(self, device_type: str) -> str:
        """`precision` with auto resolved: bf16 on CUDA, fp32 elsewhere."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if device_type == "cuda" else "fp32"


ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO (`deepspeed=none|zero1|zero2`). Stage 0 is xpar's own loop (DDP, plain
    AdamW, replicated optimizer state); stages 1 and 2 train through `deepspeed.initialize`,
    partitioning optimizer state (1) and gradients too (2) over each parameter's data-parallel
    group. Stage 3 is refused: DeepSpeed's ZeRO-3 does not take expert-parallel layers."""

    stage: int = 0
    overlap_comm: bool = False  # overlap gradient reduction with the backward pass
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000  # elements
    allgather_bucket_size: int = 500_000_000  # elements
    # fp16 (trainer.precision=fp16): dynamic loss scaling from 2**initial_scale_power.
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0

    def __post_init__(self) -> None:
        one_of("deepspeed.stage", self.stage, ZERO_STAGES)
        if self.stage == 3:
            raise UserError(
                "deepspeed=zero3 is not supported: DeepSpeed's ZeRO-3 refuses expert-parallel "
                "MoE layers; use parallel.shard=fsdp (parameters sharded too, FSDP2) or "
                "deepspeed=zero2 (gradients and optimizer state partitioned)"
            )
        for name in ("reduce_bucket_size", "allgather_bucket_size", "loss_scale_window"):
            at_least(f"deepspeed.{name}", getattr(self, name), 1)
        at_least("deepspeed.initial_scale_power", self.initial_scale_power, 0)
        at_least("deepspeed.hysteresis", self.hysteresis, 1)
        at_least("deepspeed.min_loss_scale", self.min_loss_scale, 0.0, strict=True)

    @property
    def enabled(self) -> bool:
        return self.stage > 0


LOGGERS = ("none", "wandb")
WANDB_MODES = ("auto", "online", "offline")


@dataclass
class LoggerConfig:
    """Experiment tracking beyond metrics.jsonl and the console. `mode=auto` runs wandb
    online when WANDB_API_KEY is set and offline otherwise."""

    kind: str = "none"
    project: str = "xpar"
    entity: str | None = None
    mode: str = "auto"
    tags: list[str] = field(default_factory=list)  # besides router=, ep=, zero=, experiment=
    name: str | None = None  # wandb run name; None: run_name (and the sweep job's overrides)
    group: str | None = None  # wandb group; None: the experiment, else the -m sweep
    init_timeout_s: float = 60.0  # online: how long wandb may take to reach its server

    def __post_init__(self) -> None:
        one_of("logger.kind", self.kind, LOGGERS)
        one_of("logger.mode", self.mode, WANDB_MODES)
        at_least("logger.init_timeout_s", self.init_timeout_s, 0.0, strict=True)


@dataclass
class LauncherConfig:
    """How Hydra starts jobs: `local` runs them in this process, `slurm` submits each -m job
    to Slurm (hydra-submitit-launcher), `submitit_local` runs each as local submitit tasks."""

    name: str = "local"

    def __post_init__(self) -> None:
        one_of("launcher.name", self.name, ("local", "slurm", "submitit_local"))


def _model_arch_schema() -> type:
    """ModelConfig's fields minus `moe`: on the command line the MoE layer is its own top-level
    section (`moe.top_k=4`), joined to the model when the ModelConfig is built."""
    hints = typing.get_type_hints(ModelConfig)
    fields = [
        (
            f.name,
            hints[f.name],
            field(default=MISSING if f.default is dataclasses.MISSING else f.default),
        )
        for f in dataclasses.fields(ModelConfig)
        if f.name != "moe"
    ]
    return dataclasses.make_dataclass("ModelArch", fields)


ModelArch = _model_arch_schema()


@dataclass
class TrainConfig:
    """The whole job. Building it (OmegaConf.to_object) checks every section and then the
    sections against each other, so a bad value fails before anything is written."""

    model: ModelArch = MISSING
    moe: MoEConfig | None = None
    data: DataConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    run_name: str = MISSING

    def __post_init__(self) -> None:
        name = self.run_name
        if not name or name in (".", "..") or any(sep in name for sep in "/\\"):
            raise UserError(
                f"run_name={name!r} must be a plain name, without '/', '\\' or '..' (the run "
                f"goes to runs/<run_name>/; hydra.run.dir=PATH puts a run elsewhere)"
            )
        model = self.model_config()
        if self.data.seq_len > model.max_seq_len:
            raise UserError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={model.max_seq_len}"
            )
        if self.parallel.shard == "fsdp" and self.deepspeed.enabled:
            raise UserError(
                f"parallel.shard=fsdp and deepspeed=zero{self.deepspeed.stage} are two training "
                f"backends; pick one (parallel.shard=none, or deepspeed=none)"
            )
        if self.parallel.shard == "fsdp" and self.trainer.precision == "fp16":
            raise UserError(
                "trainer.precision=fp16 is not for parallel.shard=fsdp (its loss scaling "
                "needs deepspeed=zero1|zero2); use trainer.precision=bf16|fp32|auto"
            )
        if self.trainer.precision == "fp16" and not self.deepspeed.enabled:
            raise UserError(
                "trainer.precision=fp16 needs loss scaling: use it with deepspeed=zero1|zero2, "
                "or pick trainer.precision=bf16|fp32"
            )
        if self.trainer.recompute == "experts" and model.moe is None:
            raise UserError(
                "trainer.recompute=experts recomputes MoE experts, but moe=dense has none; "
                "use trainer.recompute=full|none"
            )
        vocab = getattr(self.data, "vocab_size", None)
        if vocab is not None and vocab > model.vocab_size:
            raise UserError(f"data.vocab_size={vocab} exceeds model.vocab_size={model.vocab_size}")
        self._check_task()

    def _check_task(self) -> None:
        """The task must fit the data: labelled data (data=hf_labels) only for a task head, plain
        text only for the LM; the embedded corpus serves all three."""
        kind, data = self.task.kind, self.data
        if kind == "lm" and isinstance(data, HFLabelsDataConfig):
            raise UserError(
                "data=hf_labels holds labelled examples for task=classify|tag, not text for "
                "task=lm; use data=hf_text for a language model"
            )
        if kind != "lm" and not isinstance(data, SyntheticDataConfig | HFLabelsDataConfig):
            raise UserError(
                f"task={kind} needs labelled data: data=synthetic (the embedded corpus) or "
                f"data=hf_labels, not data={data.kind}"
            )
        if kind == "classify" and isinstance(data, SyntheticDataConfig) and data.num_domains < 2:
            raise UserError(
                f"task=classify on data=synthetic labels the domain: data.num_domains="
                f"{data.num_domains} must be >= 2"
            )
        self.finetune.monitored(self.task, floor=isinstance(data, SyntheticDataConfig))

    def model_config(self) -> ModelConfig:
        """The LM's config: the `model` section with the `moe` section as its MoE layer."""
        return ModelConfig(**dataclasses.asdict(self.model), moe=self.moe)


def model_preset_node(name: str) -> dict:
    """A model preset as the `model` and `moe` sections it sets."""
    cfg = PRESETS[name]()
    arch = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelArch)}
    # moe.d_model stays the `${model.d_model}` of conf/config.yaml, so it follows the model.
    moe = None if cfg.moe is None else dataclasses.asdict(cfg.moe)
    if moe is not None:
        del moe["d_model"]
    return {"model": arch, "moe": moe}


def checkout_readme() -> str:
    """`${xpar.readme:}`, data=local_text's default file: the README.md of the checkout this
    package runs from (a source tree or an editable install), from any directory; else (an
    installed wheel) README.md in the current directory."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    return str(readme) if readme.is_file() else "README.md"


def register_configs() -> None:
    """Put the schema and the Python-defined model presets in Hydra's ConfigStore (the data
    schemas under `schema/data`, so they do not show up as `data=` options), and the
    resolvers the YAML uses."""
    OmegaConf.register_new_resolver("xpar.readme", checkout_readme, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="schema/data", name="synthetic", node=SyntheticDataConfig)
    cs.store(group="schema/data", name="hf_text", node=HFTextDataConfig)
    cs.store(group="schema/data", name="hf_labels", node=HFLabelsDataConfig)
    for name in PRESETS:
        cs.store(group="model", name=name, node=model_preset_node(name), package="_global_")


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """The checked TrainConfig; any bad value, and any key the schema does not have (Hydra's
    `+key=value` adds one to a typed section unchecked), becomes a one-line UserError naming
    it."""
    check_known_keys(cfg)
    try:
        obj = OmegaConf.to_object(cfg)
    except (ValueError, TypeError) as e:  # a section's own check
        raise UserError(str(e)) from e
    except OmegaConfBaseException as e:  # a missing value, a wrong type
        raise UserError(schema_error(e)) from e
    assert isinstance(obj, TrainConfig)
    return obj


def check_known_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Every key of a typed section must be one of its dataclass's fields."""
    schema = OmegaConf.get_type(cfg)
    typed = dataclasses.is_dataclass(schema)
    fields = [f.name for f in dataclasses.fields(schema)] if typed else []
    for key in cfg:
        if fields and key not in fields and not (key == "hydra" and not prefix):
            raise UserError(unknown_key(f"{prefix}{key}", fields))
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing():
            check_known_keys(node, f"{prefix}{key}.")


def unknown_key(full_key: str, fields: list[str]) -> str:
    """`unknown key moe.topk (did you mean moe.top_k?)`, else the section's keys."""
    section, _, key = full_key.rpartition(".")
    where = f"{section}." if section else ""
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    hint = f"did you mean {where}{close[0]}?" if close else f"{section or 'the config'} has "
    if not close:
        hint += short_list(sorted(fields), limit=12)
    return f"unknown key {full_key} ({hint})"


def schema_error(e: OmegaConfBaseException) -> str:
    """OmegaConf's complaint about a value as one line: an unknown key, or a value of the
    wrong type with the field's type and the value given."""
    full_key = getattr(e, "full_key", None) or ""
    schema = getattr(e, "object_type", None)
    key = full_key.rpartition(".")[2]
    if isinstance(e, ConfigAttributeError) and dataclasses.is_dataclass(schema):
        return unknown_key(full_key, [f.name for f in dataclasses.fields(schema)])
    if isinstance(e, ValidationError) and dataclasses.is_dataclass(schema):
        hint = typing.get_type_hints(schema).get(key)
        value = re.match(r"Value '(.*?)'", str(e))
        if hint is not None and value:
            return f"{full_key}={value.group(1)}: {full_key} takes {type_name(hint)}"
    return str(e).splitlines()[0] + (f" ({full_key})" if full_key else "")


def type_name(hint: Any) -> str:
    """A field's type in words: `an int`, `a float or null`, `a list of str`."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in rest) + " or null"
    origin = typing.get_origin(hint)
    if origin is list:
        return f"a list of {getattr(args[0], '__name__', args[0]) if args else 'values'}"
    name = {int: "an int", float: "a float", bool: "a bool (true or false)", str: "a string"}
    return name.get(hint, f"a {getattr(hint, '__name__', hint)}")
