"""experiments.head_prune on a tiny ViT and 256 MNIST examples: the command line writes the documented keys, the
removals take the counted heads and units (closed-form widths and parameter counts, the weight criterion's head
checked in float64), a rerun reuses the trained networks and the finished cells, bad flags are refused by name."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from experiments import head_prune
from jaxprune import structured, train

KWARGS = '{"depth": 1, "heads": 2, "mlp": 8, "width": 8}'  # 7×7 patches: 16 + 1 tokens, 2 heads of 4 channels
TINY = dict(dataset="mnist", max_train_examples=256, max_test_examples=128, model="jaxprune.models:ViT",
            model_kwargs=KWARGS, normalize="unit", optimizer="adam", lr=1e-3, schedule="cosine",  # the ViT recipe
            training_steps="4", batch_size=32, finetune_steps="1", finetune_lr=3e-4, reference_examples=4,
            reference_sizes=["4"], fractions=["0.5"], seeds=["3"])  # size 4 shares the compiled scorers


def _params(heads: int, mlp: int) -> int:
    """Parameters of the tiny ViT (width 8, head_dim 4, 10 classes), counted by hand: patch embedding 49·8+8,
    class token 8, positions 17·8, three LayerNorms in the block and one final (16 each), q/k/v 3·(8·4h+4h),
    out 4h·8+8, fc 8·m+m, proj m·8+8, head 8·10+10."""
    return 400 + 8 + 136 + 2 * 16 + 16 + 3 * 36 * heads + 32 * heads + 8 + 9 * mlp + 8 * mlp + 8 + 90


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, data_dir):
    """One end-to-end run through the command line (the flags as a user types them): ``(workdir, stdout)``."""
    wd = tmp_path_factory.mktemp("head_prune") / "run"
    flags = [f"--{k}={','.join(v) if isinstance(v, list) else v}" for k, v in {**TINY, "data_dir": data_dir}.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "experiments.head_prune", *flags, f"--workdir={wd}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return wd, p.stdout, str(data_dir)


@pytest.mark.slow  # >= 10 s on the 3.11 leg (BUILD-notes, "Session of 2026-12-06 (fourth)")
def test_command_line_writes_the_documented_keys(cli_run):
    wd, stdout, _ = cli_run
    res = json.loads((wd / "results.json").read_text())
    assert {"config", "environment", "groups", "original_widths", "dense", "oneshot", "reference",
            "reference_fraction", "per_seed", "finished"} <= set(res)
    assert res["groups"] == [["block_0_attn/query", "block_0_attn/key", "block_0_attn/value"], ["block_0_fc"]]
    assert set(res["oneshot"]) == set(head_prune.CRITERIA) and set(res["reference"]) == {"lrp", "taylor", "grad"}
    for crit, by_f in res["oneshot"].items():
        e = by_f["0.5"]
        for key in ("accuracy", "accuracy_finetuned"):
            (v,) = e[key]["values"]
            assert e[key]["n"] == 1 and e[key]["mean"] == v and e[key]["std"] == 0.0 and 0 <= v <= 1
            assert v == res["per_seed"]["3"]["oneshot"][f"{crit}@0.5"][key]
    for by_n in res["reference"].values():
        assert list(by_n) == ["4"] and all(e["accuracy"]["n"] == 1 for e in by_n.values())
    assert res["dense"]["accuracy"]["n"] == 1 and set(res["per_seed"]) == {"3"}
    with open(wd / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 + 3 and {r["sweep"] for r in rows} == {"fraction", "reference"}
    for name in ("accuracy_vs_fraction.png", "accuracy_vs_fraction_finetuned.png", "accuracy_vs_reference.png"):
        assert (wd / name).stat().st_size > 1000
    assert "| lrp |" in stdout and "by reference examples" in stdout


def test_every_criterion_removes_half_the_heads_and_units(cli_run):
    """Widths and parameter counts in the record follow from ceil(0.5 · 2) heads and ceil(0.5 · 8) units removed."""
    res = json.loads((cli_run[0] / "results.json").read_text())
    assert res["original_widths"] == {"block_0_attn/query": 2, "block_0_fc": 8}
    for crit, by_f in res["oneshot"].items():
        assert by_f["0.5"]["widths"] == {"block_0_attn/query": 1, "block_0_fc": 4}, crit
        assert by_f["0.5"]["params"] == _params(1, 4), crit
    assert _params(2, 8) == sum(int(np.prod(s)) for s in _leaf_shapes())


def _leaf_shapes():
    import jax

    from experiments import common
    from jaxprune import models

    c = {**head_prune.DEFAULTS, **TINY}
    model = common.build_model(c, 10)
    v = jax.eval_shape(lambda: models.init(model, jax.random.PRNGKey(0), (1, 28, 28, 1)))
    return [a.shape for a in jax.tree_util.tree_leaves(v["params"])]


def test_rerun_reuses_networks_and_cells_and_the_weight_criterion_keeps_the_larger_head(cli_run, monkeypatch):
    wd, _, data_dir = cli_run
    before = json.loads((wd / "results.json").read_text())
    trained = (wd / "seed_3" / "trained" / "trained.json").read_text()
    kept = []
    real_remove = structured.remove_many

    def spy(model, variables, keep, **kw):
        kept.append((variables, keep))
        return real_remove(model, variables, keep, **kw)

    def no_training(*a, **kw):
        raise AssertionError("a finished network or cell was trained again")

    monkeypatch.setattr(structured, "remove_many", spy)
    monkeypatch.setattr(train, "run", no_training)
    c = {**TINY, "data_dir": data_dir}
    again = head_prune.run(c, wd)
    assert (wd / "seed_3" / "trained" / "trained.json").read_text() == trained
    assert again["oneshot"] == before["oneshot"] and again["reference"] == before["reference"]
    assert kept == []  # every cell was finished: nothing scored or removed, not even by the preflight

    # the weight criterion on the trained network: the head whose q/k/v weights and biases have the larger l2 norm
    from experiments import common

    c = head_prune._config(c)
    x = np.zeros((8, 28, 28, 1), np.float32)
    model = common.build_model(c, 10)
    variables, _ = common.train_network(c, model, x, np.zeros(8, np.int32), 3, wd / "seed_3" / "trained")
    t = head_prune.Task(model, variables, (x,), *head_prune._groups(model, variables, (1, 28, 28, 1)), 3)
    small, _ = head_prune._remove(t, "l2", 0.5)
    p = variables["params"]["block_0_attn"]
    norms = [np.sqrt(sum(np.sum(np.asarray(p[m]["kernel"], np.float64)[:, h] ** 2)
                         + np.sum(np.asarray(p[m]["bias"], np.float64)[h] ** 2) for m in ("query", "key", "value")))
             for h in range(2)]
    assert abs(norms[0] - norms[1]) > 1e-6 * max(norms)
    for m in ("query", "key", "value"):
        assert np.asarray(kept[0][1][f"block_0_attn/{m}"]).tolist() == [int(np.argmax(norms))]
    assert np.asarray(kept[0][1]["block_0_fc"]).size == 4


def test_summaries_over_seeds_are_mean_and_sample_std():
    c = head_prune._config({**TINY, "criteria": ["weight"], "reference_sizes": [], "seeds": ["0", "1", "2"]})
    acc = {0: (0.5, 0.75), 1: (0.25, 0.5), 2: (0.125, 1.0)}
    per_seed = {s: {"oneshot": {"weight@0.5": {"accuracy": a, "accuracy_finetuned": b, "widths": {"q": 1},
                                                "params": 7}}} for s, (a, b) in acc.items()}
    got = head_prune.summarize(c, per_seed)["oneshot"]["weight"]["0.5"]
    for i, key in enumerate(("accuracy", "accuracy_finetuned")):
        vals = [acc[s][i] for s in (0, 1, 2)]
        assert got[key] == {"mean": np.mean(vals), "std": pytest.approx(np.std(vals, ddof=1)), "n": 3,
                            "values": vals}
    assert got["widths"] == {"q": 1} and got["params"] == 7


@pytest.mark.parametrize("change, message", [
    ({"criteria": ["lrp", "magic"]}, "criteria=lrp,magic: expected distinct criteria among lrp, taylor"),
    ({"fractions": ["0.5", "1.5"]}, "fractions='1.5': expected fractions in [0, 1)"),
    ({"fractions": ["0"]}, "fractions=0.0: expected fractions in (0, 1)"),
    ({"fractions": ["0.9"]}, "fractions=0.9: would remove all 2 units of 'block_0_attn/query'"),
    ({"reference_fraction": 1.0}, "reference_fraction=1.0: expected a finite number in (0, 1)"),
    ({"reference_sizes": ["4", "0"]}, "reference_sizes=4,0: expected integers >= 1"),
    ({"lrp_composite": "zplus"}, "lrp_composite='zplus': expected one of attn_lrp, cp_lrp"),
])
def test_bad_flags_are_refused_by_name_before_any_work(tmp_path, data_dir, change, message):
    wd = tmp_path / "w"
    with pytest.raises(ValueError) as e:
        head_prune.run({**TINY, "data_dir": str(data_dir), **change}, wd)
    assert message in str(e.value)
    assert not wd.exists()


def test_other_experiments_name_its_workdir(tmp_path):
    """Its config.json is recognised (experiments.common.CONFIG_WRITERS), so filter_prune and imp refuse the workdir
    naming the experiment that wrote it."""
    from experiments import common
    from jaxprune import checkpoint

    checkpoint.check_run_config(tmp_path, head_prune._config({}), head_prune._VOLATILE)
    with pytest.raises(ValueError, match=r"not a filter_prune workdir \(it was written by experiments.head_prune\)"):
        common.read_run_config(tmp_path, "experiments.filter_prune")
    assert common.read_run_config(tmp_path, "experiments.head_prune")["reference_fraction"] == 0.5


@pytest.mark.slow
def test_language_model_task_prunes_the_lm_prune_gpt(tmp_path, monkeypatch):
    """--task=lm on a tiny GPT trained by experiments.lm_prune: validation loss per cell, the dense loss is the
    trained one, a head is a group of the GPT's q/k/v, seeds draw the reference windows (weight reads none: equal
    over seeds), image runs keep their config keys, and a missing trained GPT is refused by flag name."""
    from test_lm import _tiny_corpus

    from experiments import lm_prune

    _tiny_corpus(tmp_path, monkeypatch)
    lm_cfg = {"dataset": "tiny", "data_dir": str(tmp_path), "width": 8, "depth": 1, "heads": 2, "context": 8,
              "steps": 2, "batch_size": 4, "val_windows": 4}
    _, rec = lm_prune.dense_model(lm_cfg, tmp_path / "lm")
    c = {"task": "lm", "lm_workdir": str(tmp_path / "lm"), "data_dir": str(tmp_path), "criteria": ["lrp", "weight"],
         "fractions": ["0.5"], "reference_examples": 2, "reference_sizes": [], "finetune_steps": "1",
         "finetune_lr": 3e-4, "seeds": ["0", "1"]}
    res = head_prune.run(c, tmp_path / "w")
    assert res["groups"] == [["block_0_attn/q", "block_0_attn/k", "block_0_attn/v"], ["block_0_fc"]]
    assert res["dense"]["val_loss"]["mean"] == pytest.approx(rec["val_loss"], rel=1e-6)
    for crit in ("lrp", "weight"):
        e = res["oneshot"][crit]["0.5"]
        assert e["widths"] == {"block_0_attn/q": 1, "block_0_fc": 16} and set(e) >= {"val_loss", "val_loss_finetuned"}
    w = res["oneshot"]["weight"]["0.5"]["val_loss"]["values"]
    assert w[0] == w[1] and res["oneshot"]["lrp"]["0.5"]["val_loss"]["n"] == 2
    assert (tmp_path / "w" / "val_loss_vs_fraction_finetuned.png").exists()
    assert "task" not in head_prune._config({}) and "lm_workdir" not in head_prune._config({})
    for change, message in (({"lm_workdir": str(tmp_path / "none")}, "lm_workdir="),
                            ({"finetune_steps": "1ep"}, "finetune_steps='1ep': expected a number of steps")):
        with pytest.raises(ValueError, match=f"^{message}"):
            head_prune.run({**c, **change}, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()


def test_the_typed_config_inherits_the_shared_training_flags_unchanged():
    """HeadPruneSettings = common.TrainSettings' fields (names and defaults, first, in order) + its own; a typed
    config and its dict are the same run."""
    import dataclasses

    from experiments import common

    shared = dataclasses.fields(common.TrainSettings)
    fields = dataclasses.fields(head_prune.HeadPruneSettings)
    assert [(f.name, f.default) for f in fields[:len(shared)]] == [(f.name, f.default) for f in shared]
    assert head_prune.SPEC[:len(shared)] == common.TRAIN_SPEC
    typed = head_prune.HeadPruneSettings(model="vit", fractions=("0.5",), seeds=("4", "5"))
    assert head_prune._config(typed) == head_prune._config({"model": "vit", "fractions": ["0.5"], "seeds": ["4", "5"]})


def test_the_bare_defaults_are_refused_in_one_line_naming_the_model(tmp_path):
    """No flags: the shared defaults train LeNet-300-100 on digits, which has no attention heads to remove."""
    with pytest.raises(ValueError, match=r"^model='lenet300' \(MLP\) has no attention heads to remove") as e:
        head_prune.run({}, tmp_path / "w")
    assert "\n" not in str(e.value) and "head_prune_vit_mnist.cfg" in str(e.value)
    assert not (tmp_path / "w").exists()


LM_ROUND = {"finetune_steps": "25", "finetune_lr": 5e-4}  # the LM's fine-tuning round (the config's)


def test_the_lm_task_refuses_the_training_flags_it_does_not_read():
    from experiments import common

    for change in ({"lr": 0.5}, {"model": "vit"}, {"normalize": "unit"}, {"training_steps": "9"}):
        with pytest.raises(common.UnusedFlag, match=rf"^{next(iter(change))}=.*: does nothing with --task=lm"):
            head_prune._config({"task": "lm", **LM_ROUND, **change})
    assert head_prune._config({"task": "lm", **LM_ROUND, "data_dir": "/texts"})["data_dir"] == "/texts"
    # the LM round is counted in steps and has no schedule to end at: both named when left at the shared defaults
    with pytest.raises(ValueError, match="finetune_steps='1ep': expected a number of steps"):
        head_prune._config({"task": "lm", "finetune_lr": 3e-4})
    with pytest.raises(ValueError, match="finetune_lr unset with --task=lm"):
        head_prune._config({"task": "lm", "finetune_steps": "25"})


# the image-training settings of a --task=lm config.json as a30cbbb wrote them (head_prune's defaults then, unread)
OLD_LM_TRAINING = dict(normalize="unit", max_train_examples=0, max_test_examples=0, model_kwargs="",
                       hidden=["300", "100"], vgg_cfg=[], weight_init="he_normal", optimizer="adam", lr=0.001,
                       momentum=0.9, weight_decay=0.0, schedule="cosine", milestones=[], gamma=0.1,
                       training_steps="1000", batch_size=128, augment="none", loop="auto")


def test_an_lm_run_identity_holds_only_what_it_reads_and_an_earlier_config_json_is_the_same_run(tmp_path):
    from jaxprune import checkpoint

    gpt = {"dataset": "tiny", "width": 8, "depth": 1, "heads": 2, "context": 8, "batch_size": 4}
    c = head_prune._config({"task": "lm", "lm_workdir": "lm", "fractions": ["0.5"], "finetune_steps": "1",
                            "finetune_lr": 3e-4})
    new = head_prune.lm_identity(c, gpt)
    assert set(new) & set(head_prune.IMAGE_TRAINING) == {"dataset", "model"}
    assert (new["dataset"], new["model"], new["lm_settings"]) == ("tiny", "gpt", gpt)
    old = checkpoint.as_stored({k: v for k, v in {**new, **OLD_LM_TRAINING}.items() if k not in head_prune._VOLATILE})
    checkpoint.write_record(tmp_path / "config.json", old)
    assert head_prune.check_lm_run_config(tmp_path, c, gpt) == new  # accepted; the stored file is left as it was
    assert checkpoint.read_record(tmp_path / "config.json") == old
    for change, gpt_change, name in (({"finetune_lr": 1e-3}, {}, "finetune_lr"), ({}, {"width": 16}, "lm_settings")):
        with pytest.raises(ValueError, match=f"holds a run with a different config.*{name}"):
            head_prune.check_lm_run_config(tmp_path, {**c, **change}, {**gpt, **gpt_change})
    fresh = tmp_path / "fresh"
    head_prune.check_lm_run_config(fresh, c, gpt)
    assert not set(checkpoint.read_record(fresh / "config.json")) & set(OLD_LM_TRAINING)
