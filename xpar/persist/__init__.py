"""Everything xpar writes to disk and reads back: one atomic directory writer (staged), artefacts
that describe themselves (describe, artefact: model dirs and checkpoints alike), tensors sharded
the way the run is (sharded, fragments: through torch.distributed.checkpoint's safetensors
storage), training checkpoints (checkpoint), and the first format's model dirs (legacy).
Nothing is loaded through pickle."""

from xpar.persist.artefact import (
    Artefact,
    ModelFiles,
    open_artefact,
    read_model,
    read_model_info,
    resolve_source,
    save_tokenizer,
    write_model_dir,
)
from xpar.persist.describe import Description, TaskInfo, TensorInfo
from xpar.persist.sharded import Fragment
from xpar.persist.staged import Staged, check_out_dir

__all__ = [
    "Artefact",
    "Description",
    "Fragment",
    "ModelFiles",
    "Staged",
    "TaskInfo",
    "TensorInfo",
    "check_out_dir",
    "open_artefact",
    "read_model",
    "read_model_info",
    "resolve_source",
    "save_tokenizer",
    "write_model_dir",
]
