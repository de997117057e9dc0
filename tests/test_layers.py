"""The package's shape: imports point one way (moe <- model <- parallel <- persist <- training
<- the CLIs, with data and tasks beside them), no module imports another that imports it back
at import time, xpar.parallel loads without Hydra or the trainer's config, and the wheel lists
every package."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
XPAR = REPO / "xpar"

# What each part of xpar may import (besides itself). The CLIs (train, with compose and launch
# beside it, export, report, hf, bench) may import anything.
ALLOWED = {
    "checks": set(),
    "moe": {"checks"},
    "model": {"checks", "moe"},
    "data": {"checks"},
    "tasks": {"checks", "moe", "model", "data"},
    "parallel": {"checks", "moe", "model"},
    "persist": {"checks", "moe", "model", "parallel", "data"},
    "config": {"checks", "moe", "model", "data", "tasks", "parallel"},
    "training": {"checks", "moe", "model", "data", "tasks", "parallel", "persist", "config"},
}
CLIS = {
    "train", "compose", "launch", "torchrun", "export", "report", "hf", "bench", "plan", "__init__",
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(at import time, anywhere) the xpar names `path` imports: function bodies run later."""
    top: set[str] = set()
    every: set[str] = set()

    def visit(node: ast.AST, at_import: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            names = [n for n in names if n.split(".")[0] == "xpar"]
            every.update(names)
            if at_import:
                top.update(names)
            later = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            later |= isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            visit(child, at_import and not later)

    visit(ast.parse(path.read_text()), True)
    return top, every


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def graph() -> dict[str, tuple[set[str], set[str]]]:
    modules = {module_name(p): p for p in XPAR.rglob("*.py")}
    out = {}
    for name, path in modules.items():
        top, every = imports(path)
        resolve = lambda ns: (
            {n for n in ns if n in modules}
            | {  # noqa: E731
                n.rsplit(".", 1)[0]
                for n in ns
                if n not in modules and n.rsplit(".", 1)[0] in modules
            }
        )
        out[name] = (resolve(top) - {name}, resolve(every) - {name})
    return out


def test_imports_point_one_way():
    bad = []
    for module, (_, every) in graph().items():
        src = part(module)
        if src in CLIS:
            continue
        for target in every:
            dst = part(target)
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{module} -> {target}")
    assert not bad, bad


def test_no_import_cycles():
    g = {m: top for m, (top, _) in graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join([*stack[stack.index(n) :], n]))
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    # A package's __init__ importing its own submodules is how names are handed on.
    cycles = [c for c in cycles if not _through_own_init(c)]
    assert not cycles, cycles


def _through_own_init(cycle: str) -> bool:
    mods = cycle.split(" -> ")
    return any(b.startswith(a + ".") or a.startswith(b + ".") for a, b in itertools.pairwise(mods))


def test_parallel_needs_neither_hydra_nor_the_trainer_config():
    code = (
        "import sys, xpar.parallel, xpar.persist; "
        "bad = [m for m in ('hydra', 'omegaconf', 'xpar.config', 'xpar.training') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_wheel_lists_every_package():
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(packages["packages"])
    found = {module_name(p.parent) for p in XPAR.rglob("__init__.py")} | {"xpar.conf"}
    assert listed == found
