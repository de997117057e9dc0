"""The process layout's config: what `parallel.*` sets on the command line, usable without the
trainer's config stack (Hydra composes it into xpar.config.TrainConfig)."""

from __future__ import annotations

from dataclasses import dataclass

from xpar.checks import UserError, at_least, one_of

SHARD_MODES = ("none", "fsdp")
A2A_MODES = ("flat", "hierarchical")


@dataclass
class ParallelConfig:
    """Process layout under torchrun: experts sharded over EP groups of `ep_size` consecutive
    ranks, dense parameters data-parallel over all ranks (see xpar.parallel.mesh)."""

    ep_size: int = 1
    # Balancing-loss statistics summed over all ranks (load balance is a property of the
    # global batch); false keeps them per rank.
    reduce_aux_stats: bool = True
    # Send a token once per destination rank and expand it to its experts there (hierarchical
    # a2a: in the hop inside a node; the hop across is once per node always). None: on for
    # two-level routing, whose groups live on ranks.
    dedup: bool | None = None
    # Ranks a node holds (consecutive ranks share a node). None: torchrun's LOCAL_WORLD_SIZE,
    # or the whole world without it.
    ranks_per_node: int | None = None
    # How tokens cross an EP group that spans nodes: flat (one all-to-all over the group), or
    # hierarchical (xpar.parallel.dispatcher: once to each node a token needs, then inside the
    # node). None: hierarchical when an EP group spans whole nodes, flat otherwise.
    a2a: str | None = None
    timeout_s: int = 600  # a collective that waits longer fails instead of hanging
    # Parameter sharding (xpar.training.fsdp): none, or fsdp (PyTorch FSDP2: dense parameters,
    # gradients and optimizer state sharded over `shard_size` ranks, expert banks over their
    # expert-data-parallel group).
    shard: str = "none"
    # Ranks a dense parameter is sharded over (consecutive: a node's GPUs), replicated across
    # the world / shard_size such groups (HSDP). None: the whole world.
    shard_size: int | None = None
    offload: bool = False  # fsdp: parameters, gradients and AdamW state kept in CPU memory
    # fsdp with gradient accumulation: reduce-scatter every micro-step's gradients into the
    # shards (a reduce-scatter per micro-step) instead of keeping the whole gradients of every
    # unit until the last micro-step (one reduce-scatter a step, whole-model gradient memory).
    reduce_micro_steps: bool = False

    def dedup_for(self, router: str) -> bool:
        """Whether a layer of this router sends each token once per rank (`dedup`, resolved)."""
        return router == "two_level" if self.dedup is None else self.dedup

    def __post_init__(self) -> None:
        at_least("parallel.ep_size", self.ep_size, 1)
        at_least("parallel.timeout_s", self.timeout_s, 1)
        if self.ranks_per_node is not None:
            at_least("parallel.ranks_per_node", self.ranks_per_node, 1)
        if self.a2a is not None:
            one_of("parallel.a2a", self.a2a, A2A_MODES)
        one_of("parallel.shard", self.shard, SHARD_MODES)
        if self.shard_size is not None:
            at_least("parallel.shard_size", self.shard_size, 1)
        for name, unset in (
            ("shard_size", None),
            ("offload", False),
            ("reduce_micro_steps", False),
        ):
            if self.shard == "none" and getattr(self, name) != unset:
                raise UserError(
                    f"parallel.{name}={getattr(self, name)} shards nothing without "
                    f"parallel.shard=fsdp; add parallel.shard=fsdp or drop parallel.{name}"
                )
