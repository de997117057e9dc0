"""The MoE layer benchmark: its peers compute the same layer as xpar, and it runs end to end."""

import json
import subprocess
import sys

import pytest
import torch

from xpar.bench import a2a_estimate, peers
from xpar.bench.moe_layer import SHAPES, rows_for, xpar_config
from xpar.moe import MoELayer


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_hf_mixtral_block_with_copied_weights_matches_xpar(impl):
    layer = MoELayer(xpar_config(SHAPES["a"]))
    hf = peers.hf_mixtral_block(layer, impl)
    x = torch.randn(64, layer.cfg.d_model)
    expected, _ = layer(x)
    torch.testing.assert_close(hf(x), expected, rtol=1e-5, atol=1e-6)


DEEPSPEED_PARITY = """
import torch
from xpar.bench import a2a_estimate, peers
from xpar.bench.moe_layer import SHAPES, xpar_config
from xpar.moe import MoELayer
layer = MoELayer(xpar_config(SHAPES["c"]))  # k=4: DeepSpeed's plain top-k gate, no sampling
ds = peers.deepspeed_moe(layer, None)
x = torch.randn(128, layer.cfg.d_model)
torch.testing.assert_close(ds(x), layer(x)[0], rtol=1e-5, atol=1e-6)
print("parity ok")
"""


@pytest.mark.slow
def test_deepspeed_dropless_with_copied_weights_matches_xpar():
    # A subprocess: DeepSpeed leaves a process group behind in whatever process it ran in.
    proc = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_PARITY], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parity ok" in proc.stdout


@pytest.mark.slow
def test_benchmark_runs_every_row_on_cpu(tmp_path):
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-m", "xpar.bench.moe_layer", "--shapes", "c", "--iters", "1"]
    cmd += ["--warmup", "0", "--json", str(out), "--a2a-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == [name for name, _, _ in rows_for(SHAPES["c"])]
    for r in rows:
        assert r["note"] == "" and r["ms"] > 0 and r["tflops"] > 0, r
    assert rows[0]["vs_dense"] == 1.0
    assert "xpar dropless" in proc.stdout and "vs dense" in proc.stdout
    estimate = proc.stdout[proc.stdout.index("all-to-all estimate") :].splitlines()
    # title, header, rule; E64 flat and two-level at 1x8 (flat, rank-dedup) and 8x8 (and
    # hierarchical), E256 at 8x8; the footnote
    assert len(estimate) == 3 + 2 * (2 + 3) + 3 + 1
    assert "E256" in estimate[-2] and "| 8x8   | hierarchical |" in estimate[-2]


def test_unknown_shape_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "xpar.bench.moe_layer", "--shapes", "Z"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--shapes='Z'" in proc.stderr and "unknown shape" in proc.stderr


def test_a2a_traffic_counts_rows_per_destination_rank():
    idx_TK = torch.tensor([[0, 1, 4, 5], [0, 2, 4, 6], [1, 3, 5, 7]])  # E=8
    # EP=2 (experts 0-3 on rank 0): token 0 on rank 0, 1 on rank 1, 2 on rank 0
    flat = a2a_estimate.traffic(idx_TK, 8, 2, "flat")
    assert flat.rows_per_token == 4 and flat.off_rank_rows_per_token == 2
    dedup = a2a_estimate.traffic(idx_TK, 8, 2, "rank-dedup")
    assert dedup.rows_per_token == 2 and dedup.off_rank_rows_per_token == 1
    one_each = a2a_estimate.traffic(idx_TK, 8, 8, "rank-dedup")  # a rank per expert: no saving
    assert one_each.rows_per_token == 4 and one_each.off_rank_rows_per_token == 11 / 3
    assert dedup.gigabytes() == pytest.approx(16384 * 1 * 2048 * 2 * 4 / 1e9)
    # One node (the default): nothing crosses nodes, and hierarchical is rank-dedup.
    assert flat.off_node_rows_per_token == 0 and dedup.inter_node_gigabytes() == 0
    assert a2a_estimate.traffic(idx_TK, 8, 2, "hierarchical") == dedup
    # The older positional dedup flag (tests/test_plan.py) still reads as before.
    assert a2a_estimate.traffic(idx_TK, 8, 2, True) == dedup
    assert a2a_estimate.traffic(idx_TK, 8, 2, False) == flat


def test_a2a_inter_node_rows_of_each_dispatch_on_hand_made_routing():
    # 2 nodes x 2 ranks, E=8: experts 2r and 2r+1 on rank r; ranks 0-1 node 0, 2-3 node 1.
    idx_TK = torch.tensor(
        [
            [0, 2, 4, 5],  # from rank 0 to ranks 0, 1, 2, 2
            [4, 5, 6, 7],  # from rank 1 to ranks 2, 2, 3, 3: all on the other node
            [0, 1, 4, 5],  # from rank 2 to ranks 0, 0, 2, 2
        ]
    )

    def rows(dispatch):  # per token: (all, off-rank, off-node)
        counts = a2a_estimate.token_rows(idx_TK, 8, 4, dispatch, ranks_per_node=2)
        return [tuple(c) for c in torch.stack(counts, 1).tolist()]

    assert rows("flat") == [(4, 3, 2), (4, 4, 4), (4, 2, 2)]
    assert rows("rank-dedup") == [(3, 2, 1), (2, 2, 2), (2, 1, 1)]
    # One row to node 1's rank 2 (token 0) or 3 (token 1, local index 1), or to node 0's
    # rank 0 (token 2); then one row per destination rank, the landing rank's kept there.
    assert rows("hierarchical") == [(4, 2, 1), (3, 2, 1), (3, 1, 1)]
    mean = a2a_estimate.traffic(idx_TK, 8, 4, "hierarchical", ranks_per_node=2)
    assert mean.off_node_rows_per_token == 1
    assert mean.inter_node_gigabytes() == pytest.approx(16384 * 1 * 2048 * 2 * 4 / 1e9)


def test_a2a_traffic_rejects_a_layout_that_does_not_divide():
    idx_TK = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="ranks_per_node=3"):
        a2a_estimate.traffic(idx_TK, 8, 4, "hierarchical", ranks_per_node=3)
    with pytest.raises(ValueError, match="num_experts=8 is not divisible by ep_size=3"):
        a2a_estimate.traffic(idx_TK, 8, 3, "flat")
    with pytest.raises(ValueError, match="dispatch='node'"):
        a2a_estimate.traffic(idx_TK, 8, 4, "node")


def groups_aligned_routing(num_tokens: int, g: torch.Generator) -> torch.Tensor:
    """E=256 in 8 groups of 32: each token's 8 experts drawn uniformly from 4 random groups."""
    groups_TJ = torch.rand(num_tokens, 8, generator=g).argsort(-1)[:, :4]
    candidates_TC = (groups_TJ[:, :, None] * 32 + torch.arange(32)).flatten(1)
    pick_TK = torch.rand(num_tokens, candidates_TC.shape[1], generator=g).argsort(-1)[:, :8]
    return candidates_TC.gather(1, pick_TK)


def test_a2a_hierarchical_halves_inter_node_bytes_when_groups_are_nodes(capsys):
    idx_TK = groups_aligned_routing(8192, torch.Generator().manual_seed(0))
    layout = a2a_estimate.EIGHT_NODES  # 8 nodes x 8 ranks: node n holds group n
    _, _, hier_T = a2a_estimate.token_rows(idx_TK, 256, 64, "hierarchical", 8)
    assert hier_T.max() <= 4  # at most its 4 groups' nodes
    rows = a2a_estimate.table_rows("random E256 top-4 groups", [idx_TK], 256, (layout,))
    assert [r.dispatch for r in rows] == ["flat", "rank-dedup", "hierarchical"]
    flat, dedup, hier = rows
    ratio = hier.traffic.inter_node_gigabytes() / flat.traffic.inter_node_gigabytes()
    assert ratio <= 0.55 and hier.inter_node_vs_flat == pytest.approx(ratio)
    assert hier.traffic.off_node_rows_per_token < dedup.traffic.off_node_rows_per_token
    a2a_estimate.print_estimate(rows)
    table = capsys.readouterr().out.splitlines()
    printed = [line for line in table if line.startswith("| random")]
    assert [line.split("|")[4].strip() for line in printed] == list(a2a_estimate.DISPATCHES)
    assert float(printed[2].split("|")[-2]) == pytest.approx(ratio, abs=0.005)


def test_two_level_row_is_a_valid_config_for_every_shape():
    for shape in SHAPES.values():
        overrides = rows_for(shape)[-1][2]
        cfg = xpar_config(shape, **overrides)
        assert cfg.router == "two_level" and cfg.num_experts % cfg.num_groups == 0


def test_backends_benchmark_trains_the_same_model_three_ways_on_cpu(tmp_path):
    out = tmp_path / "backends.json"
    cmd = [sys.executable, "-m", "xpar.bench.backends", "--cpu", "--steps", "2", "--warmup", "1"]
    proc = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["deepspeed=none", "deepspeed=zero2", "parallel.shard=fsdp"]
    none, zero2, fsdp = rows.values()
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    for other in (zero2, fsdp):  # same model, data, update
        assert other["loss"] == pytest.approx(none["loss"], rel=1e-5)
    assert "parallel.shard=fsdp" in proc.stdout and "vs none" in proc.stdout
