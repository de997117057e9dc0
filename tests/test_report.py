"""`python -m xpar.report`: the HTML report of real (tiny) training runs, its numbers against
metrics.jsonl, bad input, the atomic swap, and what headless Chromium actually shows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.image import imread

from xpar import report
from xpar.training.load_plot import load_panels_ES

from conftest import require_tool
from jobs import REPO

# Two evaluations, so "best" and "final" validation loss are both exercised.
TINY = [
    "debug=cpu",
    "trainer.max_steps=12",
    "trainer.eval_every=6",
    "trainer.save_every=12",
    "trainer.progress=false",
    "data.batch_size=4",
    "data.seq_len=32",
    "data.num_train=64",
    "data.num_val=16",
]
PLOTS = ["loss.png", "expert_load.png", "dropped_fraction.png", "tokens_per_s.png", "lr.png"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run dirs of a top-k MoE run and a dense run, trained side by side (one thread each)."""
    cwd = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    jobs = {"moe": ["moe=topk"], "dense": ["moe=dense"]}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "xpar.train", *TINY, *extra, f"run_name={name}"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, extra in jobs.items()
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} run failed:\n{out[-3000:]}"
    return {name: cwd / "runs" / name for name in jobs}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Page(HTMLParser):
    """The images, summary cells and text of a report page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.cells: dict[str, str] = {}
        self.tags: set[str] = set()
        self.text: list[str] = []
        self._th: str | None = None
        self._in: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self._in = tag
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)
        if self._in == "th":
            self._th = data
        elif self._in == "td" and self._th is not None:
            self.cells[self._th], self._th = data, None


def render(run_dir: Path, out: Path) -> Page:
    index = report.write_report(run_dir, out)
    assert index == out / "index.html"
    return Page(index.read_text())


def test_report_plots_are_real_images(runs, tmp_path, capsys):
    assert report.main([str(runs["moe"]), "--out", str(tmp_path / "rep")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "rep" / "index.html")
    for name in PLOTS:
        image = imread(tmp_path / "rep" / name)
        height, width = image.shape[:2]
        assert 200 <= height <= 2000 and 600 <= width <= 1400, (name, image.shape)
        assert image[..., :3].std() > 0.05, f"{name} is blank"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no .tmp or .old left


def test_every_image_exists_has_alt_and_the_page_is_self_contained(runs, tmp_path):
    page = render(runs["moe"], tmp_path / "rep")
    assert sorted(img["src"] for img in page.images) == sorted(PLOTS)
    for img in page.images:
        assert (tmp_path / "rep" / img["src"]).is_file()
        assert img["alt"] and "moe" in img["alt"]
    assert "script" not in page.tags and "link" not in page.tags
    html_text = (tmp_path / "rep" / "index.html").read_text()
    assert "http://" not in html_text and "https://" not in html_text
    assert "xpar run moe" in "".join(page.text)


def test_summary_numbers_match_metrics_jsonl(runs, tmp_path):
    lines = read_jsonl(runs["moe"] / "metrics.jsonl")
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert len(train) == 12 and [r["step"] for r in evals] == [6, 12]

    page = render(runs["moe"], tmp_path / "rep")
    expected = {
        "final train loss": f"{train[-1]['loss']:.4f}",
        "final train loss step": "12",
        "best val loss": f"{best['val_loss']:.4f}",
        "best val loss step": str(best["step"]),
        "final val loss": f"{evals[-1]['val_loss']:.4f}",
        "entropy floor": f"{evals[-1]['floor']:.4f}",
        "final val gap": f"{evals[-1]['val_gap']:.4f}",
        "run_name": "moe",
        "moe.num_experts": str(len(train[0]["expert_load"][0])),
        "parallel.ep_size": "1",
        "deepspeed.stage": "0",
    }
    assert {k: page.cells.get(k) for k in expected} == expected
    tps = [r["tokens_per_s"] for r in train[6:]]
    mean_tps = report.summary(*report.read_metrics(runs["moe"]))["mean tokens/s (last half)"]
    assert mean_tps == pytest.approx(np.mean(tps))


def test_heatmap_matrix_has_a_column_per_step_summing_to_num_experts(runs):
    train = [r for r in read_jsonl(runs["moe"] / "metrics.jsonl") if "loss" in r]
    steps_S, load_SLE = report.expert_load_SLE(report.read_metrics(runs["moe"])[0])
    assert steps_S.tolist() == [r["step"] for r in train]
    panels = load_panels_ES(load_SLE)
    num_layers, num_experts = len(train[0]["expert_load"]), len(train[0]["expert_load"][0])
    assert [label for label, _ in panels] == [f"MoE layer {i}" for i in range(num_layers)]
    for layer, (_, rel_ES) in enumerate(panels):
        assert rel_ES.shape == (num_experts, len(train))
        np.testing.assert_allclose(rel_ES.sum(axis=0), num_experts, atol=1e-3)
        for s, record in enumerate(train):
            np.testing.assert_allclose(
                rel_ES[:, s], np.array(record["expert_load"][layer]) * num_experts
            )


def test_many_layers_show_the_mean_and_the_first_and_last():
    load_SLE = np.random.default_rng(0).dirichlet(np.ones(4), size=(3, 6))  # 3 steps, 6 layers
    panels = load_panels_ES(load_SLE)
    assert [label for label, _ in panels] == [
        "mean over 6 MoE layers",
        "MoE layer 0",
        "MoE layer 5",
    ]
    np.testing.assert_allclose(panels[0][1], load_SLE.mean(axis=1).T * 4)
    np.testing.assert_allclose(panels[2][1], load_SLE[:, 5].T * 4)


def test_torn_lines_nulls_and_repeated_steps(runs, tmp_path, capsys):
    """Lines that are not records are skipped and counted (they used to be skipped silently)."""
    run = tmp_path / "run"
    shutil.copytree(runs["moe"] / ".hydra", run / ".hydra")
    text = (runs["moe"] / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(
        text
        + '{"step": 12, "loss": 3.25, "lr": null, "expert_load": [[0.5, null]]}\n'
        + '{"step": 13, "loss": null, "aux_loss": NaN}\n'
        + "not json\n"
        + '{"step": 14, "lo'  # a crash mid-write
    )
    train, evals = report.read_metrics(run)
    warning = capsys.readouterr().err
    assert warning == (
        f"xpar: warning: skipped 2 line(s) of {run / 'metrics.jsonl'} that are not metric "
        "records (a JSON object with an integer step)\n"
    )
    assert [r["step"] for r in train] == list(range(1, 14))
    assert train[11]["loss"] == 3.25  # the repeated step's last line wins
    steps, loss = report.series(train, "loss")
    assert steps[-1] == 12 and loss[-1] == 3.25  # step 13's null loss is skipped
    steps_S, _ = report.expert_load_SLE(train)
    assert steps_S.tolist() == list(range(1, 12))  # step 12's load has another shape now
    page = render(run, tmp_path / "rep")
    assert page.cells["final train loss"] == "3.2500" and page.cells["last step"] == "13"


@pytest.mark.parametrize("config", [None, "{: [not yaml", "- a list\n"])
def test_a_missing_or_unreadable_config_leaves_out_only_the_config(runs, tmp_path, config):
    run = tmp_path / "my_run"
    run.mkdir()
    shutil.copy(runs["moe"] / "metrics.jsonl", run)
    if config is not None:
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(config)
    page = render(run, tmp_path / "rep")
    assert "xpar run my_run" in page.text  # the title falls back to the dir's name
    assert "Config" not in page.text and "moe.num_experts" not in page.cells
    assert len(page.images) == len(PLOTS)


def test_dense_run_has_no_heatmap_and_says_why(runs, tmp_path):
    page = render(runs["dense"], tmp_path / "rep")
    srcs = [img["src"] for img in page.images]
    assert "expert_load.png" not in srcs and "loss.png" in srcs
    assert not (tmp_path / "rep" / "expert_load.png").exists()
    assert "Dense model (expert_load is empty): no expert-load heatmap." in page.text
    assert page.cells["moe"] == "none (dense model)"


def a2a_line(step: int, inter_R: list[float], intra_R: list[float]) -> dict:
    """A training line of an expert-parallel run whose ranks sent `inter_R` bytes across nodes
    and `intra_R` inside their node, as the trainer logs it."""
    line: dict = {"step": step, "loss": 4.0 - 0.1 * step, "a2a_bytes": sum(inter_R + intra_R)}
    for link, bytes_R in (("inter", inter_R), ("intra", intra_R)):
        line[f"a2a_{link}_bytes"] = sum(bytes_R)
        for stat, reduce in {"min": np.min, "mean": np.mean, "max": np.max}.items():
            line[f"rank_a2a_{link}_bytes_{stat}"] = float(reduce(bytes_R))
    return line


def test_ep_run_plots_a2a_traffic_and_sums_it_up(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    lines = [
        a2a_line(s, rng.uniform(1e6, 9e6, 4).tolist(), rng.uniform(2e6, 3e6, 4).tolist())
        for s in range(1, 9)
    ]
    lines[5]["rank_a2a_inter_bytes_max"] = 50e6  # a straggler
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    page = render(run, tmp_path / "rep")
    assert "a2a.png" in [img["src"] for img in page.images]
    image = imread(tmp_path / "rep" / "a2a.png")
    assert image.shape[1] >= 600 and image[..., :3].std() > 0.05
    text = "".join(page.text)
    assert "All-to-all traffic" in text and "nothing crossed ranks" not in text
    inter = np.mean([r["rank_a2a_inter_bytes_mean"] for r in lines]) / 1e6
    intra = np.mean([r["rank_a2a_intra_bytes_mean"] for r in lines]) / 1e6
    assert 1 < inter < 9 and 2 < intra < 3
    numbers = report.summary(*report.read_metrics(run))
    assert numbers["mean inter-node MB/rank/step"] == pytest.approx(inter)
    assert numbers["mean intra-node MB/rank/step"] == pytest.approx(intra)
    assert page.cells["mean inter-node MB/rank/step"] == f"{inter:.4f}"
    assert page.cells["mean intra-node MB/rank/step"] == f"{intra:.4f}"


def test_a_single_process_run_has_no_a2a_plot_and_says_why(runs, tmp_path):
    page = render(runs["moe"], tmp_path / "rep")
    assert "a2a.png" not in [img["src"] for img in page.images]
    assert not (tmp_path / "rep" / "a2a.png").exists()
    assert "No all-to-all metrics (single process or ep_size=1): nothing crossed ranks." in (
        page.text
    )
    assert page.cells["mean inter-node MB/rank/step"] == "—"
    assert page.cells["mean intra-node MB/rank/step"] == "—"


def one_line_error(stderr: str, path: Path) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xpar: error: "), stderr
    assert str(path) in lines[0], lines[0]


def test_missing_run_dir_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = subprocess.run(
        [sys.executable, "-m", "xpar.report", str(missing)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    one_line_error(proc.stderr, missing)
    assert not missing.exists()


@pytest.mark.parametrize("content", [None, "", "\n\n", '{"step": 1, "lo'])
def test_missing_or_empty_metrics_is_one_line_and_exit_2(tmp_path, capsys, content):
    metrics = tmp_path / "metrics.jsonl"
    if content is not None:
        metrics.write_text(content)
    assert report.main([str(tmp_path)]) == 2
    one_line_error(capsys.readouterr().err, metrics)
    assert not (tmp_path / "report").exists() and not (tmp_path / "report.tmp").exists()


def test_a_failed_render_leaves_the_old_report_intact(runs, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    render(runs["moe"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib fell over")

    monkeypatch.setattr(report, "load_figure", broken)
    with pytest.raises(RuntimeError, match="fell over"):
        report.write_report(runs["moe"], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]

    monkeypatch.undo()
    (out / "stale.png").write_bytes(b"old")
    render(runs["moe"], out)  # a good render replaces the old report as a whole
    assert not (out / "stale.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def screenshot(chromium: str, page: Path, png: Path, profile: Path) -> np.ndarray:
    """What headless Chromium shows of `page`: RGB floats in [0, 1], 1200 × 3000 pixels."""
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            "--window-size=1200,3000",
            f"--screenshot={png}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return imread(png)[..., :3]


def heatmap_pixels(rgb_HWC: np.ndarray) -> int:
    """Pixels in the strong (red or blue, not near-white) colours of the heatmap's colormap."""
    cmap_C3 = colormaps["RdBu_r"](np.r_[np.linspace(0, 0.35, 64), np.linspace(0.65, 1, 64)])[:, :3]

    def codes(c_N3: np.ndarray) -> np.ndarray:
        q_N3 = np.round(c_N3 * 31).astype(np.int64)  # 5 bits a channel: antialiasing slack
        return (q_N3[:, 0] * 32 + q_N3[:, 1]) * 32 + q_N3[:, 2]

    return int(np.isin(codes(rgb_HWC.reshape(-1, 3)), codes(cmap_C3)).sum())


def colourful_pixels(rgb_HWC: np.ndarray) -> int:
    return int((rgb_HWC.max(axis=-1) - rgb_HWC.min(axis=-1) > 0.2).sum())


def test_chromium_shows_the_plots(runs, tmp_path):
    chromium = require_tool("chromium")
    out = tmp_path / "rep"
    render(runs["moe"], out)
    # The same page with every image broken: any colour left comes from the page itself.
    broken = out / "broken.html"
    broken.write_text((out / "index.html").read_text().replace('src="', 'src="missing-'))

    shown = screenshot(chromium, out / "index.html", tmp_path / "shown.png", tmp_path / "profile")
    bare = screenshot(chromium, broken, tmp_path / "bare.png", tmp_path / "profile")
    assert shown.shape == bare.shape == (3000, 1200, 3)
    assert heatmap_pixels(shown) > 20_000, heatmap_pixels(shown)
    assert heatmap_pixels(bare) < 500, heatmap_pixels(bare)
    assert colourful_pixels(shown) > 10 * max(colourful_pixels(bare), 1_000)
