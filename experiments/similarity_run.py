"""The similarity experiment as functions (``experiments.similarity`` is its command line, and its docstring
describes the outputs): the typed config :class:`SimilaritySettings` (the flags are derived from it) and
:func:`run` (the similarities of one IMP workdir). Importable without side effects.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import common, settings
from experiments import imp as imp_exp
from experiments.settings import setting
from jaxprune import analysis, checkpoint, conventions, plots, replicas, runs, similarity


def _linear_gram(x):
    """``x xᵀ`` of ``x`` divided by its largest magnitude: the variants below are cosines of Grams, invariant to
    scaling ``x``, and ``vdot(k, k)`` of activations of a few hundred overflows float32 unscaled (issue 28)."""
    x = x / jnp.maximum(jnp.max(jnp.abs(x)), jnp.finfo(x.dtype).tiny)
    return x @ x.T


def _gram_cosine(k, l):
    return jnp.vdot(k, l) / (jnp.sqrt(jnp.vdot(k, k)) * jnp.sqrt(jnp.vdot(l, l)))


def _study_centring(x):
    """The pruned-layer-similarity study's ``_centering`` as one stored version of its ``nn_comparison.py`` has it:
    ``K - K.mean(0) - K.mean(1) + K.mean()`` without ``keepdims``, so both mean vectors broadcast along rows
    (``K_ij - m_j - m_j + m̄`` for a symmetric K) instead of centring rows and columns."""
    k = _linear_gram(x)
    return k - k.mean(0)[None, :] - k.mean(1)[None, :] + k.mean()


def _trace_cosine(k, l):
    """That file's ``(K @ L).trace() / (‖K‖_F ‖L‖_F)`` (equal to the Gram cosine only for symmetric K or L)."""
    return jnp.sum(k * l.T) / (jnp.sqrt(jnp.vdot(k, k)) * jnp.sqrt(jnp.vdot(l, l)))


# Linear CKA computed the wrong ways seen in reference code, to explain published numbers (not similarities we
# recommend): Gram matrices not centred at all, centred on one side only (K − column means), or centred as one
# stored version of the pruned-layer-similarity study's code does.
STUDY_VARIANTS = {
    "cka_no_centring": (_linear_gram, _gram_cosine),
    "cka_one_sided_centring": (lambda x: (lambda k: k - k.mean(0, keepdims=True))(_linear_gram(x)), _gram_cosine),
    "cka_study_centring": (_study_centring, _trace_cosine),
}



def metrics_table() -> dict[str, tuple]:
    """Experiment metric name → (similarity name or (prepare, compare) pair, options): the similarity registry's
    presets (live: a similarity registered after import is included) and the study variants."""
    return {**analysis.SIMILARITY_METRICS, **{name: (pair, {}) for name, pair in STUDY_VARIANTS.items()}}


METRICS = metrics_table()  # at import: the default of --metrics
CCA_FAMILY = analysis.CCA_FAMILY

@dataclasses.dataclass(frozen=True)
class SimilaritySettings:
    """Every flag of ``experiments.similarity``, in flag order (:func:`experiments.settings.spec`)."""

    imp_workdir: str = setting("", "a finished (or partly finished) experiments.imp workdir")
    workdir: str = setting("", "output directory (default: <imp_workdir>/similarity)")
    seeds: tuple[str, ...] = setting([], "seeds of the IMP run to compare, each with its own dense network (default: "
                                         "all of its seeds)")
    metrics: tuple[str, ...] = setting(list(METRICS), f"similarities to compute, any of {', '.join(METRICS)}")
    layers: tuple[str, ...] = setting([], "representation names to compare (default: all, in forward order)")
    num_inputs: int = setting(1000, "the first N inputs of --probe_split are the fixed probe set")
    probe_split: str = setting("test", "split the probe inputs come from (train: the study's code probes the first "
                                       "training images)", ("test", "train"))
    cca_conv: str = setting("pixel", "conv maps for the CCA family's per-layer comparison", ("pixel", "flatten"))
    tokens: str = setting("mean", "token representations (n, tokens, d): 'mean' (default) compares the means over "
                                  "tokens (n, d) everywhere; 'flatten' compares each layer with its dense self on the "
                                  "n·tokens tokens as samples (n·tokens, d) and enters the layer x layer matrix as "
                                  "(n, tokens·d)", ("mean", "flatten"))
    keep_variance: float = setting(0.99, "SVCCA: variance fraction kept by each side's SVD")
    truncate: float = setting(0.0, "mean CCA / SVCCA: average only the leading correlations holding this mass "
                                   "(svcca's 0.98); 0 averages all")
    rbf_threshold: float = setting(1.0, "RBF CKA bandwidth as a fraction of the median distance")


SPEC = settings.spec(SimilaritySettings)
DEFAULTS = common.defaults(SPEC)


def _options(name: str, c: dict) -> tuple[str, dict]:
    sim, opts = metrics_table()[name]
    opts = dict(opts)
    if sim in ("mean_cca", "svcca") and c["truncate"]:
        opts["truncate"] = c["truncate"]
    if sim == "svcca":
        opts["keep_variance"] = c["keep_variance"]
    if sim == "rbf_cka":
        opts["threshold"] = c["rbf_threshold"]
    return sim, opts


def check_config(config: dict) -> dict:
    c = common.with_defaults(config, DEFAULTS)
    if not c["imp_workdir"]:
        raise ValueError("imp_workdir: required (an experiments.imp output directory)")
    table = metrics_table()
    bad = [m for m in c["metrics"] if m not in table]
    if bad or not c["metrics"]:
        raise ValueError(f"metrics={c['metrics']}: expected a non-empty subset of {list(table)}")
    common.check_range("rbf_threshold", c["rbf_threshold"], 0, low_open=True)
    if c["num_inputs"] < 4:
        raise ValueError(f"num_inputs={c['num_inputs']}: expected at least 4 (500 or more for stable estimates)")
    if c["probe_split"] not in ("test", "train"):
        raise ValueError(f"probe_split={c['probe_split']!r}: expected 'test' or 'train'")
    if c["cca_conv"] not in ("pixel", "flatten"):
        raise ValueError(f"cca_conv={c['cca_conv']!r}: expected 'pixel' or 'flatten'")
    if c["tokens"] not in analysis.TOKEN_MODES:
        raise ValueError(f"tokens={c['tokens']!r}: expected one of {', '.join(analysis.TOKEN_MODES)}")
    return c


def _matrix_view(a, tokens: str):
    """One layer's ``(n, p)`` for the layer × layer matrix: conv maps ``(n, h·w·c)``; token representations the
    means ``(n, d)`` (``tokens="mean"``) or ``(n, t·d)`` (``"flatten"``: every token's unit a feature)."""
    a = jnp.asarray(a)
    if a.ndim == 3 and tokens == "flatten":
        return a.reshape(a.shape[0], -1)
    return similarity.flatten_conv(analysis.token_samples(a, tokens), "flatten")


def representations(model, variables: list[dict], x: np.ndarray, names: list[str] | None
                    ) -> tuple[list[str], list[dict]]:
    """Per level ``{name: (n, …)}`` for the chosen layer names (all, in forward order, when ``names`` is empty):
    :func:`experiments.common.representations` — the library models' recorded activations, or for a user model
    (``--model=module.path:ClassName`` in the IMP run) every linear layer's output, named by its module path."""
    reps = [common.representations(model, v, x) for v in variables]
    avail = list(reps[0])
    names = list(names) if names else avail
    missing = [n for n in names if n not in avail]
    if missing:
        raise ValueError(f"layers: {missing} not among the model's representations {avail}")
    return names, [{n: r[n] for n in names} for r in reps]


def _finite_levels(reps: list[dict], records: list[dict], names: list[str]
                   ) -> tuple[list[dict], list[dict], list[dict]]:
    """Drop the levels whose representations hold NaN/Inf (a diverged training run), so the others are still
    compared; returns ``(reps, records, skipped)`` with one ``{level, density, reason}`` per dropped level. The
    dense network (the first level) must be finite: everything is compared against it."""
    bad = [[n for n in names if not np.isfinite(np.asarray(r[n])).all()] for r in reps]
    if bad[0]:
        raise ValueError(f"imp_workdir: level {records[0]['level']} (the dense network) has non-finite activations "
                         f"in layer(s) {bad[0]} on the probe inputs; nothing to compare against")
    skipped = [{"level": rec["level"], "density": rec["density"],
                "reason": f"non-finite activations in layer(s) {b} on the probe inputs (diverged?)"}
               for rec, b in zip(records, bad) if b]
    for sk in skipped:
        logging.warning("skipping level %d: %s", sk["level"], sk["reason"])
    keep = [k for k, b in enumerate(bad) if not b]
    return [reps[k] for k in keep], [records[k] for k in keep], skipped


def _compare(model, variables: list[dict], records: list[dict], x: np.ndarray, c: dict) -> dict:
    """One seed's similarities: each level (``variables[k]``, ``records[k]``) against level 0 on the probes ``x``."""
    names, reps = representations(model, variables, x, c["layers"])
    reps, records, skipped = _finite_levels(reps, records, names)
    logging.info("%d levels, %d inputs, layers %s", len(reps), len(x), names)

    flat = [jnp.stack([_matrix_view(r[n], c["tokens"]) for r in reps]) for n in names]  # (K, n, p)
    dense = [f[0] for f in flat]
    matrix, vs_dense = {}, {}
    for name in c["metrics"]:
        sim, opts = _options(name, c)
        m = np.asarray(similarity.pairwise(sim, flat, dense, **opts))  # (K, L, L)
        matrix[name] = m.tolist()
        per_layer = {n: [float(v) for v in m[:, i, i]] for i, n in enumerate(names)}
        for n in names:  # token samples (n·t, d): each layer against its dense self
            if reps[0][n].ndim == 3 and c["tokens"] == "flatten":
                tok = jnp.stack([analysis.token_samples(r[n], "flatten") for r in reps])
                per_layer[n] = [float(v) for v in similarity.pairwise(sim, [tok], [tok[0]], **opts)[:, 0, 0]]
        if sim in CCA_FAMILY and c["cca_conv"] == "pixel":
            for n in names:
                if reps[0][n].ndim == 4:
                    px = jnp.stack([similarity.flatten_conv(r[n], "pixel") for r in reps])
                    per_layer[n] = [float(v) for v in similarity.pairwise(sim, [px], [px[0]], **opts)[:, 0, 0]]
        vs_dense[name] = per_layer
        logging.info("%s: %s", name, {n: [round(v, 4) for v in vals] for n, vals in per_layer.items()})
    return {"levels": [{"level": r["level"], "density": r["density"], "test_accuracy": r["test_accuracy"]}
                       for r in records],
            "skipped_levels": skipped, "layers": names,
            "layer_shapes": {n: list(reps[0][n].shape[1:]) for n in names}, "vs_dense": vs_dense, "matrix": matrix}


def _chosen_seeds(asked, run_seeds: list[int], imp_workdir: str) -> list[int]:
    """``--seeds`` (default: every seed of the IMP run), each one the run trained (ValueError naming it else)."""
    if not asked:
        return list(run_seeds)
    seeds = list(common.seed_list(asked))
    missing = [s for s in seeds if s not in run_seeds]
    if missing:
        raise ValueError(f"seeds={','.join(map(str, seeds))}: seed(s) {missing} not trained in imp_workdir="
                         f"{imp_workdir}, whose seeds are {run_seeds}")
    return seeds


def _summarise(per_seed: list[dict]) -> dict:
    """Means (and sample stds) over seeds of every level's density, accuracy and similarities; a level a seed
    skipped (diverged) is summarised over the seeds that have it (``num_seeds``)."""
    levels = sorted({lv["level"] for p in per_seed for lv in p["levels"]})
    at = [{lv["level"]: k for k, lv in enumerate(p["levels"])} for p in per_seed]

    def over_seeds(get):  # get(seed result, its index of the level) → value; summaries per level
        return [conventions.summary([get(p, a[lv]) for p, a in zip(per_seed, at) if lv in a]) for lv in levels]

    acc = over_seeds(lambda p, k: p["levels"][k]["test_accuracy"])
    dens = over_seeds(lambda p, k: p["levels"][k]["density"])
    out = {"levels": [{"level": lv, "density": d["mean"], "test_accuracy": a["mean"], "test_accuracy_std": a["std"],
                       "num_seeds": a["n"]} for lv, d, a in zip(levels, dens, acc)],
           "vs_dense": {}, "vs_dense_std": {}, "matrix": {}}
    first = per_seed[0]
    for name in first["vs_dense"]:
        out["vs_dense"][name], out["vs_dense_std"][name] = {}, {}
        for n in first["layers"]:
            s = over_seeds(lambda p, k: p["vs_dense"][name][n][k])
            out["vs_dense"][name][n] = [v["mean"] for v in s]
            out["vs_dense_std"][name][n] = [v["std"] for v in s]
        out["matrix"][name] = [np.mean([p["matrix"][name][a[lv]] for p, a in zip(per_seed, at) if lv in a],
                                       axis=0).tolist() for lv in levels]
    return out


def run(config: SimilaritySettings | dict, workdir: str | Path | None = None) -> dict:
    """Compute the similarities described by ``config`` (a :class:`SimilaritySettings` or its dict); writes
    ``similarity.json`` and plots to ``workdir``."""
    c = check_config(settings.as_config(config))
    workdir = Path(workdir or c["workdir"] or Path(c["imp_workdir"]) / "similarity")
    with checkpoint.workdir_lock(workdir):
        return _run(c, workdir)


def _run(c: dict, workdir: Path) -> dict:
    """:func:`run` with the checked config ``c``, holding ``workdir``'s lock."""
    run_seeds = imp_exp.trained_seeds(c["imp_workdir"], "imp_workdir")
    seeds = _chosen_seeds(c["seeds"], run_seeds, c["imp_workdir"])  # refused before anything is loaded
    built, variables, records = imp_exp.load_levels(c["imp_workdir"])  # data as that run loaded them
    x = np.asarray((built.task.x_test if c["probe_split"] == "test" else built.task.x_train)[: c["num_inputs"]])
    per_seed = []
    for s in seeds:
        r = run_seeds.index(s)  # stacked replicas (several seeds): this seed's networks and level records
        v = variables if len(run_seeds) == 1 else [replicas.index(vv, r) for vv in variables]
        recs = [runs.replica_record(rec, r) for rec in records]
        try:
            per_seed.append({"seed": s, **_compare(built.model, v, recs, x, c)})
        except ValueError as e:
            raise ValueError(f"seed {s}: {e}" if len(seeds) > 1 else str(e)) from None
    if len(per_seed) == 1:
        summary = {k: per_seed[0][k] for k in ("levels", "vs_dense", "matrix")}
    else:
        summary = _summarise(per_seed)
    result = {
        "config": {**c, "workdir": str(workdir)},
        "environment": common.environment(),
        "imp_config": checkpoint.read_record(Path(c["imp_workdir"]) / "config.json"),
        "num_inputs": int(len(x)),
        "seeds": seeds,
        "levels": summary["levels"],
        "skipped_levels": [{"seed": p["seed"], **sk} for p in per_seed for sk in p["skipped_levels"]],
        "layers": per_seed[0]["layers"],
        "layer_shapes": per_seed[0]["layer_shapes"],
        "conv": {"matrix": "flatten", "vs_dense_cca_family": c["cca_conv"], "vs_dense_kernel_metrics": "flatten"},
        "tokens": {"matrix": "mean" if c["tokens"] == "mean" else "features (n, tokens·d)",
                   "vs_dense": "mean" if c["tokens"] == "mean" else "samples (n·tokens, d)"},
        "vs_dense": summary["vs_dense"],
        **({"vs_dense_std": summary["vs_dense_std"]} if "vs_dense_std" in summary else {}),
        "matrix": summary["matrix"],
        **({"per_seed": per_seed} if len(per_seed) > 1 else {}),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_record(workdir / "similarity.json", result)
    plot(result, workdir)
    return result


def plot(result: dict, workdir: Path) -> None:
    """Per metric: similarity to the dense layer vs density (one curve per layer); heatmaps of every pruned level."""
    density = [lv["density"] for lv in result["levels"]]
    for name, per_layer in result["vs_dense"].items():
        seeds = f" (mean ± std over {len(result['seeds'])} seeds)" if len(result["seeds"]) > 1 else ""
        plots.similarity_vs_density(density, per_layer, workdir / f"vs_density_{name}.png", metric=name,
                                    title=f"{name}: each layer vs the dense layer{seeds}",
                                    err=result.get("vs_dense_std", {}).get(name))
        for k, lv in enumerate(result["levels"][1:], start=1):
            plots.heatmap(np.asarray(result["matrix"][name][k]), workdir / f"matrix_{name}_level{k}.png",
                          rows=[f"{n} (lvl {k})" for n in result["layers"]], cols=result["layers"],
                          title=f"{name}: level {k} (density {lv['density']:.3f}) vs dense",
                          vmin=min(0.0, float(np.min(result["matrix"][name][k]))))
