"""Every number of the library's models and of the experiments (tiny settings), for checking that a refactor keeps
them: run it once from each source tree (same venv) and compare the two JSON files.

    git worktree add /tmp/oldtree <rev>
    JAXPRUNE_DATA_DIR=... python benchmarks/same_numbers.py /tmp/oldtree /tmp/old.json
    JAXPRUNE_DATA_DIR=... python benchmarks/same_numbers.py . /tmp/new.json
    python benchmarks/same_numbers.py --compare /tmp/old.json /tmp/new.json

Entries: logits of structured removal, masking and neuron merging (both modes, both BN scales) and the MACs of
``count_flops`` on an MLP, a VGG, LeNet5 and a ResNet; the unit scores of the four criteria (weight, grad, taylor,
lrp); and every number in the results of ``experiments.imp`` (two levels with a random-mask control),
``oneshot``, ``filter_prune``, ``merge``, ``sparse_train`` (gradual, rigl, static) and ``head_prune`` (a tiny ViT)
on the embedded digits with a few training steps and of ``lrp_toy`` on moons (a 16-16 net, 3 epochs; timings and
paths left out), and of an IMP run of two replicas with every per-level analysis followed by ``experiments.similarity``
(``imp-analyses``). ``--compare`` prints max |old − new| per entry and names entries only one side has.

Each experiment's config starts from its defaults as they were at a30cbbb (``same_numbers_defaults.json``), so an
entry moves when a computation changes, not when a flag's default does (the defaults were unified later).
"""
import json
import sys
import tempfile
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SKIP = ("time", "seconds", "wall", "date", "path", "dir", "git", "host", "version", "started", "finished_at")


def compare(old: str, new: str) -> None:
    """Print max |old − new| per entry of two JSON files written by this script."""
    a, b = (json.load(open(p)) for p in (old, new))
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            print(f"{k:40s} only in {'new' if k not in a else 'old'}")
        elif isinstance(a[k], dict):
            common = sorted(set(a[k]) & set(b[k]))
            d = {q: abs(a[k][q] - b[k][q]) for q in common}
            worst = max(d, key=d.get) if d else None
            print(f"{k:40s} max |old - new| = {d.get(worst, 0.0):.3g} over {len(common)} numbers"
                  + (f" (at {worst})" if d.get(worst) else "")
                  + "".join(f"; only in {side}: {sorted(set(x) - set(y))[:4]}" for side, x, y in
                            (("old", a[k], b[k]), ("new", b[k], a[k])) if set(x) - set(y)))
        elif np.shape(a[k]) != np.shape(b[k]):
            print(f"{k:40s} shapes differ: {np.shape(a[k])} vs {np.shape(b[k])}")
        else:
            d = np.abs(np.asarray(a[k], float) - np.asarray(b[k], float))
            print(f"{k:40s} max |old - new| = {float(d.max()) if d.size else 0.0:.3g}")


def _models():
    from jaxprune import models
    return [("mlp", models.MLP((30, 20, 10)), (4, 8, 8, 1), {"dense_0": 12, "dense_1": 9}),
            ("vgg", models.VGG((8, 'M', 12, 'M', 16), 10), (4, 8, 8, 3), {"conv_0": 5, "conv_1": 7, "conv_2": 9}),
            ("lenet5", models.LeNet5(), (4, 28, 28, 1), {"conv_1": 9, "dense_0": 60}),
            ("resnet", models.ResNet(depth=8, width=4), (4, 8, 8, 3), {"block0_0/conv_0": 3, "block1_0/conv_0": 5})]


def library_numbers() -> dict:
    """Logits, MACs and criteria scores of the library's models (random variables, BN statistics perturbed)."""
    from jaxprune import criteria, merging, models, structured
    out = {}
    for name, m, shp, widths in _models():
        v = models.init(m, jax.random.PRNGKey(0), shp)
        v = jax.tree_util.tree_map_with_path(lambda p, a: a + 0.2 * jax.random.uniform(
            jax.random.PRNGKey(len(str(p))), a.shape) if 'batch_stats' in str(p) or 'scale' in str(p) else a, v)
        x = jax.random.normal(jax.random.PRNGKey(3), shp)
        y = jnp.arange(shp[0]) % 10
        out[f"{name}-logits"] = np.asarray(m.apply(v, x, **_kw(m))).tolist()
        out[f"{name}-macs"] = [float(structured.count_flops(m, v, shp)["macs"])]
        for crit in ("weight", "grad", "taylor", "lrp"):  # Yeom et al.'s four (criteria.YEOM)
            try:
                s = criteria.scores(crit, m, v, x, y)
                out[f"{name}-{crit}"] = np.concatenate([np.ravel(s[k]) for k in sorted(s)]).tolist()
            except Exception as e:  # a refusal is a number too: recorded by its first line
                out[f"{name}-{crit}-refused"] = [zlib.crc32(str(e).splitlines()[0].encode())]
        for mode in ("merge", "prune"):
            for bn_scale in ("exact", "paper"):
                r = merging.merge(m, v, widths, mode=mode, criterion="l2", bn_scale=bn_scale)
                out[f"{name}-{mode}-{bn_scale}"] = np.asarray(r.model.apply(r.variables, x)).tolist()
        keep = structured.select_layers(m, v, widths, "l1")
        sm, sv = structured.remove_many(m, v, keep)
        out[f"{name}-remove"] = np.asarray(sm.apply(sv, x)).tolist()
        out[f"{name}-mask"] = np.asarray(m.apply(structured.mask_many(m, v, keep), x)).tolist()
    return out


def selection_numbers() -> dict:
    """Kept units of ``structured.select_layers`` under every weight criterion and under data-driven scores
    (normalized=False, as filter_prune), on the MLP, VGG and ResNet; of ``select_groups`` (heads across q/k/v and
    the MLP units) on a tiny ViT under the same criteria."""
    from jaxprune import criteria, models, structured
    weight_names, key = ("l1", "l2", "random", "kmeans", "l2_gm"), jax.random.PRNGKey(5)
    vit = models.ViT(num_classes=10, patch=4, width=16, depth=1, heads=4, mlp=16)
    cases = [(n, m, shp, w, None) for n, m, shp, w in _models() if n != "lenet5"] + [("vit", vit, (4, 8, 8, 1), None, 0)]
    out = {}
    for name, m, shp, widths, _ in cases:
        v = models.init(m, jax.random.PRNGKey(0), shp)
        x, y = jax.random.normal(jax.random.PRNGKey(3), shp), jnp.arange(shp[0]) % 10
        groups = structured.unit_groups(m, v, x=shp) if widths is None else None
        n_keep = ({g[0]: w - w // 2 for g, w in zip(groups, structured.group_widths(m, v, groups, x=shp).values())}
                  if widths is None else widths)
        select = structured.select_layers if widths is not None else structured.select_groups
        sources = [(c, c) for c in weight_names] + [
            (c, criteria.scores(c, m, v, x, y, normalized=False)) for c in ("grad", "taylor")]
        for label, src in sources:
            keep = select(m, v, n_keep, src if isinstance(src, str) else dict(src), key=key, x=shp)
            out[f"select-{name}-{label}"] = np.concatenate([np.asarray(keep[k], float) for k in sorted(keep)]).tolist()
    return out


def _kw(m) -> dict:
    import inspect
    return {"train": False} if "train" in inspect.signature(type(m).__call__).parameters else {}


def _numbers(tree, prefix: str = "") -> dict:
    """``{key path: number}`` of every int/float leaf of a results tree, timings and paths left out."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix: float(tree)}
    else:
        return {}
    out = {}
    for k, v in items:
        if any(s in str(k).lower() for s in SKIP):
            continue
        out.update(_numbers(v, f"{prefix}/{k}"))
    return out


DIGITS = dict(dataset="digits", model="mlp", hidden=["24", "12"], normalize="none", optimizer="momentum", lr=0.05,
              weight_decay=0.0, schedule="constant", milestones=[], batch_size=32, seeds=["0"])

PINNED = json.loads((Path(__file__).parent / "same_numbers_defaults.json").read_text())  # experiment -> defaults

ONESHOT = ("dataset", "model", "hidden", "normalize", "optimizer", "lr", "batch_size", "seeds")  # its keys


def experiment_numbers() -> dict:
    """Every number of the experiments' results at tiny settings (one entry per experiment)."""
    from experiments import filter_prune, imp, lrp_toy, merge, oneshot, sparse_train
    runs = {
        "imp": lambda w: imp.train_and_evaluate({**PINNED["imp"], **DIGITS, "training_steps": "40", "levels": 2,
                                                 "prune_fraction": 0.5, "rewind": "init", "branch": "random_mask"}, w),
        "oneshot": lambda w: oneshot.run({**PINNED["oneshot"], **{k: DIGITS[k] for k in ONESHOT},
                                          "training_steps": "60",
                                          "sparsity": ["0", "0.5", "0.9"], "methods": ["weight", "unit"]}, w),
        "filter_prune": lambda w: filter_prune.run({**PINNED["filter_prune"],
                                                    **{k: v for k, v in DIGITS.items() if k != "hidden"},
                                                    "model": "vgg", "vgg_cfg": ["6", "M", "10"],
                                                    "training_steps": "40", "finetune_steps": "5",
                                                    "finetune_lr": 0.01, "prune_fraction": 0.25,
                                                    "max_pruned_fraction": 0.8, "max_rounds": 2}, w),
        "merge": lambda w: merge.run({**PINNED["merge"], **DIGITS, "training_steps": "60", "sparsity": ["0.5"],
                                      "criteria": ["l1", "l2"]}, w),
        "sparse_train": lambda w: sparse_train.train_and_evaluate(
            {**PINNED["sparse_train"], **DIGITS, "training_steps": "40", "methods": ["gradual", "rigl", "static"],
             "sparsity": ["0.8"], "prune_begin": "0", "prune_end": "20", "prune_frequency": "10",
             "update_interval": "10", "update_end": "30"}, w),
        "lrp_toy": lambda w: lrp_toy.run({**PINNED["lrp_toy"], "datasets": ["moons"], "num_train": 128,
                                          "hidden": ["16", "16"], "training_steps": "3ep", "batch_size": 32,
                                          "samples_per_class": ["1", "3"], "seeds": ["0:2"], "n_prune": 8,
                                          "plot_n": 0}, w),
    }
    runs["head_prune"] = _head_prune
    runs["imp-analyses"] = _imp_analyses
    out = {}
    for name, fn in runs.items():
        with tempfile.TemporaryDirectory() as w:
            try:
                out[f"exp-{name}"] = _numbers(fn(w))
            except Exception as e:  # recorded, so one refusal does not lose the other entries
                out[f"exp-{name}-refused"] = [zlib.crc32(str(e).splitlines()[0].encode())]
                print(f"{name}: {str(e).splitlines()[0]}", file=sys.stderr)
    return out


def _head_prune(w: str) -> dict:
    """``experiments.head_prune`` on a ViT of 2 heads (4×4 patches of the 8×8 digits; 60 Adam steps: 43 % test
    accuracy, so criteria differ): taylor (with its reference-size check) and weight at one fraction, with a 5-step
    fine-tuning round."""
    from experiments import head_prune
    vit = '{"patch": 4, "width": 16, "depth": 1, "heads": 2, "mlp": 16}'
    return head_prune.run({**PINNED["head_prune"], "dataset": "digits", "normalize": "none", "model":
                           "jaxprune.models:ViT", "model_kwargs": vit, "lr": 0.01, "training_steps": "60",
                           "batch_size": 32, "criteria": ["taylor", "weight"], "fractions": ["0.5"],
                           "reference_examples": 8, "reference_sizes": ["2", "8"], "finetune_steps": "5",
                           "seeds": ["0"]}, w)


def _imp_analyses(w: str) -> dict:
    """IMP of two replicas with every per-level analysis, then ``experiments.similarity`` on its workdir."""
    from experiments import imp, similarity
    c = {**PINNED["imp"], **DIGITS, "seeds": ["0", "1"], "training_steps": "30", "levels": 1, "prune_fraction": 0.5,
         "rewind": "finetune", "analyses": ["similarity", "overlap", "instability"], "analysis_examples": 64,
         "instability_points": 3}
    res = imp.train_and_evaluate(c, w)
    analyses = json.load(open(f"{w}/analysis.json"))
    sims = similarity.run({"imp_workdir": w, "num_inputs": 64, "metrics": ["linear_cka", "mean_cca"]})
    return {"results": res, "analysis": analyses, "similarity": sims}


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(*sys.argv[2:4])
        sys.exit(0)
    sys.path.insert(0, sys.argv[1])  # the source tree to import jaxprune and experiments from
    res = library_numbers()
    res.update(selection_numbers())
    res.update(experiment_numbers())
    json.dump(res, open(sys.argv[2], "w"))
