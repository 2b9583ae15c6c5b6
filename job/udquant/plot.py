"""The card's picture: mean KL divergence against bits per weight, one labelled point per quant.

Drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from udquant import __version__
from udquant.evaluate import QuantEval
from udquant.out_dir import PLOT_SOFTWARE
from udquant.workdir import atomic_output

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_kld_vs_bpw(points: Sequence[QuantEval], path: Path, *, title: str = "") -> Path:
    """Write a PNG of mean KLD (with its standard error) vs bits per weight; atomically."""
    if not points:
        raise ValueError("nothing to plot")
    figure = Figure(figsize=(9.0, 5.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    groups = list(dict.fromkeys(point.group for point in points))
    for index, group in enumerate(groups):
        members = [point for point in points if point.group == group]
        axes.errorbar([p.bits_per_weight for p in members], [p.result.mean_kld for p in members],
                      yerr=[p.result.mean_kld_stderr for p in members], fmt=MARKERS[index % len(MARKERS)],
                      capsize=3, label=group or None)
    # One label per file kind and size: variants of one level share a BPW and the legend tells them apart.
    tops: dict[tuple[str, float], float] = {}
    for point in points:
        key = (point.label, round(point.bits_per_weight, 3))
        tops[key] = max(tops.get(key, 0.0), point.result.mean_kld)
    for (label, bpw), kld in tops.items():
        axes.annotate(label, (bpw, kld), textcoords="offset points", xytext=(6, 4), fontsize=8)
    # KLD spans orders of magnitude between quant levels; a linear axis hides the small ones.
    if all(point.result.mean_kld > 0 for point in points):
        axes.set_yscale("log")
    axes.set_xlabel("bits per weight")
    axes.set_ylabel("mean KL divergence to BF16 (lower is better)")
    axes.grid(True, which="both", alpha=0.3)
    if any(groups):  # outside the axes: points fill the corners a legend would pick
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    with atomic_output(path) as partial:
        figure.savefig(partial, format="png", metadata={"Software": f"{PLOT_SOFTWARE} {__version__}"})
    return path
