"""Multi-seed plots show the spread: a ± std band that grows with the std, absent for one seed, in its line's colour."""
import matplotlib.image as mpimg
import numpy as np
from matplotlib.colors import to_rgb

from jaxprune import plots


def _levels(std: float | None, n: int = 3) -> list[dict]:
    out = []
    for k, (d, a) in enumerate(zip((1.0, 0.8, 0.64, 0.512), (0.97, 0.975, 0.972, 0.968))):
        r = {"level": k, "density": d, "test_accuracy": a, "layer_densities": {"w": d}}
        if std is not None:
            r.update(test_accuracy_std=std, num_replicas=n)
        out.append(r)
    return out


def _tinted(path) -> int:
    """Pixels neither white nor grey (the band is a light tint of the line's colour)."""
    img = mpimg.imread(path)[..., :3]
    spread = img.max(-1) - img.min(-1)
    return int(((spread > 0.05) & (img.min(-1) > 0.6)).sum())


def test_band_present_for_seeds_and_grows_with_std(tmp_path):
    counts = {}
    for name, std in (("one", None), ("small", 0.001), ("large", 0.004)):
        plots.accuracy_vs_density(_levels(std), tmp_path / f"{name}.png", "t")
        counts[name] = _tinted(tmp_path / f"{name}.png")
    assert counts["small"] > counts["one"] + 500
    assert counts["large"] > counts["small"] + 500


def test_branch_gets_its_band(tmp_path):
    base = _levels(0.002)
    with_branch = [{**r, "branch": {"name": "random", "density": r["density"], "test_accuracy": r["test_accuracy"] - 0.01,
                                    "test_accuracy_std": 0.003}} for r in base]
    no_std = [{**r, "branch": {k: v for k, v in r["branch"].items() if k != "test_accuracy_std"}} for r in with_branch]
    plots.accuracy_vs_density(with_branch, tmp_path / "a.png")
    plots.accuracy_vs_density(no_std, tmp_path / "b.png")
    assert _tinted(tmp_path / "a.png") > _tinted(tmp_path / "b.png") + 500


def _captured(monkeypatch):
    """Replace the file writer by one that keeps the figure, so its artists can be read back."""
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    return figs


def test_band_colour_is_its_line_colour_even_after_a_curve_without_band(monkeypatch):
    figs = _captured(monkeypatch)
    x = [0.5, 0.6, 0.7]
    ys = {"original": [90, 90, 90], "merge": [88, 85, 80], "prune": [87, 80, 70]}
    plots.curves(x, ys, "unused.png", xlabel="x", ylabel="y", errors={"merge": [1, 2, 3], "prune": [2, 3, 4]})
    plots.barrier_vs_density({"a": ([1.0, 0.5], [0.01, 0.02], None), "b": ([1.0, 0.5], [0.02, 0.03], [0.01, 0.01])},
                             "unused.png")
    (curves_ax,), (barrier_ax,) = figs[0].axes, figs[1].axes
    lines = {ln.get_label(): to_rgb(ln.get_color()) for ln in curves_ax.lines}
    bands = [tuple(c.get_facecolor()[0][:3]) for c in curves_ax.collections]
    assert bands == [lines["merge"], lines["prune"]]
    assert lines["merge"] != lines["original"]
    (band,) = barrier_ax.collections
    assert tuple(band.get_facecolor()[0][:3]) == to_rgb(barrier_ax.lines[1].get_color())
