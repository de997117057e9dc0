"""Checkpoints in one process: bit-exact resume, atomic saves under failures and kills,
corruption detected before anything is loaded, no pickle, what a checkpoint says it holds,
pruning and ordering. (Sharded saves over several processes: tests/test_sharded.py.)"""

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

from xpar.checks import UserError
from xpar.config import OptimConfig
from xpar.model import MoETransformerLM, get_preset
from xpar.parallel import Mesh, ParallelConfig, parallelize
from xpar.persist import checkpoint as ckpt
from xpar.persist.describe import TaskInfo
from xpar.training.checkpointing import Checkpoints
from xpar.training.optim import build_scheduler, load_scheduler
from xpar.training.plain import PlainBackend

REPO = Path(__file__).resolve().parents[1]
PERSIST = REPO / "xpar" / "persist"


@dataclasses.dataclass
class Run:
    """A tiny MoE LM (router jitter draws from the RNG; balancing biases move) with xpar's
    plain backend and schedule, saved and loaded as the trainer does."""

    backend: PlainBackend
    scheduler: torch.optim.lr_scheduler.LambdaLR
    checkpoints: Checkpoints

    @property
    def model(self) -> MoETransformerLM:
        return self.backend.pm.module

    def train(self, steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            tokens = torch.randint(0, 256, (2, 17))
            with self.backend.micro_step(last=True) as module:
                out = module(tokens[:, :-1], tokens[:, 1:])
                self.backend.backward(out.total_loss)
            self.backend.clip_grad_norm()
            self.backend.step(True, True)
            self.scheduler.step()
            self.backend.pm.update_expert_bias()
            losses.append(out.loss.item())
        return losses

    def save(self, step: int, **extra) -> Path:
        state = {"step": step, "scheduler": self.scheduler.state_dict(), **extra}
        return self.checkpoints.save(step, self.backend, TaskInfo(), state)

    def load(self, path: Path) -> dict:
        state = self.checkpoints.load(path, self.backend, TaskInfo())
        load_scheduler(self.scheduler, state["scheduler"])
        return state


def make_run(root: Path, seed: int = 0, d_ff: int | None = None, train: str = "all") -> Run:
    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    cfg.moe = dataclasses.replace(cfg.moe, bias_update_rate=1e-2, jitter_eps=1e-2)
    if d_ff is not None:
        cfg.moe = dataclasses.replace(cfg.moe, d_ff=d_ff)
    pm = parallelize(MoETransformerLM(cfg), Mesh.solo(), ParallelConfig(), train=train)
    optim = OptimConfig(lr=1e-3, warmup_steps=4)
    backend = PlainBackend(pm, optim, None)
    scheduler = build_scheduler(backend.optimizer, optim, total_steps=20)
    return Run(backend, scheduler, Checkpoints(root.parent, pm, cfg, None, keep=0))


def rng_probe() -> tuple:
    return torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist()


def snapshot(run: Run) -> tuple[dict, dict]:
    model_sd = {k: v.clone() for k, v in run.model.state_dict().items()}
    opt_state = {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in run.backend.optimizer.state_dict()["state"].items()
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
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture
def saved(tmp_path):
    """A run trained 2 steps and saved at step 2: (root, checkpoint path)."""
    root = tmp_path / "checkpoints"
    run = make_run(root)
    run.train(2)
    return root, run.save(2)


def test_resume_is_bit_exact(tmp_path):
    root = tmp_path / "checkpoints"
    run = make_run(root, seed=0)
    run.train(3)
    extra = {"loader": {"epoch": 0, "position": 6}, "tokens_seen": 96}
    path = run.save(3, **extra)
    model_sd, opt_state = snapshot(run)
    schedule = run.scheduler.state_dict()
    probe = rng_probe()
    losses = run.train(4)
    final_sd, final_opt = snapshot(run)

    again = make_run(root, seed=1)  # different init: the load must overwrite it
    state = again.load(path)
    assert {k: state[k] for k in extra} == extra and state["step"] == 3
    assert_same_state(snapshot(again)[0], model_sd)
    assert_same_state(snapshot(again)[1], opt_state)
    assert again.scheduler.state_dict() == schedule
    assert rng_probe() == probe
    assert again.train(4) == losses
    assert_same_state(snapshot(again)[0], final_sd)
    assert_same_state(snapshot(again)[1], final_opt)
    assert again.scheduler.get_last_lr() == run.scheduler.get_last_lr()
    biases = [k for k in final_sd if k.endswith("expert_bias")]
    assert biases and all(final_sd[k].abs().sum() > 0 for k in biases)


def test_a_checkpoint_says_what_it_holds(saved):
    _, path = saved
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == 2 and meta["kind"] == "checkpoint" and meta["step"] == 2
    assert meta["model"]["moe"]["num_experts"] == 8 and meta["task"]["kind"] == "lm"
    assert meta["layout"] == {"world": 1, "ep_size": 1, "backend": "plain"}
    bank = meta["tensors"]["model/layers.0.ffn.experts.w1"]
    assert bank == {"shape": [8, 64, 64], "dtype": "float32"}
    assert meta["tensors"]["optim/exp_avg_sq/layers.0.ffn.experts.w1"]["shape"] == [8, 64, 64]
    assert meta["tensors"]["optim/step/embed.weight"]["shape"] == [1]
    assert "model/layers.0.ffn.router.expert_bias" in meta["tensors"]
    # every file is listed with its size and hash, and nothing else lies there
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    assert set(meta["files"]) == on_disk - {"meta.json"}


def test_no_pickle(saved):
    _, path = saved
    for p in path.rglob("*"):
        if not p.is_file():
            continue
        assert p.suffix in (".json", ".safetensors"), p
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", p.name  # pickle protocol 2+ / torch zip
        if p.suffix == ".json":
            json.loads(p.read_text())
    for source in PERSIST.glob("*.py"):
        text = source.read_text()
        code = r"torch\.(load|save)\(|^\s*(import|from) pickle|pickle\.loads?\("
        assert not re.search(code, text, re.MULTILINE), source


def test_a_failure_mid_save_keeps_the_previous(saved, monkeypatch):
    root, first = saved
    run = make_run(root, seed=3)
    calls = []

    def failing(path, data):  # the tensors are written; trainer.json is not
        calls.append(path.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.artefact, "write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        run.save(4)
    assert calls and sorted(p.name for p in root.iterdir()) == ["step_2"]
    assert ckpt.latest_checkpoint(root) == first
    monkeypatch.undo()
    assert run.load(first)["step"] == 2


def test_failed_replace_keeps_same_step(saved, monkeypatch):
    root, path = saved
    before = file_bytes(path)
    run = make_run(root, seed=3)
    real = os.replace

    def failing(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="rename failed"):
        run.save(2, again=True)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(root) == path and file_bytes(path) == before
    run.save(2, again=True)
    assert sorted(p.name for p in root.iterdir()) == ["step_2"]  # leftovers cleaned up
    other = make_run(root, seed=4)
    assert other.load(path)["again"] is True
    assert_same_state(other.model.state_dict(), run.model.state_dict())


CHILD = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import xpar.persist.staged as staged
from test_checkpoint import make_run

real, calls = staged.fsync, []

def killing(path):
    calls.append(path)
    if len(calls) == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    real(path)

staged.fsync = killing
run = make_run(Path({root!r}), seed=0)
run.save(1)
print(len(calls), flush=True)
run.train(1)
run.save(2)
"""


def test_sigkill_mid_save_keeps_previous(tmp_path):
    """A process killed at each of a save's syncs: after its files, or before its manifest."""
    root = tmp_path / "checkpoints"
    first = subprocess.run(
        [sys.executable, "-c", CHILD.format(tests=str(REPO / "tests"), kill_at=0, root=str(root))],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    per_save = int(first.stdout.split()[0])
    for kill_at in (per_save + 1, per_save + per_save // 2, 2 * per_save - 1):
        for p in root.iterdir():
            if p.name != "step_1":
                os.system(f"rm -rf {p}")
        code = CHILD.format(tests=str(REPO / "tests"), kill_at=kill_at, root=str(root))
        child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE)
        _, err = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
        assert sorted(p.name for p in root.iterdir()) == [f".tmp-step_2-{child.pid}", "step_1"]
        assert ckpt.latest_checkpoint(root) == root / "step_1"
        run = make_run(root, seed=1)
        assert run.load(root / "step_1")["step"] == 1
        assert_same_state(run.model.state_dict(), make_run(root, seed=0).model.state_dict())


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_file_is_reported_and_left_alone(saved, damage):
    root, path = saved
    target = sorted((path / "state").glob("*.safetensors"))[1]
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 100]
    target.write_bytes(bytes(data))
    before = file_bytes(path)
    run = make_run(root, seed=1)
    untouched = snapshot(run)
    with pytest.raises(UserError, match=re.escape(f"state/{target.name}")) as err:
        run.load(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "incomplete or corrupt" in msg
    assert ("sha256 mismatch" if damage == "flip" else "bytes, expected") in msg
    assert file_bytes(path) == before
    assert_same_state(snapshot(run)[0], untouched[0])
    assert run.backend.optimizer.state_dict()["state"] == {}


def test_a_file_the_manifest_does_not_list_is_refused(saved):
    root, path = saved
    shard = sorted((path / "state").glob("*.safetensors"))[0]
    stray = path / "state" / "shard-00002-model-00001-of-00001.safetensors"
    stray.write_bytes(shard.read_bytes())  # it would be read as another rank's pieces
    with pytest.raises(UserError, match="holds files its meta.json does not list") as err:
        make_run(root).load(path)
    assert stray.name in str(err.value)


def test_missing_manifest_or_path(saved):
    root, path = saved
    (path / "meta.json").unlink()
    assert ckpt.latest_checkpoint(root) is None
    run = make_run(root)
    with pytest.raises(UserError, match="neither a model dir nor a checkpoint"):
        run.load(path)
    with pytest.raises(UserError, match="no such model dir or checkpoint"):
        run.load(root / "step_99")
    ckpt.prune_checkpoints(root, keep=1)
    assert path.is_dir()  # an uncommitted dir is not prune's to delete


def test_another_model_or_missing_optimizer_state(saved, tmp_path):
    root, path = saved
    run = make_run(root, d_ff=32)
    with pytest.raises(UserError, match="does not match the model") as err:
        run.load(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "experts.w1" in msg and "(8, 64, 64)" in msg
    # a checkpoint of a run that trained only the head holds no AdamW state for the rest
    head_only = make_run(tmp_path / "head" / "checkpoints", train="head")
    frozen = head_only.save(1)
    full = make_run(root)
    untrained = len([p for p in head_only.model.parameters() if not p.requires_grad])
    with pytest.raises(UserError, match=f"holds no AdamW state for {untrained} parameters") as err:
        full.load(frozen)
    assert "embed.weight" in str(err.value) and "trainer.init_from=" in str(err.value)


def test_non_json_state_leaves_nothing(saved):
    root, path = saved
    before = file_bytes(path)
    with pytest.raises(TypeError, match="trainer state"):
        make_run(root).save(3, bad=torch.tensor(3))
    assert sorted(p.name for p in root.iterdir()) == ["step_2"]
    assert file_bytes(path) == before


def test_latest_orders_numerically_and_prune_keeps_newest(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(root) is None
    run = make_run(root)
    for step in (9, 10, 2, 1):
        run.save(step)
    leftover = root / ".tmp-step_11-12345"
    leftover.mkdir()
    (leftover / "meta.json").write_text(json.dumps({"files": {}}))
    (root / "step_12").mkdir()  # no manifest
    assert ckpt.latest_checkpoint(root) == root / "step_10"
    ckpt.prune_checkpoints(root, keep=0)
    assert len(list(root.glob("step_*"))) == 5
    ckpt.prune_checkpoints(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [
        ".tmp-step_11-12345",
        "step_10",
        "step_12",
        "step_9",
    ]
    assert run.load(root / "step_9")["step"] == 9
    run.save(13)
    assert not leftover.exists() and ckpt.latest_checkpoint(root) == root / "step_13"
