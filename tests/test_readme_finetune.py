"""The README's fine-tuning section works as written: every bash block in it runs in a fresh
directory, in order, with only the training runs shortened (a few steps each)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from jobs import REPO

SECTION = "## Fine-tuning and Hugging Face models"
# Appended to every `python -m xpar.train` command (Hydra: the last value of a key wins).
SHORT = "trainer.max_steps=4 trainer.eval_every=2 trainer.save_every=4 trainer.progress=false"


def section_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S)


def shortened(block: str) -> str:
    """The block with line continuations joined and every training run cut to a few steps."""
    lines = block.replace("\\\n", " ").splitlines()
    return "\n".join(
        re.sub(r"\s+#.*$", "", line) + f" {SHORT}"
        if line.startswith("python -m xpar.train")
        else line
        for line in lines
    )


@pytest.mark.slow
def test_readme_finetuning_commands_run(tmp_path):
    blocks = section_blocks()
    assert len(blocks) == 4  # the corpus tasks, local files, init_from, upcycle→export
    shutil.copy(REPO / "README.md", tmp_path / "README.md")  # data=local_text's default file
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true"}
    outputs = []
    for block in blocks:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", shortened(block)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"{block}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    runs = tmp_path / "runs"
    for name in ("domains", "runs_of_tokens", "reviews", "people", "lm", "domains_ft", "upcycled"):
        assert any((runs / name / "checkpoints").iterdir()), name
    for name in ("domains", "reviews", "people"):
        assert (runs / name / "label_report.json").is_file(), name
    best = json.loads((runs / "domains_ft" / "best" / "meta.json").read_text())
    assert best["kind"] == "model" and best["task"]["kind"] == "classify"
    assert (runs / "domains_ft" / "best" / "best.json").is_file()
    assert "MixtralForCausalLM torch.Size([1, 19, 384])" in outputs[-1]
