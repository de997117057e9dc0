"""The data a job trains on: the source its config names, for its task (the factory above
xpar.data, whose sources know no tasks, and xpar.tasks, whose labelled sources build on them)."""

from __future__ import annotations

from xpar.data import DataBundle, Sharding, build_synthetic_data
from xpar.data.config import DataConfig, HFLabelsDataConfig, HFTextDataConfig, SyntheticDataConfig
from xpar.tasks.config import TaskConfig
from xpar.tasks.synthetic import build_synthetic_task


def build_data(
    cfg: DataConfig, model_vocab: int, shard: Sharding, task: TaskConfig | None = None
) -> DataBundle:
    """The data bundle for `cfg` (a SyntheticDataConfig, HFTextDataConfig or, for a task,
    HFLabelsDataConfig); with a `task` other than lm, labelled rows (xpar.tasks.rows)."""
    kind = "lm" if task is None else task.kind
    if kind != "lm" and isinstance(cfg, SyntheticDataConfig):
        return build_synthetic_task(cfg, task, model_vocab, shard)
    if kind != "lm" and isinstance(cfg, HFLabelsDataConfig):
        from xpar.tasks.hf_labels import build_hf_labels  # datasets/transformers when used

        return build_hf_labels(cfg, task, model_vocab, shard)
    if isinstance(cfg, SyntheticDataConfig):
        return build_synthetic_data(cfg, model_vocab, shard)
    if isinstance(cfg, HFTextDataConfig):
        from xpar.data.hf_text import build_hf_text  # datasets/transformers load only if used

        return build_hf_text(cfg, model_vocab, shard)
    raise TypeError(f"no data source for {type(cfg).__name__}")
