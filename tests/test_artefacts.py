"""Every artefact describes itself: a checkpoint, its consolidated export, a model dir and a
run's best model, each copied alone into an empty directory elsewhere, are taken by
`trainer.init_from`, `trainer.resume` (checkpoints) and `python -m xpar.hf export`, from any
working directory and with no model flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from xpar.export import export
from xpar.export import main as export_main
from xpar.hf.__main__ import main as hf_main
from xpar.persist import read_model, write_model_dir

from jobs import FAST, run_cli

# Not the default architecture: a reader that looked at the job's config, not the artefact,
# would build the wrong model and fail.
ARCH = ["model.d_model=48", "model.n_layers=2", "moe.num_experts=4", "moe.d_ff=32"]
RUN = [*FAST, *ARCH, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.save_every=4"]


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> dict[str, Path]:
    """The four kinds, each copied alone into a dir of its own far from its run."""
    tmp = tmp_path_factory.mktemp("made")
    proc = run_cli([*RUN, "finetune.keep_best=true", "run_name=src"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp / "runs" / "src"
    made = {
        "checkpoint": run / "checkpoints" / "step_4",
        "export": export(run / "checkpoints", tmp / "exported"),
        "best": run / "best",
    }
    source = read_model(made["checkpoint"])
    made["model_dir"] = write_model_dir(tmp / "model", source.state, source.model, source.task)
    far = tmp_path_factory.mktemp("elsewhere")
    copies = {}
    for kind, path in made.items():
        copies[kind] = far / kind / path.name
        shutil.copytree(path, copies[kind])
    shutil.rmtree(tmp)  # nothing of the run is left to look at
    return copies


@pytest.mark.parametrize("kind", ["checkpoint", "export", "best", "model_dir"])
def test_init_from_and_hf_export_take_any_artefact_from_anywhere(tmp_path, artefacts, kind):
    path = artefacts[kind]
    proc = run_cli(
        [*FAST, "trainer.max_steps=1", f"trainer.init_from={path}", "run_name=ft"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised from {path}" in proc.stderr + proc.stdout
    saved = json.loads((tmp_path / "runs/ft/checkpoints/step_1/meta.json").read_text())
    assert saved["model"]["d_model"] == 48 and saved["model"]["moe"]["num_experts"] == 4
    assert hf_main(["export", str(path), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    experts = config.get("num_local_experts", config.get("num_experts"))
    assert config["hidden_size"] == 48 and experts == 4
    weights = read_model(path).state
    assert weights["layers.1.ffn.experts.w1"].shape == torch.Size([4, 32, 48])


@pytest.mark.parametrize("kind", ["checkpoint", "export"])
def test_resume_takes_a_checkpoint_from_anywhere(tmp_path, artefacts, kind):
    path = artefacts[kind]
    proc = run_cli(
        [
            *FAST,
            "trainer.max_steps=6",
            "trainer.log_every=1",
            f"trainer.resume={path}",
            "run_name=on",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {path} at step 4" in proc.stderr + proc.stdout
    steps = [json.loads(x)["step"] for x in (tmp_path / "runs/on/metrics.jsonl").open()]
    assert 5 in steps and 6 in steps and 4 not in steps


def test_a_model_dir_is_not_a_checkpoint_to_resume(tmp_path, artefacts):
    proc = run_cli([*FAST, f"trainer.resume={artefacts['best']}", "run_name=x"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "is a model dir (weights only), not a checkpoint" in proc.stderr
    assert f"trainer.init_from={artefacts['best']}" in proc.stderr


def test_the_export_takes_a_run_dir_and_refuses_a_non_empty_out_dir(tmp_path, artefacts, capsys):
    """`python -m xpar.export` agrees with the other writers: OUT_DIR must be new or empty (it
    used to write into any dir), and a run dir names its newest checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(artefacts["checkpoint"], run / "checkpoints" / "step_4")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_main([str(run), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"xpar: error: {out} is not empty; pick a new output dir (nothing was written)"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert export_main([str(run), str(tmp_path / "new")]) == 0
    assert (tmp_path / "new/step_4/meta.json").is_file()
