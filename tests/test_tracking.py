"""Tracker: metrics.jsonl lines, resume truncation, heatmaps, and wandb runs (no network: wandb
runs offline, or online against a closed local port)."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from xpar.checks import UserError
from xpar.config import LoggerConfig
from xpar.training.tracking import (
    LoadHistory,
    Tracker,
    unreachable_message,
    wandb_labels,
    wandb_mode,
)

from distributed import free_port

SENTINEL = "xpar-test-key-5f0c1e7a9b3d4c2e8f6a1b0c9d8e7f6a"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_round_trips(tmp_path):
    tracker = Tracker(tmp_path, LoggerConfig(), {})
    load = [[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]
    tracker.log(1, {"loss": 2.5, "lr": np.float32(0.125), "tokens": torch.tensor(7)})
    tracker.log(2, {"loss": float("nan"), "aux": float("inf"), "ok": True, "expert_load": load})
    tracker.log(3, {"loss": None, "load_np": np.array(load)})
    tracker.finish()

    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert lines == [
        {"step": 1, "loss": 2.5, "lr": 0.125, "tokens": 7},
        {"step": 2, "loss": None, "aux": None, "ok": True, "expert_load": load},
        {"step": 3, "loss": None, "load_np": load},
    ]
    assert isinstance(lines[0]["tokens"], int)


def test_metrics_flushed_before_finish(tmp_path):
    tracker = Tracker(tmp_path, LoggerConfig(), {})
    tracker.log(5, {"loss": 1.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 5, "loss": 1.0}]
    tracker.finish()


def test_resume_drops_later_steps(tmp_path):
    tracker = Tracker(tmp_path, LoggerConfig(), {})
    for step in range(1, 7):
        tracker.log(step, {"loss": float(step)})
    tracker.finish()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # torn line from a crash

    tracker = Tracker(tmp_path, LoggerConfig(), {}, resume_step=4)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    tracker.log(5, {"loss": -5.0})
    tracker.finish()
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    assert lines[3]["loss"] == 4.0 and lines[4]["loss"] == -5.0
    assert not list(tmp_path.glob("*.tmp"))


def test_disabled_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, LoggerConfig(kind="wandb", mode="offline"), {}, enabled=False)
    tracker.log(1, {"loss": 1.0})
    assert tracker.log_expert_load(1, np.full((2, 4), 0.25), [1, 3]) is None
    tracker.finish()
    assert not run_dir.exists()


def test_expert_load_heatmap(tmp_path):
    from matplotlib import pyplot as plt
    from PIL import Image

    tracker = Tracker(tmp_path, LoggerConfig(), {})
    balanced = np.full((3, 8), 1 / 8)
    skewed = np.random.default_rng(0).dirichlet(np.full(8, 0.3), size=3)
    paths = [
        tracker.log_expert_load(s, load, [1, 3, 5]) for s, load in ((10, balanced), (20, skewed))
    ]
    tracker.finish()

    assert paths == [
        tmp_path / "plots/expert_load_step10.png",
        tmp_path / "plots/expert_load_step20.png",
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as img:
            width, height = img.size
        assert 200 <= width <= 4000 and 100 <= height <= 4000
    assert paths[0].read_bytes() != paths[1].read_bytes()
    pixels = [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths]
    assert pixels[0].shape != pixels[1].shape or np.abs(pixels[0] - pixels[1]).max() > 50
    assert plt.get_fignums() == []  # no pyplot figures left open
    with pytest.raises(ValueError, match="layer_ids"):
        Tracker(tmp_path, LoggerConfig(), {}).log_expert_load(1, balanced, [1, 3])


def test_load_history_stays_bounded_evenly_spaced_and_survives_a_resume(tmp_path):
    history = LoadHistory(max_columns=8)
    for step in range(10, 1010, 10):  # 100 logged steps
        history.add(step, [[0.75, 0.25]])
    history.add(1010, [])  # a dense model's empty load is not a column
    assert 4 < len(history.steps) <= 8 and history.steps[0] == 10
    gaps = np.diff(history.steps)
    assert (gaps == gaps[0]).all()
    assert history.loads[-1].tolist() == [[0.75, 0.25]]

    tracker = Tracker(tmp_path, LoggerConfig(), {})
    for step in (1, 2, 3):
        tracker.log(step, {"loss": 1.0, "expert_load": [[step / 4, 1 - step / 4]]})
    tracker.finish()
    resumed = Tracker(tmp_path, LoggerConfig(), {}, resume_step=2)  # step 3 is redone
    assert resumed._history.steps == [1, 2]
    resumed.log(3, {"loss": 1.0, "expert_load": [[0.5, 0.5]]})
    path = resumed.log_expert_load(3, np.array([[0.5, 0.5]]), [0])
    resumed.finish()
    assert resumed._history.steps == [1, 2, 3] and path.exists()
    assert (tmp_path / "plots/expert_load_over_time.png").stat().st_size > 0


def read_wandb_records(path: Path) -> list:
    """Records of a .wandb transaction log. wandb 0.31 reads these only in its Go core, so parse
    the format here: a 7-byte header (':W&B', magic 0xBEE1, version 0), then LevelDB-log chunks
    in 32 KiB blocks, each `crc32(type + data), length, type` (IEEE CRC), holding serialized
    `wandb_internal_pb2.Record` protos split FULL=1 or FIRST=2, MIDDLE=3, LAST=4."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, pending, off, block = [], b"", 7, 32768
    while off + 7 <= len(data):
        if block - off % block < 7:  # block trailer too short for a header: padding
            off += block - off % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[off : off + 7])
        chunk = data[off + 7 : off + 7 + length]
        off += 7 + length
        if kind == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(Record.FromString(pending))
    return records


def wandb_history(run_dir: Path) -> dict[int, dict[str, object]]:
    """{step: {key: value}} from the history records of the single offline run under run_dir."""
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history = {}
    for record in read_wandb_records(wandb_file):
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            row = {it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in items}
            history[record.history.step.num] = row
    return history


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """Keep wandb's global files (cache, config, core logs) inside the test's tmp dir."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    for var in ("WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.timeout(60)
def test_wandb_offline_keeps_key_out_and_records_metrics(wandb_env, tmp_path):
    wandb_env.setenv("WANDB_API_KEY", SENTINEL)
    run_dir = tmp_path / "run"
    cfg = LoggerConfig(kind="wandb", mode="offline", tags=["test"])
    config = {
        "run_name": "r1",
        "model": {"d_model": 32},
        "moe": {"router": "two_level"},
        "parallel": {"ep_size": 2},
        "deepspeed": {"stage": 2},
        "launch": {"world": 4, "experiment": "synthetic_two_level", "sweep": None, "job": None},
    }
    tracker = Tracker(run_dir, cfg, config)
    load = [[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]
    for step in (1, 2, 3):
        tracker.log(step, {"loss": 4.0 - step / 2, "lr": 1e-3, "expert_load": load})
    print(f"a careless script echoes WANDB_API_KEY={SENTINEL}")  # must not reach output.log
    tracker.log_expert_load(3, np.array(load), [1, 3])
    tracker.finish()
    tracker.finish()

    # (1) the key occurs in no file under run_dir (symlinks followed: wandb links its core log)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    assert any(p.suffix == ".png" and "media" in p.parts for p in files)
    for path in files:
        assert SENTINEL.encode() not in path.read_bytes(), path

    # (2) the offline run holds what was logged, at the right steps
    history = wandb_history(run_dir)
    assert {s: history[s]["loss"] for s in (1, 2, 3)} == {1: 3.5, 2: 3.0, 3: 2.5}
    assert history[2]["lr"] == pytest.approx(1e-3)
    assert history[1]["expert_load/max_over_mean/0"] == pytest.approx(2.0)
    assert history[3]["expert_load/max_over_mean/1"] == pytest.approx(1.0)
    assert history[3]["expert_load/_type"] == "image-file"  # nested keys joined by "/"
    assert not any(isinstance(v, list) for row in history.values() for v in row.values())
    run_id = (run_dir / "wandb_run_id").read_text()
    assert next(run_dir.glob("wandb/offline-run-*")).name.endswith(run_id)

    # (3) name, group and tags from the config; every metric against `step`; load over time
    assert history[3]["expert_load_over_time/_type"] == "image-file"
    assert (run_dir / "plots/expert_load_over_time.png").stat().st_size > 0
    records = read_wandb_records(next(run_dir.glob("wandb/offline-run-*/run-*.wandb")))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
    assert run.display_name == "r1" and run.run_group == "synthetic_two_level"
    assert list(run.tags) == [
        "test", "router=two_level", "ep=2", "zero=2", "experiment=synthetic_two_level", "world=4"
    ]  # fmt: skip
    metrics = {
        r.metric.name or r.metric.glob_name: r.metric for r in records if r.HasField("metric")
    }
    assert metrics["*"].step_metric == "step" and metrics["loss"].step_metric == "step"
    assert metrics["val_loss"].summary.min


@pytest.mark.timeout(60)
def test_wandb_auto_mode_without_key_is_offline(wandb_env, tmp_path):
    wandb_env.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, LoggerConfig(kind="wandb", mode="auto"), {})
    tracker.log(1, {"loss": 1.25})
    tracker.finish()
    # read at once: finish() returns only once wandb-core has written out and closed the file
    assert wandb_history(run_dir)[1]["loss"] == 1.25

    # a resumed tracker continues the same wandb run id
    first_id = (run_dir / "wandb_run_id").read_text()
    tracker = Tracker(run_dir, LoggerConfig(kind="wandb", mode="auto"), {}, resume_step=1)
    tracker.finish()
    assert (run_dir / "wandb_run_id").read_text() == first_id


@pytest.mark.timeout(120)
def test_wandb_without_a_network_fails_in_bounded_time_with_one_line(wandb_env, tmp_path, capfd):
    import wandb  # noqa: F401  (before the clock: the bound is on wandb.init, not imports)

    wandb_env.delenv("WANDB_SILENT")  # what a user sees: wandb must print nothing itself
    wandb_env.setenv("WANDB_API_KEY", SENTINEL)  # so logger.mode=auto means online
    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    run_dir = tmp_path / "run"
    cfg = LoggerConfig(kind="wandb", init_timeout_s=2.0)
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        Tracker(run_dir, cfg, {})
    elapsed = time.monotonic() - start

    message = str(error.value)
    assert "\n" not in message and SENTINEL not in message
    assert "logger.mode=offline" in message and "logger.init_timeout_s=2" in message, message
    assert "WANDB_API_KEY is set" in message and "connection refused" in message, message
    # wandb's own default waits ~95 s; the margin is for starting wandb-core on busy CPUs
    assert elapsed < cfg.init_timeout_s + 30, elapsed
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    assert not (run_dir / "wandb_run_id").exists()
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert SENTINEL.encode() not in path.read_bytes(), path

    # the process is left as it was: an offline run starts right after
    wandb_env.delenv("WANDB_API_KEY")
    Tracker(run_dir, cfg, {}).finish()
    assert (run_dir / "wandb_run_id").exists()
    assert "logger.mode=online" in unreachable_message(LoggerConfig(mode="online"), TimeoutError())


def test_wandb_labels_name_sweep_jobs_and_fall_back_to_the_sweep_group():
    launch = {"world": 1, "experiment": None, "sweep": "sweep_x", "job": "moe.top_k=1"}
    config = {"run_name": "r", "moe": None, "parallel": {"ep_size": 1}, "launch": launch}
    name, group, tags = wandb_labels(LoggerConfig(tags=["a", "zero=0"]), config, "dir")
    assert (name, group) == ("r/moe.top_k=1", "sweep_x")
    assert tags == ["a", "zero=0", "router=dense", "ep=1", "world=1"]  # no stage: no zero= twice
    own = LoggerConfig(name="mine", group="g")
    assert wandb_labels(own, config, "dir")[:2] == ("mine", "g")
    assert wandb_labels(LoggerConfig(), {}, "dir") == ("dir", None, ["router=dense"])


def test_wandb_mode_resolution(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    assert wandb_mode("online") == "online"
