"""launch/gpu_check.sh, the GPU acceptance in one command: its --cpu run end to end (so it
cannot rot while no GPU is at hand), and how it carries on past a step that fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from xpar.bench import gpu_check

from distributed import REPO


def test_the_cpu_run_writes_every_section_and_a_row_per_figure(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(REPO / "launch/gpu_check.sh"), "--cpu"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("gpu tests", "moe layer", "backends", "memory"):  # elapsed time per step
        assert f"== {name}: ok in " in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "out/gpu_report.jsonl").read_text().splitlines()]
    assert {r["device"] for r in rows} == {"CPU"}
    by = {}
    for r in rows:
        by.setdefault(r["check"], []).append(r)
    assert [s["ok"] for s in by["step"]] == [True] * 4
    assert by["gpu test"] and {t["outcome"] for t in by["gpu test"]} == {"skipped"}
    assert len(by["moe layer"]) == 3 * 10  # shapes a, b, c; ten rows each
    assert [b["backend"] for b in by["backends"]] == [
        "deepspeed=none", "deepspeed=zero2", "parallel.shard=fsdp"
    ]  # fmt: skip
    assert by["backends"][0]["vs_none"] == 1.0
    assert {(m["recompute"], m["micro_batch"]) for m in by["memory"]} == {
        (mode, 2) for mode in ("none", "experts", "full")
    }
    assert all(m["planned_GiB"] > 0 and m["measured_GiB"] > 0 for m in by["memory"])
    targets = [t["target"] for t in by["target"]]
    assert "ZeRO-2 tokens/s within 10% of none" in targets
    assert sum("faster than every peer row" in t for t in targets) == 3
    report = (tmp_path / "out/gpu_report.md").read_text()
    for title in ("# xpar GPU check: CPU", "## GPU tests", "## MoE layer", "## Training backends",
                  "## Memory per recompute mode", "## Log of memory"):  # fmt: skip
        assert title in report


def test_a_failed_or_overrunning_step_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    py = sys.executable
    fake = [
        gpu_check.Step("fails", [py, "-c", "print('boom'); raise SystemExit(3)"], 60),
        gpu_check.Step("hangs", [py, "-c", "import time; time.sleep(60)"], 1),
        gpu_check.Step("passes", [py, "-c", "print('fine')"], 60),
    ]
    monkeypatch.setattr(gpu_check, "steps", lambda cpu, out: fake)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--cpu"]) == 1
    assert [s.ok for s in fake] == [False, False, True]
    assert fake[0].why == "exit code 3" and "boom" in fake[0].log
    assert fake[1].why == "ran past its cap of 1 s" and fake[1].seconds < 30
    report = (tmp_path / "gpu_report.md").read_text()
    assert "| fails | FAILED: exit code 3 |" in report and "| passes | ok |" in report
    assert "No rows." in report  # the benchmarks' sections say what is missing


def test_without_a_gpu_the_full_run_is_refused_in_one_line(capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is here: the full run would start")
    assert gpu_check.main([]) == 2
    assert "xpar: error: no CUDA device; run launch/gpu_check.sh --cpu" in capsys.readouterr().out
