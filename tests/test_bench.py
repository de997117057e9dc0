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
    assert len(estimate) == 3 + 6  # title, header, rule; flat x2 EP x (dedup or not), two-level
    assert "two-level" in estimate[-1] and "|  64 |" in estimate[-1]


def test_unknown_shape_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "xpar.bench.moe_layer", "--shapes", "Z"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--shapes='Z'" in proc.stderr and "unknown shape" in proc.stderr


def test_traffic_counts_rows_per_destination_rank():
    idx_TK = torch.tensor([[0, 1, 4, 5], [0, 2, 4, 6], [1, 3, 5, 7]])  # E=8
    # EP=2 (experts 0-3 on rank 0): token 0 on rank 0, 1 on rank 1, 2 on rank 0
    flat = a2a_estimate.traffic(idx_TK, 8, 2, dedup=False)
    assert flat.rows_per_token == 4 and flat.off_rank_rows_per_token == 2
    dedup = a2a_estimate.traffic(idx_TK, 8, 2, dedup=True)
    assert dedup.rows_per_token == 2 and dedup.off_rank_rows_per_token == 1
    one_each = a2a_estimate.traffic(idx_TK, 8, 8, dedup=True)  # a rank per expert: no saving
    assert one_each.rows_per_token == 4 and one_each.off_rank_rows_per_token == 11 / 3
    assert dedup.gigabytes() == pytest.approx(16384 * 1 * 2048 * 2 * 4 / 1e9)


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
