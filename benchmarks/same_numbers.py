"""Logits of structured removal and neuron merging (both modes, both BN scales) on library models, for checking
that a refactor keeps every number: run it once from each source tree and compare the two JSON files.

    git worktree add /tmp/oldtree <rev>
    python benchmarks/same_numbers.py /tmp/oldtree /tmp/old.json
    python benchmarks/same_numbers.py . /tmp/new.json
    python benchmarks/same_numbers.py --compare /tmp/old.json /tmp/new.json
"""
import json
import sys

import jax, jax.numpy as jnp, numpy as np
if sys.argv[1] == "--compare":
    a, b = (json.load(open(p)) for p in sys.argv[2:4])
    for k in a:
        print(f"{k:24s} max |old - new| = {float(np.abs(np.array(a[k]) - np.array(b[k])).max()):.3g}")
    sys.exit(0)
sys.path.insert(0, sys.argv[1])  # the source tree to import jaxprune from
from jaxprune import models, merging, structured
out = {}
for name, m, shp, widths in [("mlp", models.MLP((30, 20, 10)), (4, 8, 8, 1), {"dense_0": 12, "dense_1": 9}),
                             ("vgg", models.VGG((8, 'M', 12, 'M', 16), 10), (4, 8, 8, 3), {"conv_0": 5, "conv_1": 7, "conv_2": 9}),
                             ("lenet5", models.LeNet5(), (4, 28, 28, 1), {"conv_1": 9, "dense_0": 60})]:
    v = models.init(m, jax.random.PRNGKey(0), shp)
    v = jax.tree_util.tree_map_with_path(lambda p, a: a + 0.2 * jax.random.uniform(jax.random.PRNGKey(len(str(p))), a.shape) if 'batch_stats' in str(p) or 'scale' in str(p) else a, v)
    x = jax.random.normal(jax.random.PRNGKey(3), shp)
    for mode in ("merge", "prune"):
        for bn_scale in ("exact", "paper"):
            r = merging.merge(m, v, widths, mode=mode, criterion="l2", bn_scale=bn_scale)
            out[f"{name}-{mode}-{bn_scale}"] = np.asarray(r.model.apply(r.variables, x)).tolist()
    keep = structured.select_layers(m, v, widths, "l1")
    sm, sv = structured.remove_many(m, v, keep)
    out[f"{name}-remove"] = np.asarray(sm.apply(sv, x)).tolist()
json.dump(out, open(sys.argv[2], "w"))
