"""`python -m xpar.report RUN_DIR [--out DIR]`: a static HTML report of one training run, for
people without wandb. Reads RUN_DIR/metrics.jsonl (and .hydra/config.yaml when present) and
writes OUT (default RUN_DIR/report/) holding index.html and its PNG plots: loss, expert load
over steps, dropped fraction, throughput, learning rate and all-to-all traffic (expert
parallelism). The page needs no network and no JavaScript; the report replaces an older one
only once it has been written in full.

Shape suffixes: S logged steps, L MoE layers, E experts.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure

from xpar.checks import UserError, report_error, report_warning
from xpar.training.load_plot import load_figure
from xpar.training.records import Record, read_records_counted

CONFIG_FACTS = (
    "model.n_layers", "model.d_model", "moe.router", "moe.num_experts", "moe.top_k",
    "moe.capacity_factor", "parallel.ep_size", "deepspeed.stage", "data.batch_size",
    "data.seq_len", "trainer.max_steps",
)  # fmt: skip
MB = 1e6
# Bytes per rank per step by link class: to ranks on other nodes, to other ranks of its node.
A2A_LINKS = {"inter": "inter-node", "intra": "intra-node"}


@dataclass
class Section:
    """One plot on the page; `image` is None when it is omitted, and `note` says why (or what
    part of it is missing)."""

    title: str
    caption: str
    image: str | None
    note: str = ""


def read_metrics(run_dir: Path) -> tuple[list[Record], list[Record]]:
    """Training and evaluation records of `run_dir/metrics.jsonl`, each sorted by step. Lines
    that are not records (a torn last line, garbage) are skipped, with a warning that counts
    them; a repeated step keeps its last line."""
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass the run dir of python -m xpar.train")
    if not path.is_file():
        raise UserError(f"{path} not found; is {run_dir} the run dir of python -m xpar.train?")
    train: dict[int, Record] = {}
    evals: dict[int, Record] = {}
    records, skipped = read_records_counted(path)
    if records and skipped:
        report_warning(
            f"skipped {skipped} line(s) of {path} that are not metric records (a JSON object "
            f"with an integer step)"
        )
    for record in records:
        if "loss" in record:
            train[record["step"]] = record
        if "val_loss" in record:
            evals[record["step"]] = record
    if not train and not evals:
        not_records = f"; {skipped} line(s) that are not records" if skipped else ""
        raise UserError(f"{path} holds no metrics (no line with a step and a loss{not_records})")
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _number(value: Any) -> float | None:
    """A finite number as float; None for null, nan/inf, bools and anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def series(records: list[Record], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records whose `key` holds a finite number."""
    pairs = [(r["step"], v) for r in records if (v := _number(r.get(key))) is not None]
    steps_values = np.array(pairs, dtype=np.float64).reshape(-1, 2)
    return steps_values[:, 0].astype(np.int64), steps_values[:, 1]


def expert_load_SLE(train: list[Record]) -> tuple[np.ndarray, np.ndarray]:
    """steps_S and load_SLE (fraction of routed slots per expert; null entries become nan) of
    the records with a non-empty `expert_load` of the first such record's shape."""
    steps, loads = [], []
    for record in train:
        rows = record.get("expert_load")
        if not isinstance(rows, list) or not rows:
            continue
        try:
            load_LE = np.array([[np.nan if v is None else v for v in row] for row in rows], float)
        except (TypeError, ValueError):
            continue
        if load_LE.ndim == 2 and (not loads or load_LE.shape == loads[0].shape):
            steps.append(record["step"])
            loads.append(load_LE)
    if not loads:
        return np.zeros(0, np.int64), np.zeros((0, 0, 0))
    return np.asarray(steps, dtype=np.int64), np.stack(loads)


def summary(train: list[Record], evals: list[Record]) -> dict[str, float | int | None]:
    """The numbers of the summary table (None where the run did not log them)."""
    loss_steps, loss = series(train, "loss")
    val_steps, val = series(evals, "val_loss")
    _, gap = series(evals, "val_gap")
    _, floor = series(evals, "floor")
    _, tps = series(train, "tokens_per_s")
    _, skipped = series(train, "skipped_steps")
    best = int(np.argmin(val)) if len(val) else None
    a2a = {link: series(train, f"rank_a2a_{link}_bytes_mean")[1] / MB for link in A2A_LINKS}
    return {
        "last step": max((r["step"] for r in train + evals), default=None),
        "final train loss": float(loss[-1]) if len(loss) else None,
        "final train loss step": int(loss_steps[-1]) if len(loss) else None,
        "best val loss": float(val[best]) if best is not None else None,
        "best val loss step": int(val_steps[best]) if best is not None else None,
        "final val loss": float(val[-1]) if len(val) else None,
        "entropy floor": float(floor[-1]) if len(floor) else None,
        "final val gap": float(gap[-1]) if len(gap) else None,
        "mean tokens/s (last half)": float(tps[len(tps) // 2 :].mean()) if len(tps) else None,
        "skipped steps": int(skipped[-1]) if len(skipped) else None,
        **{
            f"mean {name} MB/rank/step": float(a2a[link].mean()) if len(a2a[link]) else None
            for link, name in A2A_LINKS.items()
        },
    }


def config_facts(run_dir: Path) -> dict[str, str]:
    """A few settings from the resolved config; empty when it is missing or unreadable."""
    try:
        cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    facts = {"run_name": str(cfg["run_name"])} if cfg.get("run_name") else {}
    if "moe" in cfg and cfg["moe"] is None:
        facts["moe"] = "none (dense model)"
    for key in CONFIG_FACTS:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, (dict, list)):
            facts[key] = str(node)
    return facts


def _save(fig: Figure, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=100, bbox_inches="tight")
    return name


def _line_figure(records: list[Record], key: str) -> Figure:
    fig = Figure(figsize=(10, 3))
    ax = fig.add_subplot()
    ax.plot(*series(records, key), color="tab:blue")
    ax.set(xlabel="step", ylabel=key)
    ax.grid(alpha=0.3)
    return fig


def _loss_figure(train: list[Record], evals: list[Record]) -> Figure:
    has_aux = len(series(train, "aux_loss")[1]) > 0
    fig = Figure(figsize=(10, 6 if has_aux else 4))
    axes = fig.subplots(2 if has_aux else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(*series(train, "loss"), color="tab:blue", label="train loss")
    val_steps, val = series(evals, "val_loss")
    if len(val):
        axes[0].plot(val_steps, val, "o-", color="tab:orange", label="val loss")
    if len(floor := series(evals, "floor")[1]):
        axes[0].axhline(floor[-1], color="tab:green", ls="--", label="entropy floor")
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend()
    if has_aux:
        axes[1].plot(*series(train, "aux_loss"), color="tab:purple")
        axes[1].set_ylabel("aux loss")
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


def _throughput_figure(train: list[Record]) -> Figure:
    fig = _line_figure(train, "tokens_per_s")
    mfu_steps, mfu = series(train, "mfu")
    if len(mfu):
        twin = fig.axes[0].twinx()
        twin.plot(mfu_steps, mfu * 100, color="tab:red", alpha=0.7)
        twin.set_ylabel("MFU (%)", color="tab:red")
    return fig


def _a2a_figure(train: list[Record]) -> Figure:
    fig = Figure(figsize=(10, 3))
    ax = fig.add_subplot()
    for (link, name), color in zip(A2A_LINKS.items(), ("tab:red", "tab:blue"), strict=True):
        steps, mean = series(train, f"rank_a2a_{link}_bytes_mean")
        ax.plot(steps, mean / MB, color=color, label=f"{name}, mean over ranks")
        steps, top = series(train, f"rank_a2a_{link}_bytes_max")
        ax.plot(steps, top / MB, color=color, ls="--", label=f"{name}, max over ranks")
    ax.set(xlabel="step", ylabel="MB sent per rank")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


CAPTIONS = {
    "loss": "Training loss per logged step, validation loss at each evaluation and the corpus' "
    "entropy floor (synthetic data only); below, the router's aux loss.",
    "expert_load": "Share of routed slots per expert × number of experts, per logged step: "
    "1 (white) is balanced, red experts are overloaded, blue ones starved.",
    "dropped_fraction": "Fraction of routed slots dropped at capacity (0 when dropless).",
    "tokens_per_s": "Training tokens per second over all ranks; MFU on the right axis when the "
    "peak FLOP/s is known (trainer.peak_tflops or a known GPU).",
    "lr": "Learning rate of the schedule per logged step.",
    "a2a": "All-to-all bytes each rank sent per logged step (dispatch and combine), to ranks on "
    "other nodes and to other ranks of its own node: the mean over ranks solid, the busiest "
    "rank dashed, so a straggler shows as a gap between them.",
}


def _loss_section(train: list[Record], evals: list[Record], out: Path) -> Section:
    if not train:
        return Section("Loss", CAPTIONS["loss"], None, "No training lines: no loss curve.")
    note = "" if evals else "No evaluation lines (val_loss) yet: no validation curve."
    return Section(
        "Loss", CAPTIONS["loss"], _save(_loss_figure(train, evals), out, "loss.png"), note
    )


def _load_section(train: list[Record], out: Path) -> Section:
    steps_S, load_SLE = expert_load_SLE(train)
    if len(steps_S):
        image = _save(load_figure(steps_S, load_SLE), out, "expert_load.png")
        return Section("Expert load", CAPTIONS["expert_load"], image)
    if any(r.get("expert_load") == [] for r in train):
        why = "Dense model (expert_load is empty): no expert-load heatmap."
    else:
        why = "No expert_load values in metrics.jsonl: no expert-load heatmap."
    return Section("Expert load", CAPTIONS["expert_load"], None, why)


def _a2a_section(train: list[Record], out: Path) -> Section:
    title = "All-to-all traffic"
    if any(len(series(train, f"rank_a2a_{link}_bytes_mean")[1]) for link in A2A_LINKS):
        return Section(title, CAPTIONS["a2a"], _save(_a2a_figure(train), out, "a2a.png"))
    if len(series(train, "a2a_bytes")[1]):
        why = "All-to-all metrics lack the inter/intra-node split (an older run): plot omitted."
    else:
        why = "No all-to-all metrics (single process or ep_size=1): nothing crossed ranks."
    return Section(title, CAPTIONS["a2a"], None, why)


def plot_sections(train: list[Record], evals: list[Record], out: Path) -> list[Section]:
    """Draw every plot the metrics allow into `out`; a Section per plot, omitted ones noted."""
    sections = [_loss_section(train, evals, out), _load_section(train, out)]
    lines = {
        "dropped_fraction": ("Dropped tokens", lambda: _line_figure(train, "dropped_fraction")),
        "tokens_per_s": ("Throughput", lambda: _throughput_figure(train)),
        "lr": ("Learning rate", lambda: _line_figure(train, "lr")),
    }
    for key, (title, draw) in lines.items():
        if len(series(train, key)[1]):
            sections.append(Section(title, CAPTIONS[key], _save(draw(), out, f"{key}.png")))
        else:
            why = f"No {key} values in metrics.jsonl: plot omitted."
            sections.append(Section(title, CAPTIONS[key], None, why))
    sections.append(_a2a_section(train, out))
    return sections


def _format(value: float | int | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _table(rows: dict[str, Any]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(_format(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{cells}</table>"


def _heatmap_links(run_dir: Path, out: Path) -> str:
    """Links to the trainer's own per-evaluation heatmaps under run_dir/plots/."""

    def step(path: Path) -> int:
        return int(re.sub(r"\D", "", path.stem) or 0)

    paths = sorted((run_dir / "plots").glob("expert_load_step*.png"), key=step)
    links = ", ".join(
        f'<a href="{html.escape(os.path.relpath(p, out))}">step {step(p)}</a>' for p in paths
    )
    return f"<p>Per-layer expert-load heatmaps at each evaluation: {links}.</p>" if links else ""


STYLE = """body{font-family:sans-serif;max-width:1040px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin-bottom:1em}th,td{padding:.2em .8em;text-align:left;
border-bottom:1px solid #ddd}th{font-weight:normal;color:#555}img{max-width:100%}
figure{margin:0 0 2em}figcaption,.note{color:#555;font-size:.95em}.note{font-style:italic}"""


def page(
    title: str,
    run_dir: Path,
    tables: dict[str, dict[str, Any]],
    sections: list[Section],
    links: str,
) -> str:
    """The HTML text of the report: `tables` (heading: rows) first, then the plots."""
    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>Run dir: <code>{html.escape(str(run_dir))}</code></p>",
    ]
    parts += [f"<h2>{html.escape(h)}</h2>{_table(rows)}" for h, rows in tables.items() if rows]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2><figure>")
        if s.image is not None:
            alt = html.escape(f"{s.title} plot of {title}", quote=True)
            parts.append(f'<img src="{html.escape(s.image)}" alt="{alt}">')
        parts.append(f"<figcaption>{html.escape(s.caption)}</figcaption>")
        if s.note:
            parts.append(f'<p class="note">{html.escape(s.note)}</p>')
        parts.append("</figure>")
    parts.append(f"{links}</body></html>\n")
    return "\n".join(parts)


def _check_out(run_dir: Path, out: Path) -> None:
    """The swap deletes what `out` held: allow only a missing dir, an empty one or a report."""
    if out.resolve() in (run_dir.resolve(), *run_dir.resolve().parents):
        raise UserError(f"--out {out} would hold the run dir {run_dir}; pick a dir inside it")
    if out.exists() and not (
        out.is_dir() and (not any(out.iterdir()) or (out / "index.html").is_file())
    ):
        raise UserError(f"--out {out} exists and is not a report (no index.html); pick another")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of `run_dir` into `out` (default run_dir/report); returns index.html.
    Drawn in `out`.tmp first, then swapped in, so a failure leaves any old report whole."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    train, evals = read_metrics(run_dir)
    _check_out(run_dir, out)
    config = config_facts(run_dir)
    title = f"xpar run {config.get('run_name', run_dir.resolve().name)}"
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sections = plot_sections(train, evals, tmp)
        tables = {"Summary": summary(train, evals), "Config": config}
        text = page(title, run_dir, tables, sections, _heatmap_links(run_dir, out.resolve()))
        (tmp / "index.html").write_text(text, encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpar.report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run dir of python -m xpar.train")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/report")
    args = parser.parse_args(argv)
    try:
        index = write_report(args.run_dir, args.out)
    except UserError as e:
        return report_error(str(e))
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
