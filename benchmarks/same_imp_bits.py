"""Bit-for-bit check of ``jaxprune.imp.run`` across a refactor: records, resumed records and checkpoints.

Complements ``benchmarks/same_numbers.py`` (the experiments' results) with what it does not cover: the checkpoint
trees (values and shapes, as ``on_checkpoint`` and ``load_level`` hand them out), a run resumed from level 1,
K = 2 replicas (vmap and unrolled), a conv net (python loop), step / lr / finetune rewinding, ``eval_every_epoch``
and an iterator Task with an optax optimizer and a custom loss. Run it from each source tree (same venv), then
compare (every entry must report 0 differing numbers; timings are left out):

    git worktree add /tmp/oldtree <rev>
    JAXPRUNE_DATA_DIR=... python benchmarks/same_imp_bits.py /tmp/oldtree /tmp/old.pkl
    JAXPRUNE_DATA_DIR=... python benchmarks/same_imp_bits.py . /tmp/new.pkl
    python benchmarks/same_imp_bits.py --compare /tmp/old.pkl /tmp/new.pkl
"""
import pathlib
import pickle
import shutil
import sys
import tempfile


def _strip(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if "seconds" not in k and k != "history"}
    out["history"] = [{k: v for k, v in h.items() if "per_s" not in k} for h in rec.get("history", [])]
    return out


def _run(task, cfg) -> dict:
    """Records, checkpoint trees, records after resuming from level 1, and the last level as loaded."""
    import jax
    import numpy as np
    from jaxprune import imp
    trees = {}
    keep = lambda k, t: trees.__setitem__(k, jax.tree_util.tree_map(np.asarray, t))
    with tempfile.TemporaryDirectory() as w:
        recs = imp.run(task, cfg, w, on_checkpoint=keep)
        shutil.rmtree(pathlib.Path(w) / f"level_{cfg.levels}")
        recs2 = imp.run(task, cfg, w)
        loaded = jax.tree_util.tree_map(np.asarray, imp.load_level(w, cfg.levels, task))
    return dict(recs=[_strip(r) for r in recs], recs2=[_strip(r) for r in recs2], trees=trees, loaded=loaded)


def array_cases() -> dict:
    import numpy as np
    from jaxprune import data, imp, models, train
    d = data.load("digits", "train")
    x, y = train.to_device(d.images[:256].astype(np.float32), d.labels[:256])
    xt, yt = train.to_device(d.images[256:400].astype(np.float32), d.labels[256:400])
    mlp, vgg = models.MLP((24, 10)), models.VGG((4, 'M', 6), 10)
    cases = {"mlp_init_random": (mlp, {}, dict(branch="random_mask")),
             "mlp_step_reinit": (mlp, {}, dict(rewind="step", rewind_step=5, branch="reinit")),
             "mlp_lr_python": (mlp, dict(loop="python"), dict(rewind="lr")),
             "mlp_finetune_eval": (mlp, dict(eval_every_epoch=True), dict(rewind="finetune")),
             "vgg_init_random": (vgg, {}, dict(branch="random_mask")),
             "mlp_k2_vmap": (mlp, dict(num_replicas=2), dict(branch="random_mask")),
             "mlp_k2_unrolled": (mlp, dict(num_replicas=2, replica_layout="unrolled", loop="python"),
                                 dict(branch="reinit")),
             "vgg_k2_vmap": (vgg, dict(num_replicas=2), {})}
    out = {}
    for name, (model, task_kw, cfg_kw) in cases.items():
        task = imp.Task(model, x, y, xt, yt, optim=train.OptimConfig("momentum", 0.05), num_steps=24, batch_size=32,
                        seed=1, **task_kw)
        out[name] = _run(task, imp.ImpConfig(levels=2, fraction=0.5, **cfg_kw))
    return out


def iterator_cases() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jaxprune import data, imp, models
    d = data.load("digits", "train")
    xs, ys = d.images[:256].astype(np.float32), d.labels[:256]

    def batches(start):
        for s in range(start, 10_000):
            i = (s * 32) % 224
            yield xs[i:i + 32], ys[i:i + 32]

    test = lambda: [(xs[:100], ys[:100]), (xs[100:150], ys[100:150])]
    loss = lambda logits, y: jnp.mean(optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, 10) * 0.9 + 0.01))
    out = {}
    for rewind in ("init", "lr", "step"):
        task = imp.Task(models.MLP((16, 10)), optim=optax.adamw(optax.cosine_decay_schedule(1e-2, 20)),
                        num_steps=20, seed=2, loss=loss, train_batches=batches, test_batches=test,
                        eval_every_epoch=True)
        cfg = imp.ImpConfig(levels=2, fraction=0.5, rewind=rewind, rewind_step=4 if rewind == "step" else 0,
                            branch="reinit")
        out[f"iterator_adamw_{rewind}"] = _run(task, cfg)
    return out


def _flat(tree, prefix: str = "") -> dict:
    import jax
    import numpy as np
    if isinstance(tree, dict):
        return {k: v for key, val in tree.items() for k, v in _flat(val, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, val in enumerate(tree) for k, v in _flat(val, f"{prefix}/{i}").items()}
    if isinstance(tree, (int, float, str, bool, np.ndarray, np.generic, type(None))):
        return {prefix: tree}
    return {f"{prefix}{jax.tree_util.keystr(p)}": v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def compare(old: str, new: str) -> None:
    """Per case: how many entries (record numbers, checkpoint leaves) differ in value or shape."""
    import numpy as np
    a, b = (pickle.load(open(p, "rb")) for p in (old, new))

    def same(x, y):
        x, y = np.asarray(x), np.asarray(y)
        return x.shape == y.shape and np.array_equal(x, y, equal_nan=x.dtype.kind in "fc")

    for name in sorted(set(a) | set(b)):
        timing = lambda k: "seconds" in k or "per_s" in k  # wall times, at any depth (branches, replicas)
        fa, fb = ({k: v for k, v in _flat(t.get(name, {})).items() if not timing(k)} for t in (a, b))
        bad = sorted(k for k in set(fa) | set(fb) if k not in fa or k not in fb or not same(fa[k], fb[k]))
        print(f"{name:24s} {len(fa)} vs {len(fb)} entries; differing: {len(bad)} {bad[:3]}")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(*sys.argv[2:4])
        sys.exit(0)
    sys.path.insert(0, sys.argv[1])  # the source tree to import jaxprune from
    res = array_cases()
    res.update(iterator_cases())
    pickle.dump(res, open(sys.argv[2], "wb"))
