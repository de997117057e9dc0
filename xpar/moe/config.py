"""MoEConfig: the schema of one MoE layer, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass

from xpar.checks import at_least, one_of

ROUTERS = ("topk", "two_level")
SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("learned", "topk_sum")
DROP_POLICIES = ("position", "probs")
EXPERT_IMPLS = ("auto", "grouped_mm", "loop")


def _at_least(field: str, value: float, low: float, *, strict: bool = False) -> None:
    at_least(f"moe.{field}", value, low, strict=strict)


def _choice(field: str, value: object, valid: tuple[str, ...]) -> None:
    one_of(f"moe.{field}", value, valid)


@dataclass
class MoEConfig:
    """One MoE layer: router, capacity, experts and losses.

    Routing: `router="topk"` lets each token pick `top_k` of `num_experts` experts;
    `router="two_level"` splits the experts into `num_groups` equal groups, lets each token
    pick `top_groups` groups (by a learned group gate or by the sum of each group's best
    `group_topk_experts` expert scores) and then `top_k` experts inside those groups.

    Capacity: `capacity_factor=None` is dropless; a float gives every expert
    `max(ceil(capacity_factor * T * top_k / num_experts), min_capacity)` slots, overflow
    dropped by token position (`drop_policy="position"`) or lowest weight (`"probs"`).
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 2
    router: str = "topk"
    score_func: str = "softmax"
    norm_topk_prob: bool = False
    route_scale: float = 1.0
    jitter_eps: float = 0.0
    # two-level routing
    num_groups: int = 1
    top_groups: int = 1
    group_score: str = "learned"
    group_topk_experts: int = 2
    group_capacity_factor: float | None = None
    # capacity
    capacity_factor: float | None = None
    min_capacity: int = 4
    drop_policy: str = "position"
    pad_to_capacity: bool = False
    # losses and balancing
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0
    # experts
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False  # scale the shared expert by sigmoid(x @ g) (Qwen2-MoE)
    experts_impl: str = "auto"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _at_least("d_model", self.d_model, 1)
        _at_least("d_ff", self.d_ff, 1)
        _at_least("num_experts", self.num_experts, 1)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"moe.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]"
            )
        _choice("router", self.router, ROUTERS)
        _choice("score_func", self.score_func, SCORE_FUNCS)
        _choice("group_score", self.group_score, GROUP_SCORES)
        _choice("drop_policy", self.drop_policy, DROP_POLICIES)
        _choice("experts_impl", self.experts_impl, EXPERT_IMPLS)
        _at_least("route_scale", self.route_scale, 0.0, strict=True)
        _at_least("jitter_eps", self.jitter_eps, 0.0)
        _at_least("min_capacity", self.min_capacity, 0)
        _at_least("aux_loss_coef", self.aux_loss_coef, 0.0)
        _at_least("z_loss_coef", self.z_loss_coef, 0.0)
        _at_least("bias_update_rate", self.bias_update_rate, 0.0)
        _at_least("num_shared_experts", self.num_shared_experts, 0)
        _at_least("init_std", self.init_std, 0.0, strict=True)
        if self.capacity_factor is not None:
            _at_least("capacity_factor", self.capacity_factor, 0.0, strict=True)
        elif self.pad_to_capacity:
            raise ValueError(
                "moe.pad_to_capacity=True needs a moe.capacity_factor > 0 "
                "(dropless routing has no capacity to pad to)"
            )
        if self.shared_d_ff is not None:
            _at_least("shared_d_ff", self.shared_d_ff, 1)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError(
                "moe.shared_expert_gate=True gates the shared expert, but "
                "moe.num_shared_experts=0; set moe.num_shared_experts >= 1 or drop the gate"
            )
        if self.router == "two_level":
            self._check_groups()

    def _check_groups(self) -> None:
        _at_least("num_groups", self.num_groups, 1)
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"moe.num_experts={self.num_experts} is not divisible by "
                f"moe.num_groups={self.num_groups}"
            )
        if not 1 <= self.top_groups <= self.num_groups:
            raise ValueError(
                f"moe.top_groups={self.top_groups} must be in [1, num_groups={self.num_groups}]"
            )
        reachable = self.top_groups * self.experts_per_group
        if self.top_k > reachable:
            raise ValueError(
                f"moe.top_k={self.top_k} must be <= top_groups * experts per group = "
                f"{self.top_groups} * {self.experts_per_group} = {reachable}"
            )
        if not 1 <= self.group_topk_experts <= self.experts_per_group:
            raise ValueError(
                f"moe.group_topk_experts={self.group_topk_experts} must be in "
                f"[1, experts per group={self.experts_per_group}]"
            )
        if self.group_capacity_factor is not None:
            _at_least("group_capacity_factor", self.group_capacity_factor, 0.0, strict=True)

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the shared expert MLP (0 when there is none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_d_ff or self.num_shared_experts * self.d_ff
