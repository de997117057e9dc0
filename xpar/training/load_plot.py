"""The expert-load heatmap over steps: `plots/expert_load_over_time.png` (the tracker) and the
static report's (`python -m xpar.report`).

Legend: S steps, L MoE layers, E experts.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

MAX_LAYER_PANELS = 4  # more MoE layers than this: the mean over layers, then the first and last


def load_panels_ES(load_SLE: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(label, rel_ES) heatmap panels: load × num_experts (1 = balanced), experts by steps.
    Every MoE layer when there are few, else the mean over layers and the first and last."""
    num_layers, num_experts = load_SLE.shape[1:]
    rel_SLE = load_SLE * num_experts
    if num_layers <= MAX_LAYER_PANELS:
        return [(f"MoE layer {i}", rel_SLE[:, i].T) for i in range(num_layers)]
    return [
        (f"mean over {num_layers} MoE layers", np.nanmean(rel_SLE, axis=1).T),
        ("MoE layer 0", rel_SLE[:, 0].T),
        (f"MoE layer {num_layers - 1}", rel_SLE[:, -1].T),
    ]


def _edges(centers: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres, so uneven step spacing (gaps, resumes) stays true."""
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    mid = (centers[1:] + centers[:-1]) / 2
    return np.concatenate([[2 * centers[0] - mid[0]], mid, [2 * centers[-1] - mid[-1]]])


def load_figure(steps_S: np.ndarray, load_SLE: np.ndarray) -> Figure:
    """Expert load × num_experts over steps, experts by steps, per panel of load_panels_ES."""
    panels = load_panels_ES(load_SLE)
    num_experts = load_SLE.shape[2]
    fig = Figure(figsize=(10, len(panels) * min(1.0 + 0.18 * num_experts, 6)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    top = np.nanmax(load_SLE) * num_experts if np.isfinite(load_SLE).any() else 2.0
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(top)))
    x_edges = _edges(steps_S.astype(np.float64))
    y_edges = np.arange(num_experts + 1) - 0.5
    for ax, (label, rel_ES) in zip(axes, panels, strict=True):
        mesh = ax.pcolormesh(x_edges, y_edges, rel_ES, cmap="RdBu_r", norm=norm)
        ax.set(ylabel="expert", title=label)
        ax.invert_yaxis()
    axes[-1].set_xlabel("step")
    fig.colorbar(mesh, ax=list(axes), label="load × num_experts (1 = balanced)")
    return fig
