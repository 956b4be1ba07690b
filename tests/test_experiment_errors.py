"""Bad flag values found by the reliability probe of 2026-12-02 (BUILD-notes, "Reliability probe"): each is refused
before any training with one message naming the flag and the expected form, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import common, filter_prune, imp as imp_exp, lrp_toy, merge, similarity

ROOT = Path(__file__).resolve().parents[1]
MLP = dict(dataset="digits", model="mlp", hidden=["8"], training_steps="2", batch_size=32)
VGG = dict(dataset="digits", model="vgg", vgg_cfg=["4", "M", "6"], normalize="none", training_steps="2",
           batch_size=32, max_rounds=1)
TOY = dict(datasets=["moons"], hidden=["8", "8"], training_steps="2", n_prune=4, seeds=["0"],
           samples_per_class=["1"], plot_n=1, criteria=["weight"])


@pytest.mark.parametrize("run,config,match", [
    (imp_exp.train_and_evaluate, {**MLP, "levels": 1, "prune_fraction": 1.5},
     r"prune_fraction=1.5: expected a finite number in \(0, 1\)"),
    (imp_exp.train_and_evaluate, {**MLP, "levels": 1, "prune_fraction": float("nan")}, r"prune_fraction=nan"),
    (merge.run, {**MLP, "seeds": ["0"], "threshold": float("nan")},
     r"threshold=nan: expected a finite number in \[0, inf\)"),
    (merge.run, {**MLP, "seeds": ["0"], "lam": 2.0}, r"lam=2.0: expected a finite number in \[0, 1\]"),
    (filter_prune.run, {**VGG, "finetune_steps": "-3"}, r"finetune_steps: duration '-3': expected a length >= 0"),
    (filter_prune.run, {**VGG, "finetune_lr": -1.0}, r"finetune_lr=-1.0: expected a finite number in \(0, inf\)"),
    (lrp_toy.run, {**TOY, "noise": -1.0}, r"noise=-1.0: expected a finite number in \[0, inf\)"),
    (lrp_toy.run, {**TOY, "plot_n": 7}, r"plot_n=7: expected one of samples_per_class \(1\)"),
])
def test_bad_values_are_refused_before_training_naming_the_flag(run, config, match, tmp_path):
    wd = tmp_path / "wd"
    with pytest.raises(ValueError, match=match):
        run(config, wd)
    assert not (wd / "config.json").exists() and not any(wd.glob("**/*.json"))


def test_similarity_rbf_threshold_is_checked_with_its_flag_name():
    with pytest.raises(ValueError, match=r"rbf_threshold=0.0: expected a finite number in \(0, inf\)"):
        similarity.check_config({"imp_workdir": "x", "rbf_threshold": 0.0})


@pytest.mark.parametrize("value,low,high,kw,ok", [
    (0.5, 0, 1, {}, True), (0, 0, 1, {"low_open": True}, False), (1, 0, 1, {"high_open": True}, False),
    (float("inf"), 0, None, {}, False), ("x", 0, 1, {}, False), (True, 0, 1, {}, False), (-2, None, 0, {}, True)])
def test_check_range(value, low, high, kw, ok):
    """One finite-number check for the experiments' flags; its message names the flag and the interval."""
    if ok:
        assert common.check_range("v", value, low, high, **kw) == float(value)
    else:
        with pytest.raises(ValueError, match=r"^v="):
            common.check_range("v", value, low, high, **kw)


def test_missing_flagfile_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for module in ("experiments.imp", "experiments.merge"):
        r = subprocess.run([sys.executable, "-m", module, f"--flagfile={tmp_path / 'nope.cfg'}"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (module, r.stderr[-1000:])
        assert r.stderr.strip().splitlines()[-1] == (f"error: flagfile='{tmp_path / 'nope.cfg'}': no such file; "
                                                     "expected a flag file such as experiments/configs/quickstart.cfg")


@pytest.mark.parametrize("spec", ["-3", "-1ep", "-2it", "nanep", "infep"])
def test_negative_or_non_finite_durations_are_refused(spec):
    from jaxprune import train

    with pytest.raises(ValueError, match=f"training_steps: duration '{spec}'"):
        train.parse_duration(spec, 10, "training_steps")
    assert train.parse_duration("0", 10) == 0 and train.parse_duration("1.5ep", 10) == 15
