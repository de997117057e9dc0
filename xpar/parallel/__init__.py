"""Expert parallelism: the process layout and its config, the all-to-all dispatcher, and
parallelize(), which applies both to a model written for one device. Needs neither Hydra nor the
trainer's config (its own config is xpar.parallel.config.ParallelConfig)."""

from xpar.parallel.config import ParallelConfig
from xpar.parallel.dispatcher import AllToAllDispatcher
from xpar.parallel.mesh import Layout, Mesh, check_layout, init_mesh
from xpar.parallel.parallelize import ParallelModel, parallelize, shard_experts

__all__ = [
    "AllToAllDispatcher",
    "Layout",
    "Mesh",
    "ParallelConfig",
    "ParallelModel",
    "check_layout",
    "init_mesh",
    "parallelize",
    "shard_experts",
]
