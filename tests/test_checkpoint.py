"""Checkpoints: bit-exact resume, atomic saves under crashes and kills, corruption detected
before anything is loaded, no pickle, pruning and ordering."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import xpar.training.checkpoint as ckpt
from xpar.checks import UserError
from xpar.model import MoETransformerLM, get_preset
from xpar.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    match_optimizer,
    prune_checkpoints,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
FILES_PER_SAVE = 8  # seven payload files, then meta.json


def save(root, step, model, opt, sched, extra):
    sd = (model.state_dict(), opt.state_dict(), sched.state_dict())
    return save_checkpoint(root, step, *sd, extra)


def load(path, model, opt, sched) -> dict:
    ck = load_checkpoint(path, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    model.load_state_dict(ck.model_state)
    opt.load_state_dict(match_optimizer(ck, opt))
    sched.load_state_dict(ck.scheduler_state)
    return ck.extra


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 4)


def make_run(seed: int = 0, d_ff: int | None = None):
    """Tiny MoE LM (router jitter draws from the RNG; balancing biases move), AdamW in two
    groups as the trainer builds them, and a LambdaLR warmup."""
    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    cfg.moe = dataclasses.replace(cfg.moe, bias_update_rate=1e-2, jitter_eps=1e-2)
    if d_ff is not None:
        cfg.moe = dataclasses.replace(cfg.moe, d_ff=d_ff)
    model = MoETransformerLM(cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup)


def train(model, opt, sched, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 256, (2, 17))
        loss = model(tokens[:, :-1], tokens[:, 1:]).total_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        model.update_expert_bias()
        losses.append(loss.item())
    return losses


def rng_probe() -> tuple:
    return torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist()


def snapshot(model, opt) -> tuple[dict, dict]:
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in opt.state_dict()["state"].items()
    }
    return model_sd, opt_state


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same_state(a[k], b[k])
        else:
            assert a[k] == b[k], k


def file_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture
def saved(tmp_path):
    """A run trained 2 steps and saved at step 2: (root, checkpoint path)."""
    root = tmp_path / "checkpoints"
    model, opt, sched = make_run()
    train(model, opt, sched, 2)
    return root, save(root, 2, model, opt, sched, {"step": 2})


def test_resume_is_bit_exact(tmp_path):
    root = tmp_path / "checkpoints"
    model, opt, sched = make_run(seed=0)
    train(model, opt, sched, 3)
    extra = {"step": 3, "loader": {"epoch": 0, "position": 6}, "tokens_seen": 96}
    path = save(root, 3, model, opt, sched, extra)
    model_sd, opt_state = snapshot(model, opt)
    probe = rng_probe()
    losses = train(model, opt, sched, 4)
    final_sd, final_opt = snapshot(model, opt)

    model2, opt2, sched2 = make_run(seed=1)  # different init: the load must overwrite it
    assert load(path, model2, opt2, sched2) == extra
    assert_same_state(snapshot(model2, opt2)[0], model_sd)
    assert_same_state(snapshot(model2, opt2)[1], opt_state)
    assert sched2.state_dict() == json.loads((path / "scheduler.json").read_text())
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)
    assert rng_probe() == probe
    assert train(model2, opt2, sched2, 4) == losses
    assert_same_state(snapshot(model2, opt2)[0], final_sd)
    assert_same_state(snapshot(model2, opt2)[1], final_opt)
    assert sched2.get_last_lr() == sched.get_last_lr()
    biases = [k for k in final_sd if k.endswith("expert_bias")]
    assert biases and all(final_sd[k].abs().sum() > 0 for k in biases)


def test_no_pickle(saved):
    _, path = saved
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted([*ckpt._FILES, "meta.json"])
    for p in path.iterdir():
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", p.name  # pickle protocol 2+ / torch zip
        if p.suffix == ".json":
            json.loads(p.read_text())
    source = Path(ckpt.__file__).read_text()
    assert not re.search(r"torch\.(load|save)\(|import pickle|pickle\.|weights_only", source)


def test_crash_mid_save_keeps_previous(saved, monkeypatch):
    root, first = saved
    model, opt, sched = make_run(seed=3)
    real = ckpt.write_file
    calls = []

    def failing(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            path.write_bytes(b"partial")
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(ckpt, "write_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save(root, 4, model, opt, sched, {"step": 4})
    assert sorted(p.name for p in root.iterdir()) == ["step_2"]
    assert latest_checkpoint(root) == first
    assert load(first, model, opt, sched) == {"step": 2}


def test_failed_replace_keeps_same_step(saved, monkeypatch):
    root, path = saved
    before = file_bytes(path)
    model, opt, sched = make_run(seed=3)
    real = os.replace

    def failing(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="rename failed"):
        save(root, 2, model, opt, sched, {"step": 2, "again": True})
    monkeypatch.undo()
    assert latest_checkpoint(root) == path and file_bytes(path) == before
    save(root, 2, model, opt, sched, {"step": 2, "again": True})
    assert sorted(p.name for p in root.iterdir()) == ["step_2"]  # leftovers cleaned up
    model2, opt2, sched2 = make_run(seed=4)
    assert load(path, model2, opt2, sched2) == {"step": 2, "again": True}
    assert_same_state(model2.state_dict(), model.state_dict())


CHILD = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import xpar.training.checkpoint as ckpt
from test_checkpoint import make_run, train

real, calls = ckpt.write_file, []

def killing(path, data):
    calls.append(path.name)
    if len(calls) == {kill_at}:
        path.write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)

ckpt.write_file = killing
model, opt, sched = make_run(seed=0)
states = lambda: (model.state_dict(), opt.state_dict(), sched.state_dict())
root = Path({root!r})
ckpt.save_checkpoint(root, 1, *states(), {{"step": 1}})
train(model, opt, sched, 1)
ckpt.save_checkpoint(root, 2, *states(), {{"step": 2}})
"""


@pytest.mark.parametrize("kill_at", [FILES_PER_SAVE + 1, 2 * FILES_PER_SAVE])
def test_sigkill_mid_save_keeps_previous(tmp_path, kill_at):
    """A process killed while writing the second checkpoint's first file, or its meta.json."""
    root = tmp_path / "checkpoints"
    code = CHILD.format(tests=str(REPO / "tests"), kill_at=kill_at, root=str(root))
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE)
    _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert sorted(p.name for p in root.iterdir()) == [f".tmp-step_2-{child.pid}", "step_1"]
    assert latest_checkpoint(root) == root / "step_1"
    model, opt, sched = make_run(seed=1)
    assert load(root / "step_1", model, opt, sched) == {"step": 1}
    assert_same_state(model.state_dict(), make_run(seed=0)[0].state_dict())
    save(root, 2, model, opt, sched, {"step": 2})
    assert sorted(p.name for p in root.iterdir()) == ["step_1", "step_2"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_file_is_reported_and_left_alone(saved, damage):
    _, path = saved
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 100]
    target.write_bytes(bytes(data))
    before = file_bytes(path)
    model, opt, sched = make_run(seed=1)
    untouched = snapshot(model, opt)
    with pytest.raises(UserError, match=r"model\.safetensors") as err:
        load(path, model, opt, sched)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "incomplete or corrupt" in msg
    assert ("sha256 mismatch" if damage == "flip" else "bytes, expected") in msg
    assert file_bytes(path) == before
    assert_same_state(snapshot(model, opt)[0], untouched[0])
    assert opt.state_dict()["state"] == {}


def test_missing_meta_or_path(saved):
    root, path = saved
    (path / "meta.json").unlink()
    assert latest_checkpoint(root) is None
    with pytest.raises(UserError, match="has no meta.json"):
        load(path, *make_run())
    with pytest.raises(UserError, match="does not exist"):
        load(root / "step_99", *make_run())
    prune_checkpoints(root, keep=1)
    assert path.is_dir()  # an uncommitted dir is not prune's to delete


def test_wrong_model_or_optimizer(saved):
    _, path = saved
    model, opt, sched = make_run(d_ff=32)
    with pytest.raises(UserError, match="does not match the model") as err:
        load(path, model, opt, sched)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "experts.w1" in msg and "(8, 64, 64)" in msg
    model, _, sched = make_run()
    one_group = torch.optim.AdamW(model.parameters())
    with pytest.raises(UserError, match="does not match the optimizer"):
        load(path, model, one_group, sched)


def test_non_json_extra_leaves_nothing(saved):
    root, path = saved
    before = file_bytes(path)
    with pytest.raises(TypeError, match="trainer extra state"):
        save(root, 3, *make_run(), {"step": torch.tensor(3)})
    assert sorted(p.name for p in root.iterdir()) == ["step_2"]
    assert file_bytes(path) == before


def test_latest_orders_numerically_and_prune_keeps_newest(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root) is None
    model, opt, sched = make_run()
    for step in (9, 10, 2, 1):
        save(root, step, model, opt, sched, {"step": step})
    leftover = root / ".tmp-step_11-12345"
    leftover.mkdir()
    (leftover / "meta.json").write_text(json.dumps({"files": {}}))
    (root / "step_12").mkdir()  # no meta.json
    assert latest_checkpoint(root) == root / "step_10"
    prune_checkpoints(root, keep=0)
    assert len(list(root.glob("step_*"))) == 5
    prune_checkpoints(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [
        ".tmp-step_11-12345",
        "step_10",
        "step_12",
        "step_9",
    ]
    assert load(root / "step_9", *make_run()) == {"step": 9}
    save(root, 13, model, opt, sched, {"step": 13})
    assert not leftover.exists() and latest_checkpoint(root) == root / "step_13"
