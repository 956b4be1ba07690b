"""jaxprune.runs: an IMP workdir read back and analysed by library code, with imp's own setup (loss included).

Tiny models written here (other names and shapes than jaxprune.models), a few steps each."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import imp, runs, train


class _Probe(nn.Module):
    """A two-layer net without a ``train`` argument."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8, name="inner")(x.reshape(x.shape[0], -1)))
        return nn.Dense(3, name="head")(h)


def _squared_softmax_loss(logits, labels):
    """Not cross-entropy: the mean squared distance of the softmax to the one-hot labels."""
    return jnp.mean(jnp.sum((jax.nn.softmax(logits) - jax.nn.one_hot(labels, 3)) ** 2, -1))


def _task(loss=None, **kw) -> imp.Task:
    x = jax.random.normal(jax.random.PRNGKey(1), (48, 5))
    y = jnp.argmax(x[:, :3], -1)
    return imp.Task(_Probe(), x[:40], y[:40], x[40:], y[40:], optim=train.OptimConfig(lr=0.5, momentum=0.0),
                    num_steps=6, batch_size=8, loss=loss, **kw)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("runs") / "imp"
    cfg = imp.ImpConfig(levels=1, fraction=0.5, rewind="lr", exclude=("^head/",))
    imp.run(_task(_squared_softmax_loss), cfg, wd)
    return wd, cfg


def test_the_copy_with_the_levels_own_data_order_retrains_it_with_the_tasks_loss(workdir):
    """The instability copy trains as the level did (imp's setup: optimizer, schedule and ``task.loss``): with the
    level's own data key it is the level, bit for bit; with cross-entropy (the loss the old re-derivation used)
    it is another network."""
    wd, cfg = workdir
    key = imp.Keys(0).data
    saved = imp.load_level(wd, 1, _task(_squared_softmax_loss))["state"]
    copy = runs.Analyzer(_task(_squared_softmax_loss), cfg, wd, {}).train_copy(1, data_key=key).state
    for u, v in zip(jax.tree_util.tree_leaves(copy.params), jax.tree_util.tree_leaves(saved.params)):
        np.testing.assert_array_equal(u, v)
    other = runs.Analyzer(_task(), cfg, wd, {}).train_copy(1, data_key=key).state
    assert not np.array_equal(other.params["inner"]["kernel"], saved.params["inner"]["kernel"])


def test_load_levels_reads_every_finished_level(workdir):
    wd, _ = workdir
    variables, records = runs.load_levels(wd, _task(_squared_softmax_loss))
    assert [r["level"] for r in records] == [0, 1]
    kernel = np.asarray(variables[1]["params"]["inner"]["kernel"])
    assert np.count_nonzero(kernel) == kernel.size // 2  # level 1 keeps half of the prunable weights
    assert np.count_nonzero(np.asarray(variables[0]["params"]["inner"]["kernel"])) == kernel.size


@pytest.mark.slow  # plots and three compiled analyses: ~29 s on the loaded box
def test_analyses_of_a_model_without_train_argument(workdir, tmp_path):
    """Overlap of consecutive levels is nested (kept fraction = Jaccard = 1/2), the instability path starts at the
    level's own network (its recorded accuracy) and similarity of the dense level to itself is 1."""
    wd, cfg = workdir
    task = _task(_squared_softmax_loss)
    settings = runs.analysis_settings({"analyses": "similarity,overlap,instability", "analysis_examples": 8,
                                       "analysis_metrics": ["linear_cka"], "instability_points": 3}, task)
    assert list(settings) == list(runs.ANALYSES) and settings["similarity"]["examples"] == 8
    doc = runs.analyse(wd, task, cfg, settings)
    lv0, lv1 = doc["levels"]
    assert lv0["similarity"]["metrics"]["linear_cka"]["inner"] == pytest.approx(1.0, abs=1e-5)
    obs = lv1["overlap"]["previous"]["observed"]["overall"]
    assert obs["jaccard"] == pytest.approx(0.5) and obs["kept_fraction"] == pytest.approx(0.5)
    assert lv1["instability"]["accuracy_a"] == pytest.approx(imp.read_level(wd, 1)["test_accuracy"], abs=1e-6)
    assert runs.analyse(wd, task, cfg, settings) == doc  # recorded: nothing recomputed


@pytest.mark.parametrize("bad,match", [({"analyses": "overlap,bogus"}, r"analyses=overlap,bogus: .*unknown: bogus"),
                                       ({"analyses": "instability", "instability_points": 1},
                                        r"instability_points=1: expected an integer >= 2")])
def test_bad_settings_name_the_option(bad, match):
    with pytest.raises(ValueError, match=match):
        runs.analysis_settings(bad, _task())
