"""SwiGLU experts: a dense SwiGLU MLP and a bank of E experts run as grouped GEMMs.

Legend: N routed rows (grouped by expert), D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP: w2(silu(w1 x) * w3 x). Used for dense FFNs and shared experts."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate proj
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up proj
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down proj

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _gmm(x_ND: Tensor, w_EOI: Tensor, offs_E: Tensor) -> Tensor:
    """Row groups of x times each expert's w^T; w is stored [E, out, in] so its transpose
    is the column-major operand the CUDA kernel wants."""
    return F.grouped_mm(x_ND, w_EOI.to(x_ND.dtype).transpose(-2, -1), offs=offs_E)


class GroupedExperts(nn.Module):
    """E SwiGLU experts over rows already grouped by expert.

    `forward(x_ND, tokens_per_expert_E)`: rows [0, c0) go to expert 0, the next c1 to
    expert 1, and so on. Rows past the sum of the counts are padding: their outputs are finite
    but unspecified, and callers give them zero weight (so they also send back zero
    gradients). On CUDA with bf16 the three expert matmuls run as grouped GEMMs with no host
    synchronisation; elsewhere a per-expert loop computes the same thing.

    Under expert parallelism a rank holds experts [first_expert, first_expert + num_experts)
    of the layer's global bank.
    """

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, impl: str = "auto", first_expert: int = 0
    ) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff, self.impl = num_experts, d_model, d_ff, impl
        self.first_expert = first_expert
        self.w1 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal(0, std) weights (w2: out_std), drawn expert by expert from a generator seeded
        by one draw of the global RNG plus the expert's global id: an expert gets the same
        weights whichever rank holds it, and the global RNG advances the same on every rank."""
        if self.w1.is_meta:  # materialised and initialised later (to_empty, init_weights)
            return
        seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        out_std = std if out_std is None else out_std
        for e in range(self.num_experts):
            gen = torch.Generator(self.w1.device).manual_seed(seed + self.first_expert + e)
            self.w1[e].normal_(0.0, std, generator=gen)
            self.w3[e].normal_(0.0, std, generator=gen)
            self.w2[e].normal_(0.0, out_std, generator=gen)

    def extra_repr(self) -> str:
        experts = f"{self.num_experts}"
        if self.first_expert:
            experts += f" (global {self.first_expert}..{self.first_expert + self.num_experts - 1})"
        return f"num_experts={experts}, d_model={self.d_model}, d_ff={self.d_ff}"

    @staticmethod
    def compute_dtype(x_ND: Tensor) -> torch.dtype:
        """The matmul dtype: autocast's when it is on (grouped_mm is not autocast-aware)."""
        device_type = x_ND.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return x_ND.dtype

    def use_grouped_mm(self, x_ND: Tensor) -> bool:
        if self.impl == "auto":
            return x_ND.is_cuda and self.compute_dtype(x_ND) == torch.bfloat16
        return self.impl == "grouped_mm"

    def forward(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        if self.use_grouped_mm(x_ND):
            return self._forward_grouped(x_ND, tokens_per_expert_E)
        return self._forward_loop(x_ND, tokens_per_expert_E)

    def _forward_grouped(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        x_ND = x_ND.to(self.compute_dtype(x_ND))
        offs_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        # The kernel leaves rows past offs[-1] unwritten (garbage, NaN included) in both
        # passes, so the last expert takes the padding rows: finite, and cheaper than masking.
        offs_E = torch.cat([offs_E[:-1], offs_E.new_full((1,), x_ND.shape[0])])
        h_NF = F.silu(_gmm(x_ND, self.w1, offs_E)) * _gmm(x_ND, self.w3, offs_E)
        return _gmm(h_NF, self.w2, offs_E)

    def _forward_loop(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        # Host-side counts: fine on CPU, and the fallback for dtypes the kernel lacks.
        counts = tokens_per_expert_E.tolist()
        num_padding = x_ND.shape[0] - sum(counts)
        *x_per_expert, _ = x_ND.split(counts + [num_padding])
        # unbind, not w[e]: its backward is one stack instead of E zero-filled full copies.
        weights = (w.to(x_ND.dtype).unbind(0) for w in (self.w1, self.w3, self.w2))
        outs = [
            (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
            for x, w1, w3, w2 in zip(x_per_expert, *weights, strict=True)
        ]
        # Every expert, idle ones too, took part above, so each gets a (zero) gradient.
        return torch.cat(outs + [x_ND.new_zeros(num_padding, self.d_model)])
