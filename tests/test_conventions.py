"""One convention per concept (jaxprune.conventions) and one flag name per concept (experiments.common.Renamed):
closed forms, float64 references, the deprecation path of every renamed flag and the migration of stored records."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import common, filter_prune, imp as imp_exp, lrp_toy, merge, oneshot
from jaxprune import conventions, criteria, masks, merging, models, structured

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- counts
def test_n_to_prune_closed_forms():
    assert conventions.n_to_prune(0.2, 265) == 53  # 53.000000000000004 in float64
    assert conventions.n_to_prune(0.7, 300) == 210  # 210.00000000000003
    assert conventions.n_to_prune(0.25, 10) == 3 and conventions.n_to_prune(0.0, 10) == 0
    assert conventions.n_to_prune(1.0, 7) == 7 and conventions.n_to_prune(0.5, 0) == 0
    np.testing.assert_array_equal(conventions.n_to_prune(0.5, np.array([3, 4, 5])), [2, 2, 3])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction="):
            conventions.n_to_prune(bad, 10)


@given(num=st.integers(0, 1000), den=st.integers(1, 1000), n=st.integers(0, 5000))
def test_n_to_prune_is_the_exact_ceiling(num, den, n):
    """For a fraction p/q given as the float p/q, the count is the exact rational ceil(p·n/q)."""
    if num > den:
        num, den = den, num
    assert conventions.n_to_prune(num / den, n) == math.ceil(Fraction(num, den) * n)


def test_every_count_uses_the_one_rule():
    """Masks, unit removal and merging widths agree on a fraction that is not a whole number of units."""
    assert structured.n_keep_for(10, 0.25) == 10 - 3
    mlp = models.MLP((10, 6, 3))
    params = models.init(mlp, __import__("jax").random.PRNGKey(0), (1, 4))["params"]
    assert merging.widths_for_ratio(mlp, params, 0.25) == {"dense_0": 7, "dense_1": 4}  # 10-ceil(2.5), 6-ceil(1.5)
    p = {"w": jnp.arange(1.0, 11.0).reshape(10, 1)}
    m = masks.magnitude_prune(p, masks.ones_like(p), {"w": True}, 0.25)
    assert int((~m["w"]).sum()) == 3


# ----------------------------------------------------------------------------------------------- ties
def test_oneshot_global_unit_ranking_is_criteria_global_keep():
    """One global unit ranking: experiments.oneshot ranks through criteria.global_keep, so equal scores keep the
    lower index and the earlier layer (the tie-break of jaxprune.conventions)."""
    scores = {"a": np.array([1.0, 1.0, 3.0]), "b": np.array([1.0, 2.0])}
    keep = criteria.global_keep(scores, 2, min_keep=0)
    np.testing.assert_array_equal(keep["a"], [0, 2])  # of the three 1.0s, a[0] (first) is kept
    np.testing.assert_array_equal(keep["b"], [1])
    src = (ROOT / "experiments" / "oneshot_run.py").read_text()
    assert "criteria.global_keep(" in src and "argsort" not in src


# ----------------------------------------------------------------------------------------------- spread
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=20))
def test_summary_is_the_sample_std(values):
    s = conventions.summary(values)
    n = len(values)
    mean = sum(Fraction(v) for v in values) / n
    assert s["n"] == n and s["mean"] == pytest.approx(float(mean), abs=1e-9)
    want = 0.0 if n == 1 else math.sqrt(float(sum((Fraction(v) - mean) ** 2 for v in values) / (n - 1)))
    assert s["std"] == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_summary_refuses_no_values():
    with pytest.raises(ValueError, match="values"):
        conventions.summary([])


def test_experiments_report_the_sample_std():
    per_seed = [{"dense_accuracy": a, "accuracy": {"weight": {"0.5": a - 0.1}}} for a in (0.9, 0.8, 0.7)]
    out = oneshot.summarize(per_seed, ["weight"], [0.5])
    assert out["dense_accuracy"]["std"] == pytest.approx(0.1)  # ddof = 1: sqrt(0.02 / 2)
    assert out["accuracy_std"]["weight"]["0.5"] == pytest.approx(0.1)
    assert lrp_toy._mean_std([1.0, 3.0])["std"] == pytest.approx(math.sqrt(2.0))
    runs = {0: [{"round": 0, "params": 5, "accuracy_after_finetune": 0.5}],
            1: [{"round": 0, "params": 5, "accuracy_after_finetune": 0.7}]}
    r = filter_prune.summarize_rounds(runs)[0]
    assert r["accuracy_after_finetune"] == pytest.approx(0.6)
    assert r["accuracy_after_finetune_std"] == pytest.approx(math.sqrt(0.02)) and r["num_seeds"] == 2


def test_batchnorm_epsilon_defined_once():
    assert merging.BN_EPSILON == conventions.BN_EPSILON == 1e-5
    bn = models._batchnorm(False, "bn")
    assert bn.epsilon == conventions.BN_EPSILON
    for path in ("jaxprune/models.py", "jaxprune/merging.py"):
        assert "1e-5" not in (ROOT / path).read_text(), path


# ----------------------------------------------------------------------------------------------- seeds
def test_seed_list_forms_and_errors():
    assert common.seed_list("0,1,2") == (0, 1, 2) == common.seed_list(["0", "1", "2"]) == common.seed_list([0, 1, 2])
    assert common.seed_list(["0:3", "7"]) == (0, 1, 2, 7) and common.seed_list(5) == (5,)
    for bad, match in (([], "at least one"), (["a"], "'a'"), (["3:1"], "'3:1'"), (["-1"], "seeds=-1"),
                       (["1", "1"], "twice"), ([1.5], "1.5")):
        with pytest.raises(ValueError, match=match):
            common.seed_list(bad)


def test_imp_seeds_are_consecutive_replicas():
    assert imp_exp.seeds_of({"seeds": ["3:6"]}) == (3, 3) and imp_exp.seeds_of({"seeds": ["4"]}) == (4, 1)
    with pytest.raises(ValueError, match="consecutive"):
        imp_exp.seeds_of({"seeds": ["0", "2"]})


def test_lrp_toy_seeds_count_is_deprecated():
    with pytest.warns(FutureWarning, match="--seeds=0:3"):
        assert lrp_toy.sample_seeds(["3"]) == [0, 1, 2]
    with pytest.warns(FutureWarning):
        assert lrp_toy.sample_seeds(2) == [0, 1]
    assert lrp_toy.sample_seeds(["0:3"]) == [0, 1, 2] and lrp_toy.sample_seeds(["4", "5"]) == [4, 5]
    assert lrp_toy.sample_seeds([7]) == [7]  # a list of integers is the new form
    assert lrp_toy.sample_seeds(["0"]) == [0]  # 0 was never a valid count


# ----------------------------------------------------------------------------------------------- renamed flags
RENAMED_CASES = [  # (experiment's RENAMED, old config, new config)
    (filter_prune.RENAMED, {"fraction": 0.3}, {"prune_fraction": 0.3}),
    (filter_prune.RENAMED, {"seed": 4}, {"seeds": ["4"]}),
    (merge.RENAMED, {"ratios": ["0.5", "0.7"]}, {"sparsity": ["0.5", "0.7"]}),
    (oneshot.RENAMED, {"sparsities": ["0", "25", "97"]}, {"sparsity": ["0", "0.25", "0.97"]}),
    (imp_exp.RENAMED, {"seed": 2, "num_replicas": 3}, {"seeds": [2, 3, 4]}),
    (imp_exp.RENAMED, {"num_replicas": 2}, {"seeds": [0, 1]}),
]


@pytest.mark.parametrize("renamed,old,new", RENAMED_CASES)
def test_old_flag_names_map_with_a_warning(renamed, old, new):
    with pytest.warns(FutureWarning, match="deprecated"):
        assert common.resolve_renamed({"lr": 0.1, **old}, renamed) == {"lr": 0.1, **new}
    assert common.migrate_record({"lr": 0.1, **old}, renamed) == {"lr": 0.1, **new}  # stored records: silently
    with pytest.raises(ValueError, match=f"give only --{next(iter(new))}"):
        common.resolve_renamed({**old, **new}, renamed)


def test_oneshot_old_sparsities_run_like_the_new_flag(tmp_path):
    base = dict(dataset="digits", model="mlp", hidden=["16"], training_steps="2", batch_size=50, seeds=["0"],
                methods=["weight"])
    new = oneshot.run({**base, "sparsity": ["0.5"]}, tmp_path / "new")
    with pytest.warns(FutureWarning, match="--sparsity=0.5"):
        old = oneshot.run({**base, "sparsities": ["50"]}, tmp_path / "old")
    assert old["accuracy"] == new["accuracy"] and old["config"]["sparsity"] == ["0.5"]


def _cli(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "experiments.imp", "--dataset=digits", "--model=mlp",
                           "--hidden=16", "--training_steps=2", "--levels=0", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_old_seed_flags_warn_and_record_the_new_name(tmp_path):
    wd = tmp_path / "wd"
    r = _cli(["--seed=2", "--num_replicas=1", f"--workdir={wd}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FutureWarning: --seed, --num_replicas is deprecated" in r.stderr and "use --seeds=2" in r.stderr
    stored = json.loads((wd / "config.json").read_text())
    assert stored["seeds"] == [2] and "seed" not in stored and "num_replicas" not in stored
    r = _cli(["--seeds=2", f"--workdir={wd}"], tmp_path)  # the same run under its new name: resumed
    assert r.returncode == 0 and "already finished" in r.stderr
    r = _cli(["--seed=1", "--seeds=1", f"--workdir={tmp_path / 'other'}"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: --seed and --seeds: --seed is the old name of --seeds (deprecated); give only --seeds")


@pytest.mark.slow
def test_filter_prune_old_single_seed_workdir_is_adopted(tmp_path):
    """A filter_prune workdir of the earlier release (config.json with seed/fraction, trained/ at the top) is moved
    into seed_<s>/ and resumed, not retrained."""
    base = dict(dataset="digits", model="vgg", vgg_cfg=["4", "M", "6"], normalize="none", optimizer="momentum",
                lr=0.05, weight_decay=0.0, schedule="constant", milestones=[], training_steps="3", batch_size=64,
                finetune_steps="2", max_rounds=1, max_train_examples=256, max_test_examples=64)
    res = filter_prune.run({**base, "prune_fraction": 0.25, "seeds": ["1"]}, tmp_path)
    old = json.loads((tmp_path / "config.json").read_text())  # rewrite it as the earlier release wrote it
    old["fraction"] = old.pop("prune_fraction")
    old["seed"] = 1
    old.pop("record_sha256")  # (no record checksums then)
    (tmp_path / "config.json").write_text(json.dumps(old))
    for d in (tmp_path / "seed_1").iterdir():  # everything one level up, as the earlier release laid it out
        d.replace(tmp_path / d.name)
    (tmp_path / "seed_1").rmdir()
    again = filter_prune.run({**base, "prune_fraction": 0.25, "seeds": ["1"]}, tmp_path)
    assert (tmp_path / "seed_1" / "round_1" / "round.json").exists() and not (tmp_path / "trained").exists()
    assert again["rounds"] == res["rounds"]
    with pytest.raises(ValueError, match=r"prune_fraction: 0.25 -> 0.5"):
        filter_prune.run({**base, "prune_fraction": 0.5, "seeds": ["1"]}, tmp_path)


def test_filter_prune_two_seeds_mean_and_std(tmp_path):
    base = dict(dataset="digits", model="vgg", vgg_cfg=["4", "M", "6"], normalize="none", optimizer="momentum",
                lr=0.05, weight_decay=0.0, schedule="constant", milestones=[], training_steps="3", batch_size=64,
                finetune_steps="2",
                max_rounds=1, max_train_examples=256, max_test_examples=64, prune_fraction=0.25)
    res = filter_prune.run({**base, "seeds": ["0", "1"]}, tmp_path)
    per = [json.loads((tmp_path / f"seed_{s}" / "results.json").read_text())["rounds"] for s in (0, 1)]
    for i, r in enumerate(res["rounds"]):
        vals = [p[i]["accuracy_after_finetune"] for p in per]
        assert r["accuracy_after_finetune"] == pytest.approx(np.mean(vals))
        assert r["accuracy_after_finetune_std"] == pytest.approx(np.std(vals, ddof=1))
        assert r["widths"] == per[0][i]["widths"] == per[1][i]["widths"] and r["num_seeds"] == 2
    assert set(res["per_seed"]) == {"0", "1"}
    last = res["rounds"][-1]  # the printed table shows the spread
    assert (f"{100 * last['accuracy_after_finetune']:.2f} ± {100 * last['accuracy_after_finetune_std']:.2f} |"
            in filter_prune.format_table(res).splitlines()[-1])
