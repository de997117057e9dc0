"""The GPUs the planner knows: memory, dense bf16 peak and link bandwidths.

Figures are the vendors' data-sheet numbers (SXM parts, dense bf16 without sparsity); memory
is what torch reports as the device's total, not the marketing figure. Links are per GPU and
per direction: NVLink inside a node, the GPU's share of the network (one 400 Gb/s NIC per GPU
on H100/H200/B200 nodes, 200 Gb/s on A100 ones) across nodes, and PCIe to the host (Gen5 x16,
64 GB/s, for H100/H200/B200; Gen4 x16, 32 GB/s, for A100), which `parallel.offload` crosses.
Two host figures are assumptions, not data-sheet ones: `host_memory_gib`, a GPU's share of its
node's memory (2 TiB a node of 8, as in a DGX H100/H200), which the offloaded state must fit
in; and `host_adamw_gbps`, the rate, in bytes of AdamW's traffic (xpar.plan.timing), at which
the CPU steps one GPU's offloaded shards (its share of the node's memory bandwidth, through
torch's CPU AdamW with its foreach kernels). Any of them can be overridden on the command line
(`--peak-tflops`, `--memory-gib`, `--nvlink-gbps`, `--network-gbps`, `--pcie-gbps`,
`--host-memory-gib`, `--host-adamw-gbps`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from xpar.checks import UserError


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # torch.cuda.get_device_properties(...).total_memory / 2**30
    peak_tflops: float  # dense bf16 tensor-core peak
    hbm_tbps: float  # memory bandwidth, TB/s
    nvlink_gbps: float  # GB/s per GPU per direction, inside a node
    network_gbps: float  # GB/s per GPU per direction, across nodes
    pcie_gbps: float = 64.0  # GB/s per GPU per direction, to the host
    host_memory_gib: float = 256.0  # its share of the node's host memory (2 TiB a node of 8)
    host_adamw_gbps: float = 10.0  # the CPU's AdamW for one GPU's shards (assumed)

    def with_overrides(self, **values: float | None) -> GPU:
        """This GPU with the given figures replaced (None keeps the data-sheet one)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


GPUS = {
    "h200": GPU("H200", 140.4, 989.0, 4.8, 450.0, 50.0),
    "h100": GPU("H100", 79.1, 989.0, 3.35, 450.0, 50.0),
    "a100": GPU("A100-80GB", 79.2, 312.0, 2.04, 300.0, 25.0, pcie_gbps=32.0),
    "b200": GPU("B200", 178.4, 2250.0, 8.0, 900.0, 50.0),
}


def get_gpu(name: str) -> GPU:
    """The named GPU (case-insensitive), or a one-line error listing the known ones."""
    gpu = GPUS.get(name.lower())
    if gpu is None:
        raise UserError(
            f"--gpu={name} is not a GPU the planner knows ({', '.join(GPUS)}); pick one and "
            f"override its figures (--peak-tflops, --memory-gib, --nvlink-gbps, "
            f"--network-gbps) for another part"
        )
    return gpu
