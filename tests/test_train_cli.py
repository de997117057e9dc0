"""`python -m xpar.train` as a user runs it: the default job, signals, crashes mid-save,
wandb offline without leaking the key, and one-line errors for bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from jobs import FAST, REPO, run_cli

QUICK = FAST + ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.save_every=2"]
TEXT = [
    "trainer.device=cpu",
    "trainer.progress=false",
    "data=local_text",
    f"data.data_files=[{REPO}/README.md]",
]


def snapshot(root) -> dict:
    """Every file under `root` and its bytes."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(proc, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("xpar: error: ") and re.search(pattern, last), last


@pytest.mark.slow
def test_default_job_reaches_the_entropy_floor(tmp_path):
    start = time.monotonic()
    proc = run_cli([], cwd=tmp_path)  # exactly the README's command
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"final validation loss ([\d.]+) nats/token; entropy floor ([\d.]+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    val, floor = float(m.group(1)), float(m.group(2))
    assert val - floor < 0.15
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_1000",
        "step_1500",
        "step_500",
    ]
    print(f"default job: val {val:.4f}, floor {floor:.4f}, {time.monotonic() - start:.0f} s")


def test_resolved_config_is_written(tmp_path):
    proc = run_cli(QUICK + ["run_name=cfg"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "runs/cfg/.hydra/config.yaml").read_text()
    assert "${" not in text and "d_model: 64" in text and "run_name: cfg" in text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    args = FAST + ["trainer.max_steps=100000", "trainer.log_every=1", "run_name=sig"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xpar.train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "runs/sig/metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped at step" in out + err and sig.name in out + err
    (ckpt,) = (tmp_path / "runs/sig/checkpoints").iterdir()
    step = int(ckpt.name.removeprefix("step_"))
    assert step >= 3
    resumed = run_cli(
        FAST + ["run_name=sig", "trainer.resume=true", f"trainer.max_steps={step + 2}"],
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {ckpt}" in resumed.stdout + resumed.stderr


KILL_IN_SECOND_SAVE = """
import os, signal, sys
import xpar.persist.artefact as artefact
from xpar.train import main
write = artefact.write_bytes
def dying_write(path, data):
    if ".tmp-step_4" in str(path):  # the tensors are written, the rest not
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, data)
artefact.write_bytes = dying_write
sys.argv = ["xpar.train", *sys.argv[1:]]
main()
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_resumable(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = QUICK + ["run_name=kill", "trainer.log_every=1"]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_SECOND_SAVE, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL
    root = tmp_path / "runs/kill/checkpoints"
    assert (root / "step_2/meta.json").exists() and not (root / "step_4").exists()
    resumed = run_cli(
        QUICK + ["run_name=kill", "trainer.resume=true", "trainer.log_every=1"], cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {root / 'step_2'}" in resumed.stdout + resumed.stderr
    steps = [
        json.loads(x)["step"] for x in (root.parent / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and steps.count(3) == 1  # steps after 2 logged once, not twice
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_4"]


def test_wandb_offline_keeps_the_api_key_out_of_every_file(tmp_path):
    from test_tracking import read_wandb_records

    sentinel = "xpar-test-key-0123456789abcdef0123456789"
    proc = run_cli(
        QUICK + ["run_name=wb", "logger=wandb", "logger.mode=offline"],
        cwd=tmp_path,
        WANDB_API_KEY=sentinel,
        WANDB_CACHE_DIR=str(tmp_path / "cache"),
        WANDB_CONFIG_DIR=str(tmp_path / "config"),
        WANDB_DATA_DIR=str(tmp_path / "data"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs/wb"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for p in files:
        assert sentinel.encode() not in p.read_bytes(), p
    (wandb_file,) = [p for p in files if p.suffix == ".wandb"]
    history = {}
    for record in read_wandb_records(wandb_file):
        if record.HasField("history"):
            items = {"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item}
            history[record.history.step.num] = items
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_train = [x for x in logged if "loss" in x][-1]
    assert float(history[last_train["step"]]["loss"]) == pytest.approx(last_train["loss"])
    assert any("expert_load" in k for items in history.values() for k in items)


def test_unknown_group_option_is_one_line(tmp_path):
    one_line_error(run_cli(["model=llama"], cwd=tmp_path), r"model/llama.*valid options: .*tiny")
    assert not (tmp_path / "runs").exists()  # nothing written


def test_unknown_key_is_one_line(tmp_path):
    one_line_error(run_cli(["trainer.nope=1"], cwd=tmp_path), r"trainer\.nope")


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (FAST + ["data.seq_len=1000"], r"data\.seq_len=1000 exceeds model\.max_seq_len=128"),
        (FAST + ["data.batch_size=0"], r"data\.batch_size=0 must be >= 1"),
        (TEXT + ["data.data_files=[no/such/*.txt]"], r"data\.data_files.*matches no"),
        (TEXT + ["model.vocab_size=128"], r"384 tokens but model\.vocab_size=128"),
    ],
    ids=["seq_len", "batch_size", "missing_files", "vocab"],
)
def test_bad_input_is_one_line(tmp_path, overrides, pattern):
    one_line_error(run_cli(overrides, cwd=tmp_path), pattern)


def test_empty_dataset_is_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    proc = run_cli(TEXT + [f"data.data_files=[{tmp_path}/empty.txt]"], cwd=tmp_path)
    one_line_error(proc, r"(?i)empty|no .*(text|token|document|block)")


def test_corrupt_checkpoint_on_resume_is_one_line_and_left_alone(tmp_path):
    assert run_cli(QUICK + ["run_name=c"], cwd=tmp_path).returncode == 0
    run_dir = tmp_path / "runs/c"
    weights = sorted((run_dir / "checkpoints/step_4/state").iterdir())[0]
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = snapshot(run_dir)  # .hydra/ and train.log too: a refused job writes nothing
    proc = run_cli(
        QUICK + ["run_name=c", "trainer.resume=true", "trainer.max_steps=6"], cwd=tmp_path
    )
    one_line_error(proc, rf"step_4 is incomplete or corrupt: state/{weights.name}.*step_2")
    assert snapshot(run_dir) == before  # checkpoints, metrics, config and log untouched
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_4"]


def test_the_moe_300m_preset_trains_a_step_on_cpu(tmp_path):
    args = ["model=moe_300m", "data.vocab_size=1024", "data.seq_len=16", "data.batch_size=2"]
    args += ["data.num_train=64", "data.num_val=8", "trainer.device=cpu", "trainer.max_steps=1"]
    args += ["trainer.eval_every=1", "trainer.eval_batches=1", "trainer.log_every=1"]
    proc = run_cli([*args, "trainer.progress=false", "run_name=m"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "runs" / "m" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x) for x in lines if '"loss"' in x]
    assert [s["step"] for s in steps] == [1]
    assert abs(steps[0]["loss"] - 10.4) < 0.5  # ~ln(32768): uniform at init


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path):
    """The first Ctrl-C asks for a save after the step; a second one stops at once. That
    used to end in a 70-line KeyboardInterrupt traceback; now one line names the newest
    checkpoint, and the exit code is the shell's for SIGINT."""
    args = FAST + ["trainer.max_steps=100000", "trainer.log_every=1", "trainer.save_every=2"]
    args += ["data.batch_size=128", "run_name=int"]  # steps long enough to signal twice in one
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xpar.train", *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = tmp_path / "runs/int/checkpoints/step_2/meta.json"
    deadline = time.monotonic() + 120
    while not first.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint written"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    newest = re.fullmatch(r"xpar: interrupted without saving; the newest checkpoint is (\S+)", last)
    assert newest, last
    steps = sorted(int(p.parent.name[5:]) for p in first.parent.parent.glob("step_*/meta.json"))
    assert newest.group(1).endswith(f"runs/int/checkpoints/step_{steps[-1]}")


def test_refused_jobs_leave_run_dirs_as_they_were_and_new_runs_start_afresh(tmp_path):
    """A fresh run refused because its run dir holds checkpoints used to rewrite that run's
    .hydra/ (which `python -m xpar.hf export RUN_DIR` then read: the wrong top_k), a job
    refused at validation left runs/<time>/ with .hydra/ and an empty train.log, a fresh start
    in a run dir without checkpoints appended to its metrics.jsonl (step 1 twice), and
    `trainer.resume=true` with a mistyped run_name, or at trainer.max_steps already, said
    nothing a user would notice."""
    assert run_cli(QUICK + ["run_name=r"], cwd=tmp_path).returncode == 0
    run_dir = tmp_path / "runs/r"
    before = snapshot(run_dir)
    refused = run_cli(QUICK + ["run_name=r", "moe.top_k=1"], cwd=tmp_path)
    one_line_error(refused, "runs/r/checkpoints already holds checkpoints")
    assert snapshot(run_dir) == before
    one_line_error(run_cli(QUICK + ["data.seq_len=1000"], cwd=tmp_path), "exceeds")
    (tmp_path / "bad.jsonl").write_text('{"text": "a b c"}\n{oops\n')
    text = ["trainer.device=cpu", "data=hf_text", "data.path=json"]
    text += [f"data.data_files=[{tmp_path}/bad.jsonl]"]
    text += ["data.tokenizer=byt5", "model.vocab_size=384", "run_name=j"]  # refused by the trainer
    one_line_error(run_cli(text, cwd=tmp_path, HF_DATASETS_OFFLINE="1"), "line 2 is not")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["r"]

    done = run_cli(QUICK + ["run_name=r", "trainer.resume=true"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "xpar: warning: nothing to train: the run is at step 4 and trainer.max_steps=4" in (
        done.stderr
    )
    typo = run_cli(
        QUICK + ["run_name=rr", "trainer.resume=true", "trainer.max_steps=1"], cwd=tmp_path
    )
    assert typo.returncode == 0, typo.stderr[-2000:]
    warning = f"xpar: warning: trainer.resume=true found nothing to resume in {tmp_path}/runs/rr"
    assert warning in typo.stderr and "similar runs with checkpoints: r;" in typo.stderr

    old = (run_dir / "metrics.jsonl").read_bytes()
    for p in (run_dir / "checkpoints").iterdir():
        shutil.rmtree(p)
    assert run_cli(QUICK + ["run_name=r"], cwd=tmp_path).returncode == 0
    assert (run_dir / "metrics.1.jsonl").read_bytes() == old

    def steps(text: str) -> list[int]:
        return [m["step"] for m in map(json.loads, text.splitlines()) if "loss" in m]

    assert steps((run_dir / "metrics.jsonl").read_text()) == steps(old.decode()) == [4]
