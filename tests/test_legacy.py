"""Artefacts of xpar's first format (tests/data/legacy_v1, written by the code before sharded
checkpoints: a one-process checkpoint, a ZeRO-2 checkpoint at EP=2 and a model dir): a
checkpoint is refused in one line that names the converter, the converter's output resumes
with the losses the old run logged, first-format model dirs are read as they are, and nothing
in a DeepSpeed file beyond DeepSpeed's own records is unpickled."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xpar.checks import UserError
from xpar.export import export
from xpar.model import MoETransformerLM
from xpar.persist import read_model

from jobs import run_cli

LEGACY = Path(__file__).parent / "data" / "legacy_v1"
# The runs' own settings (their architecture comes from the checkpoint).
RUN = [
    "trainer.device=cpu", "trainer.progress=false", "trainer.max_steps=4",
    "trainer.save_every=2", "trainer.eval_every=4", "trainer.log_every=1",
    "data.num_train=64", "data.num_val=16", "data.batch_size=4", "data.seq_len=32",
]  # fmt: skip


def logged(path: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def copy_run(name: str, tmp: Path) -> Path:
    """A first-format run dir (its config beside its checkpoints, as it needs) in tmp."""
    shutil.copytree(LEGACY / name, tmp / name)
    return tmp / name


def test_resuming_a_first_format_checkpoint_names_the_converter(tmp_path):
    step2 = copy_run("plain", tmp_path) / "checkpoints" / "step_2"
    proc = run_cli([*RUN, f"trainer.resume={step2}", "run_name=r"], cwd=tmp_path)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("xpar: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert f"convert it once with `python -m xpar.export {step2} NEW_DIR`" in lines[0]


# The logged losses come from the machine that wrote the fixtures: another CPU's kernels (AVX2
# against AVX-512, say) round differently, so a plain resume matches them to a relative 1e-6,
# not bit for bit (bitwise resume on one machine is tests/test_checkpoint.py's).
@pytest.mark.parametrize("name,rel", [("plain", 1e-6), ("zero", 1e-5)])
def test_converted_checkpoints_resume_with_the_logged_losses(tmp_path, name, rel):
    run = copy_run(name, tmp_path)
    converted = export(run / "checkpoints" / "step_2", tmp_path / "converted")
    assert converted == tmp_path / "converted" / "step_2"
    proc = run_cli([*RUN, f"trainer.resume={converted}", "run_name=on"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = logged(run / "losses.jsonl")
    new = logged(tmp_path / "runs" / "on" / "metrics.jsonl")
    assert sorted(new) == [3, 4]
    for step in new:
        assert new[step] == pytest.approx(old[step], rel=rel, abs=0), step
    # the converted weights are the old ones (a ZeRO run's EP ranks' banks, concatenated)
    step2 = run / "checkpoints" / "step_2"
    if name == "plain":
        bank = load_file(step2 / "model.safetensors")["layers.0.ffn.experts.w2"]
    else:
        files = [load_file(step2 / f"experts-ep{k}-of-2.safetensors") for k in range(2)]
        bank = torch.cat([f["layers.0.ffn.experts.w2"] for f in files])
    assert torch.equal(read_model(converted).state["layers.0.ffn.experts.w2"], bank)


def test_first_format_model_dirs_are_read_as_they_are(tmp_path):
    files = read_model(LEGACY / "model")
    model = MoETransformerLM(files.model)
    model.load_state_dict(files.state, strict=True)
    assert files.model.moe.num_experts == 4 and files.task.kind == "lm"
    proc = run_cli([*RUN, f"trainer.init_from={LEGACY / 'model'}", "run_name=ft"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised from" in proc.stdout + proc.stderr


class Payload:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['MARKER'], 'w').write('ran')",))


def test_a_crafted_deepspeed_file_is_refused_with_nothing_run(tmp_path, monkeypatch):
    run = copy_run("zero", tmp_path)
    step2 = run / "checkpoints" / "step_2"
    target = step2 / "deepspeed" / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload()}, target)
    meta = json.loads((step2 / "meta.json").read_text())  # its hash updated to match
    meta["files"]["deepspeed/mp_rank_00_model_states.pt"] = {
        "bytes": target.stat().st_size,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
    }
    (step2 / "meta.json").write_text(json.dumps(meta))
    marker = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(marker))
    with pytest.raises(UserError, match="holds more than DeepSpeed's state") as err:
        export(step2, tmp_path / "out")
    assert "\n" not in str(err.value) and not marker.exists()
    assert not (tmp_path / "out").exists()
