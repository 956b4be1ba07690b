"""``--model=module.path:ClassName`` / ``--model_kwargs``: the experiments on a model of the user's own.

The model lives in a file written here (``mymodels.py`` in ``tmp_path``, put on ``sys.path``), nothing of it in
jaxprune: layers named ``fc1``, ``fc2``, ``head``, its widths a tuple field, a ``num_classes`` field filled in from
the dataset, no ``train`` argument. Every run is recomputed from what it saved with the plain class's own ``apply``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from experiments import common, filter_prune, lrp_toy, oneshot, oneshot_run
from experiments import imp as imp_experiment
from experiments import merge as merge_experiment
from jaxprune import checkpoint, runs, structured, train

MODULE = '''
from typing import Sequence

import flax.linen as nn
from flax import nnx


class MyMLP(nn.Module):
    """fc1 -> relu -> fc2 -> relu -> head; no `train` argument."""

    hidden: Sequence[int] = (16, 16)
    num_classes: int = 3

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden[0], name="fc1")(x))
        x = nn.relu(nn.Dense(self.hidden[1], name="fc2")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class FixedHead(nn.Module):
    """Four logits whatever the dataset (no num_classes field)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="out")(x.reshape((x.shape[0], -1)))


class InlineMLP(nn.Module):
    """Widths written inline (no width field): flatten -> Dense(12) -> relu -> Dense(8) -> relu -> classes."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(12)(x.reshape((x.shape[0], -1))))
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(self.num_classes)(x)


class NnxNet(nnx.Module):
    def __init__(self, rngs=None):
        self.lin = nnx.Linear(64, 10, rngs=rngs or nnx.Rngs(0))

    def __call__(self, x):
        return self.lin(x.reshape((x.shape[0], -1)))


class NnxMLP(nnx.Module):
    """NNX: flatten -> hid (Linear) -> BatchNorm -> relu -> dropout -> out (Linear, num_classes)."""

    def __init__(self, rngs: nnx.Rngs, width: int = 12, num_classes: int = 3):
        self.hid = nnx.Linear(64, width, rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.drop(nnx.relu(self.bn(self.hid(x.reshape((x.shape[0], -1))))))
        return self.out(x)


not_a_model = 3
'''
KWARGS = '{"hidden": [12, 8]}'
USER = {"model": "mymodels:MyMLP", "model_kwargs": KWARGS}


@pytest.fixture
def mymodels(tmp_path, monkeypatch):
    """``mymodels`` importable from a fresh folder (and forgotten again after the test)."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "mymodels.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    import mymodels

    yield mymodels
    sys.modules.pop("mymodels", None)


def _digits(normalize: str):
    tr, te = common.load_data("digits", "", normalize)
    return tr, te


def _acc(logits, y) -> float:
    return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(y)))


def _shapes(variables) -> dict:
    return {layer: tuple(np.shape(p["kernel"])) for layer, p in variables["params"].items()}


# ----------------------------------------------------------------------------------------------- building it
def test_build_model_constructs_the_class_with_the_json_kwargs_and_the_dataset_classes(mymodels):
    model = common.build_model({**USER}, 10, input_shape=(5, 8, 8, 1))
    assert isinstance(model, mymodels.MyMLP) and type(model).__name__ == "MyMLP"
    assert model.hidden == (12, 8) and model.num_classes == 10  # JSON arrays become tuples; classes filled in
    v = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))
    assert _shapes(v) == {"fc1": (64, 12), "fc2": (12, 8), "head": (8, 10)}
    x = np.random.RandomState(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    plain = mymodels.MyMLP(hidden=(12, 8), num_classes=10)  # the class as written, without `train`
    np.testing.assert_array_equal(model.apply(v, x, train=True), plain.apply(v, x))
    assert common.build_model({**USER, "model_kwargs": '{"num_classes": 10, "hidden": [12, 8]}'}, 10) == model
    assert common.output_layers(model, (1, 8, 8, 1)) == ("head",)
    assert common.canonical_model_kwargs({"model_kwargs": '{ "hidden" : [12,8] }'})["model_kwargs"] == \
        '{"hidden": [12, 8]}'
    assert common.canonical_model_kwargs({"model_kwargs": "{}"})["model_kwargs"] == ""


@pytest.mark.parametrize("config, match", [
    ({"model": "nosuchmodule_jaxprune:Net"}, r"model='nosuchmodule_jaxprune:Net': cannot import module "
                                             r"'nosuchmodule_jaxprune' \(ModuleNotFoundError"),
    ({"model": "mymodels:Nope"}, r"model='mymodels:Nope': module 'mymodels' has no attribute 'Nope'; its "
                                 r"flax.linen.Module classes: FixedHead, InlineMLP, MyMLP"),
    ({"model": "mymodels:"}, r"model='mymodels:': expected module.path:ClassName"),
    ({"model": "mymodels:not_a_model"}, r"expected a flax.linen.Module subclass, got an instance of int"),
    ({"model": "mymodels:NnxMLP", "model_kwargs": '{"depth": 2}'}, r"NnxMLP\(\*\*model_kwargs, num_classes=10\) "
                                                                    r"fails \(TypeError: .*'depth'.*\); its fields: "
                                                                    r"width, num_classes"),
    ({"model_kwargs": "{hidden: [1]}"}, r"model_kwargs='\{hidden: \[1\]\}': not valid JSON"),
    ({"model_kwargs": "[12, 8]"}, r"model_kwargs='\[12, 8\]': expected a JSON object"),
    ({"model_kwargs": '{"width": 3}'}, r"MyMLP\(\*\*model_kwargs, num_classes=10\) fails \(TypeError: "
                                      r".*'width'.*\); its fields: hidden, num_classes"),
    ({"model": "mymodels:FixedHead", "model_kwargs": ""}, r"FixedHead returns \(1, 4\) on inputs of shape "
                                                          r"\(1, 8, 8, 1\); expected logits of shape \(1, 10\)"),
    ({"hidden": ["5"]}, r"hidden=\['5'\]: configures the library's models only, not --model=mymodels:MyMLP"),
    ({"model": "mlp", "model_kwargs": '{"a": 1}'}, r"applies to --model=module.path:ClassName only"),
])
def test_flag_errors_name_the_flag_and_write_nothing(mymodels, tmp_path, config, match):
    wd = tmp_path / "refused"
    with pytest.raises(ValueError, match=match):
        oneshot.run({"dataset": "digits", **USER, **config, "training_steps": "1"}, wd)
    assert not wd.exists()
    with pytest.raises(ValueError, match=match):
        filter_prune.run({"dataset": "digits", **USER, **config, "training_steps": "1"}, wd)
    assert not wd.exists()


# ----------------------------------------------------------------------------------------------- experiments
def _independent_unit_pruned(params: dict, k: float) -> dict:
    """``ceil(k·n)`` smallest-L2 kernel columns of fc1 and fc2 (ranked on the trained kernels) zeroed with their
    biases and the next layer's input rows (a masked unit sends nothing on), in numpy; head's columns untouched."""
    p = jax.tree_util.tree_map(np.array, params)
    gone = {name: np.argsort(np.linalg.norm(p[name]["kernel"], axis=0), kind="stable")[
        :math.ceil(k * p[name]["kernel"].shape[1] - 1e-9)] for name in ("fc1", "fc2")}
    for name, after in (("fc1", "fc2"), ("fc2", "head")):
        p[name]["kernel"][:, gone[name]] = 0.0
        p[name]["bias"][gone[name]] = 0.0
        p[after]["kernel"][gone[name], :] = 0.0
    return p


def _independent_weight_pruned(params: dict, k: float) -> dict:
    p = jax.tree_util.tree_map(np.array, params)
    for name in ("fc1", "fc2"):
        w = p[name]["kernel"]
        w.ravel()[np.argsort(np.abs(w).ravel(), kind="stable")[:math.ceil(k * w.size - 1e-9)]] = 0.0
    return p


def test_oneshot_prunes_units_and_weights_of_a_user_model(mymodels, tmp_path, monkeypatch):
    seen = []
    real_unit = oneshot.unit_pruned

    def spy(model, variables, *a, **kw):
        seen.append((model, variables))
        out = real_unit(model, variables, *a, **kw)
        seen.append((model, out))
        return out

    monkeypatch.setattr(oneshot_run, "unit_pruned", spy)  # its home: run_seed calls it there
    cfg = {"dataset": "digits", **USER, "normalize": "unit", "optimizer": "adam", "lr": 1e-3, "training_steps": "8ep",
           "batch_size": 50, "scope": "layerwise", "sparsity": ["0", "0.5"], "seeds": ["0"]}
    res = oneshot.run(cfg, tmp_path)
    assert res["config"]["model"] == "mymodels:MyMLP" and res["config"]["model_kwargs"] == KWARGS
    _, te = _digits("unit")
    plain = mymodels.MyMLP(hidden=(12, 8), num_classes=10)
    trained = seen[0][1]
    assert _shapes(trained) == {"fc1": (64, 12), "fc2": (12, 8), "head": (8, 10)}
    dense = res["dense_accuracy"]["mean"]
    one = 1.01 / len(te.labels)  # one near-tie test point may flip
    assert dense > 0.5 and dense == pytest.approx(_acc(plain.apply(trained, te.images), te.labels), abs=one)
    assert res["accuracy"]["unit"]["0"] == res["accuracy"]["weight"]["0"] == pytest.approx(dense)
    masked = seen[3][1]  # unit pruning at 50 %: 6 of fc1's 12 units, 4 of fc2's 8, none of the head's
    zero_cols = {n: int(np.all(np.asarray(masked["params"][n]["kernel"]) == 0, axis=0).sum()) for n in _shapes(masked)}
    assert zero_cols == {"fc1": 6, "fc2": 4, "head": 0}
    want = _independent_unit_pruned(trained["params"], 0.5)
    for n in ("fc1", "fc2", "head"):
        np.testing.assert_array_equal(np.asarray(masked["params"][n]["kernel"]), want[n]["kernel"], err_msg=n)
    assert res["accuracy"]["unit"]["0.5"] == pytest.approx(
        _acc(plain.apply({"params": want}, te.images), te.labels), abs=one)
    weight = _independent_weight_pruned(trained["params"], 0.5)  # the graph's output layer (head) is left alone
    assert res["accuracy"]["weight"]["0.5"] == pytest.approx(
        _acc(plain.apply({"params": weight}, te.images), te.labels), abs=one)
    again = oneshot.run({**cfg, "model_kwargs": '{"hidden":[12,8]}'}, tmp_path)  # same kwargs, other spelling
    assert len(seen) == 4 and again["accuracy"] == res["accuracy"]  # the finished seed was reused
    oneshot.run({**cfg, "model_kwargs": '{"hidden": [12, 9]}'}, tmp_path)  # another model: run again
    assert len(seen) == 8 and _shapes(seen[4][1])["fc2"] == (12, 9)


FILTER = {"dataset": "digits", **USER, "layer_kind": "dense", "normalize": "unit", "optimizer": "momentum",
          "lr": 0.05, "weight_decay": 0.0, "schedule": "constant", "milestones": [], "training_steps": "3ep",
          "batch_size": 64, "finetune_steps": "5", "finetune_lr": 0.01, "prune_fraction": 0.25,
          "max_pruned_fraction": 0.8, "max_rounds": 2}


@pytest.mark.slow
def test_filter_prune_physically_shrinks_a_user_model_through_its_width_field(mymodels, tmp_path):
    res = filter_prune.run(FILTER, tmp_path)
    assert res["layers"] == ["fc1", "fc2"] and res["original_widths"] == {"fc1": 12, "fc2": 8}
    widths = [r["widths"] for r in res["rounds"]]
    assert widths == [{"fc1": 12, "fc2": 8}, {"fc1": 9, "fc2": 6}, {"fc1": 6, "fc2": 4}]
    for r in res["rounds"]:
        a, b = r["widths"]["fc1"], r["widths"]["fc2"]
        assert r["params"] == 64 * a + a + a * b + b + b * 10 + 10
        assert r["flops"] == 2 * (64 * a + a * b + b * 10)
    # Round 2's checkpoint, restored into the rebuilt (smaller) model: its width field holds the requested widths,
    # and the plain class of those widths scores the recorded accuracy on the saved variables.
    _, te = _digits("unit")
    model = common.build_model(filter_prune._config(FILTER), 10)
    small, v, _ = runs.load_round(tmp_path / "seed_0", 2, model, (1, 8, 8, 1))
    assert type(small).__name__ == "MyMLP" and small.hidden == (6, 4) and small.num_classes == 10
    assert _shapes(v) == {"fc1": (64, 6), "fc2": (6, 4), "head": (4, 10)}
    assert structured.widths(small, v) == {"fc1": 6, "fc2": 4}
    plain = mymodels.MyMLP(hidden=(6, 4), num_classes=10)
    assert res["rounds"][2]["accuracy_after_finetune"] == pytest.approx(
        _acc(plain.apply(v, te.images), te.labels), abs=1.01 / len(te.labels))
    assert res["rounds"][2]["accuracy_after_finetune"] == common.accuracy(small, v, *train.to_device(te.images,
                                                                                                    te.labels))
    # The kwargs are part of the run identity: the same ones spelled otherwise resume, others are refused.
    again = filter_prune.run({**FILTER, "model_kwargs": '{"hidden":[12,8]}'}, tmp_path)
    assert again["rounds"] == res["rounds"]
    assert checkpoint.read_json(tmp_path / "config.json")["model_kwargs"] == KWARGS
    with pytest.raises(ValueError, match=r"different config .*model_kwargs"):
        filter_prune.run({**FILTER, "model_kwargs": '{"hidden": [12, 9]}'}, tmp_path)


def test_filter_prune_shrinks_a_user_model_whose_widths_are_written_inline(mymodels, tmp_path):
    cfg = {**FILTER, "model": "mymodels:InlineMLP", "model_kwargs": ""}
    res = filter_prune.run(cfg, tmp_path)
    assert res["layers"] == ["Dense_0", "Dense_1"]
    assert [r["widths"] for r in res["rounds"]] == [{"Dense_0": 12, "Dense_1": 8}, {"Dense_0": 9, "Dense_1": 6},
                                                    {"Dense_0": 6, "Dense_1": 4}]
    assert [r["params"] for r in res["rounds"]] == [64 * a + a + a * b + b + b * 10 + 10
                                                    for a, b in ((12, 8), (9, 6), (6, 4))]
    assert filter_prune.run(cfg, tmp_path)["rounds"] == res["rounds"]  # resumed: the rounds restored, not redone


def test_merge_on_a_user_model(mymodels, tmp_path):
    cfg = {"dataset": "digits", **USER, "normalize": "none", "optimizer": "momentum", "lr": 0.05,
           "weight_decay": 0.0, "schedule": "constant", "milestones": [], "training_steps": "2ep", "batch_size": 32,
           "sparsity": ["0.5"], "criteria": ["l1"], "seeds": ["0"]}
    res = merge_experiment.run(cfg, tmp_path)
    assert res["derived"]["mergeable_layers"] == ["fc1", "fc2"]
    runs = res["seeds"][0]["runs"]
    assert [r["widths"] for r in runs] == [{"fc1": 6, "fc2": 4}] * 2
    assert all(r["num_params"] == 64 * 6 + 6 + 6 * 4 + 4 + 4 * 10 + 10 for r in runs)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in runs)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_lrp_toy_on_a_user_model(mymodels, tmp_path):
    cfg = {"datasets": ["moons"], **USER, "model_kwargs": '{"hidden": [10, 6]}', "num_train": 128,
           "optimizer": "adam", "lr": 1e-3, "training_steps": "3ep", "batch_size": 32, "samples_per_class": ["2"],
           "seeds": ["0:2"], "n_prune": 4,
           "criteria": ["weight", "lrp"], "plot_n": 2}
    res = lrp_toy.run(cfg, tmp_path)
    d = res["datasets"]["moons"]
    assert d["hidden_units"] == 16 and d["num_classes"] == 2
    for crit in ("weight", "lrp"):
        e = d["criteria"][crit]["2"]
        assert set(e["pruned_per_layer"]) == {"fc1", "fc2"} and sum(e["pruned_per_layer"].values()) == 4
    assert (tmp_path / "moons_boundaries.png").stat().st_size > 0


@pytest.mark.slow
def test_imp_and_similarity_on_a_user_model(mymodels, tmp_path):
    from experiments import similarity as similarity_experiment

    cfg = {"dataset": "digits", **USER, "training_steps": "40", "batch_size": 64, "levels": 1,
           "prune_fraction": 0.5}
    res = imp_experiment.train_and_evaluate(cfg, tmp_path / "imp")
    assert list(res["derived"]["imp"]["exclude"]) == ["^head/"]  # the graph's output layer is never pruned
    built, variables, records = imp_experiment.load_levels(tmp_path / "imp")
    p1 = variables[1]["params"]
    assert np.count_nonzero(np.asarray(p1["head"]["kernel"]) == 0) == 0
    kept = sum(np.count_nonzero(np.asarray(p1[n]["kernel"])) for n in ("fc1", "fc2"))
    assert kept == (64 * 12 + 12 * 8) - math.ceil(0.5 * (64 * 12 + 12 * 8) - 1e-9)
    plain = mymodels.MyMLP(hidden=(12, 8), num_classes=10)
    x, y = np.asarray(built.task.x_test), np.asarray(built.task.y_test)
    for level, v in enumerate(variables):
        assert res["levels"][level]["test_accuracy"] == pytest.approx(_acc(plain.apply(v, x), y),
                                                                      abs=1.01 / len(y))
    sim = similarity_experiment.run({"imp_workdir": str(tmp_path / "imp"), "num_inputs": 64,
                                     "metrics": ["linear_cka"]}, tmp_path / "sim")
    assert sim["layers"] == ["fc1", "fc2", "head"]  # a user model's representations: its layers' outputs
    np.testing.assert_allclose(np.diag(np.asarray(sim["matrix"]["linear_cka"][0])), 1.0, atol=1e-4)


@pytest.mark.slow
def test_imp_and_filter_prune_train_an_nnx_model(mymodels, tmp_path):
    from flax import nnx

    nnx_user = {"model": "mymodels:NnxMLP", "model_kwargs": '{"width": 12}'}
    model = common.build_model(nnx_user, 10, input_shape=(5, 8, 8, 1))
    assert isinstance(model, common.NNXModel) and model.nnx_class is mymodels.NnxMLP
    cfg = {"dataset": "digits", **nnx_user, "training_steps": "40", "batch_size": 64, "levels": 1,
           "prune_fraction": 0.5}
    res = imp_experiment.train_and_evaluate(cfg, tmp_path / "imp")
    assert list(res["derived"]["imp"]["exclude"]) == ["^out/"]  # the graph's output layer is never pruned
    built, variables, records = imp_experiment.load_levels(tmp_path / "imp")
    p0, p1 = variables[0]["params"], variables[1]["params"]
    assert np.count_nonzero(np.asarray(p1["hid"]["kernel"])) == 64 * 12 - math.ceil(0.5 * 64 * 12 - 1e-9)
    assert np.count_nonzero(np.asarray(p1["out"]["kernel"]) == 0) == 0
    assert not np.allclose(variables[0]["batch_stats"]["bn"]["mean"], 0.0)  # BatchNorm statistics were trained
    x, y = np.asarray(built.task.x_test), np.asarray(built.task.y_test)
    for level, v in enumerate(variables):  # the saved variables are the NNX module's state, by attribute path
        plain = mymodels.NnxMLP(nnx.Rngs(5), width=12, num_classes=10)
        plain.eval()
        nnx.update(plain, nnx.State({**v["params"], **{k: {**v["params"][k], **v["batch_stats"].get(k, {})}
                                                        for k in v["params"]}}))
        assert res["levels"][level]["test_accuracy"] == pytest.approx(_acc(plain(x), y), abs=1.01 / len(y))
    assert res["levels"][0]["test_accuracy"] > 0.5 and p0["hid"]["kernel"].shape == (64, 12)
    fres = filter_prune.run({**FILTER, **nnx_user, "max_rounds": 1}, tmp_path / "filter")
    assert fres["layers"] == ["hid"] and [r["widths"] for r in fres["rounds"]] == [{"hid": 12}, {"hid": 9}]
    assert fres["rounds"][1]["params"] == 64 * 9 + 9 + 2 * 9 + 9 * 10 + 10


# ----------------------------------------------------------------------------------------------- the command line
@pytest.mark.slow
def test_command_line_imports_the_model_from_the_working_directory(tmp_path):
    (tmp_path / "mymodels.py").write_text(MODULE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    wd = tmp_path / "run"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "experiments.filter_prune", "--dataset=digits",
                               "--layer_kind=dense", "--training_steps=20", "--finetune_steps=2", "--max_rounds=1",
                               "--prune_fraction=0.5", f"--workdir={wd}", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    p = cli("--model=mymodels:Nope")
    assert p.returncode == 2 and not wd.exists()
    assert p.stderr.strip().splitlines()[-1] == (
        "error: model='mymodels:Nope': module 'mymodels' has no attribute 'Nope'; its flax.linen.Module classes: "
        "FixedHead, InlineMLP, MyMLP")
    p = cli("--model=mymodels:MyMLP", "--model_kwargs={hidden: 3}")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
        "error: model_kwargs='{hidden: 3}': not valid JSON")
    p = cli("--model=mymodels:MyMLP", f"--model_kwargs={KWARGS}")
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((wd / "results.json").read_text())
    assert res["config"]["model_kwargs"] == KWARGS
    assert [r["widths"] for r in res["rounds"]] == [{"fc1": 12, "fc2": 8}, {"fc1": 6, "fc2": 4}]
    assert "| 1 |" in p.stdout
