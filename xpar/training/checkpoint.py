"""Atomic, pickle-free checkpoints that resume a run bit-exactly.

A checkpoint is the directory `root/step_N`: tensors in safetensors, everything else in JSON,
and `meta.json` (sizes and sha256 of every file) as the commit marker. A save writes into a
temp dir inside `root`, fsyncs, writes `meta.json` last and renames the dir into place, so a
crash leaves the earlier checkpoints intact; a directory without a readable `meta.json` is
never picked. One process (rank 0) writes into a root at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from xpar.checks import UserError

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)")
_LEFTOVER_PREFIXES = (".tmp-", ".old-")
_FILES = (
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "rng.safetensors",
    "rng.json",
    "trainer.json",
)


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    extra: dict[str, Any],
) -> Path:
    """Write `root/step_{step}` atomically (replacing one saved before at the same step) and
    return its path. The states are state_dict()s (under expert parallelism, the gathered
    global ones); this process's RNG states go along. `extra` must be JSON-able."""
    root = Path(root)
    optim_tensors, optim_rest = _split_optimizer_state(optimizer_state)
    rng_tensors, rng_rest = rng_state()
    # Serialise the JSON parts first, so that a non-JSON-able value fails before any write.
    files: dict[str, bytes | dict[str, Tensor]] = {
        "model.safetensors": to_cpu(model_state),
        "optimizer.safetensors": to_cpu(optim_tensors),
        "optimizer.json": json_bytes(optim_rest, "optimizer state (param_groups)"),
        "scheduler.json": json_bytes(scheduler_state, "scheduler state_dict()"),
        "rng.safetensors": rng_tensors,
        "rng.json": json_bytes(rng_rest, "RNG state"),
        "trainer.json": json_bytes(extra, "trainer extra state"),
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step_{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        listed = {}
        for name, data in files.items():
            write_file(tmp / name, data)
            listed[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)}
        meta = {"format_version": FORMAT_VERSION, "step": step, "files": listed}
        write_file(tmp / "meta.json", json.dumps(meta, indent=1).encode())
        fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = commit(root, tmp, f"step_{step}")
    remove_leftovers(root)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (by step), or None. Complete means its
    meta.json parses; file hashes are checked by load_checkpoint."""
    complete = complete_checkpoints(Path(root))
    return complete[-1] if complete else None


@dataclass
class Checkpoint:
    """A verified checkpoint, read into memory (global state dicts)."""

    path: Path
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any]  # torch's layout: {"state": {i: {...}}, "param_groups"}
    scheduler_state: dict[str, Any]
    extra: dict[str, Any]


def load_checkpoint(path: Path, model_shapes: dict[str, tuple[int, ...]] | None) -> Checkpoint:
    """Verify the checkpoint at `path` (every file's size and sha256, and its model tensors
    against `model_shapes`, the global shapes the model expects, unless None), restore this
    process's RNG states, and return the rest. Reads only; never writes."""
    path = Path(path)
    verify(path)
    model_state = load_file(path / "model.safetensors")
    if model_shapes is not None:
        check_model_keys(path, model_shapes, model_state)
    optimizer_state = _read_optimizer_state(path)
    set_rng_state(load_file(path / "rng.safetensors"), read_json(path / "rng.json"))
    return Checkpoint(
        path,
        model_state,
        optimizer_state,
        read_json(path / "scheduler.json"),
        read_json(path / "trainer.json"),
    )


def match_optimizer(ck: Checkpoint, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The saved optimizer state, checked against `optimizer`'s parameter groups, with the
    tuples JSON turned into lists (AdamW's betas) given back their type."""
    groups = ck.optimizer_state["param_groups"]
    want = [len(g["params"]) for g in optimizer.param_groups]
    got = [len(g["params"]) for g in groups]
    if want != got:
        raise UserError(
            f"checkpoint {ck.path} does not match the optimizer: parameter groups of sizes "
            f"{got} saved, {want} now"
        )
    for now, old in zip(optimizer.param_groups, groups, strict=True):
        for k, v in old.items():
            if isinstance(now.get(k), tuple) and isinstance(v, list):
                old[k] = tuple(v)
    return ck.optimizer_state


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep=0 keeps all)."""
    if keep < 0:
        raise UserError(f"checkpoints to keep must be >= 0, got {keep}")
    complete = complete_checkpoints(Path(root))
    for old in complete[:-keep] if keep else []:
        # Rename first: a crash mid-delete then leaves a leftover, not a half-deleted step_N.
        aside = old.with_name(f".old-{old.name}-{os.getpid()}")
        os.replace(old, aside)
        shutil.rmtree(aside)


# ---- writing -------------------------------------------------------------------------------


def write_file(path: Path, data: bytes | dict[str, Tensor]) -> None:
    """Write one file (safetensors for a tensor dict, else the bytes) and fsync it."""
    if isinstance(data, dict):
        save_file(data, path)
    else:
        path.write_bytes(data)
    fsync(path)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(root: Path, tmp: Path, name: str) -> Path:
    """Rename `tmp` to `root/name`. An existing `name` is moved aside first and deleted after,
    so some complete copy is on disk at every moment."""
    final = root / name
    aside = None
    if final.exists():
        aside = root / f".old-{name}-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        if aside is not None:
            os.replace(aside, final)
        raise
    fsync(root)
    if aside is not None:
        shutil.rmtree(aside)
    return final


def remove_leftovers(root: Path) -> None:
    """Temp and moved-aside dirs of interrupted saves or prunes."""
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_LEFTOVER_PREFIXES):
            shutil.rmtree(p, ignore_errors=True)


def to_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors; ones sharing storage (tied weights) are cloned apart, as
    safetensors refuses shared storage."""
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def json_bytes(obj: Any, what: str) -> bytes:
    try:
        return json.dumps(obj, indent=1).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"cannot checkpoint the {what}: it is not JSON-able ({e})") from e


# ---- state split into tensors and JSON -----------------------------------------------------


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"state": scalars, "param_groups": sd["param_groups"]}


def _read_optimizer_state(path: Path) -> dict[str, Any]:
    rest = read_json(path / "optimizer.json")
    state: dict[int, dict[str, Any]] = {int(i): s for i, s in rest["state"].items()}
    for key, t in load_file(path / "optimizer.safetensors").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s.cpu()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return tensors, {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
    }


def set_rng_state(tensors: dict[str, Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        # Only devices present both then and now; another device count cannot resume exactly.
        for i in range(torch.cuda.device_count()):
            if f"cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda.{i}"], i)
    version, internal, gauss = rest["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- reading and checks ------------------------------------------------------------------


def complete_checkpoints(root: Path) -> list[Path]:
    """`step_N` dirs under root whose meta.json parses, oldest first (hashes unchecked)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and read_meta(p) is not None:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and isinstance(meta.get("files"), dict)
    ok = ok and all(
        isinstance(i, dict) and isinstance(i.get("bytes"), int) and isinstance(i.get("sha256"), str)
        for i in meta["files"].values()
    )
    return meta if ok else None


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, required: tuple[str, ...] = _FILES, hash_: bool = True) -> None:
    """Raise UserError unless meta.json is readable, lists the `required` files, and (when
    `hash_`) every file it lists matches it."""
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist (or is not a directory)")
    if not (path / "meta.json").is_file():
        raise UserError(f"checkpoint {path} has no meta.json (an interrupted save?)")
    meta = read_meta(path)
    bad = f"checkpoint {path} is incomplete or corrupt"
    if meta is None:
        raise UserError(f"{bad}: meta.json does not parse")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format_version={meta.get('format_version')!r}; this xpar "
            f"reads {FORMAT_VERSION}"
        )
    for name in required:
        if name not in meta["files"]:
            raise UserError(f"{bad}: meta.json lists no {name}")
    for name, info in meta["files"].items() if hash_ else ():
        check_file(path, name, info)


def check_file(path: Path, name: str, info: dict[str, Any]) -> None:
    """One listed file against its size and sha256 in meta.json."""
    bad = f"checkpoint {path} is incomplete or corrupt"
    f = path / name
    if not f.is_file():
        raise UserError(f"{bad}: {name} is missing")
    if f.stat().st_size != info["bytes"]:
        raise UserError(f"{bad}: {name} has {f.stat().st_size} bytes, expected {info['bytes']}")
    if sha256(f) != info["sha256"]:
        raise UserError(f"{bad}: {name} sha256 mismatch")


def _short(items: list[str], limit: int = 8) -> str:
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + more + "]"


def check_model_keys(
    path: Path, want: dict[str, tuple[int, ...]], saved: dict[str, Tensor]
) -> None:
    missing = sorted(want.keys() - saved.keys())
    unexpected = sorted(saved.keys() - want.keys())
    shapes = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {want[k]}"
        for k in sorted(want.keys() & saved.keys())
        if tuple(saved[k].shape) != want[k]
    ]
    if missing or unexpected or shapes:
        raise UserError(
            f"checkpoint {path} does not match the model: missing keys {_short(missing)}, "
            f"unexpected keys {_short(unexpected)}, shape mismatches {_short(shapes)}"
        )
