"""Everything GPU-only, checked and measured in one command (`launch/gpu_check.sh` runs it):

    launch/gpu_check.sh                # on a machine with one GPU: about 5 minutes
    launch/gpu_check.sh --cpu          # tiny shapes on the CPU, GPU tests skipped (CI runs it)

Steps, each a subprocess under its own time cap, each printing its elapsed time; a step that
fails or runs out of time is reported and the rest still run:

1. the device, driver, torch and CUDA versions;
2. `pytest -m gpu`: the layer and the trainer on CUDA (tests/test_gpu.py and others);
3. `xpar.bench.moe_layer` on shapes A, B and C (no all-to-all estimate);
4. `xpar.bench.backends`: moe_300m in bf16, deepspeed=none against zero2 and fsdp;
5. `xpar.bench.memory`: moe_300m per trainer.recompute mode, the planner's peak beside the
   measured one.

It writes OUT/gpu_report.md (the tables, the targets of the GPU acceptance as ratios of the
same run, and every step's log tail) and OUT/gpu_report.jsonl (one row per measured figure,
each with the device's name), and exits 1 if any step failed. OUT is $OUT, else
./gpu_check_<time>.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
# Target ratios of the GPU acceptance, xpar dropless against the dense GEMM per shape.
DENSE_SHARE = {"a": 0.85, "b": 0.60, "c": 0.45}
PEERS = ("HF Mixtral", "DeepSpeed-MoE")


@dataclass
class Step:
    name: str
    cmd: list[str]
    cap_s: int
    ok: bool | None = None  # None: not run yet
    seconds: float = 0.0
    why: str = ""
    log: str = ""


@dataclass
class Report:
    device: str
    out: Path
    rows: list[dict] = field(default_factory=list)  # gpu_report.jsonl
    lines: list[str] = field(default_factory=list)  # gpu_report.md

    def add(self, check: str, **figures) -> None:
        self.rows.append({"device": self.device, "check": check, **figures})

    def target(self, what: str, met: bool, figure: str = "") -> None:
        """A target of the GPU acceptance: met or MISSED, with the figure that decides."""
        self.lines.append(
            f"- {'met' if met else 'MISSED'}: {what}" + (f" ({figure})" * bool(figure))
        )
        self.add("target", target=what, met=met, figure=figure)


def steps(cpu: bool, out: Path) -> list[Step]:
    py = sys.executable
    tests = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    tests += [f"--junitxml={out / 'gpu_tests.xml'}", str(REPO / "tests")]
    layer = [py, "-m", "xpar.bench.moe_layer", "--a2a-steps", "0", "--json"]
    layer += [str(out / "moe_layer.jsonl")]
    backends = [py, "-m", "xpar.bench.backends", "--json", str(out / "backends.json")]
    memory = [py, "-m", "xpar.bench.memory", "--json", str(out / "memory.jsonl")]
    if cpu:
        layer += ["--shapes", "small", "--iters", "1", "--warmup", "0"]
        backends += ["--cpu", "--steps", "2", "--warmup", "1"]
        memory += ["--cpu", "--steps", "1", "--warmup", "0", "--micro-batches", "2"]
        return [
            Step("gpu tests", tests, 300),
            Step("moe layer", layer, 300),
            Step("backends", backends, 300),
            Step("memory", memory, 300),
        ]
    layer += ["--shapes", "ABC"]
    backends += ["--steps", "30"]
    memory += ["--steps", "5"]
    return [  # the caps add up to 9.5 minutes: one command of the device tool is at most 10
        Step("gpu tests", tests, 210),
        Step("moe layer", layer, 120),
        Step("backends", backends, 120),
        Step("memory", memory, 120),
    ]


def run(step: Step, env: dict[str, str]) -> None:
    """Run `step` in a session of its own, killed with its children at its cap."""
    print(f"== {step.name}: {' '.join(step.cmd[1:])}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(
        step.cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        step.log, _ = proc.communicate(timeout=step.cap_s)
        step.ok = proc.returncode == 0
        step.why = "" if step.ok else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        step.log, _ = proc.communicate()
        step.ok, step.why = False, f"ran past its cap of {step.cap_s} s"
    step.seconds = time.monotonic() - start
    print(step.log, end="", flush=True)
    state = "ok" if step.ok else f"FAILED ({step.why})"
    print(f"== {step.name}: {state} in {step.seconds:.0f} s", flush=True)


def environment() -> dict[str, str]:
    facts = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "-",
        "driver": "-",
        "host": platform.node(),
    }
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        facts["driver"] = out.splitlines()[0] if out else "-"
    return facts


def read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def tests_section(report: Report, xml: Path) -> None:
    if not xml.is_file():
        report.lines += ["No test results (the step did not get as far as pytest's report)."]
        return
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
            failed.append(name)
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        counts[outcome] += 1
        report.add("gpu test", test=name, outcome=outcome, seconds=float(case.get("time", 0)))
    report.lines += [", ".join(f"{n} {k}" for k, n in counts.items())]
    report.lines += [f"- FAILED {name}" for name in failed]


def layer_section(report: Report, rows: list[dict]) -> None:
    if not rows:
        report.lines += ["No rows."]
        return
    report.lines += ["| shape | row | ms | TFLOPS | vs dense | peak GiB | note |", "|" + "---|" * 7]
    for r in rows:
        report.add("moe layer", **{k: v for k, v in r.items() if k != "device"})
        cells = [r["shape"], r["row"], _num(r["ms"]), _num(r["tflops"]), _num(r["vs_dense"])]
        report.lines += ["| " + " | ".join([*cells, _num(r["peak_gib"]), r["note"]]) + " |"]
    report.lines += ["", "Targets (ratios of this run):"]
    for shape in sorted({r["shape"] for r in rows}):
        by = {r["row"]: r for r in rows if r["shape"] == shape and r["ms"] is not None}
        xpar = by.get("xpar dropless")
        if xpar is None:
            report.lines += [f"- shape {shape}: no xpar dropless row"]
            continue
        peers = {n: r["ms"] for n, r in by.items() if n.startswith(PEERS)}
        slower = [n for n, ms in peers.items() if ms <= xpar["ms"]]
        what = f"shape {shape}: xpar dropless faster than every peer row"
        report.target(what, not slower, f"not faster than {slower}" if slower else "")
        want = DENSE_SHARE.get(shape.lower())
        if want is not None and xpar["vs_dense"] is not None:
            what = f"shape {shape}: xpar dropless at >= {want} of the dense GEMM"
            report.target(what, xpar["vs_dense"] >= want, f"{xpar['vs_dense']:.2f}")
        if "xpar EP path, ep_size=1" in by:
            ratio = by["xpar EP path, ep_size=1"]["ms"] / xpar["ms"]
            what = f"shape {shape}: EP path within 5% of xpar dropless"
            report.target(what, ratio <= 1.05, f"{ratio:.3f}x the time")
        if shape.lower() == "b" and "xpar two-level dropless" in by:
            ratio = by["xpar two-level dropless"]["ms"] / xpar["ms"]
            report.target("shape B: two-level within 10% of flat", ratio <= 1.10, f"{ratio:.3f}x")


def backends_section(report: Report, path: Path) -> None:
    if not path.is_file():
        report.lines += ["No rows."]
        return
    rows = json.loads(path.read_text())["rows"]
    ref = rows["deepspeed=none"]["tokens_per_s"]
    report.lines += ["| backend | tokens/s | vs none | MFU | peak GiB | loss |", "|" + "---|" * 6]
    for name, r in rows.items():
        ratio = r["tokens_per_s"] / ref
        report.add("backends", backend=name, vs_none=ratio, **r)
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        cells = [name, f"{r['tokens_per_s']:.0f}", f"{ratio:.2f}", mfu, _num(r["peak_mem_GiB"])]
        report.lines += ["| " + " | ".join([*cells, f"{r['loss']:.4f}"]) + " |"]
    zero2 = rows["deepspeed=zero2"]["tokens_per_s"] / ref
    report.lines += [""]
    report.target("ZeRO-2 tokens/s within 10% of none", zero2 >= 0.9, f"{zero2:.2f}")
    mfu = rows["deepspeed=none"]["mfu"]
    report.lines += [f"- MFU (deepspeed=none): {'-' if mfu is None else f'{100 * mfu:.1f}%'}"]


def memory_section(report: Report, rows: list[dict]) -> None:
    if not rows:
        report.lines += ["No rows."]
        return
    head = (
        "| recompute | micro-batch | planned GiB | measured GiB | planned / measured | tokens/s |"
    )
    report.lines += [head, "|" + "---|" * 6]
    for r in rows:
        report.add("memory", **{k: v for k, v in r.items() if k != "device"})
        cells = [r["recompute"], str(r["micro_batch"]), _num(r["planned_GiB"])]
        cells += [_num(r["measured_GiB"]), _num(r["planned_GiB"] / r["measured_GiB"])]
        report.lines += ["| " + " | ".join([*cells, f"{r['tokens_per_s']:.0f}"]) + " |"]
    report.lines += ["", f"Measured: {rows[0]['what']}."]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def write(report: Report, facts: dict[str, str], done: list[Step], cpu: bool) -> None:
    out = report.out
    head = [f"# xpar GPU check: {facts['device']}", ""]
    head += [f"- {k}: {v}" for k, v in facts.items()]
    if cpu:
        head += ["- mode: --cpu (tiny shapes; GPU tests skipped; targets are GPU figures)"]
    head += ["", "| step | result | seconds |", "|---|---|---|"]
    head += [
        f"| {s.name} | {'ok' if s.ok else 'FAILED: ' + s.why} | {s.seconds:.0f} |" for s in done
    ]
    report.add("environment", **facts)
    for s in done:
        report.add("step", step=s.name, ok=s.ok, seconds=s.seconds, why=s.why)
    logs = [""]
    for s in done:
        tail = "\n".join(s.log.splitlines()[-40:])
        logs += [f"## Log of {s.name} (last 40 lines)", "", "```", tail, "```", ""]
    text = "\n".join([*head, "", *report.lines, *logs])
    (out / "gpu_report.md").write_text(text + "\n")
    (out / "gpu_report.jsonl").write_text("".join(json.dumps(r) + "\n" for r in report.rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    start = time.monotonic()
    facts = environment()
    print(" ".join(f"{k}={v}" for k, v in facts.items()), flush=True)
    if not args.cpu and facts["device"] == "CPU":
        print("xpar: error: no CUDA device; run launch/gpu_check.sh --cpu for the CPU run")
        return 2
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(os.environ.get("OUT") or f"gpu_check_{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "WANDB_SILENT": "true"}
    done = steps(args.cpu, out)
    for step in done:
        run(step, env)
    report = Report(facts["device"], out)
    sections = {
        "GPU tests": lambda: tests_section(report, out / "gpu_tests.xml"),
        "MoE layer": lambda: layer_section(report, read_lines(out / "moe_layer.jsonl")),
        "Training backends": lambda: backends_section(report, out / "backends.json"),
        "Memory per recompute mode": lambda: memory_section(
            report, read_lines(out / "memory.jsonl")
        ),
    }
    for title, fill in sections.items():
        report.lines += [f"## {title}", ""]
        fill()
        report.lines += [""]
    write(report, facts, done, args.cpu)
    failed = [s.name for s in done if not s.ok]
    print(f"report: {out / 'gpu_report.md'} and gpu_report.jsonl; {time.monotonic() - start:.0f} s")
    if failed:
        print(f"xpar: error: failed steps: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
