"""The MoE layer: routers, dispatcher, grouped experts."""

from xpar.moe.config import MoEConfig
from xpar.moe.dispatcher import DispatchContext, LocalDispatcher, expert_capacity, route_slots
from xpar.moe.experts import GroupedExperts, SwiGLU
from xpar.moe.layer import MoEAux, MoELayer
from xpar.moe.router import RouterOutput, TopKRouter
from xpar.moe.two_level import TwoLevelRouter

__all__ = [
    "DispatchContext",
    "GroupedExperts",
    "LocalDispatcher",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "RouterOutput",
    "SwiGLU",
    "TopKRouter",
    "TwoLevelRouter",
    "expert_capacity",
    "route_slots",
]
