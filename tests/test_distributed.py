"""jaxprune.distributed: data-parallel training on 8 (forced CPU) devices equals 1 device.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax is imported, and conftest imports
jax, so the 8-device checks run in a child process (``_CHILD`` below) that prints one JSON line; the assertions
are made here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from jaxprune import distributed

_CHILD = r'''
import dataclasses, json, re
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_platforms", "cpu")
from experiments import imp as imp_exp
from jaxprune import data, distributed, imp, models, replicas, similarity, train

out = {"devices": len(jax.devices())}
mesh8 = distributed.data_mesh()
mesh1 = distributed.data_mesh(jax.devices()[:1])
d = data.load("digits", "train")
x, y = train.to_device(d.images[:512], d.labels[:512])
diff = lambda a, b: max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
                        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

def fit(model, mesh, loop, steps, opt="momentum"):
    cfg = train.OptimConfig(opt, 0.05)
    tx = train.make_optimizer(cfg, 0.05)
    st = train.create_state(models.init(model, jax.random.PRNGKey(0), x.shape), tx)
    tr = train.make_trainer(model, tx, mesh)
    r = train.run(tr, st, x, y, batch_size=64, num_steps=steps, data_key=jax.random.PRNGKey(1), loop=loop)
    return tr, r

# MLP, scan: 8 devices vs 1 device vs no mesh
mlp = models.MLP((32, 10))
tr8, r8 = fit(mlp, mesh8, "scan", 16)
_, r1 = fit(mlp, mesh1, "scan", 16)
_, r0 = fit(mlp, None, "scan", 16)
out["mlp_8_vs_1"] = diff(r8.state, r1.state)
out["mlp_1_vs_none"] = diff(r1.state, r0.state)
out["mlp_param_scale"] = float(np.max(np.abs(np.asarray(r1.state.params["dense_0"]["kernel"]))))
out["state_sharding"] = str(r8.state.params["dense_0"]["kernel"].sharding.spec)
out["state_devices"] = len(r8.state.params["dense_0"]["kernel"].sharding.device_set)
idx = jnp.zeros((64,), jnp.int32)
hlo = tr8.step.lower(r8.state, *distributed.replicate((x, y), mesh8), idx, jax.random.PRNGKey(0)).compile().as_text()
out["step_all_reduce"] = "all-reduce" in hlo
out["per_device_batch"] = bool(re.search(r"f32\[8,32\]", hlo))  # dense_0 activations: 64 / 8 rows per device

# BatchNorm conv model, Python loop: batch statistics over the global batch, as on one device
vgg = models.VGG((8, "M"), 10)
_, b8 = fit(vgg, mesh8, "python", 4, opt="adam")
_, b1 = fit(vgg, mesh1, "python", 4, opt="adam")
out["bn_8_vs_1"] = diff(b8.state, b1.state)

# evaluation: 360 examples in chunks of 47 (rounded up to 48 on 8 devices), padded and weighted out
te = data.load("digits", "test")
xt, yt = train.to_device(te.images, te.labels)
e8 = train.evaluate(tr8, train.variables_of(r8.state), xt, yt, batch_size=47)
e1 = train.evaluate(train.make_trainer(mlp, train.make_optimizer(train.OptimConfig(), 0.1)),
                    train.variables_of(r8.state), xt, yt, batch_size=47)
out["eval_8"], out["eval_1"] = e8, e1

# a batch that does not split evenly
try:
    train.run(tr8, r8.state, x, y, batch_size=60, num_steps=20, data_key=jax.random.PRNGKey(1))
    out["indivisible"] = "no error"
except ValueError as e:
    out["indivisible"] = str(e)

# similarity over samples sharded across devices
rng = np.random.default_rng(0)
a = rng.normal(size=(400, 30)).astype(np.float32)
b = (a @ rng.normal(size=(30, 20)) + rng.normal(size=(400, 20))).astype(np.float32)
sa, sb = distributed.shard_samples(a, mesh8), distributed.shard_samples(b, mesh8)
out["samples_shards"] = len({str(s.index) for s in sa.addressable_shards})
out["cka_sharded"] = float(jax.jit(similarity.linear_cka)(sa, sb))
try:
    distributed.shard_samples(a[:401 - 8], mesh8)
    out["samples_indivisible"] = "no error"
except ValueError as e:
    out["samples_indivisible"] = str(e)

# an IMP run (with K = 2 replicas) on 8 devices equals the same run on 1 device
cfg = dict(dataset="digits", model="mlp", hidden=["16"], training_steps="12", batch_size=64, levels=1,
           prune_fraction=0.5, seeds=["1", "2"], max_train_examples=512)
b = imp_exp.build(cfg)
recs = {}
for name, mesh in (("8", mesh8), ("1", mesh1)):
    task = dataclasses.replace(b.task, mesh=mesh)
    recs[name] = imp.run(task, b.imp, f"{WORKDIR}/imp{name}")
out["imp_acc_8"] = [r["test_accuracy"] for lvl in recs["8"] for r in lvl["replicas"]]
out["imp_acc_1"] = [r["test_accuracy"] for lvl in recs["1"] for r in lvl["replicas"]]
out["imp_kept"] = [lvl["kept_weights"] for lvl in recs["8"]] + [lvl["kept_weights"] for lvl in recs["1"]]
l8, l1 = imp.load_level(f"{WORKDIR}/imp8", 1, b.task), imp.load_level(f"{WORKDIR}/imp1", 1, b.task)
out["imp_masks_equal"] = bool(np.array_equal(l8["mask"]["dense_0"]["kernel"], l1["mask"]["dense_0"]["kernel"]))
out["imp_params_8_vs_1"] = diff(l8["state"].params, l1["state"].params)
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    wd = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO), "JAXPRUNE_CACHE_DIR": str(wd / "cache")}
    p = subprocess.run([sys.executable, "-c", f"WORKDIR = {str(wd)!r}\n" + _CHILD], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_child_sees_eight_devices(child):
    assert child["devices"] == 8


def test_data_parallel_equals_one_device(child):
    scale = child["mlp_param_scale"]
    assert child["mlp_1_vs_none"] == 0.0  # a 1-device mesh runs the same program as no mesh
    assert child["mlp_8_vs_1"] <= 1e-5 * scale  # only the summation order of the gradient differs
    assert child["bn_8_vs_1"] <= 1e-4  # BatchNorm statistics over the global batch


def test_batch_is_split_and_gradients_all_reduced(child):
    assert child["state_sharding"] == "P()" and child["state_devices"] == 8
    assert child["step_all_reduce"] and child["per_device_batch"]


def test_evaluation_on_eight_devices(child):
    assert child["eval_8"]["accuracy"] == child["eval_1"]["accuracy"]
    assert child["eval_8"]["loss"] == pytest.approx(child["eval_1"]["loss"], rel=1e-5)


def test_indivisible_batch_is_a_clear_error(child):
    assert child["indivisible"].startswith("batch_size=60: expected a multiple of the number of devices (8)")
    assert "acts.shape[0] (number of samples)=393" in child["samples_indivisible"]


def test_similarity_on_sharded_samples(child):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 30))
    b = a @ rng.normal(size=(30, 20)) + rng.normal(size=(400, 20))
    a, b = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    ref = np.sum((a.T @ b) ** 2) / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b))
    assert child["samples_shards"] == 8
    assert child["cka_sharded"] == pytest.approx(ref, rel=1e-4)


def test_imp_with_replicas_on_eight_devices(child):
    assert child["imp_kept"] == [16 * 64, 8 * 64, 16 * 64, 8 * 64]
    assert child["imp_masks_equal"]
    np.testing.assert_allclose(child["imp_acc_8"], child["imp_acc_1"], atol=1 / 360 + 1e-9)
    assert child["imp_params_8_vs_1"] <= 1e-4


# ------------------------------------------------------------------ in-process (one device) boundary checks
def test_one_device_mesh_and_argument_errors():
    mesh = distributed.data_mesh()
    assert distributed.num_shards(mesh) == len(jax.devices())
    x = distributed.shard_batch(np.arange(12.0).reshape(6, 2), mesh)
    np.testing.assert_array_equal(np.asarray(x), np.arange(12.0).reshape(6, 2))
    with pytest.raises(ValueError, match=r"acts: expected an \(n, p\) array"):
        distributed.shard_samples(np.zeros(5), mesh)
    with pytest.raises(ValueError, match="process_id=2"):
        distributed.initialize("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="coordinator_address=''"):
        distributed.initialize("", 2, 0)
    assert distributed.initialize() is False  # single host: nothing to join
    with pytest.raises(ValueError, match="devices: expected at least one"):
        distributed.data_mesh([])
