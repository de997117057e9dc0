"""The one atomic directory writer: every directory xpar writes (checkpoints, model dirs, best
models, exports, Hugging Face dirs) is written into a temp dir beside its final place and renamed
there once complete, so a crash or a failure leaves the previous content (or nothing) in place.

Several processes may write one directory: each writes its own files into the shared temp dir,
fsyncs and hashes them; rank 0 then writes the manifest (`meta.json`: every file's size and
sha256, and what the directory holds), fsyncs and renames. A directory whose manifest does not
parse is never taken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from xpar.checks import UserError
from xpar.parallel.mesh import Mesh

MANIFEST = "meta.json"
LEFTOVER_PREFIXES = (".tmp-", ".old-")


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def json_bytes(obj: Any, what: str) -> bytes:
    """`obj` as JSON, or a TypeError naming `what` when it is not JSON-able."""
    try:
        return json.dumps(obj, indent=1).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"cannot save the {what}: it is not JSON-able ({e})") from e


def write_bytes(path: Path, data: bytes) -> None:
    """Write one file and fsync it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    fsync(path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_manifest(path: Path) -> dict[str, Any] | None:
    """A directory's manifest if it parses and lists its files with sizes and hashes."""
    try:
        meta = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = meta.get("files") if isinstance(meta, dict) else None
    ok = isinstance(files, dict) and all(
        isinstance(i, dict) and isinstance(i.get("bytes"), int) and isinstance(i.get("sha256"), str)
        for i in files.values()
    )
    return meta if ok else None


def check_file(path: Path, name: str, info: dict[str, Any]) -> None:
    """One listed file against its size and sha256 in the manifest."""
    bad = f"{path} is incomplete or corrupt"
    f = path / name
    if not f.is_file():
        raise UserError(f"{bad}: {name} is missing")
    if f.stat().st_size != info["bytes"]:
        raise UserError(f"{bad}: {name} has {f.stat().st_size} bytes, expected {info['bytes']}")
    if sha256(f) != info["sha256"]:
        raise UserError(f"{bad}: {name} sha256 mismatch")


def verify(path: Path, mesh: Mesh | None = None) -> dict[str, Any]:
    """Check every file the manifest lists (ranks share the hashing) and return the manifest.
    Raises the same UserError on every rank."""
    mesh = mesh or Mesh.solo()
    error, meta = None, None
    try:
        if not path.is_dir():
            raise UserError(f"{path} does not exist (or is not a directory)")
        if not (path / MANIFEST).is_file():
            raise UserError(f"{path} has no {MANIFEST} (an interrupted save?)")
        meta = read_manifest(path)
        if meta is None:
            raise UserError(f"{path} is incomplete or corrupt: {MANIFEST} does not parse")
        rank, world = mesh.layout.rank, mesh.layout.world
        for name in sorted(meta["files"])[rank::world]:
            check_file(path, name, meta["files"][name])
    except UserError as e:
        error = str(e)
    first = next((e for e in mesh.gather_objects(error) if e is not None), None)
    if first is not None:
        raise UserError(first)
    assert meta is not None
    return meta


def check_out_dir(out: Path, overwrite: bool = False) -> None:
    """Refuse an output path that is a file, or a non-empty dir unless `overwrite`, before any
    work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; pick another output dir")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; pick a new output dir (nothing was written)")


def remove_leftovers(root: Path) -> None:
    """Temp and moved-aside dirs of interrupted writes and prunes under `root`."""
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(LEFTOVER_PREFIXES):
            shutil.rmtree(p, ignore_errors=True)


class Staged:
    """A directory written whole or not at all, by one process or by every rank of `mesh`:

        with Staged(final, mesh) as staged:
            ...every rank writes its files under staged.tmp...
            staged.commit(my_files, manifest)

    The temp dir is `.tmp-<name>-<pid of rank 0>` beside `final`. A rank that fails before the
    commit still takes part in it, saying so, so that every rank raises instead of waiting for
    it; rank 0 then removes the temp dir. An existing `final` is refused unless `overwrite`, and
    then moved aside for the rename and deleted after, so a complete copy is on disk at every
    moment."""

    def __init__(self, final: Path, mesh: Mesh | None = None, overwrite: bool = False) -> None:
        self.final, self.mesh, self.overwrite = Path(final), mesh or Mesh.solo(), overwrite
        self.tmp = self.final
        self.committed = self._reported = False

    def __enter__(self) -> Staged:
        rank0 = self.mesh.layout.rank == 0
        check_out_dir(self.final, self.overwrite)  # every rank: all of them fail, or none
        if rank0:
            self.final.parent.mkdir(parents=True, exist_ok=True)
        pid = self.mesh.broadcast_object(os.getpid())
        self.tmp = self.final.parent / f".tmp-{self.final.name}-{pid}"
        if rank0:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        self.mesh.barrier()
        return self

    def __exit__(self, kind, value, tb) -> None:
        if self.committed:
            return
        if kind is not None and not self._reported:  # the others are waiting in commit
            self._gather({"error": f"rank {self.mesh.layout.rank}: {kind.__name__}: {value}"})
        if self.mesh.layout.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _gather(self, part: dict[str, Any]) -> list[dict[str, Any]]:
        self._reported = True
        return self.mesh.gather_objects(part)

    def commit(self, own: list[Path] | None, manifest: dict[str, Any]) -> Path:
        """Every rank: fsync and hash the files it wrote (`own`, under tmp; None: all of them,
        for a single writer); rank 0: write the manifest (`manifest` plus the file list) last
        and rename the dir into place. Returns once the dir is in place on every rank."""
        if own is None:
            own = [p for p in self.tmp.rglob("*") if p.is_file()]
        mine = {}
        for f in own:
            fsync(f)
            rel = str(f.relative_to(self.tmp))
            mine[rel] = {"bytes": f.stat().st_size, "sha256": sha256(f)}
        parts = self._gather({"files": mine})
        failed = [p["error"] for p in parts if "error" in p]
        if failed:
            raise RuntimeError(f"{self.final} was not written: {failed[0]}")
        listed = {name: info for p in parts for name, info in p["files"].items()}
        error = None
        if self.mesh.layout.rank == 0:
            try:
                body = json_bytes({**manifest, "files": dict(sorted(listed.items()))}, MANIFEST)
                write_bytes(self.tmp / MANIFEST, body)
                for d in sorted({(self.tmp / name).parent for name in listed} | {self.tmp}):
                    fsync(d)
                self._rename()
            except BaseException as e:
                error = e
        # Rank 0's outcome on every rank (and no rank goes on before the rename).
        outcome = self.mesh.broadcast_object(None if error is None else repr(error))
        if error is not None:
            raise error
        if outcome is not None:
            raise RuntimeError(f"{self.final} was not written: rank 0: {outcome}")
        self.committed = True
        return self.final

    def _rename(self) -> None:
        final, aside = self.final, None
        if final.exists():
            aside = final.parent / f".old-{final.name}-{os.getpid()}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        try:
            os.replace(self.tmp, final)
        except BaseException:
            if aside is not None:
                os.replace(aside, final)
            raise
        fsync(final.parent)
        if aside is not None:
            shutil.rmtree(aside)
        for p in final.parent.glob(f".*-{final.name}-*"):  # of earlier, interrupted writes
            if p.is_dir() and p.name.startswith(LEFTOVER_PREFIXES):
                shutil.rmtree(p, ignore_errors=True)
