"""Expert parallelism: the process layout, the all-to-all dispatcher, and parallelize(), which
applies both to a model written for one device."""

from xpar.parallel.dispatcher import AllToAllDispatcher
from xpar.parallel.mesh import Layout, Mesh, check_layout, init_mesh
from xpar.parallel.parallelize import ParallelModel, parallelize, shard_experts

__all__ = [
    "AllToAllDispatcher",
    "Layout",
    "Mesh",
    "ParallelModel",
    "check_layout",
    "init_mesh",
    "parallelize",
    "shard_experts",
]
