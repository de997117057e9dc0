"""The process layout's config: what `parallel.*` sets on the command line, usable without the
trainer's config stack (Hydra composes it into xpar.config.TrainConfig)."""

from __future__ import annotations

from dataclasses import dataclass

from xpar.checks import at_least


@dataclass
class ParallelConfig:
    """Process layout under torchrun: experts sharded over EP groups of `ep_size` consecutive
    ranks, dense parameters data-parallel over all ranks (see xpar.parallel.mesh)."""

    ep_size: int = 1
    # Balancing-loss statistics summed over all ranks (load balance is a property of the
    # global batch); false keeps them per rank.
    reduce_aux_stats: bool = True
    # Send a token once per destination rank and expand it to its experts there. None: on for
    # two-level routing, whose groups live on ranks.
    dedup: bool | None = None
    timeout_s: int = 600  # a collective that waits longer fails instead of hanging

    def dedup_for(self, router: str) -> bool:
        """Whether a layer of this router sends each token once per rank (`dedup`, resolved)."""
        return router == "two_level" if self.dedup is None else self.dedup

    def __post_init__(self) -> None:
        at_least("parallel.ep_size", self.ep_size, 1)
        at_least("parallel.timeout_s", self.timeout_s, 1)
