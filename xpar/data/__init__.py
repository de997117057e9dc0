"""Training data: the embedded synthetic corpus or text through Hugging Face datasets, served
as deterministic, resumable batches of seq_len + 1 token ids per data-parallel rank (a task's
labelled rows, xpar.tasks.rows, travel the same way). The factory that picks a source for a
job and task is xpar.training.inputs.build_data."""

from xpar.data.bundle import BatchStream, DataBundle, Sharding
from xpar.data.loader import (
    SequenceLoader,
    SequenceSource,
    TensorSequences,
    check_token_ids,
    eval_batches,
)
from xpar.data.synthetic import build_synthetic_data

__all__ = [
    "BatchStream",
    "DataBundle",
    "SequenceLoader",
    "SequenceSource",
    "Sharding",
    "TensorSequences",
    "build_synthetic_data",
    "check_token_ids",
    "eval_batches",
]
