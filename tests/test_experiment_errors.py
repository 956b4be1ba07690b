"""Bad flag values found by the reliability probe of 2026-12-02 (BUILD-notes, "Reliability probe"): each is refused
before any training with one message naming the flag and the expected form, nothing written."""
from __future__ import annotations

import json
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
TOY = dict(datasets=["moons"], hidden=["8", "8"], optimizer="adam", lr=1e-3, training_steps="2", n_prune=4,
           seeds=["0"], samples_per_class=["1"], plot_n=1, criteria=["weight"])


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


# ----------------------------------------------------------------------------------------------- issue 28
# Tracebacks, vague errors and nonsense accepted (issue 28's probe): each a one-line error naming the flag or the
# file and what to do, before any training; nothing written.
from experiments import oneshot  # noqa: E402
from jaxprune import checkpoint, train  # noqa: E402

ONESHOT = dict(dataset="digits", model="mlp", hidden=["8"], optimizer="adam", lr=1e-3, training_steps="2",
               batch_size=32, sparsity=["0.5"])


@pytest.mark.parametrize("run,config,match", [
    (imp_exp.train_and_evaluate, {**MLP, "hidden": ["0"]}, r"^hidden=0: expected layer widths as integers >= 1"),
    (imp_exp.train_and_evaluate, {**MLP, "hidden": ["16", "-4"]}, r"^hidden=16,-4: .*got -4"),
    (merge.run, {**MLP, "seeds": ["0"], "hidden": ["0"]}, r"^hidden=0: expected layer widths"),
    (filter_prune.run, {**VGG, "vgg_cfg": ["16", "X", "32"]},
     r"^vgg_cfg=16,X,32: entry 'X' is neither a conv width \(an integer >= 1\) nor M .*--vgg_cfg=16,16,M,32,32,M"),
    (filter_prune.run, {**VGG, "vgg_cfg": ["4", "M", "0"]}, r"^vgg_cfg=4,M,0: entry '0' is neither"),
    (merge.run, {**MLP, "model": "vgg", "hidden": ["300", "100"], "vgg_cfg": ["4", "M", "6"], "seeds": ["0"],
                 "pruned_cfg": ["2", "Y", "3"]}, r"^pruned_cfg=2,Y,3: entry 'Y' is neither"),
    (lrp_toy.run, {**TOY, "hidden": ["8", "0"]}, r"^hidden=8,0: expected layer widths"),
])
def test_zero_widths_and_bad_cfg_entries_are_one_line_errors(run, config, match, tmp_path):
    wd = tmp_path / "wd"
    with pytest.raises(ValueError, match=match) as e:
        run(config, wd)
    assert "\n" not in str(e.value) and not any(wd.glob("**/*.json"))


def test_oneshot_hidden_zero_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"^hidden=0: expected layer widths as integers >= 1"):
        oneshot.run({**ONESHOT, "hidden": ["0"]}, tmp_path / "wd")
    assert not any((tmp_path / "wd").glob("**/*.json"))


@pytest.mark.parametrize("content,match", [
    ("[1, 2]", r"config.json: holds a JSON list, not the settings object an experiment writes .*; delete .*wd to "
               r"start over, or use a new --workdir"),
    ("{not json", r"config.json: not valid JSON, the file is corrupt or truncated .*; delete .*wd to start over"),
])
@pytest.mark.parametrize("run,config", [(imp_exp.train_and_evaluate, MLP), (filter_prune.run, VGG)])
def test_a_config_json_that_is_not_a_settings_object_names_the_file_and_the_fix(run, config, content, match,
                                                                                 tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        run(config, wd)
    assert (wd / "config.json").read_text() == content and not list(wd.glob("level_*")) + list(wd.glob("seed_*"))


def _filter_prune_workdir(path: Path) -> Path:
    """A workdir as experiments.filter_prune leaves it after its settings check (its config.json)."""
    path.mkdir()
    checkpoint.write_json(path / "config.json", checkpoint.as_stored(
        {k: v for k, v in filter_prune.DEFAULTS.items() if k not in filter_prune._VOLATILE}))
    return path


def test_another_experiments_workdir_is_named_as_such(tmp_path):
    fp = _filter_prune_workdir(tmp_path / "fp")
    with pytest.raises(ValueError, match=rf"^imp_workdir={fp}: not an IMP workdir \(it was written by "
                                         r"experiments.filter_prune\); expected the --workdir of an experiments.imp"):
        similarity.run({"imp_workdir": str(fp)}, tmp_path / "out")
    with pytest.raises(ValueError, match=rf"^workdir={fp}: not an IMP workdir \(it was written by "
                                         r"experiments.filter_prune\); use a new --workdir for experiments.imp"):
        imp_exp.train_and_evaluate(MLP, fp)
    with pytest.raises(ValueError, match=r"^source_workdir=.*: not an IMP workdir \(it was written by experiments"):
        merge.run({**MLP, "seeds": ["0"], "source_workdir": str(fp)}, tmp_path / "m")
    assert sorted(p.name for p in fp.iterdir()) == ["config.json"]


def test_a_diverging_imp_run_stops_with_the_step_and_the_setting_to_change(tmp_path):
    """--optimizer=sgd --lr=1e6 trained to a loss of 1e20 and reported an accuracy; now the level stops."""
    wd = tmp_path / "wd"
    with pytest.raises(train.Diverged, match=r"^\[level 0\] training diverged at step \d+: the training loss is .*"
                                             r"lower the learning rate \(--lr"):
        imp_exp.train_and_evaluate({**MLP, "hidden": ["32"], "optimizer": "sgd", "lr": 1e6, "training_steps": "40",
                                    "levels": 1}, wd)
    assert not (wd / "level_0" / "level.json").exists() and not (wd / "results.json").exists()


@pytest.mark.parametrize("run,config,match", [
    (imp_exp.train_and_evaluate, {**MLP, "rewind_step": "1"},
     r"^rewind_step=1: does nothing with --rewind=init \(only --rewind=step rewinds to a step\)"),
    (imp_exp.train_and_evaluate, {**MLP, "schedule": "step", "milestones": ["1", "5"]},
     r"^milestones=1,5: does nothing after step 1: milestone 5 is at or past the end of training \(2 steps\)"),
    (imp_exp.train_and_evaluate, {**MLP, "milestones": ["1"]}, r"^milestones=1: does nothing with --schedule=constant"),
    (imp_exp.train_and_evaluate, {**MLP, "gamma": 0.5}, r"^gamma=0.5: does nothing with --schedule=constant"),
    (imp_exp.train_and_evaluate, {**MLP, "warmup": "2"}, r"^warmup=2: does nothing as a warm-up: .*\(2 steps\)"),
    (imp_exp.train_and_evaluate, {**MLP, "momentum": 0.5}, r"^momentum=0.5: does nothing with --optimizer=sgd"),
    (imp_exp.train_and_evaluate, {**MLP, "analysis_examples": 50},
     r"^analysis_examples=50: does nothing without --analyses=similarity"),
    (imp_exp.train_and_evaluate, {**MLP, "model": "lenet300"}, r"^hidden=8: does nothing with --model=lenet300"),
    (filter_prune.run, {**VGG, "hidden": ["8"]}, r"^hidden=8: does nothing with --model=vgg"),
    (merge.run, {**MLP, "seeds": ["0"], "schedule": "constant", "milestones": ["1"]},
     r"^milestones=1: does nothing with --schedule=constant"),
    (oneshot.run, {**ONESHOT, "momentum": 0.5}, r"^momentum=0.5: does nothing with --optimizer=adam"),
    (lrp_toy.run, {**TOY, "momentum": 0.5}, r"^momentum=0.5: does nothing with --optimizer=adam"),
])
def test_flags_that_do_nothing_are_refused_when_given(run, config, match, tmp_path):
    wd = tmp_path / "wd"
    with pytest.raises(common.UnusedFlag, match=match):
        run(config, wd)
    assert not any(wd.glob("**/*.json"))


def test_a_flagfile_only_flag_is_warned_and_reset_not_refused(monkeypatch, capsys):
    """The rule's CLI half, in-process: an UnusedFlag whose flag only the flagfile set is dropped with a warning."""
    seen = []

    def run_fn(config, workdir):
        seen.append(dict(config))
        if config["rewind_step"] != "0":
            raise common.UnusedFlag("rewind_step", config["rewind_step"], "with --rewind=init")
        return "ran"

    c = {**imp_exp.DEFAULTS, "rewind_step": "1"}
    assert common.run_tolerating_flagfile(run_fn, c, imp_exp.SPEC, {"rewind_step"}) == "ran"
    assert [s["rewind_step"] for s in seen] == ["1", "0"]
    assert capsys.readouterr().err.strip() == ("warning: rewind_step=1: does nothing with --rewind=init; leave it "
                                               "out, or change the setting it depends on (set by the flagfile: "
                                               "ignored)")
    with pytest.raises(common.UnusedFlag):  # typed on the command line: refused
        common.run_tolerating_flagfile(run_fn, c, imp_exp.SPEC, set())


def test_on_command_line_tells_typed_flags_from_flagfile_ones():
    argv = ["--flagfile=x.cfg", "--num_replicas=4", "--noprune_output", "--seeds", "3", "--", "--levels=2"]
    assert common.on_command_line("num_replicas", argv) and common.on_command_line("prune_output", argv)
    assert common.on_command_line("seeds", argv)
    assert not common.on_command_line("levels", argv) and not common.on_command_line("seed", argv)


def test_the_deprecated_alias_typed_overrides_the_flagfiles_new_name(monkeypatch):
    """--num_replicas=4 typed, --seeds=3 from the flagfile: seeds 3..6 (the flagfile's first seed, 4 replicas)."""
    r = imp_exp.RENAMED[0]
    monkeypatch.setattr(sys, "argv", ["imp", "--flagfile=f.cfg", "--num_replicas=4"])
    with pytest.warns(UserWarning, match=r"--num_replicas on the command line overrides --seeds of the flagfile"):
        given = common._command_line_wins(r, {"num_replicas": 4}, ["3"])
    assert r.value({k: v for k, v in given.items() if k != "seeds"}) == [3, 4, 5, 6]
    monkeypatch.setattr(sys, "argv", ["imp", "--flagfile=f.cfg", "--seeds=5"])  # old name in the flagfile
    with pytest.warns(UserWarning, match=r"--seeds on the command line overrides --num_replicas"):
        assert common._command_line_wins(r, {"num_replicas": 4}, ["5"]) == {}
    monkeypatch.setattr(sys, "argv", ["imp", "--seed=1", "--seeds=1"])  # both typed: refused later, as before
    assert common._command_line_wins(r, {"seed": 1}, ["1"]) == {"seed": 1}


@pytest.mark.slow
def test_cli_flagfile_rules_end_to_end(tmp_path):
    """As a user runs them: a flagfile's unused --rewind_step is one warning line and the run goes on; typed, it
    is refused (exit 2, one line); a typed --num_replicas overrides the flagfile's --seeds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cfg = tmp_path / "shared.cfg"
    cfg.write_text("--dataset=digits\n--model=mlp\n--hidden=16\n--training_steps=2\n--levels=0\n--rewind_step=1\n"
                   "--seeds=3\n")
    cli = lambda *a: subprocess.run([sys.executable, "-m", "experiments.imp", f"--flagfile={cfg}", *a], cwd=tmp_path,
                                    env=env, capture_output=True, text=True, timeout=300)
    r = cli(f"--workdir={tmp_path / 'a'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: rewind_step=1: does nothing with --rewind=init" in r.stderr
    r = cli(f"--workdir={tmp_path / 'b'}", "--rewind_step=2")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "error: rewind_step=2: does nothing with --rewind=init")
    r = cli(f"--workdir={tmp_path / 'c'}", "--num_replicas=2", "--rewind=step")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "c" / "config.json").read_text())["seeds"] == [3, 4]
