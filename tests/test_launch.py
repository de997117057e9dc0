"""The launch scripts as users run them: launch/torchrun.sh (2 processes on CPU, a worker killed
and restarted, SIGTERM), launch/slurm/ under a faked Slurm (two "nodes" on loopback),
launch/debug.sh, and shellcheck over all of them.

The workers load a `sitecustomize` from the test's tmp dir (on PYTHONPATH) that records each
process's rank environment and, when asked, kills one worker right after a given checkpoint:
the test observes and injures real runs without hooks in xpar itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require_tool
from distributed import free_port, run_group

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "launch/torchrun.sh",
    "launch/debug.sh",
    "launch/gpu_check.sh",
    "launch/slurm/train.sbatch",
    "launch/slurm/submit.sh",
]
QUICK = [
    "trainer.device=cpu",
    "trainer.log_every=1",
    "data.num_train=256",
    "data.num_val=32",
    "trainer.eval_batches=2",
]

SITECUSTOMIZE = """
import json, os, signal
if "RANK" in os.environ and os.environ.get("XPAR_TEST_RECORD"):
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "SLURM_NODEID",
            "TORCHELASTIC_RESTART_COUNT")
    record = {k: os.environ.get(k) for k in keys}
    path = os.path.join(os.environ["XPAR_TEST_RECORD"], f"pid{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(record, f)
    rank, _, step = os.environ.get("XPAR_TEST_KILL", "::").partition(":")
    if rank == os.environ["RANK"] and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        import xpar.training.trainer as t

        save = t.Trainer.save

        def save_then_die(self):
            path = save(self)
            if self.step == int(step):
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        t.Trainer.save = save_then_die
"""


def launch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a launch script run by a user, plus the test's sitecustomize."""
    hook = tmp_path / "hook"
    records = tmp_path / "records"
    hook.mkdir(exist_ok=True)
    records.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES"):
        env.pop(var, None)
    env.update(
        PYTHONPATH=str(hook),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        XPAR_TEST_RECORD=str(records),
        CUDA_VISIBLE_DEVICES="",
    )
    env.update(extra)
    return env


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "records").glob("*.json"))]


def run(cmd: list[str], env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_group(cmd, env, cwd, timeout)


def metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl lines; a line still being written (no newline yet) is left out."""
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def final_losses(run_dir: Path) -> tuple[float, float]:
    lines = metrics(run_dir)
    train = [m["loss"] for m in lines if "loss" in m]
    val = [m["val_loss"] for m in lines if "val_loss" in m]
    return train[-1], val[-1]


def test_launch_scripts_pass_shellcheck():
    shellcheck = require_tool("shellcheck")
    proc = subprocess.run(
        [shellcheck, "--shell=bash", *SCRIPTS], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


def test_torchrun_sh_runs_two_processes_for_five_steps(tmp_path):
    cmd = [str(REPO / "launch/torchrun.sh"), *QUICK, "trainer.max_steps=5", "run_name=two"]
    proc = run(cmd, launch_env(tmp_path, NPROC_PER_NODE="2"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in metrics(tmp_path / "runs/two") if "loss" in m] == [1, 2, 3, 4, 5]
    assert (tmp_path / "runs/two/checkpoints/step_5/meta.json").exists()
    ranks = sorted((r["RANK"], r["WORLD_SIZE"], r["LOCAL_RANK"]) for r in records(tmp_path))
    assert ranks == [("0", "2", "0"), ("1", "2", "1")]


def test_torchrun_sh_defaults_to_the_cpu_count_without_gpus(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (fake / "python").chmod(0o755)
    env = launch_env(tmp_path, PYTHON=str(fake / "python"))
    proc = run([str(REPO / "launch/torchrun.sh"), "a=1", "b=x y"], env, tmp_path)
    args = proc.stdout.splitlines()
    assert args[args.index("--nproc-per-node") + 1] == str(len(os.sched_getaffinity(0)))
    assert "--standalone" in args and args[-2:] == ["a=1", "b=x y"]
    env.update(RDZV_ENDPOINT="node0:29400", RDZV_ID="42", NNODES="2", NODE_RANK="1")
    args = run([str(REPO / "launch/torchrun.sh"), "--nproc-per-node=08"], env, tmp_path)
    args = args.stdout.splitlines()
    assert args[args.index("--rdzv-endpoint") + 1] == "node0:29400"
    assert args[args.index("--rdzv-conf") + 1] == "is_host=false"
    assert args[args.index("--nproc-per-node") + 1] == "08" and "--standalone" not in args
    assert args[args.index("--shutdown-timeout") + 1] == "110"
    assert "--local-addr" not in args
    env["LOCAL_ADDR"] = "10.0.0.7"
    args = run([str(REPO / "launch/torchrun.sh")], env, tmp_path).stdout.splitlines()
    assert args[args.index("--local-addr") + 1] == "10.0.0.7"
    env.pop("LOCAL_ADDR")
    env.pop("NODE_RANK")  # no node rank: torch decides whether the endpoint is this host
    args = run([str(REPO / "launch/torchrun.sh")], env, tmp_path).stdout.splitlines()
    assert "--rdzv-conf" not in args and args[-2:] == ["-m", "xpar.train"]


@pytest.mark.parametrize(
    "env,args,message",
    [
        ({"NNODES": "2"}, [], "NNODES=2 needs RDZV_ENDPOINT=host:port"),
        ({"NPROC_PER_NODE": "0"}, [], "NPROC_PER_NODE=0 must be an integer >= 1"),
        ({}, ["--max-restarts", "x"], "MAX_RESTARTS=x must be an integer >= 0"),
        ({}, ["--nodes", "2"], "unknown option --nodes"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a"}, [], "NODE_RANK=2 must be below"),
        (
            {"NNODES": "2", "RDZV_ENDPOINT": "a:1", "MAX_RESTARTS": "1"},
            [],
            "needs RUN_NAME (the same on every node)",
        ),
        (
            {"NNODES": "2", "MASTER_ADDR": "a", "MAX_RESTARTS": "1", "RUN_NAME": "r"},
            [],
            "needs RDZV_ENDPOINT (c10d): a static rendezvous does not restart other nodes",
        ),
        ({"NPROC_PER_NODE": "08x"}, [], "NPROC_PER_NODE=08x must be an integer >= 1"),
    ],
)
def test_torchrun_sh_bad_input_is_one_line(tmp_path, env, args, message):
    proc = run([str(REPO / "launch/torchrun.sh"), *args], launch_env(tmp_path, **env), tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_job_its_workers_refuse_ends_with_their_line_and_exit_code_2(tmp_path):
    """A config error under torchrun used to end in torchrun's 40-line ChildFailedError,
    with "To enable traceback see ..." as the root cause, and exit code 1: now the root
    cause is xpar's line (plain torchrun shows it in its report), and launch/torchrun.sh
    ends with it, with the exit code of one process, 2."""
    env = launch_env(tmp_path, NPROC_PER_NODE="2")
    proc = run([str(REPO / "launch/torchrun.sh"), *QUICK, "data.seq_len=1000"], env, tmp_path)
    lines = proc.stderr.strip().splitlines()
    line = r"xpar: error: \[rank [01]\] data.seq_len=1000 exceeds model.max_seq_len=128"
    assert proc.returncode == 2 and re.fullmatch(line, lines[-1]), proc.stderr[-3000:]
    root_cause = proc.stderr[proc.stderr.index("Root Cause") :]
    assert re.search(f"traceback : {line}", root_cause) and "To enable traceback" not in root_cause
    assert not (tmp_path / "runs").exists()


def test_plain_torchrun_with_restarts_needs_a_run_name(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    cmd += ["--max-restarts=1", "-m", "xpar.train", *QUICK]
    env = launch_env(tmp_path)
    env["PYTHONPATH"] = str(REPO)
    proc = run(cmd, env, tmp_path, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("xpar: error")]
    assert proc.returncode != 0 and len(lines) == 2, proc.stderr[-2000:]  # attempt and restart
    assert "--max-restarts=1 needs run_name=NAME" in lines[0]
    # with a name, but torchrun's shared store (which a restart would misread)
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    proc = run([*cmd, "run_name=r"], env, tmp_path, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("xpar: error")]
    assert len(lines) == 2 and "needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in lines[0]


def test_a_killed_worker_restarts_and_ends_like_an_uninterrupted_run(tmp_path):
    """Rank 1 dies (SIGKILL) right after the step-6 checkpoint; torchrun --max-restarts=1
    restarts both workers, which resume at step 6 and finish exactly as a run never killed."""
    steps = [*QUICK, "trainer.max_steps=12", "trainer.save_every=3", "trainer.eval_every=12"]
    script = str(REPO / "launch/torchrun.sh")
    env = launch_env(tmp_path, NPROC_PER_NODE="2")
    whole = run([script, *steps, "run_name=whole"], env, tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    for p in (tmp_path / "records").glob("*.json"):
        p.unlink()

    env = launch_env(tmp_path, NPROC_PER_NODE="2", MAX_RESTARTS="1", XPAR_TEST_KILL="1:6")
    hurt = run([script, *steps], env, tmp_path)
    assert hurt.returncode == 0, hurt.stderr[-3000:]
    attempts = sorted((r["TORCHELASTIC_RESTART_COUNT"], r["RANK"]) for r in records(tmp_path))
    assert attempts == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "whole"]
    log = (run_dir / "train.log").read_text()
    assert "torchrun restart 1: resuming" in log and "resumed from" in log
    assert re.search(r"resumed from \S+step_6 at step 6", log), log[-2000:]
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == list(range(1, 13))
    assert final_losses(run_dir) == final_losses(tmp_path / "runs/whole")


def test_sigterm_saves_and_exits_within_30_s(tmp_path):
    cmd = [str(REPO / "launch/torchrun.sh"), *QUICK, "trainer.max_steps=100000"]
    cmd += ["trainer.save_every=100000", "trainer.eval_every=100000", "run_name=term"]
    env = launch_env(tmp_path, NPROC_PER_NODE="2")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    run_dir = tmp_path / "runs/term"
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() or len(metrics(run_dir)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "no steps logged"
            time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # as Slurm does: to the launcher (torchrun)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert took < 30
    last = metrics(run_dir)[-1]["step"]
    assert (run_dir / f"checkpoints/step_{last}/meta.json").exists(), out[-3000:]
    assert f"stopped at step {last} (signal SIGTERM)" in (run_dir / "train.log").read_text()


def fake_slurm(tmp_path: Path, nodes: int) -> dict[str, str]:
    """srun that starts its command once per "node" (SLURM_NODEID 0..N-1, all on loopback)
    and scontrol that names the nodes: enough Slurm to run train.sbatch with bash."""
    bin_dir = tmp_path / "slurm_bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        'while [[ "$1" == --* ]]; do shift; done\n'
        "pids=()\n"
        "for ((i = 0; i < SLURM_NNODES; i++)); do\n"
        '  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" > "node$i.log" 2>&1 &\n'
        "  pids+=($!)\n"
        "done\n"
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n'
    )
    (bin_dir / "scontrol").write_text(  # slow, as on a big job: a reader that stops early
        "#!/usr/bin/env bash\n"  # would kill it with SIGPIPE
        f"for ((i = 0; i < {nodes}; i++)); do echo 127.0.0.1; sleep 0.2; done\n"
    )
    (bin_dir / "sbatch").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": f"node[0-{nodes - 1}]",
        "SLURM_SUBMIT_DIR": str(REPO),
        "NPROC_PER_NODE": "1",
        "RDZV_PORT": str(free_port()),
    }


def test_sbatch_script_runs_two_nodes_under_a_faked_slurm(tmp_path):
    env = launch_env(tmp_path, **fake_slurm(tmp_path, nodes=2))
    sbatch = REPO / "launch/slurm/train.sbatch"
    proc = run(["bash", str(sbatch), *QUICK, "trainer.max_steps=4"], env, tmp_path)
    logs = [p.read_text()[-3000:] for p in sorted(tmp_path.glob("node*.log"))]
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{logs}"
    port = env["RDZV_PORT"]
    assert f"job 4242, 2 nodes, rendezvous 127.0.0.1:{port}, run runs/slurm_4242" in proc.stdout
    run_dir = tmp_path / "runs/slurm_4242"
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == [1, 2, 3, 4]
    assert (run_dir / "checkpoints/step_4/meta.json").exists()
    seen = records(tmp_path)
    assert sorted(r["RANK"] for r in seen) == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in seen} == {"2"} and {r["LOCAL_RANK"] for r in seen} == {"0"}
    # one worker per node, and the node's group rank is its global rank (1 process per node)
    assert sorted(r["SLURM_NODEID"] for r in seen) == ["0", "1"]
    assert all(r["GROUP_RANK"] == r["RANK"] for r in seen)


def test_submit_sh_passes_the_cluster_settings_to_sbatch(tmp_path):
    env = launch_env(tmp_path, **fake_slurm(tmp_path, nodes=2))
    env.update(ACCOUNT="acct", PARTITION="gpu", NODES="4", TIME="01:00:00", GPUS_PER_NODE="4")
    proc = run([str(REPO / "launch/slurm/submit.sh"), "moe.top_k=1", "a=b c"], env, tmp_path)
    args = proc.stdout.splitlines()
    pairs = dict(zip(args[:-3:2], args[1:-3:2], strict=True))
    assert pairs["--account"] == "acct" and pairs["--partition"] == "gpu"
    assert pairs["--nodes"] == "4" and pairs["--time"] == "01:00:00"
    assert pairs["--gpus-per-node"] == "4" and f"XPAR_HOME={REPO}" in pairs["--export"]
    assert args[-3:] == [str(REPO / "launch/slurm/train.sbatch"), "moe.top_k=1", "a=b c"]


def test_debug_sh_runs_one_process_with_anomaly_detection(tmp_path):
    env = launch_env(tmp_path, WORLD_SIZE="8", RANK="3")  # inside an allocation: still one
    cmd = [str(REPO / "launch/debug.sh"), "--cpu", "--anomaly", "trainer.max_steps=3"]
    proc = run([*cmd, "run_name=dbg", "data.num_train=64", "data.num_val=16"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(tmp_path / "runs/dbg/.hydra/config.yaml")
    assert cfg.trainer.detect_anomaly and cfg.trainer.device == "cpu"
    assert cfg.parallel.ep_size == 1
    assert [m["step"] for m in metrics(tmp_path / "runs/dbg") if "loss" in m] == [1, 2, 3]
    assert records(tmp_path) == []  # no RANK reached the process: it ran alone


def test_submitit_sweep_runs_each_job_as_joined_tasks(tmp_path):
    """launcher=submitit_local: the code path of launcher=slurm (submitit's task environment
    becomes torch's), on this machine: two jobs, each two processes at EP=2."""
    cmd = [sys.executable, "-m", "xpar.train", "-m", "launcher=submitit_local"]
    cmd += ["hydra.launcher.tasks_per_node=2", "parallel.ep_size=2", *QUICK]
    cmd += ["trainer.max_steps=3", "trainer.eval_every=3", "moe.top_k=1,2", "hydra.sweep.dir=sw"]
    env = launch_env(tmp_path)
    env["PYTHONPATH"] = str(REPO)
    proc = run(cmd, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, top_k in ((0, 1), (1, 2)):
        lines = [m for m in metrics(tmp_path / f"sw/{job}") if "loss" in m]
        assert [m["step"] for m in lines] == [1, 2, 3]
        tokens = 32 * 64 * 4  # batch x seq_len x MoE layers
        for m in lines:  # two ranks, each sending its share of the job's slots
            assert m["a2a_pair_rows"] == top_k * tokens
            assert m["rank_a2a_rows_mean"] * 2 == m["a2a_rows"]


def test_slurm_launcher_config_submits_through_submitit():
    from hydra import compose, initialize_config_dir

    from xpar.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", ["launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and cfg.launcher.name == "slurm"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout == 3
