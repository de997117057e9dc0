"""One rank of the expert-parallel layer parity check (run by test_parallel_layer.py).

Every rank builds the same global MoE layer, keeps its experts, and runs its own batch; the
outputs and all gradients must equal the single-process layer run on each rank's batch with
the same weights (per-rank capacity), which for dropless routing is the layer run on the union
of all batches.

    python ep_layer_check.py EP_SIZE [RANKS_PER_NODE ...]

With RANKS_PER_NODE the cases run again with the hierarchical dispatcher, the EP group's ranks
placed on nodes of that many ranks (a layout the machine need not have: it is only where the
hops' groups are cut), and its traffic per link class is counted against the routing.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

from xpar.config import ParallelConfig
from xpar.moe import MoEConfig, MoELayer
from xpar.parallel.dispatcher import AllToAllDispatcher
from xpar.parallel.mesh import EPNodes, ep_nodes, init_mesh
from xpar.parallel.parallelize import shard_experts

RTOL, ATOL = 1e-5, 1e-6
T, D = 24, 16
ROUTINGS = {
    "topk": dict(router="topk", top_k=3),
    "two_level": dict(router="two_level", num_groups=4, top_groups=2, top_k=3),
    "group_limited": dict(
        router="two_level", num_groups=4, top_groups=2, top_k=2, group_score="topk_sum"
    ),
}


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def batches(world: int, skewed: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    xs = [torch.randn(T, D, generator=gen) for _ in range(world)]
    if skewed:  # x[:, 0] > 0 everywhere: with the gate below, every token picks experts 0..k-1
        xs = [x.abs() + 0.5 for x in xs]
    return xs


def build(cfg: MoEConfig, skewed: bool) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    if skewed:  # experts 0..k-1 (group 0) win for every token with x[:, 0] > 0
        with torch.no_grad():
            for gate in (layer.router.gate, getattr(layer.router, "group_gate", None)):
                if gate is not None:
                    gate.weight.mul_(0.01)
                    gate.weight[: cfg.top_k, 0] = 10.0 + torch.arange(cfg.top_k, 0, -1.0)
    return layer


def reference(layer: MoELayer, xs, gs):
    """Single process: each rank's batch through the layer, gradients of sum_r <out_r, g_r>."""
    outs, x_grads = [], []
    for x, g in zip(xs, gs, strict=True):
        x = x.clone().requires_grad_()
        out, _ = layer(x)
        (out * g).sum().backward()
        outs.append(out.detach())
        x_grads.append(x.grad)
    return outs, x_grads


def check_case(
    name: str, routing: dict, cf, skewed: bool, mesh, dedup: bool, nodes: EPNodes | None = None
) -> None:
    layout = mesh.layout
    if skewed:  # all on rank 0, which holds experts 0 and 1 at EP=4 (group 0)
        routing = (
            {**routing, "top_k": 2, "top_groups": 1}
            if "top_groups" in routing
            else {**routing, "top_k": 2}
        )
    cfg = MoEConfig(d_model=D, d_ff=12, num_experts=8, capacity_factor=cf, **routing)
    ref = build(cfg, skewed)
    ep = copy.deepcopy(ref)
    shard_experts(ep, layout)
    ep.dispatcher = AllToAllDispatcher(cfg, mesh.ep_group, layout.ep_size, dedup=dedup, nodes=nodes)
    xs = batches(layout.world, skewed)
    gen = torch.Generator().manual_seed(99)
    gs = [torch.randn(T, D, generator=gen) for _ in range(layout.world)]
    ref_outs, ref_x_grads = reference(ref, xs, gs)
    if cf is None:  # dropless: the same as one pass over the union of the batches
        union, _ = copy.deepcopy(ref)(torch.cat(xs))
        close(torch.cat(ref_outs), union.detach(), f"{name} union")
    x = xs[layout.rank].clone().requires_grad_()
    out, aux = ep(x)
    (out * gs[layout.rank]).sum().backward()
    r = layout.rank
    close(out.detach(), ref_outs[r], f"{name} out")
    close(x.grad, ref_x_grads[r], f"{name} x.grad")
    for pname, p in ep.named_parameters():
        grad = p.grad.clone()
        ref_grad = dict(ref.named_parameters())[pname].grad
        if pname.startswith("experts."):
            dist.all_reduce(grad, group=mesh.edp_group)  # its EDP replicas saw other batches
            lo = layout.ep_rank * ep.experts.num_experts
            ref_grad = ref_grad[lo : lo + ep.experts.num_experts]
        else:
            dist.all_reduce(grad)  # dense: each rank saw its own batch
        close(grad, ref_grad, f"{name} grad {pname}")
    if skewed and layout.ep_rank * ep.experts.num_experts >= cfg.top_k:  # no token came:
        # the experts' gradients are zeros, not None
        assert all(torch.count_nonzero(p.grad) == 0 for p in ep.experts.parameters()), name
    ref_drops = [ref(x_)[1].dropped_fraction for x_ in xs]
    assert abs(aux.dropped_fraction - ref_drops[r]) < 1e-6, (name, aux.dropped_fraction)
    if dedup and nodes is None:
        check_dedup(name, ep, xs[r], aux)
    if nodes is not None and cf is None:
        check_links(name, ep, xs, aux, layout, nodes)


def check_dedup(name, layer, x, aux) -> None:
    """Rows sent = distinct (token, destination rank) pairs among kept slots."""
    r = layer.router(x)
    X = layer.dispatcher.local_experts
    dest = r.topk_idx_TK // X
    pairs = {(t, int(d)) for t in range(dest.shape[0]) for d in dest[t]}
    if layer.cfg.capacity_factor is None:
        assert aux.a2a.rows == len(pairs), (name, aux.a2a.rows, len(pairs))
        assert aux.a2a.pair_rows == dest.numel(), name
    assert aux.a2a.rows <= aux.a2a.pair_rows, name


def check_links(name, layer, xs, aux, layout, nodes: EPNodes) -> None:
    """Rows per link class equal the routing's count. Inter-node: flat sends one row per
    (token, rank) pair (dedup) or slot off the node, hierarchical one per distinct other node
    a token needs. Intra-node (hierarchical): this rank forwards, for every token of the ranks
    sharing its local index, one row per rank of its node other than itself (dedup) or slot."""
    X, L, P = layer.dispatcher.local_experts, nodes.per_node, layout.ep_size
    dedup = layer.dispatcher.dedup
    node_of = nodes.node_of
    me = layout.ep_rank
    base = layout.rank - me

    def ranks(x):
        return layer.router(x).topk_idx_TK // X

    rank_TK = ranks(xs[layout.rank])
    if not nodes.hierarchical:
        off = [node_of[p] != node_of[me] for p in range(P)]
        if dedup:
            inter = sum(sum(off[int(p)] for p in set(row.tolist())) for row in rank_TK)
        else:
            inter = sum(off[int(p)] for p in rank_TK.flatten())
        assert aux.a2a.inter_rows == inter, (name, aux.a2a.inter_rows, inter)
        return
    node_TK = rank_TK // L
    touched = [set(row.tolist()) - {me // L} for row in node_TK]
    inter = sum(len(t) for t in touched)
    assert aux.a2a.inter_rows == inter, (name, aux.a2a.inter_rows, inter)
    cfg = layer.cfg
    if cfg.router == "two_level" and cfg.num_groups % (P // L) == 0:  # groups on nodes
        top = cfg.top_groups
        assert all(len(set(row.tolist())) <= top for row in node_TK), name
    intra = 0
    for src in range(me % L, P, L):  # the ranks that forward through this one
        for row in ranks(xs[base + src]).tolist():
            mine = [p for p in row if p // L == me // L and p != me]
            intra += len(set(mine)) if dedup else len(mine)
    assert aux.a2a.intra_rows == intra, (name, aux.a2a.intra_rows, intra)


def check_empty_rank(mesh, nodes: EPNodes | None = None) -> None:
    """The last rank has no token at all: it still joins every exchange, sends and receives
    what it must, and its outputs are empty; everyone else matches the reference."""
    layout = mesh.layout
    cfg = MoEConfig(d_model=D, d_ff=12, num_experts=8, top_k=2)
    ref = build(cfg, skewed=False)
    ep = copy.deepcopy(ref)
    shard_experts(ep, layout)
    ep.dispatcher = AllToAllDispatcher(cfg, mesh.ep_group, layout.ep_size, nodes=nodes)
    xs = batches(layout.world, skewed=False)
    xs[-1] = xs[-1][:0]
    gs = [torch.randn_like(x) for x in xs]
    ref_outs, ref_x_grads = reference(ref, xs, gs)
    x = xs[layout.rank].clone().requires_grad_()
    out, _ = ep(x)
    (out * gs[layout.rank]).sum().backward()
    close(out.detach(), ref_outs[layout.rank], "empty rank out")
    close(x.grad, ref_x_grads[layout.rank], "empty rank x.grad")
    for p in ep.experts.parameters():
        assert p.grad is not None


def check_global_aux(mesh) -> None:
    """With the balancing statistics summed over ranks, the ranks' mean aux loss and its
    gradient equal the single-process layer's on the union of the batches."""
    layout = mesh.layout
    cfg = MoEConfig(d_model=D, d_ff=12, num_experts=8, top_k=2)
    ref = build(cfg, skewed=False)
    ep = copy.deepcopy(ref)
    shard_experts(ep, layout)
    ep.dispatcher = AllToAllDispatcher(
        cfg, mesh.ep_group, layout.ep_size, stats_group=dist.group.WORLD
    )
    xs = batches(layout.world, skewed=False)
    _, ref_aux = ref(torch.cat(xs))
    ref_aux.aux_loss.backward()
    _, aux = ep(xs[layout.rank])
    (aux.aux_loss / layout.world).backward()
    mean = aux.aux_loss.detach().clone()
    dist.all_reduce(mean)
    close(mean / layout.world, ref_aux.aux_loss.detach(), "global aux value")
    grad = ep.router.gate.weight.grad.clone()
    dist.all_reduce(grad)
    close(grad, ref.router.gate.weight.grad, "global aux gradient")


def run_cases(mesh, nodes: EPNodes | None, tag: str) -> None:
    for name, routing in ROUTINGS.items():
        for cf in (None, 1.0):
            for skewed in (False, True):
                for dedup in (False, True):
                    case = f"{tag}{name} cf={cf} skewed={skewed} dedup={dedup}"
                    check_case(case, routing, cf, skewed, mesh, dedup, nodes)
    check_empty_rank(mesh, nodes)


def main() -> None:
    ep_size, per_node = int(sys.argv[1]), [int(a) for a in sys.argv[2:]]
    moe = MoEConfig(d_model=D, d_ff=12, num_experts=8, **ROUTINGS["two_level"])
    mesh = init_mesh(ParallelConfig(ep_size=ep_size), moe, torch.device("cpu"))
    if not per_node:
        run_cases(mesh, None, "")
    check_global_aux(mesh)
    for L in per_node:
        run_cases(mesh, ep_nodes(mesh.layout, L, hierarchical=False), f"flat {L}/node: ")
        run_cases(mesh, ep_nodes(mesh.layout, L, hierarchical=True), f"hierarchical {L}/node: ")
    dist.barrier()
    dist.destroy_process_group()  # gloo's threads torn down here, not at interpreter exit
    print(f"rank {mesh.layout.rank}: all cases match")


if __name__ == "__main__":
    main()
