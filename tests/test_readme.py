"""The README works as written: every command of every ```bash block runs, in README order, in
one fresh directory, unless SKIPPED names why it cannot run on a CPU machine without network.

The directory stands in for a fresh clone's root: it holds launch/ (the scripts the README calls
by relative path), and xpar comes from the checkout through PYTHONPATH. Commands run as written
except for their length, by one rule:

- steps: every `trainer.max_steps=N`, `trainer.save_every=N`, `trainer.eval_every=N` and
  `step_N` in a command becomes ceil(N / 500), so checkpoints a later command names still exist
  (exp1's 3000 steps saved every 500 keep step_2000 as step_4); a training command (xpar.train,
  launch/torchrun.sh, launch/debug.sh) that leaves max_steps or save_every to its config gets
  the schema defaults (1500, 500) shortened the same way, appended (Hydra: the last value wins).
  Evaluation keeps its cadence, so a shortened run evaluates at its end, on one batch
  (`trainer.eval_batches=1` appended).
- benchmarks: one timed iteration, two training steps and one micro-batch size (BENCH_FLAGS).

A new block is run like any other, so it fails here until it runs on a CPU or SKIPPED lists it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from xpar.config import TrainerConfig

from jobs import REPO

FACTOR = 500
STEP_KEYS = ("max_steps", "save_every", "eval_every")
APPENDED = ("max_steps", "save_every")  # the rest keep their cadence
TRAINS = re.compile(r"-m xpar\.train\b|launch/(torchrun|debug)\.sh\b")
BENCH_FLAGS = {
    "python -m xpar.bench.moe_layer": "--iters 1 --warmup 0 --a2a-steps 2",
    "python -m xpar.bench.backends": "--steps 2 --warmup 1",
    "python -m xpar.bench.memory": "--steps 1 --warmup 0 --micro-batches 2",
}

GPU_FIRST_RUN = "the first run on one GPU (tests/test_launch.py runs launch/debug.sh --cpu)"
# Each command that does not run here, by its text (continuations joined, comment dropped).
SKIPPED = {
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev]" && python -m xpar.train': (  # noqa: E501
        "the install is CI's own (.ci/run), and the default job runs in full in "
        "tests/test_train_cli.py::test_default_job_reaches_the_entropy_floor"
    ),
    "python -m pytest -q": "the test suite, this test among them",
    "launch/debug.sh": GPU_FIRST_RUN,
    "launch/debug.sh --anomaly": GPU_FIRST_RUN,
    "launch/gpu_check.sh": "a GPU (tests/test_gpu_check.py runs launch/gpu_check.sh --cpu)",
    "launch/debug.sh model=moe_300m data.vocab_size=1024 trainer.max_steps=20": GPU_FIRST_RUN,
    "python -m xpar.train [group=option ...] [key=value ...]": "a synopsis: [...] are placeholders",
    "python -m xpar.train model=moe_300m data.vocab_size=1024 deepspeed=zero2 trainer.precision=bf16": (  # noqa: E501
        "a GPU: moe_300m in bf16 (tests/test_train_cli.py trains moe_300m a step on the CPU)"
    ),
    "python -m xpar.train logger=wandb logger.project=my-moe experiment=synthetic_two_level": (
        "W&B online needs WANDB_API_KEY and the network (tests/test_tracking.py and "
        "tests/test_train_cli.py run logger=wandb offline)"
    ),
    "launch/torchrun.sh parallel.ep_size=8 moe=two_level": (
        "GPUs: a process per GPU (on a CPU machine one per core, which ep_size=8 does not divide)"
    ),
    "MAX_RESTARTS=3 RUN_NAME=ep8 launch/torchrun.sh parallel.ep_size=8": (
        "GPUs: a process per GPU for ep_size=8 (tests/test_launch.py restarts a CPU run)"
    ),
    "NNODES=4 RDZV_ENDPOINT=node0:29500 RDZV_ID=ep8x4 RUN_NAME=ep8x4 launch/torchrun.sh parallel.ep_size=8": (  # noqa: E501
        "four nodes meeting at node0"
    ),
    "ACCOUNT=my_acct PARTITION=gpu NODES=4 GPUS_PER_NODE=8 TIME=08:00:00 launch/slurm/submit.sh parallel.ep_size=8 deepspeed=zero2": (  # noqa: E501
        "needs Slurm (tests/test_launch.py checks what submit.sh hands sbatch)"
    ),
    "sbatch -A my_acct -p gpu -N 4 -t 08:00:00 launch/slurm/train.sbatch parallel.ep_size=8": (
        "needs Slurm (tests/test_launch.py runs train.sbatch under a faked Slurm)"
    ),
    'pip install -e ".[slurm]"': (
        "an install from a package registry (CI's .[dev] install has hydra-submitit-launcher)"
    ),
    "python -m xpar.train -m launcher=slurm hydra.launcher.partition=gpu hydra.launcher.account=my_acct parallel.ep_size=8 moe.top_k=1,2 moe=topk,two_level": (  # noqa: E501
        "needs Slurm (tests/test_launch.py checks its submitit config and runs a sweep under "
        "launcher=submitit_local)"
    ),
    "docker build -f docker/Dockerfile -t xpar .": (
        "needs a Docker daemon (tests/test_docker.py lints the Dockerfile and entrypoint)"
    ),
    'docker run --gpus all --ipc=host --init --stop-timeout 120 --user "$(id -u):$(id -g)" -v "$PWD/runs:/opt/xpar/runs" xpar trainer.max_steps=1000 moe=two_level': (  # noqa: E501
        "needs a Docker daemon, the image built above and GPUs"
    ),
    "enroot import -o xpar.sqsh dockerd://xpar": "needs enroot and the image built above",
    'srun -N 1 --gpus-per-node=8 --container-image=./xpar.sqsh --container-mounts="$PWD/runs:/opt/xpar/runs" --container-workdir=/opt/xpar /opt/xpar/launch/torchrun.sh trainer.max_steps=1000': (  # noqa: E501
        "needs Slurm with pyxis, the image imported above and GPUs"
    ),
    "python -m xpar.bench.moe_layer": "GPU-sized shapes A, B and C (the --shapes small line runs)",
    "python -m xpar.bench.backends": "a GPU: moe_300m in bf16 (the --cpu line runs)",
}


@dataclass
class Command:
    block: int  # which ```bash block, from 0
    key: str  # its command line: continuations joined, comment dropped, spaces collapsed
    script: str  # what bash runs: the command line and its heredoc body, if any


def readme_commands() -> list[Command]:
    """Every command of every ```bash block of README.md, in order."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block, body in enumerate(re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)):
        lines = body.replace("\\\n", " ").splitlines()
        while lines:
            line = re.sub(r"\s+#.*$", "", lines.pop(0)).strip()
            if not line or line.startswith("#"):
                continue
            key, script = " ".join(line.split()), [line]
            heredoc = re.search(r"<<-?\s*'?(\w+)'?", line)
            if heredoc:
                end = lines.index(heredoc.group(1))
                script += lines[: end + 1]
                del lines[: end + 1]
            commands.append(Command(block, key, "\n".join(script)))
    return commands


def shorter(n: str | int) -> int:
    return math.ceil(int(n) / FACTOR)


def shortened(command: Command) -> str:
    """The command with the module docstring's rule applied (only its first line: a heredoc's
    body is data)."""
    first, _, rest = command.script.partition("\n")
    first = re.sub(r"\bstep_(\d+)\b", lambda m: f"step_{shorter(m[1])}", first)
    if TRAINS.search(first):
        for key in STEP_KEYS:
            first = re.sub(
                rf"\btrainer\.{key}=(\d+)\b", lambda m, k=key: f"trainer.{k}={shorter(m[1])}", first
            )
        for key in APPENDED:
            if f"trainer.{key}=" not in first:
                first += f" trainer.{key}={shorter(getattr(TrainerConfig, key))}"
        first += " trainer.eval_batches=1"
    for prefix, flags in BENCH_FLAGS.items():
        if first.startswith(prefix + " ") or first == prefix:
            first += f" {flags}"
    return "\n".join([first, rest]) if rest else first


def to_run() -> list[Command]:
    return [c for c in readme_commands() if c.key not in SKIPPED]


def test_each_skip_names_one_readme_command_and_shortening_keeps_checkpoint_names():
    keys = [c.key for c in readme_commands()]
    stale = [key for key in SKIPPED if keys.count(key) != 1]
    assert not stale, f"SKIPPED names commands the README does not have once: {stale}"
    run = {c.key: shortened(c) for c in to_run()}
    # The rule on the README's own checkpoint chains: runs/z's step_500 and exp1's step_2000.
    z = next(v for k, v in run.items() if k.endswith("run_name=z"))
    assert z.endswith("run_name=z trainer.max_steps=3 trainer.save_every=1 trainer.eval_batches=1")
    (exp2,) = (v for k, v in run.items() if "run_name=exp2" in k)
    assert "trainer.max_steps=6 " in exp2 and "exp1/checkpoints/step_4 " in exp2
    assert "step_1 exported/" in next(v for v in run.values() if "xpar.export" in v)


def losses(run_dir) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def steps(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_commands_run_as_written(tmp_path):
    (tmp_path / "launch").symlink_to(REPO / "launch", target_is_directory=True)
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",  # this venv's python
        "PYTHONPATH": str(REPO),
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        # One thread per process: the torchrun commands put 4 processes on CI's 2 cores, and a
        # thread pool in each is several times slower there.
        "OMP_NUM_THREADS": "1",
    }
    outputs = []
    for command in to_run():
        script, start = shortened(command), time.monotonic()
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        print(f"{time.monotonic() - start:6.1f} s  {script.splitlines()[0]}", flush=True)
        assert proc.returncode == 0, f"{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        # No command leans on something the README does not mean, such as a resume with
        # nothing to train or nothing to resume: each of those warns.
        assert "xpar: warning:" not in proc.stderr, f"{script}\n{proc.stderr[-2000:]}"
        outputs.append(proc.stdout)

    runs = tmp_path / "runs"
    # The ZeRO run the re-sharding examples resume from, and what they made of it.
    assert steps(runs / "z") == ["step_1", "step_2", "step_3"]
    assert steps(runs / "z4") == steps(runs / "one") == ["step_2", "step_3"]
    assert (tmp_path / "exported" / "step_1" / "meta.json").is_file()
    # exp2 from exp1's step 4 (README: 2000) replays exp1 to step 6 (3000); exp1 goes on to 8.
    assert steps(runs / "exp1") == ["step_6", "step_7", "step_8"]
    assert losses(runs / "exp2")[6] == losses(runs / "exp1")[6]
    assert (runs / "exp1" / "report" / "index.html").is_file()  # the newest run's report
    (sweep,) = runs.glob("sweep_*")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    # Fine-tuning and Hugging Face models.
    for name in ("domains", "runs_of_tokens", "reviews", "people", "lm", "domains_ft", "upcycled"):
        assert steps(runs / name), name
    for name in ("domains", "reviews", "people"):
        assert (runs / name / "label_report.json").is_file(), name
    best = json.loads((runs / "domains_ft" / "best" / "meta.json").read_text())
    assert best["kind"] == "model" and best["task"]["kind"] == "classify"
    assert (runs / "domains_ft" / "best" / "best.json").is_file()
    assert any("MixtralForCausalLM torch.Size([1, 19, 384])" in out for out in outputs)
