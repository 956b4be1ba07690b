"""Matplotlib figures used by the experiments (Agg backend; files only, no windows)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _line_with_band(ax, x: Sequence[float], y: Sequence[float], err: Sequence[float] | None = None, *,
                    style: str = "o-", label: str | None = None) -> None:
    """One line of ``y`` over ``x`` and, if ``err`` is given, a ±``err`` band in the line's own colour."""
    y = np.asarray(y, float)
    line, = ax.plot(x, y, style, label=label)
    if err is not None:
        e = np.asarray(err, float)
        ax.fill_between(x, y - e, y + e, alpha=0.2, color=line.get_color())


def accuracy_vs_density(levels: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Test accuracy (%) against density (log scale, dense on the left); control branch dashed if present.

    Records of several replicas (``test_accuracy_std``, ``num_replicas``, as ``experiments.imp`` writes them) get a
    ± one-sample-std band and the seed count in the legend."""
    fig, ax = plt.subplots(figsize=(6, 4))

    def draw(records: Sequence[dict], style: str, label: str) -> None:
        n = records[0].get("num_replicas", 1)
        err = ([100 * r["test_accuracy_std"] for r in records]
               if all("test_accuracy_std" in r for r in records) else None)
        _line_with_band(ax, [r["density"] for r in records], [100 * r["test_accuracy"] for r in records], err,
                        style=style, label=label if n <= 1 else f"{label} (mean ± std, {n} seeds)")

    draw(levels, "o-", "IMP")
    br = [{"num_replicas": r.get("num_replicas", 1), **r["branch"]} for r in levels if "branch" in r]
    if br:
        draw(br, "s--", br[0]["name"])
    _density_axis(ax)
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    ax.set_title(title)
    _save(fig, path)


def layer_densities(levels: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Per-layer density at every level."""
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(levels[0]["layer_densities"])
    for name in names:
        ax.plot([r["level"] for r in levels], [r["layer_densities"][name] for r in levels], "o-", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("IMP level")
    ax.set_ylabel("density")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    _save(fig, path)


def curves(x: Sequence[float], ys: Mapping[str, Sequence[float]], path: str | Path, *, xlabel: str, ylabel: str,
           title: str = "", errors: Mapping[str, Sequence[float]] | None = None, logx: bool = False) -> None:
    """Several named curves over a shared x axis, optional ± error bands."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, y in ys.items():
        _line_with_band(ax, x, y, (errors or {}).get(name), label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    _save(fig, path)


def heatmap(matrix: np.ndarray, path: str | Path, *, rows: Sequence[str], cols: Sequence[str], title: str = "",
            vmin: float | None = 0.0, vmax: float | None = 1.0) -> None:
    """A labelled matrix (e.g. layer × layer similarity)."""
    m = np.asarray(matrix, float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(cols), 1.0 + 0.45 * len(rows)))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    _save(fig, path)


def decision_boundaries(panels: Sequence[tuple[str, np.ndarray]], xx: np.ndarray, yy: np.ndarray,
                        points: np.ndarray, labels: np.ndarray, path: str | Path, *, title: str = "",
                        num_classes: int | None = None) -> None:
    """2-D decision regions side by side: ``panels = [(title, predicted class on the grid (gh, gw)), …]``,
    ``points: (n, 2)`` with ``labels: (n,)`` drawn on top of each."""
    k = int(num_classes or (max(int(np.max(labels)), *(int(np.max(p)) for _, p in panels)) + 1))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.1), squeeze=False)
    cmap = plt.get_cmap("Set1", max(k, 2))
    for ax, (name, pred) in zip(axes[0], panels):
        ax.contourf(xx, yy, pred, levels=np.arange(-0.5, k), cmap=cmap, alpha=0.45)
        ax.scatter(points[:, 0], points[:, 1], c=labels, cmap=cmap, vmin=-0.5, vmax=k - 0.5, s=4,
                   edgecolors="none")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)


# ----------------------------------------------------------------------------------------------- IMP analyses
def _density_axis(ax) -> None:
    """Density on a log axis, dense on the left (as :func:`accuracy_vs_density`)."""
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("density (fraction of prunable weights kept)")
    ax.grid(True, which="both", alpha=0.3)


def similarity_vs_density(density: Sequence[float], per_layer: Mapping[str, Sequence[float | None]],
                          path: str | Path, *, metric: str, title: str = "",
                          err: Mapping[str, Sequence[float]] | None = None) -> None:
    """Similarity of each layer to the same layer of the dense network against density, one line per layer
    (``per_layer[layer][k]`` at ``density[k]``; ``None`` values are gaps), with a ±``err[layer]`` band if given."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in per_layer.items():
        _line_with_band(ax, density, [np.nan if v is None else v for v in values],
                        None if err is None else err[name], label=name)
    _density_axis(ax)
    ax.set_ylabel(f"{metric} to the dense layer")
    ax.legend(fontsize=7)
    ax.set_title(title)
    _save(fig, path)


def barrier_vs_density(series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
                       path: str | Path, *, ylabel: str = "error barrier (percentage points)", title: str = "",
                       scale: float = 100.0) -> None:
    """Instability (error barrier of linear interpolation) against density: ``series[label] = (densities,
    barriers, std or None)``, values multiplied by ``scale`` (100: fractions to percentage points)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (d, b, std) in series.items():
        _line_with_band(ax, d, scale * np.asarray(b, float), None if std is None else scale * np.asarray(std, float),
                        label=label)
    _density_axis(ax)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title)
    _save(fig, path)


def interpolation_paths(alphas: Sequence[float], curves: Mapping[str, Sequence[float]], path: str | Path, *,
                        ylabel: str = "test error (%)", title: str = "", scale: float = 100.0) -> None:
    """Error along the linear path between two networks (``α = 0`` … ``1``), one line per label (e.g. level)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    cmap = plt.get_cmap("viridis", max(len(curves), 2))
    for i, (label, y) in enumerate(curves.items()):
        ax.plot(alphas, scale * np.asarray(y, float), "o-", ms=3, color=cmap(i), label=label)
    ax.set_xlabel("interpolation α (0: the level's network, 1: its copy)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(title)
    _save(fig, path)


def overlap_vs_density(density: Sequence[float], observed: Mapping[str, Sequence[float | None]],
                       expected: Mapping[str, Sequence[float | None]], path: str | Path, *, ylabel: str,
                       title: str = "") -> None:
    """Mask overlap against density: ``observed[label]`` solid, ``expected[label]`` (random masks of the same
    densities) dashed in the same colour; ``None`` values are gaps."""
    fig, ax = plt.subplots(figsize=(6, 4))
    gap = lambda vs: [np.nan if v is None else v for v in vs]
    for i, (label, values) in enumerate(observed.items()):
        colour = f"C{i % 10}"
        ax.plot(density, gap(values), "o-", color=colour, label=label)
        if label in expected:
            ax.plot(density, gap(expected[label]), "--", color=colour, alpha=0.8, label=f"{label}, random")
    _density_axis(ax)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(title)
    _save(fig, path)


def methods_vs_density(series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
                       path: str | Path, *, dense: float | None = None, title: str = "") -> None:
    """Test accuracy (%) of several sparsity methods against density (log, dense on the left): ``series[label] =
    (densities, accuracies, std or None)`` as fractions; ``dense``: the dense network's accuracy, a dotted line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (d, acc, std) in series.items():
        order = np.argsort(d)[::-1]
        pick = lambda v: np.asarray(v, float)[order]
        _line_with_band(ax, pick(d), 100 * pick(acc), None if std is None else 100 * pick(std), label=label)
    if dense is not None:
        ax.axhline(100 * dense, color="k", ls=":", label="dense")
    _density_axis(ax)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    ax.set_title(title)
    _save(fig, path)
