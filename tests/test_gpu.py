"""The trainer on one CUDA GPU: the default job in bf16 (plain and ZeRO-2) follows the CPU fp32
loss curve, activation recompute changes no loss, the expert-parallel dispatcher at ep_size=1
equals the local one, and launch/torchrun.sh (an nccl group of one rank) and launch/debug.sh
run. Every test is marked gpu: conftest.py skips them without CUDA.

Subprocesses get PYTHONPATH = the repo in front of the caller's PYTHONPATH, which may name
where the dependencies live (a --target install), so nothing here drops it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from recompute_check import MODES, Run
from recompute_check import train as train_steps

from xpar.moe import MoEConfig, MoELayer
from xpar.parallel.dispatcher import AllToAllDispatcher
from xpar.training.trainer import peak_tflops

from distributed import run_group

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]

DEVICE = "cuda"
TIMEOUT = 300  # seconds, for every subprocess
# The default job (tiny model, synthetic corpus, batch 32 x 64 tokens, AdamW with warmup) for
# 30 steps, evaluated and saved at the end only; on a smaller corpus (30 steps read 960 of its
# 2048 sequences) so that generating it does not dominate. The CPU and GPU runs differ in
# device and precision only.
JOB = [
    "trainer.max_steps=30",
    "trainer.log_every=1",
    "trainer.eval_every=30",
    "trainer.save_every=30",
    "trainer.progress=false",
    "data.num_train=2048",
    "data.num_val=64",
]
CPU_FP32 = ["trainer.device=cpu", "trainer.precision=fp32"]
GPU_BF16 = [f"trainer.device={DEVICE}", "trainer.precision=bf16"]
# bf16 against fp32, loss curves: every step within 1% relative and a mean absolute difference
# over the 30 steps of at most 0.01 nats. The loss starts near ln(256) = 5.55 and falls about
# 0.7 nats in these steps, so a wrong init, learning rate or a step not applied shows as
# several times that. bf16 rounding averages out over the batch's 2048 tokens: bf16 autocast on
# the CPU, plain and under ZeRO-2, was measured within 1.4e-4 relative (mean 1.6e-4 nats) of
# fp32 over these 30 steps; CUDA's kernels (grouped GEMMs, fused attention) round differently,
# hence the margin of some 70x.
CURVE_RTOL = 1e-2
CURVE_MEAN_ATOL = 1e-2


def subprocess_env(*front: Path, **extra: str) -> dict[str, str]:
    """The caller's environment with `front` and the repo ahead of its PYTHONPATH (kept: it
    may hold the dependencies), outside any torchrun or Slurm job (so one process is one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        env.pop(var, None)
    for var in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "RUN_NAME"):
        env.pop(var, None)
    paths = [*map(str, front), str(REPO)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHON=sys.executable, WANDB_SILENT="true")
    env.update(extra)
    return env


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def val_loss(run_dir: Path) -> float:
    (value,) = [m["val_loss"] for m in metrics(run_dir) if "val_loss" in m]
    return value


def train_job(tmp: Path, name: str, args: list[str]) -> Path:
    """`python -m xpar.train ARGS run_name=NAME` in `tmp`; its run dir."""
    cmd = [sys.executable, "-m", "xpar.train", *args, f"run_name={name}"]
    proc = run_group(cmd, subprocess_env(), tmp, TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / name


def assert_follows(got: dict[int, float], ref: dict[int, float]) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, 31))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=CURVE_RTOL), (step, got, ref)
    mean = sum(abs(got[s] - ref[s]) for s in ref) / len(ref)
    assert mean <= CURVE_MEAN_ATOL, (mean, got, ref)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> Path:
    """The default job's CPU fp32 run: the curve the GPU runs must follow."""
    run_dir = train_job(tmp_path_factory.mktemp("cpu"), "cpu", [*JOB, *CPU_FP32])
    losses = curve(run_dir)
    # The comparison means something: the loss starts at ln(vocab) and falls.
    assert losses[1] == pytest.approx(math.log(256), rel=0.02)
    assert losses[30] < losses[1] - 0.3, losses
    return run_dir


def assert_on_the_gpu(steps: list[dict]) -> None:
    """MFU is logged on a GPU of known peak (the H200 among them), and only there."""
    if peak_tflops(torch.device(DEVICE), None) is not None:
        assert all(m["mfu"] > 0 for m in steps), steps[-1]


def assert_gpu_run(run_dir: Path, cpu_run: Path) -> None:
    assert_follows(curve(run_dir), curve(cpu_run))
    assert val_loss(run_dir) == pytest.approx(val_loss(cpu_run), rel=CURVE_RTOL)
    steps = [m for m in metrics(run_dir) if "loss" in m]
    assert steps[-1]["skipped_steps"] == 0
    assert_on_the_gpu(steps)
    assert (run_dir / "checkpoints/step_30/meta.json").exists()


def test_default_job_in_bf16_follows_the_cpu_fp32_curve(tmp_path, cpu_run):
    run_dir = train_job(tmp_path, "gpu", [*JOB, *GPU_BF16])
    cfg = OmegaConf.load(run_dir / ".hydra/config.yaml")
    assert cfg.trainer.device == DEVICE and cfg.trainer.precision == "bf16"
    assert_gpu_run(run_dir, cpu_run)


def test_zero2_in_bf16_follows_the_cpu_fp32_curve(tmp_path, cpu_run):
    """ZeRO-2's bf16 is DeepSpeed's (bf16 weights and gradients, fp32 master weights), turned
    on by trainer.precision=bf16 itself: the DeepSpeed config reads trainer.precision as
    given, so it is named here rather than left to auto."""
    run_dir = train_job(tmp_path, "zero2", [*JOB, *GPU_BF16, "deepspeed=zero2"])
    assert "DeepSpeed ZeRO-2: 1 ranks" in (run_dir / "train.log").read_text()
    assert_gpu_run(run_dir, cpu_run)


# ---- activation recompute -----------------------------------------------------------------

RECOMPUTE_CASES = {
    "topk": [],
    "two_level": ["moe=two_level"],
    "capacity_jitter": ["moe=capacity", "moe.jitter_eps=0.1"],
}


@pytest.fixture(scope="module")
def recompute_runs(tmp_path_factory) -> dict[tuple[str, str], Run]:
    """recompute_check's 5 steps (4 micro-batches each) of every case under every mode, in
    fp32 on the GPU."""
    gpu = [f"trainer.device={DEVICE}", "trainer.precision=fp32"]  # after FAST's device=cpu
    return {
        (case, mode): train_steps([*extra, *gpu], mode, tmp_path_factory.mktemp(case + mode))
        for case, extra in RECOMPUTE_CASES.items()
        for mode in MODES
    }


@pytest.mark.parametrize("mode", ["experts", "full"])
@pytest.mark.parametrize("case", list(RECOMPUTE_CASES))
def test_recompute_gives_the_losses_of_none(recompute_runs, case, mode):
    """Bitwise on the CPU (test_recompute.py); on CUDA to a relative 1e-5, since some of its
    backward kernels (attention's among them) sum in an order that varies from run to run.
    The parallel tests allow summation-order differences the same 1e-5 over 10-20 steps."""
    ref, got = recompute_runs[(case, "none")].steps, recompute_runs[(case, mode)].steps
    assert len(ref["loss"]) == 5 and all(math.isfinite(x) for x in ref["loss"])
    for key, rtol in (("loss", 1e-5), ("aux_loss", 1e-5), ("grad_norm", 1e-4)):
        assert got[key] == pytest.approx(ref[key], rel=rtol), key
    assert set(recompute_runs[(case, mode)].grads) == recompute_runs[(case, mode)].trainable
    if case == "capacity_jitter":
        assert all(d > 0 for d in got["dropped_fraction"])


# ---- the expert-parallel dispatcher at ep_size=1 ------------------------------------------


def _layers(capacity_factor: float | None) -> tuple[MoELayer, MoELayer]:
    """A layer with the local dispatcher and a copy with the all-to-all one (a group of one:
    every row stays, every other step of EP runs). A selection bias loads the last experts,
    so that capacity 1.25 drops slots (some 13-16% of them on random inputs)."""
    cfg = MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2, capacity_factor=capacity_factor)
    local = MoELayer(cfg)
    with torch.no_grad():
        local.router.expert_bias.copy_(torch.linspace(0.0, 0.03, 8))
    local = local.to(DEVICE)
    ep = copy.deepcopy(local)
    ep.dispatcher = AllToAllDispatcher(cfg, None, ep_size=1)
    return local, ep


def _forward_backward(layer: MoELayer, x_TD, g_TD, bf16: bool):
    """Outputs (fp32), the input's and every parameter's gradient, and the aux statistics."""
    layer.zero_grad(set_to_none=True)
    x_TD = x_TD.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        out_TD, aux = layer(x_TD)
    ((out_TD.float() * g_TD).sum() + aux.loss).backward()
    grads = {"x": x_TD.grad} | {n: p.grad for n, p in layer.named_parameters()}
    return out_TD.detach().float(), grads, aux


def _rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("cf", [None, 1.25], ids=["dropless", "capacity1.25"])
def test_all_to_all_dispatcher_at_ep1_equals_the_local_one(cf):
    local, ep = _layers(cf)
    x_TD = torch.randn(512, 64, device=DEVICE)
    g_TD = torch.randn(512, 64, device=DEVICE)
    for bf16 in (False, True):
        out_l, grads_l, aux_l = _forward_backward(local, x_TD, g_TD, bf16)
        out_e, grads_e, aux_e = _forward_backward(ep, x_TD, g_TD, bf16)
        assert torch.equal(aux_l.tokens_per_expert, aux_e.tokens_per_expert)
        assert torch.equal(aux_l.dropped, aux_e.dropped)
        assert (float(aux_l.dropped) > 0) == (cf is not None)
        assert grads_l.keys() == grads_e.keys()
        assert all(g is not None for g in [*grads_l.values(), *grads_e.values()])
        if not bf16:  # the same math, summed in another order
            torch.testing.assert_close(out_e, out_l, rtol=1e-5, atol=1e-6)
            for name in grads_l:
                torch.testing.assert_close(
                    grads_e[name], grads_l[name], rtol=1e-5, atol=1e-6, msg=name
                )
            continue
        # bf16 autocast: the same rows through the same experts, but combine weighs and sums
        # them in bf16 in another order (a bmm here, a product and a row sum there), so the
        # two differ by bf16 rounding: relative to the tensor's norm, within 2e-2 (the unit
        # roundoff is 3.9e-3; the router's gradient passes the softmax's cancellation).
        assert _rel_err(out_e, out_l) <= 2e-2
        for name in grads_l:
            assert _rel_err(grads_e[name], grads_l[name]) <= 2e-2, name


# ---- launch scripts ------------------------------------------------------------------------

# Loaded by every worker (first on PYTHONPATH): records the process group xpar joins, then
# hands on to the sitecustomize it shadows, if any.
SITECUSTOMIZE = """
import json, os, sys
if "RANK" in os.environ and os.environ.get("XPAR_TEST_RECORD"):
    import torch.distributed as dist

    init = dist.init_process_group

    def recording_init(*args, **kwargs):
        init(*args, **kwargs)
        record = {"backend": dist.get_backend(), "world": dist.get_world_size(),
                  "RANK": os.environ["RANK"], "WORLD_SIZE": os.environ.get("WORLD_SIZE")}
        path = os.path.join(os.environ["XPAR_TEST_RECORD"], f"pid{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(record, f)

    dist.init_process_group = recording_init
here = os.path.dirname(os.path.abspath(__file__))
for d in sys.path:
    other = os.path.join(d, "sitecustomize.py")
    if d and os.path.abspath(d) != here and os.path.isfile(other):
        with open(other) as f:
            exec(compile(f.read(), other, "exec"), {"__name__": "sitecustomize", "__file__": other})
        break
"""


def test_torchrun_sh_runs_one_rank_in_an_nccl_group(tmp_path):
    """One rank under launch/torchrun.sh. A world of one joins no process group under
    deepspeed=none, so the run is ZeRO-2's, which joins one of one rank on the rank's GPU."""
    hook, records = tmp_path / "hook", tmp_path / "records"
    hook.mkdir()
    records.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = subprocess_env(hook, NPROC_PER_NODE="1", XPAR_TEST_RECORD=str(records))
    cmd = [str(REPO / "launch/torchrun.sh"), f"trainer.device={DEVICE}", "trainer.precision=bf16"]
    cmd += ["deepspeed=zero2", "trainer.max_steps=5", "trainer.log_every=1", "run_name=one"]
    cmd += ["trainer.progress=false", "data.num_train=512", "data.num_val=64"]
    proc = run_group(cmd, env, tmp_path, TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs/one"
    steps = [m for m in metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(m["loss"]) for m in steps)
    assert_on_the_gpu(steps)
    assert steps[-1]["skipped_steps"] == 0
    assert math.isfinite(val_loss(run_dir))
    assert (run_dir / "checkpoints/step_5/meta.json").exists()
    assert "DeepSpeed ZeRO-2: 1 ranks" in (run_dir / "train.log").read_text()
    seen = [json.loads(p.read_text()) for p in records.glob("*.json")]
    assert seen == [{"backend": "nccl", "world": 1, "RANK": "0", "WORLD_SIZE": "1"}]


def test_debug_sh_runs_ten_steps_on_the_gpu(tmp_path):
    cmd = [str(REPO / "launch/debug.sh"), "trainer.max_steps=10", "run_name=dbg"]
    cmd += ["data.num_train=512", "data.num_val=64"]
    proc = run_group(cmd, subprocess_env(), tmp_path, TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs/dbg"
    cfg = OmegaConf.load(run_dir / ".hydra/config.yaml")
    assert cfg.trainer.device == "auto" and cfg.parallel.ep_size == 1  # the GPU: picked
    steps = [m for m in metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 11))
    assert all(math.isfinite(m["loss"]) for m in steps)
    assert_on_the_gpu(steps)
    log = (run_dir / "train.log").read_text()
    assert all(f"step {i}/10 loss" in log for i in range(1, 11)), log[-2000:]
    assert "final validation loss" in proc.stdout
    assert (run_dir / "checkpoints/step_10/meta.json").exists()
